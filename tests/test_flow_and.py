"""``AND`` (composable prompts) on Flux and SD3, as Forge applies it.

The oracle is Forge's ``backend/sampling/sampling_function.py`` written out here on the pipelines' own pieces: each
sub-prompt of the webui's split (``a cat AND a dog :0.5`` -> "a cat" weight 1, " a dog" weight 0.5) and the negative
prompt (never split) encoded by the family's diffusers pipeline (``encode_prompt``), the transformer called on each,
the clean estimates ``x - sigma v`` combined as ``calc_cond_uncond_batch`` / ``sampling_function_inner`` combine them
(the strengths' weighted average ``c``; with CFG ``u + (c - u) cfg sum(s)``, the plain CFG where the strengths sum to
1), and stepped by k-diffusion's own ``sample_euler`` on k-diffusion's Karras sigmas from the seed's noise. At CFG 1
(no negative pass) Forge returns ``sum(s) c`` (twice a clean estimate for ``a AND b``); adapterhub returns the
average ``c`` (the same whenever the weights sum to 1): the oracle says so where it differs. fp32 on CPU, 64 px.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from test_flux_sd3_samplers import LATENT, SIZE, _generator, _karras, _req
from flux_helpers import k  # noqa: F401  (the k-diffusion fixture)
from flux_helpers import cli as _cli

STEPS = 3




def _pipe(request, family):
    return request.getfixturevalue("tiny_flux" if family == "flux" else "tiny_sd3")


def _forge_denoiser(pipe, family, parts, negative, cfg, guidance=3.5):
    """k-diffusion's denoiser over the pipeline's transformer, Forge's composition of ``parts``: a list (one entry per
    model call, the last repeated) of ``[(text, strength), ...]``, so a sub-prompt may follow its own schedule."""
    encoded = {}

    def encode(text):
        if text not in encoded:
            with torch.no_grad():
                if family == "flux":
                    encoded[text] = pipe.encode_prompt(text, prompt_2=None, device="cpu")
                else:
                    pe, _, pooled, _ = pipe.encode_prompt(text, None, None, device="cpu",
                                                          do_classifier_free_guidance=False)
                    encoded[text] = (pe, pooled)
        return encoded[text]

    def clean(x, sigma, text):
        """``x - sigma v``: the transformer's clean estimate for one text (diffusers' calling convention)."""
        if family == "flux":
            pe, pooled, ids = encode(text)
            img_ids = pipe._prepare_latent_image_ids(1, LATENT[2] // 2, LATENT[3] // 2, "cpu", torch.float32)
            packed = pipe._pack_latents(x, 1, LATENT[1], LATENT[2], LATENT[3])
            v = pipe.transformer(hidden_states=packed, timestep=sigma, guidance=torch.full([1], guidance),
                                 pooled_projections=pooled, encoder_hidden_states=pe, txt_ids=ids, img_ids=img_ids,
                                 return_dict=False)[0]
            v = pipe._unpack_latents(v, SIZE, SIZE, pipe.vae_scale_factor)
        else:
            pe, pooled = encode(text)
            v = pipe.transformer(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=pe,
                                 pooled_projections=pooled, return_dict=False)[0]
        return x - sigma.reshape(-1, 1, 1, 1) * v

    calls = []

    def denoiser(x, sigma):
        subs = parts[min(len(calls), len(parts) - 1)]
        calls.append(sigma)
        with torch.no_grad():
            strengths = [s for _, s in subs]
            # calc_cond_uncond_batch: each cond's output times its strength, over the strengths' sum
            cond = sum(clean(x, sigma, t) * s for t, s in subs) / sum(strengths)
            if cfg <= 1:
                return cond  # adapterhub's CFG 1: the average (Forge: sum(strengths) x cond, uncond being 0)
            uncond = clean(x, sigma, negative)
            edit = sum(strengths)
            if not math.isclose(edit, 1.0):
                return uncond + (cond - uncond) * cfg * edit
            return uncond + (cond - uncond) * cfg
    return denoiser


def _euler(k, denoiser, sigmas, seed, init=None):
    """k-diffusion's ``sample_euler`` from the seed's noise (``sigma_0 noise``; img2img ``(sigmas, init)``: from
    ``sigma noise + (1 - sigma) init``)."""
    noise = torch.randn(LATENT, generator=torch.Generator().manual_seed(seed))
    if init is not None:
        sigmas, init = init
        return k.sampling.sample_euler(denoiser, sigmas[0] * noise + (1 - sigmas[0]) * init, sigmas, disable=True)
    return k.sampling.sample_euler(denoiser, noise * sigmas[0], sigmas, disable=True)


CASES = [("sd3", 3.0, "blurry AND dark"), ("flux", 1.0, ""), ("flux", 2.5, "ugly")]  # the negative: as written


@pytest.mark.parametrize(("family", "cfg", "negative"), CASES)
def test_and_combines_the_sub_prompts_as_forge(request, k, family, cfg, negative):
    pipe = _pipe(request, family)
    gen = _generator(pipe)
    result = gen.generate(gen.request(_req("a cat AND a dog :0.5", negative=negative, cfg=cfg, seed=11,
                                           sampler="Euler", schedule="Karras")), output="latent")
    parts = [[("a cat", 1.0), (" a dog", 0.5)]]
    theirs = _euler(k, _forge_denoiser(pipe, family, parts, negative, cfg), _karras(k, pipe, family, STEPS), 11)
    torch.testing.assert_close(result.latents, theirs, atol=1e-5, rtol=1e-5)
    assert result.warnings == [] and result.infotexts[0].startswith("a cat AND a dog :0.5\n")
    plain = gen.generate(gen.request(_req("a cat", negative=negative, cfg=cfg, seed=11, sampler="Euler",
                                          schedule="Karras")), output="latent").latents
    assert (plain - result.latents).abs().max() > 1e-3  # the oracle tells the composition from the first prompt


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_each_sub_prompt_follows_its_own_schedule_on_the_pipelines_euler(request, k, family):
    """``a [cat:dog:1] AND a bird :0.5`` over 3 steps: the first sub-prompt is "a cat" for model calls 0 and 1, then
    "a dog"; the second stays. Euler on "Automatic" (the pipeline's own loop for a plain prompt) leaves for the
    k-diffusion loop on the same sigmas (the oracle's: diffusers' scheduler's)."""
    import diffusers
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    pipe = _pipe(request, family)
    gen = _generator(pipe)
    cfg = 1.0 if family == "flux" else 4.0
    got = gen.generate(gen.request(_req("a [cat:dog:1] AND a bird :0.5", negative="ugly", cfg=cfg, seed=5)),
                       output="latent").latents
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    if family == "flux":
        c = pipe.scheduler.config
        mu = calculate_shift((SIZE // pipe.vae_scale_factor // 2) ** 2, c.base_image_seq_len, c.max_image_seq_len,
                             c.base_shift, c.max_shift)
        scheduler.set_timesteps(sigmas=[1.0 - i / STEPS for i in range(STEPS)], mu=mu)
    else:
        scheduler.set_timesteps(STEPS)
    parts = [[("a cat", 1.0), (" a bird", 0.5)]] * 2 + [[("a dog", 1.0), (" a bird", 0.5)]]
    theirs = _euler(k, _forge_denoiser(pipe, family, parts, "ugly", cfg), scheduler.sigmas.float(), 5)
    torch.testing.assert_close(got, theirs, atol=1e-5, rtol=1e-5)


def test_img2img_composes_the_sub_prompts(k, tiny_sd3):
    """img2img at strength 0.5 of 4 steps: the last 3 Karras steps from ``sigma noise + (1 - sigma) init``."""
    import numpy as np
    from PIL import Image

    gen = _generator(tiny_sd3)
    picture = Image.fromarray((np.indices((SIZE, SIZE, 3)).sum(0) * 7 % 255).astype(np.uint8))
    result = gen.generate(gen.request(_req("a boat AND a storm :0.7", seed=5, steps=4, cfg=4.0, sampler="Euler",
                                           schedule="Karras", init_image=picture, denoising_strength=0.5)),
                          output="latent")
    init = gen.encode_image(picture).float()
    full = _karras(k, tiny_sd3, "sd3", 4)
    denoiser = _forge_denoiser(tiny_sd3, "sd3", [[("a boat", 1.0), (" a storm", 0.7)]], "", 4.0)
    torch.testing.assert_close(result.latents, _euler(k, denoiser, full, 5, init=(full[1:], init)),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_one_sub_prompt_of_weight_1_is_the_plain_prompt(request, family):
    """The webui reads a sub-prompt's trailing ``:1`` as its weight: ``a cat :1`` is "a cat", bit for bit on the
    pipeline's own loop and on the k-diffusion loop (the plain denoiser, one transformer call a step without CFG)."""
    from adapterhub.sample import flow_prompt, flow_samplers

    pipe = _pipe(request, family)
    gen = _generator(pipe)
    cfg = 1.0 if family == "flux" else 4.0
    for sampler in ("Euler", "DPM++ 2M"):
        plain = gen.generate(gen.request(_req("a cat", cfg=cfg, seed=2, sampler=sampler)), output="latent")
        weighted = gen.generate(gen.request(_req("a cat :1", cfg=cfg, seed=2, sampler=sampler)), output="latent")
        assert torch.equal(plain.latents, weighted.latents), sampler
        assert weighted.infotexts[0].startswith("a cat :1\n")
    denoiser = flow_prompt.k_denoiser(pipe, family, "a cat", "", STEPS, "Original", 1, cfg, None, SIZE, SIZE)
    assert type(denoiser) is flow_samplers.FlowDenoiser


def test_the_batch_and_the_hires_pass_call_each_sub_prompt(tiny_flux):
    """Two images in one batch, hires fix of 2 steps: every transformer call is over the batch of two, one call per
    sub-prompt, each with its own schedule (``[day:night:4]``: "day" in the first pass, the hires pass's first two
    calls, then "night") -
    read from the calls' ``encoder_hidden_states``. ``a castle AND a castle`` at CFG 1 is "a castle" (the
    average of two equal predictions), bit for bit."""
    from adapterhub.sample.flow_prompt import encode_text

    gen = _generator(tiny_flux)
    candidates = ["a castle", "a day castle", "a night castle", " a moat"]
    encoded = {t: encode_text(tiny_flux, "flux", t)[0][0] for t in candidates}
    seen = []

    def hook(module, args, kwargs):
        rows = kwargs["encoder_hidden_states"]
        seen.append((rows.shape[0], next((t for t, e in encoded.items() if torch.equal(e, rows[-1])), None)))

    req = _req("a [day:night:4] castle AND a moat", seed=3, images=2, batch=2, sampler="DPM++ 2M", hr_scale=1.5,
               hr_steps=3)
    handle = tiny_flux.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        gen.generate(gen.request(req), output="latent")
    finally:
        handle.remove()
    first = [(2, "a day castle"), (2, " a moat")] * 3
    hires = [(2, "a day castle"), (2, " a moat")] * 2 + [(2, "a night castle"), (2, " a moat")]
    assert seen == first + hires
    same = [gen.generate(gen.request(_req(p, seed=3, sampler="DPM++ 2M", hr_scale=1.5, hr_steps=2)),
                         output="latent").latents for p in ("a castle AND a castle", "a castle")]
    assert torch.equal(*same)


def test_weights_summing_to_0_at_cfg_1_are_refused_before_sampling(tiny_flux):
    from adapterhub.errors import AdapterhubError
    from adapterhub.sample.flow import check_flow_request

    gen = _generator(tiny_flux)
    with pytest.raises(AdapterhubError, match=r"AND weights .*sum to 0"):
        gen.generate(gen.request(_req("a cat :1 AND a dog :-1", cfg=1.0)), output="latent")
    check_flow_request(_req("a cat :1 AND a dog :-1", cfg=3.0), "flux")  # with CFG: u + cfg (c_1 - c_2)


def test_cli_writes_the_prompt_as_written_and_warns_of_nothing(capsys, tmp_path, tiny_flux):
    from PIL import Image

    out = tmp_path / "out"
    rc, _, err = _cli(capsys, "sample", "--base", "tiny-flux", "--prompt", "a cat AND a dog :0.5", "--negative",
                      "blurry AND dark", "--steps", "2", "--size", "64x64", "--seed", "8", "--out", str(out))
    assert rc == 0, err
    assert "AND" not in err and "warning" not in err
    (made,) = sorted(out.glob("*.png"))
    with Image.open(made) as image:
        assert image.info["parameters"].startswith("a cat AND a dog :0.5\nNegative prompt: blurry AND dark\n")
    rc, _, err = _cli(capsys, "sample", "--base", "tiny-flux", "--prompt", "a cat AND a dog :-1", "--steps", "2",
                      "--size", "64x64", "--out", str(tmp_path / "refused"))
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "sum to 0" in err and "Traceback" not in err
    assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_compiled_backend_composes_without_recompiling(request, family, monkeypatch):
    """An AND prompt after a plain one (Flux: CFG 1, then true CFG; SD3: CFG, each sub-prompt's call batched with
    the negative prompt as the plain call is): the same compiled graph, images equal the eager ones."""
    from dataclasses import replace

    from adapterhub.sample.flow import FlowGenerator

    monkeypatch.setenv("ADAPTERHUB_COMPILE_BACKEND", "aot_eager")
    pipe = _pipe(request, family)
    req = _req("a cat", seed=4, sampler="Euler a", schedule="Karras", steps=2, negative="ugly")
    runs = [("a cat AND a dog :0.5", 1.0 if family == "flux" else 5.0), ("a [cat:bird:1] AND a dog :0.5", 2.0)]
    eager = _generator(pipe)
    expected = [eager.generate(eager.request(replace(req, prompt=p, cfg=c)), output="latent").latents
                for p, c in runs]
    gen = FlowGenerator(copy.deepcopy(pipe), backend="compiled", model_name="tiny", hash_model=False)
    torch._dynamo.reset()
    gen.generate(gen.request(req), output="latent")  # compiles
    assert gen.runner.stats()["graphs"] == 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        for (prompt, cfg), want in zip(runs, expected):
            got = gen.generate(gen.request(replace(req, prompt=prompt, cfg=cfg)), output="latent").latents
            assert torch.equal(got, want), (prompt, cfg)
    assert gen.runner.stats()["graphs"] == 1
    gen.close()
