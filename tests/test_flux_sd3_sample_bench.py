"""``benchmarks/flux.py`` runs on tiny-flux and reports its rows; no timing is asserted. What cannot be tuned: the
sampling row's latents equal diffusers' FluxPipeline's bit for bit, and the merge row's weights equal diffusers'
``fuse_lora`` (the same products added, within float32 rounding), both measured in the same run."""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))  # the scripts import their _common helpers
    try:
        spec = importlib.util.spec_from_file_location("flux_bench", ROOT / "benchmarks" / "flux.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


def test_flux_bench_rows(capsys, adapterhub_cache):
    _bench().main(["--steps", "1", "--repeat", "1", "--ranks", "2"])
    out = capsys.readouterr().out
    sample = re.search(r"^sample 64px x1, 1 steps: diffusers [\d.]+ s, adapterhub [\d.]+ s, ratio [\d.]+x, "
                       r"latents bitwise equal: (\w+)$", out, re.M)
    assert sample and sample.group(1) == "True", out
    merge = re.search(r"^merge rank 2 on (\d+) modules: .* ratio [\d.]+x, max\|diff\| ([\d.e+-]+)$", out, re.M)
    assert merge, out
    assert int(merge.group(1)) > 30 and float(merge.group(2)) <= 1e-5
