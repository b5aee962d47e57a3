"""FLUX.1 Fill (BFL's inpainting model): told from a control model by its input width, sampled with an init image
and a mask as diffusers' ``FluxFillPipeline`` samples it, from the Python API and ``adapterhub sample``.

The oracle is ``FluxFillPipeline`` itself, built from the same tiny modules (``tiny-flux-fill``: tiny-flux with the
Fill input, 16 packed latents + 16 masked-image latents + 16 packed mask values), given each image's noise and a
generator seeded with its seed: the latents equal ours bit for bit (fp32, CPU).
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from flux_helpers import peft_file
from PIL import Image
from safetensors.torch import save_file
from flux_helpers import cli as _cli

SIZE, STEPS = 32, 2
LORA_PATHS = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj", "transformer_blocks.1.ff.net.2",
              "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.1.attn.to_v"]
PARTS = ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer")


@pytest.fixture(scope="module")
def tiny_fill(adapterhub_cache):
    from adapterhub.base import load_base

    pipe = load_base("tiny-flux-fill")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def control_model(tiny_flux):
    """tiny-flux with a control model's input: its x_embedder twice as wide (16 packed latents + 16 control)."""
    pipe = copy.deepcopy(tiny_flux)
    old = pipe.transformer.x_embedder
    wide = torch.nn.Linear(2 * old.in_features, old.out_features)
    with torch.no_grad():
        wide.weight.copy_(torch.cat([old.weight, old.weight * 0.5], dim=1))
        wide.bias.copy_(old.bias)
    pipe.transformer.x_embedder = wide
    pipe.transformer.register_to_config(in_channels=wide.in_features, out_channels=old.in_features)
    return pipe


def _image(seed=5, size=SIZE):
    gen = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(size, size, 3, generator=gen) * 255).to(torch.uint8).numpy())


def _mask(size=SIZE):
    """White (repaint) in the right half's middle, black elsewhere: already binary, as the pipeline makes it."""
    pixels = np.zeros((size, size), dtype=np.uint8)
    pixels[size // 4: 3 * size // 4, size // 2:] = 255
    return Image.fromarray(pixels, "L")


def _reference(pipe):
    from diffusers import FluxFillPipeline

    ref = FluxFillPipeline(**{k: getattr(pipe, k) for k in PARTS})
    ref.set_progress_bar_config(disable=True)
    return ref


def _pipeline_latents(ref, gen, seed, latents=None, strength=1.0, guidance=30.0, prompt="a castle"):
    """FluxFillPipeline's final latents (unpacked) for image ``seed``: its noise ours, its generator seeded with it."""
    noise = gen.noise([seed], SIZE, SIZE) if latents is None else latents
    packed = ref._pack_latents(noise, *noise.shape)
    out = ref(prompt, image=_image(), mask_image=_mask(), height=SIZE, width=SIZE, num_inference_steps=STEPS,
              guidance_scale=guidance, strength=strength, latents=packed,
              generator=torch.Generator().manual_seed(seed), output_type="latent").images
    return ref._unpack_latents(out, SIZE, SIZE, ref.vae_scale_factor)


# ---------------------------------------------------------------------------------------------
# what a model takes beside the noise
# ---------------------------------------------------------------------------------------------
def test_fill_and_control_models_are_told_apart_by_their_extra_input(tiny_fill, tiny_flux, control_model):
    from adapterhub.sample.flow_control import model_input

    assert type(tiny_fill).__name__ == "FluxFillPipeline"
    assert tiny_fill.transformer.x_embedder.in_features == 48  # 16 latents + 16 masked image + 4 x (2 x 2) mask
    assert tiny_fill.transformer.config.out_channels == 16
    assert (model_input(tiny_fill), model_input(control_model), model_input(tiny_flux)) == ("fill", "control", None)


def test_fill_is_told_from_its_files_before_loading(tiny_fill, tiny_flux, tmp_path):
    from adapterhub.transformer_bases import transformer_base_facts, transformer_input

    assert transformer_input("tiny-flux-fill") == "fill" and transformer_input("tiny-flux") is None
    tiny_fill.save_pretrained(tmp_path / "fill")
    assert json.loads((tmp_path / "fill" / "model_index.json").read_text())["_class_name"] == "FluxFillPipeline"
    assert transformer_base_facts(str(tmp_path / "fill")) == ("flux", 32)
    assert transformer_input(str(tmp_path / "fill")) == "fill"
    tiny_flux.save_pretrained(tmp_path / "plain")
    assert transformer_input(str(tmp_path / "plain")) is None
    # single files: the input layer's width against the output's (BFL's img_in / final_layer, diffusers' names)
    hidden = 3072
    for name, inputs, kind in (("fill", 384, "fill"), ("canny", 128, "control"), ("dev", 64, None)):
        bfl = {"double_blocks.0.img_attn.qkv.weight": torch.zeros(3 * hidden, hidden),
               "img_in.weight": torch.zeros(hidden, inputs), "final_layer.linear.weight": torch.zeros(64, hidden)}
        save_file(bfl, str(tmp_path / f"flux1-{name}.safetensors"))
        assert transformer_input(str(tmp_path / f"flux1-{name}.safetensors")) == kind, name
        ours = {"single_transformer_blocks.0.attn.to_q.weight": torch.zeros(hidden, hidden),
                "x_embedder.weight": torch.zeros(hidden, inputs), "proj_out.weight": torch.zeros(64, hidden)}
        save_file(ours, str(tmp_path / f"diffusers-{name}.safetensors"))
        assert transformer_input(str(tmp_path / f"diffusers-{name}.safetensors")) == kind, name


# ---------------------------------------------------------------------------------------------
# sampling: FluxFillPipeline's latents, bit for bit
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 2])
def test_fill_sampling_equals_flux_fill_pipeline(tiny_fill, batch):
    """Two images (one pipeline call each, or both in one batch): each image's own noise and masked-image
    latents drawn with its own generator, guidance 30 (the pipeline's default): FluxFillPipeline's latents."""
    from adapterhub.sample.flow_fill import FlowFillGenerator

    gen = FlowFillGenerator(tiny_fill, model_name="tiny", hash_model=False)
    result = gen.generate(_request(seed=7, images=2, batch=batch), output="latent")
    ref = _reference(tiny_fill)
    if batch == 1:
        for i, seed in enumerate((7, 8)):
            assert torch.equal(result.latents[i:i + 1], _pipeline_latents(ref, gen, seed)), seed
    else:  # one call: the image and mask once per image, as the pipeline takes a generator for each
        noise = gen.noise([7, 8], SIZE, SIZE)
        out = ref("a castle", image=[_image()] * 2, mask_image=[_mask()] * 2, height=SIZE, width=SIZE,
                  num_inference_steps=STEPS, num_images_per_prompt=2, latents=ref._pack_latents(noise, *noise.shape),
                  generator=[torch.Generator().manual_seed(s) for s in (7, 8)], output_type="latent").images
        assert torch.equal(result.latents, ref._unpack_latents(out, SIZE, SIZE, ref.vae_scale_factor))
    text = result.infotexts[0]
    for field in ("Steps: 2", "Sampler: Euler", "Distilled CFG Scale: 30", "Denoising strength: 1", "Mask blur: 0",
                  "Seed: 7"):
        assert field in text
    assert "Seed: 8" in result.infotexts[1]


def _request(**options):
    from adapterhub.sample.flow_fill import FlowFillRequest

    values = {"prompt": "a castle", "steps": STEPS, "width": SIZE, "height": SIZE, "sampler": "Euler", "cfg": 1.0,
              "init_image": _image(), "mask": _mask(), "mask_blur": 0, **options}
    return FlowFillRequest(**values)


def test_fill_strength_below_one_runs_the_pipelines_last_steps(tiny_fill):
    """``denoising_strength`` is the pipeline's ``strength``: the last steps of its schedule (here 2 of 4), from the
    init image's latents (the VAE posterior's mean) noised with the image's noise to the first of them."""
    from adapterhub.sample.flow_fill import FlowFillGenerator

    gen = FlowFillGenerator(tiny_fill, model_name="tiny", hash_model=False)
    result = gen.generate(_request(seed=3, steps=4, denoising_strength=0.5), output="latent")
    ref = _reference(tiny_fill)
    pixels = ref.image_processor.preprocess(_image(), height=SIZE, width=SIZE)
    vae = tiny_fill.vae
    init = (vae.encode(pixels).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
    schedule = copy.deepcopy(ref.scheduler)
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    tokens = (SIZE // ref.vae_scale_factor // 2) ** 2
    schedule.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4), mu=calculate_shift(tokens, 256, 4096, 0.5, 1.15))
    start = schedule.scale_noise(init, schedule.timesteps[2:3], gen.noise([3], SIZE, SIZE))
    noise = gen.noise([3], SIZE, SIZE)
    packed = ref._pack_latents(start, *noise.shape)
    out = ref("a castle", image=_image(), mask_image=_mask(), height=SIZE, width=SIZE, num_inference_steps=4,
              strength=0.5, latents=packed, generator=torch.Generator().manual_seed(3), output_type="latent").images
    assert torch.equal(result.latents, ref._unpack_latents(out, SIZE, SIZE, ref.vae_scale_factor))
    assert "Denoising strength: 0.5" in result.infotexts[0]


def test_fill_with_a_flux_lora_on_the_stack_equals_the_pipeline_on_the_merged_model(tiny_fill, tmp_path):
    """A diffusers (PEFT) Flux LoRA on both streams' attention, the MLPs and the single blocks on the stack: the
    pipeline on the merged model; the merged weights are diffusers' own fuse (the LoRA oracle), and the stack comes
    off bit for bit."""
    import adapterhub
    from flux_helpers import diffusers_fused, state

    from adapterhub.sample.flow_fill import FlowFillGenerator

    path = peft_file(tmp_path / "style.safetensors", tiny_fill.transformer, LORA_PATHS, seed=3)
    pipe = copy.deepcopy(tiny_fill)
    before = state(pipe)
    gen = FlowFillGenerator(pipe, model_name="tiny", hash_model=False)
    result = gen.generate(_request(seed=11, stack=[(str(path), 1.0)]), output="latent")
    merged = copy.deepcopy(tiny_fill)
    adapterhub.load(path).merge_into(merged)
    oracle = diffusers_fused(tiny_fill, path)
    ours = state(merged)
    changed = [k for k in oracle if not torch.equal(oracle[k], before[k])]
    assert len(changed) == len(LORA_PATHS)
    for k in oracle:
        torch.testing.assert_close(ours[k], oracle[k], atol=1e-5, rtol=0, msg=k)
    assert torch.equal(result.latents, _pipeline_latents(_reference(merged), gen, 11))
    assert "Lora hashes" in result.infotexts[0]
    gen.close()
    assert all(torch.equal(v, before[k]) for k, v in state(pipe).items())


def test_the_result_is_laid_under_the_original_outside_the_blurred_mask(tiny_fill):
    """As the webui lays every inpainting result: the original's pixels where the blurred mask is black, the
    model's where it is white; the model itself is given the webui's mask (blurred, then binary in the pipeline)."""
    from adapterhub.sample.flow_fill import FlowFillGenerator
    from adapterhub.sample.images import prepare_mask

    gen = FlowFillGenerator(tiny_fill, model_name="tiny", hash_model=False)
    result = gen.generate(_request(seed=1, mask_blur=4))
    out, original = np.asarray(result.images[0].convert("RGB")), np.asarray(_image())
    assert np.array_equal(out[:4, :4], original[:4, :4])  # far from the mask
    assert not np.array_equal(out[14:18, 26:30], original[14:18, 26:30])  # inside it
    prepared = prepare_mask(_mask(), SIZE, SIZE, blur=4, init=_image())
    ref = _reference(tiny_fill)
    noise = gen.noise([1], SIZE, SIZE)
    latents = ref(prompt="a castle", image=_image(), mask_image=prepared.mask, height=SIZE, width=SIZE,
                  num_inference_steps=STEPS, latents=ref._pack_latents(noise, *noise.shape),
                  generator=torch.Generator().manual_seed(1), output_type="latent").images
    ours = gen.generate(_request(seed=1, mask_blur=4), output="latent").latents
    assert torch.equal(ours, ref._unpack_latents(latents, SIZE, SIZE, ref.vae_scale_factor))


def test_emphasis_reaches_the_fill_loop_as_embeddings(tiny_fill):
    """``(castle:1.3)``: the prompt encoded by Forge's engines (as on any Flux base) and handed to the pipeline as
    embeddings; its loop then runs as given them, for each image of a batch."""
    from adapterhub.sample.flow_fill import FlowFillGenerator
    from adapterhub.sample.flow_prompt import encode_text

    gen = FlowFillGenerator(tiny_fill, model_name="tiny", hash_model=False)
    result = gen.generate(_request(prompt="a (castle:1.3)", seed=5, images=2), output="latent")
    plain = gen.generate(_request(seed=5, images=2), output="latent")
    assert not torch.equal(result.latents, plain.latents)
    ref = _reference(tiny_fill)
    embeds, pooled = encode_text(tiny_fill, "flux", "a (castle:1.3)")
    for i, seed in enumerate((5, 6)):
        noise = gen.noise([seed], SIZE, SIZE)
        out = ref(prompt_embeds=embeds, pooled_prompt_embeds=pooled, image=_image(), mask_image=_mask(), height=SIZE,
                  width=SIZE, num_inference_steps=STEPS, latents=ref._pack_latents(noise, *noise.shape),
                  generator=torch.Generator().manual_seed(seed), output_type="latent").images
        assert torch.equal(result.latents[i:i + 1], ref._unpack_latents(out, SIZE, SIZE, ref.vae_scale_factor))


def test_compiled_backend_reaches_the_fill_loop(tiny_fill, monkeypatch):
    """``backend="compiled"``: the Fill pipeline calls the transformer compiled in place (dynamo's ``aot_eager``:
    one graph captured), and its latents equal the eager generator's bit for bit."""
    from adapterhub.sample.flow_fill import FlowFillGenerator

    monkeypatch.setenv("ADAPTERHUB_COMPILE_BACKEND", "aot_eager")
    expected = FlowFillGenerator(tiny_fill, model_name="tiny", hash_model=False).generate(_request(seed=2),
                                                                                          output="latent").latents
    gen = FlowFillGenerator(copy.deepcopy(tiny_fill), backend="compiled", model_name="tiny", hash_model=False)
    torch._dynamo.reset()
    steps = []
    got = gen.generate(_request(seed=2), output="latent", progress=lambda done, total: steps.append((done, total)))
    assert torch.equal(got.latents, expected) and gen.runner.stats()["graphs"] == 1
    assert steps == [(1, 2), (2, 2)]
    gen.close()
    assert gen.pipe.transformer._compiled_call_impl is None


# ---------------------------------------------------------------------------------------------
# refusals: one line each, before anything runs
# ---------------------------------------------------------------------------------------------
def test_each_generator_refuses_the_other_kinds_of_model(tiny_fill, tiny_flux, control_model):
    from adapterhub.errors import AdapterhubError
    from adapterhub.sample.flow import FlowGenerator
    from adapterhub.sample.flow_control import FlowControlGenerator
    from adapterhub.sample.flow_fill import FlowFillGenerator

    for cls in (FlowGenerator, FlowControlGenerator):
        with pytest.raises(AdapterhubError, match="a FLUX.1 Fill model .*needs an init image and a mask"):
            cls(tiny_fill)
    with pytest.raises(AdapterhubError, match="a FLUX.1 control model .* sample it with a control image"):
        FlowFillGenerator(control_model)
    with pytest.raises(AdapterhubError, match="not a FLUX.1 Fill model"):
        FlowFillGenerator(tiny_flux)


@pytest.mark.parametrize("options,problem", [
    ({"mask": None}, "needs an init image and a mask"),
    ({"init_image": None, "mask": None}, "needs an init image and a mask"),
    ({"cfg": 3.0}, "distilled guidance only"),
    ({"hr_scale": 2.0}, "hires fix"),
    ({"inpainting_fill": 2}, "masked content"),
    ({"initial_noise_multiplier": 0.5}, "noise multiplier"),
])
def test_fill_requests_it_cannot_run_are_refused(tiny_fill, options, problem):
    from adapterhub.errors import AdapterhubError
    from adapterhub.sample.flow_fill import FlowFillGenerator

    gen = FlowFillGenerator(tiny_fill, model_name="tiny", hash_model=False)
    with pytest.raises(AdapterhubError, match=problem) as info:
        gen.generate(_request(**options))
    assert "\n" not in str(info.value)


def test_python_call_defaults_to_strength_one_and_guidance_30(tiny_fill):
    from adapterhub.sample.flow_fill import FlowFillGenerator

    gen = FlowFillGenerator(tiny_fill, model_name="tiny", hash_model=False)
    result = gen("a castle", init_image=_image(), mask=_mask(), seed=7, steps=STEPS, width=SIZE, height=SIZE,
                 mask_blur=0)
    assert (result.request.denoising_strength, result.request.distilled_cfg) == (1.0, 30.0)
    assert "Denoising strength: 1," in result.infotexts[0] and "Distilled CFG Scale: 30" in result.infotexts[0]
    expected = gen.generate(_request(seed=7)).images[0]
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(expected))


def test_inverted_mask_repaints_the_black_area(tiny_fill):
    """``inpainting_mask_invert``: the pipeline given the inverted mask."""
    from PIL import ImageOps

    from adapterhub.sample.flow_fill import FlowFillGenerator

    gen = FlowFillGenerator(tiny_fill, model_name="tiny", hash_model=False)
    result = gen.generate(_request(seed=4, inpainting_mask_invert=True), output="latent")
    ref = _reference(tiny_fill)
    noise = gen.noise([4], SIZE, SIZE)
    out = ref("a castle", image=_image(), mask_image=ImageOps.invert(_mask()), height=SIZE, width=SIZE,
              num_inference_steps=STEPS, latents=ref._pack_latents(noise, *noise.shape),
              generator=torch.Generator().manual_seed(4), output_type="latent").images
    assert torch.equal(result.latents, ref._unpack_latents(out, SIZE, SIZE, ref.vae_scale_factor))


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------
def test_cli_samples_a_fill_model_with_its_init_image_and_mask(tmp_path, capsys):
    from adapterhub.sample import infotext
    from adapterhub.sample.flow_fill import FlowFillGenerator

    _image().save(tmp_path / "photo.png")
    _mask().save(tmp_path / "mask.png")
    rc, out, err = _cli(capsys, "sample", "--base", "tiny-flux-fill", "--prompt", "a castle", "--steps", "2",
                        "--seed", "7", "--init-image", str(tmp_path / "photo.png"), "--mask",
                        str(tmp_path / "mask.png"), "--out", str(tmp_path / "images"))
    assert rc == 0, err
    written = sorted((tmp_path / "images").glob("*.png"))
    assert len(written) == 1
    text = Image.open(written[0]).text["parameters"]
    fields = infotext.parse(text, defaults=False)
    assert (fields["Steps"], fields["Sampler"], fields["Seed"], fields["Size"]) == ("2", "Euler", "7", "32x32")
    assert "Distilled CFG Scale: 30" in text and "Denoising strength: 1" in text and "Mask blur: 4" in text
    expected = FlowFillGenerator("tiny-flux-fill")("a castle", steps=2, seed=7, init_image=str(tmp_path / "photo.png"),
                                                   mask=str(tmp_path / "mask.png")).images[0]
    assert np.array_equal(np.asarray(Image.open(written[0]).convert("RGB")), np.asarray(expected.convert("RGB")))


@pytest.mark.parametrize("options,problem", [
    ((), "needs an init image and a mask"),
    (("--init-image", "PHOTO"), "needs an init image and a mask"),
    (("--init-image", "PHOTO", "--mask", "MASK", "--inpainting-fill", "latent-noise"), "masked content"),
])
def test_cli_fill_problems_are_one_line_before_a_model_loads(tmp_path, capsys, monkeypatch, options, problem):
    from adapterhub.sample import flow

    monkeypatch.setattr(flow.FlowGenerator, "__init__", lambda *a, **k: pytest.fail("a model loaded"))
    _image().save(tmp_path / "photo.png")
    _mask().save(tmp_path / "mask.png")
    (tmp_path / "prompts.txt").write_text("a castle\n")
    names = {"PHOTO": "photo.png", "MASK": "mask.png", "PROMPTS": "prompts.txt"}
    options = tuple(str(tmp_path / names[o]) if o in names else o for o in options)
    rc, out, err = _cli(capsys, "sample", "--base", "tiny-flux-fill", "--prompt", "a castle", "--steps", "1",
                        *options, "--out", str(tmp_path / "out"))
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert rc == 2 and problem in err and len(errors) == 1 and "Traceback" not in err, err
    if "init image" in problem:
        assert errors[0].startswith("error: tiny-flux-fill: a FLUX.1 Fill model needs")
    assert not (tmp_path / "out").exists()


def test_cli_control_image_on_a_fill_model_is_one_line(tmp_path, capsys):
    _image().save(tmp_path / "edges.png")
    rc, out, err = _cli(capsys, "sample", "--base", "tiny-flux-fill", "--prompt", "a castle", "--steps", "1",
                        "--control-image", str(tmp_path / "edges.png"), "--out", str(tmp_path / "out"))
    assert rc == 2 and "FLUX.1 Fill model" in err and "init image and a mask" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_generator_picks_the_generator_of_the_models_kind(tiny_fill, control_model, adapterhub_cache):
    """``Generator(base)`` gives the generator the base needs: FlowFillGenerator for a Fill model (by name or as a
    pipeline), FlowControlGenerator for a control model, FlowGenerator for a text-to-image one."""
    from adapterhub.sample import Generator
    from adapterhub.sample.flow import FlowGenerator
    from adapterhub.sample.flow_control import FlowControlGenerator
    from adapterhub.sample.flow_fill import FlowFillGenerator

    assert type(Generator("tiny-flux-fill", hash_model=False)) is FlowFillGenerator
    assert type(Generator(tiny_fill, hash_model=False)) is FlowFillGenerator
    assert type(Generator(control_model, hash_model=False)) is FlowControlGenerator
    assert type(Generator("tiny-flux", hash_model=False)) is FlowGenerator


def test_progress_counts_the_steps_a_fill_pass_runs(tiny_fill):
    """Below strength 1 the pipeline's count runs (the last int(steps x strength) steps): the progress total is that,
    and it reaches it; the CLI's total (``sampling_steps``) is the same."""
    from adapterhub.sample.flow_fill import FlowFillGenerator
    from adapterhub.sample.request import sampling_steps

    gen = FlowFillGenerator(tiny_fill, model_name="tiny", hash_model=False)
    steps = []
    req = _request(seed=2, steps=4, denoising_strength=0.5)
    gen.generate(req, output="latent", progress=lambda done, total: steps.append((done, total)))
    assert steps == [(1, 2), (2, 2)] and sampling_steps(gen.request(req)) == 2


@pytest.mark.parametrize("fill", [1, 0], ids=["original", "fill"])
def test_only_masked_runs_the_fill_model_on_the_padded_crop(tiny_fill, fill):
    """"Only masked" (the webui API's default): the crop around the mask and its padding, at the request's size,
    repainted by FluxFillPipeline (its latents equal the pipeline's on that crop and its mask, bit for bit), then
    laid back into the original; the infotext says Inpaint area / Masked area padding as the webui writes them."""
    from PIL import Image

    from adapterhub.sample.flow_fill import FlowFillGenerator
    from adapterhub.sample.images import prepare_inpaint

    gen = FlowFillGenerator(tiny_fill, model_name="tiny", hash_model=False)
    original = _image().resize((96, 96))
    mask = Image.new("L", (96, 96), 0)
    mask.paste(255, (60, 20, 80, 40))
    req = _request(seed=3, init_image=original, mask=mask, inpaint_full_res=True, inpaint_full_res_padding=8,
                   inpainting_fill=fill)  # the webui API's defaults: only masked, masked content "fill"
    prepared = prepare_inpaint(gen.request(req))
    assert prepared.crop is not None and prepared.init.size == (SIZE, SIZE)
    ref = _reference(tiny_fill)
    noise = gen.noise([3], SIZE, SIZE)
    latents = ref(prompt="a castle", image=prepared.init, mask_image=prepared.mask, height=SIZE, width=SIZE,
                  num_inference_steps=STEPS, latents=ref._pack_latents(noise, *noise.shape),
                  generator=torch.Generator().manual_seed(3), output_type="latent").images
    assert torch.equal(gen.generate(req, output="latent").latents,
                       ref._unpack_latents(latents, SIZE, SIZE, ref.vae_scale_factor))
    result = gen.generate(req)
    out = np.asarray(result.images[0].convert("RGB"))
    assert out.shape == (96, 96, 3) and np.array_equal(out[:16, :16], np.asarray(original)[:16, :16])
    assert "Inpaint area: Only masked, Masked area padding: 8" in result.infotexts[0]


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M"])
def test_a_plain_flow_request_is_taken_as_a_fill_request(tiny_fill, sampler):
    """A :class:`FlowRequest` (what the server plans) below strength 1 runs as the same FlowFillRequest does, on the
    pipeline's loop and on the k-diffusion one: the same latents, the pipeline's step count."""
    from dataclasses import fields

    from adapterhub.sample.flow import FlowRequest
    from adapterhub.sample.flow_fill import FlowFillGenerator

    gen = FlowFillGenerator(tiny_fill, model_name="tiny", hash_model=False)
    fill = _request(seed=6, steps=4, denoising_strength=0.5, sampler=sampler)
    plain = FlowRequest(**{f.name: getattr(fill, f.name) for f in fields(FlowRequest)})
    steps = []
    got = gen.generate(plain, output="latent", progress=lambda done, total: steps.append((done, total)))
    assert torch.equal(got.latents, gen.generate(fill, output="latent").latents)
    assert steps[-1] == (2, 2)
