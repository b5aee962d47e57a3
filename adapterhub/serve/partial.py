"""The image so far of an interrupted request: the model's estimate of the clean latents at its last UNet call,
as the webui returns for ``/interrupt`` (its samplers keep the last ``denoised`` and decode it).

The server sees only the UNet calls (the runner it wraps), so the estimate is computed from them: the UNet's
input at timestep ``t`` is the noisy latent in DDPM space, ``x_t = sqrt(a) x0 + sqrt(1 - a) eps`` with
``a = alphas_cumprod(t)`` (a k-diffusion sampler's scaled input ``x / sqrt(sigma^2 + 1)`` is that very
``x_t``; a fractional ``t`` is interpolated in log sigma, as those samplers map sigmas to timesteps), so

    epsilon prediction:  x0 = (x_t - sqrt(1 - a) eps) / sqrt(a)
    v prediction:        x0 = sqrt(a) x_t - sqrt(1 - a) v

with the prediction guided as the generator guides it (``uncond + cfg (cond - uncond)``) when the call
carries the unconditional and one conditional half, or the two halves came in two calls; otherwise (``AND``
sub-prompts) the first conditional prediction. It is diffusers' ``pred_original_sample`` of that step.
"""
from __future__ import annotations

import math

import torch


def alpha_at(alphas_cumprod: torch.Tensor, t) -> float:
    """``alphas_cumprod`` at timestep ``t`` (a fractional one interpolated in log sigma)."""
    t = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)
    a = alphas_cumprod.double().cpu()
    last = len(a) - 1
    t = min(max(t, 0.0), float(last))
    lo, hi = int(math.floor(t)), int(math.ceil(t))
    log_sigma = torch.log(((1 - a) / a) ** 0.5)
    value = log_sigma[lo] + (log_sigma[hi] - log_sigma[lo]) * (t - lo)
    return float(1.0 / (1.0 + math.exp(2.0 * float(value))))


def guided(outputs: list[torch.Tensor], batch: int, cfg: float) -> torch.Tensor:
    """The guided prediction of the last step from its UNet outputs (one call of [uncond; cond], or a cond call
    then an uncond call of ``batch`` rows each; anything else: the first conditional rows)."""
    last, before = outputs[-1], (outputs[-2] if len(outputs) > 1 else None)
    if last.shape[0] == 2 * batch:
        uncond, cond = last[:batch], last[batch:]
    elif last.shape[0] == batch and before is not None and before.shape[0] == batch:
        cond, uncond = before, last
    elif last.shape[0] > batch:  # [uncond; cond 1; cond 2 ...] in one call
        return last[batch:2 * batch]
    elif before is not None and before.shape[0] > batch:  # the sub-prompts' call, then the unconditional one
        return before[:batch]
    else:  # one conditional call (CFG 1)
        return last
    return uncond + (cond - uncond) * cfg


def clean_estimate(x_t: torch.Tensor, prediction: torch.Tensor, alpha: float, kind: str = "epsilon") -> torch.Tensor:
    """x0 from ``x_t`` and the model's prediction (``epsilon``, ``v_prediction`` or ``sample``), in float32."""
    x_t, prediction = x_t.float(), prediction.float()
    if kind == "v_prediction":
        return alpha ** 0.5 * x_t - (1 - alpha) ** 0.5 * prediction
    if kind == "sample":
        return prediction
    return (x_t - (1 - alpha) ** 0.5 * prediction) / alpha ** 0.5


def estimate(calls: list[tuple], batch: int, cfg: float, scheduler_config, alphas_cumprod) -> torch.Tensor | None:
    """The clean-latent estimate of the last step from the runner's recent ``(x_t, t, output)`` calls (those of
    the last timestep), or None when there is none."""
    if not calls or alphas_cumprod is None:
        return None
    t = calls[-1][1]
    same = [c for c in calls if _same_t(c[1], t)]
    x_t = same[-1][0][:batch]
    prediction = guided([c[2] for c in same], batch, cfg)
    kind = getattr(scheduler_config, "prediction_type", None) or scheduler_config.get("prediction_type", "epsilon")
    return clean_estimate(x_t, prediction, alpha_at(alphas_cumprod, t), kind)


def _same_t(a, b) -> bool:
    a = float(a.flatten()[0]) if isinstance(a, torch.Tensor) else float(a)
    b = float(b.flatten()[0]) if isinstance(b, torch.Tensor) else float(b)
    return a == b
