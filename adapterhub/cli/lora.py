"""``adapterhub lora combine | resize | extract``: LoRA algebra with kohya sd-scripts semantics."""
from __future__ import annotations

from contextlib import ExitStack

import click

from adapterhub.cli import output
from adapterhub.names import resolve_adapter, split_weight

COLUMNS = ["module", "rank", "fro %", "energy %", "error"]
# module paths shortened for the table only (--json has them whole)
SHORT = ((".text_model.encoder.layers.", ".layers."), ("text_encoder_2.", "te2."), ("text_encoder.", "te."),
         ("transformer_blocks.", "tb."), ("attentions.", "attn."), ("down_blocks.", "down."),
         ("up_blocks.", "up."), ("mid_block.", "mid."))
SVD_HELP = "Rank of the output (per module; default for svd methods: the largest source rank)."
BASE_HELP = "A model to read target shapes from (only LoHa/LoKr inputs of an undetected base need it)."
CLAMP_HELP = ("Clamp the factors at this quantile of their values, as kohya does with 0.99. "
              "Off by default: the SVD result then is the optimal rank-R approximation.")


class _Bar:
    """A progress bar opened on the first report, when the service knows the total."""

    def __init__(self, description: str, stack: ExitStack):
        self.description, self.stack, self.advance = description, stack, None

    def __call__(self, done: int, total: int) -> None:
        if self.advance is None:
            self.advance = self.stack.enter_context(output.progress(self.description, total))
        self.advance()


def _short(module: str) -> str:
    for old, new in SHORT:
        module = module.replace(old, new)
    return module


def _old_label(ranks: list) -> str:
    """``4``, ``4+8`` (combined sources), ``?`` (a source without a rank), ``full`` (extracted)."""
    return "+".join("?" if r is None else str(r) for r in ranks) or "full"


WORST = 5  # modules listed without --verbose: those that kept the least


def _rows(records: list[dict]) -> list[dict]:
    return [{"module": _short(r["module"]), "rank": f"{_old_label(r['old_ranks'])}->{r['new_rank']}",
             "fro %": r["fro_retained_pct"], "energy %": r["energy_retained_pct"], "error": r["error"]}
            for r in records]


def _render(data: dict, verbose: bool = False) -> None:
    """The per-module table (all modules with --verbose, else the few that kept the least), then the summary,
    last, so that it stays on screen."""
    records = data["per_module"]
    if verbose:
        output.table(_rows(records), COLUMNS, title="per module")
    elif len(records) > WORST:
        worst = sorted(records, key=lambda r: (r["fro_retained_pct"], -r["error"]))[:WORST]
        output.table(_rows(worst), COLUMNS, title=f"the {WORST} of {len(records)} modules that kept the least "
                                                  "(--verbose lists all)")
    elif records:
        output.table(_rows(records), COLUMNS, title="per module")
    fro = [r["fro_retained_pct"] for r in records]
    summary = {"out": data["out"], "method": data["method"], "type": data["type"], "base": data["base"],
               "modules": data["modules"], "ranks": ", ".join(map(str, data["ranks"])),
               "fro retained %": (f"mean {data['mean_fro_retained_pct']}, min {min(fro)}" if fro else None),
               "seconds": data["seconds"]}
    output.key_values({k: v for k, v in summary.items() if v is not None}, title="result")
    for note in data["notes"]:
        click.echo(note, err=True)


def _run(description: str, as_json: bool, call, verbose: bool = False):
    with ExitStack() as stack:
        result = call(_Bar(description, stack))
    output.emit(result.as_dict(), as_json, lambda data: _render(data, verbose))


def _common(f):
    for decorator in reversed([
        click.option("--out", required=True, type=click.Path(dir_okay=False),
                     help="The .safetensors file to write (kohya layout)."),
        click.option("--clamp-quantile", type=float, default=None, help=CLAMP_HELP),
        click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default=None,
                     help="Precision of the output (default fp32)."),
        click.option("--device", default="cpu", show_default=True, help="Where the SVDs run (cpu, cuda)."),
        click.option("--json", "as_json", is_flag=True, help="Print a JSON summary with per-module results."),
        click.option("--verbose", "-v", is_flag=True,
                     help="List every module (by default: the summary and the modules that kept the least)."),
    ]):
        f = decorator(f)
    return f


@click.group("lora")
def lora():
    """Combine, resize and extract LoRAs (kohya sd-scripts semantics; any weight-space input)."""


@lora.command("combine")
@click.argument("adapters", nargs=-1, required=True)
@click.option("--method", default="concat", show_default=True,
              help="concat (exact sum, ranks add up), svd (re-factorise the exact sum to --rank), "
                   "ties, dare, dare_ties, magnitude_prune (PEFT merges on the deltas, then SVD: approximations).")
@click.option("--rank", type=int, default=None, help=SVD_HELP)
@click.option("--conv-rank", type=int, default=None, help="Rank of 3x3 conv modules (default: --rank).")
@click.option("--density", type=float, default=None, help="ties/dare: the fraction of values kept.")
@click.option("--majority-sign", default="total", show_default=True,
              help="ties/dare_ties sign election: total or frequency.")
@click.option("--seed", type=int, default=0, show_default=True, help="dare/dare_ties: seed of the random masks.")
@click.option("--base", default=None, help=BASE_HELP)
@_common
def combine_cmd(adapters, method, rank, conv_rank, density, majority_sign, seed, base, out, clamp_quantile, dtype,
                device, as_json, verbose):
    """Combine FILE[:WEIGHT] ... into one LoRA written to --out."""
    from adapterhub.algebra import combine_files

    specs = []
    for spec in adapters:
        name, weight = split_weight(spec)
        specs.append((resolve_adapter(name), weight))
    _run("combining", as_json, lambda bar: combine_files(
        specs, out, dtype=dtype, base=base, method=method, rank=rank, conv_rank=conv_rank, density=density,
        majority_sign=majority_sign, seed=seed, clamp_quantile=clamp_quantile, device=device, progress=bar), verbose)


@lora.command("resize")
@click.argument("adapter")
@click.option("--rank", type=int, default=None, help="New rank; with --dynamic, the largest rank allowed.")
@click.option("--conv-rank", type=int, default=None, help="New rank of 3x3 conv modules (default: --rank).")
@click.option("--dynamic", default=None,
              help="sv_ratio:X, sv_fro:X or sv_cumulative:X (kohya --dynamic_method/param).")
@click.option("--base", default=None, help=BASE_HELP)
@_common
def resize_cmd(adapter, rank, conv_rank, dynamic, base, out, clamp_quantile, dtype, device, as_json, verbose):
    """Re-factorise a LoRA (or any weight-space adapter) to a lower rank; report what each module keeps."""
    from adapterhub.algebra import parse_dynamic, resize_file

    path, plan = resolve_adapter(adapter), parse_dynamic(dynamic)
    _run("resizing", as_json, lambda bar: resize_file(
        path, out, dtype=dtype, base=base, rank=rank, conv_rank=conv_rank, dynamic=plan,
        clamp_quantile=clamp_quantile, device=device, progress=bar), verbose)


@lora.command("extract")
@click.option("--base", required=True, help="The original model: tiny-sd1, a diffusers folder, a checkpoint file...")
@click.option("--tuned", required=True, help="The fine-tuned model (same architecture).")
@click.option("--rank", type=int, required=True, help="Rank of the LoRA.")
@click.option("--conv-rank", type=int, default=None, help="Also extract 3x3 convs (a LoCon) at this rank.")
@click.option("--min-diff", type=float, default=0.01, show_default=True,
              help="Text encoders are extracted only when a weight differs by more than this (kohya).")
@_common
def extract_cmd(base, tuned, rank, conv_rank, min_diff, out, clamp_quantile, dtype, device, as_json, verbose):
    """A LoRA from the difference of two checkpoints (SVD of W_tuned - W_base per module)."""
    from adapterhub.algebra import extract_files

    output.quiet_model_loading()
    _run("extracting", as_json, lambda bar: extract_files(
        base, tuned, out, rank, dtype=dtype, conv_rank=conv_rank, min_diff=min_diff,
        clamp_quantile=clamp_quantile, device=device, progress=bar), verbose)
