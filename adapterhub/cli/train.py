"""``adapterhub train``: one command for every trainable adapter type.

Every option comes from :class:`adapterhub.train.config.TrainConfig` (the general ones) or from a registered
type's ``train_options`` (its own, taken only with that ``--type``); each flag is also a key of the ``--config``
TOML file (``--max-steps`` is ``max_steps``), and flags given on the command line override the file.
``--print-config`` writes the resolved configuration as TOML and trains nothing.
"""
from __future__ import annotations

import inspect
import typing
from contextlib import ExitStack
from pathlib import Path

import click

from adapterhub.cli.output import emit, key_values, table


def _click_type(spec):
    from adapterhub.train.config import _base_type

    if spec.choices:
        return click.Choice([str(c) for c in spec.choices])
    hint = _base_type(spec.type)
    if typing.get_origin(hint) is tuple:
        return str  # a comma-separated list, parsed by the config
    if hint is Path:
        return click.Path(path_type=Path)
    return {int: int, float: float, str: str}.get(hint, str)


def _inverted(_ctx, _param, value):
    """The positive flag of a ``no_*`` option (``--upscale``) sets it False; unset stays None."""
    return None if value is None else not value


def _specs() -> list:
    """(option, help) for every flag: the general options, then each registered type's own (its help saying
    which ``--type`` takes it)."""
    from adapterhub.train.config import declared_options, general_options, help_of

    specs = [(spec, help_of(spec)) for spec in general_options().values() if spec.name != "datasets"]
    return specs + [(spec, f"{spec.help} (--type {' or '.join(owners)})")
                    for spec, owners in declared_options().values()]


def _option(spec, help: str):
    """The click option of one training option; it defaults to None, so only what was typed overrides."""
    from adapterhub.train.config import _base_type

    flag = "--" + spec.name.replace("_", "-")
    shown = f" [default: {spec.default}]" if spec.default not in (None, ()) else ""
    hint = _base_type(spec.type)
    if typing.get_origin(hint) is tuple and typing.get_args(hint)[0] is str:
        return click.option(flag, spec.name, multiple=True, default=None, help=help + shown + " (repeatable)")
    if hint is bool and spec.name.startswith("no_"):  # no_upscale: --upscale/--no-upscale, not --no-no-upscale
        on = "--" + flag[len("--no-"):]
        return click.option(f"{on}/{flag}", spec.name, default=None, callback=_inverted,
                            help=f"{help} [default: {flag if spec.default else on}]")
    if hint is bool:
        return click.option(f"{flag}/--no-{flag[2:]}", spec.name, default=None, help=help + shown)
    return click.option(flag, spec.name, type=_click_type(spec), default=None, help=help + shown)


def config_options(fn):
    """One click option per training option: the general ones and every registered type's declared ones."""
    for spec, help in reversed(_specs()):
        fn = _option(spec, help)(fn)
    return fn


class _Progress:
    """Renders training events: a progress bar over steps with the running loss, and a few lines."""

    def __init__(self, stack: ExitStack, quiet: bool):
        self.stack, self.quiet, self.bar, self.task, self.cache_task = stack, quiet, None, None, None

    def _progress(self):
        """A rich bar on a terminal; rate-limited plain lines (step, loss) in logs, CI and ``nohup``."""
        if self.bar is None:
            from adapterhub.cli.output import tasks

            self.bar = self.stack.enter_context(tasks())
        return self.bar

    def __call__(self, kind: str, **data) -> None:
        if kind == "skipped":  # a warning: shown with --json too (stderr)
            click.echo(f"skipped {data['file']}: {data['problem']}", err=True)
        if self.quiet:
            return
        if kind == "cache":
            bar = self._progress()
            if self.cache_task is None:
                self.cache_task = bar.add_task("caching latents", total=data["total"], info="")
            bar.advance(self.cache_task, data["n"])
        elif kind == "start":
            bar = self._progress()
            trained = ", ".join(f"{k} {v:,}" for k, v in data["trainable"].items())
            bar.console.print(f"training {data['images']} images ({data['with_repeats']} with repeats, "
                              f"{data['validation']} held out) for {data['steps']} steps on {data['device']}; "
                              f"trainable parameters: {trained}; text conditioning "
                              f"{'cached' if data['text_cached'] else 'computed each step'}; seed {data['seed']}")
            self.task = bar.add_task("training", total=data["steps"], info="")
        elif kind == "resumed":
            self._progress().console.print(f"resumed at step {data['step']} from {data['state']}")
            if self.task is not None:
                self.bar.update(self.task, completed=data["step"])
        elif kind == "step" and self.task is not None:
            import time

            if getattr(self, "clock", None) is None:
                self.clock = (time.perf_counter(), data["step"] - 1)
            began, first = self.clock
            rate = (data["step"] - first) / max(time.perf_counter() - began, 1e-9)
            info = f"loss {data['loss']:.4f}  lr {data['lr']:.3g}  {rate:.2f} it/s"
            if data.get("val_loss") is not None:
                info += f"  val {data['val_loss']:.4f}"
            self.bar.update(self.task, completed=data["step"], info=info)
        elif kind == "checkpoint":
            self._progress().console.print(f"checkpoint step {data['step']}: {data['adapter']}")
        elif kind == "class_images_generated":
            bar = self._progress()
            if getattr(self, "class_task", None) is None:
                self.class_task = bar.add_task("class images", total=data["total"], info="")
            bar.update(self.class_task, completed=data["n"])
        elif kind == "class_images":
            self._progress().console.print(f"prior preservation: {data['count']} class images from {data['folder']}")
        elif kind == "samples":
            self._progress().console.print(f"samples step {data['step']}: {', '.join(data['files'])}")


TYPES = "{types}"  # where the description names the types that train


class _TrainCommand(click.Command):
    """``train``: its description names the types that train as registered when the help is written (a plugin's
    type too), where the docstring holds :data:`TYPES`."""

    def format_help_text(self, ctx, formatter) -> None:
        from adapterhub.plugins import adapter_types

        names = sorted(name for name, t in adapter_types().items() if "train" in t.capabilities)
        formatter.write_paragraph()
        with formatter.indentation():
            formatter.write_text(inspect.cleandoc(self.help or "").replace(TYPES, ", ".join(names)))


@click.command("train", cls=_TrainCommand)
@click.option("--config", "config_file", type=click.Path(path_type=Path, dir_okay=False),
              help="TOML file of options (the flags' names); flags override it")
@click.option("--print-config", is_flag=True,
              help="print the resolved configuration as TOML and exit. Its keys are the flags' names with "
                   "underscores (--max-steps is max_steps; --no-upscale is no_upscale = true), under [section] "
                   "headers that --config reads with or without")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
@config_options
def train_cmd(config_file, print_config, as_json, **options):
    """Train an adapter, or the whole UNet, on a dataset folder.

    Types that train (--type): {types}. A full fine-tune (full) trains the whole UNet.

    \b
    adapterhub train --type lora --base tiny-sd1 --dataset datasets/demo --out demo.safetensors \\
        --resolution 64 --bucket-step 32 --max-steps 100
    adapterhub train --config run.toml --lr 5e-5
    adapterhub train --resume demo-step000050-state

    A type's own options (its help names the --type that takes them) are refused with another --type; a
    --config file may hold the sections of several types, and only the chosen type's apply.

    The output folder is checked before the first step. If a save fails later (a full disk), the run's
    state goes to $ADAPTERHUB_CACHE/rescued (else the temp folder) and the error says how to resume.
    """
    from adapterhub.train.config import resolve, to_toml

    cfg = resolve(config_file, options, check=not print_config)
    if print_config:
        click.echo(to_toml(cfg), nl=False)
        return
    from adapterhub.cli.output import quiet_model_loading
    from adapterhub.train import train

    quiet_model_loading()
    with ExitStack() as stack:
        result = train(cfg, on_event=_Progress(stack, as_json))
    emit(result, as_json, _render)


def _render(result: dict) -> None:
    shown = {k: result[k] for k in ("out", "type", "base", "steps", "epochs", "images", "first_loss", "last_loss",
                                    "validation_loss", "seed", "seconds") if result.get(k) is not None}
    shown["checkpoints"] = len(result["checkpoints"])
    shown["logs"] = ", ".join(result["logs"])
    key_values(shown, title="trained")
    if result["skipped"]:
        table(result["skipped"], ["file", "problem"], title="skipped images")
