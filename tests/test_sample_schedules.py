"""Webui schedule types as sigma tables, and diffusers schedulers run on them.

Oracles: k-diffusion 0.1.1.post1's own ``get_sigmas_*``, ``DiscreteSchedule`` and samplers (loaded by file
path: ``import k_diffusion`` pulls optional dependencies); NVIDIA's published Align Your Steps tables; the
KL Optimal formula of its paper; the webui's Simple / Normal / DDIM definitions written out here from
``modules/sd_schedulers.py``; the model's sigma table from the betas in float64 (sampling.md §3.4 numbers).
The transplant is checked two ways: a toy-denoiser run through the diffusers scheduler equals k-diffusion's
sampler on the same table, and the scheduler's state equals the one diffusers lays out itself from its
``use_exponential_sigmas`` flag.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import inspect
import itertools
import math
import sys
import types
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch

from adapterhub.errors import AdapterhubError
from adapterhub.sample import schedules
from adapterhub.sample.schedules import ModelSchedule, set_sigmas, sigmas

SD_BASE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
           "prediction_type": "epsilon", "steps_offset": 1, "timestep_spacing": "leading"}
# NVIDIA, "Align Your Steps" (how-to page and paper): the 10-step sigma schedules for SD 1.5 and SDXL
AYS_SD15_PAPER = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]
AYS_SDXL_PAPER = [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029]


def _k_diffusion():
    try:
        root = Path(importlib.metadata.distribution("k-diffusion").locate_file("k_diffusion"))
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("oracle needs: pip install --no-deps k-diffusion==0.1.1.post1 torchdiffeq")
    if "_kdiff_oracle" not in sys.modules:
        package = types.ModuleType("_kdiff_oracle")
        package.__path__ = [str(root)]
        sys.modules["_kdiff_oracle"] = package
        for name in ("utils", "sampling", "external"):
            spec = importlib.util.spec_from_file_location(f"_kdiff_oracle.{name}", root / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
            setattr(package, name, module)
    return sys.modules["_kdiff_oracle"]


@pytest.fixture(scope="module")
def kd():
    return _k_diffusion()


def _table64() -> torch.Tensor:
    """SD1's sigma table from the betas in float64, as the LDM code builds alphas_cumprod, held in float32."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    alpha_bar = torch.tensor(np.cumprod(1.0 - betas), dtype=torch.float32)
    return ((1 - alpha_bar) / alpha_bar) ** 0.5


def close(got, want, rel=2e-5):
    torch.testing.assert_close(torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64),
                               rtol=rel, atol=1e-6)


# ---- sigma tables ---------------------------------------------------------------------------------------

def test_model_table_ends_match_the_reference():
    table = sigmas("karras", 5, SD_BASE)
    assert float(table[0]) == pytest.approx(14.614641, rel=1e-5) and float(table[-2]) == pytest.approx(0.029167,
                                                                                                        rel=1e-4)
    assert table.dtype == torch.float32 and float(table[-1]) == 0.0


@pytest.mark.parametrize("steps", [1, 7, 20])
@pytest.mark.parametrize("key", ["karras", "exponential", "polyexponential"])
def test_k_diffusion_formula_schedules(kd, key, steps):
    table = _table64()
    lo, hi = float(table[0]), float(table[-1])
    want = getattr(kd.sampling, f"get_sigmas_{key}")(steps, lo, hi)  # webui: default rho (7; polyexponential 1)
    got = sigmas(key, steps, SD_BASE)
    assert got.shape == (steps + 1,)
    close(got, want)


def test_table_from_a_schedulers_alphas_cumprod(kd):
    """A loaded pipeline's scheduler (float32 alphas_cumprod) gives the same tables within float32 rounding."""
    scheduler = diffusers.EulerDiscreteScheduler.from_config(SD_BASE)
    model = ModelSchedule.from_alphas_cumprod(scheduler.alphas_cumprod)
    for key in ("karras", "normal", "simple", "kl_optimal"):
        close(sigmas(key, 12, model=model), sigmas(key, 12, SD_BASE), rel=1e-4)
    reference = kd.external.DiscreteEpsDDPMDenoiser(None, scheduler.alphas_cumprod, quantize=False)
    close(sigmas("uniform", 12, model=model), reference.get_sigmas(12), rel=1e-6)


def test_rho_override_reaches_the_formula(kd):
    table = _table64()
    close(sigmas("polyexponential", 9, SD_BASE, rho=2.5), kd.sampling.get_sigmas_polyexponential(
        9, float(table[0]), float(table[-1]), rho=2.5))
    close(sigmas("karras", 9, SD_BASE, sigma_min=0.1, sigma_max=10.0), kd.sampling.get_sigmas_karras(9, 0.1, 10.0))


@pytest.mark.parametrize("steps", [2, 10, 33])
def test_uniform_normal_and_sgm_uniform_follow_discrete_schedule(kd, steps):
    model = kd.external.DiscreteSchedule(_table64(), quantize=False)
    close(sigmas("uniform", steps, SD_BASE), model.get_sigmas(steps))
    close(sigmas("discrete", steps, SD_BASE), model.get_sigmas(steps))
    # webui normal_scheduler / sgm_uniform: t from sigma_max to sigma_min, back through t_to_sigma
    start, end = model.sigma_to_t(model.sigma_max), model.sigma_to_t(model.sigma_min)
    normal = [float(model.t_to_sigma(t)) for t in torch.linspace(start, end, steps)] + [0.0]
    sgm = [float(model.t_to_sigma(t)) for t in torch.linspace(start, end, steps + 1)[:-1]] + [0.0]
    close(sigmas("normal", steps, SD_BASE), normal)
    close(sigmas("sgm_uniform", steps, SD_BASE), sgm)


@pytest.mark.parametrize("steps", [1, 3, 10, 30, 999, 1500])
def test_simple_and_ddim_pick_table_entries_as_the_webui(steps):
    table = [float(s) for s in _table64()]
    simple = [table[len(table) - 1 - int(i * (len(table) / steps))] for i in range(steps)] + [0.0]
    picked, i, stride = [], 1, max(len(table) // steps, 1)
    while i < len(table):
        picked.append(table[i])
        i += stride
    ddim = picked[::-1] + [0.0]
    close(sigmas("simple", steps, SD_BASE), simple)
    close(sigmas("ddim", steps, SD_BASE), ddim)


@pytest.mark.parametrize("steps", [1, 4, 25])
def test_kl_optimal_is_the_papers_formula_without_a_zero(steps):
    table = _table64()
    lo, hi = float(table[0]), float(table[-1])
    want = [math.tan(i / steps * math.atan(lo) + (1 - i / steps) * math.atan(hi)) for i in range(steps + 1)]
    got = sigmas("kl_optimal", steps, SD_BASE)
    close(got, want)
    assert float(got[-1]) == pytest.approx(lo, rel=1e-5)  # the webui's table ends at sigma_min


@pytest.mark.parametrize("arch, paper", [("sd1", AYS_SD15_PAPER), ("sd2", AYS_SD15_PAPER), ("sdxl", AYS_SDXL_PAPER)])
def test_align_your_steps_uses_nvidias_tables(arch, paper):
    # the webui uses the table as it is when the step count equals its length (11 points, then 0) ...
    close(sigmas("align_your_steps", 11, SD_BASE, arch=arch), paper + [0.0], rel=1e-6)
    # ... and else interpolates log-linearly: with 21 steps the 11 points land on every other new point
    twenty_one = sigmas("align_your_steps", 21, SD_BASE, arch=arch)
    close(twenty_one[0:-1:2], paper, rel=1e-6)
    close(twenty_one[1:-1:2], [math.sqrt(a * b) for a, b in itertools.pairwise(paper)], rel=1e-6)


def test_discard_penultimate_sigma(kd):
    table = _table64()
    full = kd.sampling.get_sigmas_karras(9, float(table[0]), float(table[-1]))
    close(sigmas("karras", 8, SD_BASE, discard_penultimate=True), torch.cat([full[:-2], full[-1:]]))


def test_bad_schedule_names_and_steps():
    with pytest.raises(AdapterhubError, match="unknown schedule 'fancy'"):
        sigmas("fancy", 10)
    with pytest.raises(AdapterhubError, match="steps must be at least 1"):
        sigmas("karras", 0)


# ---- diffusers schedulers on an explicit table ------------------------------------------------------------

LINSPACE = {**SD_BASE, "timestep_spacing": "linspace"}
_DPM = {"algorithm_type": "dpmsolver++", "solver_order": 2}
_SDE = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}
# sampler: (diffusers class, extra config, k-diffusion sampler, its kwargs, draws noise)
SAMPLERS = {
    "Euler": ("EulerDiscreteScheduler", {}, "sample_euler", {}, False),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}, "sample_euler_ancestral", {}, True),
    "LMS": ("LMSDiscreteScheduler", {}, "sample_lms", {}, False),
    "Heun": ("HeunDiscreteScheduler", {}, "sample_heun", {}, False),
    "DPM2": ("KDPM2DiscreteScheduler", {}, "sample_dpm_2", {}, False),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}, "sample_dpm_2_ancestral", {}, True),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", _DPM, "sample_dpmpp_2m", {}, False),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", _SDE, "sample_dpmpp_2m_sde", {}, True),
    "DPM++ 2M SDE Heun": ("DPMSolverMultistepScheduler", {**_SDE, "solver_type": "heun"}, "sample_dpmpp_2m_sde",
                          {"solver_type": "heun"}, True),
    "DPM++ SDE": ("DPMSolverSDEScheduler", {"noise_sampler_seed": 7}, "sample_dpmpp_sde", {}, "brownian"),
}
SHAPE = (1, 4, 6, 6)


def _scheduler(cls_name: str, extra: dict):
    return getattr(diffusers, cls_name).from_config({**LINSPACE, **extra})


def _unet(u: torch.Tensor, t) -> torch.Tensor:
    """A deterministic stand-in for the UNet's epsilon: depends on its input and (mildly) on the timestep."""
    g = torch.Generator().manual_seed(3)
    c, d = torch.rand(SHAPE, generator=g) * 0.6 + 0.2, torch.randn(SHAPE, generator=g)
    return u * c + d * (torch.as_tensor(t, dtype=torch.float32) / 1000.0).reshape(-1, *([1] * (u.ndim - 1)))


def _run_diffusers(scheduler, table: torch.Tensor, noise: torch.Tensor, seed: int):
    set_sigmas(scheduler, table)
    x = noise * scheduler.init_noise_sigma
    if type(scheduler).__name__.startswith("DPMSolver") and "SDE" not in type(scheduler).__name__:
        # these work on x / sqrt(sigma^2 + 1) and start from unit noise; start from k-diffusion's point instead
        x = noise * table[0] / (table[0] ** 2 + 1) ** 0.5
    extra = {"generator": torch.Generator().manual_seed(seed)} \
        if "generator" in inspect.signature(scheduler.step).parameters else {}
    evaluated = []
    for t in scheduler.timesteps:
        u = scheduler.scale_model_input(x, t)
        evaluated.append(float(t))
        x = scheduler.step(_unet(u, t), t, x, **extra).prev_sample
    return x, evaluated


def _run_k_diffusion(kd, fn: str, kwargs: dict, noise_kind, alphas_cumprod, table, noise, seed: int):
    model = kd.external.DiscreteEpsDDPMDenoiser(_unet, alphas_cumprod, quantize=False)
    x = noise * table[0]
    if noise_kind == "brownian":
        kwargs = {**kwargs, "noise_sampler": kd.sampling.BrownianTreeNoiseSampler(
            x, float(table[table > 0].min()), float(table.max()), seed=7)}
    elif noise_kind:
        g = torch.Generator().manual_seed(seed)
        kwargs = {**kwargs, "noise_sampler": lambda sigma, sigma_next: torch.randn(SHAPE, generator=g)}
    return getattr(kd.sampling, fn)(model, x, table, disable=True, **kwargs)


TABLES = [("karras", 8), ("align_your_steps", 6), ("kl_optimal", 7), ("simple", 5)]


# diffusers' multistep solver makes its last step first order; k-diffusion only a step into sigma 0, so the two
# part on KL Optimal's table (which ends at sigma_min) in the last step's update, not in the sigmas
PAIRS = [(name, schedule, steps) for name in SAMPLERS for schedule, steps in TABLES
         if not (SAMPLERS[name][0] == "DPMSolverMultistepScheduler" and schedule == "kl_optimal")]


@pytest.mark.filterwarnings("ignore:Should have")  # torchsde: a float32 sigma a hair outside the tree's float64 span
@pytest.mark.parametrize("name, schedule, steps", PAIRS)
def test_diffusers_run_on_the_table_equals_k_diffusion(kd, name, schedule, steps):
    cls_name, extra, fn, kwargs, noise_kind = SAMPLERS[name]
    if noise_kind == "brownian" and importlib.util.find_spec("torchsde") is None:
        pytest.skip("DPM++ SDE needs torchsde")
    table = sigmas(schedule, steps, SD_BASE)
    scheduler = _scheduler(cls_name, extra)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(11))
    got, _ = _run_diffusers(scheduler, table, noise, seed=5)
    want = _run_k_diffusion(kd, fn, kwargs, noise_kind, scheduler.alphas_cumprod, table, noise, seed=5)
    torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-4)
    if not cls_name.startswith("DPMSolverMultistep"):
        assert float(scheduler.init_noise_sigma) == pytest.approx(float(table[0]))


@pytest.mark.parametrize("schedule, steps", TABLES)
@pytest.mark.parametrize("cls_name, extra", [("DPMSolverSinglestepScheduler", _DPM),
                                             ("DPMSolverMultistepScheduler", {**_SDE, "solver_order": 3})])
def test_first_order_per_step_schedulers_evaluate_at_the_table(kd, cls_name, extra, schedule, steps):
    """DPM++ 2S a and 3M SDE have no k-diffusion twin in diffusers: the model must be called once per sigma."""
    table = sigmas(schedule, steps, SD_BASE)
    scheduler = _scheduler(cls_name, extra)
    got, evaluated = _run_diffusers(scheduler, table, torch.randn(SHAPE), seed=1)
    oracle = kd.external.DiscreteSchedule(((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod) ** 0.5, False)
    want_t = oracle.sigma_to_t(table[:-1])  # one evaluation per step, at its starting sigma
    close(evaluated, want_t, rel=1e-4)
    close(scheduler.sigmas, table)
    assert torch.isfinite(got).all()


LAYOUT_CLASSES = ["LMSDiscreteScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler",
                  "KDPM2AncestralDiscreteScheduler", "DPMSolverSDEScheduler", "DPMSolverMultistepScheduler",
                  "DPMSolverSinglestepScheduler", "EulerDiscreteScheduler"]


@pytest.mark.parametrize("cls_name", LAYOUT_CLASSES)
def test_state_equals_diffusers_own_layout_of_the_same_table(cls_name):
    """diffusers' exponential flag builds a table and lays the state out itself: the transplant of that
    same table must give the same state."""
    flagged = _scheduler(cls_name, {"use_exponential_sigmas": True})
    flagged.set_timesteps(9)
    steps = flagged.sigmas[torch.unique_consecutive(flagged.sigmas, return_counts=True)[1].cumsum(0) - 1]
    transplanted = _scheduler(cls_name, {})
    set_sigmas(transplanted, steps)
    for name in ("sigmas", "sigmas_interpol", "sigmas_up", "sigmas_down", "timesteps"):
        if not hasattr(flagged, name):
            continue
        want, got = getattr(flagged, name), getattr(transplanted, name)
        assert got.shape == want.shape, name
        finite = torch.isfinite(want) & (torch.arange(len(want)) > 0 if name == "sigmas_interpol" else True)
        tolerance = 1.0 if not want.is_floating_point() else 1e-5  # integer-typed timesteps are truncated
        assert torch.allclose(got[finite].double(), want[finite].double(), rtol=1e-5, atol=tolerance), name


def test_kl_optimal_tail_gets_the_second_order_correction():
    table = sigmas("kl_optimal", 4, SD_BASE)
    heun = _scheduler("HeunDiscreteScheduler", {})
    set_sigmas(heun, table)
    assert len(heun.timesteps) == 8  # k-diffusion: a second evaluation on every step, the last too
    euler = _scheduler("EulerDiscreteScheduler", {})
    set_sigmas(euler, table)
    assert len(euler.timesteps) == 4 and float(euler.sigmas[-1]) == pytest.approx(float(table[-1]))


def test_unsupported_scheduler_and_bad_tables_fail_in_one_line():
    with pytest.raises(AdapterhubError, match="sampler UniPC cannot run schedule type KL Optimal"):
        schedules.require_support("UniPCMultistepScheduler", "UniPC", "KL Optimal")
    schedules.require_support("HeunDiscreteScheduler", "Heun", "KL Optimal")
    with pytest.raises(AdapterhubError, match="UniPCMultistepScheduler takes no explicit sigma table"):
        set_sigmas(diffusers.UniPCMultistepScheduler.from_config(LINSPACE), sigmas("karras", 4))
    with pytest.raises(AdapterhubError, match="non-increasing"):
        set_sigmas(_scheduler("EulerDiscreteScheduler", {}), torch.tensor([1.0, 2.0, 0.0]))
