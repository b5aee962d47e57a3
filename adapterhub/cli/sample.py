"""``adapterhub sample`` (generate images, A1111 conventions) and ``adapterhub png-info`` (read them back)."""
from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

import click

from adapterhub.cli import output
from adapterhub.errors import AdapterhubError

# --from-png: infotext key -> (option name, converter)
FROM_PNG = {"Prompt": ("prompt", str), "Negative prompt": ("negative", str), "Steps": ("steps", int),
            "Sampler": ("sampler", str), "Schedule type": ("schedule", str), "CFG scale": ("cfg", float),
            "Seed": ("seed", int), "Clip skip": ("clip_skip", int), "Hires upscale": ("hires", float),
            "Hires steps": ("hires_steps", int), "Hires upscaler": ("hires_upscaler", str), "ENSD": ("ensd", int)}
FALLBACK_UPSCALER = "Lanczos"  # for a model upscaler (ESRGAN family) named in an infotext


def _size(text: str | None) -> tuple[int | None, int | None]:
    if text is None:
        return None, None
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m:
        raise AdapterhubError(f"size {text!r}: write it as WIDTHxHEIGHT, e.g. 512x768")
    return int(m.group(1)), int(m.group(2))


def _from_png(path: str, options: dict, given: set[str]) -> tuple[dict, list[str]]:
    """The options an image's webui infotext gives (those on the command line win), and the warnings of a
    re-run as the webui would do it: a missing LoRA or embedding is named and left out, a model upscaler that
    is not here becomes Lanczos, ``RNG`` GPU (or none: the webui's default) is reproduced with NV. Another
    generator's metadata is refused by name."""
    from adapterhub.sample import imagemeta, infotext

    meta = imagemeta.read(path)
    if not meta.is_webui:
        raise AdapterhubError(f"{path}: made by {meta.generator} ({imagemeta.WHERE[meta.generator]}), not a webui "
                              "infotext: --from-png re-runs webui images only (png-info shows what it holds)")
    params = infotext.parse(meta.text)
    for key, (name, convert) in FROM_PNG.items():
        if name in given or key not in params:
            continue
        try:
            options[name] = convert(params[key])
        except ValueError:
            raise AdapterhubError(f"{path}: {key} {params[key]!r} is not a valid value") from None
    if "size" not in given and "Size-1" in params:
        options["size"] = f"{params['Size-1']}x{params['Size-2']}"
    # "Denoising strength": the hires pass's in a txt2img infotext, else img2img's (used with --init-image)
    strength = "hires_denoise" if "Hires upscale" in params else "denoise" if options.get("init_image") else None
    if strength and strength not in given and "Denoising strength" in params:
        try:
            options[strength] = float(params["Denoising strength"])
        except ValueError:
            raise AdapterhubError(f"{path}: Denoising strength {params['Denoising strength']!r} is not a valid "
                                  "value") from None
    warnings: list[str] = []
    options["source_model"] = (params.get("Model"), params.get("Model hash"))  # compared once the base is known
    if "rng" not in given:
        options["rng"] = _from_png_rng(path, params, "RNG" in meta.fields, warnings)
    if "hires_upscaler" not in given and "Hires upscaler" in params:
        options["hires_upscaler"] = _from_png_upscaler(path, params["Hires upscaler"], warnings)
    _from_png_networks(path, params, options, given, warnings)
    return options, warnings


def _from_png_networks(path: str, params: dict, options: dict, given: set[str], warnings: list[str]) -> None:
    """The networks an infotext names, as the webui finds them: prompt tags whose network is missing are left
    out, embeddings of ``TI hashes`` found in ``--adapter-dir`` (or the catalog) join the stack (the webui loads
    its embeddings folder), missing ones are named."""
    from adapterhub.sample import infotext

    dirs = [Path(d) for d in options["adapter_dirs"]]
    for key in ("prompt", "negative"):
        if key not in given:
            options[key] = _drop_missing_networks(path, options[key] or "", dirs, warnings)
    for name in infotext.parse_hashes(params.get("TI hashes", "")):
        if _find(name, dirs) is None:
            warnings.append(f"{path}: embedding {name!r} (TI hashes) is not in --adapter-dir or the catalog: its "
                            "word is read as plain text")
        elif "stacks" not in given:
            options["stacks"] = (*options["stacks"], name)


def _other_model(path: str, source: tuple, text: str) -> str | None:
    """A warning when the image was made with another model than this run's (by ``Model hash``, else by name):
    the webui re-runs with whatever model is loaded, silently."""
    from adapterhub.sample import infotext

    (name, digest), fields = source, infotext.parse(text)
    mine = (fields.get("Model"), fields.get("Model hash"))
    if (digest and digest == mine[1]) or (not digest and (not name or name == mine[0])):
        return None
    made = f"{name or 'a model'}" + (f" [{digest}]" if digest else "")
    used = f"{mine[0]}" + (f" [{mine[1]}]" if mine[1] else "")
    return f"{path}: made with {made}; this run used {used}, so the image will differ"


def _from_png_rng(path: str, params: dict, written: bool, warnings: list[str]) -> str:
    """The RNG source to re-run with: CPU and NV as written; GPU, the webui's default (no ``RNG`` field),
    with NV, its emulation of NVIDIA's GPU noise on any device, and a note saying so."""
    from adapterhub.sample import rng

    try:
        source = rng.source(params.get("RNG", "GPU"))
    except AdapterhubError as err:
        raise AdapterhubError(f"{path}: {err}") from None
    if source != "GPU":
        return source
    why = "RNG GPU" if written else "no RNG field (the webui's default: GPU)"
    warnings.append(f"note: {path}: {why}: reproduced with RNG NV, the webui's emulation of NVIDIA GPU noise, "
                    "the same on any device")
    return "NV"


def _from_png_upscaler(path: str, name: str, warnings: list[str]) -> str:
    """A hires upscaler we have as it is; a model upscaler (ESRGAN, 4x-UltraSharp …) falls back to Lanczos,
    the built-in image upscaler nearest to it (both enlarge the decoded image), with a warning."""
    from adapterhub.sample.generator import hires_upscaler

    try:
        return hires_upscaler(name)
    except AdapterhubError:
        warnings.append(f"{path}: hires upscaler {name!r} is a model upscaler that is not available here: using "
                        f"{FALLBACK_UPSCALER} instead")
        return FALLBACK_UPSCALER


def _find(name: str, dirs: list[Path]) -> Path | None:
    from adapterhub.stack import find_adapter

    try:
        return find_adapter(name, dirs)
    except AdapterhubError:
        return None


def _drop_missing_networks(path: str, prompt: str, dirs: list[Path], warnings: list[str]) -> str:
    """``prompt`` without the ``<lora:…>``, ``<lyco:…>`` and ``<hypernet:…>`` tags whose network is not in
    ``dirs`` or the catalog, one warning each (the webui reports and skips them too)."""
    from adapterhub.stack import TAG, TAG_KINDS

    def keep(match) -> str:
        kind = TAG_KINDS.get(match.group(1).lower())
        if kind is None:
            return match.group(0)
        name = match.group(2).split(":")[0].strip().strip("\"'")
        if _find(name, dirs) is not None:
            return match.group(0)
        label = "LoRA" if kind == "lora" else "hypernetwork"
        warnings.append(f"{path}: {label} {name!r} ({match.group(0)}) is not in --adapter-dir or the catalog: "
                        "left out")
        return ""

    cleaned = TAG.sub(keep, prompt)
    return re.sub(r"[ \t]{2,}", " ", cleaned).strip() if cleaned != prompt else prompt


def _say_if_noise(base: str) -> None:
    """Where images are listed: a tiny base or preset (built from a seed, never trained) draws noise, and a new
    user's first images are theirs, so say why before they look (once the images exist: errors stay one line)."""
    from adapterhub.base import PRESETS, TINY_BASES

    if str(base) in TINY_BASES or str(base) in PRESETS:
        click.echo(f"note: {base} has random weights (a tiny base for trying things out): its images are noise; "
                   "give --base a real model (a .safetensors checkpoint or a diffusers folder) for pictures", err=True)


def _quiet_transformers() -> None:
    """transformers' weight-loading bars (the environment switch only works before it is imported)."""
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def _next_index(out: Path) -> int:
    """One past the highest ``NNNNN-`` (image) or ``xyz-NNNNN`` (plot grid) number in ``out``, any format."""
    names = (re.match(r"(?:xyz-)?(\d{5})(?:-|\.(?:png|jpg|webp)$)", p.name) for p in out.iterdir()) \
        if out.is_dir() else ()
    return max((int(m.group(1)) for m in names if m), default=-1) + 1


def _control_entries(specs: tuple[str, ...], kind: str) -> list:
    """``IMAGE:MODEL:WEIGHT[:START:END]`` (``--control``) or ``IMAGE:MODEL:WEIGHT`` (``--adapter``) as stack
    entries whose attach options carry the conditioning image and the guidance window."""
    from PIL import Image, UnidentifiedImageError

    from adapterhub.stack import Entry

    entries = []
    for spec in specs:
        parts = spec.split(":")
        most = 5 if kind == "--control" else 3
        if not 3 <= len(parts) <= most:
            form = "IMAGE:MODEL:WEIGHT[:START:END]" if kind == "--control" else "IMAGE:T2I:WEIGHT"
            raise AdapterhubError(f"{kind} {spec!r}: expected {form}")
        image_path, model, *numbers = parts
        try:
            values = [float(v) for v in numbers]
        except ValueError:
            raise AdapterhubError(f"{kind} {spec!r}: weight, start and end must be numbers") from None
        try:
            with Image.open(image_path) as opened:
                image = opened.convert("RGB")
        except (OSError, UnidentifiedImageError) as exc:
            raise AdapterhubError(f"{kind} {spec!r}: cannot read the image {image_path}: {exc}") from None
        options = {"image": image}
        if len(values) > 1:
            options["start"] = values[1]
        if len(values) > 2:
            options["end"] = values[2]
        entries.append(Entry(model, te=values[0], options=options))
    return entries


def _save(image, path: Path, text: str) -> None:
    """Atomic: a temp name in the same folder, then rename. The format is the suffix's (png, jpg, webp), the
    infotext kept where the webui keeps it in that format (:func:`infotext.save_image`)."""
    from adapterhub.sample import infotext

    tmp = path.with_name(f".{path.name}.tmp")
    try:
        infotext.save_image(image, tmp, text, path.suffix.lstrip(".").lower())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)


def _check_rng(source: str, device: str | None) -> None:
    """RNG GPU needs CUDA: said before a model loads (the generator checks again for a given pipeline)."""
    import torch

    from adapterhub.sample.rng import check_device

    check_device(source, device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _image_format(name: str) -> str:
    """``--format``: png, jpg (jpeg) or webp, or one line listing them."""
    from adapterhub.sample.infotext import FORMATS

    fmt = {"jpeg": "jpg"}.get(str(name).strip().lower(), str(name).strip().lower())
    if fmt not in FORMATS:
        raise AdapterhubError(f"--format {name!r}: choose one of {', '.join(FORMATS)}")
    return fmt


def _with_controls(text: str, generator) -> str:
    """The applied stack's ControlNet / T2I units added to an infotext, as sd-webui-controlnet writes them."""
    from adapterhub.sample import infotext

    units = infotext.control_units(generator.stack)
    return infotext.insert(text, units) if units else text


# ---------------------------------------------------------------------------------------------
# --prompts FILE and X/Y/Z plots
# ---------------------------------------------------------------------------------------------
def _plot_axes(options: dict) -> list:
    from adapterhub.sample.xy import parse_axis

    axes = [parse_axis(options[f"{k}_axis"], option=f"--{k}") if options[f"{k}_axis"] else None for k in "xyz"]
    if axes[0] is None and any(axes):
        raise AdapterhubError("--y and --z need --x (the first axis of the plot)")
    return axes


def _jobs(options: dict, request, dirs: list[Path]) -> tuple[list, dict]:
    """Every job (and its plot) checked, in every process, before a model loads."""
    from adapterhub.sample import promptfile
    from adapterhub.sample.generator import check_request
    from adapterhub.sample.xy import plan_plot

    axes = _plot_axes(options)
    source = options["prompts_file"]
    jobs = promptfile.read_prompts(source, request) if source else [promptfile.Job(0, 0, request)]
    plans = {}
    for job in jobs:
        try:
            check_request(job.request, dirs)
            if axes[0] is not None:
                plans[job.index] = plan_plot(job.request, *axes, adapter_dirs=dirs)
        except AdapterhubError as err:
            raise (AdapterhubError(f"{source}:{job.line}: {err}") if source else err) from None
    return jobs, plans


def _distributed(world: int):
    """accelerate's PartialState when launched as several processes (a barrier and each process's device).
    With only ``WORLD_SIZE`` / ``RANK`` set by hand, each process takes its share and nothing else."""
    import os

    if world <= 1 or "MASTER_ADDR" not in os.environ:
        return None
    try:
        from accelerate import PartialState
    except ImportError:  # pragma: no cover - accelerate is a dependency
        return None
    return PartialState()


@contextmanager
def _bar(enabled: bool, description: str, total: int):
    if not enabled:
        yield lambda n=1: None
        return
    with output.progress(description, total=total) as advance:
        yield advance


def _save_plot(plot, out: Path, index: int, cells: bool, ext: str = "png") -> dict:
    """The cells (``NNNNN-SEED.png``, numbered from ``index``) and the grid (``xyz-NNNNN.png``)."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, cell in enumerate(plot.cells):
        row = {"position": list(cell.position), "values": cell.values, "seed": cell.seed,
               "label": ", ".join(label for label in cell.labels if label)}
        if cells:
            path = out / f"{index + k:05d}-{cell.seed}.{ext}"
            _save(cell.image, path, cell.infotext)
            row["path"] = str(path)
        row["parameters"] = cell.infotext
        rows.append(row)
    grid_path = out / f"xyz-{index:05d}.{ext}"
    _save(plot.grid, grid_path, plot.infotext)
    return {"grid": str(grid_path), "parameters": plot.infotext, "shape": list(plot.shape), "cells": rows,
            "stack_switches": plot.stack_switches, "seconds": round(plot.seconds, 2)}


def _save_images(result, generator, out: Path, index: int, grid: bool, ext: str = "png") -> dict:
    out.mkdir(parents=True, exist_ok=True)
    texts = [_with_controls(text, generator) for text in result.infotexts]
    rows = []
    for i, (image, text, seed) in enumerate(zip(result.images, texts, result.seeds)):
        path = out / f"{index + i:05d}-{seed}.{ext}"
        _save(image, path, text)
        rows.append({"path": str(path), "seed": seed})
    job = {"images": rows, "parameters": texts[0] if texts else None}
    if grid and result.images:
        from adapterhub.sample.grid import make_grid

        job["grid"] = str(out / f"grid-{index:05d}.{ext}")
        _save(make_grid(result.images), Path(job["grid"]), texts[0])
    return job


def _files(summary_jobs: list[dict]) -> list[dict]:
    rows = []
    for job in summary_jobs:
        for cell in job.get("cells", []):
            rows.append({"path": cell.get("path", ""), "seed": cell["seed"], "cell": cell["label"]})
        rows += [{**row, "cell": ""} for row in job.get("images", [])]
        if job.get("grid"):
            rows.append({"path": job["grid"], "seed": "", "cell": "grid"})
    return rows


def _sample_many(options: dict, request, dirs: list[Path]) -> None:
    """``--prompts`` and/or ``--x``: every job and plot checked before the model loads; this process's
    share generated (one model, stacks switched in place); file numbers from each job's position in
    the whole run, the same in every process."""
    import time

    from adapterhub.sample import promptfile
    from adapterhub.sample.generator import Generator
    from adapterhub.sample.xy import run_plot

    jobs, plans = _jobs(options, request, dirs)
    rank, world, _ = promptfile.process()
    mine = promptfile.shard(jobs, rank, world)
    out = Path(options["out"])
    state = _distributed(world)
    try:
        device = options["device"] or (str(state.device) if state is not None else None)
        base = _next_index(out)
        if state is not None:
            state.wait_for_everyone()  # every process has numbered from the same folder before anyone writes
        firsts = promptfile.first_indices(
            jobs, lambda j: (1 if options["no_cells"] else len(plans[j.index].cells)) if j.index in plans
            else j.image_count)
        output.quiet_model_loading()
        _quiet_transformers()
        start = time.perf_counter()
        generator = Generator(options["base"], backend=options["backend"], dtype=options["dtype"], device=device,
                              adapter_dirs=dirs)
        total = sum(len(plans[j.index].cells) if j.index in plans else j.image_count for j in mine)
        done, warnings = [], {}
        with _bar(not options["as_json"], "cells" if plans else "prompts", total) as advance:
            for job in mine:
                index = base + firsts[job.index]
                if job.index in plans:
                    plot = run_plot(generator, plans[job.index], progress=lambda _d, _t: advance(1))
                    entry, found = _save_plot(plot, out, index, not options["no_cells"], options["format"]), \
                        plot.warnings
                else:
                    result = generator.generate(job.request)
                    advance(job.image_count)
                    entry, found = _save_images(result, generator, out, index, options["grid"], options["format"]), \
                        result.warnings
                warnings.update(dict.fromkeys(found))
                done.append({"line": job.line, "prompt": job.request.prompt, **entry} if options["prompts_file"]
                            else entry)
    finally:
        if state is not None:
            state.destroy_process_group()
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    _say_if_noise(options["base"])
    extra = {"seconds": round(time.perf_counter() - start, 2), "backend": options["backend"],
             "warnings": list(warnings)}
    summary = {"jobs": done, "rank": rank, "world": world, **extra} if options["prompts_file"] else {**done[0], **extra}
    rows = _files(done)
    output.emit(summary, options["as_json"],
                lambda d: output.table(rows, ["path", "seed", "cell"], title=f"{len(rows)} file(s) in {d['seconds']} s"))


@click.command("sample")
@click.option("--base", required=True,
              help="tiny-sd1, tiny-sdxl, a diffusers folder, a .safetensors checkpoint or a hub id.")
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
              help="A webui sampler name (Euler a, DPM++ 2M, DDIM ...).")
@click.option("--schedule", default="Automatic", show_default=True,
              help="Automatic, Uniform, Karras, Exponential, SGM Uniform, Beta, Polyexponential, KL Optimal, "
                   "Align Your Steps, Simple, Normal or DDIM (the webui's schedule types).")
@click.option("--cfg", default=7.0, show_default=True, type=float, help="CFG scale.")
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
@click.option("--denoise", default=None, type=float, help="img2img denoising strength, in (0, 1] (default 0.75).")
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
    import time

    from adapterhub.sample.generator import (
        Generator,
        Request,
        check_request,
        sampling_steps,
    )

    given = {name for name in options if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}
    options["format"] = _image_format(options["format"])
    notes: list[str] = []
    if options["from_png"]:
        options, notes = _from_png(options["from_png"], options, given)
    if options["prompt"] is None and not options["prompts_file"]:
        raise AdapterhubError("give --prompt (or --prompts FILE, or --from-png IMAGE)")
    width, height = _size(options["size"])
    dirs = [Path(d) for d in options["adapter_dirs"]]
    stack_spec = ", ".join(options["stacks"])
    controls = _control_entries(options["controls"], "--control") + _control_entries(options["t2i_adapters"],
                                                                                     "--adapter")
    if controls:
        from adapterhub.stack import Stack

        stack_spec = Stack([*(Stack.parse(stack_spec, dirs=dirs).entries if stack_spec.strip() else []), *controls])
    request = Request(options["prompt"] or "", negative=options["negative"] or "", stack=stack_spec,
                      seed=options["seed"], width=width, height=height, steps=options["steps"],
                      sampler=options["sampler"], schedule=options["schedule"], cfg=options["cfg"],
                      batch=options["batch"], images=options["images"], clip_skip=options["clip_skip"],
                      emphasis=options["emphasis"], init_image=options["init_image"],
                      denoising_strength=0.75 if options["denoise"] is None else options["denoise"],
                      hr_scale=options["hires"], hr_steps=options["hires_steps"], hr_denoise=options["hires_denoise"],
                      hr_upscaler=options["hires_upscaler"], rng=options["rng"] or "CPU",
                      ensd=options["ensd"])
    if options["denoise"] is not None and not options["init_image"]:
        raise AdapterhubError("--denoise is the img2img strength: give --init-image (the hires pass takes "
                              "--hires-denoise)")
    check_request(request, dirs)  # bad input fails here: no model loaded, nothing written
    _check_rng(request.rng, options["device"])
    for note in notes:
        click.echo(note if note.startswith("note: ") else f"warning: {note}", err=True)
    if options["prompts_file"] or options["x_axis"] or options["y_axis"] or options["z_axis"]:
        return _sample_many(options, request, dirs)
    output.quiet_model_loading()
    _quiet_transformers()
    start = time.perf_counter()
    generator = Generator(options["base"], backend=options["backend"], dtype=options["dtype"], device=options["device"],
                          adapter_dirs=dirs)
    generator.apply_stack(request)  # an adapter that does not fit the base fails here, before the progress bar
    total = sampling_steps(request) * (request.images or request.batch)
    if options["as_json"]:
        result = generator.generate(request)
    else:
        with output.progress("sampling", total=total) as advance:
            state = {"done": 0}

            def progress(done, _total):
                advance(done - state["done"])
                state["done"] = done

            result = generator.generate(request, progress=progress)
    out = Path(options["out"])
    out.mkdir(parents=True, exist_ok=True)
    index = _next_index(out)
    rows = []
    result.infotexts = [_with_controls(text, generator) for text in result.infotexts]
    for i, (image, text, seed) in enumerate(zip(result.images, result.infotexts, result.seeds)):
        path = out / f"{index + i:05d}-{seed}.{options['format']}"
        _save(image, path, text)
        rows.append({"path": str(path), "seed": seed})
    summary = {"images": rows, "seconds": round(time.perf_counter() - start, 2), "backend": options["backend"],
               "parameters": result.infotexts[0] if result.infotexts else None,
               "warnings": [n for n in notes if not n.startswith("note: ")] + result.warnings}
    if options["grid"] and result.images:
        from adapterhub.sample.grid import make_grid

        grid_path = out / f"grid-{index:05d}.{options['format']}"
        _save(make_grid(result.images), grid_path, result.infotexts[0])
        summary["grid"] = str(grid_path)
    other = _other_model(options["from_png"], options["source_model"], result.infotexts[0]) \
        if options.get("source_model") and result.infotexts else None
    summary["warnings"] += [other] if other else []
    for warning in [*result.warnings, *([other] if other else [])]:  # --from-png's own were said before sampling
        click.echo(f"warning: {warning}", err=True)
    _say_if_noise(options["base"])
    shown = rows + ([{"path": summary["grid"], "seed": "grid"}] if summary.get("grid") else [])
    output.emit(summary, options["as_json"], lambda d: output.table(shown, ["path", "seed"],
                                                                   title=f"{len(rows)} image(s) in {d['seconds']} s"))


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
