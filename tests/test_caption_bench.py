"""``benchmarks/caption.py``'s wd rows: the random tagger it builds is the ViT it claims to be (its ONNX
graph run by onnxruntime equals a ViT forward pass written out in numpy, on a small shape), and a tiny
run prints both ways with their ratio and bound (no timing is asserted)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"size": 32, "patch": 8, "width": 16, "depth": 2, "heads": 2, "mlp": 24}


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("caption_bench", ROOT / "benchmarks" / "caption.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ln(x, s, b, eps=1e-5):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * s + b


def vit_forward(x: np.ndarray, w: dict, shape: dict) -> np.ndarray:
    """A pre-norm ViT (patch embedding, attention + GELU MLP blocks, mean pool, sigmoid head) in numpy."""
    from math import erf

    b, size, p, width, heads = len(x), shape["size"], shape["patch"], shape["width"], shape["heads"]
    g, dh = size // p, width // heads
    patches = x.reshape(b, g, p, g, p, 3).transpose(0, 1, 3, 5, 2, 4).reshape(b, g * g, 3 * p * p)
    h = patches @ w["patch_w"].reshape(width, -1).T + w["patch_b"] + w["pos"][0]
    gelu = np.vectorize(lambda v: 0.5 * v * (1 + erf(v / np.sqrt(2))))
    for i in range(shape["depth"]):
        n = f"b{i}_"
        a = _ln(h, w[n + "ln1_s"], w[n + "ln1_b"]) @ w[n + "qkv_w"] + w[n + "qkv_b"]
        q, k, v = a.reshape(b, g * g, 3, heads, dh).transpose(2, 0, 3, 1, 4)
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(dh)
        s = np.exp(s - s.max(-1, keepdims=True))
        att = (s / s.sum(-1, keepdims=True)) @ v
        h = h + att.transpose(0, 2, 1, 3).reshape(b, g * g, width) @ w[n + "o_w"] + w[n + "o_b"]
        m = gelu(_ln(h, w[n + "ln2_s"], w[n + "ln2_b"]) @ w[n + "fc1_w"] + w[n + "fc1_b"])
        h = h + m @ w[n + "fc2_w"] + w[n + "fc2_b"]
    pooled = _ln(h, w["ln_s"], w["ln_b"]).mean(1)
    return 1 / (1 + np.exp(-(pooled @ w["head_w"] + w["head_b"])))


def test_the_random_tagger_is_a_vit(bench, tmp_path):
    from onnx import numpy_helper

    folder = bench.write_vit_tagger(tmp_path / "tagger", SMALL, tags=40, std=0.5)  # sharp attention
    model = onnx.load(str(folder / "model.onnx"))
    weights = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    x = np.random.default_rng(1).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    got = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input_1:0": x})[0]
    np.testing.assert_allclose(got, vit_forward(x.astype(np.float64), weights, SMALL), rtol=1e-4, atol=1e-5)
    rows = (folder / "selected_tags.csv").read_text().splitlines()
    assert rows[0] == "tag_id,name,category,count" and len(rows) == 41


def test_a_tiny_wd_run_prints_both_ways_and_the_ratio(bench, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # its work folder, removed at the end
    assert bench.main(["--captioner", "wd", "--device", "cpu", "--wd-depth", "1", "--images", "4",
                       "--batch-size", "2", "--rounds", "1", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    row = json.loads(out[:out.rindex("}") + 1])
    assert row["captioner"] == "wd" and row["workers"] == 1 and row["overlap_bound"] >= 1
    for way in ("serial", "overlapped"):
        assert row[way]["loop_images_per_s"] > 0
    assert "loading workers" in out.splitlines()[-1] and list(tmp_path.iterdir()) == []
