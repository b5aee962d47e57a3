"""Prompt editing, alternation, ``AND``, img2img and hires fix against the webui's rules.

Oracles: the webui's own doctests for ``get_learned_conditioning_prompt_schedules`` (literally); denoising
loops written out here with diffusers' scheduler and the UNet called directly (not our loop), switching the
conditioning where the webui's ``reconstruct_cond_batch`` does and combining predictions with its
``combine_denoised`` formula; diffusers' ``StableDiffusionImg2ImgPipeline`` for img2img and the hires pass,
given the strength that reproduces the webui's step convention (``setup_img2img_steps``).
"""
from __future__ import annotations

import copy
import inspect

import numpy as np
import pytest
import torch

from adapterhub import cli
from adapterhub.errors import AdapterhubError
from adapterhub.sample import infotext
from adapterhub.sample.prompt import prompt_schedule, schedule_index, split_and
from adapterhub.sample.samplers import make_scheduler

SIZE = 64

# ------------------------------------------------------------------------------------------------
# the schedule parser: modules/prompt_parser.py doctests, literally (steps 10; the last two with hires 10)
# ------------------------------------------------------------------------------------------------
ALT = [[1, "a"], [2, "(b:1.1)"], [3, "a"], [4, "(b:1.1)"], [5, "a"], [6, "(b:1.1)"], [7, "a"], [8, "(b:1.1)"],
       [9, "a"], [10, "(b:1.1)"]]
SCHEDULE_DOCTESTS = [
    ("test", [[10, "test"]]),
    ("a [b:3]", [[3, "a "], [10, "a b"]]),
    ("a [b: 3]", [[3, "a "], [10, "a b"]]),
    ("a [[[b]]:2]", [[2, "a "], [10, "a [[b]]"]]),
    ("[(a:2):3]", [[3, ""], [10, "(a:2)"]]),
    ("a [b : c : 1] d", [[1, "a b  d"], [10, "a  c  d"]]),
    ("a[b:[c:d:2]:1]e", [[1, "abe"], [2, "ace"], [10, "ade"]]),
    ("a [unbalanced", [[10, "a [unbalanced"]]),
    ("a [b:.5] c", [[5, "a  c"], [10, "a b c"]]),
    pytest.param("a [{b|d{:.5] c", [[5, "a  c"], [10, "a {b|d{ c"]], marks=pytest.mark.xfail(
        strict=True, reason="the doctest itself says 'not handling this right now': with the lark the webui pins "
                            "(1.1.2), and 1.3.1, a '|' outside [a|b] fails the grammar and the prompt stays as "
                            "written (asserted in test_schedule_edge_cases)")),
    ("((a][:b:c [d:3]", [[3, "((a][:b:c "], [10, "((a][:b:c d"]]),
    ("[a|(b:1.1)]", ALT),
    ("[fe|]male", [[1, "female"], [2, "male"], [3, "female"], [4, "male"], [5, "female"], [6, "male"],
                   [7, "female"], [8, "male"], [9, "female"], [10, "male"]]),
    ("[fe|||]male", [[1, "female"], [2, "male"], [3, "male"], [4, "male"], [5, "female"], [6, "male"],
                     [7, "male"], [8, "male"], [9, "female"], [10, "male"]]),
]
HIRES_DOCTESTS = [("a [b:.5] c", [[10, "a b c"]]), ("a [b:1.5] c", [[5, "a  c"], [10, "a b c"]])]


@pytest.mark.parametrize("prompt, expected", SCHEDULE_DOCTESTS)
def test_schedule_matches_the_webui_doctests(prompt, expected):
    assert [list(entry) for entry in prompt_schedule(prompt, 10)] == expected


@pytest.mark.parametrize("prompt, expected", HIRES_DOCTESTS)
def test_hires_schedule_matches_the_webui_doctests(prompt, expected):
    assert [list(entry) for entry in prompt_schedule(prompt, 10, 10)] == expected


def test_schedule_example_of_the_webui_module_comment():
    prompt = ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6]"
              "[ in background:0.25] [shoddy:masterful:0.5]")
    assert prompt_schedule(prompt, 100) == [
        (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
        (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
        (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
        (75, "fantasy landscape with a lake and an oak in background masterful"),
        (100, "fantasy landscape with a lake and a christmas tree in background masterful")]


@pytest.mark.parametrize("prompt, expected", [
    ("a [{b|d{:.5] c", [(10, "a [{b|d{:.5] c")]),  # what the webui's code gives for its own doctest
    ("a | b [c:2]", [(10, "a | b [c:2]")]),  # "|" outside an alternation: the grammar fails, the prompt stays
    ("x [a:b:2] \\", [(10, "x [a:b:2] \\")]),  # a backslash with nothing to escape: same
    ("[a:b:2.0]", [(10, "a")]),  # a decimal point means a fraction: 2.0 x 10 steps, clamped to 10
    ("[a:b:15]", [(10, "a")]),
    ("[a:b:0]", [(10, "b")]), ("[a:b:-3]", [(10, "b")]), ("[a:b:1e3]", [(10, "a")]),
    ("\\[a:b:2\\]", [(10, "\\[a:b:2\\]")]),  # escaped brackets are text
    ("[(a:1.2):[b|c]:3]", [(1, "(a:1.2)"), (2, "(a:1.2)"), (3, "(a:1.2)"), (4, "c"), (5, "b"), (6, "c"),
                           (7, "b"), (8, "c"), (9, "b"), (10, "c")]),
])
def test_schedule_edge_cases(prompt, expected):
    assert prompt_schedule(prompt, 10) == expected


def test_schedule_entry_per_step_is_reconstruct_cond_batch():
    # reconstruct_cond_batch: the first entry with current_step (0-based) <= end_at_step
    assert [schedule_index([2, 4], step) for step in range(4)] == [0, 0, 0, 1]
    assert [schedule_index([1, 2, 3, 4], step) for step in range(4)] == [0, 0, 1, 2]
    assert schedule_index([2, 4], 7) == 0  # past every end: the webui's loop leaves index 0


@pytest.mark.parametrize("prompt, expected", [
    ("a cat AND a dog :0.5", [("a cat", 1.0), (" a dog", 0.5)]),
    ("a photo :1.5", [("a photo", 1.5)]),  # a trailing weight counts without AND too
    ("ANDROID AND (x:1.2)", [("ANDROID", 1.0), (" (x:1.2)", 1.0)]),
    ("a AND b: -2 AND c:.25 ", [("a", 1.0), (" b", -2.0), (" c", 0.25)]),
    ("plain", [("plain", 1.0)]),
])
def test_split_and_follows_get_multicond_prompt_list(prompt, expected):
    assert split_and(prompt) == expected


# ------------------------------------------------------------------------------------------------
# denoising with schedules and AND: the loop written out with diffusers' scheduler and the UNet
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gen(tiny_sd1):
    from adapterhub.sample.generator import Generator

    return Generator(tiny_sd1, model_name="tiny-sd1", model_hash="0123456789")


def _embeds(pipe, text):
    """diffusers' own text encoding (no emphasis, one chunk: the webui's gives the same)."""
    return pipe.encode_prompt(text, "cpu", 1, False)[0]


def _request(prompt, **kw):
    from adapterhub.sample.generator import Request

    kw = {"negative": "blurry", "seed": 7, "sampler": "Euler a", "steps": 4, "width": SIZE, "height": SIZE, **kw}
    return Request(prompt, **kw)


def _hand_loop(pipe, sampler, steps, seed, conds_per_call, uncond, weights=None, cfg=7.0, batched=False):
    """Euler/Euler a written out: ``uncond + sum_i (cond_i - uncond) x (w_i x cfg)``, the UNet called once per
    prompt, or (``batched``) once on [uncond, cond_1, ...] as diffusers' pipelines batch it."""
    scheduler = make_scheduler(sampler, "Automatic", pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=g) * scheduler.init_noise_sigma
    weights = weights or [1.0]
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            if batched:
                x = scheduler.scale_model_input(torch.cat([latents] * (len(weights) + 1)), t)
                eps = pipe.unet(x, t, encoder_hidden_states=torch.cat([uncond, *conds_per_call[i]])).sample
                eps_u, eps_c = eps[:1], list(eps[1:].split(1))
            else:
                x = scheduler.scale_model_input(latents, t)
                eps_u = pipe.unet(x, t, encoder_hidden_states=uncond).sample
                eps_c = [pipe.unet(x, t, encoder_hidden_states=c).sample for c in conds_per_call[i]]
            pred = eps_u
            for e, w in zip(eps_c, weights):
                pred = pred + (e - eps_u) * (w * cfg)
            extra = {"generator": [g]} if "generator" in inspect.signature(scheduler.step).parameters else {}
            latents = scheduler.step(pred, t, latents, **extra).prev_sample
    return latents


def _count_text_encoder_calls(pipe):
    calls = []
    handle = pipe.text_encoder.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


def test_prompt_editing_switches_conditioning_where_the_webui_does(gen):
    pipe = gen.pipe
    calls, handle = _count_text_encoder_calls(pipe)
    try:
        result = gen.generate(_request("a [cat:dog:0.5] house"), output="latent")
    finally:
        handle.remove()
    assert len(calls) == 2  # the prompt's two texts in one batch, the negative: nothing re-encoded per step
    cat, dog, uncond = (_embeds(pipe, t) for t in ("a cat house", "a dog house", "blurry"))
    # schedule [(2, "a cat house"), (4, "a dog house")]: calls 0, 1, 2 use cat (step <= 2), call 3 dog
    want = _hand_loop(pipe, "Euler a", 4, 7, [[cat], [cat], [cat], [dog]], uncond, batched=True)
    assert torch.equal(result.latents, want)
    never = _hand_loop(pipe, "Euler a", 4, 7, [[cat]] * 4, uncond, batched=True)
    assert not torch.allclose(result.latents, never, atol=1e-4)  # the switch is real


def test_alternation_changes_every_step(gen):
    pipe = gen.pipe
    result = gen.generate(_request("a [cat|dog] house", sampler="Euler"), output="latent")
    cat, dog, uncond = (_embeds(pipe, t) for t in ("a cat house", "a dog house", "blurry"))
    # schedule ends 1, 2, 3, 4 (cat, dog, cat, dog): call 0 -> cat, 1 -> cat (1 <= 1), 2 -> dog, 3 -> cat
    want = _hand_loop(pipe, "Euler", 4, 7, [[cat], [cat], [dog], [cat]], uncond, batched=True)
    assert torch.equal(result.latents, want)


def test_second_order_samplers_count_every_unet_call(gen):
    pipe = gen.pipe
    result = gen.generate(_request("a [cat:dog:0.5] house", sampler="Heun", steps=3), output="latent")
    cat, dog, uncond = (_embeds(pipe, t) for t in ("a cat house", "a dog house", "blurry"))
    # the webui schedules a second-order sampler over steps x 2 = 6 calls: [(3, cat), (6, dog)]; Heun makes
    # 2 x 3 - 1 = 5 UNet calls, the calls 0..3 with cat and call 4 with dog
    want = _hand_loop(pipe, "Heun", 3, 7, [[cat]] * 4 + [[dog]], uncond, batched=True)
    assert torch.equal(result.latents, want)


def test_and_is_the_webui_combine_denoised(gen):
    pipe = gen.pipe
    result = gen.generate(_request("a cat AND a dog :0.5", steps=3), output="latent")
    cat, dog, uncond = (_embeds(pipe, t) for t in ("a cat", " a dog", "blurry"))
    want = _hand_loop(pipe, "Euler a", 3, 7, [[cat, dog]] * 3, uncond, weights=[1.0, 0.5])
    torch.testing.assert_close(result.latents, want, rtol=1e-4, atol=1e-3)  # separate calls round differently
    assert torch.equal(result.latents, _hand_loop(pipe, "Euler a", 3, 7, [[cat, dog]] * 3, uncond,
                                                  weights=[1.0, 0.5], batched=True))
    # the negative prompt is one prompt: AND there is text
    negative_and = gen.prompts("x", "blurry AND ugly", 3)
    assert len(negative_and.conds) == 1 and len(negative_and.uncond.conds) == 1


def test_and_at_cfg_1_still_uses_the_unconditional_prediction(gen):
    pipe = gen.pipe
    result = gen.generate(_request("a cat AND a dog", steps=2, cfg=1.0), output="latent")
    cat, dog, uncond = (_embeds(pipe, t) for t in ("a cat", " a dog", "blurry"))
    want = _hand_loop(pipe, "Euler a", 2, 7, [[cat, dog]] * 2, uncond, weights=[1.0, 1.0], cfg=1.0, batched=True)
    assert torch.equal(result.latents, want)


def test_sub_prompts_of_different_lengths_repeat_their_last_vector(gen):
    long = "cat " * 80  # two chunks
    prompts = gen.prompts(f"{long} AND a dog", "", 2)
    from adapterhub.sample.generator import _stack_conds

    short, longer = prompts.conds[1][0].conds[0].embeds, prompts.conds[0][0].conds[0].embeds
    padded = _stack_conds([longer, short])[1]
    assert padded.shape == longer.shape == (1, 154, short.shape[-1])
    assert torch.equal(padded[:, :77], short) and torch.equal(padded[:, 77:], short[:, -1:].expand(1, 77, -1))


def test_schedule_texts_of_different_lengths_get_empty_chunks(gen):
    pipe = gen.pipe
    long, short = gen.prompts("[" + "cat " * 80 + ":dog:0.5]", "", 4).conds[0][0].conds
    assert long.embeds.shape == short.embeds.shape == (1, 154, short.embeds.shape[-1])
    tok = pipe.tokenizer
    empty = torch.tensor([[tok.bos_token_id] + [tok.eos_token_id] * 76])  # sd_hijack_clip's empty_chunk
    with torch.no_grad():
        torch.testing.assert_close(short.embeds[:, 77:], pipe.text_encoder(empty)[0])
    torch.testing.assert_close(short.embeds[:, :77], _embeds(pipe, "dog"))


def _with_norm_bias(pipe):
    """The tiny base's final layer norm has no bias, so a chunk's mean is 0 and emphasis re-normalisation is
    undefined; real encoders have one."""
    te = pipe.text_encoder
    ln = getattr(te, "text_model", te).final_layer_norm
    with torch.no_grad():
        ln.bias.copy_(0.05 + 0.1 * torch.randn(ln.bias.shape, generator=torch.Generator().manual_seed(0)))
    return pipe


def test_schedule_texts_share_the_emphasis_mean_as_one_webui_batch(tiny_sd1):
    from adapterhub.sample.generator import Generator

    pipe = _with_norm_bias(copy.deepcopy(tiny_sd1))
    gen = Generator(pipe, hash_model=False)
    scheduled = gen.prompts("[(cat:1.5):dog:0.5]", "", 4).conds[0][0]
    assert scheduled.ends == [2, 4]
    tok = pipe.tokenizer
    ids = torch.tensor([tok(t, padding="max_length", max_length=77)["input_ids"] for t in ("cat", "dog")])
    with torch.no_grad():
        z = pipe.text_encoder(ids)[0]  # (2, 77, C): the batch of the schedule's texts
    mults = torch.ones(2, 77)
    mults[0, 1] = 1.5  # "cat" is the first token after BOS
    weighted = z * mults[..., None]
    want = weighted * (z.mean() / weighted.mean())  # EmphasisOriginal: the mean over the whole batch
    torch.testing.assert_close(scheduled.conds[0].embeds, want[:1])
    torch.testing.assert_close(scheduled.conds[1].embeds, want[1:])
    alone = gen.encoder.encode("(cat:1.5)").embeds
    assert not torch.allclose(alone, want[:1])  # encoded alone the mean differs


def test_sdxl_schedule_and_and_with_both_encoders(tiny_sdxl):
    from adapterhub.sample.generator import Generator

    gen = Generator(tiny_sdxl, hash_model=False)  # read-only use
    prompts = gen.prompts("a [cat:dog:0.5] AND a bird :0.5", "", 4)
    (edited, w1), (bird, w2) = prompts.conds
    assert (edited.ends, w1, w2) == ([2, 4], 1.0, 0.5)
    for cond, text in zip(edited.conds + bird.conds, ("a cat", "a dog", " a bird")):
        alone = gen.encoder.encode(text)  # no emphasis: the batch gives each text its own encoding and pooling
        torch.testing.assert_close(cond.embeds, alone.embeds)
        torch.testing.assert_close(cond.pooled, alone.pooled)
    assert not prompts.uncond.conds[0].embeds.any()  # an empty negative prompt is zeros for SDXL
    result = gen.generate(_request("a [cat:dog:0.5] AND a bird :0.5", negative="", steps=2, hr_scale=1.5),
                          output="latent")
    assert result.latents.shape == (1, 4, 12, 12) and torch.isfinite(result.latents).all()


# ------------------------------------------------------------------------------------------------
# img2img and hires fix
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def init_image():
    from PIL import Image

    pixels = np.random.default_rng(3).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _img2img_pipeline(pipe, sampler):
    from diffusers import StableDiffusionImg2ImgPipeline

    components = {**pipe.components, "scheduler": make_scheduler(sampler, "Automatic", pipe.scheduler.config)}
    out = StableDiffusionImg2ImgPipeline(**components)
    out.set_progress_bar_config(disable=True)
    return out


def _diffusers_img2img(pipe, latents, prompt, negative, steps, strength, seed, sampler="Euler a"):
    """diffusers' img2img with latents as its image (so its VAE sampling is out of the way)."""
    return _img2img_pipeline(pipe, sampler)(
        image=latents, prompt_embeds=_embeds(pipe, prompt), negative_prompt_embeds=_embeds(pipe, negative),
        num_inference_steps=steps, strength=strength, guidance_scale=7.0,
        generator=[torch.Generator().manual_seed(seed)], output_type="latent").images


def test_init_image_is_encoded_as_diffusers_preprocesses_it(gen, init_image):
    pipe = gen.pipe
    pixels = pipe.image_processor.preprocess(init_image)
    with torch.no_grad():
        want = pipe.vae.encode(pixels).latent_dist.mode() * pipe.vae.config.scaling_factor
    assert torch.equal(gen.encode_image(init_image), want)


@pytest.mark.parametrize("denoise, webui_steps", [(1.0, 4), (0.5, 3), (0.3, 2)])
def test_img2img_follows_the_webui_step_convention(gen, init_image, denoise, webui_steps):
    from adapterhub.sample.generator import img2img_steps

    steps = 4
    # setup_img2img_steps: t_enc = int(min(d, 0.999) * steps); the sampler runs sigmas[steps - t_enc - 1:]
    assert img2img_steps(steps, denoise) == (steps, int(min(denoise, 0.999) * steps) + 1) == (steps, webui_steps)
    result = gen.generate(_request("a red house", init_image=init_image, denoising_strength=denoise), output="latent")
    latents = gen.encode_image(init_image)
    # diffusers runs int(steps x strength) steps from index steps - that: the strength giving the webui's start
    want = _diffusers_img2img(gen.pipe, latents, "a red house", "blurry", steps, webui_steps / steps, 7)
    assert torch.equal(result.latents, want)
    if denoise < 1.0:  # diffusers' own convention at the same strength runs one step fewer
        theirs = _diffusers_img2img(gen.pipe, latents, "a red house", "blurry", steps, denoise, 7)
        assert not torch.allclose(result.latents, theirs, atol=1e-4)


def test_img2img_resizes_the_init_image_and_defaults_to_its_size(gen, init_image):
    from PIL import Image

    big = init_image.resize((80, 72))
    result = gen.generate(_request("a red house", init_image=big, width=None, height=None, steps=2,
                                   denoising_strength=0.6), output="latent")
    assert result.latents.shape[-2:] == (72 // 8, 80 // 8)  # the image's own size
    resized = gen.generate(_request("a red house", init_image=big, steps=2, denoising_strength=0.6), output="latent")
    direct = gen.generate(_request("a red house", init_image=big.resize((SIZE, SIZE), Image.Resampling.LANCZOS),
                                   steps=2, denoising_strength=0.6), output="latent")
    assert torch.equal(resized.latents, direct.latents)  # "Just resize": Lanczos to the request's size


@pytest.mark.parametrize("upscaler", ["Latent", "Latent (nearest)", "Nearest"])
def test_hires_is_first_pass_upscale_and_img2img_pass(gen, upscaler):
    from PIL import Image

    pipe = gen.pipe
    request = _request("a castle", steps=3, hr_scale=2, hr_steps=2, hr_denoise=0.5, hr_upscaler=upscaler)
    result = gen.generate(request, output="latent")
    assert result.latents.shape[-2:] == (2 * SIZE // 8, 2 * SIZE // 8)
    first = gen.generate(_request("a castle", steps=3), output="latent").latents
    if upscaler.startswith("Latent"):
        mode = "bilinear" if upscaler == "Latent" else "nearest"
        upscaled = torch.nn.functional.interpolate(first, size=(16, 16), mode=mode)
    else:  # decoded, 8-bit (truncated as the webui does), resized with the filter, encoded again
        with torch.no_grad():
            decoded = pipe.vae.decode(first / pipe.vae.config.scaling_factor).sample
        pixels = (255.0 * ((decoded[0] + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy()).astype(np.uint8)
        image = Image.fromarray(pixels).resize((2 * SIZE, 2 * SIZE), Image.Resampling.NEAREST)
        with torch.no_grad():
            upscaled = (pipe.vae.encode(pipe.image_processor.preprocess(image)).latent_dist.mode() *
                        pipe.vae.config.scaling_factor).contiguous()
    # the hires pass runs exactly hr_steps steps of a schedule of int(hr_steps / denoise) = 4 steps:
    # diffusers' img2img with 4 steps and strength 0.5 runs the same last 2, with fresh noise from the seed
    want = _diffusers_img2img(pipe, upscaled, "a castle", "blurry", 4, 0.5, 7)
    assert torch.equal(result.latents, want)


def test_hires_pass_uses_the_hires_prompt_schedule(gen):
    first, hires = gen.prompts("a [cat:dog:0.5]", "", 4), gen.prompts("a [cat:dog:0.5]", "", 4, 4)
    assert first.conds[0][0].ends == [2, 4]
    assert hires.conds[0][0].ends == [4]  # a fraction counts from 1.0 in the hires pass: dog throughout
    assert torch.equal(hires.conds[0][0].conds[0].embeds, gen.encoder.encode("a dog").embeds)


# ------------------------------------------------------------------------------------------------
# infotext and bad input
# ------------------------------------------------------------------------------------------------
def test_infotext_keys_round_trip(gen, init_image):
    img2img = gen.generate(_request("a house", init_image=init_image, denoising_strength=0.5, steps=2),
                           output="latent")
    fields = infotext.parse(img2img.infotexts[0])
    assert fields["Denoising strength"] == "0.5" and "Hires upscale" not in fields
    hires = gen.generate(_request("a house", steps=2, hr_scale=1.5, hr_steps=2, hr_upscaler="latent (nearest)"),
                         output="latent")
    line = hires.infotexts[0].splitlines()[-1]
    assert "Denoising strength: 0.7, " in line and "Hires upscale: 1.5, Hires steps: 2, " in line
    fields = infotext.parse(hires.infotexts[0])
    assert (fields["Hires upscale"], fields["Hires steps"], fields["Hires upscaler"], fields["Size"]) == \
        ("1.5", "2", "Latent (nearest)", "64x64")
    keys = [k for k, _ in infotext.RE_PARAM.findall(line)]
    assert keys == [k for k in infotext.KEY_ORDER if k in keys]
    assert hires.latents.shape[-1] == 96 // 8
    plain = gen.generate(_request("a house", steps=2), output="latent")
    assert "Denoising strength" not in plain.infotexts[0] and "Hires" not in plain.infotexts[0]


def test_cli_hires_and_from_png(tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(["sample", "--base", "tiny-sd1", "--size", "64x64", "--steps", "2", "--sampler", "Euler",
                   "--prompt", "a [cat:dog:0.5]", "--seed", "3", "--hires", "1.5", "--hires-denoise", "0.6",
                   "--hires-upscaler", "Nearest", "--out", str(out), "--json"])
    assert rc == 0, capsys.readouterr().err
    from PIL import Image

    png = out / "00000-3.png"
    assert Image.open(png).size == (96, 96)
    fields = infotext.parse(infotext.read_png(png))
    assert (fields["Denoising strength"], fields["Hires upscale"], fields["Hires upscaler"]) == ("0.6", "1.5",
                                                                                               "Nearest")
    again = tmp_path / "again"
    rc = cli.main(["sample", "--base", "tiny-sd1", "--from-png", str(png), "--out", str(again), "--json"])
    assert rc == 0, capsys.readouterr().err
    assert np.array_equal(np.asarray(Image.open(again / "00000-3.png")), np.asarray(Image.open(png)))
    assert infotext.read_png(again / "00000-3.png") == infotext.read_png(png)


def test_cli_img2img(tmp_path, capsys, init_image):
    init_image.save(tmp_path / "init.png")
    out = tmp_path / "out"
    rc = cli.main(["sample", "--base", "tiny-sd1", "--steps", "2", "--sampler", "Euler", "--prompt", "a house",
                   "--seed", "1", "--init-image", str(tmp_path / "init.png"), "--denoise", "0.5", "--out", str(out),
                   "--json"])
    assert rc == 0, capsys.readouterr().err
    assert infotext.parse(infotext.read_png(out / "00000-1.png"))["Denoising strength"] == "0.5"


@pytest.mark.parametrize("args, message", [
    (["--init-image", "{init}", "--denoise", "0"], "denoising strength 0.0: must be more than 0"),
    (["--init-image", "{init}", "--denoise", "1.5"], "denoising strength 1.5"),
    (["--init-image", "{bad}"], "cannot read it as an image"),
    (["--init-image", "{missing}"], "cannot read it as an image"),
    (["--denoise", "0.5"], "--denoise is the img2img strength"),
    (["--hires", "0.5"], "hires scale 0.5"),
    (["--hires", "2", "--hires-denoise", "0"], "hires denoising strength 0.0"),
    (["--hires", "2", "--hires-upscaler", "R-ESRGAN 4x+"], "hires upscaler 'R-ESRGAN 4x+'"),
    (["--hires", "2", "--init-image", "{init}"], "not with an init image"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys, init_image, args, message):
    init_image.save(tmp_path / "init.png")
    (tmp_path / "bad.png").write_text("not an image")
    paths = {"init": tmp_path / "init.png", "bad": tmp_path / "bad.png", "missing": tmp_path / "nope.png"}
    args = [a.format(**paths) for a in args]
    out = tmp_path / "out"
    rc = cli.main(["sample", "--base", "tiny-sd1", "--prompt", "x", "--out", str(out), *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()


def test_api_bad_input(gen):
    from dataclasses import replace

    base = _request("x", steps=2)
    for change, match in (({"init_image": "/nonexistent.png"}, "cannot read"),
                          ({"hr_scale": 2, "hr_steps": -1}, "hires steps -1"),
                          ({"hr_scale": float("nan")}, "hires scale")):
        with pytest.raises(AdapterhubError, match=match):
            gen.generate(replace(base, **change), output="latent")
