"""The files a sampling run writes: numbered names, atomic saves, the infotext kept in every format.

Images are ``NNNNN-SEED.EXT``, contact sheets ``grid-NNNNN.EXT``, X/Y/Z plot grids ``xyz-NNNNN.EXT``; numbers
go on from the highest one already in the folder (:func:`next_index`). Each function returns the plain rows
(``path``, ``seed`` …) that the run's summary lists.
"""
from __future__ import annotations

import re
from pathlib import Path


def next_index(out: Path) -> int:
    """One past the highest ``NNNNN-`` (image) or ``xyz-NNNNN`` (plot grid) number in ``out``, any format."""
    names = (re.match(r"(?:xyz-)?(\d{5})(?:-|\.(?:png|jpg|webp)$)", p.name) for p in out.iterdir()) \
        if out.is_dir() else ()
    return max((int(m.group(1)) for m in names if m), default=-1) + 1


def save(image, path: Path, text: str) -> None:
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


def with_controls(text: str, stack) -> str:
    """The applied stack's ControlNet / T2I units added to an infotext, as sd-webui-controlnet writes them."""
    from adapterhub.sample import infotext

    units = infotext.control_units(stack)
    return infotext.insert(text, units) if units else text


def save_images(result, stack, out: Path, index: int, grid: bool, ext: str = "png") -> dict:
    """A result's images numbered from ``index`` (their infotexts with ``stack``'s control units), and with
    ``grid`` a contact sheet: ``{"images": [{"path", "seed"}], "parameters", "grid"?}``."""
    out.mkdir(parents=True, exist_ok=True)
    texts = [with_controls(text, stack) for text in result.infotexts]
    rows = []
    for i, (image, text, seed) in enumerate(zip(result.images, texts, result.seeds)):
        path = out / f"{index + i:05d}-{seed}.{ext}"
        save(image, path, text)
        rows.append({"path": str(path), "seed": seed})
    job = {"images": rows, "parameters": texts[0] if texts else None}
    if grid and result.images:
        from adapterhub.sample.grid import make_grid

        job["grid"] = str(out / f"grid-{index:05d}.{ext}")
        save(make_grid(result.images), Path(job["grid"]), texts[0])
    return job


def save_plot(plot, out: Path, index: int, cells: bool, ext: str = "png") -> dict:
    """The cells (``NNNNN-SEED.EXT``, numbered from ``index``; with ``cells`` false only listed) and the grid
    (``xyz-NNNNN.EXT``)."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, cell in enumerate(plot.cells):
        row = {"position": list(cell.position), "values": cell.values, "seed": cell.seed,
               "label": ", ".join(label for label in cell.labels if label)}
        if cells:
            path = out / f"{index + k:05d}-{cell.seed}.{ext}"
            save(cell.image, path, cell.infotext)
            row["path"] = str(path)
        row["parameters"] = cell.infotext
        rows.append(row)
    grid_path = out / f"xyz-{index:05d}.{ext}"
    save(plot.grid, grid_path, plot.infotext)
    return {"grid": str(grid_path), "parameters": plot.infotext, "shape": list(plot.shape), "cells": rows,
            "stack_switches": plot.stack_switches, "seconds": round(plot.seconds, 2)}


def files(jobs: list[dict]) -> list[dict]:
    """Every file the jobs of a summary wrote, one row each: ``path``, ``seed``, ``cell`` (a plot cell's label,
    ``grid`` for a grid)."""
    rows = []
    for job in jobs:
        for cell in job.get("cells", []):
            rows.append({"path": cell.get("path", ""), "seed": cell["seed"], "cell": cell["label"]})
        rows += [{**row, "cell": ""} for row in job.get("images", [])]
        if job.get("grid"):
            rows.append({"path": job["grid"], "seed": "", "cell": "grid"})
    return rows
