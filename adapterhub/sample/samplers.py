"""AUTOMATIC1111 sampler names and schedule types, mapped onto diffusers schedulers.

The webui's v1.9+ form: a bare sampler name (``DPM++ 2M``) plus a ``Schedule type`` (``Automatic``,
``Karras``, ``Exponential`` ...). ``Automatic`` is the sampler's own default: Karras for the DPM
samplers, Exponential for the SDE multistep ones, the model's discrete schedule for Euler, Euler a,
LMS and Heun (sampling.md §3.1). Older combined names (``DPM++ 2M Karras``) and k-diffusion aliases
(``k_dpmpp_2m``) are accepted too.

The k-diffusion-style samplers run on the webui's own sigma table (:mod:`adapterhub.sample.schedules`):
the model's whole sigma range (σmax at t=999, σmin at t=0, then 0), the initial noise scaled by σmax (on
the variance-preserving scale for DPM-Solver), the model evaluated at the fractional timesteps the webui
feeds its UNet. The table lives in the scheduler (its ``set_timesteps``), so a diffusers pipeline handed
the scheduler runs it too. Only Beta comes from diffusers' own flag. The timestep samplers (DDIM, DDIM
CFG++, PLMS, UniPC, LCM) use the webui's DDIM timesteps (``leading``, offset 1) and take no schedule type.
Where diffusers has no exact counterpart the mapping is the nearest one, and ``note`` says so.

DPM fast, DPM adaptive, Restart and DPM++ 2S a have no diffusers scheduler (diffusers' single-step
DPM-Solver++ is not ancestral): they run k-diffusion's algorithms (the webui's Restart) through
:class:`adapterhub.sample.ksamplers.KDiffusionScheduler`, a scheduler with the same interface, on the same
tables (every schedule type but Beta).
"""
from __future__ import annotations

import functools
import importlib.util
import re
from dataclasses import dataclass, field

from adapterhub.errors import AdapterhubError

DISCRETE = "discrete"  # the model's own schedule: what "Automatic" means for Euler, Euler a, LMS, Heun
KDIFFUSION = "KDiffusionScheduler"  # not a diffusers class: adapterhub.sample.ksamplers runs these samplers


@dataclass(frozen=True)
class Sampler:
    name: str  # the webui's label
    scheduler: str  # diffusers class name
    config: dict = field(default_factory=dict)
    default_schedule: str = DISCRETE  # what "Automatic" resolves to
    timestep_based: bool = False  # DDIM/PLMS/UniPC/LCM: no schedule type
    aliases: tuple[str, ...] = ()
    requires: str | None = None  # a module diffusers needs for this scheduler
    note: str = ""
    discard_penultimate: bool = False  # the webui's option for DPM2, DPM2 a, DPM++ 3M SDE: one step more, then
    # the next-to-last sigma dropped
    cfg_pp: bool = False  # DDIM CFG++: CFG scale / 12.5, the step's direction from the unconditional prediction


_SDE = {"algorithm_type": "sde-dpmsolver++"}
SAMPLERS: dict[str, Sampler] = {s.name: s for s in (
    Sampler("DPM++ 2M", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2},
            "karras", aliases=("k_dpmpp_2m",)),
    Sampler("DPM++ SDE", "DPMSolverSDEScheduler", {}, "karras", aliases=("k_dpmpp_sde",), requires="torchsde"),
    Sampler("DPM++ 2M SDE", "DPMSolverMultistepScheduler", {**_SDE, "solver_order": 2}, "exponential",
            aliases=("k_dpmpp_2m_sde",)),
    Sampler("DPM++ 2M SDE Heun", "DPMSolverMultistepScheduler", {**_SDE, "solver_order": 2, "solver_type": "heun"},
            "exponential", aliases=("k_dpmpp_2m_sde_heun",)),
    Sampler("DPM++ 2S a", KDIFFUSION, {"function": "dpmpp_2s_ancestral"}, "karras", aliases=("k_dpmpp_2s_a",)),
    Sampler("DPM++ 3M SDE", "DPMSolverMultistepScheduler", {**_SDE, "solver_order": 3}, "exponential",
            aliases=("k_dpmpp_3m_sde",), discard_penultimate=True,
            note="diffusers' third-order SDE DPM-Solver++, not k-diffusion's dpmpp_3m_sde step for step"),
    Sampler("Euler a", "EulerAncestralDiscreteScheduler", aliases=("k_euler_a", "k_euler_ancestral")),
    Sampler("Euler", "EulerDiscreteScheduler", aliases=("k_euler",)),
    Sampler("LMS", "LMSDiscreteScheduler", aliases=("k_lms",), requires="scipy"),
    Sampler("Heun", "HeunDiscreteScheduler", aliases=("k_heun",)),
    Sampler("DPM2", "KDPM2DiscreteScheduler", {}, "karras", aliases=("k_dpm_2",),
            discard_penultimate=True),
    Sampler("DPM2 a", "KDPM2AncestralDiscreteScheduler", {}, "karras", aliases=("k_dpm_2_a",),
            discard_penultimate=True),
    Sampler("DDIM", "DDIMScheduler", {"set_alpha_to_one": False, "clip_sample": False, "eta": 0.0},
            timestep_based=True),
    Sampler("DDIM CFG++", "DDIMScheduler", {"set_alpha_to_one": False, "clip_sample": False, "eta": 0.0},
            timestep_based=True, aliases=("ddim_cfgpp",), cfg_pp=True),
    Sampler("PLMS", "PNDMScheduler", {"skip_prk_steps": True, "set_alpha_to_one": False}, timestep_based=True),
    Sampler("UniPC", "UniPCMultistepScheduler", {}, timestep_based=True),
    Sampler("LCM", "LCMScheduler", {}, timestep_based=True),
    Sampler("DPM fast", KDIFFUSION, {"function": "dpm_fast"}, aliases=("k_dpm_fast",)),
    Sampler("DPM adaptive", KDIFFUSION, {"function": "dpm_adaptive"}, aliases=("k_dpm_ad",)),
    Sampler("Restart", KDIFFUSION, {"function": "restart"}, "karras", aliases=("restart",)),
)}
# the webui's schedule types diffusers has no flag for: explicit tables (adapterhub.sample.schedules)
EXPLICIT = frozenset({"polyexponential", "kl_optimal", "align_your_steps", "simple", "normal", "ddim"})

# schedule type: (label, diffusers flags); the EXPLICIT ones have none: their sigmas are set explicitly
SCHEDULES: dict[str, tuple[str, dict | None]] = {
    "automatic": ("Automatic", {}),
    "uniform": ("Uniform", {}),
    "karras": ("Karras", {"use_karras_sigmas": True}),
    "exponential": ("Exponential", {"use_exponential_sigmas": True}),
    "sgm_uniform": ("SGM Uniform", {"timestep_spacing": "trailing"}),
    "beta": ("Beta", {"use_beta_sigmas": True}),
    "polyexponential": ("Polyexponential", {}),
    "kl_optimal": ("KL Optimal", {}),
    "align_your_steps": ("Align Your Steps", {}),
    "simple": ("Simple", {}),
    "normal": ("Normal", {}),
    "ddim": ("DDIM", {}),
}
_SCHEDULE_ALIASES = {"sgmuniform": "sgm_uniform"}
_BASE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
              "steps_offset", "rescale_betas_zero_snr")
_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


def _key(text: str) -> str:
    return re.sub(r"[\s_\-]+", " ", text.strip().lower())


_BY_KEY = {_key(n): s for n, s in SAMPLERS.items()} | {_key(a): s for s in SAMPLERS.values() for a in s.aliases}


def sampler_names() -> list[str]:
    return list(SAMPLERS)


def schedule_names() -> list[str]:
    return [label for label, flags in SCHEDULES.values() if flags is not None]


def _schedule_key(text: str) -> str | None:
    k = _key(text).replace(" ", "_")
    k = _SCHEDULE_ALIASES.get(k, k)
    if k in SCHEDULES:
        return k
    for name, (label, _) in SCHEDULES.items():
        if _key(label) == _key(text):
            return name
    return None


def resolve_sampler(name: str, schedule: str | None = None) -> tuple[Sampler, str]:
    """``(sampler, schedule key)`` for a webui sampler name (old ``… Karras`` forms too) and schedule
    type; raises one line listing the valid names."""
    text = str(name or "").strip()
    sampler = _BY_KEY.get(_key(text))
    suffix = None
    if sampler is None:  # "DPM++ 2M Karras": the pre-1.9 label carried the schedule
        for words in range(1, 4):
            head, tail = " ".join(text.split()[:-words]), " ".join(text.split()[-words:])
            if _key(head) in _BY_KEY and _schedule_key(tail):
                sampler, suffix = _BY_KEY[_key(head)], _schedule_key(tail)
                break
    if sampler is None:
        raise AdapterhubError(f"unknown sampler {text!r}; valid: {', '.join(SAMPLERS)}")
    key = _schedule_key(schedule) if schedule else (suffix or "automatic")
    if key is None:
        raise AdapterhubError(f"unknown schedule type {schedule!r}; valid: {', '.join(schedule_names())}")
    if suffix and schedule and key != suffix and key != "automatic":
        raise AdapterhubError(f"sampler {text!r} names schedule {SCHEDULES[suffix][0]} but schedule type is "
                              f"{SCHEDULES[key][0]}")
    key = suffix if key == "automatic" and suffix else key
    if sampler.scheduler == KDIFFUSION:  # k-diffusion samplers take every table the webui computes
        from adapterhub.sample.schedules import SCHEDULES as TABLES

        if key != "automatic" and key not in TABLES:
            raise AdapterhubError(f"schedule type {SCHEDULES[key][0]!r} is not available for {sampler.name}; valid: "
                                  f"{', '.join(SCHEDULES[k][0] for k in SCHEDULES if k in TABLES or k == 'automatic')}")
        return sampler, key
    if sampler.timestep_based and key != "automatic":
        raise AdapterhubError(f"{sampler.name} is a timestep sampler and takes no schedule type "
                              f"(got {SCHEDULES[key][0]}; use Automatic)")
    if key in EXPLICIT:
        from adapterhub.sample.schedules import require_support

        require_support(sampler.scheduler, sampler.name, SCHEDULES[key][0])
    return sampler, key


def resolved_schedule(sampler: Sampler, key: str) -> str:
    """The key a schedule resolves to: Automatic becomes the sampler's default (discrete for some)."""
    if key == "automatic" and not sampler.timestep_based:
        return sampler.default_schedule
    if key == "uniform":
        return DISCRETE
    return key


def schedule_label(sampler: Sampler, key: str) -> str:
    """What the webui writes as ``Schedule type``: the resolved label, ``Automatic`` when none applies."""
    resolved = resolved_schedule(sampler, key)
    if resolved in (DISCRETE, "automatic"):
        return "Uniform" if key == "uniform" else "Automatic"
    return SCHEDULES[resolved][0]


def _require(sampler: Sampler, module: str | None) -> None:
    if module and importlib.util.find_spec(module) is None:
        raise AdapterhubError(f"sampler {sampler.name} needs the {module} package (pip install {module})")


def scheduler_config(sampler: Sampler, key: str, base_config) -> tuple[str, dict]:
    """The diffusers class name and config for ``sampler`` with schedule ``key`` on a base whose
    scheduler config is ``base_config`` (betas, training steps, prediction type are kept)."""
    config = {k: base_config[k] for k in _BASE_KEYS if k in base_config}
    config.update({k: v for k, v in sampler.config.items() if k != "eta"})
    resolved = resolved_schedule(sampler, key)
    if sampler.timestep_based:
        if sampler.scheduler in ("DDIMScheduler", "PNDMScheduler", "LCMScheduler"):
            config.update(timestep_spacing="leading", steps_offset=1)
        return sampler.scheduler, config
    config.update(timestep_spacing="linspace")  # steps_offset only shifts "leading" spacing
    if resolved != DISCRETE:
        config.update(SCHEDULES[resolved][1])
    if sampler.scheduler == "EulerDiscreteScheduler":
        config.update(interpolation_type="linear")
    return sampler.scheduler, config


def make_scheduler(sampler: Sampler | str, key: str = "automatic", base_config=None, arch: str = "sd1"):
    """A fresh diffusers scheduler for a webui sampler and schedule type (``arch``: ``sdxl`` picks SDXL's
    Align Your Steps table, anything else SD 1.5's, as the webui).

    A k-diffusion-style sampler runs on the webui's own sigma table (:func:`adapterhub.sample.schedules.sigmas`:
    the model's discrete schedule with k-diffusion's log-linear interpolation, Karras, Exponential, ... and the
    discarded penultimate sigma of DPM2, DPM2 a and DPM++ 3M SDE): the scheduler's ``set_timesteps(n)`` lays out
    that table, whoever calls it (our loop, or a diffusers pipeline given this scheduler), so diffusers' spacing
    never stands in for the webui's."""
    import types

    import diffusers

    if isinstance(sampler, str):
        sampler, key = resolve_sampler(sampler, key)
    if sampler.scheduler == KDIFFUSION:
        from adapterhub.sample import ksamplers

        return ksamplers.make(sampler.config["function"], resolved_schedule(sampler, key),
                              dict(base_config or _SD_DEFAULT), arch)
    _require(sampler, sampler.requires)
    resolved = resolved_schedule(sampler, key)
    if resolved == "beta":
        _require(sampler, "scipy")
    base = dict(base_config or _SD_DEFAULT)
    cls_name, config = scheduler_config(sampler, key, base)
    cls = getattr(diffusers, cls_name)
    flags = {k: config.pop(k) for k in _FLAGS if k in config}
    accepted = _init_params(cls)
    table = _table(sampler, resolved, base, arch)
    supported = {} if table is not None else {k: v for k, v in flags.items() if k in accepted}
    if sampler.cfg_pp:
        cls = _cfg_pp_class()
    scheduler = cls.from_config({k: v for k, v in config.items() if k in accepted}, **supported)
    if table is not None:
        scheduler._adapterhub_table = table
        scheduler.set_timesteps = types.MethodType(_set_timesteps_on_table, scheduler)
        return scheduler
    missing = {k: v for k, v in flags.items() if k not in accepted and v}
    if missing:  # e.g. Euler a has no Beta flag: borrow the sigmas of an Euler scheduler with it
        scheduler._adapterhub_sigma_donor = diffusers.EulerDiscreteScheduler.from_config(
            {k: v for k, v in config.items() if k in _init_params(diffusers.EulerDiscreteScheduler)}, **missing)
        scheduler.set_timesteps = types.MethodType(_set_timesteps_from_donor, scheduler)
    return scheduler


def _table(sampler: Sampler, resolved: str, base: dict, arch: str):
    """``steps -> sigma table`` for a k-diffusion-style sampler whose schedule the webui computes (None for
    the timestep samplers, and for Beta, which diffusers' own flag gives)."""
    from adapterhub.sample import schedules

    name = "uniform" if resolved == DISCRETE else resolved
    if sampler.timestep_based or name not in schedules.SCHEDULES or not schedules.supports(sampler.scheduler):
        return None
    return functools.partial(schedules.sigmas, name, base_config=base, arch=arch,
                             discard_penultimate=sampler.discard_penultimate)


def _set_timesteps_on_table(self, num_inference_steps=None, device=None, **kwargs):
    """``set_timesteps`` of a scheduler made by :func:`make_scheduler`: the table for this many steps (explicit
    ``timesteps`` / ``sigmas`` from the caller go to the class's own)."""
    if kwargs or num_inference_steps is None:
        return type(self).set_timesteps(self, num_inference_steps, device=device, **kwargs)
    from adapterhub.sample.schedules import set_sigmas

    set_sigmas(self, self._adapterhub_table(int(num_inference_steps)), device=device)


def _set_timesteps_from_donor(self, num_inference_steps=None, device=None, **kwargs):
    """``set_timesteps`` of a scheduler whose class lacks the schedule's flag: the donor's sigmas."""
    type(self).set_timesteps(self, num_inference_steps, device=device, **kwargs)
    if not kwargs:
        donor = self._adapterhub_sigma_donor
        donor.set_timesteps(num_inference_steps, device=device)
        self.sigmas, self.timesteps = donor.sigmas.clone(), donor.timesteps.clone()


@functools.cache
def _cfg_pp_class():
    import diffusers

    class DDIMCFGPPScheduler(diffusers.DDIMScheduler):
        """The webui's DDIM CFG++ (``ddim_cfgpp``, after Chung et al., "CFG++"): the generator divides the CFG
        scale by 12.5 (``cfg_scale_multiplier``) and hands the unconditional prediction to ``step``
        (``wants_uncond``); x0 comes from the guided prediction, the direction to x_{t-1} from the unconditional
        one: DDIM's step plus ``sqrt(1 - alpha_prev) x (eps_uncond - eps_guided)``."""

        cfg_scale_multiplier = 1 / 12.5
        wants_uncond = True

        def step(self, model_output, timestep, sample, eta: float = 0.0, use_clipped_model_output: bool = False,
                 generator=None, variance_noise=None, return_dict: bool = True, uncond_output=None):
            out = super().step(model_output, timestep, sample, eta, use_clipped_model_output, generator,
                               variance_noise, return_dict=True)
            prev = out.prev_sample
            if uncond_output is not None:
                t = int(timestep)
                before = t - self.config.num_train_timesteps // self.num_inference_steps
                alpha_prev = self.alphas_cumprod[before] if before >= 0 else self.final_alpha_cumprod
                difference = uncond_output - model_output
                if self.config.prediction_type == "v_prediction":  # eps = sqrt(a_t) v + sqrt(1 - a_t) x
                    difference = difference * self.alphas_cumprod[t] ** 0.5
                elif self.config.prediction_type != "epsilon":
                    raise AdapterhubError(f"DDIM CFG++ takes epsilon or v-prediction models, not "
                                          f"{self.config.prediction_type}")
                prev = prev + (1 - alpha_prev) ** 0.5 * difference
            if not return_dict:
                return (prev,)
            out.prev_sample = prev
            return out

    return DDIMCFGPPScheduler


def _init_params(cls) -> set[str]:
    import inspect

    return set(inspect.signature(cls.__init__).parameters) - {"self"}


def set_timesteps(scheduler, steps: int, device=None) -> None:
    """``scheduler.set_timesteps(steps)`` (a scheduler from :func:`make_scheduler` lays out its webui table)."""
    scheduler.set_timesteps(steps, device=device)


_SD_DEFAULT = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
               "prediction_type": "epsilon"}
