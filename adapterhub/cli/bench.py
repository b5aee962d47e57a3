"""``adapterhub bench``: measurements that compare adapterhub with the reference libraries.

A subcommand is a thin entry over a harness in the repository's ``benchmarks/`` folder (not an installed
package), loaded by path with :func:`harness`. ``adapterhub bench sample`` runs
``benchmarks/sample_harness.py`` (ms per step, images/s, stack-switch time, compile time, TFLOP/s and share
of the measured peak, peak memory over alternating sizes, against diffusers' own pipeline in the same run)
and prints the ratios; ``--json`` prints the whole report.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import click

from adapterhub.cli import output
from adapterhub.errors import AdapterhubError

_LOADED: dict[Path, object] = {}  # harness file -> its module, loaded once per process


def benchmarks_dir() -> Path:
    """``$ADAPTERHUB_BENCHMARKS``, else the ``benchmarks/`` folder beside the ``adapterhub`` package (a source
    checkout, installed with ``pip install -e .``)."""
    return Path(os.environ.get("ADAPTERHUB_BENCHMARKS") or Path(__file__).resolve().parents[2] / "benchmarks")


def harness(name: str):
    """The module ``benchmarks/<name>_harness.py``, imported by path; one-line :class:`AdapterhubError` naming the
    file when it is not there (adapterhub installed without its source)."""
    path = benchmarks_dir() / f"{name}_harness.py"
    if not path.is_file():
        raise AdapterhubError(f"{path}: not found: `adapterhub bench {name}` runs the harness in the benchmarks/ "
                              "folder of a source checkout (install adapterhub from one with pip install -e ., or "
                              "set ADAPTERHUB_BENCHMARKS to its benchmarks/ folder)")
    path = path.resolve()
    if path not in _LOADED:
        module_name = f"adapterhub_bench_{name}_harness"
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses look their module up while the file runs
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(module_name, None)
            raise
        _LOADED[path] = module
    return _LOADED[path]


@click.group("bench")
def bench():
    """Measure adapterhub against the reference libraries (no timing is asserted: numbers to read)."""


@bench.command("sample")
@click.option("--base", default="tiny-sd1", show_default=True,
              help="tiny-sd1, tiny-sdxl, a preset (sd1, sdxl: random weights), a diffusers folder or checkpoint.")
@click.option("--backend", "backends", multiple=True, default=("eager",), show_default=True,
              help="A registered sampler backend (eager, compiled ...), optionally with options as its environment "
                   "variables: compiled:fuse_qkv=0,channels_last=1,mode=reduce-overhead. Repeat to measure several.")
@click.option("--steps", default=8, show_default=True, type=int, help="Sampling steps per request.")
@click.option("--size", default=256, show_default=True, type=int, help="Image width and height in pixels.")
@click.option("--repeat", default=4, show_default=True, type=int, help="Timed requests (and switch cycles) per path.")
@click.option("--batch", default=1, show_default=True, type=int, help="Images per request.")
@click.option("--sampler", default="DPM++ 2M", show_default=True, help="A webui sampler name.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available).")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default=None,
              help="Default: fp16 on CUDA, fp32 on CPU.")
@click.option("--no-lora-reference", is_flag=True, help="Skip diffusers + peft LoRAs (switches, steps with adapters).")
@click.option("--no-diffusers-fused", is_flag=True, help="Skip diffusers with the two LoRAs fused (fuse_lora).")
@click.option("--no-diffusers-compile", is_flag=True,
              help="Skip diffusers + torch.compile of the UNet (slow to compile on CPU).")
@click.option("--no-memory", is_flag=True, help="Skip the peak-memory rounds alternating two sizes.")
@click.option("--profile", default=0, show_default=True, type=int,
              help="Print this many top kernels (torch.profiler) of one request per adapterhub backend.")
@click.option("--second-process", is_flag=True,
              help="Time a fresh process to its first image (compile caches warm), per adapterhub backend.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole report as JSON.")
def bench_sample_cmd(base, backends, steps, size, repeat, batch, sampler, device, dtype, no_lora_reference,
                     no_diffusers_fused, no_diffusers_compile, no_memory, profile, second_process, as_json):
    """Sampling: adapterhub's generator vs diffusers' pipeline (ms/step, images/s, switches, compile)."""
    measure = harness("sample")
    cfg = measure.BenchConfig(base=base, backends=tuple(backends), steps=steps, size=size, repeat=repeat,
                              batch=batch, sampler=sampler, device=device, dtype=dtype,
                              lora_reference=not no_lora_reference, diffusers_fused=not no_diffusers_fused,
                              diffusers_compile=not no_diffusers_compile, memory=not no_memory, profile=profile,
                              second_process=second_process)
    measure.check_config(cfg)  # bad options fail before the model loads
    output.quiet_model_loading()

    def note(text: str) -> None:
        if not as_json:
            click.echo(f"... {text}", err=True)

    report = measure.bench_sample(cfg, note)
    output.emit(report, as_json, lambda data: click.echo(measure.format_report(data)))
