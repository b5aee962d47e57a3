"""How the ``wd`` captioner picks onnxruntime's execution providers. The CUDA provider itself needs
onnxruntime-gpu and a GPU, which the suite does not have: the choice is checked with onnxruntime's
provider list stubbed, and the session it opens on the CPU with the real library."""
from __future__ import annotations

import logging

import pytest

ort = pytest.importorskip("onnxruntime")

from adapterhub_plugins.captioners import wd  # noqa: E402
from test_captioner_wd import tagger  # noqa: E402,F401 - the tiny tagger fixture


@pytest.fixture
def with_cuda(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])


def test_cuda_devices_ask_for_the_cuda_provider_with_the_cpu_behind_it(with_cuda):
    assert wd.providers("cuda") == [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    assert wd.providers("cuda:3") == [("CUDAExecutionProvider", {"device_id": 3}), "CPUExecutionProvider"]
    assert wd.providers("cpu") == ["CPUExecutionProvider"]


def test_without_onnxruntime_gpu_cuda_warns_and_runs_on_the_cpu(monkeypatch, caplog):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["AzureExecutionProvider", "CPUExecutionProvider"])
    with caplog.at_level(logging.WARNING, logger="adapterhub.captioners.wd"):
        assert wd.providers("cuda:1") == ["CPUExecutionProvider"]
    assert "onnxruntime-gpu" in caplog.text


def test_a_cpu_session_uses_only_the_cpu_provider(tagger):
    d, _, _ = tagger
    session = wd.open_session(d / "model.onnx", "cpu")
    assert session.get_providers() == ["CPUExecutionProvider"]
