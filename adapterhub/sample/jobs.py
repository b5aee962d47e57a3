"""A sampling run planned and carried out: what ``adapterhub sample`` does between its options and its output.

    options = SampleOptions(base="tiny-sd1", out="out", prompt="a castle", images=2)
    plan = plan_run(options)           # every check that needs no model: bad input fails here
    run = SampleRun(plan)
    try:
        run.load()                      # the base (and for one request its stack: a misfit fails here)
        summary, warnings = run.generate(advance=lambda n: None)
    finally:
        run.close()

:func:`plan_run` turns the options (a prompt, ``--prompts`` file, X/Y/Z axes, seeds, batch, ``--from-png``) into
a :class:`Plan`: the base :class:`Request`, and with a prompt file or an axis the list of jobs and their plots,
each checked before a model loads. :class:`SampleRun` generates this process's share (one model, stacks
switched in place; split across processes under ``accelerate launch``) and writes the files
(:mod:`adapterhub.sample.writing`); the summary is plain data. Nothing here prints.
"""
from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from adapterhub.errors import AdapterhubError
from adapterhub.sample import writing
from adapterhub.sample.request import Request, check_request, sampling_steps


TRANSFORMER_FAMILIES = ("flux", "sd3")  # the families whose adapters the early fit check looks at
INPAINTING_FILLS = ("fill", "original", "latent-noise", "latent-nothing")  # --inpainting-fill, the webui's 0-3
INPAINT_OPTIONS = ("mask_blur", "inpainting_fill", "inpaint_full_res", "inpaint_padding", "invert_mask")


@dataclass
class SampleOptions:
    """The options of ``adapterhub sample``, by their option names (see its ``--help``); ``given``: the names the
    user set (an image's infotext, ``--from-png``, does not override those)."""

    base: str
    out: str
    prompt: str | None = None
    negative: str = ""
    stacks: tuple[str, ...] = ()
    controls: tuple[str, ...] = ()
    t2i_adapters: tuple[str, ...] = ()
    adapter_dirs: tuple[str, ...] = ()
    steps: int = 20
    sampler: str = "DPM++ 2M"
    schedule: str = "Automatic"
    cfg: float = 7.0
    distilled_cfg: float | None = None
    seed: int = -1
    size: str | None = None
    batch: int = 1
    images: int | None = None
    clip_skip: int = 1
    emphasis: str = "Original"
    init_image: str | None = None
    control_image: str | None = None  # a FLUX.1 control model's image (adapterhub.sample.flow_control)
    denoise: float | None = None
    mask: str | None = None
    mask_blur: int = 4
    inpainting_fill: str = "original"
    inpaint_full_res: bool = False
    inpaint_padding: int = 32
    invert_mask: bool = False
    noise_multiplier: float = 1.0
    hires: float | None = None
    hires_steps: int = 0
    hires_denoise: float = 0.7
    hires_upscaler: str = "Latent"
    backend: str = "eager"
    dtype: str | None = None
    device: str | None = None
    from_png: str | None = None
    rng: str | None = None
    ensd: int = 0
    format: str = "png"
    grid: bool = False
    prompts_file: str | None = None
    x_axis: str | None = None
    y_axis: str | None = None
    z_axis: str | None = None
    no_cells: bool = False
    given: frozenset[str] = frozenset()
    source_model: tuple | None = None  # --from-png: the image's (Model, Model hash), compared after sampling


@dataclass
class Plan:
    """A checked run: the options (``--from-png`` applied), the base request, the adapter folders, the notes to
    say before sampling (``note: `` marks a note, the rest are warnings); when :attr:`many`, the jobs (one per
    prompt of the file, else the request alone) and ``plots`` keyed by job index when there are axes."""

    options: SampleOptions
    request: Request
    dirs: list[Path]
    notes: list[str]
    jobs: list = field(default_factory=list)
    plots: dict[int, Any] = field(default_factory=dict)

    @property
    def many(self) -> bool:
        """A prompt file or a plot: the summary lists jobs (and cells)."""
        o = self.options
        return bool(o.prompts_file or o.x_axis or o.y_axis or o.z_axis)


def plan_run(options: SampleOptions) -> Plan:
    """Everything that needs no model, in the order the command line reads it: ``--from-png``, the request,
    the control images, the RNG for the device, then every job and plot (one-line :class:`AdapterhubError`)."""
    notes: list[str] = []
    options = replace(options, format=image_format(options.format))
    chosen = set(options.given)  # the options the user or the image set: a family's defaults leave them alone
    if options.from_png:
        from adapterhub.sample.rerun import from_png

        before = _as_dict(options)
        values, notes = from_png(options.from_png, dict(before), set(options.given))
        options = SampleOptions(**values)
        chosen |= {name for name, value in values.items() if before.get(name) != value}
    if options.prompt is None and not options.prompts_file:
        raise AdapterhubError("give --prompt (or --prompts FILE, or --from-png IMAGE)")
    dirs = [Path(d) for d in options.adapter_dirs]
    request = _request(options, dirs)
    if options.denoise is not None and not options.init_image:
        raise AdapterhubError("--denoise is the img2img strength: give --init-image (the hires pass takes "
                              "--hires-denoise)")
    if not options.mask and set(INPAINT_OPTIONS) & set(options.given):
        raise AdapterhubError("--mask-blur and the other inpainting options need --mask (and --init-image)")
    check_request(request, dirs)  # bad input fails here: no model loaded, nothing written
    request = _family_request(options, request, chosen)
    _check_rng(request.rng, options.device)
    plan = Plan(options, request, dirs, notes)
    if options.control_image is not None:
        from adapterhub.sample.flow_control import control_request

        plan.request = control_request(request, options.base, options.control_image)
    else:
        from adapterhub.sample.flow_fill import fill_request, is_fill_base

        if is_fill_base(options.base):  # a FLUX.1 Fill model: an init image and a mask, its own checks
            plan.request = fill_request(request, options.base, options.denoise is not None)
    if plan.many:  # from the model's request: a control / Fill model's images go to every line and cell
        plan.jobs, plan.plots = _jobs(options, plan.request, dirs)
        _check_family_jobs(options, plan.jobs, plan.plots, plan.request)
    _check_fits(options.base, _all_requests(plan), dirs)
    return plan


def _all_requests(plan: Plan) -> list[Request]:
    """The base request, every job's and every plot cell's (an axis may change the prompt's tags or the stack)."""
    requests = [plan.request, *(job.request for job in plan.jobs)]
    return requests + [cell.request for p in plan.plots.values() for cell in p.cells]


def _check_fits(base: str, requests: list[Request], dirs: list[Path]) -> None:
    """Before the base loads (minutes for a real Flux): the adapters of the stacks and ``<lora:>`` tags against
    the base's family and width (:func:`adapterhub.merge.check_fits_base`), each file described from its header
    only. Checked where a transformer family is on either side; between Stable Diffusion bases and adapters the
    loading decides, as it always has. Control entries (``--control`` / ``--adapter``) are not weight files."""
    from adapterhub.api import describe
    from adapterhub.merge import check_fits_base
    from adapterhub.sample.flow import flow_family
    from adapterhub.stack import Stack

    paths: dict[Path, None] = {}
    loaded = []  # a stack built in Python may hold loaded adapters
    for req in requests:
        stack = req.stack if isinstance(req.stack, Stack) else Stack.parse(req.stack or "", dirs=dirs)
        for entry in [*stack.entries, *Stack.from_prompt(req.prompt, dirs=dirs)[0].entries]:
            if entry.adapter is not None:
                loaded.append(entry.adapter)
            elif not entry.options:
                paths.setdefault(entry.resolve(dirs), None)
    adapters = loaded + [describe(path)[0] for path in paths]
    if flow_family(base) is not None or any(a.family in TRANSFORMER_FAMILIES for a in adapters):
        check_fits_base(base, adapters)


def _family_request(options: SampleOptions, request: Request, chosen: set[str]) -> Request:
    """For a Flux or SD3 base (told from its files, nothing built) the request with the family's defaults for the
    options not ``chosen`` (by the command line or ``--from-png``'s image), checked against what the family can do
    (:mod:`adapterhub.sample.flow`); other bases refuse Flux's distilled guidance."""
    from adapterhub.sample.flow import check_flow_request, flow_family, flow_request

    family = flow_family(options.base)
    if family is None:
        if options.distilled_cfg is not None:
            raise AdapterhubError(f"--distilled-cfg is Flux-dev's guidance: the base {options.base} is not a Flux "
                                  "model (use --cfg)")
        return request
    request = replace(flow_request(request, family, chosen), distilled_cfg=options.distilled_cfg)
    check_flow_request(request, family)
    return request


def _check_family_jobs(options: SampleOptions, jobs: list, plots: dict, model_request: Request) -> None:
    """A prompt file's lines and a plot's cells on a Flux or SD3 base: each request (the family's defaults, then the
    line's options and the cell's axis values) checked against what the family can do; an error names the file and
    line, or the cell."""
    from adapterhub.sample.flow import check_flow_request, flow_family

    family = flow_family(options.base)
    if family is None:
        return
    model_check = _model_check(options, model_request)
    for job in jobs:
        where = f"{options.prompts_file}:{job.line}: " if options.prompts_file else ""
        cells = plots[job.index].cells if job.index in plots else []
        for request, label in [(job.request, ""), *((c.request, ", ".join(x for x in c.labels if x)) for c in cells)]:
            try:
                check_flow_request(request, family)
                if model_check is not None:
                    model_check(request)
            except AdapterhubError as err:
                raise AdapterhubError(f"{where}{f'plot cell {label}: ' if label else ''}{err}") from None


def _model_check(options: SampleOptions, model_request: Request) -> Callable[[Request], None] | None:
    """What a FLUX.1 control model (``--control-image``) or Fill base (its run's ``model_request`` is a Fill one)
    cannot run, as one request's check (the generator's own, so a prompt file's line or a plot's cell is refused
    before a model loads); None for others."""
    if options.control_image is not None:
        from adapterhub.sample.flow_control import check_control_request

        return check_control_request
    from adapterhub.sample.flow_fill import FlowFillRequest, check_fill_request

    if isinstance(model_request, FlowFillRequest):
        return lambda request: check_fill_request(request, options.base)
    return None


def _as_dict(options: SampleOptions) -> dict:
    return {f.name: getattr(options, f.name) for f in fields(options)}


def _request(options: SampleOptions, dirs: list[Path]) -> Request:
    width, height = parse_size(options.size)
    stack: Any = ", ".join(options.stacks)
    controls = control_entries(options.controls, "--control") + control_entries(options.t2i_adapters, "--adapter")
    if controls:
        from adapterhub.stack import Stack

        stack = Stack([*(Stack.parse(stack, dirs=dirs).entries if stack.strip() else []), *controls])
    return Request(options.prompt or "", negative=options.negative or "", stack=stack, seed=options.seed,
                   width=width, height=height, steps=options.steps, sampler=options.sampler,
                   schedule=options.schedule, cfg=options.cfg, batch=options.batch, images=options.images,
                   clip_skip=options.clip_skip, emphasis=options.emphasis, init_image=options.init_image,
                   denoising_strength=0.75 if options.denoise is None else options.denoise, hr_scale=options.hires,
                   hr_steps=options.hires_steps, hr_denoise=options.hires_denoise,
                   hr_upscaler=options.hires_upscaler, rng=options.rng or "CPU", ensd=options.ensd,
                   initial_noise_multiplier=options.noise_multiplier, **_inpaint_fields(options))


def _inpaint_fields(options: SampleOptions) -> dict[str, Any]:
    """The request's inpainting fields from ``--mask`` and its options (``--inpainting-fill`` by name or number)."""
    fill = str(options.inpainting_fill).strip().lower().replace(" ", "-")
    fill = int(fill) if fill.isdigit() else INPAINTING_FILLS.index(fill) if fill in INPAINTING_FILLS else -1
    return {"mask": options.mask, "mask_blur": options.mask_blur, "inpainting_fill": fill,
            "inpaint_full_res": options.inpaint_full_res, "inpaint_full_res_padding": options.inpaint_padding,
            "inpainting_mask_invert": options.invert_mask}


def parse_size(text: str | None) -> tuple[int | None, int | None]:
    """``WIDTHxHEIGHT`` as two numbers (None, None when not given), or one line showing the form."""
    if text is None:
        return None, None
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m:
        raise AdapterhubError(f"size {text!r}: write it as WIDTHxHEIGHT, e.g. 512x768")
    return int(m.group(1)), int(m.group(2))


def image_format(name: str) -> str:
    """``--format``: png, jpg (jpeg) or webp, or one line listing them."""
    from adapterhub.sample.infotext import FORMATS

    fmt = {"jpeg": "jpg"}.get(str(name).strip().lower(), str(name).strip().lower())
    if fmt not in FORMATS:
        raise AdapterhubError(f"--format {name!r}: choose one of {', '.join(FORMATS)}")
    return fmt


def control_entries(specs: tuple[str, ...], kind: str) -> list:
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


def _check_rng(source: str, device: str | None) -> None:
    """RNG GPU needs CUDA: said before a model loads (the generator checks again for a given pipeline)."""
    import torch

    from adapterhub.sample.rng import check_device

    check_device(source, device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _plot_axes(options: SampleOptions) -> list:
    from adapterhub.sample.xy import parse_axis

    specs = {"x": options.x_axis, "y": options.y_axis, "z": options.z_axis}
    axes = [parse_axis(spec, option=f"--{k}") if spec else None for k, spec in specs.items()]
    if axes[0] is None and any(axes):
        raise AdapterhubError("--y and --z need --x (the first axis of the plot)")
    return axes


def _jobs(options: SampleOptions, request: Request, dirs: list[Path]) -> tuple[list, dict]:
    """Every job (and its plot) checked, in every process, before a model loads."""
    from adapterhub.sample import promptfile
    from adapterhub.sample.xy import plan_plot

    axes = _plot_axes(options)
    source = options.prompts_file
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



class SampleRun:
    """A plan carried out in this process: :meth:`load` the base, :meth:`generate` this process's jobs and write
    their files, :meth:`close`. With a prompt file under ``accelerate launch`` (``WORLD_SIZE`` > 1) the process
    takes its share of the jobs; file numbers come from each job's position in the whole run, the same in every
    process."""

    def __init__(self, plan: Plan):
        from adapterhub.sample import promptfile

        self.plan, self.generator, self.seconds = plan, None, 0.0
        self.rank, self.world, _ = promptfile.process() if plan.many else (0, 1, 0)
        self.mine = promptfile.shard(plan.jobs, self.rank, self.world)
        self._state, self._start, self._first = None, 0.0, 0

    @property
    def label(self) -> str:
        """What :attr:`total` counts: ``sampling`` steps of one request, else ``cells`` or ``prompts``."""
        return "cells" if self.plan.plots else "prompts" if self.plan.many else "sampling"

    @property
    def total(self) -> int:
        plan = self.plan
        if not plan.many:
            return sampling_steps(plan.request) * (plan.request.images or plan.request.batch)
        return sum(len(plan.plots[j.index].cells) if j.index in plan.plots else j.image_count for j in self.mine)

    def load(self) -> None:
        """The base, once; for one request also its stack (an adapter that does not fit the base fails here,
        before any progress). Several processes agree on the first file number before anyone writes."""
        options = self.plan.options
        device = options.device
        if self.plan.many:
            self._state = _distributed(self.world)
            device = device or (str(self._state.device) if self._state is not None else None)
            self._first = writing.next_index(Path(options.out))
            if self._state is not None:
                self._state.wait_for_everyone()  # every process has numbered from the same folder before any writes
        self._start = time.perf_counter()
        from adapterhub.sample.generator import Generator

        # a FLUX.1 Fill model gets its own generator from Generator itself (told from its files)
        if options.control_image is not None:  # a FLUX.1 control model: its own generator (one line if it is none)
            from adapterhub.sample.flow_control import FlowControlGenerator as Generator
        self.generator = Generator(options.base, backend=options.backend, dtype=options.dtype, device=device,
                                   adapter_dirs=self.plan.dirs)
        if not self.plan.many:
            self.generator.apply_stack(self.plan.request)

    def generate(self, advance: Callable[[int], None] | None = None) -> tuple[dict, list[str]]:
        """Generate and write; ``advance(n)`` as :attr:`total` is worked off. Returns the summary (plain data, as
        ``--json`` prints it) and the warnings not said before sampling."""
        advance = advance or (lambda n=1: None)
        return self._many(advance) if self.plan.many else self._one(advance)

    def close(self) -> None:
        if self._state is not None:
            self._state.destroy_process_group()
            self._state = None

    def _one(self, advance: Callable[[int], None]) -> tuple[dict, list[str]]:
        plan, options = self.plan, self.plan.options
        done = {"steps": 0}

        def progress(steps: int, _total: int) -> None:
            advance(steps - done["steps"])
            done["steps"] = steps

        result = self.generator.generate(plan.request, progress=progress)
        out = Path(options.out)
        out.mkdir(parents=True, exist_ok=True)
        job = writing.save_images(result, self.generator.stack, out, writing.next_index(out), options.grid,
                                  options.format)
        summary = {"images": job["images"], "seconds": round(time.perf_counter() - self._start, 2),
                   "backend": options.backend, "parameters": job["parameters"],
                   "warnings": [n for n in plan.notes if not n.startswith("note: ")] + result.warnings}
        if "grid" in job:
            summary["grid"] = job["grid"]
        other = None
        if options.from_png and options.source_model and job["parameters"]:
            from adapterhub.sample.rerun import other_model

            other = other_model(options.from_png, options.source_model, job["parameters"])
        summary["warnings"] += [other] if other else []
        return summary, [*result.warnings, *([other] if other else [])]  # --from-png's own were said before

    def _many(self, advance: Callable[[int], None]) -> tuple[dict, list[str]]:
        from adapterhub.sample import promptfile
        from adapterhub.sample.xy import run_plot

        plan, options, out = self.plan, self.plan.options, Path(self.plan.options.out)
        firsts = promptfile.first_indices(
            plan.jobs, lambda j: (1 if options.no_cells else len(plan.plots[j.index].cells)) if j.index in plan.plots
            else j.image_count)
        done, warnings = [], {}
        for job in self.mine:
            index = self._first + firsts[job.index]
            if job.index in plan.plots:
                plot = run_plot(self.generator, plan.plots[job.index], progress=lambda _d, _t: advance(1))
                entry, found = writing.save_plot(plot, out, index, not options.no_cells, options.format), plot.warnings
            else:
                result = self.generator.generate(job.request)
                advance(job.image_count)
                entry = writing.save_images(result, self.generator.stack, out, index, options.grid, options.format)
                found = result.warnings
            warnings.update(dict.fromkeys(found))
            done.append({"line": job.line, "prompt": job.request.prompt, **entry} if options.prompts_file else entry)
        extra = {"seconds": round(time.perf_counter() - self._start, 2), "backend": options.backend,
                 "warnings": list(warnings)}
        summary = {"jobs": done, "rank": self.rank, "world": self.world, **extra} if options.prompts_file \
            else {**done[0], **extra}
        return summary, list(warnings)


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
