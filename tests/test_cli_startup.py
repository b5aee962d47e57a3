"""Start-up cost: commands that only list or browse import neither torch nor diffusers."""
from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
from click.testing import CliRunner

from adapterhub.cli import COMMANDS, cli

PROBE = ("import sys\nfrom adapterhub.cli import main\nrc = main({argv!r})\n"
         "print('HEAVY', sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))\n")


def _heavy_modules(argv, cwd) -> list[str]:
    done = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True,
                          cwd=cwd, timeout=120)
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("HEAVY ")]
    assert line, done.stdout + done.stderr
    return eval(line[-1][len("HEAVY "):])


@pytest.mark.parametrize("argv", [["--help"], ["catalog", "--help"], ["catalog", "list"], ["catalog", "stats"],
                                  ["plugins"], ["plugins", "--json"]])
def test_listing_and_browsing_import_no_heavy_library(argv, tmp_path):
    assert _heavy_modules(argv, tmp_path) == []


def test_the_command_list_says_what_each_command_says_of_itself():
    listed = CliRunner().invoke(cli, ["--help"], terminal_width=300).output
    for name, spec in COMMANDS.items():
        module, attr = spec.split(":")
        own = getattr(importlib.import_module(module), attr).get_short_help_str(limit=300 - 6 - len(max(COMMANDS, key=len)))
        assert f"{name}  " in listed and own in listed, (name, own)
