"""The request queue: one worker thread per generator (one device), so the pipeline is only ever touched by
one request at a time and the stack is switched in place between requests (the compiled backend does not
recompile: :mod:`adapterhub.sample.backend`).

``Worker.submit`` queues a :class:`~adapterhub.serve.plan.Plan` and returns a future, or raises
:class:`QueueFull` when ``max_queue`` requests already wait (the API answers 429). :class:`State` is what
``/sdapi/v1/progress`` reports (the webui's ``shared.state``), and how ``/sdapi/v1/interrupt`` stops the
running request: the sampler's step callback raises :class:`Interrupted`; the images of the iterations
already done are returned with the iteration in progress as far as it got (its last step's denoised estimate,
which the generator's step hook hands over, decoded), as the webui returns what it has.
``/sdapi/v1/skip`` drops only the iteration in progress (:class:`Skipped`); the next one runs. A plan whose
client hung up (``plan.cancelled``) stops the same way at its next step; a queued one is never started.
"""
from __future__ import annotations

import base64
import io
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

log = logging.getLogger("adapterhub.serve")


class QueueFull(Exception):
    """``max_queue`` requests are already waiting."""


class Interrupted(Exception):
    """Raised from the step callback when ``/interrupt`` was called: the iteration stops at this step."""


class Skipped(Exception):
    """Raised from the step callback when ``/skip`` was called: this iteration is dropped, the next one runs."""


def png_base64(image, text: str | None = None) -> str:
    """An image as base64 PNG with the infotext in its ``parameters`` chunk (the webui's API images)."""
    from adapterhub.sample import infotext

    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=infotext.pnginfo(text) if text else None)
    return base64.b64encode(out.getvalue()).decode("ascii")


class State:
    """The running job, as the webui's ``shared.state`` reports it; written by the worker, read by the API."""

    def __init__(self):
        self._lock = threading.Lock()
        self.job = ""
        self.job_count = 0
        self.job_no = 0
        self.job_timestamp = "0"
        self.sampling_step = 0
        self.sampling_steps = 0
        self.interrupted = False
        self.skipped = False
        self.time_start = 0.0
        self.textinfo: str | None = None
        self.current_image: str | None = None  # base64 PNG of the latest preview
        self.preview_wanted = False
        self.preview_step = -1

    def begin(self, job: str, job_count: int) -> None:
        with self._lock:
            self.job, self.job_count, self.job_no = job, job_count, 0
            self.job_timestamp = datetime.now().strftime("%Y%m%d%H%M%S")
            self.sampling_step = self.sampling_steps = 0
            self.interrupted = self.skipped = False
            self.time_start = time.time()
            self.current_image, self.preview_wanted, self.preview_step = None, False, -1

    def end(self) -> None:
        with self._lock:
            self.job, self.job_count, self.job_no = "", 0, 0
            self.sampling_step = self.sampling_steps = 0
            self.current_image, self.preview_wanted = None, False

    def interrupt(self) -> None:
        with self._lock:
            if self.job_count:  # only the running request, as the webui: queued ones still run
                self.interrupted = True

    def skip(self) -> None:
        with self._lock:
            if self.job_count:
                self.skipped = True

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            return {"skipped": self.skipped, "interrupted": self.interrupted, "stopping_generation": False,
                    "job": self.job, "job_count": self.job_count, "job_timestamp": self.job_timestamp,
                    "job_no": self.job_no, "sampling_step": self.sampling_step,
                    "sampling_steps": self.sampling_steps}

    def progress(self, want_image: bool) -> dict[str, Any]:
        """``/progress``: the webui's fraction (``0.01 + job_no / job_count`` plus the step fraction of the
        current job, at most 1), the seconds left at that rate (never below 0: the webui's formula goes
        negative on the last step, where its fraction passes 1), and the latest preview (a newer one is asked
        for)."""
        state = self.as_dict()
        if not state["job_count"]:
            return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None,
                    "textinfo": self.textinfo}
        done = 0.01 + state["job_no"] / state["job_count"]
        if state["sampling_steps"]:
            done += state["sampling_step"] / state["sampling_steps"] / state["job_count"]
        elapsed = time.time() - self.time_start
        eta = max(0.0, elapsed / done - elapsed)
        with self._lock:
            if want_image:
                self.preview_wanted = True
            image = self.current_image if want_image else None
        return {"progress": min(done, 1.0), "eta_relative": eta, "state": state, "current_image": image,
                "textinfo": self.textinfo}


class _PreviewRunner:
    """The generator's runner, remembering the latest latents it was called with (for the live preview), and the
    generator's step hook, remembering the last step's denoised estimate (the image so far of an interrupted
    request). Everything else goes to the runner it wraps: a compiled graph is called exactly as before."""

    def __init__(self, runner):
        self.runner = runner
        self.latest = None
        self.stepped = None  # the last step's latents (the step hook: a Flux / SD3 pipeline never calls the runner)
        self.denoised = None  # the last step's denoised estimate (the generator's step hook)

    def __call__(self, sample, timestep, *args, **kwargs):
        self.latest = sample
        return self.runner(sample, timestep, *args, **kwargs)

    def step(self, index: int, latents, denoised) -> None:
        """The generator's step hook."""
        self.stepped, self.denoised = latents, denoised

    def forget(self) -> None:
        self.latest, self.stepped, self.denoised = None, None, None

    @property
    def newest(self):
        """The latents to preview: the runner's latest input, else the last step's latents."""
        return self.latest if self.latest is not None else self.stepped

    def __getattr__(self, name):
        return getattr(self.runner, name)


@dataclass
class Outcome:
    """What a plan gave: per image its PIL image, infotext and seed; the notes; whether it was interrupted."""

    images: list = field(default_factory=list)
    infotexts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    interrupted: bool = False
    job_timestamp: str = ""


class Worker:
    """One thread running queued plans on one generator (see the module doc)."""

    def __init__(self, generator, max_queue: int = 16):
        self.generator = generator
        self.preview = _PreviewRunner(generator.runner)
        generator.runner = self.preview
        generator.step_hook = self.preview.step
        self.state = State()
        self.queue: queue.Queue = queue.Queue(maxsize=max(0, int(max_queue)) or 1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="adapterhub-serve-worker", daemon=True)
        self._thread.start()

    def submit(self, plan) -> Future:
        future: Future = Future()
        try:
            self.queue.put_nowait((plan, future))
        except queue.Full:
            raise QueueFull(f"{self.queue.maxsize} requests are already waiting") from None
        return future

    def close(self, timeout: float = 30.0) -> None:
        """Stop after the running request (interrupted), fail the queued ones, give the runner back."""
        self._stop.set()
        self.state.interrupt()
        self._thread.join(timeout)
        while True:
            try:
                _, future = self.queue.get_nowait()
            except queue.Empty:
                break
            future.set_exception(RuntimeError("the server is shutting down"))
        if self.generator.runner is self.preview:
            self.generator.runner = self.preview.runner
        if getattr(self.generator, "step_hook", None) == self.preview.step:
            self.generator.step_hook = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                plan, future = self.queue.get(timeout=0.2)
            except queue.Empty:
                continue
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(self.run(plan))
            except BaseException as exc:  # handed to the request that asked; the worker goes on
                future.set_exception(exc)

    def run(self, plan) -> Outcome:
        """Run a plan's iterations in turn; an interrupt ends the plan with the iteration in progress as far as it
        got (:meth:`_partial`)."""
        from adapterhub.sample.generator import sampling_steps

        state, gen = self.state, self.generator
        state.begin(plan.kind, len(plan.requests))
        out = Outcome(comments=list(plan.comments), job_timestamp=state.job_timestamp)
        try:
            for k, req in enumerate(plan.requests):
                if state.interrupted or plan.cancelled:
                    out.interrupted = True
                    break
                state.job_no, state.sampling_step, state.skipped = k, 0, False
                state.sampling_steps = sampling_steps(req)
                self.preview.forget()
                try:
                    result = gen.generate(req, progress=self._progress(req, plan))
                except Interrupted:
                    out.interrupted = True
                    self._partial(req, plan, out)
                    break
                except Skipped:
                    out.comments.append(f"skipped: iteration {k + 1} of {len(plan.requests)}")
                    continue
                out.images += result.images
                out.infotexts += [_with_controls(_with_prompts(text, req, plan), gen.stack, plan)
                                  for text in result.infotexts]
                out.seeds += result.seeds
                out.comments += [w for w in result.warnings if w not in out.comments]
        finally:
            self.preview.forget()
            state.end()
        if out.interrupted:
            out.comments.append("interrupted")
        return out

    def _partial(self, req, plan, out: Outcome) -> None:
        """The interrupted iteration's image so far (the webui returns it): the denoised estimate of its last step
        (the generator's step hook: the guided prediction of every sub-prompt), decoded, with the infotext the
        finished images would have had. Nothing when no step ran."""
        from adapterhub.sample import infotext
        from adapterhub.sample.samplers import resolve_sampler

        gen = self.generator
        latents = self.preview.denoised
        if latents is None:
            return
        images = gen.decode(latents.to(gen.device, gen.dtype))
        seeds = [req.seed + i for i in range(len(images))]
        if getattr(gen, "family", None) is not None:  # a Flux / SD3 generator: Forge's fields
            from adapterhub.sample.flow import flow_infotexts

            full = gen.request(req)
            texts = flow_infotexts(full, seeds, gen.parameters(full, gen.stack))
        else:
            sampler, schedule = resolve_sampler(req.sampler, req.schedule)
            params = gen.parameters(req, sampler, schedule, gen.stack)
            texts = [infotext.create(req.prompt, req.negative, {**params, "Seed": seed}) for seed in seeds]
        out.images += images
        out.infotexts += [_with_controls(_with_prompts(text, req, plan), gen.stack, plan) for text in texts]
        out.seeds += seeds

    def _progress(self, req, plan=None):
        state, preview, gen = self.state, self.preview, self.generator
        per_image = max(1, state.sampling_steps)

        def on_progress(done: int, total: int) -> None:
            state.sampling_step = min(per_image, done * per_image // max(1, total))
            if state.interrupted or getattr(plan, "cancelled", False):
                raise Interrupted()
            if state.skipped:
                raise Skipped()
            if state.preview_wanted and preview.newest is not None and state.preview_step != done:
                latents = preview.newest[:1]
                image = gen.decode(latents.to(gen.dtype))[0]
                state.current_image, state.preview_wanted, state.preview_step = png_base64(image), False, done

        return on_progress


def _with_controls(text: str, stack, plan) -> str:
    """The infotext with the stack's ``ControlNet N`` units, as ``adapterhub sample --control`` writes them, each
    naming the preprocessor its request unit ran (:func:`adapterhub.serve.controls.with_modules`)."""
    from adapterhub.sample import infotext
    from adapterhub.serve.controls import with_modules

    units = infotext.control_units(stack) if stack is not None else {}
    if not units:
        return text
    return infotext.insert(text, with_modules(units, getattr(plan, "control_fields", [])))


def _with_prompts(text: str, req, plan) -> str:
    """The infotext with the prompts as sent: tags of missing networks stay in it, as in the webui's."""
    from adapterhub.sample import infotext

    if req.prompt == plan.prompt and req.negative == plan.negative:
        return text
    _, rest = infotext.split(text)
    return infotext.create(plan.prompt, plan.negative, {}) + ("\n" + rest if rest else "")
