"""FLUX.1 control and Fill models on the k-diffusion loop: every sampler and schedule, prompt editing and ``AND``.

The oracle: the model's input beside the noise as its own diffusers pipeline makes it, read off the transformer
call of a one-step ``FluxControlPipeline`` / ``FluxFillPipeline`` run (the control image's packed latents; the
masked image's packed latents and the packed mask), each image's generator seeded with its seed; the transformer
called with ``torch.cat([packed_latents, extra], dim=2)`` as those pipelines call it (``x - sigma v``, the
velocity unpacked), stepped by k-diffusion's own ``sample_*`` on the same sigmas and noise as ours (the
scaffolding of tests/test_flux_sd3_samplers.py). Euler on "Automatic" stays the pipelines' own loop, bit for bit.
fp32 on CPU, 64 px, 2-3 steps.
"""
from __future__ import annotations

import pytest
import torch
from test_flux_control_lora import _control_image, control_file, control_model  # noqa: F401 (a fixture)
from test_flux_fill import _image, _mask, tiny_fill  # noqa: F401 (a fixture)
from test_flux_sd3_samplers import SIZE, _karras, _oracle
from flux_helpers import k  # noqa: F401  (the k-diffusion fixture)

STEPS = 3
PARTS = ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer")
pytestmark = pytest.mark.filterwarnings("ignore:Should have ta>=t0:UserWarning")




def _pipeline(kind, pipe):
    from diffusers import FluxControlPipeline, FluxFillPipeline

    ref = (FluxControlPipeline if kind == "control" else FluxFillPipeline)(**{k: getattr(pipe, k) for k in PARTS})
    ref.set_progress_bar_config(disable=True)
    return ref


def _inputs(kind, picture=None):
    """The pipeline's images for ``kind`` at 64 px (``picture``: the Fill model's init image, if not the default)."""
    if kind == "control":
        return {"control_image": _control_image(SIZE)}  # resized by the pipeline to the size it samples
    return {"image": picture or _image(size=SIZE), "mask_image": _mask(SIZE)}


def _extra(kind, pipe, seed, picture=None, size=SIZE):
    """The pipeline's input beside the noise for image ``seed``: what its transformer is called with past the
    packed latents' channels, read off its first call (the latents handed to it, as ours hands them: the pipeline
    draws none from the generator)."""
    ref = _pipeline(kind, pipe)
    width = 4 * int(pipe.vae.config.latent_channels)
    rows = size // pipe.vae_scale_factor
    latents = ref._pack_latents(torch.zeros(1, width // 4, rows, rows), 1, width // 4, rows, rows)
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda _m, _a, kwargs: seen.append(kwargs["hidden_states"][..., width:].clone()), with_kwargs=True)
    try:
        ref("x", height=size, width=size, num_inference_steps=1, generator=torch.Generator().manual_seed(seed),
            latents=latents, output_type="latent", **_inputs(kind, picture))
    finally:
        hook.remove()
    return seen[0]


def _denoiser(pipe, extra, parts, guidance, size=SIZE):
    """k-diffusion's denoiser over the transformer as the control / Fill pipeline calls it (the extra input
    concatenated on the channel dim); ``parts``: one entry per model call (the last repeated) of
    ``[(text, weight), ...]``, the clean estimates of the sub-prompts averaged by weight (CFG 1)."""
    encoded = {}
    rows = size // pipe.vae_scale_factor
    img_ids = pipe._prepare_latent_image_ids(1, rows // 2, rows // 2, "cpu", torch.float32)
    calls = []

    def clean(x, sigma, text):
        if text not in encoded:
            encoded[text] = pipe.encode_prompt(text, prompt_2=None, device="cpu")
        pe, pooled, ids = encoded[text]
        packed = pipe._pack_latents(x, 1, x.shape[1], rows, rows)
        v = pipe.transformer(hidden_states=torch.cat([packed, extra], dim=2), timestep=sigma,
                             guidance=torch.full([1], guidance), pooled_projections=pooled, encoder_hidden_states=pe,
                             txt_ids=ids, img_ids=img_ids, return_dict=False)[0]
        return x - sigma.reshape(-1, 1, 1, 1) * pipe._unpack_latents(v, size, size, pipe.vae_scale_factor)

    def denoiser(x, sigma):
        subs = parts[min(len(calls), len(parts) - 1)]
        calls.append(sigma)
        with torch.no_grad():
            return sum(clean(x, sigma, t) * w for t, w in subs) / sum(w for _, w in subs)
    return denoiser


def _automatic(pipe, steps=STEPS):
    """The pipeline's own sigmas at 64 px (diffusers' scheduler, Flux's shift by image size)."""
    import diffusers
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    c = pipe.scheduler.config
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(c)
    mu = calculate_shift((SIZE // pipe.vae_scale_factor // 2) ** 2, c.base_image_seq_len, c.max_image_seq_len,
                         c.base_shift, c.max_shift)
    scheduler.set_timesteps(sigmas=[1.0 - i / steps for i in range(steps)], mu=mu)
    return scheduler.sigmas.float()


def _request(kind, prompt="a castle", **options):
    """``kind``'s request: 64 px, seed 7 unless given, its images."""
    from adapterhub.sample.flow_control import FlowControlRequest
    from adapterhub.sample.flow_fill import FlowFillRequest

    common = {"seed": 7, "steps": STEPS, "width": SIZE, "height": SIZE, "cfg": 1.0, **options}
    if kind == "control":
        return FlowControlRequest(prompt, control_image=_control_image(SIZE), **common)
    return FlowFillRequest(prompt, **{"init_image": _image(size=SIZE), "mask": _mask(SIZE), "mask_blur": 0, **common})


def _generate(kind, pipe, prompt, backend="eager", **options):
    """``kind``'s generator on ``pipe`` and its latents for :func:`_request`."""
    from adapterhub.sample.flow_control import FlowControlGenerator
    from adapterhub.sample.flow_fill import FlowFillGenerator

    generator = FlowControlGenerator if kind == "control" else FlowFillGenerator
    gen = generator(pipe, model_name="tiny", hash_model=False, backend=backend)
    return gen, gen.generate(_request(kind, prompt, **options), output="latent")


GUIDANCE = {"control": 3.5, "fill": 30.0}  # the pipelines' defaults (Forge's Distilled CFG Scale)


@pytest.mark.parametrize("kind", ["control", "fill"])
def test_euler_on_automatic_stays_the_pipelines_own_loop(request, kind, monkeypatch):
    from adapterhub.sample.flow import FlowGenerator

    pipe = request.getfixturevalue("control_model" if kind == "control" else "tiny_fill")
    monkeypatch.setattr(FlowGenerator, "k_denoise", lambda *a, **k: pytest.fail("left the pipeline's loop"))
    gen, result = _generate(kind, pipe, "a castle", sampler="Euler", steps=2)
    ref = _pipeline(kind, pipe)
    noise = gen.noise([7], SIZE, SIZE)
    out = ref("a castle", height=SIZE, width=SIZE, num_inference_steps=2, guidance_scale=GUIDANCE[kind],
              latents=ref._pack_latents(noise, *noise.shape), generator=torch.Generator().manual_seed(7),
              output_type="latent", **_inputs(kind)).images
    assert torch.equal(result.latents, ref._unpack_latents(out, SIZE, SIZE, ref.vae_scale_factor))


@pytest.mark.parametrize("kind", ["control", "fill"])
@pytest.mark.parametrize(("sampler", "schedule"), [("DPM++ 2M", "Karras"), ("Euler a", "Karras"),
                                                   ("Heun", "Automatic")])
def test_other_samplers_and_schedules_equal_k_diffusion_over_the_pipelines_input(request, k, kind, sampler,
                                                                                 schedule):
    pipe = request.getfixturevalue("control_model" if kind == "control" else "tiny_fill")
    _, result = _generate(kind, pipe, "a castle", sampler=sampler, schedule=schedule)
    sigmas = _karras(k, pipe, "flux", STEPS) if schedule == "Karras" else _automatic(pipe)
    denoiser = _denoiser(pipe, _extra(kind, pipe, 7), [[("a castle", 1.0)]], GUIDANCE[kind])
    with torch.no_grad():
        theirs = _oracle(k, sampler, denoiser, sigmas, 7)
    torch.testing.assert_close(result.latents, theirs, atol=1e-5, rtol=1e-5)
    assert f"Sampler: {sampler}, Schedule type: {schedule}, " in result.infotexts[0]


@pytest.mark.parametrize("kind", ["control", "fill"])
def test_each_image_of_a_batch_takes_its_own_extra_input(request, k, kind):
    """Two images in one batch: row i's control / masked-image latents drawn with image i's generator."""
    pipe = request.getfixturevalue("control_model" if kind == "control" else "tiny_fill")
    _, result = _generate(kind, pipe, "a castle", sampler="DPM++ 2M", schedule="Karras", images=2, batch=2)
    sigmas = _karras(k, pipe, "flux", STEPS)
    for i, seed in enumerate((7, 8)):
        denoiser = _denoiser(pipe, _extra(kind, pipe, seed), [[("a castle", 1.0)]], GUIDANCE[kind])
        with torch.no_grad():
            theirs = _oracle(k, "DPM++ 2M", denoiser, sigmas, seed)
        torch.testing.assert_close(result.latents[i:i + 1], theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("prompt", "parts"), [
    ("a [cat:dog:1] sat", [[("a cat sat", 1.0)]] * 2 + [[("a dog sat", 1.0)]]),
    ("a cat AND a dog :0.5", [[("a cat", 1.0), (" a dog", 0.5)]]),
])
def test_prompt_editing_and_and_on_a_control_model(k, control_model, prompt, parts):  # noqa: F811
    """Euler on "Automatic" leaves the pipeline's loop for the k-diffusion one (the conditioning changes by call):
    the control latents go beside the noise at every call, each sub-prompt's and each schedule entry's."""
    _, result = _generate("control", control_model, prompt, sampler="Euler")
    denoiser = _denoiser(control_model, _extra("control", control_model, 7), parts, GUIDANCE["control"])
    with torch.no_grad():
        theirs = _oracle(k, "Euler", denoiser, _automatic(control_model), 7)
    torch.testing.assert_close(result.latents, theirs, atol=1e-5, rtol=1e-5)
    assert result.infotexts[0].startswith(prompt + "\n")


def test_prompt_editing_on_a_fill_model(k, tiny_fill):  # noqa: F811
    _, result = _generate("fill", tiny_fill, "a [castle:tower:1]", sampler="Euler")
    parts = [[("a castle", 1.0)]] * 2 + [[("a tower", 1.0)]]
    denoiser = _denoiser(tiny_fill, _extra("fill", tiny_fill, 7), parts, GUIDANCE["fill"])
    with torch.no_grad():
        theirs = _oracle(k, "Euler", denoiser, _automatic(tiny_fill), 7)
    torch.testing.assert_close(result.latents, theirs, atol=1e-5, rtol=1e-5)


def test_cli_samples_a_control_model_with_another_sampler_and_schedule(tiny_flux, tmp_path, capsys):
    """``adapterhub sample --control-image --sampler "DPM++ 2M" --schedule Karras``: the Python API's image for the
    same request, pixel for pixel, and the infotext's Sampler / Schedule type as for plain Flux."""
    import numpy as np
    from PIL import Image
    from flux_helpers import cli as _cli

    from adapterhub.sample.flow_control import FlowControlGenerator

    path = control_file(tmp_path / "control.safetensors", tiny_flux.transformer)
    assert _cli(capsys, "merge", str(path), "--base", "tiny-flux", "--out", str(tmp_path / "merged"))[0] == 0
    _control_image(SIZE).save(tmp_path / "edges.png")
    rc, out, err = _cli(capsys, "sample", "--base", str(tmp_path / "merged"), "--prompt", "a castle", "--steps", "2",
                        "--size", f"{SIZE}x{SIZE}", "--seed", "7", "--sampler", "DPM++ 2M", "--schedule", "Karras",
                        "--control-image", str(tmp_path / "edges.png"), "--out", str(tmp_path / "images"))
    assert rc == 0, err
    (written,) = sorted((tmp_path / "images").glob("*.png"))
    expected = FlowControlGenerator(str(tmp_path / "merged"))(
        "a castle", steps=2, width=SIZE, height=SIZE, seed=7, sampler="DPM++ 2M", schedule="Karras",
        control_image=str(tmp_path / "edges.png")).images[0]
    image = Image.open(written)
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(expected.convert("RGB")))
    assert "Steps: 2, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 1, Distilled CFG Scale: 3.5" \
        in image.info["parameters"]


@pytest.mark.parametrize("kind", ["control", "fill"])
def test_compiled_backend_serves_both_loops_without_recompiling(request, kind, monkeypatch):
    """``backend="compiled"`` (dynamo's ``aot_eager``): DPM++ 2M on Karras, Euler a, then the pipeline's Euler; the
    extra input of one shape at every call, so one graph serves both loops, each image the eager one's."""
    import copy

    monkeypatch.setenv("ADAPTERHUB_COMPILE_BACKEND", "aot_eager")
    pipe = request.getfixturevalue("control_model" if kind == "control" else "tiny_fill")
    runs = [("DPM++ 2M", "Karras"), ("Euler a", "Karras"), ("Euler", "Automatic")]
    expected = [_generate(kind, pipe, "a castle", sampler=a, schedule=b, steps=2)[1].latents for a, b in runs]
    compiled = copy.deepcopy(pipe)
    torch._dynamo.reset()
    gen, first = _generate(kind, compiled, "a castle", sampler=runs[0][0], schedule=runs[0][1], steps=2,
                           backend="compiled")
    assert torch.equal(first.latents, expected[0]) and gen.runner.stats()["graphs"] == 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        for (sampler, schedule), want in zip(runs[1:], expected[1:]):
            got = gen.generate(gen.request(_request(kind, sampler=sampler, schedule=schedule, steps=2)),
                               output="latent").latents
            assert torch.equal(got, want), sampler
    assert gen.runner.stats()["graphs"] == 1
    gen.close()


@pytest.mark.parametrize("kind", ["control", "fill"])
def test_img2img_runs_the_schedules_last_steps_from_the_init_latents(request, k, kind):
    """DPM++ 2M on Karras from an init image at strength 0.5 of 4 steps: a control model as plain Flux (the webui's
    ``int(0.5 x 4) + 1`` = 3 last steps), a Fill model as its pipeline counts them (the last ``4 x 0.5`` = 2), from
    ``sigma noise + (1 - sigma) init``, the init image's latents the VAE posterior's mean."""
    from test_flux_control_passes import _image_latents

    pipe = request.getfixturevalue("control_model" if kind == "control" else "tiny_fill")
    picture = _image(seed=9, size=SIZE)
    _, result = _generate(kind, pipe, "a castle", sampler="DPM++ 2M", schedule="Karras", steps=4,
                          denoising_strength=0.5, init_image=picture)
    full = _karras(k, pipe, "flux", 4)
    run = 3 if kind == "control" else 2
    init = _image_latents(pipe, picture, SIZE)
    denoiser = _denoiser(pipe, _extra(kind, pipe, 7, picture), [[("a castle", 1.0)]], GUIDANCE[kind])
    with torch.no_grad():
        theirs = _oracle(k, "DPM++ 2M", denoiser, full, 7, init=(full[len(full) - 1 - run:], init))
    torch.testing.assert_close(result.latents, theirs, atol=1e-5, rtol=1e-5)
    assert "Denoising strength: 0.5" in result.infotexts[0]


@pytest.fixture(scope="module")
def merged_control(tiny_flux, tmp_path_factory):
    """A control model as ``adapterhub merge`` writes it, and its control image file."""
    from adapterhub.cli import main

    folder = tmp_path_factory.mktemp("merged_control")
    path = control_file(folder / "control.safetensors", tiny_flux.transformer)
    assert main(["merge", str(path), "--base", "tiny-flux", "--out", str(folder / "merged")]) == 0
    _control_image(SIZE).save(folder / "edges.png")
    return folder / "merged", folder / "edges.png"


def _pixels(image):
    import numpy as np

    return np.asarray(image.convert("RGB"))


def test_cli_prompt_file_on_a_control_model_takes_the_control_image_on_every_line(merged_control, tmp_path, capsys):
    """``--prompts`` with ``--control-image``: each line (its own sampler and schedule) the Python API's image."""
    import numpy as np
    from PIL import Image
    from flux_helpers import cli as _cli

    from adapterhub.sample.flow_control import FlowControlGenerator

    merged, edges = merged_control
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('a castle\n--prompt "a tower" --sampler "Euler a" --schedule Karras --seed 9\n')
    rc, out, err = _cli(capsys, "sample", "--base", str(merged), "--prompts", str(prompts), "--steps", "2", "--size",
                        f"{SIZE}x{SIZE}", "--seed", "7", "--control-image", str(edges), "--out", str(tmp_path / "o"))
    assert rc == 0, err
    written = sorted((tmp_path / "o").glob("*.png"))
    assert len(written) == 2
    gen = FlowControlGenerator(str(merged))
    common = {"steps": 2, "width": SIZE, "height": SIZE, "control_image": str(edges)}
    expected = [gen("a castle", seed=7, **common).images[0],
                gen("a tower", seed=9, sampler="Euler a", schedule="Karras", **common).images[0]]
    for path, want in zip(written, expected):
        assert np.array_equal(_pixels(Image.open(path)), _pixels(want)), path.name
    assert "Sampler: Euler a, Schedule type: Karras" in Image.open(written[1]).info["parameters"]


def test_cli_plot_on_a_control_model_runs_each_cell_with_the_control_image(merged_control, tmp_path, capsys):
    import numpy as np
    from PIL import Image
    from flux_helpers import cli as _cli

    from adapterhub.sample.flow_control import FlowControlGenerator

    merged, edges = merged_control
    rc, out, err = _cli(capsys, "sample", "--base", str(merged), "--prompt", "a castle", "--steps", "2", "--size",
                        f"{SIZE}x{SIZE}", "--seed", "7", "--control-image", str(edges), "--x",
                        "sampler=Euler,DPM++ 2M", "--out", str(tmp_path / "o"))
    assert rc == 0, err
    cells = sorted(p for p in (tmp_path / "o").glob("*.png") if not p.name.startswith("xyz"))
    assert len(cells) == 2
    gen = FlowControlGenerator(str(merged))
    for path, sampler in zip(cells, ("Euler", "DPM++ 2M")):
        want = gen("a castle", seed=7, steps=2, width=SIZE, height=SIZE, sampler=sampler,
                   control_image=str(edges)).images[0]
        assert np.array_equal(_pixels(Image.open(path)), _pixels(want)), sampler


@pytest.mark.parametrize("options,problem", [
    (("--prompts", "PROMPTS"), "prompts.txt:1: CFG scale 3: a FLUX.1 control model runs distilled guidance only"),
    (("--prompt", "a castle", "--x", "cfg=1,3"), "plot cell CFG Scale: 3.0: CFG scale 3: a FLUX.1 control model"),
])
def test_cli_a_line_or_cell_a_control_model_cannot_run_is_one_line_before_a_model_loads(tmp_path, capsys,
                                                                                        monkeypatch, options,
                                                                                        problem):
    from flux_helpers import cli as _cli

    from adapterhub.sample import flow_control

    monkeypatch.setattr(flow_control.FlowControlGenerator, "__init__", lambda *a, **k: pytest.fail("a model loaded"))
    (tmp_path / "prompts.txt").write_text('--prompt "a castle" --cfg 3\n')
    _control_image(SIZE).save(tmp_path / "edges.png")
    options = tuple(str(tmp_path / "prompts.txt") if o == "PROMPTS" else o for o in options)
    rc, out, err = _cli(capsys, "sample", "--base", "tiny-flux", *options, "--steps", "1", "--control-image",
                        str(tmp_path / "edges.png"), "--out", str(tmp_path / "out"))
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert rc == 2 and len(errors) == 1 and problem in errors[0] and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_cli_prompt_file_on_a_fill_model(tmp_path, capsys):
    """``--prompts`` on a Fill base: every line inpaints the one init image and mask (Heun on one line)."""
    import numpy as np
    from PIL import Image
    from flux_helpers import cli as _cli

    from adapterhub.sample.flow_fill import FlowFillGenerator

    _image(size=SIZE).save(tmp_path / "photo.png")
    _mask(SIZE).save(tmp_path / "mask.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('a castle\n--prompt "a tower" --sampler Heun\n')
    rc, out, err = _cli(capsys, "sample", "--base", "tiny-flux-fill", "--prompts", str(prompts), "--steps", "2",
                        "--seed", "7", "--init-image", str(tmp_path / "photo.png"), "--mask",
                        str(tmp_path / "mask.png"),
                        "--out", str(tmp_path / "o"))
    assert rc == 0, err
    written = sorted((tmp_path / "o").glob("*.png"))
    assert len(written) == 2
    gen = FlowFillGenerator("tiny-flux-fill")
    common = {"steps": 2, "seed": 7, "init_image": str(tmp_path / "photo.png"), "mask": str(tmp_path / "mask.png")}
    for path, (prompt, sampler) in zip(written, (("a castle", "Euler"), ("a tower", "Heun"))):
        want = gen(prompt, sampler=sampler, **common).images[0]
        assert np.array_equal(_pixels(Image.open(path)), _pixels(want)), prompt


def test_the_hires_fix_on_a_control_model_runs_its_second_pass_on_the_k_diffusion_loop(k, control_model):  # noqa: F811
    """DPM++ 2M on Karras with ``hr_scale`` 2: the first pass's latents upscaled (Latent: bilinear), then the webui's
    hires pass (3 steps of an ``int(3 / 0.6)`` = 5-step schedule) from ``sigma noise + (1 - sigma) init``, the noise
    the seed's at the hires size, the control image's latents made at the hires size."""
    import math

    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    options = {"sampler": "DPM++ 2M", "schedule": "Karras", "steps": 2}
    gen, first = _generate("control", control_model, "a tower", **options)
    result = gen.generate(_request("control", "a tower", hr_scale=2.0, hr_steps=3, hr_denoise=0.6, **options),
                          output="latent")
    upscaled = torch.nn.functional.interpolate(first.latents, scale_factor=2, mode="bilinear")
    big = 2 * SIZE
    c = control_model.scheduler.config  # the table's lower end shifts by the hires size's tokens
    mu = calculate_shift((big // control_model.vae_scale_factor // 2) ** 2, c.base_image_seq_len, c.max_image_seq_len,
                         c.base_shift, c.max_shift)
    full = k.sampling.get_sigmas_karras(5, math.exp(mu) / (math.exp(mu) + (1 / 1e-4 - 1)), 1.0)
    sigmas = full[len(full) - 1 - 3:]
    noise = torch.randn(upscaled.shape, generator=torch.Generator().manual_seed(7))
    denoiser = _denoiser(control_model, _extra("control", control_model, 7, size=big), [[("a tower", 1.0)]],
                         GUIDANCE["control"], size=big)
    with torch.no_grad():
        theirs = k.sampling.sample_dpmpp_2m(denoiser, sigmas[0] * noise + (1 - sigmas[0]) * upscaled, sigmas,
                                            disable=True)
    torch.testing.assert_close(result.latents, theirs, atol=1e-5, rtol=1e-5)
    assert "Hires upscale: 2, Hires steps: 3, Hires upscaler: Latent" in result.infotexts[0]
