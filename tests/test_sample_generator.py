"""The generator against diffusers' own pipelines: same scheduler, seeds and embeddings give the same
latents bit for bit (fp32, CPU); seeds per image; adapter stacks switched in and out exactly."""
from __future__ import annotations

import copy

import pytest
import torch

from adapterhub.errors import AdapterhubError
from adapterhub.sample.samplers import make_scheduler, resolve_sampler

SIZE, STEPS = 64, 3


def with_norm_bias(pipe):
    """The tiny base's final layer norm has no bias, so a chunk's mean is 0 and the webui's emphasis
    re-normalisation is undefined; real encoders have one. Give the copy one."""
    te = pipe.text_encoder
    ln = getattr(te, "text_model", te).final_layer_norm
    with torch.no_grad():
        ln.bias.copy_(0.05 + 0.1 * torch.randn(ln.bias.shape, generator=torch.Generator().manual_seed(0)))
    return pipe


@pytest.fixture(scope="module")
def gen_sd1(tiny_sd1):
    from adapterhub.sample.generator import Generator

    return Generator(with_norm_bias(copy.deepcopy(tiny_sd1)), model_name="tiny-sd1", model_hash="0123456789")


@pytest.fixture(scope="module")
def gen_sdxl(tiny_sdxl):
    from adapterhub.sample.generator import Generator

    return Generator(tiny_sdxl, model_name="tiny-sdxl", hash_model=False)  # read-only use: no stacks


def _diffusers_latents(gen, cond, uncond, sampler, seeds, cfg=7.0):
    """diffusers' own pipeline (a new pipeline object over the same modules) with our scheduler."""
    sampler_, key = resolve_sampler(sampler)
    components = {**gen.pipe.components, "scheduler": make_scheduler(sampler_, key, gen.pipe.scheduler.config)}
    pipe = type(gen.pipe)(**components)
    pipe.set_progress_bar_config(disable=True)
    kw = {"prompt_embeds": cond.embeds, "negative_prompt_embeds": uncond.embeds}
    if gen.is_xl:
        kw.update(pooled_prompt_embeds=cond.pooled, negative_pooled_prompt_embeds=uncond.pooled)
    return pipe(**kw, num_inference_steps=STEPS, guidance_scale=cfg, width=SIZE, height=SIZE,
                num_images_per_prompt=len(seeds), generator=[torch.Generator().manual_seed(s) for s in seeds],
                output_type="latent").images


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M", "DDIM", "DPM++ 2M SDE"])
def test_sd1_latents_equal_diffusers_bitwise(gen_sd1, sampler):
    prompt, negative = "a (red:1.2) house, [blurry]", "ugly"
    result = gen_sd1.generate(_request(prompt, negative, 11, sampler, batch=2), output="latent")
    cond, uncond = gen_sd1.encode(prompt, negative)
    want = _diffusers_latents(gen_sd1, cond, uncond, sampler, [11, 12])
    assert result.latents.dtype == torch.float32
    assert torch.equal(result.latents, want)


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M"])
def test_sdxl_latents_equal_diffusers_bitwise(gen_sdxl, sampler):
    result = gen_sdxl.generate(_request("a cat in the snow", "dog", 3, sampler, batch=2), output="latent")
    cond, uncond = gen_sdxl.encode("a cat in the snow", "dog")
    assert cond.pooled is not None
    assert torch.equal(result.latents, _diffusers_latents(gen_sdxl, cond, uncond, sampler, [3, 4]))


def test_sdxl_empty_negative_is_zeros(gen_sdxl):
    cond, uncond = gen_sdxl.encode("a cat", "")
    assert not uncond.embeds.any() and not uncond.pooled.any()


def _request(prompt, negative, seed, sampler, **kw):
    from adapterhub.sample.generator import Request

    return Request(prompt, negative=negative, seed=seed, sampler=sampler, steps=STEPS, width=SIZE, height=SIZE, **kw)


def test_image_n_of_a_batch_uses_seed_plus_n(gen_sd1):
    single = gen_sd1.generate(_request("a boat", "", 102, "Euler a"), output="latent")
    one_by_one = gen_sd1.generate(_request("a boat", "", 100, "Euler a", batch=1, images=3), output="latent")
    assert one_by_one.seeds == [100, 101, 102]
    assert torch.equal(one_by_one.latents[2:], single.latents)  # its own generator: initial and ancestral noise
    batch = gen_sd1.generate(_request("a boat", "", 100, "Euler a", batch=3), output="latent")
    assert batch.seeds == [100, 101, 102]
    # a batch of 3 runs the UNet on 6 samples at once: equal up to float rounding, amplified by cfg 7
    torch.testing.assert_close(batch.latents, one_by_one.latents, rtol=1e-3, atol=1e-3)
    noise, _ = gen_sd1.noise([100, 101], SIZE, SIZE)
    want = torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(101))
    assert torch.equal(noise[1:], want)


def test_prompt_and_negative_of_different_lengths(gen_sd1):
    result = gen_sd1.generate(_request("cat " * 80, "ugly", 1, "Euler"), output="latent")
    assert torch.isfinite(result.latents).all()


def test_images_and_infotext(gen_sd1):
    result = gen_sd1("a tree", negative="fog", seed=5, steps=2, sampler="Euler a", width=SIZE, height=SIZE, batch=2)
    assert [im.size for im in result.images] == [(SIZE, SIZE)] * 2
    assert result.infotexts[0].splitlines() == [
        "a tree", "Negative prompt: fog",
        "Steps: 2, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 5, Size: 64x64, "
        "Model hash: 0123456789, Model: tiny-sd1, RNG: CPU, Version: adapterhub 0.1.0"]
    assert "Seed: 6," in result.infotexts[1]


@pytest.mark.parametrize("change, match", [
    ({"width": 100}, "multiples of 8"), ({"steps": 0}, "steps 0"), ({"sampler": "nope"}, "unknown sampler"),
    ({"clip_skip": 0}, "clip skip"),
])
def test_bad_requests_fail_before_sampling(gen_sd1, change, match):
    from dataclasses import replace

    with pytest.raises(AdapterhubError, match=match):
        gen_sd1.generate(replace(_request("x", "", 1, "Euler"), **change), output="latent")


# ------------------------------------------------------------------------------------------------
# stacks
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def loras(tmp_path_factory, tiny_sd1):
    from adapterhub.plugins import adapter_type

    folder = tmp_path_factory.mktemp("loras")
    for name, seed in (("style", 1), ("other", 2)):
        adapter_type("lora").example(tiny_sd1, folder / f"{name}.safetensors", seed=seed)
    return folder


def _state(pipe):
    return {k: v.clone() for k, v in pipe.unet.state_dict().items()} | \
        {f"te.{k}": v.clone() for k, v in pipe.text_encoder.state_dict().items()}


def test_prompt_tags_equal_a_merged_base_and_switch_back_exactly(gen_sd1, loras, tiny_sd1):
    import adapterhub
    from adapterhub.sample.generator import Generator

    gen_sd1.adapter_dirs = [loras]
    pristine = _state(gen_sd1.pipe)
    tagged = gen_sd1.generate(_request("a castle <lora:style:0.8>", "", 9, "Euler"), output="latent")
    assert gen_sd1.stack is not None and len(gen_sd1.stack) == 1
    merged_pipe = with_norm_bias(copy.deepcopy(tiny_sd1))
    adapterhub.load(loras / "style.safetensors").merge_into(merged_pipe, 0.8)
    merged = Generator(merged_pipe).generate(_request("a castle", "", 9, "Euler"), output="latent")
    assert torch.equal(tagged.latents, merged.latents)
    assert 'Lora hashes: "style: ' in tagged.infotexts[0]
    assert tagged.infotexts[0].startswith("a castle <lora:style:0.8>\n")

    gen_sd1.generate(_request("a castle", "", 9, "Euler", stack="other:0.5"), output="latent")
    plain = gen_sd1.generate(_request("a castle", "", 9, "Euler"), output="latent")
    assert gen_sd1.stack is None
    after = _state(gen_sd1.pipe)
    assert all(torch.equal(pristine[k], after[k]) for k in pristine)
    base = Generator(with_norm_bias(copy.deepcopy(tiny_sd1)))
    base = base.generate(_request("a castle", "", 9, "Euler"), output="latent")
    assert torch.equal(plain.latents, base.latents)


def test_unknown_adapter_and_bad_tag_weight_change_nothing(gen_sd1, loras):
    gen_sd1.adapter_dirs = [loras]
    before = _state(gen_sd1.pipe)
    with pytest.raises(AdapterhubError):
        gen_sd1.generate(_request("a <lora:missing:0.8>", "", 1, "Euler"), output="latent")
    with pytest.raises(AdapterhubError, match="not a number"):
        gen_sd1.generate(_request("a <lora:style:abc>", "", 1, "Euler"), output="latent")
    after = _state(gen_sd1.pipe)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_textual_inversion_is_expanded_hashed_and_removed(gen_sd1, tmp_path, tiny_sd1):
    from adapterhub.plugins import adapter_types
    from adapterhub.sample import infotext

    if "textual_inversion" not in adapter_types():
        pytest.skip("textual_inversion plugin not registered")
    path = adapter_types()["textual_inversion"].example(tiny_sd1, tmp_path / "easyneg.pt", seed=1)
    result = gen_sd1.generate(_request("a cat", "easyneg, blurry", 1, "Euler", stack=str(path)), output="latent")
    assert f'TI hashes: "easyneg: {infotext.embedding_hash(path)}"' in result.infotexts[0]
    tok = gen_sd1.pipe.tokenizer
    expanded = gen_sd1.stack.rewrite_prompt("easyneg, blurry")
    ids = gen_sd1.encoder.tokenize(expanded)[0].chunks[0].tokens
    assert tok.convert_tokens_to_ids(["easyneg", "easyneg_1"]) == ids[1:3]  # both vectors, one chunk
    gen_sd1.generate(_request("a cat", "", 1, "Euler"), output="latent")
    assert gen_sd1.stack is None and "easyneg" not in tok.get_vocab()
