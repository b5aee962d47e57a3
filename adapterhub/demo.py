"""The main job on the embedded default: build the tiny base, write one adapter of each example-able
type, inspect them, chart what each changes per block, merge them, and render an image before and after (the
service behind ``demo``).

The tiny bases have random weights, so every image they render is noise, adapters or not: the contact sheet
says so on its face, and the chart (``blocks.png``, :mod:`adapterhub.deltachart`) is the picture to read."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapterhub.api import inspect, load
from adapterhub.plugins import adapter_types
from adapterhub.types import AdapterType

PROMPT = "a watercolor painting of a lighthouse at dusk"
NOISE_NOTE = ("the tiny base has random weights, so every image it renders is noise, with or without adapters: "
              "the difference panel only shows that the merge changed something")


@dataclass
class DemoResult:
    out: Path
    adapters: list[dict] = field(default_factory=list)
    image: Path | None = None
    chart: Path | None = None
    catalog: dict = field(default_factory=dict)
    seconds: float = 0.0


def exampleable(kinds: tuple[str, ...] | None = None) -> list[AdapterType]:
    types = [t for t in adapter_types().values() if "example" in t.capabilities]
    return [t for t in types if kinds is None or t.name in kinds]


def render(pipe, seed: int = 0, steps: int = 6, size: int = 256, prompt: str = PROMPT):
    generator = torch.Generator().manual_seed(seed)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(prompt, num_inference_steps=steps, height=size, width=size, generator=generator,
                    guidance_scale=7.0).images[0]


def contact_sheet(before, after, gain: float = 8.0):
    """base | merged | |merged - base| x gain: the merge's effect, visible even on a random model."""
    import numpy as np
    from PIL import Image, ImageDraw

    diff = np.abs(np.asarray(after, dtype=np.float32) - np.asarray(before, dtype=np.float32)) * gain
    # the captions say it on the picture itself (the first thing a new user opens): random weights draw noise
    panels = [(before, "base (random weights: noise)"), (after, "merged (noise too)"),
              (Image.fromarray(diff.clip(0, 255).astype("uint8")), f"|difference| x{gain:g}: what the merge changed")]
    w, h = before.size
    sheet = Image.new("RGB", (len(panels) * w, h + 20), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, label) in enumerate(panels):
        sheet.paste(image, (i * w, 20))
        draw.text((i * w + 4, 4), label, fill="black" if i == 2 else "firebrick")
    return sheet


def chart_rows(adapters) -> list[tuple[str, dict | str]]:
    """``(name, block norms)`` per adapter for :func:`adapterhub.deltachart.save_chart`; a type that is no
    weight delta gets a line saying how it acts instead."""
    from adapterhub.deltachart import block_norms

    rows = []
    for adapter in adapters:
        if adapter.plugin.weight_space:
            rows.append((f"{adapter.type}", block_norms(adapter)))
        else:
            rows.append((f"{adapter.type}", "attached at run time (no weight deltas to measure per block)"))
    return rows


def register_in_catalog(folder: Path, catalog: str | None) -> dict:
    from adapterhub.catalog import open_catalog, scan

    with open_catalog(catalog, create=True) as cat:
        return scan(cat, [folder], jobs=1).as_dict()


def run_demo(out: Path, base: str = "tiny-sd1", weight: float = 0.5, seed: int = 0, catalog: str | None = None,
             progress=lambda message: None) -> DemoResult:
    from adapterhub.base import load_base
    from adapterhub.catalog import resolve_adapter_arg
    from adapterhub.io import atomic_path
    from adapterhub.merge import merge_adapters

    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    progress(f"building the embedded base {base}")
    pipe = load_base(base)
    result = DemoResult(out)
    entries = []
    for adapter_type in exampleable():
        name = f"demo_{adapter_type.name}{adapter_type.example_suffix}"
        path = adapter_type.example(pipe, out / "adapters" / name, seed=seed)
        facts = inspect(path)
        progress(f"wrote {path.name}: {facts['type']} / {facts['format']} / {facts['targets']} targets")
        result.adapters.append({k: facts.get(k) for k in ("name", "type", "format", "base", "rank", "alpha", "targets")})
        entries.append((load(path), weight))
    progress(f"cataloguing the examples ({catalog or 'catalog.db'})")
    result.catalog = register_in_catalog(out / "adapters", catalog)
    entries = [(load(resolve_adapter_arg(a.name, catalog)), w) for a, w in entries]  # by catalog name
    from adapterhub.deltachart import save_chart

    progress("charting what each adapter changes, per block")
    result.chart = save_chart(chart_rows([a for a, _ in entries]), out / "blocks.png",
                              title="demo adapters: weight change per UNet block (random example weights)")
    progress("rendering the base")
    before = render(pipe, seed)
    mergeable = [(a, w) for a, w in entries if "merge" in a.plugin.capabilities]
    attached = [(a, w) for a, w in entries if "merge" not in a.plugin.capabilities]
    progress(f"merging {len(mergeable)} adapters at weight {weight}"
             + (f", attaching {len(attached)} ({', '.join(a.type for a, _ in attached)})" if attached else ""))
    merge_adapters(pipe, mergeable)
    handles = [a.attach(pipe, w, **a.plugin.example_options(pipe)) for a, w in attached]
    tokens = [a.info().get("token") for a, _ in entries if a.info().get("token")]
    prompt = ", ".join([PROMPT, *tokens])
    progress(f"rendering the merged model: {prompt!r}")
    after = render(pipe, seed, prompt=prompt)
    for handle in handles:
        handle.detach()
    result.image = out / "demo.png"
    with atomic_path(result.image, suffix=".png") as tmp:
        contact_sheet(before, after).save(tmp, format="PNG")
    result.seconds = time.perf_counter() - start
    return result
