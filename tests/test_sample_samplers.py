"""Webui sampler names and schedule types -> diffusers schedulers; sigma tables against sampling.md §3.4."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from adapterhub.errors import AdapterhubError
from adapterhub.sample.samplers import (
    SAMPLERS,
    make_scheduler,
    resolve_sampler,
    sampler_names,
    schedule_label,
    set_timesteps,
)

# sampling.md §3.4, computed with numpy from SD1 scaled_linear betas (0.00085 -> 0.012, 1000 steps)
KARRAS_5 = [14.614641, 4.796535, 1.2741, 0.24795, 0.029167, 0.0]
DISCRETE_5 = [14.614641, 4.086081, 1.61558, 0.69515, 0.029167, 0.0]
SD_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "prediction_type": "epsilon", "steps_offset": 1, "timestep_spacing": "leading"}

# the diffusers class of every webui name (the table of diffusers' scheduler overview, §3.4)
EXPECTED = {
    "DPM++ 2M": "DPMSolverMultistepScheduler", "DPM++ SDE": "DPMSolverSDEScheduler",
    "DPM++ 2M SDE": "DPMSolverMultistepScheduler", "DPM++ 2M SDE Heun": "DPMSolverMultistepScheduler",
    "DPM++ 2S a": "KDiffusionScheduler", "DPM++ 3M SDE": "DPMSolverMultistepScheduler",
    "Euler a": "EulerAncestralDiscreteScheduler", "Euler": "EulerDiscreteScheduler", "LMS": "LMSDiscreteScheduler",
    "Heun": "HeunDiscreteScheduler", "DPM2": "KDPM2DiscreteScheduler", "DPM2 a": "KDPM2AncestralDiscreteScheduler",
    "DDIM": "DDIMScheduler", "DDIM CFG++": "DDIMScheduler", "PLMS": "PNDMScheduler",
    "UniPC": "UniPCMultistepScheduler", "LCM": "LCMScheduler",
    # no diffusers scheduler: k-diffusion's algorithms behind a scheduler interface (test_sample_ksamplers.py)
    "DPM fast": "KDiffusionScheduler", "DPM adaptive": "KDiffusionScheduler", "Restart": "KDiffusionScheduler",
}
AUTOMATIC = {"DPM++ 2M": "Karras", "DPM++ SDE": "Karras", "DPM++ 2M SDE": "Exponential",
             "DPM++ 2M SDE Heun": "Exponential", "DPM++ 2S a": "Karras", "DPM++ 3M SDE": "Exponential",
             "Euler a": "Automatic", "Euler": "Automatic", "LMS": "Automatic", "Heun": "Automatic", "DPM2": "Karras",
             "DPM2 a": "Karras", "DDIM": "Automatic", "DDIM CFG++": "Automatic", "PLMS": "Automatic",
             "UniPC": "Automatic", "LCM": "Automatic",
             "DPM fast": "Automatic", "DPM adaptive": "Automatic", "Restart": "Karras"}


def test_every_name_is_listed():
    assert sorted(sampler_names()) == sorted(EXPECTED)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_sampler_maps_to_its_scheduler(name):
    sampler, key = resolve_sampler(name)
    assert sampler.scheduler == EXPECTED[name]
    assert schedule_label(sampler, key) == AUTOMATIC[name]
    if sampler.requires and importlib.util.find_spec(sampler.requires) is None:
        with pytest.raises(AdapterhubError, match=f"needs the {sampler.requires} package"):
            make_scheduler(name, "Automatic", SD_BETAS)
        return
    scheduler = make_scheduler(name, "Automatic", SD_BETAS)
    assert EXPECTED[name] in [c.__name__ for c in type(scheduler).__mro__]  # DDIM CFG++: a DDIMScheduler
    set_timesteps(scheduler, 6)
    if EXPECTED[name] == "KDiffusionScheduler":  # its calls are produced as it runs: the schedule is known
        assert len(scheduler.sigmas) == 7 and float(scheduler.sigmas[-1]) == 0.0
        return
    assert len(scheduler.timesteps) >= 5
    for key in ("algorithm_type", "solver_order", "solver_type"):
        if key in sampler.config:
            assert scheduler.config[key] == sampler.config[key]


def _karras(n, lo=0.0291672, hi=14.614641, rho=7.0):
    """k-diffusion's get_sigmas_karras, written out (the reference table above is its n=5 case)."""
    ramp = [i / (n - 1) for i in range(n)]
    return [(hi ** (1 / rho) + r * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho for r in ramp] + [0.0]


# the webui's DPM2 / DPM2 a / DPM++ 3M SDE: one step more, then the next-to-last sigma dropped
KARRAS_6_DISCARDED = [*_karras(6)[:-2], 0.0]
assert _karras(5) == pytest.approx(KARRAS_5, rel=1e-4)


@pytest.mark.parametrize("name, schedule, table", [
    ("DPM++ 2M", "Automatic", KARRAS_5), ("DPM++ 2M", "Karras", KARRAS_5), ("Euler", "Karras", KARRAS_5),
    ("Euler a", "Karras", KARRAS_5), ("Heun", "Karras", KARRAS_5), ("DPM2", "Automatic", KARRAS_6_DISCARDED),
    ("DPM2 a", "Karras", KARRAS_6_DISCARDED),
    ("Euler", "Automatic", DISCRETE_5), ("Euler a", "Automatic", DISCRETE_5), ("Heun", "Automatic", DISCRETE_5),
    ("Euler", "Uniform", DISCRETE_5), ("Restart", "Automatic", KARRAS_5), ("DPM fast", "Automatic", DISCRETE_5),
    ("DPM adaptive", "Karras", KARRAS_5),
])
def test_sigma_tables_equal_the_reference(name, schedule, table):
    scheduler = make_scheduler(name, schedule, SD_BETAS)
    set_timesteps(scheduler, 5)
    sigmas = [float(s) for s in torch.unique_consecutive(scheduler.sigmas)]
    assert sigmas == pytest.approx(table, rel=1e-4, abs=1e-6)


def test_exponential_is_log_uniform_between_the_table_ends():
    scheduler = make_scheduler("DPM++ 2M SDE", "Automatic", SD_BETAS)
    set_timesteps(scheduler, 5)
    sigmas = scheduler.sigmas[:-1].double()
    want = torch.linspace(torch.tensor(14.614641).log(), torch.tensor(0.029167).log(), 5, dtype=torch.float64).exp()
    torch.testing.assert_close(sigmas, want, rtol=1e-4, atol=1e-6)


def test_k_samplers_start_from_sigma_max_noise():
    scheduler = make_scheduler("Euler a", "Automatic", SD_BETAS)
    set_timesteps(scheduler, 20)
    assert float(scheduler.init_noise_sigma) == pytest.approx(14.614641, rel=1e-5)  # x = noise * sigmas[0]


def test_ddim_uses_the_webui_timesteps():
    scheduler = make_scheduler("DDIM", "Automatic", SD_BETAS)
    set_timesteps(scheduler, 5)
    assert scheduler.timesteps.tolist() == [801, 601, 401, 201, 1]  # range(0, 1000, 1000 // 5) + 1, reversed


@pytest.mark.parametrize("text, name, schedule", [
    ("DPM++ 2M Karras", "DPM++ 2M", "Karras"), ("dpm++ 2m", "DPM++ 2M", "Karras"),
    ("k_euler_a", "Euler a", "Automatic"), ("Euler a", "Euler a", "Automatic"),
    ("DPM++ 2M SDE Exponential", "DPM++ 2M SDE", "Exponential"), ("DPM++ 2M SDE Karras", "DPM++ 2M SDE", "Karras"),
    ("Euler Karras", "Euler", "Karras"),
])
def test_old_combined_names_and_aliases(text, name, schedule):
    sampler, key = resolve_sampler(text)
    assert (sampler.name, schedule_label(sampler, key)) == (name, schedule)


def test_unknown_sampler_lists_the_valid_ones():
    with pytest.raises(AdapterhubError) as err:
        resolve_sampler("Eulr")
    message = str(err.value)
    assert "\n" not in message and "unknown sampler 'Eulr'" in message
    for name in SAMPLERS:
        assert name in message


@pytest.mark.parametrize("name, schedule, match", [
    ("DDIM CFG++", "Karras", "timestep sampler"), ("Euler", "Karass", "unknown schedule type"),
    ("Euler", "Sigmoid", "unknown schedule type"), ("DDIM", "Karras", "timestep sampler"),
])
def test_refusals_are_one_line(name, schedule, match):
    with pytest.raises(AdapterhubError, match=match) as err:
        resolve_sampler(name, schedule)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("schedule", ["Polyexponential", "KL Optimal", "Align Your Steps", "Simple", "Normal", "DDIM"])
@pytest.mark.parametrize("name", ["Euler", "Euler a", "DPM++ 2M", "Heun", "Restart"])
def test_schedules_without_a_diffusers_flag_run_on_their_table(name, schedule):
    """The webui's schedule types diffusers has no flag for: the scheduler evaluates the model at exactly the
    table :func:`adapterhub.sample.schedules.sigmas` computes (tests/test_sample_schedules.py checks the tables
    against k-diffusion and the webui's definitions, and the stepping against k-diffusion's samplers)."""
    from adapterhub.sample import schedules
    from adapterhub.sample.samplers import resolve_sampler, schedule_label

    sampler, key = resolve_sampler(name, schedule)
    assert schedule_label(sampler, key) == schedule  # what the infotext writes
    scheduler = make_scheduler(name, schedule, SD_BETAS)
    set_timesteps(scheduler, 6)
    table = schedules.sigmas(key, 6, SD_BETAS)
    evaluated = [float(s) for s in table if float(s) > 0]
    got = torch.unique_consecutive(scheduler.sigmas.float())
    if name != "Restart":  # Restart's own sigmas include its restarts; its starting point is the table's
        assert [float(s) for s in got if float(s) > 0] == pytest.approx(evaluated, rel=1e-6)
    if name != "DPM++ 2M":  # diffusers' DPM-Solver works on the variance-preserving scale: its noise is unit
        assert float(scheduler.init_noise_sigma) == pytest.approx(float(table[0]), rel=1e-5)


def test_align_your_steps_follows_the_architecture():
    from adapterhub.sample import schedules

    sd1, sdxl = (make_scheduler("Euler", "Align Your Steps", SD_BETAS, arch) for arch in ("sd1", "sdxl"))
    for scheduler in (sd1, sdxl):  # NVIDIA's tables have 11 sigmas: the webui uses them as they are for 11 steps
        set_timesteps(scheduler, 11)
    assert [round(float(s), 3) for s in sd1.sigmas[:-1]] == list(schedules.AYS_SD1)
    assert [round(float(s), 3) for s in sdxl.sigmas[:-1]] == list(schedules.AYS_SDXL)


def test_generator_runs_an_explicit_schedule(tiny_sd1):
    """End to end: the generator samples on the table and writes the webui's ``Schedule type``."""
    from adapterhub.sample.generator import Generator, Request

    gen = Generator(tiny_sd1, hash_model=False)
    out = gen.generate(Request("a house", seed=3, steps=4, sampler="Euler a", schedule="KL Optimal", width=64,
                               height=64))
    other = gen.generate(Request("a house", seed=3, steps=4, sampler="Euler a", width=64, height=64))
    assert "Sampler: Euler a, Schedule type: KL Optimal," in out.infotexts[0]
    assert out.images[0].size == (64, 64) and out.images[0].tobytes() != other.images[0].tobytes()


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ddim_cfg_pp_follows_the_webui(tiny_sd1, prediction):
    """DDIM CFG++ against the webui's ``ddim_cfgpp`` loop written out here (modules/sd_samplers_timesteps_impl.py:
    the CFG scale times 1/12.5 for the guided eps, ``x = sqrt(a_prev) x0(guided) + sqrt(1 - a_prev) eps_uncond``)
    over the same tiny UNet, on the webui's DDIM timesteps (checked above against the webui's table)."""
    import copy

    from adapterhub.sample.generator import Generator, Request

    pipe = copy.deepcopy(tiny_sd1)
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=prediction)
    gen = Generator(pipe, hash_model=False)
    steps, cfg, seeds = 4, 9.0, [3, 4]
    got = gen.generate(Request("a house", negative="fog", seed=3, steps=steps, cfg=cfg, sampler="DDIM CFG++",
                               width=64, height=64, batch=2), output="latent")
    assert "Sampler: DDIM CFG++," in got.infotexts[0]
    cond, uncond = gen.encode("a house", "fog")
    embeds = torch.cat([uncond.embeds.repeat(2, 1, 1), cond.embeds.repeat(2, 1, 1)])
    ddim = make_scheduler("DDIM", "Automatic", pipe.scheduler.config)
    set_timesteps(ddim, steps)
    ac = ddim.alphas_cumprod
    x = torch.cat([torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(s)) for s in seeds])
    with torch.no_grad():
        for t in ddim.timesteps:
            out = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=embeds).sample
            a_t = ac[int(t)]
            if prediction == "v_prediction":  # the webui's eps of a v model
                out = a_t ** 0.5 * out + (1 - a_t) ** 0.5 * torch.cat([x, x])
            e_uncond, e_cond = out.chunk(2)
            e_t = e_uncond + (e_cond - e_uncond) * (cfg / 12.5)
            prev = int(t) - 1000 // steps
            a_prev = ac[prev] if prev >= 0 else ac[0]
            x0 = (x - (1 - a_t) ** 0.5 * e_t) / a_t ** 0.5
            x = a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * e_uncond
    torch.testing.assert_close(got.latents, x, rtol=1e-5, atol=1e-5)
    plain = gen.generate(Request("a house", negative="fog", seed=3, steps=steps, cfg=cfg, sampler="DDIM", width=64,
                                 height=64, batch=2), output="latent")
    assert (plain.latents - got.latents).abs().max() > 1e-3  # CFG++ is not DDIM


def test_dpmpp_sde_noise_comes_from_the_image_seeds(tiny_sd1):
    """DPM++ SDE draws its noise from a Brownian tree; the webui seeds the tree with the images' seeds
    (``create_noise_sampler``: the same image from the same seed, whatever the batch). Unseeded, diffusers draws a
    random seed per request and no image could be made again, not even with --from-png."""
    from adapterhub.sample.generator import Generator, Request

    gen = Generator(tiny_sd1, hash_model=False)
    common = dict(steps=3, sampler="DPM++ SDE", width=64, height=64)
    first = gen.generate(Request("a house", seed=5, **common), output="latent").latents
    again = gen.generate(Request("a house", seed=5, **common), output="latent").latents
    assert torch.equal(first, again)
    pair = gen.generate(Request("a house", seed=4, batch=2, **common), output="latent").latents
    scale = float(first.abs().max())
    assert float((pair[1:] - first).abs().max()) < 1e-4 * scale  # the batch's second image: seed 5 (rounding only)
    assert float((pair[:1] - first).abs().max()) > 0.1 * scale  # seed 4 is another image
