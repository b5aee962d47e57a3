"""``adapterhub dataset``: caption, tags, undo, stats, bucket, prepare, kohya-json,
from-kohya-json, validate.

Every command's options come from its config dataclass in ``adapterhub.dataset.config`` (declared
once there); each command builds the config, calls one service function and renders the result.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from contextlib import ExitStack
from pathlib import Path

import click

from adapterhub.cli.output import emit, key_values, progress, table
from adapterhub.dataset import config as C
from adapterhub.errors import AdapterhubError


def _click_type(hint, meta):
    if meta.get("choices"):
        return click.Choice(meta["choices"])
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = args[0]
    if typing.get_origin(hint) is tuple:
        hint = typing.get_args(hint)[0]
    if hint is Path:
        return click.Path(path_type=Path)
    return {int: int, float: float, str: str, bool: bool}.get(hint, str)


def _param(f: dataclasses.Field, hint):
    meta = f.metadata
    kind = _click_type(hint, meta)
    if meta.get("argument"):
        nargs = meta.get("nargs", 1)
        return click.argument(f.name, type=kind, nargs=nargs, required=nargs == 1)
    flag = meta.get("flag") or "--" + f.name.replace("_", "-")
    if hint is bool:
        return click.option(flag, f.name, is_flag=True, default=False, help=meta["help"])
    multiple = typing.get_origin(hint) is tuple
    default = None if multiple or f.default is dataclasses.MISSING else f.default
    return click.option(flag, f.name, type=kind, multiple=multiple, default=default,
                        show_default=default is not None, help=meta["help"])


def config_options(config_cls):
    """Add one click parameter per field of ``config_cls`` (in declaration order) and ``--json``."""
    hints = typing.get_type_hints(config_cls)

    def decorate(fn):
        fn = click.option("--json", "as_json", is_flag=True, help="print JSON")(fn)
        for f in reversed(dataclasses.fields(config_cls)):
            fn = _param(f, hints[f.name])(fn)
        return fn
    return decorate


def build(config_cls, kwargs: dict):
    names = {f.name for f in dataclasses.fields(config_cls)}
    return config_cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items() if k in names})


class _Bar:
    """Opens a progress bar on the first report, when the total is known."""

    def __init__(self, stack: ExitStack, description: str, quiet: bool):
        self.stack, self.description, self.quiet, self.advance = stack, description, quiet, None

    def __call__(self, n: int, total: int | None = None) -> None:
        if self.quiet:
            return
        if self.advance is None:
            self.advance = self.stack.enter_context(progress(self.description, total))
        self.advance(n)


@click.group()
def dataset():
    """Prepare training datasets: captions, tags, buckets, validation."""


# ------------------------------------------------------------------------------------------------
@dataset.command("caption")
@config_options(C.CaptionConfig)
def caption_cmd(as_json, **kwargs):
    """Caption every image in DIR with a captioner plugin (batched, resumable)."""
    from adapterhub.dataset.captioning import run_captioning

    cfg = build(C.CaptionConfig, kwargs)
    with ExitStack() as stack:
        report = run_captioning(cfg, on_progress=_Bar(stack, f"captioning ({cfg.captioner})", as_json))
    emit(report, as_json, _render_caption)
    if not report["captioned"] and not report["failed"] and not report["resumed"] and report["skipped"]:
        # every image kept its caption (the default --mode skip): say why nothing happened
        click.echo(f"nothing to do in {cfg.dir}: {report['skipped']} already captioned; use --mode overwrite "
                   "(or append) to caption them again", err=True)


def _render_caption(r: dict) -> None:
    key_values({k: r[k] for k in ("captioned", "skipped", "resumed", "device", "shard",
                                  "images_per_s", "loop_images_per_s", "model_idle_share")},
               title="captioning")
    if r["failed"]:
        table(r["failed"], ["file", "problem"], title="not captioned")


# ------------------------------------------------------------------------------------------------
@dataset.command("tags")
@config_options(C.TagEditConfig)
@click.option("--show", default=20, show_default=True, help="changes shown in the preview")
def tags_cmd(as_json, show, **kwargs):
    """Batch-edit tags: add, remove, replace OLD NEW, move-front, dedupe, sort, trigger [WORD]."""
    from adapterhub.dataset.tags import edit_tags

    cfg = build(C.TagEditConfig, kwargs)
    changes, written = edit_tags(cfg)
    data = {"action": cfg.action, "changes": [c.row() for c in changes], "written": written,
            "dry_run": cfg.dry_run}
    emit(data, as_json, lambda d: _render_tags(d, show))


def _render_tags(d: dict, show: int) -> None:
    rows = d["changes"]
    if rows:
        table(rows[:show], ["file", "before", "after"],
              title=f"tags {d['action']}: {len(rows)} caption(s) change" +
              (f" (first {show} shown)" if len(rows) > show else ""))
    verb = "would change" if d["dry_run"] else "changed"
    note = "" if d["dry_run"] or not d["written"] else "; undo with `adapterhub dataset undo DIR`"
    click.echo(f"{verb} {len(rows)} caption(s){note}")


# ------------------------------------------------------------------------------------------------
@dataset.command("undo")
@config_options(C.UndoConfig)
def undo_cmd(as_json, **kwargs):
    """Undo the latest recorded change to DIR (tag edits, captioning, fixes)."""
    from adapterhub.dataset.journal import operations, undo_last

    cfg = build(C.UndoConfig, kwargs)
    if cfg.list_only:
        rows = [op.summary() for op in operations(cfg.dir)]
        return emit(rows, as_json, lambda r: table(r, ["id", "time", "op", "files"], title="journal"))
    emit(undo_last(cfg.dir, cfg.force), as_json)


# ------------------------------------------------------------------------------------------------
@dataset.command("stats")
@config_options(C.StatsConfig)
def stats_cmd(as_json, **kwargs):
    """Tag frequencies as a table and a bar chart PNG."""
    from adapterhub.dataset.stats import tag_stats

    emit(tag_stats(build(C.StatsConfig, kwargs)), as_json, _render_stats)


def _render_stats(s: dict) -> None:
    key_values({k: s[k] for k in ("images", "captioned", "uncaptioned", "non_utf8", "distinct_tags",
                                  "mean_tags")}, title="dataset")
    table(s["folders"], ["folder", "repeats", "class_tokens"])
    table(s["top"], ["tag", "images", "share"], title="tag frequency")
    if s.get("chart"):
        click.echo(f"chart: {s['chart']}")


# ------------------------------------------------------------------------------------------------
@dataset.command("bucket")
@config_options(C.BucketConfig)
def bucket_cmd(as_json, **kwargs):
    """Aspect-ratio buckets as kohya computes them."""
    from adapterhub.dataset.buckets import bucket_report

    emit(bucket_report(build(C.BucketConfig, kwargs)), as_json, _render_buckets)


def _render_buckets(r: dict) -> None:
    table(r["buckets"], ["resolution", "aspect", "images", "with_repeats", "upscaled"], title="buckets")
    click.echo(f"mean aspect-ratio error: {r['mean_ar_error']:.4f}")
    for w in r["warnings"]:
        click.echo(f"warning: {w}")
    if r["unreadable"]:
        table(r["unreadable"], ["file", "problem"], title="not bucketed")


# ------------------------------------------------------------------------------------------------
@dataset.command("prepare")
@config_options(C.PrepareConfig)
def prepare_cmd(as_json, **kwargs):
    """Write resized and centre-cropped images with their captions to --out (the buckets of
    `dataset bucket` and `train` for the same flags; all or nothing)."""
    from adapterhub.dataset.prepare import prepare

    cfg = build(C.PrepareConfig, kwargs)
    with ExitStack() as stack:
        result = prepare(cfg, on_progress=_Bar(stack, "preparing", as_json))
    emit(result, as_json, _render_prepare)


def _render_prepare(r: dict) -> None:
    click.echo(f"wrote {r['written']} image(s) to {r['out']} in buckets {', '.join(r['buckets'])}")
    if r["skipped"]:
        table(r["skipped"], ["file", "problem"], title="skipped")


# ------------------------------------------------------------------------------------------------
@dataset.command("kohya-json")
@config_options(C.KohyaJsonConfig)
def kohya_json_cmd(as_json, **kwargs):
    """Write kohya's fine-tuning metadata JSON (tags from .txt, captions from .caption) to OUT."""
    from adapterhub.dataset.kohya_json import export_metadata

    emit(export_metadata(build(C.KohyaJsonConfig, kwargs)), as_json,
         lambda r: key_values(r, title="kohya metadata"))


@dataset.command("from-kohya-json")
@config_options(C.KohyaImportConfig)
def from_kohya_json_cmd(as_json, **kwargs):
    """Write the tags and captions of a kohya metadata JSON to sidecar files (undo-able)."""
    from adapterhub.dataset.kohya_json import import_metadata

    emit(import_metadata(build(C.KohyaImportConfig, kwargs)), as_json,
         lambda r: key_values({**r, "not_found": ", ".join(r["not_found"]) or "-"}, title="sidecars"))


# ------------------------------------------------------------------------------------------------
class ProblemsFound(AdapterhubError):
    """validate found problems: the report is printed, then exit code 1."""

    exit_code = 1


@dataset.command("validate")
@config_options(C.ValidateConfig)
def validate_cmd(as_json, **kwargs):
    """Check images and captions; exit code 1 when a problem remains. --fix applies safe fixes."""
    from adapterhub.dataset.validate import validate

    with ExitStack() as stack:
        result = validate(build(C.ValidateConfig, kwargs), on_progress=_Bar(stack, "checking", as_json))
    emit(result, as_json, _render_validate)
    if not result["ok"]:
        raise ProblemsFound(f"{result['errors']} error(s) and {result['warnings']} warning(s) remain")


def _render_validate(r: dict) -> None:
    if r["findings"]:
        table(r["findings"], ["file", "severity", "check", "message", "fixed"], title="findings")
    status = "ok" if r["ok"] else f"{r['errors']} error(s), {r['warnings']} warning(s)"
    click.echo(f"{r['images']} image(s): {status}" + (f"; fixed {r['fixed']}" if r["fixed"] else ""))


__all__ = ["dataset", "config_options"]
