"""Sampling Flux and SD3 (#21): our generator against diffusers' own FluxPipeline / StableDiffusion3Pipeline.

The oracle is the pipeline called as diffusers' users call it: a list of CPU generators seeded ``seed + n`` (the
webui's per-image seeds), the same prompt, and for a LoRA the pipeline with ``load_lora_weights`` + ``fuse_lora``.
fp32 on CPU, 64 px, 2 steps: latents and images must be equal bit for bit.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from flux_helpers import flow_generator as _generator, peft_file, state
from flux_helpers import cli as _cli

FLUX_LORA_PATHS = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v",
                   "single_transformer_blocks.1.proj_out", "transformer_blocks.1.ff.net.2"]
SD3_LORA_PATHS = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj",
                  "transformer_blocks.1.ff.net.2"]
SIZE, STEPS = 64, 2


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _oracle(pipe, prompt, seeds, output_type="latent", **kwargs):
    """diffusers' pipeline with one CPU generator per image; Flux's packed latents unpacked as ours are."""
    out = pipe(prompt, height=SIZE, width=SIZE, num_inference_steps=STEPS, generator=_gens(seeds),
               num_images_per_prompt=len(seeds), output_type=output_type, **kwargs).images
    if output_type == "latent" and hasattr(pipe, "_unpack_latents"):
        out = pipe._unpack_latents(out, SIZE, SIZE, pipe.vae_scale_factor)
    return out


def _same_images(ours, theirs):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_generator_picks_the_flow_generator_for_flux_and_sd3(tiny_flux, tiny_sd3, tiny_sd1):
    from adapterhub.sample import Generator
    from adapterhub.sample.flow import FlowGenerator

    assert isinstance(_generator(tiny_flux), FlowGenerator) and _generator(tiny_flux).family == "flux"
    assert isinstance(_generator(tiny_sd3), FlowGenerator) and _generator(tiny_sd3).family == "sd3"
    assert type(Generator(tiny_sd1, hash_model=False)) is Generator


def test_flux_latents_and_images_equal_the_pipeline_bitwise(tiny_flux):
    gen = _generator(tiny_flux)
    result = gen.generate(gen.request(_flux_req("a red cat", seed=5, batch=2)), output="latent")
    theirs = _oracle(tiny_flux, "a red cat", [5, 6], guidance_scale=3.5)
    assert result.latents.shape == theirs.shape and torch.equal(result.latents, theirs)
    pictures = gen("a red cat", seed=5, batch=2, steps=STEPS, width=SIZE, height=SIZE)
    assert pictures.latents is None  # images were asked for
    _same_images(pictures.images, _oracle(tiny_flux, "a red cat", [5, 6], output_type="pil", guidance_scale=3.5))
    # each image is its own seed's: the second image alone is the batch's second (up to the batched kernels' last
    # bits); another seed's would differ everywhere
    alone = gen.generate(gen.request(_flux_req("a red cat", seed=6)), output="latent").latents
    torch.testing.assert_close(alone[0], result.latents[1], atol=1e-4, rtol=0)
    assert not torch.allclose(alone[0], result.latents[0], atol=1e-1)


def _flux_req(prompt, **kwargs):
    from adapterhub.sample import FlowRequest  # exported beside Generator

    return FlowRequest(prompt, **{"steps": STEPS, "width": SIZE, "height": SIZE, "cfg": 1.0, **kwargs})


def test_flux_distilled_guidance_and_true_cfg_equal_the_pipeline(tiny_flux):
    gen = _generator(tiny_flux)
    ours = gen.generate(gen.request(_flux_req("a dog", seed=9, distilled_cfg=7.0)), output="latent").latents
    assert torch.equal(ours, _oracle(tiny_flux, "a dog", [9], guidance_scale=7.0))
    assert not torch.equal(ours, _oracle(tiny_flux, "a dog", [9], guidance_scale=3.5))  # the guidance counts
    ours = gen.generate(gen.request(_flux_req("a dog", seed=9, cfg=2.5, negative="blurry")), output="latent").latents
    theirs = _oracle(tiny_flux, "a dog", [9], guidance_scale=3.5, negative_prompt="blurry", true_cfg_scale=2.5)
    assert torch.equal(ours, theirs)


def test_sd3_cfg_with_negative_equals_the_pipeline_bitwise(tiny_sd3):
    gen = _generator(tiny_sd3)
    result = gen("a house", negative="ugly", cfg=5.0, seed=3, batch=2, steps=STEPS, width=SIZE, height=SIZE)
    _same_images(result.images, _oracle(tiny_sd3, "a house", [3, 4], output_type="pil", negative_prompt="ugly",
                                        guidance_scale=5.0))
    ours = gen.generate(gen.request(_flux_req("a house", negative="ugly", cfg=5.0, seed=3)), output="latent").latents
    assert torch.equal(ours, _oracle(tiny_sd3, "a house", [3], negative_prompt="ugly", guidance_scale=5.0))
    assert "Distilled CFG Scale" not in result.infotexts[0]
    assert "Negative prompt: ugly" in result.infotexts[0] and "CFG scale: 5," in result.infotexts[0]


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_lora_tag_equals_the_fused_pipeline_and_is_restored_bitwise(family, tiny_flux, tiny_sd3, tmp_path):
    pipe = tiny_flux if family == "flux" else tiny_sd3
    paths = FLUX_LORA_PATHS if family == "flux" else SD3_LORA_PATHS
    peft_file(tmp_path / "style.safetensors", pipe.transformer, paths, seed=1)
    before = state(pipe)
    fused = copy.deepcopy(pipe)
    fused.load_lora_weights(str(tmp_path / "style.safetensors"), adapter_name="oracle")
    fused.fuse_lora(components=["transformer"], lora_scale=1.0)
    extra = {"guidance_scale": 3.5} if family == "flux" else {"guidance_scale": 7.0, "negative_prompt": ""}
    gen = _generator(pipe, adapter_dirs=[tmp_path])
    req = _flux_req("a tree <lora:style:1>", seed=11, cfg=1.0 if family == "flux" else 7.0)
    ours = gen.generate(gen.request(req), output="latent")
    assert torch.equal(ours.latents, _oracle(fused, "a tree", [11], **extra))
    assert "Lora hashes: \"style: " in ours.infotexts[0]
    plain = gen.generate(gen.request(replace_prompt(req, "a tree")), output="latent").latents
    assert all(torch.equal(v, before[k]) for k, v in state(pipe).items())  # the stack is off, every tensor back
    assert torch.equal(plain, _oracle(pipe, "a tree", [11], **extra))
    gen.generate(gen.request(req), output="latent")
    gen.close()
    assert all(torch.equal(v, before[k]) for k, v in state(pipe).items())


def replace_prompt(req, prompt):
    from dataclasses import replace

    return replace(req, prompt=prompt)


def test_flux_infotext_is_forges(tiny_flux):
    from adapterhub.sample import infotext

    result = _generator(tiny_flux)("a red cat", seed=5, steps=STEPS, width=SIZE, height=SIZE)
    text = result.infotexts[0]
    line = text.splitlines()[-1]
    assert line.startswith("Steps: 2, Sampler: Euler, Schedule type: Automatic, CFG scale: 1, "
                           "Distilled CFG Scale: 3.5, Seed: 5, Size: 64x64, Model: tiny, ")
    fields = infotext.parse(text)
    assert float(fields["Distilled CFG Scale"]) == 3.5 and int(fields["Seed"]) == 5 and fields["Sampler"] == "Euler"


@pytest.mark.parametrize("options, message", [
    ({"sampler": "DDIM"}, "flow-matching model; choose Euler"),
    ({"schedule": "Align Your Steps"}, "choose Automatic"),
    ({"hr_scale": 2.0, "hr_upscaler": "ESRGAN_4x"}, "hires upscaler 'ESRGAN_4x': choose one of"),
    ({"clip_skip": 2}, "clip skip 2: not available"),
])
def test_flow_request_refusals(tiny_flux, options, message):
    from adapterhub.errors import AdapterhubError

    gen = _generator(tiny_flux)
    with pytest.raises(AdapterhubError, match=message.replace("(", r"\(")):
        gen.request(_flux_req("a cat", **options))


def test_size_off_the_token_grid_is_refused(tiny_flux, monkeypatch):
    """FLUX.1's grid is 16 px (VAE 8 x 2 x 2 packing); the tiny base's 4 px lets every multiple of 8 through, so the
    real grid is set here: 72 px would be resized by the pipeline, away from the noise drawn for it."""
    from adapterhub.errors import AdapterhubError
    from adapterhub.sample.flow import FlowGenerator

    gen = _generator(tiny_flux)
    assert gen.size_multiple == 4
    monkeypatch.setattr(FlowGenerator, "size_multiple", property(lambda self: 16))
    with pytest.raises(AdapterhubError, match="size 72x64: this flux base needs width and height in multiples of 16"):
        gen.request(_flux_req("a cat", width=72))


def test_cli_samples_tiny_flux_with_forges_infotext(capsys, tmp_path, tiny_flux):
    from PIL import Image

    out = tmp_path / "out"
    rc, stdout, err = _cli(capsys, "sample", "--base", "tiny-flux", "--prompt", "a red cat", "--steps", "2",
                           "--size", "64x64", "--seed", "5", "--distilled-cfg", "4", "--out", str(out), "--json")
    assert rc == 0, err
    files = sorted(out.glob("*.png"))
    assert len(files) == 1
    with Image.open(files[0]) as image:
        text = image.info["parameters"]
        pixels = np.asarray(image.convert("RGB"))
    assert "Sampler: Euler, Schedule type: Automatic, CFG scale: 1, Distilled CFG Scale: 4, Seed: 5" in text
    theirs = _oracle(tiny_flux, "a red cat", [5], output_type="pil", guidance_scale=4.0)[0]
    assert np.array_equal(pixels, np.asarray(theirs))


@pytest.mark.parametrize("base, args, message", [
    ("tiny-flux", ["--sampler", "DDIM"], "sampler 'DDIM': Flux is a flow-matching model"),
    ("tiny-flux", ["--hires", "2", "--hires-denoise", "0"], "hires denoising strength 0.0: must be more than 0"),
    ("tiny-sd3", ["--distilled-cfg", "3"], "SD3 has no distilled guidance"),
    ("tiny-sd1", ["--distilled-cfg", "3"], "--distilled-cfg is Flux-dev's guidance"),
    ("tiny-flux", ["--backend", "nonesuch"], "unknown sampler backend 'nonesuch'"),
])
def test_cli_refusals_are_one_line_exit_2_nothing_written(capsys, tmp_path, base, args, message):
    out = tmp_path / "out"
    rc, stdout, err = _cli(capsys, "sample", "--base", base, "--prompt", "a cat", "--steps", "2", *args,
                           "--out", str(out))
    assert rc == 2
    assert message in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1
    assert not out.exists() or not any(out.iterdir())


def test_cli_samples_a_diffusers_folder_of_sd3(capsys, tmp_path, tiny_sd3):
    """A diffusers folder of the family is told from its files and sampled as the tiny base is."""
    folder = tmp_path / "my-sd3"
    tiny_sd3.save_pretrained(folder)
    out = tmp_path / "out"
    rc, stdout, err = _cli(capsys, "sample", "--base", str(folder), "--prompt", "a house", "--negative", "ugly",
                           "--steps", "2", "--size", "64x64", "--seed", "3", "--cfg", "5", "--out", str(out))
    assert rc == 0, err
    from PIL import Image

    (path,) = sorted(out.glob("*.png"))
    with Image.open(path) as image:
        text, pixels = image.info["parameters"], np.asarray(image.convert("RGB"))
    assert "Sampler: Euler" in text and "Model: my-sd3" in text and "Model hash: " in text
    theirs = _oracle(tiny_sd3, "a house", [3], output_type="pil", negative_prompt="ugly", guidance_scale=5.0)[0]
    assert np.array_equal(pixels, np.asarray(theirs))


def test_from_png_reruns_a_flux_image_pixel_for_pixel(capsys, tmp_path, tiny_flux):
    """--from-png takes Forge's fields back: the Distilled CFG Scale, and a CFG above Flux's default of 1 (the
    family's defaults fill in only what neither the command line nor the image gives)."""
    from PIL import Image

    first, again = tmp_path / "first", tmp_path / "again"
    rc, _, err = _cli(capsys, "sample", "--base", "tiny-flux", "--prompt", "a red cat", "--negative", "blurry",
                      "--steps", "2", "--size", "64x64", "--seed", "8", "--cfg", "1.5", "--distilled-cfg", "5",
                      "--out", str(first))
    assert rc == 0, err
    (made,) = sorted(first.glob("*.png"))
    rc, _, err = _cli(capsys, "sample", "--base", "tiny-flux", "--from-png", str(made), "--out", str(again))
    assert rc == 0, err
    (rerun,) = sorted(again.glob("*.png"))
    with Image.open(made) as a, Image.open(rerun) as b:
        assert a.info["parameters"].replace("RNG: CPU, ", "") == b.info["parameters"].replace("RNG: CPU, ", "")
        assert "CFG scale: 1.5, Distilled CFG Scale: 5," in b.info["parameters"]
        assert np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


def test_compiled_backend_switches_stacks_in_place_with_no_recompile(tiny_flux, tmp_path, monkeypatch):
    """``--backend compiled`` on Flux: the transformer compiled once (dynamo's ``aot_eager``: capture and guards
    without code generation); switching between two LoRAs, a weight and no stack compiles nothing again, and
    every image equals the eager generator's bit for bit; closing restores the weights and the eager forward."""
    from dataclasses import replace

    monkeypatch.setenv("ADAPTERHUB_COMPILE_BACKEND", "aot_eager")
    peft_file(tmp_path / "a.safetensors", tiny_flux.transformer, FLUX_LORA_PATHS, seed=2)
    peft_file(tmp_path / "b.safetensors", tiny_flux.transformer, FLUX_LORA_PATHS[:2], seed=3)
    before = state(tiny_flux)
    req = _flux_req("a cat", seed=4)
    stacks = [None, "a:0.8", "b:1", "a:0.8, b:0.5", "a:0.3", None]
    eager = _generator(tiny_flux, adapter_dirs=[tmp_path])
    expected = [eager.generate(eager.request(replace(req, stack=s)), output="latent").latents for s in stacks]
    eager.close()
    # a graph compiled earlier in the process (another test, another model) is not this runner's
    torch.compile(lambda x: x * 2 + 1, backend="eager")(torch.ones(3))
    gen = _generator(copy.deepcopy(tiny_flux), backend="compiled", adapter_dirs=[tmp_path])
    torch._dynamo.reset()
    first = gen.generate(gen.request(req), output="latent").latents  # compiles
    assert torch.equal(first, expected[0]) and gen.runner.stats()["graphs"] == 1
    # config.patch, not monkeypatch: pytest's monkeypatch reads a dynamo config as missing and deletes it on undo
    # (hiding it from every later test in the process)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for stack, want in zip(stacks[1:], expected[1:]):
            got = gen.generate(gen.request(replace(req, stack=stack)), output="latent").latents
            assert torch.equal(got, want), stack
    assert gen.runner.stats()["graphs"] == 1
    gen.close()
    assert gen.pipe.transformer._compiled_call_impl is None
    assert all(torch.equal(v, before[k]) for k, v in state(gen.pipe).items())


def test_progress_counts_every_step_of_every_image(tiny_sd3):
    gen = _generator(tiny_sd3)
    seen = []
    gen.generate(gen.request(_flux_req("a cat", seed=1, batch=2, images=4, steps=3)), output="latent",
                 progress=lambda done, total: seen.append((done, total)))
    assert seen == [(2 * i, 12) for i in range(1, 7)]


def test_compiled_backend_refuses_what_is_not_a_weight_delta(tiny_flux, tiny_sd1, tmp_path):
    """A hypernetwork runs code at run time, which a compiled transformer cannot take in: refused by name before
    anything is attached (the eager backend would try, and the shapes decide)."""
    import adapterhub
    from adapterhub.errors import AdapterhubError
    from adapterhub.plugins import adapter_type
    from adapterhub.sample.flow import CompiledTransformer
    from adapterhub.stack import Stack

    path = adapter_type("hypernetwork").example(tiny_sd1, tmp_path / "hyper.pt")
    stack = Stack([(adapterhub.load(path), 1.0)])
    runner = CompiledTransformer(copy.deepcopy(tiny_flux))  # torch.compile is lazy: nothing is built here
    with pytest.raises(AdapterhubError, match=r"hyper: the compiled backend runs weight deltas on Flux / SD3"):
        runner.check_stack(stack)
    runner.close()


def test_a_flux_folder_of_another_pipeline_is_refused_in_one_line(capsys, tmp_path, tiny_flux):
    """A FLUX.1 Fill folder (its model_index names FluxFillPipeline) is of the family but needs an image and a mask:
    one line naming the folder and what it needs, exit code 2, nothing written."""
    import json

    folder = tmp_path / "flux-fill"
    tiny_flux.save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxFillPipeline"}))
    out = tmp_path / "out"
    rc, _, err = _cli(capsys, "sample", "--base", str(folder), "--prompt", "a cat", "--steps", "2", "--size",
                      "64x64", "--out", str(out))
    assert rc == 2 and "Traceback" not in err
    assert f"error: {folder}: a FLUX.1 Fill model needs an init image and a mask" in err
    assert not out.exists() or not any(out.iterdir())


def test_cli_stack_file_equals_the_fused_pipeline(capsys, tmp_path, tiny_sd3):
    """--stack FILE:W from the command line: the image equals diffusers' pipeline with the LoRA fused at W."""
    from PIL import Image

    lora = peft_file(tmp_path / "style.safetensors", tiny_sd3.transformer, SD3_LORA_PATHS, seed=4)
    fused = copy.deepcopy(tiny_sd3)
    fused.load_lora_weights(str(lora), adapter_name="oracle")
    fused.fuse_lora(components=["transformer"], lora_scale=0.5)
    out = tmp_path / "out"
    rc, _, err = _cli(capsys, "sample", "--base", "tiny-sd3", "--prompt", "a boat", "--stack", f"{lora}:0.5",
                      "--steps", "2", "--size", "64x64", "--seed", "12", "--cfg", "4", "--out", str(out))
    assert rc == 0, err
    (path,) = sorted(out.glob("*.png"))
    with Image.open(path) as image:
        pixels, text = np.asarray(image.convert("RGB")), image.info["parameters"]
    theirs = _oracle(fused, "a boat", [12], output_type="pil", negative_prompt="", guidance_scale=4.0)[0]
    assert np.array_equal(pixels, np.asarray(theirs))
    assert "Lora hashes: \"style: " in text


def test_cli_prompt_file_on_flux(capsys, tmp_path, tiny_flux):
    """--prompts on Flux: each line a job with the family's defaults and its own options; its images equal the
    pipeline's. A line asking for a sampler the family has not is refused with the file and line, nothing written."""
    from PIL import Image

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\n--prompt a blue dog --seed 21\n")
    out = tmp_path / "out"
    rc, _, err = _cli(capsys, "sample", "--base", "tiny-flux", "--prompts", str(prompts), "--steps", "2",
                      "--size", "64x64", "--seed", "5", "--out", str(out))
    assert rc == 0, err
    files = sorted(out.glob("*.png"))
    assert len(files) == 2
    with Image.open(files[1]) as image:
        pixels, text = np.asarray(image.convert("RGB")), image.info["parameters"]
    assert text.startswith("a blue dog\n") and "Sampler: Euler" in text and "Seed: 21," in text
    assert np.array_equal(pixels, np.asarray(_oracle(tiny_flux, "a blue dog", [21], output_type="pil",
                                                     guidance_scale=3.5)[0]))
    bad = tmp_path / "bad.txt"
    bad.write_text("a red cat\n--prompt a dog --sampler_name \"DDIM\"\n")
    rc, _, err = _cli(capsys, "sample", "--base", "tiny-flux", "--prompts", str(bad), "--out", str(tmp_path / "b"))
    assert rc == 2 and f"{bad}:2: sampler 'DDIM': Flux is a flow-matching model" in err
    assert not (tmp_path / "b").exists()


def test_cli_xy_plot_on_flux(capsys, tmp_path, tiny_flux):
    """An X/Y plot on Flux: every cell equals the pipeline's image for its values (CFG 2 is real CFG with the empty
    negative prompt); a sampler axis naming a sampler the family has not is refused with the cell, nothing written."""
    import json

    from PIL import Image

    out = tmp_path / "out"
    rc, stdout, err = _cli(capsys, "sample", "--base", "tiny-flux", "--prompt", "a cat", "--x", "cfg=1,2", "--steps",
                           "2", "--size", "64x64", "--seed", "3", "--out", str(out), "--json")
    assert rc == 0, err
    cells = json.loads(stdout)["cells"]
    assert len(cells) == 2
    for cell, extra in zip(cells, [{}, {"negative_prompt": "", "true_cfg_scale": 2.0}]):
        with Image.open(cell["path"]) as image:
            pixels = np.asarray(image.convert("RGB"))
        theirs = _oracle(tiny_flux, "a cat", [3], output_type="pil", guidance_scale=3.5, **extra)[0]
        assert np.array_equal(pixels, np.asarray(theirs))
    assert "Distilled CFG Scale: 3.5" in cells[1]["parameters"] and "CFG scale: 2," in cells[1]["parameters"]
    rc, _, err = _cli(capsys, "sample", "--base", "tiny-flux", "--prompt", "a cat", "--x", "sampler=Euler,DDIM",
                      "--out", str(tmp_path / "bad"))
    assert rc == 2 and "sampler 'DDIM': Flux is a flow-matching model" in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()


def test_a_flow_request_without_cfg_takes_the_familys(tiny_flux, tiny_sd3):
    from adapterhub.sample import FlowRequest, Request

    assert _generator(tiny_flux).request(FlowRequest("a cat", width=SIZE, height=SIZE)).cfg == 1.0
    assert _generator(tiny_sd3).request(FlowRequest("a cat", width=SIZE, height=SIZE)).cfg == 7.0
    assert _generator(tiny_flux).request(FlowRequest("a cat", cfg=2.0, width=SIZE, height=SIZE)).cfg == 2.0
    plain = _generator(tiny_flux).request(Request("a cat", sampler="Euler", width=SIZE, height=SIZE))
    assert plain.cfg == 7.0  # a plain Request is taken as written


def _kdiffusion_heun(pipe, prompt, negative, cfg, seed, steps):
    """The oracle for Heun on SD3: k-diffusion's ``sample_heun`` on the flow model as a denoiser (x - sigma v, the
    velocity guided with CFG), on the pipeline scheduler's own shifted sigmas, from the seed's noise."""
    from test_sample_ksamplers import load_kdiffusion  # k-diffusion's sampling module without its training deps

    k = load_kdiffusion()
    if k is None:
        pytest.skip("the oracle k-diffusion is not installed")
    sample_heun = k.sampling.sample_heun
    with torch.no_grad():
        pe, ne, pp, npp = pipe.encode_prompt(prompt, prompt, prompt, negative_prompt=negative, negative_prompt_2=negative,
                                             negative_prompt_3=negative, device="cpu", do_classifier_free_guidance=True)
        scheduler = copy.deepcopy(pipe.scheduler)
        scheduler.set_timesteps(steps)
        sigmas = scheduler.sigmas.to(torch.float32)
        noise = torch.randn((1, 4, SIZE // 2, SIZE // 2), generator=torch.Generator().manual_seed(seed))

        def denoiser(x, sigma):
            t = (sigma * 1000).expand(2)
            v = pipe.transformer(hidden_states=torch.cat([x, x]), timestep=t, encoder_hidden_states=torch.cat([ne, pe]),
                                 pooled_projections=torch.cat([npp, pp]), return_dict=False)[0]
            v_u, v_c = v.chunk(2)
            return x - sigma * (v_u + cfg * (v_c - v_u))

        return sample_heun(denoiser, noise * sigmas[0], sigmas, disable=True)


def test_sd3_heun_equals_k_diffusions_heun_on_the_flow_sigmas(tiny_sd3):
    gen = _generator(tiny_sd3)
    seen = []
    req = _flux_req("a house", negative="ugly", cfg=5.0, seed=3, sampler="Heun", steps=3)
    result = gen.generate(gen.request(req), output="latent", progress=lambda d, t: seen.append((d, t)))
    theirs = _kdiffusion_heun(tiny_sd3, "a house", "ugly", 5.0, 3, 3)
    torch.testing.assert_close(result.latents, theirs, atol=1e-4, rtol=1e-4)
    from dataclasses import replace

    euler = gen.generate(gen.request(replace(req, sampler="Euler")), output="latent").latents
    assert not torch.allclose(result.latents, euler, atol=1e-3)  # the oracle tells the two apart
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert "Sampler: Heun, " in result.infotexts[0]
    assert type(tiny_sd3.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"  # the base's is put back


def test_heun_runs_on_flux_through_k_diffusion(tiny_flux):
    from adapterhub.sample.flow import PIPELINE_SAMPLERS

    # FluxPipeline cannot drive diffusers' Heun scheduler: k-diffusion's Heun runs it (tests/test_flux_sd3_samplers.py)
    assert "Heun" not in PIPELINE_SAMPLERS["flux"]
    assert _generator(tiny_flux).request(_flux_req("a cat", sampler="heun")).sampler == "Heun"
