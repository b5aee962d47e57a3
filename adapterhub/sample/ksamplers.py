"""The webui's k-diffusion samplers that diffusers has no scheduler for: DPM fast, DPM adaptive, Restart,
DPM++ 2S a (diffusers' single-step solver is deterministic; the webui's is ancestral).

Each sampler is written as k-diffusion writes it, as a loop over noise levels, but as a Python generator
(a coroutine): it yields ``(x, sigma, done)`` where it needs the denoiser's prediction of x at ``sigma``
(``done``: the fraction of the run finished before this call), is sent back the denoised latents, and
returns its final x. :class:`KDiffusionScheduler` wraps one such coroutine in the interface the
diffusers-style loop of :meth:`Generator.denoise` uses (``set_timesteps``, ``timesteps``,
``init_noise_sigma``, ``scale_model_input``, ``step``, ``add_noise``, ``set_begin_index``, ``order``):

* ``timesteps`` is a lazy iterable, one UNet timestep per model call, for as long as the sampler asks
  (DPM adaptive decides its number of calls as it goes). The timestep of a sigma is k-diffusion's
  ``DiscreteSchedule.sigma_to_t``: log-sigma interpolated over the model's ``alphas_cumprod`` table,
  a float32 tensor like the timesteps of diffusers' Euler schedulers (a compiled UNet sees the same
  kind of input).
* ``scale_model_input`` divides by ``sqrt(sigma^2 + 1)``; ``step`` turns the UNet's output into the
  denoised latents as k-diffusion's ``CompVisDenoiser`` (epsilon: ``x - sigma eps``) or
  ``CompVisVDenoiser`` (v-prediction: ``c_skip x + c_out v``) does, by the base's ``prediction_type``,
  sends them in and returns the sampler's next x (or its final one). The sampler's state stays float32
  whatever the UNet's dtype.
* ``completed_steps``: how many of the run's steps the last ``step`` finished, so progress adds up to
  the steps asked for (DPM fast makes one call per step, Restart two per Heun step, DPM adaptive as many
  as its error control needs: its progress is the share of log-sigma covered).

The webui's settings (``sd_samplers_kdiffusion.KDiffusionSampler``, ``sd_samplers_extra.restart_sampler``):

* DPM fast and DPM adaptive run between the model's smallest and largest sigma (txt2img), ``n = steps``
  model calls for DPM fast, adaptive with k-diffusion's defaults (order 3, rtol 0.05, atol 0.0078,
  h_init 0.05, I-controller, accept safety 0.81), both with ``eta`` = the webui's "Eta for ancestral
  samplers" default 1.0 and ``s_noise`` 1; the ancestral noise is drawn per image from that image's
  generator (the webui's ``ImageRNG``). DPM adaptive's error norm is taken over the whole batch, as in
  the webui, so its step sizes (and so its images) depend on the batch.
* Restart: Heun steps (Euler into sigma 0) on the schedule (Karras by default); from 20 steps on the
  schedule is rebuilt as Karras over ``steps - restart_steps x restart_times`` steps and, once it
  reaches sigma ~0.1, jumps back to sigma ~2 (fresh noise) and descends again in ``restart_steps``
  Karras steps, ``restart_times`` times: (9, 1), or (steps // 4, 2) from 36 steps.
* img2img and the hires pass: the schedule starts at the noised point (``sigma_sched`` of
  ``sample_img2img``): DPM fast/adaptive run from its first sigma to its last nonzero one, DPM fast with
  one call per step run.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Generator, Iterator
from itertools import pairwise
from typing import Any

import torch

from adapterhub.errors import AdapterhubError

# what the sampler functions are called in the webui's table, and the schedules they accept here
FUNCTIONS = ("dpm_fast", "dpm_adaptive", "restart", "dpmpp_2s_ancestral")
ETA = 1.0  # the webui's opts.eta_ancestral default, passed to DPM fast, DPM adaptive and DPM++ 2S a
Call = tuple[torch.Tensor, torch.Tensor, float]  # (x, sigma, done)
Sampler = Generator[Call, torch.Tensor, torch.Tensor]
Noise = Callable[[torch.Tensor], torch.Tensor]


# -- schedules: adapterhub.sample.schedules (the webui's tables over the model's sigma table) ---------------
def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """k-diffusion's ``get_sigmas_karras`` (Restart's own descents use it between arbitrary ends)."""
    from adapterhub.sample.schedules import ModelSchedule, sigmas

    ends = ModelSchedule(torch.tensor([sigma_min, sigma_max]))  # only its ends would be read: given exactly
    return sigmas("karras", n, model=ends, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)


# -- the samplers (coroutines) --------------------------------------------------------------------
def _sigma(t: torch.Tensor) -> torch.Tensor:
    return t.neg().exp()


def _t(sigma: torch.Tensor) -> torch.Tensor:
    return sigma.log().neg()


def ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float) -> tuple[torch.Tensor, Any]:
    """``(sigma_down, sigma_up)`` of an ancestral step (k-diffusion's ``get_ancestral_step``)."""
    if not eta:
        return sigma_to, 0.0
    up = torch.minimum(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    return (sigma_to ** 2 - up ** 2) ** 0.5, up


def _eps(x: torch.Tensor, t: torch.Tensor, done: float):
    """The model's noise prediction at ``x``, log-SNR time ``t``: one call."""
    denoised = yield x, _sigma(t), done
    return (x - denoised) / _sigma(t)


class _DPMStep:
    """One DPM-Solver step from ``t`` to ``t_next`` (arXiv 2206.00927): first, second and third order
    updates sharing the model calls made at ``t`` and at the intermediate points."""

    def __init__(self, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, done: float):
        self.x, self.t, self.t_next, self.h, self.done = x, t, t_next, t_next - t, done

    def first(self, eps: torch.Tensor) -> torch.Tensor:
        return self.x - _sigma(self.t_next) * self.h.expm1() * eps

    def midpoint(self, eps: torch.Tensor, r1: float):
        """The model's prediction at ``t + r1 h``, from the first-order update to there."""
        s1 = self.t + r1 * self.h
        u1 = self.x - _sigma(s1) * (r1 * self.h).expm1() * eps
        return (yield from _eps(u1, s1, self.done))

    def second(self, eps: torch.Tensor, eps_r1: torch.Tensor, r1: float) -> torch.Tensor:
        return self.first(eps) - _sigma(self.t_next) / (2 * r1) * self.h.expm1() * (eps_r1 - eps)

    def third_point(self, eps: torch.Tensor, eps_r1: torch.Tensor, r1: float, r2: float):
        """The model's prediction at ``t + r2 h``, from the second-order update to there."""
        h, s2 = self.h, self.t + r2 * self.h
        u2 = self.x - _sigma(s2) * (r2 * h).expm1() * eps \
            - _sigma(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_r1 - eps)
        return (yield from _eps(u2, s2, self.done))

    def third(self, eps: torch.Tensor, eps_r2: torch.Tensor, r2: float) -> torch.Tensor:
        return self.first(eps) - _sigma(self.t_next) / r2 * (self.h.expm1() / self.h - 1) * (eps_r2 - eps)

    def run(self, eps: torch.Tensor, order: int):
        """The update of ``order`` (1, 2 with r1 = 1/2, 3 with r1 = 1/3, r2 = 2/3)."""
        if order == 1:
            return self.first(eps)
        if order == 2:
            return self.second(eps, (yield from self.midpoint(eps, 0.5)), 0.5)
        eps_r1 = yield from self.midpoint(eps, 1 / 3)
        return self.third(eps, (yield from self.third_point(eps, eps_r1, 1 / 3, 2 / 3)), 2 / 3)


def _ancestral_target(t: torch.Tensor, t_next: torch.Tensor, t_end: torch.Tensor, eta: float):
    """Where a step with ``eta`` lands (no further than ``t_end``) and the noise it adds back."""
    if not eta:
        return t_next, 0.0
    down, _ = ancestral_step(_sigma(t), _sigma(t_next), eta)
    target = torch.minimum(t_end, _t(down))
    return target, (_sigma(t_next) ** 2 - _sigma(target) ** 2) ** 0.5


def dpm_fast(x: torch.Tensor, sigma_min: float, sigma_max: float, n: int, noise: Noise, eta: float = ETA,
             s_noise: float = 1.0) -> Sampler:
    """DPM-Solver-Fast: ``n`` model calls as third-order steps (the last one or two of lower order),
    evenly spaced in log-SNR from ``sigma_max`` to ``sigma_min`` (k-diffusion ``sample_dpm_fast``)."""
    if sigma_min <= 0 or sigma_max <= 0:
        raise AdapterhubError("DPM fast: sigma_min and sigma_max must be more than 0")
    t_start, t_end = _t(torch.tensor(sigma_max)), _t(torch.tensor(sigma_min))
    m = n // 3 + 1
    ts = torch.linspace(t_start, t_end, m + 1, device=x.device)
    orders = [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]
    calls = 0
    for i, order in enumerate(orders):
        t, t_next = ts[i], ts[i + 1]
        target, up = _ancestral_target(t, t_next, t_end, eta)
        step = _DPMStep(x, t, target, calls / n)
        eps = yield from _eps(x, t, calls / n)
        x = yield from step.run(eps, order)
        x = x + up * s_noise * noise(x)
        calls += order
    return x


class _PIDController:
    """Step size control for the adaptive solver (k-diffusion's ``PIDStepSizeController``)."""

    def __init__(self, h: float, pcoeff: float, icoeff: float, dcoeff: float, order: float, accept_safety: float,
                 eps: float = 1e-8):
        self.h = h
        self.b = ((pcoeff + icoeff + dcoeff) / order, -(pcoeff + 2 * dcoeff) / order, dcoeff / order)
        self.accept_safety, self.eps = accept_safety, eps
        self.errs: list[float] = []

    def propose(self, error: torch.Tensor) -> bool:
        inv = 1 / (float(error) + self.eps)
        if not self.errs:
            self.errs = [inv, inv, inv]
        self.errs[0] = inv
        factor = self.errs[0] ** self.b[0] * self.errs[1] ** self.b[1] * self.errs[2] ** self.b[2]
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2], self.errs[1] = self.errs[1], self.errs[0]
        self.h *= factor
        return accept


def dpm_adaptive(x: torch.Tensor, sigma_min: float, sigma_max: float, noise: Noise, order: int = 3,
                 rtol: float = 0.05, atol: float = 0.0078, h_init: float = 0.05, pcoeff: float = 0.0,
                 icoeff: float = 1.0, dcoeff: float = 0.0, accept_safety: float = 0.81, eta: float = ETA,
                 s_noise: float = 1.0) -> Sampler:
    """DPM-Solver-23 (or -12) with adaptive step size: each step makes an order-2 and an order-3 update,
    their difference (over the whole batch) steers the step size (k-diffusion ``sample_dpm_adaptive``)."""
    if sigma_min <= 0 or sigma_max <= 0:
        raise AdapterhubError("DPM adaptive: sigma_min and sigma_max must be more than 0")
    if order not in (2, 3):
        raise AdapterhubError(f"DPM adaptive: order {order} must be 2 or 3")
    t_start, t_end = _t(torch.tensor(sigma_max)), _t(torch.tensor(sigma_min))
    atol_, rtol_ = torch.tensor(atol), torch.tensor(rtol)
    s, x_prev = t_start, x
    pid = _PIDController(abs(h_init), pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    while s < t_end - 1e-5:
        t = torch.minimum(t_end, s + pid.h)
        target, up = _ancestral_target(s, t, t_end, eta)
        done = float((s - t_start) / (t_end - t_start))
        step = _DPMStep(x, s, target, done)
        eps = yield from _eps(x, s, done)
        if order == 2:
            low, high = step.first(eps), step.second(eps, (yield from step.midpoint(eps, 0.5)), 0.5)
        else:
            eps_r1 = yield from step.midpoint(eps, 1 / 3)
            low = step.second(eps, eps_r1, 1 / 3)
            high = step.third(eps, (yield from step.third_point(eps, eps_r1, 1 / 3, 2 / 3)), 2 / 3)
        delta = torch.maximum(atol_.to(x.device), rtol_.to(x.device) * torch.maximum(low.abs(), x_prev.abs()))
        error = torch.linalg.norm((low - high) / delta) / x.numel() ** 0.5
        if pid.propose(error):
            x_prev = low
            x = high + up * s_noise * noise(x)
            s = t
    return x


def restart_steps(sigmas: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The webui's Restart plan over a schedule (``restart_sampler`` with its automatic restart list): the
    (sigma, next sigma) pairs of its Heun steps, the restart segments included."""
    steps = sigmas.shape[0] - 1
    restarts: dict[float, tuple[int, int, float]] = {}
    if steps >= 20:
        every, times = (steps // 4, 2) if steps >= 36 else (9, 1)
        sigmas = karras_sigmas(steps - every * times, sigmas[-2].item(), sigmas[0].item()).to(sigmas.device)
        restarts = {0.1: (every + 1, times, 2.0)}
    at = {int(torch.argmin(abs(sigmas - key), dim=0)): value for key, value in restarts.items()}
    pairs = []
    for i in range(len(sigmas) - 1):
        pairs.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in at:
            count, times, restart_max = at[i + 1]
            top = int(torch.argmin(abs(sigmas - restart_max), dim=0))
            if top < i + 1:
                descent = karras_sigmas(count, sigmas[i + 1].item(), sigmas[top].item()).to(sigmas.device)[:-1]
                pairs += list(pairwise(descent)) * times
    return pairs


def restart(x: torch.Tensor, sigmas: torch.Tensor, noise: Noise, s_noise: float = 1.0) -> Sampler:
    """Restart sampling (arXiv 2306.14878) as the webui runs it: Heun steps along :func:`restart_steps`,
    fresh noise wherever the plan goes back up in sigma."""
    pairs = restart_steps(sigmas)
    last = None
    for k, (sigma, sigma_next) in enumerate(pairs):
        if last is not None and last < sigma:
            x = x + noise(x) * s_noise * (sigma ** 2 - last ** 2) ** 0.5
        done = k / len(pairs)
        denoised = yield x, sigma, done
        slope = (x - denoised) / sigma
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + slope * dt
        else:
            moved = x + slope * dt
            denoised = yield moved, sigma_next, done
            x = x + (slope + (moved - denoised) / sigma_next) / 2 * dt
        last = sigma_next
    return x


def dpmpp_2s_ancestral(x: torch.Tensor, sigmas: torch.Tensor, noise: Noise, eta: float = ETA,
                       s_noise: float = 1.0) -> Sampler:
    """DPM-Solver++(2S) ancestral (k-diffusion's ``sample_dpmpp_2s_ancestral``): per step a second-order
    single-step update to the ancestral step's ``sigma_down`` through the midpoint in log-sigma (an Euler
    step when ``sigma_down`` is 0), then fresh noise of ``sigma_up``."""
    steps = len(sigmas) - 1
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        done = i / steps
        denoised = yield x, sigma, done
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        if sigma_down == 0:
            x = x + (x - denoised) / sigma * (sigma_down - sigma)
        else:
            t, t_next = _t(sigma), _t(sigma_down)
            h = t_next - t
            s = t + h / 2
            x_2 = (_sigma(s) / _sigma(t)) * x - torch.expm1(-h / 2) * denoised
            denoised_2 = yield x_2, _sigma(s), done
            x = (_sigma(t_next) / _sigma(t)) * x - torch.expm1(-h) * denoised_2
        if sigma_next > 0:
            x = x + noise(x) * s_noise * sigma_up
    return x


# -- the scheduler --------------------------------------------------------------------------------
class _Calls:
    """``scheduler.timesteps``: the UNet timestep of every model call, produced as the sampler asks."""

    def __init__(self, scheduler: KDiffusionScheduler):
        self.scheduler = scheduler

    def __iter__(self) -> Iterator[torch.Tensor]:
        while not self.scheduler.finished:
            yield self.scheduler.timestep()

    def __getitem__(self, index):
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("the calls of a k-diffusion sampler are not known ahead: only [begin:] and [:1]")
        if index.stop is None:  # [begin:]: the begin index is already set
            return self
        if index.start in (None, 0) and index.stop == 1:
            return self.scheduler.timestep().reshape(1)
        raise TypeError("the calls of a k-diffusion sampler are not known ahead: only [begin:] and [:1]")


class KDiffusionScheduler:
    """A diffusers-compatible scheduler that runs one of the webui's k-diffusion samplers (module doc)."""

    def __init__(self, function: str, schedule: str, alphas_cumprod: torch.Tensor,
                 prediction_type: str = "epsilon", config: dict | None = None, arch: str = "sd1"):
        if function not in FUNCTIONS:
            raise AdapterhubError(f"unknown k-diffusion sampler {function!r}; valid: {', '.join(FUNCTIONS)}")
        from adapterhub.sample import schedules

        if schedules._ALIASES.get(schedule, schedule) not in schedules.SCHEDULES:
            raise AdapterhubError(f"schedule {schedule!r}: valid: {', '.join(schedules.SCHEDULES)}")
        if prediction_type not in ("epsilon", "v_prediction"):
            raise AdapterhubError(f"prediction type {prediction_type!r}: the k-diffusion samplers take epsilon "
                                  "or v_prediction models")
        self.function, self.schedule, self.prediction_type = function, schedule, prediction_type
        self.table = schedules.ModelSchedule.from_alphas_cumprod(alphas_cumprod)
        self.arch = arch
        from diffusers.configuration_utils import FrozenDict

        self.config = FrozenDict(config or {})  # attribute access, as a diffusers scheduler's
        self.order = 2 if function in ("restart", "dpmpp_2s_ancestral") else 1  # calls per step, as the webui counts
        self.completed_steps = 0
        self._sigmas: torch.Tensor | None = None
        self._begin = 0
        self._from_image = False
        self._device = torch.device("cpu")
        self._reset()

    def _reset(self) -> None:
        self._coroutine: Sampler | None = None
        self._request: Call | None = None
        self._first: torch.Tensor | None = None
        self._generators: list[torch.Generator] | None = None
        self._reported = 0
        self.finished = False
        self.completed_steps = 0

    # -- the schedule -----------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        from adapterhub.sample.schedules import sigmas

        table = sigmas(self.schedule, int(num_inference_steps), model=self.table, arch=self.arch)
        self._sigmas = table.to(self._device)
        self._begin = 0
        self._from_image = False
        self._reset()

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start ``begin_index`` calls in (the loop counts ``order`` calls per step). Only img2img and the
        hires pass set a begin index: the run then starts from the image noised to ``sigma_sched[0]``, and DPM
        fast/adaptive span that part of the schedule, as the webui's ``sample_img2img`` has them."""
        self._begin = int(begin_index) // self.order
        self._reset()
        self._from_image = True

    @property
    def sigmas(self) -> torch.Tensor:
        """The part of the schedule this run covers (the webui's ``sigma_sched``)."""
        if self._sigmas is None:
            raise AdapterhubError("set_timesteps has not been called")
        return self._sigmas[self._begin:]

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def init_noise_sigma(self) -> float:
        return float(self.sigmas[0])

    @property
    def timesteps(self) -> _Calls:
        return _Calls(self)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps=None) -> torch.Tensor:
        """img2img's start: ``x + noise x sigma_sched[0]`` (the webui's ``sample_img2img``)."""
        return original_samples + noise * self.sigmas[0].to(original_samples.dtype)

    # -- the sampler ------------------------------------------------------------------------------
    def _sampler(self, x: torch.Tensor) -> Sampler:
        sigmas = self.sigmas
        if self.function == "restart":
            return restart(x, sigmas, self._noise)
        if self.function == "dpmpp_2s_ancestral":
            return dpmpp_2s_ancestral(x, sigmas, self._noise)
        # txt2img: the model's sigma range; img2img: sigma_sched[0] and its last nonzero sigma
        low, high = (self.table.sigma_min, self.table.sigma_max) if not self._from_image else \
            (sigmas[-2].item(), sigmas[0].item())
        if self.function == "dpm_fast":
            return dpm_fast(x, low, high, self.steps, self._noise)
        return dpm_adaptive(x, low, high, self._noise)

    def _noise(self, x: torch.Tensor) -> torch.Tensor:
        """Fresh noise per image from that image's generator (CPU, float32), as the webui's ``ImageRNG``."""
        gens = self._generators
        if not gens:
            return torch.randn(x.shape, dtype=torch.float32).to(x.device)
        if len(gens) != x.shape[0]:
            raise AdapterhubError(f"{len(gens)} generators for a batch of {x.shape[0]}")
        shape = (1, *x.shape[1:])
        # each on its generator's device: CUDA generators with RNG GPU (adapterhub.sample.rng)
        return torch.cat([torch.randn(shape, generator=g, dtype=torch.float32, device=g.device)
                          for g in gens]).to(x.device)

    def _first_sigma(self) -> torch.Tensor:
        """The sigma of the first call, before the starting latents are known: the samplers decide it from
        the schedule alone, so a probe with a placeholder x finds it."""
        if self._first is None:
            probe = self._sampler(torch.zeros((), device=self._device))
            self._first = next(probe)[1]
            probe.close()
        return self._first

    def step_position(self, timestep=None) -> tuple[int, int]:
        """``(i, T)`` of the pending call for a control's guidance start/end: the step of the run it falls in
        (DPM adaptive's calls are placed by the fraction of the run done)."""
        done = self._request[2] if self._request is not None else 0.0
        return min(int(done * self.steps + 1e-9), self.steps - 1), self.steps

    def current_sigma(self) -> torch.Tensor:
        return self._request[1] if self._request is not None else self._first_sigma()

    def timestep(self) -> torch.Tensor:
        """The UNet timestep of the pending call (float32, on the schedule's device)."""
        sigma = self.current_sigma().to(device=self._device, dtype=torch.float32)
        return self.table.t_of(sigma.cpu()).to(sigma.device)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        sigma = self.current_sigma().to(sample.device)
        return sample * (1 / (sigma ** 2 + 1) ** 0.5).to(sample.dtype)

    def _denoised(self, output: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        output = output.float()
        if self.prediction_type == "v_prediction":
            skip, out = 1 / (sigma ** 2 + 1), -sigma / (sigma ** 2 + 1) ** 0.5
            return output * out + x * skip
        return x + output * -sigma

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        """Feed the model's output for the pending call to the sampler; returns its next x (or its final x
        when it is done), in ``sample``'s dtype."""
        if self.finished:
            raise AdapterhubError("the sampler has finished: call set_timesteps for a new run")
        if self._coroutine is None:
            if generator is not None:
                self._generators = list(generator) if isinstance(generator, (list, tuple)) else [generator]
            self._coroutine = self._sampler(sample.float())
            self._request = next(self._coroutine)
        x, sigma, _ = self._request
        try:
            self._request = self._coroutine.send(self._denoised(model_output, x, sigma))
            x, done = self._request[0], self._request[2]
        except StopIteration as stop:
            x, done, self._request, self.finished = stop.value, 1.0, None, True
        reached = self.steps if self.finished else min(int(done * self.steps + 1e-9), self.steps)
        self.completed_steps, self._reported = max(reached - self._reported, 0), max(reached, self._reported)
        prev = x.to(sample.dtype)
        return (prev,) if not return_dict else _Output(prev)


class _Output:
    def __init__(self, prev_sample: torch.Tensor):
        self.prev_sample = prev_sample


def make(function: str, schedule: str, base_config: dict, arch: str = "sd1") -> KDiffusionScheduler:
    """A scheduler for ``function`` on the base whose diffusers scheduler config is ``base_config``: the
    model's ``alphas_cumprod`` as diffusers computes it from the betas."""
    import inspect

    import diffusers

    init = set(inspect.signature(diffusers.DDPMScheduler.__init__).parameters)
    ddpm = diffusers.DDPMScheduler.from_config({k: v for k, v in base_config.items() if k in init})
    alphas_cumprod = ddpm.alphas_cumprod.clone()
    if base_config.get("rescale_betas_zero_snr"):
        alphas_cumprod[-1] = 2 ** -24  # as diffusers' Euler schedulers: a finite sigma_max
    return KDiffusionScheduler(function, schedule, alphas_cumprod, base_config.get("prediction_type", "epsilon"),
                               dict(base_config), arch)
