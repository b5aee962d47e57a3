"""The webui's schedule types as explicit sigma tables, and diffusers schedulers run on such a table.

diffusers has flags for Karras, Exponential and Beta sigmas but none for the webui's Polyexponential,
KL Optimal, Align Your Steps, Simple, Normal, DDIM and SGM Uniform schedule types. Two halves close the gap:

* :func:`sigmas` computes the table the webui's ``modules/sd_schedulers.py`` computes (k-diffusion's
  ``get_sigmas_*`` for Karras, Exponential and Polyexponential), over the model's own discrete sigma table
  (:class:`ModelSchedule`: ``sqrt((1 - alpha_bar) / alpha_bar)`` in float32, k-diffusion's log-linear
  ``sigma_to_t`` / ``t_to_sigma``). As in the webui, ``sigma_min`` and ``sigma_max`` are the ends of that
  table, Karras uses rho 7 and Polyexponential rho 1, Align Your Steps takes NVIDIA's 10-step table for SD1
  or SDXL and interpolates it log-linearly to other step counts, and every table but KL Optimal ends with
  the 0 k-diffusion appends (the webui's KL Optimal has ``steps + 1`` points ending at ``sigma_min``).
* :func:`set_sigmas` puts a diffusers scheduler on such a table: ``set_timesteps(steps)`` first (it resets
  the solver state), then the sigmas, timesteps and the class's derived tables as its own
  ``set_timesteps`` would lay them out had one of its flags produced this table. The model is evaluated at
  exactly the table's sigmas, at the fractional timesteps k-diffusion's ``sigma_to_t`` gives, unrounded, as
  the webui feeds its UNet. The second-order classes (Heun, DPM2, DPM2 a, DPM++ SDE)
  interleave their extra evaluations as k-diffusion does: a step whose next sigma is not 0 is a
  second-order step, so a table that ends above 0 (KL Optimal) gets the final correction k-diffusion makes.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from adapterhub.errors import AdapterhubError

# NVIDIA's 10-step Align Your Steps tables (research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html),
# as the webui uses them: SDXL's for SDXL, SD 1.5's for everything else.
AYS_SD1 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
AYS_SDXL = (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)
# alpha_bar the webui puts in place of a zero terminal alpha_bar (zero-terminal-SNR betas), so sigma stays finite
_ZERO_SNR_ALPHA_BAR = 4.8973451890853435e-08
_DEFAULT_BASE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                 "beta_schedule": "scaled_linear"}
_BETA_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
              "rescale_betas_zero_snr")


@dataclass(frozen=True)
class ModelSchedule:
    """The model's discrete sigmas (ascending, index = training timestep), as k-diffusion's
    ``DiscreteSchedule`` holds them, with its continuous (unquantised) conversions."""

    sigmas: torch.Tensor  # float32, shape (num_train_timesteps,)

    @property
    def log_sigmas(self) -> torch.Tensor:
        return self.sigmas.log()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: torch.Tensor) -> ModelSchedule:
        """The table of a scheduler's ``alphas_cumprod`` (what a loaded pipeline's scheduler holds)."""
        alpha_bar = torch.as_tensor(alphas_cumprod).float().cpu()
        return cls(((1 - alpha_bar) / alpha_bar) ** 0.5)

    def t_of(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep of each sigma: log-sigma interpolated between its neighbours, clamped to the table."""
        log_sigma = torch.as_tensor(sigma, dtype=torch.float32).log()
        logs = self.log_sigmas
        # index of the last table entry at or below each sigma, kept one short of the end
        below = (log_sigma.reshape(1, -1) >= logs[:, None]).sum(dim=0) - 1
        low = below.clamp(0, len(logs) - 2)
        frac = ((logs[low] - log_sigma.reshape(-1)) / (logs[low] - logs[low + 1])).clamp(0, 1)
        return ((1 - frac) * low + frac * (low + 1)).reshape(log_sigma.shape)

    def sigma_of(self, t: torch.Tensor) -> torch.Tensor:
        """Sigma at fractional timesteps: log-linear between the two nearest table entries."""
        t = torch.as_tensor(t).float()
        low, high, frac = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - frac) * self.log_sigmas[low] + frac * self.log_sigmas[high]).exp()


def model_schedule(base_config=None) -> ModelSchedule:
    """The sigma table of a model whose diffusers scheduler config is ``base_config`` (SD1's betas when
    None). Betas come from diffusers; alpha_bar is accumulated in float64 and cast to float32, and sigma
    computed in float32, as the webui's LDM models hold and k-diffusion's ``CompVisDenoiser`` derives it."""
    import diffusers

    config = {k: v for k, v in dict(base_config or _DEFAULT_BASE).items() if k in _BETA_KEYS}
    betas = diffusers.DDPMScheduler.from_config(config).betas.double()
    alpha_bar = torch.cumprod(1.0 - betas, dim=0).float()
    if float(alpha_bar[-1]) == 0.0:
        alpha_bar[-1] = _ZERO_SNR_ALPHA_BAR
    return ModelSchedule(((1 - alpha_bar) / alpha_bar) ** 0.5)


def _with_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas.float(), sigmas.new_zeros(1, dtype=torch.float32)])


# Each schedule: (steps, model table, sigma_min, sigma_max, rho, arch) -> sigmas
def _uniform(n: int, model: ModelSchedule, lo: float, hi: float, rho, arch: str) -> torch.Tensor:
    return _with_zero(model.sigma_of(torch.linspace(len(model.sigmas) - 1, 0, n)))


def _karras(n: int, model: ModelSchedule, lo: float, hi: float, rho, arch: str) -> torch.Tensor:
    rho = 7.0 if rho is None else rho
    ramp = torch.linspace(0, 1, n)
    return _with_zero((hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho)


def _exponential(n: int, model: ModelSchedule, lo: float, hi: float, rho, arch: str) -> torch.Tensor:
    return _with_zero(torch.linspace(math.log(hi), math.log(lo), n).exp())


def _polyexponential(n: int, model: ModelSchedule, lo: float, hi: float, rho, arch: str) -> torch.Tensor:
    rho = 1.0 if rho is None else rho
    ramp = torch.linspace(1, 0, n) ** rho
    return _with_zero((math.log(lo) + ramp * (math.log(hi) - math.log(lo))).exp())


def _sgm_uniform(n: int, model: ModelSchedule, lo: float, hi: float, rho, arch: str) -> torch.Tensor:
    ends = model.t_of(torch.tensor([hi, lo]))
    return _with_zero(model.sigma_of(torch.linspace(float(ends[0]), float(ends[1]), n + 1)[:-1]))


def _kl_optimal(n: int, model: ModelSchedule, lo: float, hi: float, rho, arch: str) -> torch.Tensor:
    # arXiv:2407.12173's tan(t atan(sigma_min) + (1 - t) atan(sigma_max)) over n + 1 points: no zero appended
    t = torch.arange(n + 1) / n
    return torch.tan(t * torch.tensor(lo).atan() + (1.0 - t) * torch.tensor(hi).atan())


def _align_your_steps(n: int, model: ModelSchedule, lo: float, hi: float, rho, arch: str) -> torch.Tensor:
    table = np.array(AYS_SDXL if arch == "sdxl" else AYS_SD1, dtype=np.float64)
    if n != len(table):  # log-linear in the step position, on the ascending table
        log_ascending = np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(table)), np.log(table[::-1]))
        table = np.exp(log_ascending)[::-1]
    return _with_zero(torch.from_numpy(table.copy()))


def _simple(n: int, model: ModelSchedule, lo: float, hi: float, rho, arch: str) -> torch.Tensor:
    stride = len(model.sigmas) / n  # every stride-th table entry from the top, float stride truncated
    return _with_zero(torch.stack([model.sigmas[-(1 + int(i * stride))] for i in range(n)]))


def _normal(n: int, model: ModelSchedule, lo: float, hi: float, rho, arch: str) -> torch.Tensor:
    ends = model.t_of(torch.tensor([hi, lo]))
    return _with_zero(model.sigma_of(torch.linspace(float(ends[0]), float(ends[1]), n)))


def _ddim(n: int, model: ModelSchedule, lo: float, hi: float, rho, arch: str) -> torch.Tensor:
    stride = max(len(model.sigmas) // n, 1)  # entries 1, 1 + stride, ... of the table, descending
    return _with_zero(model.sigmas[1::stride].flip(0))


SCHEDULES: dict[str, Callable[..., torch.Tensor]] = {
    "uniform": _uniform, "karras": _karras, "exponential": _exponential, "polyexponential": _polyexponential,
    "sgm_uniform": _sgm_uniform, "kl_optimal": _kl_optimal, "align_your_steps": _align_your_steps,
    "simple": _simple, "normal": _normal, "ddim": _ddim,
}
_ALIASES = {"discrete": "uniform", "automatic": "uniform"}


def sigmas(key: str, steps: int, base_config=None, *, model: ModelSchedule | None = None, arch: str = "sd1",
           discard_penultimate: bool = False, sigma_min: float | None = None, sigma_max: float | None = None,
           rho: float | None = None) -> torch.Tensor:
    """The webui's sigma table (float32, descending) for schedule ``key`` and ``steps`` steps.

    ``base_config`` is the model's diffusers scheduler config (its betas give the model's table; SD1's when
    None), or ``model`` the table itself; ``arch`` (``sd1``, ``sd2``, ``sdxl``) picks the Align Your Steps
    table. ``sigma_min``, ``sigma_max`` and ``rho`` are the webui's schedule overrides (default: the model
    table's ends and the schedule's own rho). ``discard_penultimate`` is the webui's option of DPM2, DPM2 a
    and DPM++ 3M SDE: one step more, then the next-to-last sigma dropped."""
    name = _ALIASES.get(key, key)
    if name not in SCHEDULES:
        raise AdapterhubError(f"unknown schedule {key!r}; valid: {', '.join(SCHEDULES)}")
    if int(steps) < 1:
        raise AdapterhubError(f"schedule {key}: steps must be at least 1 (got {steps})")
    model = model if model is not None else model_schedule(base_config)
    lo = model.sigma_min if sigma_min is None else float(sigma_min)
    hi = model.sigma_max if sigma_max is None else float(sigma_max)
    n = int(steps) + (1 if discard_penultimate else 0)
    table = SCHEDULES[name](n, model, lo, hi, rho, arch).float()
    if discard_penultimate:
        table = torch.cat([table[:-2], table[-1:]])
    return table


# ---- diffusers schedulers on an explicit table ----------------------------------------------------------

def _timesteps(scheduler, sigmas: torch.Tensor) -> torch.Tensor:
    """The fractional timestep of each sigma on the scheduler's own table, by k-diffusion's ``sigma_to_t`` (the
    webui feeds the UNet exactly this)."""
    return ModelSchedule.from_alphas_cumprod(scheduler.alphas_cumprod).t_of(sigmas.float()).float()


def _interleave(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``[f0, s0, f1, s1, ...]``; ``second`` has as many entries as ``first`` or one fewer."""
    pairs = torch.stack([first[:len(second)], second], dim=-1).flatten()
    return torch.cat([pairs, first[len(second):]])


def _doubled(table: torch.Tensor) -> torch.Tensor:
    """The sigmas of a two-evaluation step layout: the first, each inner one twice, the last."""
    return torch.cat([table[:1], table[1:-1].repeat_interleave(2), table[-1:]])


def _second_order_steps(table: torch.Tensor) -> int:
    """How many steps make a second evaluation: all but one into sigma 0 (k-diffusion's rule)."""
    return len(table) - 1 - (1 if float(table[-1]) == 0.0 else 0)


def _flat(scheduler, table: torch.Tensor) -> None:
    scheduler.sigmas = table.to(scheduler.sigmas.device)
    scheduler.timesteps = _timesteps(scheduler, table[:-1]).to(scheduler.timesteps.device)


def _evaluated(table: torch.Tensor) -> torch.Tensor:
    """The sigmas the model is evaluated at: all but a final 0."""
    return table if float(table[-1]) > 0 else table[:-1]


def _heun(scheduler, table: torch.Tensor) -> None:
    t = _timesteps(scheduler, _evaluated(table))  # the second evaluation of a step is at its next sigma
    scheduler.sigmas = _doubled(table).to(scheduler.sigmas.device)
    first, second = t[:len(table) - 1], t[1:1 + _second_order_steps(table)]
    scheduler.timesteps = _interleave(first, second).to(scheduler.timesteps.device)


def _dpm2(scheduler, table: torch.Tensor) -> None:
    # the second evaluation of step i -> i+1 is at the geometric mean of the two sigmas
    middles = table.log().lerp(table.roll(1).log(), 0.5).exp()[1:]
    device = scheduler.sigmas.device
    t, t_middles = _timesteps(scheduler, table[:-1]), _timesteps(scheduler, middles[:_second_order_steps(table)])
    scheduler.sigmas = torch.cat([table[:1], table[1:].repeat_interleave(2), table[-1:]]).to(device)
    interpolated = torch.cat([middles[:1], middles])  # position 0 is never read
    scheduler.sigmas_interpol = torch.cat([interpolated[:1], interpolated[1:].repeat_interleave(2),
                                           interpolated[-1:]]).to(device)
    scheduler.timesteps = _interleave(t, t_middles).to(scheduler.timesteps.device)


def _dpm2_ancestral(scheduler, table: torch.Tensor) -> None:
    following = torch.cat([table[1:], table.new_zeros(1)])  # a phantom last step into 0 pads the layout
    up = (following ** 2 * (table ** 2 - following ** 2) / table ** 2).nan_to_num() ** 0.5
    down = (following ** 2 - up ** 2).clamp(min=0) ** 0.5
    down[-1] = 0.0
    middles = torch.where(down > 0, table.log().lerp(down.log(), 0.5).exp(), torch.zeros_like(table))
    device = scheduler.sigmas.device

    def laid_out(values: torch.Tensor) -> torch.Tensor:
        return torch.cat([values[:1], values[1:].repeat_interleave(2), values[-1:]]).to(device)

    scheduler.sigmas, scheduler.sigmas_interpol = laid_out(table), laid_out(middles)
    scheduler.sigmas_up, scheduler.sigmas_down = laid_out(up), laid_out(down)
    t = _timesteps(scheduler, table[:-1])
    t_middles = _timesteps(scheduler, middles[:_second_order_steps(table)])
    scheduler.timesteps = _interleave(t, t_middles).to(scheduler.timesteps.device)


def _dpmpp_sde(scheduler, table: torch.Tensor) -> None:
    steps = _second_order_steps(table)  # second evaluation at the midpoint of -log(sigma)
    middles = table[:steps].log().lerp(table[1:steps + 1].log(), 0.5).exp()
    t, t_middles = _timesteps(scheduler, table[:-1]), _timesteps(scheduler, middles)
    scheduler.sigmas = _doubled(table).to(scheduler.sigmas.device)
    scheduler.timesteps = _interleave(t, t_middles).to(scheduler.timesteps.device)
    scheduler.noise_sampler = None  # its Brownian tree spans the table's sigmas: rebuilt on the first step


# diffusers class -> how its state is laid out from a table (Euler takes the table natively)
_LAYOUTS: dict[str, Callable[[object, torch.Tensor], None] | None] = {
    "EulerDiscreteScheduler": None, "EulerAncestralDiscreteScheduler": _flat, "LMSDiscreteScheduler": _flat,
    "DPMSolverMultistepScheduler": _flat, "DPMSolverSinglestepScheduler": _flat, "HeunDiscreteScheduler": _heun,
    "KDPM2DiscreteScheduler": _dpm2, "KDPM2AncestralDiscreteScheduler": _dpm2_ancestral,
    "DPMSolverSDEScheduler": _dpmpp_sde,
}


# classes that work on the variance-preserving scale (x / sqrt(sigma^2 + 1)) and start from unit noise
_VARIANCE_PRESERVING = ("DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler")


def supports(scheduler_class: str) -> bool:
    """Whether :func:`set_sigmas` can put a scheduler of this diffusers class on an explicit table."""
    return scheduler_class in _LAYOUTS


def require_support(scheduler_class: str, sampler: str, schedule: str) -> None:
    """Raise a one-line error when sampler ``sampler`` (its diffusers class) cannot run ``schedule``."""
    if not supports(scheduler_class):
        raise AdapterhubError(f"sampler {sampler} cannot run schedule type {schedule}: diffusers' {scheduler_class} "
                              f"takes no explicit sigma table")


def set_sigmas(scheduler, table: torch.Tensor, device=None) -> None:
    """Put ``scheduler`` on the sigma table ``table`` (descending, from :func:`sigmas`): ``len(table) - 1``
    steps whose model evaluations are at exactly these sigmas. Make the scheduler with
    ``timestep_spacing="linspace"`` so that ``init_noise_sigma`` is ``table[0]`` as in k-diffusion."""
    name = type(scheduler).__name__
    if not supports(name):
        raise AdapterhubError(f"diffusers' {name} takes no explicit sigma table; supported: {', '.join(_LAYOUTS)}")
    table = torch.as_tensor(table, dtype=torch.float32).flatten().cpu()
    if len(table) < 2 or not bool((table[:-1] > 0).all()) or not bool((table[1:] <= table[:-1]).all()):
        raise AdapterhubError(f"{name}: a sigma table must be at least 2 positive, non-increasing values "
                              f"(0 allowed last); got {[round(float(s), 6) for s in table]}")
    own = type(scheduler).set_timesteps  # the class's: the instance's may be the one that called us
    if _LAYOUTS[name] is None:
        own(scheduler, sigmas=table.tolist(), device=device)
    else:
        own(scheduler, len(table) - 1, device=device)
        _LAYOUTS[name](scheduler, table)
    if name in _VARIANCE_PRESERVING:  # x / sqrt(sigma^2 + 1): k-diffusion's first point, noise * sigma_max, there
        scheduler.init_noise_sigma = float(table[0] / (table[0] ** 2 + 1) ** 0.5)
    # the step index starts at 0 rather than by looking the first timestep up: two sigmas clamped to the
    # table's end would share a timestep, and diffusers would then start at the second
    scheduler.set_begin_index(0)
