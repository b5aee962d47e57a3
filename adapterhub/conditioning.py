"""What ControlNet and T2I-Adapter share at run time: a hook on the UNet call, step gating, batching.

A control attaches as one forward pre-hook on the UNet (``register_forward_pre_hook(with_kwargs=True)``).
On every UNet call the hook reads ``sample``, ``timestep``, ``encoder_hidden_states`` and
``added_cond_kwargs``, computes its residuals and adds them to the call's keyword arguments
(``down_block_additional_residuals`` / ``mid_block_additional_residual`` for a ControlNet,
``down_intrablock_additional_residuals`` for a T2I-Adapter). Residuals already there (passed by the
pipeline, or by a control attached earlier) are summed with ours, earlier first: several controls add
up exactly like diffusers' ``MultiControlNetModel``. Removing the hook puts the UNet back exactly;
nothing else is changed.

Guidance start/end gate a control per step with the diffusers pipelines' rule
``keep = 1 - [i/T < start or (i+1)/T > end]``. The step ``i`` of ``T`` comes from the pipeline's
scheduler (the one a sampling loop declares with :func:`running`, else the pipeline's): its ``step_index``
where it keeps one (Euler, DPM-Solver...), else the position of the current timestep in
``scheduler.timesteps``; an img2img ``begin_index`` is subtracted. Classifier-free
guidance batches both halves in one UNet call, so one call is one step whatever the batch.
"""
from __future__ import annotations

import contextlib
import contextvars
import inspect
import re
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from adapterhub.errors import AdapterError
from adapterhub.types import Handle

# conditioning images we accept: what diffusers' image processors take
IMAGE_HELP = "a PIL image, a numpy array or a torch tensor (or a list of them, one per prompt)"


@dataclass
class Gate:
    """The fraction of the schedule a control is active in (diffusers ``control_guidance_start/end``)."""

    start: float = 0.0
    end: float = 1.0

    def keep(self, position: tuple[int, int] | None) -> float:
        """1.0 or 0.0 for step ``position = (i, T)``; a call outside any known schedule keeps the control."""
        if position is None:
            return 1.0
        i, total = position
        return 1.0 - float(i / total < self.start or (i + 1) / total > self.end)


def gate_from(path, start, end) -> Gate:
    """Validated guidance start/end (diffusers refuses start >= end and values outside [0, 1])."""
    try:
        start, end = float(start), float(end)
    except (TypeError, ValueError):
        raise AdapterError(path, f"guidance start/end must be numbers, got {start!r} / {end!r}") from None
    if not (0.0 <= start < end <= 1.0):
        raise AdapterError(path, f"guidance start {start:g} and end {end:g} must satisfy 0 <= start < end <= 1")
    return Gate(start, end)


def weight_from(path, weight) -> float:
    try:
        return float(weight)
    except (TypeError, ValueError):
        raise AdapterError(path, f"weight must be a number, got {weight!r}") from None


_RUNNING: contextvars.ContextVar = contextvars.ContextVar("adapterhub_running_scheduler", default=None)


@contextlib.contextmanager
def running(scheduler) -> Iterator[None]:
    """Within the block, controls gate by ``scheduler``'s steps: a sampling loop that keeps its scheduler apart
    from the pipeline's (adapterhub's generator) says which one runs; a diffusers pipeline runs its own."""
    token = _RUNNING.set(scheduler)
    try:
        yield
    finally:
        _RUNNING.reset(token)


def step_position(scheduler, timestep) -> tuple[int, int] | None:
    """``(i, T)``: which step of the scheduler's current schedule ``timestep`` is, or None if unknown."""
    own = getattr(scheduler, "step_position", None)
    if callable(own):  # a scheduler whose calls are not laid out ahead (adapterhub.sample.ksamplers)
        return own(timestep)
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None or len(timesteps) == 0:
        return None
    begin = getattr(scheduler, "begin_index", None) or 0
    index = getattr(scheduler, "step_index", None)
    if index is None:
        t = timestep.flatten()[0].item() if isinstance(timestep, torch.Tensor) else float(timestep)
        found = (torch.as_tensor(timesteps).detach().cpu().to(torch.float64) == t).nonzero()
        if len(found) == 0:
            return None
        index = int(found[0, 0])
    total = len(timesteps) - begin
    return (index - begin, total) if 0 <= index - begin < total else None


def classifier_free_guidance(pipe) -> bool:
    """Whether the pipeline's current call batches an unconditional half first (diffusers' property)."""
    try:
        return bool(pipe.do_classifier_free_guidance)
    except (AttributeError, TypeError):
        return False


def repeat_for_batch(cond: torch.Tensor, batch: int, cfg: bool) -> torch.Tensor:
    """Expand a conditioning batch to the UNet batch as diffusers' ``prepare_image`` does: one image
    serves every sample; ``n`` images serve ``n`` prompts (each repeated per image of its prompt); both
    classifier-free-guidance halves get the same images."""
    n = cond.shape[0]  # always a new, contiguous tensor, as the pipeline's: kernels round by memory layout
    if n == 1:
        return cond.repeat_interleave(batch, dim=0)
    halves = 2 if cfg else 1
    per_half = batch // halves
    if batch % halves or per_half % n:
        raise ValueError(f"{n} conditioning images do not match a batch of {per_half} samples")
    cond = cond.repeat_interleave(per_half // n, dim=0)
    return torch.cat([cond] * halves) if cfg else cond


def add_residuals(call: dict, name: str, residuals) -> None:
    """Sum ``residuals`` into the call's ``name`` argument (earlier residuals first), or set it."""
    previous = call.get(name)
    if previous is None:
        call[name] = list(residuals) if isinstance(residuals, (list, tuple)) else residuals
    elif isinstance(residuals, (list, tuple)):
        if len(previous) != len(residuals):
            raise ValueError(f"{name}: {len(residuals)} residuals cannot be added to {len(previous)}")
        call[name] = [a + b for a, b in zip(previous, residuals)]
    else:
        call[name] = previous + residuals


def check_state(path, model, shapes: dict, source: dict[str, str], what: str) -> None:
    """Every parameter of ``model`` (built on the meta device) present in ``shapes`` with its shape,
    and no tensor left over: all or nothing. ``source`` names each key as the file spells it."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key, shape in expected.items():
        if key not in shapes:
            raise AdapterError(path, f"missing tensor {key} for this {what} configuration", source.get(key))
        if tuple(shapes[key]) != shape:
            raise AdapterError(path, f"tensor {key} has shape {list(shapes[key])}, the configuration needs "
                                     f"{list(shape)}", source.get(key, key))
    extra = [k for k in shapes if k not in expected]
    if extra:
        raise AdapterError(path, f"{len(extra)} tensor(s) a {what} does not have", source.get(extra[0], extra[0]))


def on_device(model: torch.nn.Module, like: torch.nn.Module) -> torch.nn.Module:
    """``model`` on ``like``'s device and dtype: the same object where it already is, else a moved copy
    (so one loaded adapter can serve pipelines on different devices)."""
    import copy

    param = next(like.parameters())
    mine = next(model.parameters())
    if mine.device == param.device and mine.dtype == param.dtype:
        return model
    return copy.deepcopy(model).to(device=param.device, dtype=param.dtype)


class UNetControl:
    """Base of an attached control: a callable forward pre-hook that adds residuals to a UNet call.

    Subclasses implement :meth:`residuals` (``call`` is the UNet call's arguments by name; ``scale`` the
    weight times the gate, never 0) and add to ``call`` in place.
    """

    def __init__(self, pipe, unet, weight: float, gate: Gate):
        try:
            self.pipe_ref = weakref.ref(pipe)
        except TypeError:  # a dict of modules
            self.pipe_ref = lambda: pipe
        self.weight, self.gate = float(weight), gate
        # names for positional arguments from the class's forward (an offload hook may have wrapped the
        # instance's as ``(*args, **kwargs)``; ``torch.compile`` keeps the model as ``_orig_mod``)
        model = getattr(unet, "_orig_mod", unet)
        self.positional = list(inspect.signature(type(model).forward).parameters)[1:]
        self.vae_scale_factor = int(getattr(pipe, "vae_scale_factor", None) or 8)
        self.hook = unet.register_forward_pre_hook(self, with_kwargs=True)

    @property
    def pipe(self):
        return self.pipe_ref()

    def position(self, timestep) -> tuple[int, int] | None:
        scheduler = _RUNNING.get() or getattr(self.pipe, "scheduler", None)
        return step_position(scheduler, timestep) if scheduler is not None else None

    def cfg(self) -> bool:
        return classifier_free_guidance(self.pipe)

    def image_size(self, sample: torch.Tensor) -> tuple[int, int]:
        return sample.shape[-2] * self.vae_scale_factor, sample.shape[-1] * self.vae_scale_factor

    def __call__(self, unet, args, kwargs):
        if len(args) > len(self.positional):
            raise TypeError(f"{type(unet).__name__} called with {len(args)} positional arguments")
        call = {**dict(zip(self.positional, args)), **kwargs}
        scale = self.weight * self.gate.keep(self.position(call.get("timestep")))
        if scale == 0.0:  # diffusers adds zero residuals here; adding nothing gives the same sample
            return None
        with torch.no_grad():
            self.residuals(call, scale)
        return (), call

    def residuals(self, call: dict, scale: float) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def remove(self) -> None:
        self.hook.remove()


class ControlHandle(Handle):
    """What attaching a control returns: ``set_weight``, ``set_guidance`` and ``detach`` (removes the
    hook: the UNet is then exactly as before)."""

    def __init__(self, control: UNetControl, kind: str):
        self.control, self.kind, self.attached = control, kind, True

    def _live(self) -> UNetControl:
        if not self.attached:
            raise RuntimeError(f"this {self.kind} is detached")
        return self.control

    @property
    def weight(self) -> float:
        return self.control.weight

    def set_weight(self, weight: float) -> None:
        self._live().weight = float(weight)

    def set_guidance(self, start: float = 0.0, end: float = 1.0) -> None:
        self._live().gate = gate_from(None, start, end)

    def detach(self) -> None:
        if self.attached:
            self.control.remove()
            self.attached = False


CONTROL_KINDS = ("canny", "depth", "openpose", "pose", "lineart_anime", "lineart", "softedge", "scribble", "sketch",
                 "seg", "normalbae", "normal", "mlsd", "hed", "tile", "inpaint", "shuffle", "ip2p", "color", "style",
                 "qrcode", "brightness", "recolor", "blur")


def control_kind(metadata: dict, config: dict | None) -> str | None:
    """The control a file says it was trained for (``canny``, ``depth`` ...), from its metadata or config."""
    texts = [v for k, v in metadata.items() if isinstance(v, str) and ("control" in k.lower() or "title" in k.lower()
                                                                        or k.lower() in ("name", "variant"))]
    texts.append(str((config or {}).get("_name_or_path") or ""))
    for text in texts:
        words = re.split(r"[^a-z0-9_]+", text.lower())
        for kind in CONTROL_KINDS:
            if any(w == kind or w.endswith(f"_{kind}") or w.startswith(f"{kind}_") for w in words):
                return kind
    return None


def example_condition_image(model):
    """A deterministic conditioning image (rings and bars) the size of the model's default output."""
    import numpy as np
    from PIL import Image

    from adapterhub.weights import component

    unet = component(model, "unet")
    size = int(unet.config.sample_size) * 8 if unet is not None else 512
    yy, xx = np.mgrid[0:size, 0:size] / size
    rings = ((np.hypot(xx - 0.5, yy - 0.5) * 12) % 1 < 0.15)
    bars = (xx * 6 % 1 < 0.1) & (yy > 0.7)
    edges = ((rings | bars) * 255).astype("uint8")
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


# --------------------------------------------------------------------------------------------
# the control model itself: materialise from a state dict, write as a diffusers folder
# --------------------------------------------------------------------------------------------
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


def materialise(adapter, state: dict, model, label: str):
    """Load ``state`` strictly into ``model`` (built on the meta device), cache it on the adapter."""
    if any(t.device.type == "meta" for t in state.values()):
        raise AdapterError(adapter.path, "the file was opened shape-only; open it with tensors to attach it")
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise AdapterError(adapter.path, f"cannot load the {label}: {str(exc).splitlines()[0][:200]}") from None
    adapter.extra["model"] = model.eval().requires_grad_(False)
    return adapter.extra["model"]


def write_model_folder(model, path, metadata: dict[str, str] | None = None, dtype=None):
    """``model`` as a diffusers folder (``config.json`` + safetensors), or for a ``.safetensors`` path one
    file with the same tensor names; floating tensors cast to ``dtype`` when given; atomic either way."""
    from adapterhub.io import atomic_dir, save_safetensors

    state = {k: (v.detach().to(dtype) if dtype is not None and v.is_floating_point() else v.detach())
             for k, v in model.state_dict().items()}
    metadata = {"format": "pt", **(metadata or {})}
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        return save_safetensors(state, path, metadata)
    with atomic_dir(path) as tmp:
        model.save_config(tmp)
        save_safetensors(state, tmp / DIFFUSERS_WEIGHTS, metadata)
    return path


def save_model_folder(adapter, model, path, format: str | None, label: str):
    """``save`` for control types: a diffusers folder only, the adapter's metadata and base kept."""
    from adapterhub.base import METADATA_KEY

    if format not in (None, "diffusers"):
        raise AdapterError(path, f"a {label} is saved as a diffusers folder only (format 'diffusers'), not {format!r}")
    metadata = {k: v for k, v in adapter.metadata.items() if k != "format"}
    metadata.setdefault(METADATA_KEY, adapter.base)
    return write_model_folder(model, path, metadata)
