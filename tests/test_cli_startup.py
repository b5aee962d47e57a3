"""Start-up cost: commands that only list or browse import neither torch nor diffusers."""
from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
from click.testing import CliRunner

from adapterhub.cli import COMMANDS, cli

PROBE = ("import sys\nfrom adapterhub.cli import main\nrc = main({argv!r})\nprint('RC', rc)\n"
         "print('HEAVY', sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))\n")


def _heavy_modules(argv, cwd) -> list[str]:
    done = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True,
                          cwd=cwd, timeout=120)
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("HEAVY ")]
    assert line and "RC 0" in done.stdout.splitlines(), done.stdout + done.stderr  # the command itself worked
    return eval(line[-1][len("HEAVY "):])


@pytest.mark.parametrize("argv", [["--help"], ["catalog", "--help"], ["catalog", "list"], ["catalog", "stats"],
                                  ["plugins"], ["plugins", "--json"]])
def test_listing_and_browsing_import_no_heavy_library(argv, tmp_path):
    if argv[0] == "catalog" and argv[1] != "--help":  # browsing needs a catalog: an empty one, made beforehand
        (tmp_path / "empty").mkdir()
        _heavy_modules(["catalog", "scan", "empty"], tmp_path)
    assert _heavy_modules(argv, tmp_path) == []


def _small_lora(path):
    """A kohya LoRA of two modules (float32 and float16 factors, float16 and float32 alphas), written with
    numpy so that making it imports no torch either."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    unet, te = ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
                "lora_te_text_model_encoder_layers_0_self_attn_q_proj")
    save_file({f"{unet}.lora_down.weight": rng.standard_normal((4, 768), dtype=np.float32),
               f"{unet}.lora_up.weight": rng.standard_normal((320, 4), dtype=np.float32),
               f"{unet}.alpha": np.array(2.0, dtype=np.float16),
               f"{te}.lora_down.weight": rng.standard_normal((4, 768)).astype(np.float16),
               f"{te}.lora_up.weight": rng.standard_normal((768, 4)).astype(np.float16),
               f"{te}.alpha": np.array(4.0, dtype=np.float32)}, str(path), metadata={"ss_network_dim": "4"})
    return path


@pytest.mark.parametrize("flags", [[], ["--json"], ["--json", "--no-hash"]])
def test_inspect_of_a_safetensors_lora_imports_no_heavy_library(flags, tmp_path):
    path = _small_lora(tmp_path / "small.safetensors")
    assert _heavy_modules(["inspect", str(path), *flags], tmp_path) == []


def test_the_command_list_says_what_each_command_says_of_itself():
    listed = CliRunner().invoke(cli, ["--help"], terminal_width=300).output
    for name, spec in COMMANDS.items():
        module, attr = spec.split(":")
        own = getattr(importlib.import_module(module), attr).get_short_help_str(limit=300 - 6 - len(max(COMMANDS, key=len)))
        assert f"{name}  " in listed and own in listed, (name, own)
