"""X/Y/Z plots: one image per cell over up to three axes of parameters, in one labelled grid.

    from adapterhub.sample import Generator, Request
    from adapterhub.sample.xy import xy_plot

    gen = Generator("tiny-sd1", adapter_dirs=["loras"])
    plot = xy_plot(gen, Request("a castle", stack="style", seed=5), x="weight=0,0.5,1", y="steps=10,20")
    plot.grid.save("plot.png", pnginfo=plot.pnginfo())
    plot.cell(2, 1).image                  # weight 1, 20 steps

This is the webui's "X/Y/Z plot" script (``scripts/xyz_grid.py``) over :class:`Generator`:

* An axis is ``NAME=VALUES``. Names: ``seed``, ``steps``, ``cfg``, ``sampler``, ``schedule``,
  ``clip-skip``, ``prompt-sr`` (the first value is the search string, every value replaces it in the
  prompt and the negative prompt), ``adapter`` (a stack spec added to the request's stack: a name, a
  path, ``style:0.8``, ``"a:0.5, b:0.5"``; ``None`` for no adapter) and ``weight`` (the multiplier of
  every adapter of the stack except ControlNet / T2I units; ``weight:NAME`` for one entry, any type).
* Values are comma-separated with CSV quoting (``"a, b",c``; a space before the quote is allowed).
  Integer and float axes take the webui's ranges: ``1-5`` (step 1), ``1-9 (+2)``, ``10-1 (-3)`` and
  ``1-10 [4]`` (4 values spread evenly, integers truncated as the webui does). Unlike the webui a
  range never passes its end: its float ranges can overshoot by one step (``0-1 (+0.3)`` gives 1.2
  there) and a negative integer step stops two short. Floats are rounded to 8 decimals.
* Every cell is one :class:`Request` (the given one with the cell's values) generated on its own:
  one image, the same seed in every cell unless the seed is an axis (``-1`` is drawn once, as the
  webui's "fixed seeds"). A cell's latents are exactly those of ``generator.generate`` on its request.
* Cells run grouped by their adapter stack (first appearance order), so a long-lived generator
  switches each stack in place once: a weight axis re-weights the applied adapters, no reload.
* The grid: X columns by Y rows per Z value, labels on top and on the left (:mod:`.grid`), and the
  infotext of the first cell plus the webui's ``Script: X/Y/Z plot, X Type: …, X Values: …`` keys.

Bad axes (unknown name, a value of the wrong type, an unknown sampler, an adapter that is not
found, a search string not in the prompt) raise one-line :class:`AdapterhubError` naming the option
and the value from :func:`plan_plot`, which needs no model.
"""
from __future__ import annotations

import csv
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from adapterhub.errors import AdapterhubError
from adapterhub.sample import infotext
from adapterhub.sample.request import MAX_SEED, Request, check_request

SCRIPT = "X/Y/Z plot"
NUMBER = r"[+-]?\s*\d+"
FLOAT = r"[+-]?\s*\d+(?:\.\d*)?"
RANGES = {  # type -> (step form "a-b (+s)", count form "a-b [n]"), the webui's re_range / re_range_count
    int: (re.compile(rf"\s*({NUMBER})\s*-\s*({NUMBER})(?:\s*\(([+-]\d+)\s*\))?\s*"),
          re.compile(rf"\s*({NUMBER})\s*-\s*({NUMBER})(?:\s*\[(\d+)\s*])?\s*")),
    float: (re.compile(rf"\s*({FLOAT})\s*-\s*({FLOAT})(?:\s*\(([+-]\d+(?:\.\d*)?)\s*\))?\s*"),
            re.compile(rf"\s*({FLOAT})\s*-\s*({FLOAT})(?:\s*\[(\d+)\s*])?\s*")),
}


@dataclass(frozen=True)
class AxisKind:
    """What an axis name means: its webui label, value type, the Request field it sets (None: special)
    and whether a cell label reads ``Label: value`` or just the value."""

    name: str
    label: str
    type: type
    field: str | None
    show_label: bool = True
    stack: bool = False  # changes the adapter stack


KINDS = {k.name: k for k in (
    AxisKind("seed", "Seed", int, "seed"),
    AxisKind("steps", "Steps", int, "steps"),
    AxisKind("cfg", "CFG Scale", float, "cfg"),
    AxisKind("sampler", "Sampler", str, "sampler", show_label=False),
    AxisKind("schedule", "Schedule type", str, "schedule"),
    AxisKind("clip-skip", "Clip skip", int, "clip_skip"),
    AxisKind("prompt-sr", "Prompt S/R", str, None, show_label=False),
    AxisKind("adapter", "Adapter", str, None, show_label=False, stack=True),
    AxisKind("weight", "Weight", float, None, stack=True),
)}
ALIASES = {"cfg-scale": "cfg", "prompt-s/r": "prompt-sr", "sr": "prompt-sr", "schedule-type": "schedule",
           "scheduler": "schedule", "clipskip": "clip-skip", "lora": "adapter", "stack": "adapter"}
NONE_VALUES = ("", "none")


# ---------------------------------------------------------------------------------------------
# axes
# ---------------------------------------------------------------------------------------------
@dataclass
class Axis:
    """One axis: its kind, its values (typed, ranges expanded), the values as written, the entry a
    ``weight:NAME`` axis targets, and the option it came from (for messages)."""

    kind: AxisKind
    values: list
    text: str
    target: str | None = None
    option: str = "x"

    @property
    def name(self) -> str:
        return f"{self.kind.name}:{self.target}" if self.target else self.kind.name

    @property
    def type_label(self) -> str:
        """``X Type`` in the infotext."""
        return f"{self.kind.label} {self.target}" if self.target else self.kind.label

    def label(self, value) -> str:
        """A cell label, as the webui's ``format_value_add_label`` / ``format_value``."""
        if isinstance(value, float):
            value = round(value, 8)
        if self.kind.name == "adapter":
            return _adapter_label(value)
        if not self.kind.show_label:
            return str(value)
        return f"{self.target if self.target else self.kind.label}: {value}"

    def where(self, value=None) -> str:
        head = f"{self.option} {self.name}"
        return head if value is None else f"{head}: {value!r}"


def _adapter_label(value: str) -> str:
    text = str(value).strip()
    if text.lower() in NONE_VALUES:
        return "None"
    if "," in text:
        return text
    return Path(text).stem if Path(text).suffix in (".safetensors", ".pt", ".ckpt", ".bin") else Path(text).name


def split_values(text: str) -> list[str]:
    """The webui's ``csv_string_to_list_strip``: CSV fields, stripped (a space before a quote allowed)."""
    rows = list(csv.reader([text], skipinitialspace=True)) if text.strip() else []
    return [value.strip() for row in rows for value in row]


def _number(text: str, kind: type, where: str):
    try:
        return kind(re.sub(r"\s+", "", text))
    except ValueError:
        noun = "an integer" if kind is int else "a number"
        raise AdapterhubError(f"{where}: {text!r} is not {noun}") from None


def expand(value: str, kind: type, where: str = "value") -> list:
    """One comma-separated item of an int or float axis: a number or one of the webui's ranges."""
    step_form, count_form = RANGES[kind]
    m = step_form.fullmatch(value)
    if m is not None:
        start, end = _number(m.group(1), kind, where), _number(m.group(2), kind, where)
        step = _number(m.group(3), kind, where) if m.group(3) is not None else kind(1)
        if step == 0:
            raise AdapterhubError(f"{where}: {value!r}: a range step cannot be 0")
        count = math.floor((end - start) / step + 1e-9) + 1
        values = [start + i * step for i in range(max(count, 0))]
    elif (m := count_form.fullmatch(value)) is not None:
        import numpy as np

        start, end = _number(m.group(1), kind, where), _number(m.group(2), kind, where)
        count = int(m.group(3)) if m.group(3) is not None else 1
        values = [kind(v) for v in np.linspace(start, end, count).tolist()]
    else:
        values = [_number(value, kind, where)]
    if not values:
        raise AdapterhubError(f"{where}: {value!r}: the range is empty")
    return [round(v, 8) if kind is float else v for v in values]


def _kind(name: str, where: str) -> tuple[AxisKind, str | None]:
    key = re.sub(r"[\s_]+", "-", name.strip().lower())
    target = None
    if key.startswith("weight:") or (key.startswith("weight[") and key.endswith("]")):
        target = name.strip()[7:].rstrip("]").strip() if key.startswith("weight:") else name.strip()[7:-1].strip()
        key = "weight"
    key = ALIASES.get(key, key)
    if key not in KINDS:
        raise AdapterhubError(f"{where} {name.strip()!r}: unknown axis; choose {', '.join(KINDS)}")
    if key == "weight" and target == "":
        raise AdapterhubError(f"{where} {name.strip()!r}: name the adapter after 'weight:'")
    return KINDS[key], target


def parse_axis(spec, values=None, option: str = "x") -> Axis:
    """An :class:`Axis` from ``"NAME=VALUES"``, or from a name and ``values`` (a string or a list)."""
    if isinstance(spec, Axis):
        return spec
    if values is None:
        name, sep, text = str(spec).partition("=")
        if not sep:
            raise AdapterhubError(f"{option} {spec!r}: write AXIS=VALUES, e.g. steps=10,20 or weight=0,0.5,1")
    else:
        name, text = str(spec), values if isinstance(values, str) else None
    kind, target = _kind(name, option)
    axis = Axis(kind, [], "", target, option)
    items = split_values(text) if text is not None else [str(v) if kind.type is str else v for v in values]
    axis.text = text if text is not None else ", ".join(str(v) for v in values)
    if not items:
        raise AdapterhubError(f"{axis.where()}: no values")
    for item in items:
        if kind.type is str:
            axis.values.append(str(item))
        elif isinstance(item, str):
            axis.values += expand(item, kind.type, axis.where())
        else:
            axis.values.append(_number(str(item), kind.type, axis.where()))
    if kind.name == "prompt-sr" and not axis.values[0]:
        raise AdapterhubError(f"{axis.where()}: the first value is the text to search for; it cannot be empty")
    return axis


# ---------------------------------------------------------------------------------------------
# the plan: one request per cell, checked without a model
# ---------------------------------------------------------------------------------------------
@dataclass
class Cell:
    """One cell: its position (ix, iy, iz), the axis values, its request and, once run, its image,
    latents, infotext and seed."""

    position: tuple[int, int, int]
    values: dict[str, Any]
    labels: tuple[str, str, str]
    request: Request
    stack_key: tuple = ()
    image: Any = None
    latents: Any = None
    infotext: str = ""
    seed: int | None = None
    skipped_schedule: str | None = None  # the schedule a timestep sampler's cell did not use (own_schedule)

    def summary(self) -> dict:
        return {"position": list(self.position), "values": self.values, "seed": self.seed,
                "infotext": self.infotext}


@dataclass
class Plot:
    """A planned (then run) X/Y/Z plot: the axes, the cells in grid order (X fastest, then Y, then Z),
    the order they run in; after :func:`run_plot` the grid image, where each cell is in it, and the
    grid's infotext."""

    request: Request
    axes: tuple[Axis | None, Axis | None, Axis | None]
    cells: list[Cell]
    order: list[int]
    legend: bool = True
    grid: Any = None
    boxes: list = field(default_factory=list)
    infotext: str = ""
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)  # the plan's own warnings, said again in ``warnings`` once run

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(len(a.values) if a is not None else 1 for a in self.axes)

    @property
    def stack_switches(self) -> int:
        """How many times the stack changes while the cells run in :attr:`order` (the first counts)."""
        keys = [self.cells[i].stack_key for i in self.order]
        return sum(1 for i, key in enumerate(keys) if i == 0 or key != keys[i - 1])

    def cell(self, ix: int, iy: int = 0, iz: int = 0) -> Cell:
        nx, ny, _ = self.shape
        return self.cells[ix + iy * nx + iz * nx * ny]

    def pnginfo(self):
        return infotext.pnginfo(self.infotext)

    def script_params(self) -> dict[str, str]:
        """The webui's grid keys: ``Script``, ``X Type``, ``X Values`` (``Fixed X Values`` for a seed axis)."""
        params = {"Script": SCRIPT}
        for letter, axis in zip("XYZ", self.axes):
            if axis is None:
                continue
            params[f"{letter} Type"] = axis.type_label
            params[f"{letter} Values"] = axis.text
            if axis.kind.name == "seed":
                params[f"Fixed {letter} Values"] = ", ".join(str(v) for v in axis.values)
        return params


def _entries(stack, dirs: Sequence[str | Path]) -> list:
    from adapterhub.stack import Stack

    if stack is None:
        return []
    if isinstance(stack, Stack):
        return list(stack.entries)
    if isinstance(stack, str):
        return list(Stack.parse(stack, dirs=dirs).entries) if stack.strip() else []
    return list(Stack(stack).entries)


def _check_value(axis: Axis, value, base: Request, entries: list, dirs) -> None:
    """One axis value on its own against the request: errors name the option, the axis and the value."""
    try:
        if axis.kind.field is not None:
            check_request(own_schedule(replace(base, **{axis.kind.field: value}))[0], dirs)
        elif axis.kind.name == "prompt-sr":
            search = axis.values[0]
            if search not in base.prompt and search not in base.negative:
                raise AdapterhubError(f"{search!r} is not in the prompt or the negative prompt")
            check_request(replace(base, prompt=base.prompt.replace(search, value),
                                  negative=base.negative.replace(search, value)), dirs)
        elif axis.kind.name == "adapter":
            _entries(None if str(value).strip().lower() in NONE_VALUES else value, dirs)
    except AdapterhubError as err:
        raise AdapterhubError(f"{axis.where(value)}: {err}") from None


def _targets(axis: Axis, entries: list) -> list[int]:
    if axis.target is None:
        found = [i for i, e in enumerate(entries) if not e.options]
        what = "no adapter in the stack to weight (give --stack or an adapter axis)"
    else:
        found = [i for i, e in enumerate(entries) if axis.target in (e.label, str(e.source))]
        what = f"no adapter {axis.target!r} in the stack ({', '.join(e.label for e in entries) or 'empty'})"
    if not found:
        raise AdapterhubError(what)
    return found


def _cell_request(base: Request, entries: list, pairs: list[tuple[Axis, Any]], dirs) -> Request:
    """The cell's request: ``base`` with the cell's axis values (the schedule as given: see :func:`own_schedule`)."""
    from adapterhub.stack import Stack

    req, extra, weights = base, [], []
    for axis, value in pairs:
        name = axis.kind.name
        if axis.kind.field is not None:
            req = replace(req, **{axis.kind.field: value})
        elif name == "prompt-sr":
            search = axis.values[0]
            req = replace(req, prompt=req.prompt.replace(search, value), negative=req.negative.replace(search, value))
        elif name == "adapter":
            extra += _entries(None if str(value).strip().lower() in NONE_VALUES else value, dirs)
        else:
            weights.append((axis, value))
    stack = Stack([*entries, *extra])
    for axis, value in weights:
        try:
            stack.set_weights({i: value for i in _targets(axis, stack.entries)})
        except AdapterhubError as err:
            raise AdapterhubError(f"{axis.where(value)}: {err}") from None
    return replace(req, stack=stack, images=1, batch=1)


def own_schedule(req: Request) -> tuple[Request, str | None]:
    """A plot's cell with a timestep sampler (DDIM, PLMS, UniPC, LCM: no schedule type) runs on that sampler's
    own schedule, as the webui's X/Y/Z plot runs it, whatever the schedule axis or ``--schedule`` says: the
    request with ``Automatic``, and the schedule it did not use (None when nothing changed). An unknown name is
    left for :func:`check_request` to report."""
    from adapterhub.sample.samplers import resolve_sampler

    try:
        sampler, _ = resolve_sampler(req.sampler)
        _, key = resolve_sampler("Euler", req.schedule)  # the schedule's own validity, for a sampler that takes any
    except AdapterhubError:
        return req, None
    if not sampler.timestep_based or key == "automatic":
        return req, None
    return replace(req, schedule="Automatic"), str(req.schedule)


def _own_schedule_note(cells: list) -> str | None:
    """One line naming the timestep samplers that ran their own schedule and the schedules they did not use."""
    skipped: dict[str, dict[str, None]] = {}
    for cell in cells:
        if cell.skipped_schedule is not None:
            skipped.setdefault(cell.request.sampler, {})[cell.skipped_schedule] = None
    if not skipped:
        return None
    return (f"{', '.join(skipped)} ran on their own schedule (timestep samplers take no schedule type, as in the "
            f"webui's X/Y/Z plot): {', '.join(dict.fromkeys(s for v in skipped.values() for s in v))} not applied "
            "to them")


def _stack_key(req: Request) -> tuple:
    from adapterhub.stack import TAG

    entries = tuple((str(e.path or e.source), e.te, e.unet, repr(e.lbw), tuple(sorted((k, id(v)) for k, v in
                                                                                       e.options.items())))
                    for e in req.stack.entries)
    return entries, tuple(m.group(0) for m in TAG.finditer(req.prompt))


def plan_plot(request: Request, x, y=None, z=None, adapter_dirs: Sequence[str | Path] = (),
              legend: bool = True) -> Plot:
    """Check the axes against ``request`` and make one request per cell (no model needed).

    ``x``/``y``/``z``: ``"NAME=VALUES"`` strings, :class:`Axis` objects or ``(name, values)`` pairs."""
    axes = tuple(None if a is None else parse_axis(*a, option=o) if isinstance(a, tuple) else parse_axis(a, option=o)
                 for a, o in zip((x, y, z), ("x", "y", "z")))
    return _plan(request, axes, adapter_dirs, legend)


def _plan(request: Request, axes: tuple, dirs, legend: bool) -> Plot:
    if axes[0] is None:
        raise AdapterhubError("an X/Y/Z plot needs an x axis")
    if (request.images or 1) > 1 or request.batch > 1:
        raise AdapterhubError("an X/Y/Z plot makes one image per cell: leave images and batch at 1")
    check_request(own_schedule(request)[0], dirs)
    seed = int(request.seed) if request.seed is not None and int(request.seed) >= 0 else random.randrange(MAX_SEED)
    base = replace(request, seed=seed)
    entries = _entries(base.stack, dirs)
    base = replace(base, stack=None)
    for axis in axes:
        if axis is None:
            continue
        if axis.kind.name == "seed":
            axis.values = [random.randrange(MAX_SEED) if v == -1 else v for v in axis.values]
        for value in dict.fromkeys(axis.values):
            _check_value(axis, value, base, entries, dirs)
    lists = [list(enumerate(a.values)) if a is not None else [(0, None)] for a in axes]
    cells = []
    for iz, vz in lists[2]:
        for iy, vy in lists[1]:
            for ix, vx in lists[0]:
                pairs = [(a, v) for a, v in zip(axes, (vx, vy, vz)) if a is not None]
                req, skipped = own_schedule(_cell_request(base, entries, pairs, dirs))
                labels = tuple(a.label(v) if a is not None else "" for a, v in zip(axes, (vx, vy, vz)))
                try:
                    check_request(replace(req, stack=None), dirs)
                except AdapterhubError as err:
                    cell = ", ".join(f"{a.name}={v!r}" for a, v in pairs)
                    raise AdapterhubError(f"cell {cell}: {err}") from None
                values = {a.name: v for a, v in pairs}
                cells.append(Cell((ix, iy, iz), values, labels, req, _stack_key(req), skipped_schedule=skipped))
    first: dict[tuple, int] = {}
    for i, cell in enumerate(cells):
        first.setdefault(cell.stack_key, i)
    order = sorted(range(len(cells)), key=lambda i: (first[cells[i].stack_key], i))
    note = _own_schedule_note(cells)
    return Plot(replace(request, seed=seed), axes, cells, order, legend, notes=[note] if note else [])


# ---------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------
def run_plot(generator, plot: Plot, progress: Callable[[int, int], None] | None = None) -> Plot:
    """Generate every cell of ``plot`` (grouped by stack), then draw the grid and its infotext."""
    import time

    from adapterhub.sample.grid import xyz_grid

    start = time.perf_counter()
    warnings: dict[str, None] = {}
    for done, i in enumerate(plot.order, 1):
        cell = plot.cells[i]
        result = generator.generate(cell.request, output="latent")
        cell.latents = result.latents
        cell.image = generator.decode(result.latents)[0]
        cell.seed = result.seeds[0]
        units = infotext.control_units(generator.stack)
        cell.infotext = infotext.insert(result.infotexts[0], units) if units else result.infotexts[0]
        warnings.update(dict.fromkeys(result.warnings))
        if progress is not None:
            progress(done, len(plot.order))
    nx, ny, nz = plot.shape
    x_labels = [plot.cell(ix).labels[0] for ix in range(nx)]
    y_labels = [plot.cell(0, iy).labels[1] for iy in range(ny)]
    z_labels = [plot.cell(0, 0, iz).labels[2] for iz in range(nz)]
    sheet = xyz_grid([c.image for c in plot.cells], nx, ny, nz, x_labels, y_labels, z_labels, legend=plot.legend)
    plot.grid, plot.boxes = sheet.image, sheet.boxes
    plot.infotext = infotext.insert(plot.cells[0].infotext, plot.script_params())
    plot.warnings = list(dict.fromkeys([*plot.notes, *warnings]))
    plot.seconds = time.perf_counter() - start
    return plot


def xy_plot(generator, request: Request, x, y=None, z=None, progress: Callable[[int, int], None] | None = None,
            legend: bool = True) -> Plot:
    """Plan and run an X/Y/Z plot on ``generator`` (see the module docstring)."""
    return run_plot(generator, plan_plot(request, x, y, z, generator.adapter_dirs, legend), progress)
