"""``adapterhub bench sample`` and :mod:`adapterhub.sample.bench`: it runs, measures every path and
prints the ratios (no timing is asserted). The check that cannot be tuned: the eager generator's
latents equal diffusers' own pipeline's, bit for bit, in the same run."""
from __future__ import annotations

import json
import re

import pytest

from adapterhub import cli

TINY = ["--steps", "1", "--size", "64", "--repeat", "1"]


def run(capsys, *args):
    rc = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.fixture(scope="module")
def report(tiny_sd1):
    from adapterhub.sample.bench import BenchConfig, bench_sample

    notes = []
    data = bench_sample(BenchConfig(steps=1, size=64, repeat=1, sampler="Euler a"), notes.append)
    data["_notes"] = notes
    return data


def test_every_path_is_measured_against_diffusers(report):
    (ours,), theirs, (ratio,) = report["adapterhub"], report["diffusers"], report["ratios"]
    assert ours["backend"] == "eager" and ours["compile_s"] is None
    assert ours["latents_equal"] and ours["max_abs_diff"] == 0.0  # same loop as diffusers, bit for bit
    for key in ("ms_per_step", "images_per_s", "ms_per_step_stack", "images_per_s_stack", "switch_ms"):
        assert ours[key] > 0
    assert theirs["ms_per_step"] > 0 and theirs["lora"]["switch_ms"] > 0 and theirs["lora"]["ms_per_step_stack"] > 0
    for key in ("step", "images_per_s", "step_with_stack", "switch"):
        assert ratio[key] > 0
    assert ratio["step"] == pytest.approx(theirs["ms_per_step"] / ours["ms_per_step"])
    assert ratio["switch"] == pytest.approx(theirs["lora"]["switch_ms"] / ours["switch_ms"])
    assert report["config"]["size"] == 64 and report["config"]["dtype"] == "float32"
    assert any("stack switches" in n for n in report["_notes"])
    json.dumps({k: v for k, v in report.items() if k != "_notes"})  # plain data


def test_format_report_prints_the_ratios(report):
    from adapterhub.sample.bench import format_report

    text = format_report(report)
    header = text.splitlines()[1].split()
    assert header[:2] == ["path", "ms/step"] and "switch" in header
    ours = next(line for line in text.splitlines() if line.startswith("adapterhub eager"))
    ratios = re.findall(r"(\d+\.\d\d)x", ours)
    assert len(ratios) == 3
    assert float(ratios[0]) == pytest.approx(report["ratios"][0]["step"], abs=0.006)
    assert "eager latents vs diffusers: bitwise equal True" in text


def test_cli_bench_sample_prints_ratios(capsys, tiny_sd1):
    rc, out, err = run(capsys, "bench", "sample", *TINY, "--no-lora-reference")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("tiny-sd1 on cpu float32, 64px, 1 steps")
    ours = next(line for line in lines if line.startswith("adapterhub eager"))
    assert len(re.findall(r"\d+\.\d\dx", ours)) == 1  # the step ratio; no peft reference asked for
    assert any(line.startswith("diffusers") for line in lines)
    assert "bitwise equal True" in out and "... eager: stack switches" in err


def test_bench_is_a_group(capsys):
    rc, out, _ = run(capsys, "bench", "--help")
    assert rc == 0 and re.search(r"^\s+sample\s", out, re.MULTILINE)


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps 0: must be 1 or more"),
    (["--backend", "warp"], "unknown sampler backend 'warp'"),
    (["--sampler", "Eulr"], "unknown sampler 'Eulr'"),
    (["--size", "100"], "multiples of 8"),
])
def test_bad_options_fail_before_loading(capsys, tmp_path, args, message):
    rc, _, err = run(capsys, "bench", "sample", "--base", tmp_path / "no-such-base", *args)
    assert rc == 2 and err.count("\n") == 1 and message in err


@pytest.mark.slow
def test_compiled_backend_reports_its_compile_time(tiny_sd1, monkeypatch):
    import torch._dynamo

    from adapterhub.sample.bench import BenchConfig, bench_sample

    monkeypatch.setenv("ADAPTERHUB_COMPILE_BACKEND", "aot_eager")  # graph capture without C++ codegen
    torch._dynamo.reset()
    data = bench_sample(BenchConfig(backends=("compiled",), steps=1, size=64, repeat=1, lora_reference=False))
    (row,) = data["adapterhub"]
    assert row["compile_s"] is not None and row["compile_s"] >= 0 and row["graphs"] >= 1
    assert row["max_abs_diff"] < 1e-3
    assert data["ratios"][0]["switch"] is None and data["ratios"][0]["step"] > 0
