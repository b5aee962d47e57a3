"""The hires fix with a prompt that changes by step on Flux and SD3 (#21): the hires pass's prompt schedule is the
webui's (``prompt_schedule(text, first_pass_steps, hires_steps)``, the Stable Diffusion path's oracle: integers count
on from the first pass, fractions from 1.0, over the hires pass's steps; both doubled for a second-order sampler).

Which text each transformer call used is read from the call itself (its ``encoder_hidden_states``), matched against
each candidate text encoded on its own (fp32 CPU: equal bit for bit).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from flux_helpers import flow_generator as _generator
from flux_helpers import cli as _cli

SIZE, SMALL, STEPS = 64, 32, 3


def _request(prompt, size, **kwargs):
    from adapterhub.sample import FlowRequest

    return FlowRequest(prompt, **{"steps": STEPS, "width": size, "height": size, "seed": 4, **kwargs})


def _texts_by_call(pipe, family, run, candidates):
    """Run ``run()`` and return, per transformer call, the candidate text whose encoding the call's (last, i.e.
    positive) conditioning row equals."""
    from adapterhub.sample.flow_prompt import encode_text

    encoded = {t: encode_text(pipe, family, t)[0][0] for t in candidates}
    seen = []

    def hook(module, args, kwargs):
        row = kwargs["encoder_hidden_states"][-1]
        matches = [t for t, e in encoded.items() if e.shape == row.shape and torch.equal(e, row)]
        seen.append(matches[0] if len(matches) == 1 else None)

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        out = run()
    finally:
        handle.remove()
    return out, seen


def _expected(prompt, first, hires, calls):
    """The text of each of the hires pass's ``calls`` model calls by the Stable Diffusion path's rule."""
    from adapterhub.sample.prompt import prompt_schedule, schedule_index

    schedule = prompt_schedule(prompt, first, hires)
    return [schedule[schedule_index([end for end, _ in schedule], n)][1] for n in range(calls)]


def test_the_first_pass_is_the_txt2img_run(tiny_flux, monkeypatch):
    from adapterhub.sample import flow_passes

    gen = _generator(tiny_flux)
    prompt = "a [day:night:0.5] castle"
    alone = gen.generate(gen.request(_request(prompt, SIZE, cfg=1.0)), output="latent").latents
    firsts = []
    real = flow_passes.hires_pass

    def spy(gen_, req, prompt_, seeds, first, on_step=None):
        firsts.append(first.clone())
        return real(gen_, req, prompt_, seeds, first, on_step)

    monkeypatch.setattr(flow_passes, "hires_pass", spy)
    result = gen.generate(gen.request(_request(prompt, SIZE, cfg=1.0, hr_scale=1.5, hr_steps=4)), output="latent")
    assert len(firsts) == 1 and torch.equal(firsts[0], alone)
    assert result.latents.shape[-2:] == (48, 48)  # 96 px (the tiny VAE: 2 px a latent)


# (prompt, first-pass steps, hires steps, the hires pass's texts as the webui's rule gives them)
FLUX_CASES = [
    ("a [day:night:1.5] castle", 3, 4, ["a day castle"] * 3 + ["a night castle"]),  # halfway: ends at step 2
    ("a [day:night:0.5] castle", 3, 4, ["a night castle"] * 4),  # over with the first pass
    ("a [day:night:4] castle", 3, 3, ["a day castle"] * 2 + ["a night castle"]),  # step 4 = the hires pass's 1st
    # alternation: the text of step n is the schedule entry ending at n, read at call n (0-based) as the webui's
    # reconstruct_cond_batch reads it
    ("a [red|blue] house", 3, 3, ["a red house", "a red house", "a blue house"]),
]


@pytest.mark.parametrize(("prompt", "first", "hires", "texts"), FLUX_CASES)
def test_flux_hires_pass_conditioning_follows_the_webuis_hires_schedule(tiny_flux, prompt, first, hires, texts):
    from adapterhub.sample.prompt import prompt_schedule

    gen = _generator(tiny_flux)
    candidates = {t for _, t in prompt_schedule(prompt, 9)} | set(texts)
    req = gen.request(_request(prompt, SIZE, steps=first, cfg=1.0, hr_scale=1.5, hr_steps=hires, hr_denoise=0.6))
    _, seen = _texts_by_call(tiny_flux, "flux", lambda: gen.generate(req, output="latent"), candidates)
    assert len(seen) == first + hires
    assert seen[first:] == texts == _expected(prompt, first, hires, hires)


def test_sd3_hires_pass_on_a_second_order_sampler_doubles_both_counts(tiny_sd3):
    """Heun: two model calls a step (one on the last, to sigma 0); the schedule spans twice the first pass's steps
    and twice the hires pass's, as the Stable Diffusion path (and the webui's ``total_steps``) counts them."""
    gen = _generator(tiny_sd3)
    prompt, hires = "a [day:night:1.5] castle", 3
    req = gen.request(_request(prompt, SMALL, sampler="Heun", negative="fog", hr_scale=2.0, hr_steps=hires,
                               hr_denoise=0.6))
    _, seen = _texts_by_call(tiny_sd3, "sd3", lambda: gen.generate(req, output="latent"),
                             {"a day castle", "a night castle"})
    calls = 2 * hires - 1
    hires_calls = seen[-calls:]
    assert hires_calls == _expected(prompt, 2 * STEPS, 2 * hires, calls)
    assert hires_calls == ["a day castle"] * 4 + ["a night castle"]  # ends at call 3 of 6, not at step 1 of 3


def test_sd3_hires_pass_with_a_prompt_over_before_it_is_its_last_text(tiny_sd3):
    """``[a:b:0.5]``: b for the whole hires pass, which then is the plain img2img pass of b (the pipeline's loop)."""
    from adapterhub.sample import flow_passes

    gen = _generator(tiny_sd3)
    req = gen.request(_request("a [day:night:0.5] castle", SMALL, negative="fog", hr_scale=2.0, hr_steps=2,
                               hr_denoise=0.5))
    first = gen.generate(gen.request(_request("a [day:night:0.5] castle", SMALL, negative="fog")),
                         output="latent").latents
    result = gen.generate(req, output="latent").latents
    width, height = flow_passes.hires_size(gen, req)
    upscaled = flow_passes.upscale(gen, first, width, height, req.hr_upscaler)
    by_hand = gen.denoise(flow_passes.hires_request(req, width, height), "a night castle", [4], None, upscaled)
    assert torch.equal(result, by_hand)


def test_cli_samples_the_hires_fix_with_prompt_editing(capsys, tmp_path, tiny_flux):
    from PIL import Image

    from adapterhub.sample import infotext

    prompt = "a [day:night:1.5] castle"
    out = tmp_path / "out"
    rc, _, err = _cli(capsys, "sample", "--base", "tiny-flux", "--prompt", prompt, "--steps", STEPS, "--seed", 4,
                      "--size", "64x64", "--hires", 1.5, "--hires-steps", 2, "--out", out)
    assert rc == 0, err
    (file,) = sorted(out.glob("*.png"))
    with Image.open(file) as image:
        text, pixels = image.info["parameters"], np.asarray(image.convert("RGB"))
    assert pixels.shape == (96, 96, 3)
    assert text.splitlines()[0] == prompt
    params = infotext.parse(text)
    assert (params["Hires upscale"], params["Hires steps"], params["Size"]) == ("1.5", "2", "64x64")
    gen = _generator(tiny_flux)
    ours = gen.generate(gen.request(_request(prompt, SIZE, hr_scale=1.5, hr_steps=2)))
    assert np.array_equal(pixels, np.asarray(ours.images[0]))


@pytest.mark.parametrize("prompt", ["a [day:night:1.5] castle", "a [day:night:9] castle"])
def test_a_first_pass_prompt_that_does_not_change_is_its_one_text(tiny_flux, prompt):
    """Over 3 steps ``[day:night:1.5]`` and ``[day:night:9]`` never switch: the webui encodes the schedule's one
    text, "a day castle", not the brackets (which the engines would read as de-emphasis)."""
    from adapterhub.sample.prompt import prompt_schedule

    assert prompt_schedule(prompt, STEPS) == [(STEPS, "a day castle")]
    gen = _generator(tiny_flux)
    req = gen.request(_request(prompt, SIZE, cfg=1.0))
    _, seen = _texts_by_call(tiny_flux, "flux", lambda: gen.generate(req, output="latent"), {"a day castle"})
    assert seen == ["a day castle"] * STEPS


def test_sd3_heun_on_the_pipelines_loop_schedules_over_its_doubled_steps(tiny_sd3):
    """SD3's Heun is the pipeline's loop, but a prompt's schedule spans its model calls (2 a step): ``[day:night:3]``
    over 3 steps ends at call 3 of 6 rather than never, so it samples on the k-diffusion loop, scheduled (5 calls:
    the last step is one)."""
    from adapterhub.sample.prompt import prompt_schedule, schedule_index

    prompt = "a [day:night:3] castle"
    gen = _generator(tiny_sd3)
    req = gen.request(_request(prompt, SMALL, sampler="Heun", negative="fog"))
    _, seen = _texts_by_call(tiny_sd3, "sd3", lambda: gen.generate(req, output="latent"),
                             {"a day castle", "a night castle"})
    schedule = prompt_schedule(prompt, 2 * STEPS)
    assert seen == [schedule[schedule_index([e for e, _ in schedule], n)][1] for n in range(2 * STEPS - 1)]
    assert seen == ["a day castle"] * 4 + ["a night castle"]
