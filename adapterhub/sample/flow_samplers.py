"""The webui's k-diffusion samplers and schedule types on the flow-matching families (FLUX.1, SD3 / SD3.5), as
Forge drives them.

A flow model predicts a velocity ``v``; k-diffusion's samplers want a denoiser (the clean latents at noise
level sigma). Forge's backend treats these models as "const" predictions: sigma is the flow time t (Flux's
transformer takes t, SD3's 1000 t), the clean estimate is ``x0 = x - sigma v`` and a latent at sigma is
``sigma noise + (1 - sigma) x0``. :class:`FlowDenoiser` is that denoiser over a diffusers transformer, in
k-diffusion's calling convention (``denoiser(x, sigma) -> x0``, float32), with CFG (SD3, and Flux's true CFG
above 1) and Flux-dev's distilled guidance as the pipelines compute them, Flux's 2 x 2 token packing done inside
so the samplers work on the unpacked latents (B, C, H/8, W/8).

The samplers (:data:`SAMPLERS`) are k-diffusion's, step for step, written as coroutines in the convention of
:mod:`adapterhub.sample.ksamplers` (yield ``(x, sigma, done)``, get the denoised latents back, return the final
x; DPM++ 2S a is that module's). Noise they draw after the first is the webui's: ancestral samplers draw each
image's noise from that image's own generator (``ImageRNG``), the SDE ones from a Brownian tree per image seeded
with its seed (the webui's ``brownian_noise``). Ancestral steps renoise as Forge's k-diffusion does on these
models: ``sigma_up`` of fresh noise added to ``x`` (the variance-exploding form, not ComfyUI's rectified-flow
variant). The webui's settings: eta 1 and s_noise 1, no churn; DPM2, DPM2 a and DPM++ 3M SDE take one step more
and drop the next-to-last sigma.

Schedules (:data:`SCHEDULES`) are computed over the model's own shifted sigma table (:func:`flow_table`: the
base scheduler config's shift, Flux-dev's by image size as diffusers computes it, which equals Forge's fixed
``mu`` 1.15 at 1024 x 1024): ``Simple`` (every (N / steps)-th entry from the top) and ``DDIM`` (every
(N // steps)-th from the second) as Forge takes them from the table, ``Beta`` as Forge computes it (the
Beta(0.6, 0.6) quantiles between the table's ends), ``Normal`` and ``SGM Uniform`` through Forge's predictor maps (linear in sigma on Flux; on SD3 linear
in 1000 sigma, mapped back through the shift), Karras, Exponential, Polyexponential and KL Optimal by
k-diffusion's formulas between the table's ends (:func:`adapterhub.sample.schedules.sigmas`). ``Automatic`` is
the pipeline's own sigmas (what diffusers' ``FlowMatchEulerDiscreteScheduler`` runs).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from adapterhub.errors import AdapterhubError
from adapterhub.sample.ksamplers import Sampler, ancestral_step, dpmpp_2s_ancestral

Noise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (sigma, sigma_next) -> unit noise, k-diffusion's
FLUX_TABLE = 10000  # Forge's PredictionFlux: the flow time in 10 000 steps; SD3: its num_train_timesteps
BETA_ALPHA = BETA_BETA = 0.6  # Forge's Beta schedule parameters (its defaults; written in the infotext)


# -- the samplers (coroutines: yield (x, sigma, done), receive the denoised x) ----------------------------
def _d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """k-diffusion's ``to_d``: the ODE's derivative (for a flow model: its velocity)."""
    return (x - denoised) / sigma


def _ln(sigma: torch.Tensor) -> torch.Tensor:
    return sigma.log().neg()


def _exp(t: torch.Tensor) -> torch.Tensor:
    return t.neg().exp()


def euler(x: torch.Tensor, sigmas: torch.Tensor, noise: Noise) -> Sampler:
    """k-diffusion's ``sample_euler`` (no churn)."""
    steps = len(sigmas) - 1
    for i in range(steps):
        denoised = yield x, sigmas[i], i / steps
        x = x + _d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


def euler_ancestral(x: torch.Tensor, sigmas: torch.Tensor, noise: Noise, eta: float = 1.0) -> Sampler:
    """k-diffusion's ``sample_euler_ancestral``: an Euler step to ``sigma_down``, then ``sigma_up`` of noise."""
    steps = len(sigmas) - 1
    for i in range(steps):
        denoised = yield x, sigmas[i], i / steps
        down, up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + _d(x, sigmas[i], denoised) * (down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * up
    return x


def heun(x: torch.Tensor, sigmas: torch.Tensor, noise: Noise) -> Sampler:
    """k-diffusion's ``sample_heun``: the trapezoid of two slopes; an Euler step into sigma 0."""
    steps = len(sigmas) - 1
    for i in range(steps):
        denoised = yield x, sigmas[i], i / steps
        d = _d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = yield x_2, sigmas[i + 1], i / steps
            x = x + (d + _d(x_2, sigmas[i + 1], denoised_2)) / 2 * dt
    return x


def _dpm_2_step(x: torch.Tensor, sigma: torch.Tensor, target: torch.Tensor, denoised: torch.Tensor, done: float):
    """DPM-Solver-2 from ``sigma`` to ``target`` through their log-midpoint (an Euler step into 0): one call."""
    d = _d(x, sigma, denoised)
    if target == 0:
        return x + d * (target - sigma)
    mid = sigma.log().lerp(target.log(), 0.5).exp()
    x_2 = x + d * (mid - sigma)
    denoised_2 = yield x_2, mid, done
    return x + _d(x_2, mid, denoised_2) * (target - sigma)


def dpm_2(x: torch.Tensor, sigmas: torch.Tensor, noise: Noise) -> Sampler:
    """k-diffusion's ``sample_dpm_2`` (no churn)."""
    steps = len(sigmas) - 1
    for i in range(steps):
        denoised = yield x, sigmas[i], i / steps
        x = yield from _dpm_2_step(x, sigmas[i], sigmas[i + 1], denoised, i / steps)
    return x


def dpm_2_ancestral(x: torch.Tensor, sigmas: torch.Tensor, noise: Noise, eta: float = 1.0) -> Sampler:
    """k-diffusion's ``sample_dpm_2_ancestral``: DPM-Solver-2 to ``sigma_down``, then ``sigma_up`` of noise
    (none after a step into 0)."""
    steps = len(sigmas) - 1
    for i in range(steps):
        denoised = yield x, sigmas[i], i / steps
        down, up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = yield from _dpm_2_step(x, sigmas[i], down, denoised, i / steps)
        if down != 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * up
    return x


def _lms_coefficient(order: int, t, i: int, j: int) -> float:
    """k-diffusion's ``linear_multistep_coeff``: the integral over [t_i, t_i+1] of the j-th Lagrange basis
    polynomial through the last ``order`` sigmas (scipy's quad, relative tolerance 1e-4)."""
    from scipy import integrate

    def basis(tau):
        prod = 1.0
        for k in range(order):
            if j != k:
                prod *= (tau - t[i - k]) / (t[i - j] - t[i - k])
        return prod

    return integrate.quad(basis, t[i], t[i + 1], epsrel=1e-4)[0]


def lms(x: torch.Tensor, sigmas: torch.Tensor, noise: Noise, order: int = 4) -> Sampler:
    """k-diffusion's ``sample_lms``: linear multistep over the last ``order`` slopes."""
    steps = len(sigmas) - 1
    table = sigmas.detach().cpu().numpy()
    slopes: list[torch.Tensor] = []
    for i in range(steps):
        denoised = yield x, sigmas[i], i / steps
        slopes = [*slopes, _d(x, sigmas[i], denoised)][-order:]
        current = min(i + 1, order)
        coefficients = [_lms_coefficient(current, table, i, j) for j in range(current)]
        x = x + sum(c * d for c, d in zip(coefficients, reversed(slopes)))
    return x


def dpmpp_2m(x: torch.Tensor, sigmas: torch.Tensor, noise: Noise) -> Sampler:
    """k-diffusion's ``sample_dpmpp_2m``: DPM-Solver++(2M), first order on the first and the last step."""
    steps = len(sigmas) - 1
    old = None
    for i in range(steps):
        denoised = yield x, sigmas[i], i / steps
        t, t_next = _ln(sigmas[i]), _ln(sigmas[i + 1])
        h = t_next - t
        if old is None or sigmas[i + 1] == 0:
            x = (_exp(t_next) / _exp(t)) * x - (-h).expm1() * denoised
        else:
            r = (t - _ln(sigmas[i - 1])) / h
            blended = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
            x = (_exp(t_next) / _exp(t)) * x - (-h).expm1() * blended
        old = denoised
    return x


def dpmpp_sde(x: torch.Tensor, sigmas: torch.Tensor, noise: Noise, eta: float = 1.0, r: float = 0.5) -> Sampler:
    """k-diffusion's ``sample_dpmpp_sde``: two stochastic DPM-Solver++ substeps per step (an Euler step into 0)."""
    steps = len(sigmas) - 1
    for i in range(steps):
        denoised = yield x, sigmas[i], i / steps
        if sigmas[i + 1] == 0:
            x = x + _d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
            continue
        t, t_next = _ln(sigmas[i]), _ln(sigmas[i + 1])
        h = t_next - t
        s = t + h * r
        down, up = ancestral_step(_exp(t), _exp(s), eta)
        s_ = _ln(down)
        x_2 = (_exp(s_) / _exp(t)) * x - (t - s_).expm1() * denoised
        x_2 = x_2 + noise(_exp(t), _exp(s)) * up
        denoised_2 = yield x_2, _exp(s), i / steps
        down, up = ancestral_step(_exp(t), _exp(t_next), eta)
        t_next_ = _ln(down)
        fac = 1 / (2 * r)
        blended = (1 - fac) * denoised + fac * denoised_2
        x = (_exp(t_next_) / _exp(t)) * x - (t - t_next_).expm1() * blended
        x = x + noise(_exp(t), _exp(t_next)) * up
    return x


def dpmpp_2m_sde(x: torch.Tensor, sigmas: torch.Tensor, noise: Noise, eta: float = 1.0) -> Sampler:
    """k-diffusion's ``sample_dpmpp_2m_sde`` (midpoint): the last step returns the denoised latents."""
    steps = len(sigmas) - 1
    old, h_last = None, None
    for i in range(steps):
        denoised = yield x, sigmas[i], i / steps
        h = None
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = _ln(sigmas[i + 1]) - _ln(sigmas[i])
            eta_h = eta * h
            x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + (-h - eta_h).expm1().neg() * denoised
            if old is not None:
                x = x + 0.5 * (-h - eta_h).expm1().neg() * (1 / (h_last / h)) * (denoised - old)
            if eta:
                x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * eta_h).expm1().neg().sqrt()
        old, h_last = denoised, h
    return x


def dpmpp_3m_sde(x: torch.Tensor, sigmas: torch.Tensor, noise: Noise, eta: float = 1.0) -> Sampler:
    """k-diffusion's ``sample_dpmpp_3m_sde``: the last step returns the denoised latents."""
    steps = len(sigmas) - 1
    denoised_1 = denoised_2 = h_1 = h_2 = None
    for i in range(steps):
        denoised = yield x, sigmas[i], i / steps
        h = None
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = _ln(sigmas[i + 1]) - _ln(sigmas[i])
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
            elif h_1 is not None:
                x = x + (h_eta.neg().expm1() / h_eta + 1) * ((denoised - denoised_1) / (h_1 / h))
            if eta:
                x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt()
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


def _dpmpp_2s_ancestral(x: torch.Tensor, sigmas: torch.Tensor, noise: Noise) -> Sampler:
    # adapterhub.sample.ksamplers' coroutine draws its noise as noise(x)
    return dpmpp_2s_ancestral(x, sigmas, lambda _x: noise(None, None))


@dataclass(frozen=True)
class FlowSampler:
    """A webui sampler on a flow model: its coroutine, the webui's ``discard_next_to_last_sigma``, and the noise
    it draws after the first (None; ``"ancestral"``: each image's generator; ``"brownian"``: a Brownian tree)."""

    name: str
    function: Callable[[torch.Tensor, torch.Tensor, Noise], Sampler]
    discard_penultimate: bool = False
    noise: str | None = None


SAMPLERS: dict[str, FlowSampler] = {s.name: s for s in (
    FlowSampler("Euler", euler),
    FlowSampler("Euler a", euler_ancestral, noise="ancestral"),
    FlowSampler("Heun", heun),
    FlowSampler("DPM2", dpm_2, discard_penultimate=True),
    FlowSampler("DPM2 a", dpm_2_ancestral, discard_penultimate=True, noise="ancestral"),
    FlowSampler("LMS", lms),
    FlowSampler("DPM++ 2M", dpmpp_2m),
    FlowSampler("DPM++ 2S a", _dpmpp_2s_ancestral, noise="ancestral"),
    FlowSampler("DPM++ SDE", dpmpp_sde, noise="brownian"),
    FlowSampler("DPM++ 2M SDE", dpmpp_2m_sde, noise="brownian"),
    FlowSampler("DPM++ 3M SDE", dpmpp_3m_sde, discard_penultimate=True, noise="brownian"),
)}


# -- schedules ------------------------------------------------------------------------------------------
def flow_table(config, family: str, width: int, height: int, vae_scale: int = 8, patch: int = 2) -> torch.Tensor:
    """The model's shifted sigmas, ascending (float32): the flow time ``t = i / N`` (i = 1 .. N; N 10 000 for
    Flux as Forge's ``PredictionFlux``, the scheduler's ``num_train_timesteps`` for SD3) shifted as the base's
    scheduler config shifts it: ``exp(mu) / (exp(mu) + 1 / t - 1)`` with ``mu`` by image size where it shifts
    dynamically (Flux-dev; diffusers' ``calculate_shift``), else ``s t / (1 + (s - 1) t)`` with its ``shift``."""
    config = dict(config)
    n = FLUX_TABLE if family == "flux" else int(config.get("num_train_timesteps", 1000))
    t = torch.arange(1, n + 1, dtype=torch.float64) / n
    if config.get("use_dynamic_shifting"):
        tokens = (height // vae_scale // patch) * (width // vae_scale // patch)
        mu = dynamic_shift(config, tokens)
        table = math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    else:
        shift = float(config.get("shift", 1.0))
        table = shift * t / (1 + (shift - 1) * t)
    return table.float()


def dynamic_shift(config: dict, tokens: int) -> float:
    """diffusers' ``calculate_shift``: ``mu`` linear in the image's token count between the config's ends."""
    lo_len, hi_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    lo, hi = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (hi - lo) / (hi_len - lo_len)
    return tokens * slope + (lo - slope * lo_len)


def beta_sigmas(steps: int, table: torch.Tensor, alpha: float = BETA_ALPHA, beta: float = BETA_BETA) -> torch.Tensor:
    """Forge's (and the webui's) Beta schedule: ``sigma_min + q (sigma_max - sigma_min)`` for q the Beta(alpha,
    beta) quantiles of ``1 - k / (steps - 1)`` (k = 0 .. steps-1: the table's top first, its bottom last), then 0."""
    import numpy as np
    from scipy import stats

    lo, hi = float(table[0]), float(table[-1])
    quantiles = [stats.beta.ppf(x, alpha, beta) for x in 1 - np.linspace(0, 1, steps)]
    return torch.tensor([lo + q * (hi - lo) for q in quantiles] + [0.0], dtype=torch.float32)


def _forge_timestep(sigma: torch.Tensor, family: str) -> torch.Tensor:
    """Forge's predictor ``timestep(sigma)``: sigma itself for Flux (``PredictionFlux``), 1000 sigma for SD3
    (``PredictionDiscreteFlow``)."""
    return sigma if family == "flux" else sigma * 1000


def _forge_sigma(t: torch.Tensor, family: str, shift: float) -> torch.Tensor:
    """Forge's predictor ``sigma(timestep)``: the timestep itself for Flux, SD3's shift of ``t / 1000``. (Not the
    inverse of :func:`_forge_timestep` on SD3: Forge's Normal and SGM Uniform end where this puts them.)"""
    if family == "flux":
        return t
    t = t / 1000.0
    return t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)


def _forge_normal(steps: int, table: torch.Tensor, family: str, shift: float, sgm: bool) -> torch.Tensor:
    """Forge's Normal / SGM Uniform on a flow model: the predictor's timesteps of the table's ends, linear between
    (``steps`` points; SGM: ``steps + 1`` with the last dropped), each mapped back by its ``sigma``, then 0."""
    start = _forge_timestep(torch.tensor(float(table[-1])), family)
    end = _forge_timestep(torch.tensor(float(table[0])), family)
    timesteps = torch.linspace(start, end, steps + 1)[:-1] if sgm else torch.linspace(start, end, steps)
    return torch.tensor([float(_forge_sigma(t, family, shift)) for t in timesteps] + [0.0], dtype=torch.float32)


# the schedule types offered, webui label -> adapterhub.sample.schedules key (None: computed here)
SCHEDULES: dict[str, str | None] = {"Automatic": None, "Simple": "simple", "Beta": None, "Normal": None,
                                    "SGM Uniform": None, "DDIM": "ddim", "Karras": "karras",
                                    "Exponential": "exponential", "Polyexponential": "polyexponential",
                                    "KL Optimal": "kl_optimal"}
# the webui's schedule types Forge offers that have no meaning on a flow model, and why (refused before a load)
NOT_ON_FLOW = {
    "Uniform": "Forge reads the model's 10 000 (Flux) / 1 000 (SD3) table positions as sigmas and ends on a zero "
               "step", "Turbo": "Forge reads the training timesteps as sigmas",
    "Align Your Steps": "its noise levels (14.6 .. 0.03) are SD1 / SDXL's", "Align Your Steps GITS": "its noise "
    "levels are SD1 / SDXL's", "Align Your Steps 11": "its noise levels are SD1 / SDXL's",
    "Align Your Steps 32": "its noise levels are SD1 / SDXL's"}


def _label(name: str, labels) -> str | None:
    """The label among ``labels`` that ``name`` spells (any case, spaces or underscores), else None."""
    key = str(name).strip().lower().replace("_", " ")
    return next((k for k in labels if k.lower() == key), None)


def schedule_name(name: str) -> str | None:
    """The canonical label of schedule ``name`` (any case, spaces or underscores), else None."""
    return _label(name, SCHEDULES)


def why_not_on_flow(name: str) -> str | None:
    """Why schedule ``name`` has no meaning on a flow model (:data:`NOT_ON_FLOW`), else None."""
    label = _label(name, NOT_ON_FLOW)
    return NOT_ON_FLOW[label] if label else None


def flow_sigmas(schedule: str, steps: int, table: torch.Tensor, automatic: Callable[[int], torch.Tensor],
                discard_penultimate: bool = False, family: str = "flux", shift: float = 1.0) -> torch.Tensor:
    """The descending sigmas (float32, ending at 0 but for KL Optimal) of ``schedule`` for ``steps`` steps over
    the model's ``table``; ``automatic(n)`` gives the pipeline's own n-step sigmas. ``discard_penultimate``: the
    webui's DPM2 / DPM2 a / DPM++ 3M SDE option, one step more and the next-to-last sigma dropped. ``family`` and
    SD3's ``shift`` (its scheduler config's) give Forge's timestep <-> sigma maps for Normal and SGM Uniform."""
    from adapterhub.sample import schedules

    n = int(steps) + (1 if discard_penultimate else 0)
    if schedule == "Automatic":
        out = automatic(n).float()
    elif schedule == "Beta":
        out = beta_sigmas(n, table)
    elif schedule in ("Normal", "SGM Uniform"):
        out = _forge_normal(n, table, family, shift, sgm=schedule == "SGM Uniform")
    else:
        out = schedules.sigmas(SCHEDULES[schedule], n, model=schedules.ModelSchedule(table.float()))
    if discard_penultimate:
        out = torch.cat([out[:-2], out[-1:]])
    return out


# -- the noise the samplers draw after the first ---------------------------------------------------------
def ancestral_noise(generators: Sequence[torch.Generator], shape: Sequence[int], device) -> Noise:
    """Per call, each image's next draw of ``shape`` (C, H, W) from its own generator, float32 (the webui's
    ``ImageRNG.next``), on ``device``."""
    def draw(_sigma=None, _sigma_next=None) -> torch.Tensor:
        return torch.cat([torch.randn((1, *shape), generator=g, dtype=torch.float32, device=g.device)
                          for g in generators]).to(device)
    return draw


class BrownianNoise:
    """The webui's ``brownian_noise``: per image a Brownian tree (``torchsde``) seeded with the image's seed over
    [smallest nonzero sigma, largest sigma] of the run; a call gives the tree's increment over
    (sigma, sigma_next) scaled to unit variance (k-diffusion's ``BrownianTreeNoiseSampler``)."""

    def __init__(self, x: torch.Tensor, sigmas: torch.Tensor, seeds: Sequence[int]):
        import torchsde

        if len(seeds) != x.shape[0]:
            raise AdapterhubError(f"{len(seeds)} seeds for a batch of {x.shape[0]}")
        lo, hi = torch.as_tensor(sigmas[sigmas > 0].min()), torch.as_tensor(sigmas.max())
        self.trees = [torchsde.BrownianTree(lo, torch.zeros_like(x[0]), hi, entropy=int(s)) for s in seeds]

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        import warnings

        a, b = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        low, high, sign = (a, b, 1) if a < b else (b, a, -1)
        with warnings.catch_warnings():
            # torchsde compares the float32 ends with its rounded copy of them ("Should have ta>=t0"): harmless
            warnings.filterwarnings("ignore", message="Should have ta>=t0", category=UserWarning)
            w = torch.stack([tree(low, high) for tree in self.trees]) * sign
        return w / (b - a).abs().sqrt()


# -- the denoiser and the loop ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Composed:
    """A prompt's ``AND`` sub-prompts for :class:`FlowDenoiser`: one conditioning each (as :meth:`FlowDenoiser.encode`
    makes them, every one with the negative prompt where CFG runs) and their weights."""

    conds: tuple[dict[str, Any], ...]
    weights: tuple[float, ...]


class FlowDenoiser:
    """A Flux or SD3 transformer as k-diffusion's denoiser: ``self(x, sigma) -> x - sigma v`` (float32), ``x``
    the unpacked latents (B, C, H/8, W/8), ``sigma`` a scalar or one per image. ``cond``: the encoded prompt
    (:meth:`encode`), or a :class:`Composed` prompt's sub-prompts; ``cfg``: CFG with the negative prompt above 1 (SD3;
    Flux's true CFG); ``guidance``: Flux-dev's distilled guidance (None on a model without its embedding);
    ``extra``: what a FLUX.1 control or Fill model takes beside the noise (B, tokens, channels), already packed as
    its pipeline packs it (:meth:`adapterhub.sample.flow.FlowGenerator.model_extra`), concatenated to the packed
    latents on the channel dim at every transformer call as ``FluxControlPipeline`` / ``FluxFillPipeline`` do (one
    shape for every call: a compiled transformer is not compiled again)."""

    def __init__(self, pipe, family: str, cond: dict[str, Any] | Composed, cfg: float, guidance: float | None,
                 width: int, height: int, extra: torch.Tensor | None = None):
        self.pipe, self.family, self.cond, self.cfg = pipe, family, cond, float(cfg)
        self.guidance, self.width, self.height, self.extra = guidance, width, height, extra

    @staticmethod
    def encode(pipe, family: str, prompt: str, negative: str, batch: int, cfg: float) -> dict[str, Any]:
        """The prompt (and the negative where CFG runs) encoded as the family's pipeline encodes it."""
        device = pipe.transformer.device
        with torch.no_grad():
            if family == "flux":
                cond = dict(zip(("embeds", "pooled", "ids"),
                                pipe.encode_prompt(prompt=prompt, prompt_2=None, device=device,
                                                   num_images_per_prompt=batch, max_sequence_length=512)))
                if cfg > 1:
                    cond.update(zip(("neg_embeds", "neg_pooled", "neg_ids"),
                                    pipe.encode_prompt(prompt=negative, prompt_2=None, device=device,
                                                       num_images_per_prompt=batch, max_sequence_length=512)))
                return cond
            embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
                prompt=prompt, prompt_2=None, prompt_3=None, negative_prompt=negative, device=device,
                num_images_per_prompt=batch, do_classifier_free_guidance=cfg > 1, max_sequence_length=256)
            if cfg > 1:  # the pipeline's order: unconditional first
                embeds, pooled = torch.cat([neg, embeds]), torch.cat([neg_pooled, pooled])
            return {"embeds": embeds, "pooled": pooled}

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The (guided) velocity at ``x``, sigma ``sigma`` (B,), in the transformer's dtype; the timestep and every
        argument as the pipelines pass them (``1000 sigma``; Flux's divided by 1000 again, its attention kwargs
        ``{}``, None on a control or Fill model as their pipelines), so a compiled transformer's guards hold for both
        loops. A :class:`Composed` conditioning: one call per sub-prompt, each of a plain call's shapes, combined by
        :meth:`compose`."""
        if not isinstance(self.cond, Composed):
            v, v_u = self._predict(x, sigma, self.cond, True)
            return v if v_u is None else v_u + self.cfg * (v - v_u)
        preds = [self._predict(x, sigma, c, k == 0) for k, c in enumerate(self.cond.conds)]
        return self.compose([v for v, _ in preds], preds[0][1], self.cond.weights)

    def compose(self, conds: Sequence[torch.Tensor], uncond: torch.Tensor | None,
                weights: Sequence[float]) -> torch.Tensor:
        """The sub-prompts' velocities ``conds`` combined: with CFG (``uncond``, the negative's) the webui's
        ``combine_denoised``, ``u + sum_i (c_i - u) (w_i cfg)``, which is Forge's ``u + (c - u) cfg sum(w)`` for c
        the weighted average (``calc_cond_uncond_batch``); without, the weighted average ``sum_i w_i c_i / sum(w)``
        (Forge returns ``sum(w) c`` there, its uncond being 0: twice a clean estimate for ``a AND b``; the two agree
        when the weights sum to 1). Affine with weights on differences, so on velocities as on clean estimates."""
        if uncond is None:
            total = float(sum(weights))
            return sum(c * (w / total) for c, w in zip(conds, weights))
        v = uncond
        for c, w in zip(conds, weights):
            v = v + (c - uncond) * (w * self.cfg)
        return v

    def _predict(self, x: torch.Tensor, sigma: torch.Tensor, c: dict[str, Any],
                 uncond: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The velocities of conditioning ``c``: the prompt's and, with CFG, the negative prompt's (None without
        CFG; not asked of Flux, nor of SD3's separate negative, when ``uncond`` is False: a later sub-prompt's).
        SD3's batch of negative and prompt runs whole (the plain call's shapes); Flux's are unpacked."""
        transformer = self.pipe.transformer
        dtype, batch = transformer.dtype, x.shape[0]
        t = sigma.float() * 1000  # the schedulers' timesteps (float32); FluxPipeline casts them to the latents' dtype
        if self.family == "sd3":
            def call(hidden: torch.Tensor, prefix: str) -> torch.Tensor:
                return transformer(hidden_states=hidden.to(dtype), timestep=t.repeat(hidden.shape[0] // batch),
                                   encoder_hidden_states=c[prefix + "embeds"], pooled_projections=c[prefix + "pooled"],
                                   joint_attention_kwargs=None, return_dict=False)[0]

            if "neg_embeds" in c:  # a negative prompt of another length (adapterhub.sample.flow_prompt): two calls
                return call(x, ""), call(x, "neg_") if uncond else None
            if self.cfg > 1:
                v_u, v_c = call(torch.cat([x, x]), "").chunk(2)
                return v_c, v_u
            return call(x, ""), None
        rows, cols = x.shape[-2:]
        packed = self.pipe._pack_latents(x.to(dtype), batch, x.shape[1], rows, cols)
        if self.extra is not None:  # a control / Fill model: its input beside the noise, as its pipeline's loop
            packed = torch.cat([packed, self.extra.to(dtype)], dim=2)
        ids = self.pipe._prepare_latent_image_ids(batch, rows // 2, cols // 2, x.device, dtype)
        guidance = None
        if self.guidance is not None:
            guidance = torch.full([1], self.guidance, device=x.device, dtype=torch.float32).expand(batch)

        # FluxPipeline passes {} as its attention kwargs, the control and Fill pipelines None: a compiled
        # transformer guards on the type, so each model's loops call it alike
        attention = {} if self.extra is None else None

        def call(prefix: str) -> torch.Tensor:
            v = transformer(hidden_states=packed, timestep=t.to(dtype) / 1000, guidance=guidance,
                            pooled_projections=c[prefix + "pooled"], encoder_hidden_states=c[prefix + "embeds"],
                            txt_ids=c[prefix + "ids"], img_ids=ids, joint_attention_kwargs=attention,
                            return_dict=False)[0]
            return self.pipe._unpack_latents(v, self.height, self.width, self.pipe.vae_scale_factor)

        return call(""), call("neg_") if self.cfg > 1 and uncond else None

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        with torch.no_grad():
            v = self.velocity(x, sigma)
        return x.float() - sigma.reshape(-1, 1, 1, 1) * v.float()


def run(sampler: FlowSampler, denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
        sigmas: torch.Tensor, noise: Noise,
        on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Run ``sampler`` from ``x`` (float32, already at ``sigmas[0]``) over ``sigmas``, asking ``denoiser``;
    ``on_step(i, x, denoised)`` after each step with the latents it reached and its first clean estimate."""
    steps = len(sigmas) - 1
    coroutine = sampler.function(x.float(), sigmas, noise)
    step, first = 0, None
    try:
        x_call, sigma, done = next(coroutine)
        while True:
            denoised = denoiser(x_call, sigma)
            first = denoised if first is None else first
            x_call, sigma, done = coroutine.send(denoised)
            if round(done * steps) > step:  # the next step's first call: this one has finished
                if on_step is not None:
                    on_step(step, x_call, first)
                step, first = round(done * steps), None
    except StopIteration as stop:
        if on_step is not None:
            on_step(step, stop.value, first)
        return stop.value
