"""``adapterhub sample`` (generate images, A1111 conventions) and ``adapterhub png-info`` (read them back).

The command parses options and prints; the run itself (``--from-png``, prompt files, X/Y/Z plots, the files
written) is :mod:`adapterhub.sample.jobs`.
"""
from __future__ import annotations

from contextlib import contextmanager

import click

from adapterhub.cli import output


def _say_if_noise(base: str) -> None:
    """Where images are listed: a tiny base or preset (built from a seed, never trained) draws noise, and a new
    user's first images are theirs, so say why before they look (once the images exist: errors stay one line)."""
    from adapterhub.base import PRESETS, TINY_BASES
    from adapterhub.transformer_bases import TRANSFORMER_PRESETS

    if str(base) in TINY_BASES or str(base) in PRESETS or str(base) in TRANSFORMER_PRESETS:
        click.echo(f"note: {base} has random weights (a tiny base for trying things out): its images are noise; "
                   "give --base a real model (a .safetensors checkpoint or a diffusers folder) for pictures", err=True)


def _quiet_transformers() -> None:
    """transformers' weight-loading bars (the environment switch only works before it is imported)."""
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


@contextmanager
def _bar(enabled: bool, description: str, total: int):
    if not enabled:
        yield lambda n=1: None
        return
    with output.progress(description, total=total) as advance:
        yield advance


def _table(summary: dict, many: bool):
    """The human view: every file written, and how long it took."""
    from adapterhub.sample.writing import files

    if not many:
        images = summary["images"]
        shown = images + ([{"path": summary["grid"], "seed": "grid"}] if summary.get("grid") else [])
        return output.table(shown, ["path", "seed"], title=f"{len(images)} image(s) in {summary['seconds']} s")
    rows = files(summary["jobs"] if "jobs" in summary else [summary])
    return output.table(rows, ["path", "seed", "cell"], title=f"{len(rows)} file(s) in {summary['seconds']} s")


@click.command("sample")
@click.option("--base", required=True,
              help="tiny-sd1, tiny-sdxl, tiny-flux, tiny-sd3, a diffusers folder, a .safetensors checkpoint or a "
                   "hub id.")
@click.option("--prompt", default=None, help="The prompt, A1111 syntax: (word:1.2), [word], BREAK, <lora:name:0.8>.")
@click.option("--negative", default="", help="The negative prompt.")
@click.option("--stack", "stacks", multiple=True,
              help="Adapters: NAME[:W[:UNET]][:te=W][:unet=W][:lbw=...], comma-separated.")
@click.option("--control", "controls", multiple=True,
              help="IMAGE:MODEL:WEIGHT[:START:END]: a ControlNet with its conditioning image and guidance window.")
@click.option("--adapter", "t2i_adapters", multiple=True,
              help="IMAGE:T2I:WEIGHT: a T2I-Adapter with its conditioning image.")
@click.option("--adapter-dir", "adapter_dirs", multiple=True, type=click.Path(file_okay=False),
              help="Where <lora:name> tags and stack names are looked up by file stem (then the catalog).")
@click.option("--steps", default=20, show_default=True, type=int, help="Sampling steps.")
@click.option("--sampler", default="DPM++ 2M", show_default=True,
              help="A webui sampler name (Euler a, DPM++ 2M, DDIM ...; Flux and SD3: Euler by default, or one of "
                   "the k-diffusion samplers Forge offers them).")
@click.option("--schedule", default="Automatic", show_default=True,
              help="Automatic, Uniform, Karras, Exponential, SGM Uniform, Beta, Polyexponential, KL Optimal, "
                   "Align Your Steps, Simple, Normal or DDIM (the webui's schedule types).")
@click.option("--cfg", default=7.0, show_default=True, type=float,
              help="CFG scale (Flux: default 1, real CFG with the negative prompt only above 1).")
@click.option("--distilled-cfg", "distilled_cfg", default=None, type=float,
              help="Flux-dev's distilled guidance, Forge's Distilled CFG Scale (default 3.5; not for SD3 or schnell).")
@click.option("--seed", default=-1, show_default=True, type=int, help="-1: random. Image n gets seed + n.")
@click.option("--size", default=None, help="WIDTHxHEIGHT, multiples of 8 (default: the base's native size).")
@click.option("--batch", default=1, show_default=True, type=int, help="Images per UNet batch.")
@click.option("--images", default=None, type=int, help="Images in all (default: one batch).")
@click.option("--clip-skip", default=1, show_default=True, type=int, help="1 = last layer (webui convention).")
@click.option("--emphasis", default="Original", show_default=True,
              type=click.Choice(["Original", "No norm", "Ignore", "None"]),
              help="The webui's emphasis mode: Original (weights, then each chunk re-normalised to its mean), No norm "
                   "(weights, no re-normalisation), Ignore (syntax parsed, weights 1), None (no syntax).")
@click.option("--init-image", "init_image", default=None, metavar="FILE",
              help="img2img: start from this image (resized to --size; default size: the image's own).")
@click.option("--control-image", "control_image", default=None, metavar="FILE",
              help="A FLUX.1 control model's control image (canny edges, a depth map), for a base a Flux control "
                   "LoRA was merged into; resized to --size.")
@click.option("--denoise", default=None, type=float,
              help="img2img denoising strength, in (0, 1] (default 0.75; 1 on a FLUX.1 Fill base).")
@click.option("--mask", default=None, metavar="FILE",
              help="Inpainting (with --init-image): repaint where this image is white (a transparent image: where "
                   "it is opaque); resized to the init image's size. A FLUX.1 Fill base (tiny-flux-fill, BFL's "
                   "FLUX.1 Fill dev) needs both and inpaints with its own pipeline.")
@click.option("--mask-blur", default=4, show_default=True, type=int, help="Gaussian blur of the mask, in pixels.")
@click.option("--inpainting-fill", default="original", show_default=True,
              type=click.Choice(["fill", "original", "latent-noise", "latent-nothing", "0", "1", "2", "3"]),
              help="What the masked area starts from (the webui's Masked content, 0-3).")
@click.option("--inpaint-full-res", is_flag=True,
              help="Only masked: sample the masked region (and --inpaint-padding) at --size, paste it back.")
@click.option("--inpaint-padding", default=32, show_default=True, type=int,
              help="With --inpaint-full-res: pixels around the masked region.")
@click.option("--invert-mask", is_flag=True, help="Repaint where the mask is black.")
@click.option("--noise-multiplier", default=1.0, show_default=True, type=float,
              help="img2img: the init image's noise times this (the webui's initial noise multiplier).")
@click.option("--hires", default=None, type=float, metavar="SCALE",
              help="Hires fix: the first pass at --size, then upscaled by SCALE and denoised again.")
@click.option("--hires-steps", default=0, show_default=True, type=int, help="Steps of the hires pass (0: --steps).")
@click.option("--hires-denoise", default=0.7, show_default=True, type=float,
              help="Denoising strength of the hires pass, in (0, 1].")
@click.option("--hires-upscaler", default="Latent", show_default=True,
              help="Latent, Latent (antialiased), Latent (bicubic), Latent (bicubic antialiased), Latent (nearest), "
                   "Latent (nearest-exact), None, Lanczos or Nearest.")
@click.option("--backend", default="eager", show_default=True, help="A registered sampler backend: eager, compiled ...")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default=None,
              help="Default: fp16 on CUDA, fp32 on CPU.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available).")
@click.option("--from-png", "from_png", type=click.Path(exists=True, dir_okay=False),
              help="Take prompt, negative, steps, sampler, schedule, CFG, seed, size, clip skip, hires, RNG and ENSD "
                   "from an image's webui infotext (PNG, JPEG or WebP), as the webui re-runs it: missing LoRAs and "
                   "embeddings are warned about and left out; options given on the command line override.")
@click.option("--rng", default=None, metavar="cpu|gpu|nv",
              help="Noise source, as the webui's RNG setting: cpu (default; the same on any machine), gpu (CUDA's "
                   "generator), nv (CUDA's numbers emulated on any device). --from-png takes the image's.")
@click.option("--ensd", default=0, show_default=True, type=int,
              help="The webui's eta noise seed delta: ancestral/SDE samplers' later noise from seed + ENSD.")
@click.option("--format", "format", default="png", show_default=True, metavar="png|jpg|webp",
              help="Image format; the infotext goes where the webui puts it (PNG text, JPEG/WebP EXIF UserComment).")
@click.option("--grid", is_flag=True, help="Also write a contact sheet of the images.")
@click.option("--prompts", "prompts_file", type=click.Path(exists=True, dir_okay=False),
              help="A file of prompts, one a line (# comments; a line may carry webui-style options such as "
                   "--prompt ... --seed 5 --steps 20). Split across processes under accelerate launch.")
@click.option("--x", "x_axis", default=None, metavar="AXIS=VALUES",
              help="X/Y/Z plot axis: weight, weight:NAME, adapter, steps, cfg, seed, sampler, prompt-sr, schedule, "
                   "clip-skip; values as in the webui (a,b,\"c, d\"; 1-5; 1-9 (+2); 1-10 [4]).")
@click.option("--y", "y_axis", default=None, metavar="AXIS=VALUES", help="Second plot axis (rows).")
@click.option("--z", "z_axis", default=None, metavar="AXIS=VALUES", help="Third plot axis (one grid per value).")
@click.option("--no-cells", is_flag=True, help="With --x: write only the grid, not each cell's image.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Output folder (created).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
@click.pass_context
def sample_cmd(ctx, **options):
    """Generate images; every image carries the webui's `parameters` text (PNG text, JPEG/WebP EXIF)."""
    from adapterhub.sample.jobs import SampleOptions, SampleRun, plan_run

    as_json = options.pop("as_json")
    given = {name for name in options if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}
    plan = plan_run(SampleOptions(**options, given=frozenset(given)))  # bad input fails here: nothing loaded
    for note in plan.notes:
        click.echo(note if note.startswith("note: ") else f"warning: {note}", err=True)
    output.quiet_model_loading()
    _quiet_transformers()
    run = SampleRun(plan)
    try:
        run.load()
        with _bar(not as_json, run.label, run.total) as advance:
            summary, warnings = run.generate(advance)
    finally:
        run.close()
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    _say_if_noise(plan.options.base)
    output.emit(summary, as_json, lambda data: _table(data, plan.many))


@click.command("png-info")
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="The parsed fields as JSON (the webui's parser).")
def png_info_cmd(image, as_json):
    """Print an image's generation metadata: the webui's infotext (PNG text or JPEG/WebP EXIF UserComment), or
    what ComfyUI, InvokeAI, NovelAI, Fooocus or SwarmUI recorded, under ``Generator: NAME``."""
    from adapterhub.sample import imagemeta, infotext

    meta = imagemeta.read(image)
    if not meta.is_webui:
        if as_json:
            output.emit_json({"Generator": meta.generator, "parameters": None, **meta.fields})
        else:
            click.echo(imagemeta.summary(meta))
        return
    text = meta.text
    if not as_json:
        click.echo(text)
        return
    fields = infotext.parse(text, defaults=False)
    for key in ("Lora hashes", "TI hashes"):
        if key in fields:
            fields[key] = infotext.parse_hashes(fields[key])
    fields.update(infotext.control_units_of(fields))  # "ControlNet N" units as the extension reads them
    output.emit_json({"parameters": text, **fields})
