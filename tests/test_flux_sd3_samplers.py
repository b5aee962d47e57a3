"""The webui's samplers and schedule types on Flux and SD3 (#21), as Forge runs them on flow models.

Oracles: k-diffusion's own ``sample_*`` functions (the installed ``k-diffusion`` package) driven by a denoiser this
file writes from the pipelines (``x - sigma v``, v the transformer's guided velocity, as diffusers' pipelines call
it), on the same sigmas and the same noise (the seed's generator; k-diffusion's ``BrownianTreeNoiseSampler`` for the
SDE samplers); k-diffusion's ``get_sigmas_*`` for Karras, Exponential and Polyexponential; ComfyUI's / Forge's
definitions of Simple and Beta written out here over the model's shifted sigmas; diffusers' pipelines for Euler on
their own schedule. fp32 on CPU, 64 px, 3 steps.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from flux_helpers import k  # noqa: F401  (the k-diffusion fixture)
from flux_helpers import cli as _cli

SIZE, STEPS, LATENT = 64, 3, (1, 4, 32, 32)
SAMPLERS = {"Euler": "euler", "Euler a": "euler_ancestral", "Heun": "heun", "DPM2": "dpm_2",
            "DPM2 a": "dpm_2_ancestral", "LMS": "lms", "DPM++ 2M": "dpmpp_2m", "DPM++ 2S a": "dpmpp_2s_ancestral",
            "DPM++ SDE": "dpmpp_sde", "DPM++ 2M SDE": "dpmpp_2m_sde", "DPM++ 3M SDE": "dpmpp_3m_sde"}
DISCARD = {"DPM2", "DPM2 a", "DPM++ 3M SDE"}  # the webui's discard_next_to_last_sigma
BROWNIAN = {"DPM++ SDE", "DPM++ 2M SDE", "DPM++ 3M SDE"}  # the webui's brownian_noise
# the oracle's torchsde trees compare float32 ends with their rounded copies and warn; the values are unaffected
pytestmark = pytest.mark.filterwarnings("ignore:Should have ta>=t0:UserWarning")




def _pipe(request, family):
    return request.getfixturevalue("tiny_flux" if family == "flux" else "tiny_sd3")


def _generator(pipe):
    from adapterhub.sample.flow import FlowGenerator

    return FlowGenerator(pipe, model_name="tiny", hash_model=False)


def _req(prompt, **kwargs):
    from adapterhub.sample import FlowRequest

    return FlowRequest(prompt, **{"steps": STEPS, "width": SIZE, "height": SIZE, **kwargs})


def _oracle_denoiser(pipe, family, prompt, negative="", cfg=1.0, guidance=3.5):
    """The flow model as k-diffusion's denoiser, written from diffusers' pipelines: ``x - sigma v`` with v the
    transformer's velocity at timestep 1000 sigma (Flux's divided by 1000 again, its latents packed 2 x 2), guided
    with CFG as the pipeline guides it."""
    with torch.no_grad():
        if family == "flux":  # FluxPipeline: true CFG with the negative prompt above 1
            encoded = {p: pipe.encode_prompt(p, prompt_2=None, device="cpu") for p in {prompt, negative}}
            img_ids = pipe._prepare_latent_image_ids(1, 16, 16, "cpu", torch.float32)
            g = torch.full([1], guidance, dtype=torch.float32).expand(1) if guidance is not None else None

            def velocity(packed, sigma, text):
                pe, pooled, ids = encoded[text]
                return pipe.transformer(hidden_states=packed, timestep=sigma * 1000 / 1000, guidance=g,
                                        pooled_projections=pooled, encoder_hidden_states=pe, txt_ids=ids,
                                        img_ids=img_ids, return_dict=False)[0]

            def denoiser(x, sigma):
                with torch.no_grad():
                    packed = pipe._pack_latents(x, 1, 4, 32, 32)
                    v = velocity(packed, sigma, prompt)
                    if cfg > 1:
                        v_u = velocity(packed, sigma, negative)
                        v = v_u + cfg * (v - v_u)
                    return x - sigma.reshape(-1, 1, 1, 1) * pipe._unpack_latents(v, SIZE, SIZE, pipe.vae_scale_factor)
            return denoiser
        pe, ne, pp, npp = pipe.encode_prompt(prompt, None, None, negative_prompt=negative, device="cpu",
                                             do_classifier_free_guidance=True)

        def denoiser(x, sigma):
            with torch.no_grad():
                v = pipe.transformer(hidden_states=torch.cat([x, x]), timestep=(sigma * 1000).repeat(2),
                                     encoder_hidden_states=torch.cat([ne, pe]),
                                     pooled_projections=torch.cat([npp, pp]), return_dict=False)[0]
                v_u, v_c = v.chunk(2)
                return x - sigma.reshape(-1, 1, 1, 1) * (v_u + cfg * (v_c - v_u))
        return denoiser


def _table_ends(pipe, family):
    """(sigma_min, sigma_max) of the model's shifted sigma table, from the shift formulas: Flux's first entry is
    t = 1 / 10 000 shifted by mu for a 64 px image (diffusers' calculate_shift of its 2 x 2 tokens); SD3's
    t = 1 / 1000 shifted by 3."""
    config = pipe.scheduler.config
    if family == "flux":
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        tokens = (SIZE // pipe.vae_scale_factor // 2) ** 2
        mu = calculate_shift(tokens, config.base_image_seq_len, config.max_image_seq_len, config.base_shift,
                             config.max_shift)
        return math.exp(mu) / (math.exp(mu) + (1 / 1e-4 - 1)), 1.0
    s = config.shift
    return s * 1e-3 / (1 + (s - 1) * 1e-3), 1.0


def _karras(k, pipe, family, steps, discard=False):
    lo, hi = _table_ends(pipe, family)
    sigmas = k.sampling.get_sigmas_karras(steps + int(discard), lo, hi)
    return torch.cat([sigmas[:-2], sigmas[-1:]]) if discard else sigmas


def _noise_sampler(k, name, x, sigmas, gen, seed):
    if name in BROWNIAN:
        return k.sampling.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=[seed])
    return lambda sigma, sigma_next: torch.randn(LATENT, generator=gen)


def _oracle(k, name, denoiser, sigmas, seed, init=None):
    """k-diffusion's sampler from the seed's first draw (``sigma_0 noise``; img2img ``sigma noise + (1 - sigma)
    init``), its later noise the same generator's next draws (a Brownian tree seeded with the seed for the SDE
    samplers, over the whole schedule's sigmas)."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(LATENT, generator=gen)
    full = sigmas
    if init is not None:
        sigmas, init = init
    x = noise * sigmas[0] if init is None else sigmas[0] * noise + (1 - sigmas[0]) * init
    fn = getattr(k.sampling, f"sample_{SAMPLERS[name]}")
    kwargs = {} if name in ("Euler", "Heun", "DPM2", "LMS", "DPM++ 2M") else \
        {"noise_sampler": _noise_sampler(k, name, x, full, gen, seed)}
    return fn(denoiser, x, sigmas, disable=True, **kwargs)


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_each_sampler_equals_k_diffusions_on_the_flow_model(request, k, family, name):
    pipe = _pipe(request, family)
    gen = _generator(pipe)
    cfg = 1.0 if family == "flux" else 4.0
    seen = []
    result = gen.generate(gen.request(_req("a red house", negative="ugly", cfg=cfg, seed=11, sampler=name,
                                           schedule="Karras")), output="latent",
                          progress=lambda done, total: seen.append((done, total)))
    sigmas = _karras(k, pipe, family, STEPS, name in DISCARD)
    theirs = _oracle(k, name, _oracle_denoiser(pipe, family, "a red house", "ugly", cfg), sigmas, 11)
    torch.testing.assert_close(result.latents, theirs, atol=1e-6, rtol=1e-6)
    assert seen == [(1, STEPS), (2, STEPS), (3, STEPS)]  # one report per sampling step, whatever its calls
    assert f"Sampler: {name}, Schedule type: Karras, " in result.infotexts[0]


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_the_oracle_tells_samplers_and_schedules_apart(tiny_flux, tiny_sd3, family):
    gen = _generator(tiny_flux if family == "flux" else tiny_sd3)

    def latents(**kw):
        return gen.generate(gen.request(_req("a cat", seed=2, **kw)), output="latent").latents

    euler = latents(sampler="Euler", schedule="Karras")
    for other in [{"sampler": "Euler a", "schedule": "Karras"}, {"sampler": "DPM++ 2M", "schedule": "Karras"},
                  {"sampler": "Euler", "schedule": "Simple" if family == "sd3" else "Beta"}]:
        assert not torch.allclose(euler, latents(**other), atol=1e-3), other


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_euler_on_the_pipelines_own_sigmas_equals_the_pipeline(request, family):
    """The k-diffusion loop's Euler on the pipeline's schedule is diffusers' pipeline (to float32 rounding:
    k-diffusion steps by (x - x0) / sigma, the scheduler by v); the default path stays the pipeline's itself."""
    from dataclasses import replace

    pipe = _pipe(request, family)
    gen = _generator(pipe)
    kw = {"cfg": 1.0} if family == "flux" else {"cfg": 4.0, "negative": "ugly"}
    req = gen.request(_req("a dog", seed=3, **kw))
    loop = gen.k_denoise(req, "a dog", [3])
    default = gen.generate(req, output="latent").latents
    extra = {"guidance_scale": 3.5} if family == "flux" else {"guidance_scale": 4.0, "negative_prompt": "ugly"}
    theirs = pipe("a dog", height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="latent",
                  generator=torch.Generator().manual_seed(3), **extra).images
    if family == "flux":
        theirs = pipe._unpack_latents(theirs, SIZE, SIZE, pipe.vae_scale_factor)
    assert torch.equal(default, theirs)
    torch.testing.assert_close(loop, theirs, atol=1e-5, rtol=1e-5)
    if family == "flux":  # Simple over Flux's 10 000-entry table is the pipeline's t = 1 .. 1/n for n | 10 000
        simple = gen.generate(replace(req, schedule="Simple", steps=4), output="latent").latents
        four = pipe("a dog", height=SIZE, width=SIZE, num_inference_steps=4, output_type="latent",
                    generator=torch.Generator().manual_seed(3), **extra).images
        torch.testing.assert_close(simple, pipe._unpack_latents(four, SIZE, SIZE, pipe.vae_scale_factor),
                                   atol=1e-5, rtol=1e-5)


# -- schedules ------------------------------------------------------------------------------------------
def _table(pipe, family):
    from adapterhub.sample.flow_samplers import flow_table

    return flow_table(pipe.scheduler.config, family, SIZE, SIZE, pipe.vae_scale_factor, 2)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_the_model_table_is_the_shifted_flow_time(request, family):
    pipe = _pipe(request, family)
    table = _table(pipe, family)
    n = 10000 if family == "flux" else 1000
    assert table.shape == (n,) and table.dtype == torch.float32
    lo, hi = _table_ends(pipe, family)
    t = np.arange(1, n + 1) / n
    if family == "flux":
        mu = math.log(lo / (1 - lo) * (1 / 1e-4 - 1))  # the mu the first entry was shifted with
        expected = math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    else:
        expected = 3.0 * t / (1 + 2.0 * t)
    np.testing.assert_allclose(table.numpy(), expected, rtol=1e-6, atol=0)
    assert float(table[-1]) == hi


def _simple(table, steps):
    """ComfyUI's simple_scheduler: ``sigmas[-(1 + int(x * len / steps))]`` for x < steps, then 0."""
    stride = len(table) / steps
    return torch.tensor([float(table[-(1 + int(x * stride))]) for x in range(steps)] + [0.0])


def _beta(table, steps, alpha=0.6, beta=0.6):
    """Forge's beta_scheduler (modules/sd_schedulers.py): ``sigma_min + ppf(x) (sigma_max - sigma_min)`` for
    x in ``1 - linspace(0, 1, steps)``, then 0."""
    from scipy import stats

    lo, hi = float(table[0]), float(table[-1])
    return torch.FloatTensor([lo + stats.beta.ppf(x, alpha, beta) * (hi - lo)
                              for x in 1 - np.linspace(0, 1, steps)] + [0.0])


def _forge_maps(family, shift):
    """Forge's predictors: PredictionFlux's timestep(sigma) = sigma = sigma(timestep); PredictionDiscreteFlow's
    timestep(sigma) = 1000 sigma and sigma(t) = shift (t / 1000) / (1 + (shift - 1) t / 1000)."""
    if family == "flux":
        return (lambda s: s), (lambda t: t)
    return (lambda s: s * 1000), (lambda t: shift * (t / 1000.0) / (1 + (shift - 1) * (t / 1000.0)))


def _normal(table, steps, family, shift, sgm=False):
    """Forge's normal_scheduler (SGM Uniform: sgm=True) through the predictor's maps, then 0."""
    timestep, sigma = _forge_maps(family, shift)
    start, end = timestep(torch.tensor(float(table[-1]))), timestep(torch.tensor(float(table[0])))
    ts = torch.linspace(start, end, steps + 1)[:-1] if sgm else torch.linspace(start, end, steps)
    return torch.FloatTensor([sigma(t) for t in ts] + [0.0])


def _ddim(table, steps):
    """Forge's ddim_scheduler: table entries 1, 1 + ss, ... (ss = max(len // steps, 1)), descending, then 0."""
    sigs, ss, x = [], max(len(table) // steps, 1), 1
    while x < len(table):
        sigs.append(float(table[x]))
        x += ss
    return torch.FloatTensor(sigs[::-1] + [0.0])


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("steps", [1, 3, 20, 30])
def test_schedules_follow_their_definitions(request, k, family, steps):
    from adapterhub.sample.flow_samplers import flow_sigmas

    pipe = _pipe(request, family)
    table = _table(pipe, family)
    lo, hi = float(table[0]), float(table[-1])

    def ours(name, discard=False):
        return flow_sigmas(name, steps, table, lambda n: pytest.fail("not the pipeline's"), discard)

    assert torch.equal(ours("Simple"), _simple(table, steps))
    torch.testing.assert_close(ours("Beta"), _beta(table, steps), atol=0, rtol=1e-6)
    shift = 1.0 if family == "flux" else float(pipe.scheduler.config.shift)
    for name, sgm in (("Normal", False), ("SGM Uniform", True)):
        mine = flow_sigmas(name, steps, table, lambda n: pytest.fail("not the pipeline's"), False, family, shift)
        torch.testing.assert_close(mine, _normal(table, steps, family, shift, sgm), atol=0, rtol=1e-6)
        assert len(mine) == steps + 1 and float(mine[-1]) == 0 and (mine[:-1] > 0).all() and (mine[:-1] <= 1).all()
    assert torch.equal(ours("DDIM"), _ddim(table, steps))
    torch.testing.assert_close(ours("Karras"), k.sampling.get_sigmas_karras(steps, lo, hi), atol=0, rtol=1e-6)
    torch.testing.assert_close(ours("Exponential"), k.sampling.get_sigmas_exponential(steps, lo, hi), atol=0,
                               rtol=1e-6)
    torch.testing.assert_close(ours("Polyexponential"), k.sampling.get_sigmas_polyexponential(steps, lo, hi),
                               atol=0, rtol=1e-6)
    t = torch.arange(steps + 1) / steps  # arXiv:2407.12173, as the webui's KL Optimal: steps + 1 points
    torch.testing.assert_close(ours("KL Optimal"), torch.tan(t * math.atan(lo) + (1 - t) * math.atan(hi)),
                               atol=0, rtol=1e-6)
    karras = k.sampling.get_sigmas_karras(steps + 1, lo, hi)
    torch.testing.assert_close(ours("Karras", discard=True), torch.cat([karras[:-2], karras[-1:]]), atol=0, rtol=1e-6)


@pytest.mark.parametrize("family, name, schedule", [("flux", "Euler", "Normal"), ("sd3", "DPM++ 2M", "SGM Uniform"),
                                                    ("flux", "Euler a", "DDIM"), ("sd3", "Euler", "Normal")])
def test_forges_table_schedules_drive_k_diffusions_sampler(request, k, family, name, schedule):
    """Normal, SGM Uniform and DDIM as Forge computes them on the model, run by k-diffusion's sampler."""
    pipe = _pipe(request, family)
    gen = _generator(pipe)
    cfg = 1.0 if family == "flux" else 4.0
    result = gen.generate(gen.request(_req("a red house", cfg=cfg, seed=5, sampler=name, schedule=schedule)),
                          output="latent")
    table = _table(pipe, family)
    shift = 1.0 if family == "flux" else float(pipe.scheduler.config.shift)
    sigmas = _ddim(table, STEPS) if schedule == "DDIM" else _normal(table, STEPS, family, shift,
                                                                      schedule == "SGM Uniform")
    theirs = _oracle(k, name, _oracle_denoiser(pipe, family, "a red house", "", cfg), sigmas, 5)
    torch.testing.assert_close(result.latents, theirs, atol=1e-6, rtol=1e-6)
    assert f"Sampler: {name}, Schedule type: {schedule}, " in result.infotexts[0]


def test_from_png_warns_of_a_beta_setting_it_does_not_run(tmp_path):
    from PIL import Image, PngImagePlugin

    from adapterhub.sample.rerun import from_png

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat\nSteps: 3, Sampler: Euler, Schedule type: Beta, CFG scale: 1, Seed: 1, "
                                "Size: 64x64, Beta schedule alpha: 0.5, Beta schedule beta: 0.6, Version: f2.0.1")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png", pnginfo=info)
    options, warnings = from_png(str(tmp_path / "a.png"), {"adapter_dirs": ()}, set())
    assert options["schedule"] == "Beta"
    assert [w for w in warnings if "Beta" in w] == [
        "Beta schedule alpha 0.5: the Beta schedule runs with Forge's default 0.6, so the image will differ"]


def test_beta_runs_from_the_tables_top_to_its_bottom():
    from adapterhub.sample.flow_samplers import beta_sigmas

    table = torch.linspace(0.01, 1.0, 10)
    sigmas = beta_sigmas(12, table)
    assert len(sigmas) == 13 and float(sigmas[0]) == 1.0 and float(sigmas[-2]) == pytest.approx(0.01)
    assert (sigmas[:-1].diff() < 0).all()  # Forge's: quantiles between the ends, no table positions repeated


# -- img2img, infotext, --from-png, refusals ------------------------------------------------------------
@pytest.mark.parametrize("family, name, schedule", [("flux", "Euler a", "Simple"), ("sd3", "DPM++ 2M SDE", "Beta"),
                                                     ("sd3", "DPM2", "Karras")])
def test_img2img_runs_the_webuis_last_steps_of_the_schedule(request, k, family, name, schedule):
    """img2img at strength 0.5 of 4 steps: the webui's ``int(0.5 x 4) + 1 = 3`` last steps (sigma_sched) from
    ``sigma noise + (1 - sigma) init``; the Brownian tree spans the whole schedule, as the webui's."""
    from PIL import Image

    pipe = _pipe(request, family)
    gen = _generator(pipe)
    picture = Image.fromarray((np.indices((SIZE, SIZE, 3)).sum(0) * 7 % 255).astype(np.uint8))
    cfg = 1.0 if family == "flux" else 4.0
    req = gen.request(_req("a boat", seed=5, steps=4, cfg=cfg, sampler=name, schedule=schedule, init_image=picture,
                           denoising_strength=0.5))
    seen = []
    result = gen.generate(req, output="latent", progress=lambda d, t: seen.append(d))
    init = gen.encode_image(picture).float()
    table = _table(pipe, family)
    full = _simple(table, 4) if schedule == "Simple" else _beta(table, 4) if schedule == "Beta" else \
        _karras(k, pipe, family, 4, name in DISCARD)
    theirs = _oracle(k, name, _oracle_denoiser(pipe, family, "a boat", "", cfg), full, 5, init=(full[1:], init))
    torch.testing.assert_close(result.latents, theirs, atol=1e-6, rtol=1e-6)
    assert seen == [1, 2, 3]
    assert "Denoising strength: 0.5" in result.infotexts[0] and f"Schedule type: {schedule}" in result.infotexts[0]


def test_from_png_reruns_a_k_diffusion_sampler_pixel_for_pixel(capsys, tmp_path, tiny_sd3):
    from PIL import Image

    first, again = tmp_path / "first", tmp_path / "again"
    rc, _, err = _cli(capsys, "sample", "--base", "tiny-sd3", "--prompt", "a red cat", "--steps", "3", "--size",
                      "64x64", "--seed", "8", "--sampler", "DPM++ 2M SDE", "--schedule", "Beta", "--out", str(first))
    assert rc == 0, err
    (made,) = sorted(first.glob("*.png"))
    rc, _, err = _cli(capsys, "sample", "--base", "tiny-sd3", "--from-png", str(made), "--out", str(again))
    assert rc == 0, err
    (rerun,) = sorted(again.glob("*.png"))
    with Image.open(made) as a, Image.open(rerun) as b:
        assert "Steps: 3, Sampler: DPM++ 2M SDE, Schedule type: Beta, CFG scale: 7, " in a.info["parameters"]
        assert ", Beta schedule alpha: 0.6, Beta schedule beta: 0.6, Version: " in a.info["parameters"]
        assert a.info["parameters"].replace("RNG: CPU, ", "") == b.info["parameters"].replace("RNG: CPU, ", "")
        assert np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


@pytest.mark.parametrize("base, args, message", [
    ("tiny-flux", ["--sampler", "DDIM"], "sampler 'DDIM': Flux is a flow-matching model; choose Euler, Euler a, "),
    ("tiny-sd3", ["--sampler", "UniPC"], "sampler 'UniPC': SD3 is a flow-matching model; choose Euler, Heun, "),
    ("tiny-flux", ["--schedule", "Align Your Steps"],
     "schedule 'Align Your Steps': Flux samples on its shifted flow-matching sigmas (its noise levels (14.6 .. "
     "0.03) are SD1 / SDXL's); choose Automatic, Simple, Beta, Normal, SGM Uniform, DDIM, Karras"),
    ("tiny-sd3", ["--schedule", "Uniform"], "schedule 'Uniform': SD3 samples on its shifted flow-matching sigmas "
     "(Forge reads the model's 10 000 (Flux) / 1 000 (SD3) table positions as sigmas"),
    ("tiny-sd3", ["--schedule", "align_your_steps"], "(its noise levels (14.6 .. 0.03) are SD1 / SDXL's); choose"),
])
def test_what_the_families_cannot_run_is_refused_before_a_model_loads(capsys, tmp_path, monkeypatch, base, args,
                                                                      message):
    import adapterhub.base

    monkeypatch.setattr(adapterhub.base, "load_base", lambda *a, **kw: pytest.fail("a model was loaded"))
    out = tmp_path / "out"
    rc, _, err = _cli(capsys, "sample", "--base", base, "--prompt", "a cat", "--steps", "2", *args, "--out", str(out))
    assert rc == 2 and message in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1
    assert not out.exists() or not any(out.iterdir())


def test_schedule_names_are_taken_in_any_case(tiny_flux):
    gen = _generator(tiny_flux)
    assert gen.request(_req("a cat", sampler="dpm++ 2m", schedule="kl_optimal")).schedule == "KL Optimal"
    assert gen.request(_req("a cat", sampler="euler a", schedule="beta")).sampler == "Euler a"


def test_step_hook_sees_each_step_of_a_k_diffusion_sampler(tiny_sd3):
    """The server's previews: after each step the latents reached and the step's clean estimate."""
    gen = _generator(copy.copy(tiny_sd3))
    calls = []
    gen.step_hook = lambda i, latents, denoised: calls.append((i, latents.shape, denoised.shape))
    result = gen.generate(gen.request(_req("a cat", seed=1, sampler="Heun", schedule="Karras")), output="latent")
    assert [c[0] for c in calls] == [0, 1, 2] and all(c[1] == c[2] == LATENT for c in calls)
    assert result.latents.shape == LATENT


@pytest.fixture(scope="module")
def served_sd3(adapterhub_cache):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from test_serve_flux import _served

    yield from _served("tiny-sd3")


def test_serve_runs_a_k_diffusion_sampler_as_adapterhub_sample_does(served_sd3, capsys, tmp_path):
    """A Forge client's ``sampler_name`` / ``scheduler`` (the /schedulers key) on SD3: the image and infotext that
    ``adapterhub sample`` writes for the same options."""
    from PIL import Image
    from test_serve_flux import _decoded, _post

    body = {"prompt": "a red cat", "seed": 4, "steps": 3, "width": SIZE, "height": SIZE, "cfg_scale": 5,
            "sampler_name": "DPM++ 2M SDE", "scheduler": "kl_optimal"}
    response = _post(served_sd3, "txt2img", **body)
    (served,) = _decoded(response)
    out = tmp_path / "out"
    rc, _, err = _cli(capsys, "sample", "--base", "tiny-sd3", "--prompt", "a red cat", "--seed", "4", "--steps", "3",
                      "--size", "64x64", "--cfg", "5", "--sampler", "DPM++ 2M SDE", "--schedule", "KL Optimal",
                      "--out", str(out))
    assert rc == 0, err
    (made,) = sorted(out.glob("*.png"))
    with Image.open(made) as image:
        assert np.array_equal(np.asarray(served.convert("RGB")), np.asarray(image.convert("RGB")))
        assert "Sampler: DPM++ 2M SDE, Schedule type: KL Optimal, " in image.info["parameters"]
    assert "Sampler: DPM++ 2M SDE, Schedule type: KL Optimal, " in response.json()["info"]


def test_compiled_backend_runs_k_diffusion_samplers_switching_stacks_without_recompiling(tiny_flux, tmp_path,
                                                                                       monkeypatch):
    """``--backend compiled`` with Euler a on Karras, DPM++ 2M on Beta, then the pipeline's Euler: the same compiled
    transformer (dynamo's ``aot_eager``) serves both loops; switching LoRAs compiles nothing again and every image equals the eager one."""
    from dataclasses import replace

    from adapterhub.sample.flow import FlowGenerator
    from flux_helpers import peft_file

    monkeypatch.setenv("ADAPTERHUB_COMPILE_BACKEND", "aot_eager")
    peft_file(tmp_path / "a.safetensors", tiny_flux.transformer, ["transformer_blocks.0.attn.to_q"], seed=2)
    req = _req("a cat", seed=4, sampler="Euler a", schedule="Karras")
    runs = [(None, "Euler a", "Karras"), ("a:0.8", "Euler a", "Karras"), ("a:0.5", "DPM++ 2M", "Beta"),
            (None, "DPM++ 2M", "Beta"), ("a:1", "Euler", "Automatic")]  # the last: the pipeline's own loop
    eager = FlowGenerator(tiny_flux, model_name="tiny", hash_model=False, adapter_dirs=[tmp_path])
    expected = [eager.generate(eager.request(replace(req, stack=s, sampler=a, schedule=b)), output="latent").latents
                for s, a, b in runs]
    eager.close()
    gen = FlowGenerator(copy.deepcopy(tiny_flux), backend="compiled", model_name="tiny", hash_model=False,
                        adapter_dirs=[tmp_path])
    torch._dynamo.reset()
    first = gen.generate(gen.request(req), output="latent").latents  # compiles
    assert torch.equal(first, expected[0]) and gen.runner.stats()["graphs"] == 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        for (stack, sampler, schedule), want in zip(runs[1:], expected[1:]):
            got = gen.generate(gen.request(replace(req, stack=stack, sampler=sampler, schedule=schedule)),
                               output="latent").latents
            assert torch.equal(got, want), (stack, sampler)
    assert gen.runner.stats()["graphs"] == 1
    gen.close()


def test_rng_nv_with_a_sampler_that_draws_again_says_its_later_noise_is_not_the_webuis(tiny_flux):
    gen = _generator(tiny_flux)
    warned = gen.generate(gen.request(_req("a cat", sampler="Euler a", schedule="Simple", rng="NV")), output="latent")
    assert any("RNG NV with Euler a" in w for w in warned.warnings)
    quiet = gen.generate(gen.request(_req("a cat", sampler="DPM++ 2M", schedule="Simple", rng="NV")), output="latent")
    assert not any("RNG NV" in w for w in quiet.warnings)


@pytest.mark.parametrize("name", ["DPM++ 2M", "Euler a"])
def test_flux_true_cfg_and_distilled_guidance_through_k_diffusion(k, tiny_flux, name):
    """Flux above CFG 1 (Forge's real CFG: the negative prompt's velocity too) with a distilled guidance of 5."""
    gen = _generator(tiny_flux)
    result = gen.generate(gen.request(_req("a red house", negative="ugly", cfg=2.5, distilled_cfg=5.0, seed=7,
                                           sampler=name, schedule="Karras")), output="latent")
    sigmas = _karras(k, tiny_flux, "flux", STEPS)
    theirs = _oracle(k, name, _oracle_denoiser(tiny_flux, "flux", "a red house", "ugly", 2.5, 5.0), sigmas, 7)
    torch.testing.assert_close(result.latents, theirs, atol=1e-6, rtol=1e-6)
    plain = _oracle(k, name, _oracle_denoiser(tiny_flux, "flux", "a red house", "ugly", 1.0, 5.0), sigmas, 7)
    assert not torch.allclose(plain, theirs, atol=1e-3)  # the CFG counts
    assert "CFG scale: 2.5, Distilled CFG Scale: 5, " in result.infotexts[0]


@pytest.mark.parametrize("name", ["Euler a", "DPM++ SDE"])
def test_each_image_of_a_batch_draws_its_own_later_noise(tiny_sd3, name):
    """A batch of two: the second image is what its seed gives alone (its own generator, its own Brownian tree),
    up to the batched kernels' last bits; the first differs from it."""
    gen = _generator(tiny_sd3)
    both = gen.generate(gen.request(_req("a cat", seed=5, batch=2, sampler=name, schedule="Karras")),
                        output="latent").latents
    alone = gen.generate(gen.request(_req("a cat", seed=6, sampler=name, schedule="Karras")), output="latent").latents
    torch.testing.assert_close(both[1:], alone, atol=1e-4, rtol=0)
    assert not torch.allclose(both[:1], alone, atol=1e-2)


def test_flux_samplers_bench_rows(capsys, adapterhub_cache):
    """``benchmarks/flux_samplers.py`` runs and reports its rows; no timing is asserted, only that both paths of the
    same run end on the same latents."""
    import importlib.util
    import re
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "benchmarks"))  # the scripts import their _common helpers
    try:
        spec = importlib.util.spec_from_file_location("flux_samplers_bench", root / "benchmarks" / "flux_samplers.py")
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
    finally:
        sys.path.remove(str(root / "benchmarks"))
    bench.main(["--steps", "2", "--repeat", "1", "--samplers", "Euler a", "DPM++ 2M SDE"])
    rows = re.findall(r"^(.+): k-diffusion [\d.]+ s, adapterhub [\d.]+ s, ratio [\d.]+x, max\|diff\| ([\d.e+-]+)$",
                      capsys.readouterr().out, re.M)
    assert [name for name, _ in rows] == ["Euler a", "DPM++ 2M SDE"]
    assert all(float(diff) <= 1e-6 for _, diff in rows), rows
