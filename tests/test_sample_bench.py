"""``adapterhub bench sample`` and its harness, ``benchmarks/sample_harness.py``: it runs, measures every path and
prints the ratios (no timing is asserted). The check that cannot be tuned: the eager generator's
latents equal diffusers' own pipeline's, bit for bit, in the same run. The added rows are checked the
same way: diffusers with the two LoRAs fused against the same LoRAs unfused (peft), diffusers +
``torch.compile`` (``aot_eager``: graph capture without C++ codegen) against eager diffusers, and the
FLOPs per UNet step against ``FlopCounterMode`` run here on one UNet call."""
from __future__ import annotations

import json
import re

import pytest

from adapterhub import cli

TINY = ["--steps", "1", "--size", "64", "--repeat", "1"]


def _harness_names(*names):
    """Names of the harness, as ``adapterhub bench sample`` loads it (by path from the repository)."""
    from adapterhub.cli.bench import harness

    module = harness("sample")
    values = tuple(getattr(module, n) for n in names)
    return values if len(values) > 1 else values[0]


def run(capsys, *args):
    rc = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# fusing adds the LoRA products into the weights: the same sums rounded in another order. In float32 at
# 2 steps the largest difference measured is ~2e-6 of the largest latent; allowed: 1e-5 of it.
FUSED_RTOL = 1e-5


@pytest.fixture(scope="module")
def report(tiny_sd1):
    import torch._dynamo

    BenchConfig, bench_sample = _harness_names("BenchConfig", "bench_sample")

    notes = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADAPTERHUB_COMPILE_BACKEND", "aot_eager")
        mp.delenv("ADAPTERHUB_COMPILE_MODE", raising=False)
        torch._dynamo.reset()
        data = bench_sample(BenchConfig(steps=2, size=64, repeat=1, sampler="Euler a"), notes.append)
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


def test_fused_lora_row_matches_the_unfused_one(report):
    fused, lora = report["diffusers"]["lora_fused"], report["diffusers"]["lora"]
    assert fused["fuse_s"] >= 0 and fused["ms_per_step"] > 0 and fused["images_per_s"] > 0
    assert lora["ms_per_step_stack"] > 0  # the unfused row is still there
    assert fused["max_abs_unfused"] > 1
    assert fused["max_abs_diff"] <= FUSED_RTOL * fused["max_abs_unfused"]
    assert isinstance(fused["unfuse_exact"], bool)


def test_compiled_diffusers_row_reports_compile_apart(report):
    comp = report["diffusers"]["compiled"]
    assert comp["backend"] == "aot_eager" and comp["mode"] == "default"  # CPU: the default mode
    assert comp["compile_s"] >= 0 and comp["first_s"] >= comp["compile_s"] and comp["ms_per_step"] > 0
    # after fuse / unfuse / unload the weights are the clean base again: same latents as eager diffusers
    assert comp["max_abs_diff"] < 1e-4
    assert any("diffusers compiled (aot_eager, default)" in n for n in report["_notes"])


def test_flops_equal_flop_counter_on_one_unet_call(report, tiny_sd1):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    unet = tiny_sd1.unet
    side = 64 // tiny_sd1.vae_scale_factor
    sample = torch.randn(2, unet.config.in_channels, side, side)  # batch 1 and its negative prompt (CFG)
    hidden = torch.randn(2, tiny_sd1.tokenizer.model_max_length, unet.config.cross_attention_dim)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(sample, torch.tensor(10), encoder_hidden_states=hidden)
    flops = report["flops"]
    assert flops["unet_step"] > 0 and flops["unet_step"] == counter.get_total_flops()
    assert flops["unet_rows"] == 2 and flops["peak_tflops"] > 0
    theirs = report["diffusers"]
    for row in (report["adapterhub"][0], theirs, theirs["lora_fused"], theirs["compiled"]):
        assert row["tflops"] == pytest.approx(flops["unet_step"] / (row["ms_per_step"] / 1000) / 1e12)
        assert row["share_of_peak"] == pytest.approx(row["tflops"] / flops["peak_tflops"])
    assert report["adapterhub"][0]["share_of_peak_stack"] > 0 and theirs["lora"]["tflops_stack"] > 0


def test_memory_over_alternating_sizes(report):
    mem = report["adapterhub"][0]["memory"]
    assert mem["sizes"] == [64, 128] and mem["rounds"] == 2 and len(mem["peak_mb"]) == 2
    assert mem["measure"] == "process peak RSS"
    assert 0 < mem["peak_mb"][0] <= mem["peak_mb"][1]
    assert any("alternating 64 / 128 px" in n for n in report["_notes"])


def test_format_report_prints_the_ratios(report):
    format_report = _harness_names("format_report")

    text = format_report(report)
    header = text.splitlines()[1].split()
    assert header[:2] == ["path", "ms/step"] and "switch" in header
    ours = next(line for line in text.splitlines() if line.startswith("adapterhub eager"))
    ratios = re.findall(r"(\d+\.\d\d)x", ours)
    assert len(ratios) == 3
    assert float(ratios[0]) == pytest.approx(report["ratios"][0]["step"], abs=0.006)
    assert "eager latents vs diffusers: bitwise equal True" in text
    assert [line.split("  ")[0].strip() for line in text.splitlines()[2:6]] == [
        "adapterhub eager", "diffusers (peft)", "diffusers fused LoRA", "diffusers compiled"]
    assert "TFLOP/s" in header and "GFLOP (2 rows, FlopCounterMode)" in text
    assert "diffusers fused LoRA latents vs unfused: max |diff|" in text
    assert "eager memory, alternating 64 / 128 px: peak MB after each round" in text


def test_cli_bench_sample_prints_ratios(capsys, tiny_sd1):
    rc, out, err = run(capsys, "bench", "sample", *TINY, "--no-lora-reference", "--no-diffusers-compile", "--no-memory")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("tiny-sd1 on cpu float32, 64px, 1 steps")
    ours = next(line for line in lines if line.startswith("adapterhub eager"))
    assert len(re.findall(r"\d+\.\d\dx", ours)) == 1  # the step ratio; no peft reference asked for
    assert any(line.startswith("diffusers") for line in lines)
    assert "bitwise equal True" in out and "... eager: stack switches" in err
    assert "diffusers compiled" not in out and "diffusers fused" not in out and "memory" not in out
    assert "GFLOP" in out  # FLOPs and peak are always measured


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

    BenchConfig, bench_sample = _harness_names("BenchConfig", "bench_sample")

    monkeypatch.setenv("ADAPTERHUB_COMPILE_BACKEND", "aot_eager")  # graph capture without C++ codegen
    torch._dynamo.reset()
    data = bench_sample(BenchConfig(backends=("compiled", "compiled:fuse_qkv=0,channels_last=1"), steps=1, size=64,
                                   repeat=1, lora_reference=False, diffusers_compile=False, memory=False))
    fused, plain = data["adapterhub"]
    assert plain["backend"] == "compiled:fuse_qkv=0,channels_last=1"
    for row in (fused, plain):
        assert row["compile_s"] is not None and row["compile_s"] >= 0 and row["graphs"] >= 1
        assert row["max_abs_diff"] < 1e-3
    assert data["ratios"][0]["switch"] is None and data["ratios"][0]["step"] > 0
    assert "ADAPTERHUB_COMPILE_FUSE_QKV" not in __import__("os").environ  # the options were set for the row only


def test_backend_options_become_its_environment():
    from adapterhub.errors import AdapterhubError
    backend_spec = _harness_names("backend_spec")

    assert backend_spec("compiled:fuse_qkv=0, channels_last=1,mode=reduce-overhead") == (
        "compiled", {"ADAPTERHUB_COMPILE_FUSE_QKV": "0", "ADAPTERHUB_COMPILE_CHANNELS_LAST": "1",
                     "ADAPTERHUB_COMPILE_MODE": "reduce-overhead"})
    assert backend_spec("eager") == ("eager", {})
    with pytest.raises(AdapterhubError, match="KEY=VALUE"):
        backend_spec("compiled:fuse_qkv")


def test_profile_and_second_process(tiny_sd1):
    """``--profile N``: the top kernels of one request, by self time, shares summing to at most 1; ``--second-process``:
    a fresh process makes its first image and reports the time."""
    BenchConfig, bench_sample, format_report = _harness_names("BenchConfig", "bench_sample", "format_report")

    data = bench_sample(BenchConfig(backends=("eager",), steps=1, size=64, repeat=1, lora_reference=False,
                                   diffusers_compile=False, memory=False, profile=4, second_process=True))
    (row,) = data["adapterhub"]
    profile = row["profile"]
    assert 1 <= len(profile) <= 4 and all(p["self_ms"] > 0 and p["calls"] >= 1 for p in profile)
    assert [p["self_ms"] for p in profile] == sorted((p["self_ms"] for p in profile), reverse=True)
    assert 0 < sum(p["share"] for p in profile) <= 1 + 1e-9
    second = row["second_process"]
    assert "error" not in second, second
    assert second["first_image_s"] >= second["load_s"] > 0
    text = format_report(data)
    assert "eager top kernels of one request" in text and "eager second process: first image after" in text


def test_the_harness_lives_in_benchmarks_not_in_the_service():
    """The sampling service carries no benchmark: the harness is ``benchmarks/sample_harness.py``, loaded by path."""
    from pathlib import Path

    import adapterhub
    from adapterhub.cli.bench import harness

    root = Path(adapterhub.__file__).resolve().parent
    assert not (root / "sample" / "bench.py").exists()
    module = harness("sample")
    assert Path(module.__file__).resolve() == root.parent / "benchmarks" / "sample_harness.py"
    assert harness("sample") is module  # loaded once


def test_bench_without_the_repository_says_so_in_one_line(capsys, tmp_path, monkeypatch):
    """adapterhub installed without its source (no benchmarks/ folder): one line naming the missing file, exit 2."""
    monkeypatch.setenv("ADAPTERHUB_BENCHMARKS", str(tmp_path))
    rc, out, err = run(capsys, "bench", "sample", *TINY)
    assert rc == 2 and out == "" and err.count("\n") == 1
    assert str(tmp_path / "sample_harness.py") in err and "source checkout" in err and "Traceback" not in err
