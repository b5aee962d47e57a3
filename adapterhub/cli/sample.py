"""``adapterhub sample`` (generate images, A1111 conventions) and ``adapterhub png-info`` (read them back)."""
from __future__ import annotations

import re
from pathlib import Path

import click

from adapterhub.cli import output
from adapterhub.errors import AdapterhubError

# --from-png: infotext key -> (option name, converter)
FROM_PNG = {"Prompt": ("prompt", str), "Negative prompt": ("negative", str), "Steps": ("steps", int),
            "Sampler": ("sampler", str), "Schedule type": ("schedule", str), "CFG scale": ("cfg", float),
            "Seed": ("seed", int), "Clip skip": ("clip_skip", int)}


def _size(text: str | None) -> tuple[int | None, int | None]:
    if text is None:
        return None, None
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m:
        raise AdapterhubError(f"size {text!r}: write it as WIDTHxHEIGHT, e.g. 512x768")
    return int(m.group(1)), int(m.group(2))


def _from_png(path: str, options: dict, given: set[str]) -> dict:
    from adapterhub.sample import infotext

    text = infotext.read_png(path)
    if not text:
        raise AdapterhubError(f"{path}: no parameters text in this image")
    params = infotext.parse(text)
    for key, (name, convert) in FROM_PNG.items():
        if name in given or key not in params:
            continue
        try:
            options[name] = convert(params[key])
        except ValueError:
            raise AdapterhubError(f"{path}: {key} {params[key]!r} is not a valid value") from None
    if "size" not in given and "Size-1" in params:
        options["size"] = f"{params['Size-1']}x{params['Size-2']}"
    return options


def _quiet_transformers() -> None:
    """transformers' weight-loading bars (the environment switch only works before it is imported)."""
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def _next_index(out: Path) -> int:
    found = [int(m.group(1)) for p in out.glob("*.png") if (m := re.match(r"(\d{5})-", p.name))] if out.is_dir() else []
    return max(found, default=-1) + 1


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
    """Atomic: a temp name in the same folder, then rename."""
    from adapterhub.sample import infotext

    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG", pnginfo=infotext.pnginfo(text))
    tmp.replace(path)


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
@click.option("--steps", default=20, show_default=True, type=int)
@click.option("--sampler", default="DPM++ 2M", show_default=True,
              help="A webui sampler name (Euler a, DPM++ 2M, DDIM ...).")
@click.option("--schedule", default="Automatic", show_default=True,
              help="Automatic, Karras, Exponential, Uniform, SGM Uniform, Beta.")
@click.option("--cfg", default=7.0, show_default=True, type=float, help="CFG scale.")
@click.option("--seed", default=-1, show_default=True, type=int, help="-1: random. Image n gets seed + n.")
@click.option("--size", default=None, help="WIDTHxHEIGHT, multiples of 8 (default: the base's native size).")
@click.option("--batch", default=1, show_default=True, type=int, help="Images per UNet batch.")
@click.option("--images", default=None, type=int, help="Images in all (default: one batch).")
@click.option("--clip-skip", default=1, show_default=True, type=int, help="1 = last layer (webui convention).")
@click.option("--emphasis", default="Original", show_default=True,
              type=click.Choice(["Original", "No norm", "Ignore", "None"]))
@click.option("--backend", default="eager", show_default=True, help="A registered sampler backend: eager, compiled ...")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default=None,
              help="Default: fp16 on CUDA, fp32 on CPU.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available).")
@click.option("--from-png", "from_png", type=click.Path(exists=True, dir_okay=False),
              help="Take prompt, negative, steps, sampler, schedule, CFG, seed, size and clip skip from an "
                   "image's infotext; options given on the command line override.")
@click.option("--grid", is_flag=True, help="Also write a contact sheet of the images.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Output folder (created).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
@click.pass_context
def sample_cmd(ctx, **options):
    """Generate images; every PNG carries the webui's `parameters` text."""
    import time

    from adapterhub.sample.generator import Generator, Request, check_request

    given = {name for name in options if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}
    if options["from_png"]:
        options = _from_png(options["from_png"], options, given)
    if not options["prompt"] and options["prompt"] != "":
        raise AdapterhubError("give --prompt (or --from-png IMAGE)")
    width, height = _size(options["size"])
    dirs = [Path(d) for d in options["adapter_dirs"]]
    stack_spec = ", ".join(options["stacks"])
    controls = _control_entries(options["controls"], "--control") + _control_entries(options["t2i_adapters"],
                                                                                     "--adapter")
    if controls:
        from adapterhub.stack import Stack

        stack_spec = Stack([*(Stack.parse(stack_spec, dirs=dirs).entries if stack_spec.strip() else []), *controls])
    request = Request(options["prompt"], negative=options["negative"] or "", stack=stack_spec,
                      seed=options["seed"], width=width, height=height, steps=options["steps"],
                      sampler=options["sampler"], schedule=options["schedule"], cfg=options["cfg"],
                      batch=options["batch"], images=options["images"], clip_skip=options["clip_skip"],
                      emphasis=options["emphasis"])
    check_request(request, dirs)  # bad input fails here: no model loaded, nothing written
    output.quiet_model_loading()
    _quiet_transformers()
    start = time.perf_counter()
    generator = Generator(options["base"], backend=options["backend"], dtype=options["dtype"], device=options["device"],
                          adapter_dirs=dirs)
    generator.apply_stack(request)  # an adapter that does not fit the base fails here, before the progress bar
    total = request.steps * (request.images or request.batch)
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
    for i, (image, text, seed) in enumerate(zip(result.images, result.infotexts, result.seeds)):
        path = out / f"{index + i:05d}-{seed}.png"
        _save(image, path, text)
        rows.append({"path": str(path), "seed": seed})
    summary = {"images": rows, "seconds": round(time.perf_counter() - start, 2), "backend": options["backend"],
               "parameters": result.infotexts[0] if result.infotexts else None, "warnings": result.warnings}
    if options["grid"] and result.images:
        from adapterhub.sample.grid import make_grid

        grid_path = out / f"grid-{index:05d}.png"
        _save(make_grid(result.images), grid_path, result.infotexts[0])
        summary["grid"] = str(grid_path)
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    output.emit(summary, options["as_json"], lambda d: output.table(d["images"], ["path", "seed"],
                                                                   title=f"{len(rows)} image(s) in {d['seconds']} s"))


@click.command("png-info")
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="The parsed fields as JSON (the webui's parser).")
def png_info_cmd(image, as_json):
    """Print an image's `parameters` text (A1111 / adapterhub infotext)."""
    from adapterhub.sample import infotext

    try:
        text = infotext.read_png(image)
    except OSError as exc:
        raise AdapterhubError(f"{image}: cannot read as an image ({exc.__class__.__name__})") from None
    if not text:
        raise AdapterhubError(f"{image}: no parameters text in this image")
    if not as_json:
        click.echo(text)
        return
    fields = infotext.parse(text, defaults=False)
    for key in ("Lora hashes", "TI hashes"):
        if key in fields:
            fields[key] = infotext.parse_hashes(fields[key])
    output.emit_json({"parameters": text, **fields})
