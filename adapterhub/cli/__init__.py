"""The ``adapterhub`` command: a thin click group; each command lives in its own module.

Commands are imported lazily (``COMMANDS`` maps a name to ``module:attribute``) so that
``adapterhub --help`` stays fast and one command's imports never slow another's start.
"""
from __future__ import annotations

import importlib
import sys

import click

from adapterhub.errors import AdapterhubError

COMMANDS = {
    "demo": "adapterhub.cli.demo:demo",
    "inspect": "adapterhub.cli.inspect:inspect_cmd",
    "merge": "adapterhub.cli.merge:merge_cmd",
    "plugins": "adapterhub.cli.plugins:plugins_cmd",
    "catalog": "adapterhub.cli.catalog:catalog",
    "dataset": "adapterhub.cli.dataset:dataset",
    "lora": "adapterhub.cli.lora:lora",
    "train": "adapterhub.cli.train:train_cmd",
    "sample": "adapterhub.cli.sample:sample_cmd",
    "png-info": "adapterhub.cli.sample:png_info_cmd",
    "bench": "adapterhub.cli.bench:bench",
    "convert": "adapterhub.cli.convert:convert_cmd",
    "doctor": "adapterhub.cli.doctor:doctor_cmd",
    "serve": "adapterhub.cli.serve:serve_cmd",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(n for n in COMMANDS if self._available(n))

    @staticmethod
    def _available(name: str) -> bool:
        module = COMMANDS[name].split(":")[0]
        return importlib.util.find_spec(module) is not None

    def format_commands(self, ctx, formatter):
        """The command list of ``--help``, from each command's docstring read as source (``ast``), so that
        listing never imports a command's module (and with it torch)."""
        limit = formatter.width - 6 - max(len(n) for n in COMMANDS)
        rows = [(name, _short_help(name, limit)) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def get_command(self, ctx, name):
        if name not in COMMANDS or not self._available(name):
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)


def _short_help(name: str, limit: int = 45) -> str:
    """The first paragraph of the command function's docstring, shortened as click shortens it; the
    command itself is imported only when its source does not hold a plain docstring."""
    import ast

    from click.utils import make_default_short_help

    module, attr = COMMANDS[name].split(":")
    spec = importlib.util.find_spec(module)
    try:
        tree = ast.parse(open(spec.origin, encoding="utf-8").read())
        doc = next(ast.get_docstring(node) for node in tree.body
                   if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == attr)
    except (OSError, SyntaxError, StopIteration, TypeError):
        doc = None
    if not doc:
        return LazyGroup().get_command(None, name).get_short_help_str(limit)
    return make_default_short_help(doc.split("\n\n")[0], limit)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="adapterhub")
def cli():
    """Inspect, merge, stack, train and sample Stable Diffusion adapters."""


def _quiet_libraries() -> None:
    """The CLI reports its own progress: silence the libraries' loading bars and warnings."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def main(argv=None) -> int:
    """Console entry point: known errors become one line on stderr and exit code 2."""
    _quiet_libraries()
    try:
        rc = cli.main(args=argv, prog_name="adapterhub", standalone_mode=False)
    except AdapterhubError as exc:
        click.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
