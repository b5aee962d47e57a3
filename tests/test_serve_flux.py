"""``adapterhub serve`` on Flux and SD3 bases (#21): the real ``webuiapi`` client against a loopback server running
the flow generator; the images are checked against what ``adapterhub sample`` writes for the same parameters, and
what these families cannot do is refused with 422 and one line."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
webuiapi = pytest.importorskip("webuiapi")
requests = pytest.importorskip("requests")

from adapterhub import cli  # noqa: E402
from adapterhub.sample import infotext  # noqa: E402
from serve_helpers import DEADLINE, running_server  # noqa: E402

SMALL = {"steps": 2, "width": 64, "height": 64, "sampler_name": "Euler"}


def _served(base):
    from adapterhub.sample.generator import Generator
    from adapterhub.serve.app import Service

    service = Service(Generator(base), catalog=False, max_size=(128, 128))
    with running_server(service) as port:
        yield {"port": port, "url": f"http://127.0.0.1:{port}/sdapi/v1", "service": service}


@pytest.fixture(scope="module")
def flux(adapterhub_cache):
    yield from _served("tiny-flux")


@pytest.fixture(scope="module")
def sd3(adapterhub_cache):
    yield from _served("tiny-sd3")


def _api(served):
    return webuiapi.WebUIApi(host="127.0.0.1", port=served["port"], sampler="Euler")


def _post(served, path, **body):
    return requests.post(f"{served['url']}/{path}", json=body, timeout=DEADLINE)


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def _sample(tmp_path, base, *args):
    from PIL import Image

    out = tmp_path / "sampled"
    assert cli.main(["sample", "--base", base, "--size", "64x64", "--steps", "2", "--out", str(out), "--json",
                     *map(str, args)]) == 0
    return [Image.open(p) for p in sorted(out.glob("0*.png"))]


def _decoded(response):
    import base64
    import io

    from PIL import Image

    assert response.status_code == 200, response.text
    return [Image.open(io.BytesIO(base64.b64decode(b))) for b in response.json()["images"]]


def _b64(image) -> str:
    import base64
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _refused(response, detail):
    assert response.status_code == 422, response.text
    body = response.json()
    assert detail in body["detail"] and "\n" not in body["detail"]


def test_flux_txt2img_equals_adapterhub_sample(flux, tmp_path):
    result = _api(flux).txt2img(prompt="a red cat", seed=5, cfg_scale=1, n_iter=2, **SMALL)
    ours = _sample(tmp_path, "tiny-flux", "--prompt", "a red cat", "--seed", 5, "--cfg", 1, "--images", 2)
    assert result.info["all_seeds"] == [5, 6] and result.info["sampler_name"] == "Euler"
    for served_image, text, sampled in zip(result.images, result.info["infotexts"], ours, strict=True):
        assert np.array_equal(_pixels(served_image), _pixels(sampled))
        assert served_image.info["parameters"] == text == infotext.read_png(sampled.filename)
    assert "CFG scale: 1, Distilled CFG Scale: 3.5, Seed: 5" in result.info["infotexts"][0]


def test_flux_distilled_cfg_scale_as_forges_api_names_it(flux, tmp_path):
    served = _decoded(_post(flux, "txt2img", prompt="a dog", seed=9, cfg_scale=1, distilled_cfg_scale=5.5, **SMALL))
    ours = _sample(tmp_path, "tiny-flux", "--prompt", "a dog", "--seed", 9, "--cfg", 1, "--distilled-cfg", 5.5)
    assert np.array_equal(_pixels(served[0]), _pixels(ours[0]))
    assert "Distilled CFG Scale: 5.5" in served[0].info["parameters"]


def test_flux_img2img_equals_adapterhub_sample(flux, tmp_path):
    from PIL import Image

    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    init.save(tmp_path / "init.png")
    result = _api(flux).img2img(images=[init], prompt="a boat", seed=12, cfg_scale=1, denoising_strength=0.6,
                                **SMALL)
    ours = _sample(tmp_path, "tiny-flux", "--prompt", "a boat", "--seed", 12, "--cfg", 1,
                   "--init-image", tmp_path / "init.png", "--denoise", 0.6)
    assert np.array_equal(_pixels(result.image), _pixels(ours[0]))
    assert result.image.info["parameters"] == infotext.read_png(ours[0].filename)
    assert "Denoising strength: 0.6" in result.image.info["parameters"]
    assert result.info["denoising_strength"] == 0.6


def test_flux_hires_fix_equals_adapterhub_sample(flux, tmp_path):
    """The webui's txt2img ``enable_hr`` fields on a Flux base: the same image and infotext as ``--hires``."""
    result = _api(flux).txt2img(prompt="a red cat", seed=5, cfg_scale=1, enable_hr=True, hr_scale=2,
                                hr_upscaler="Latent (nearest)", hr_second_pass_steps=2, denoising_strength=0.6,
                                **SMALL)
    ours = _sample(tmp_path, "tiny-flux", "--prompt", "a red cat", "--seed", 5, "--cfg", 1, "--hires", 2,
                   "--hires-upscaler", "Latent (nearest)", "--hires-steps", 2, "--hires-denoise", 0.6)
    assert result.image.size == (128, 128)
    assert np.array_equal(_pixels(result.image), _pixels(ours[0]))
    assert result.image.info["parameters"] == infotext.read_png(ours[0].filename)
    assert "Denoising strength: 0.6, Hires upscale: 2, Hires steps: 2, Hires upscaler: Latent (nearest)" in \
        result.image.info["parameters"]


def test_flux_inpainting_equals_adapterhub_sample(flux, tmp_path):
    """The webui's img2img ``mask`` fields on a Flux base: the same image and infotext as ``--mask``."""
    from PIL import Image

    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64))
    mask.paste(255, (8, 16, 40, 56))
    init.save(tmp_path / "init.png")
    mask.save(tmp_path / "mask.png")
    result = _api(flux).img2img(images=[init], mask_image=mask, prompt="a boat", seed=12, cfg_scale=1,
                                denoising_strength=0.6, mask_blur=2, inpainting_fill=1, inpaint_full_res=False,
                                **SMALL)
    ours = _sample(tmp_path, "tiny-flux", "--prompt", "a boat", "--seed", 12, "--cfg", 1, "--init-image",
                   tmp_path / "init.png", "--mask", tmp_path / "mask.png", "--mask-blur", 2, "--denoise", 0.6)
    assert np.array_equal(_pixels(result.image), _pixels(ours[0]))
    assert result.image.info["parameters"] == infotext.read_png(ours[0].filename)
    assert "Denoising strength: 0.6" in result.image.info["parameters"] and "Mask blur: 2" in \
        result.image.info["parameters"]


def test_what_flux_cannot_do_is_refused_in_one_line(flux):
    _refused(_post(flux, "txt2img", prompt="x", **{**SMALL, "sampler_name": "DDIM"}),
             "sampler 'DDIM': Flux is a flow-matching model")
    _refused(_post(flux, "txt2img", prompt="x", **{**SMALL, "scheduler": "Align Your Steps"}), "choose Automatic")
    _refused(_post(flux, "txt2img", prompt="x", enable_hr=True, hr_scale=4, **SMALL), "hires size 256x256")
    _refused(_post(flux, "txt2img", prompt="x", override_settings={"CLIP_stop_at_last_layers": 2}, **SMALL),
             "clip skip 2: not available for Flux")
    _refused(_post(flux, "txt2img", prompt="x", distilled_cfg_scale=-1, **SMALL), "must be a finite number, 0 or more")
    _refused(_post(flux, "txt2img", prompt="x", alwayson_scripts={"ControlNet": {"args": [{"model": "m"}]}},
                   **SMALL), "ControlNet: not available for Flux models")
    init = webuiapi.raw_b64_img(__import__("PIL.Image", fromlist=["Image"]).new("RGB", (64, 64)))
    _refused(_post(flux, "img2img", prompt="x", init_images=[init], mask=init, inpainting_fill=7, **SMALL),
             "inpainting fill 7: choose 0 (fill)")
    assert _post(flux, "txt2img", prompt="x", seed=1, **SMALL).status_code == 200  # and it goes on serving


def test_sd3_txt2img_equals_adapterhub_sample_and_ignores_distilled_cfg(sd3, tmp_path):
    result = _api(sd3).txt2img(prompt="a castle", negative_prompt="fog", seed=3, cfg_scale=5, **SMALL)
    ours = _sample(tmp_path, "tiny-sd3", "--prompt", "a castle", "--negative", "fog", "--seed", 3, "--cfg", 5)
    assert np.array_equal(_pixels(result.image), _pixels(ours[0]))
    assert result.image.info["parameters"] == infotext.read_png(ours[0].filename)
    # Forge's clients send distilled_cfg_scale with every request; Forge ignores it on a model without distilled
    # guidance, and so do we, saying so in info: the image is the one made without it
    answer = _post(sd3, "txt2img", prompt="a castle", negative_prompt="fog", seed=3, cfg_scale=5,
                   distilled_cfg_scale=3.5, **SMALL)
    assert np.array_equal(_pixels(_decoded(answer)[0]), _pixels(ours[0]))
    info = json.loads(answer.json()["info"])
    assert "distilled_cfg_scale 3.5: not applied" in info["comments"]
    assert "Distilled CFG Scale" not in info["infotexts"][0]


def test_distilled_cfg_scale_on_a_stable_diffusion_base_is_ignored_and_noted():
    from adapterhub.serve.models import Txt2ImgRequest
    from adapterhub.serve.networks import Networks
    from adapterhub.serve.plan import plan

    planned = plan(Txt2ImgRequest(prompt="x", distilled_cfg_scale=3.0), options={}, model_titles=set(),
                   networks=Networks((), catalog=False), dirs=[])
    assert any(c.startswith("distilled_cfg_scale 3.0: not applied") for c in planned.comments)
    assert not hasattr(planned.requests[0], "distilled_cfg")  # a Stable Diffusion request has no such field


def _reference_estimates(prompt: str, seed: int, steps: int):
    """Per step of a Flux run of its own, the clean-latent estimate ``sample - sigma x model_output`` (diffusers'
    own formula in FlowMatchEulerDiscreteScheduler's stochastic step), unpacked; and that generator."""
    import diffusers

    from adapterhub.sample import FlowRequest
    from adapterhub.sample.generator import Generator

    seen = []
    original = diffusers.FlowMatchEulerDiscreteScheduler.step

    def recording(self, model_output, timestep, sample, *args, **kwargs):
        if self.step_index is None:
            self._init_step_index(timestep)
        seen.append(sample.float() - self.sigmas[self.step_index] * model_output.float())
        return original(self, model_output, timestep, sample, *args, **kwargs)

    generator = Generator("tiny-flux")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(diffusers.FlowMatchEulerDiscreteScheduler, "step", recording)
        generator.generate(FlowRequest(prompt, seed=seed, steps=steps, cfg=1.0, width=64, height=64))
    pipe = generator.pipe
    return [pipe._unpack_latents(x, 64, 64, pipe.vae_scale_factor) for x in seen], generator


def test_flux_interrupt_returns_the_image_so_far_and_progress_previews():
    from adapterhub.sample.generator import Generator
    from adapterhub.serve.app import Service

    estimates, reference = _reference_estimates("a hill", seed=4, steps=4)
    service = Service(Generator("tiny-flux"), catalog=False)
    progress, previews = service.worker._progress, []

    def interrupt_after_two_steps(req, plan=None):  # deterministic: a preview asked for, then /interrupt's flag
        report = progress(req, plan)

        def on_progress(done, total):
            if done == 1:
                service.worker.state.preview_wanted = True
            if done == 2:
                previews.append(service.worker.state.current_image)
                service.worker.state.interrupt()
            report(done, total)

        return on_progress

    service.worker._progress = interrupt_after_two_steps
    with running_server(service) as port:
        result = webuiapi.WebUIApi(host="127.0.0.1", port=port).txt2img(prompt="a hill", seed=4, cfg_scale=1,
                                                                        **{**SMALL, "steps": 4})
    assert previews and previews[0] is not None  # the preview of step 1's latents, base64 PNG
    expected = np.asarray(reference.decode(estimates[1])[0].convert("RGB"), dtype=int)
    got = np.asarray(result.image.convert("RGB"), dtype=int)
    assert len(result.images) == 1 and np.abs(got - expected).max() <= 1
    assert result.info["interrupted"] is True and result.info["all_seeds"] == [4]
    fields = infotext.parse(result.info["infotexts"][0])
    assert (fields["Seed"], fields["Steps"], fields["Sampler"]) == ("4", "4", "Euler")
    assert "Distilled CFG Scale: 3.5" in result.info["infotexts"][0]


def test_lists_offer_what_the_family_runs(flux, sd3):
    def names(served, route, key):
        response = requests.get(f"{served['url']}/{route}", timeout=DEADLINE)
        assert response.status_code == 200
        return [row[key] for row in response.json()]

    from adapterhub.sample.flow import FLOW_SAMPLERS, FLOW_SCHEDULES

    # the webui's k-diffusion samplers and the schedule types Forge offers these families (#21), not DDIM / UniPC
    assert sorted(names(flux, "samplers", "name")) == sorted(names(sd3, "samplers", "name")) == sorted(
        ["Euler", "Euler a", "Heun", "DPM2", "DPM2 a", "LMS", "DPM++ 2M", "DPM++ 2S a", "DPM++ SDE", "DPM++ 2M SDE",
         "DPM++ 3M SDE"]) == sorted(FLOW_SAMPLERS["flux"])
    assert sorted(names(flux, "schedulers", "label")) == sorted(names(sd3, "schedulers", "label")) == sorted(
        FLOW_SCHEDULES) == sorted(["Automatic", "Simple", "Beta", "Normal", "SGM Uniform", "DDIM", "Karras",
                                   "Exponential", "Polyexponential", "KL Optimal"])


@pytest.fixture(scope="module")
def flux_fill(adapterhub_cache):
    yield from _served("tiny-flux-fill")


def test_flux_fill_inpainting_with_the_clients_defaults_equals_adapterhub_sample(flux_fill, tmp_path):
    """A FLUX.1 Fill base behind the API: the real client's img2img defaults (only masked, padding 0, masked
    content "fill", mask blur 4, strength 0.75) but CFG 1 give the image and infotext ``adapterhub sample`` writes
    with the same options; CFG 7 (the client's default) is refused in one line."""
    from PIL import Image

    init = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64))
    mask.paste(255, (24, 16, 48, 40))
    init.save(tmp_path / "init.png")
    mask.save(tmp_path / "mask.png")
    result = _api(flux_fill).img2img(images=[init], mask_image=mask, prompt="a door", seed=4, cfg_scale=1, **SMALL)
    ours = _sample(tmp_path, "tiny-flux-fill", "--prompt", "a door", "--seed", 4, "--cfg", 1, "--init-image",
                   tmp_path / "init.png", "--mask", tmp_path / "mask.png", "--denoise", 0.75, "--inpaint-full-res",
                   "--inpaint-padding", 0, "--inpainting-fill", "fill")
    assert np.array_equal(_pixels(result.image), _pixels(ours[0]))
    assert result.image.info["parameters"] == infotext.read_png(ours[0].filename)
    assert "Inpaint area: Only masked" in result.image.info["parameters"]
    _refused(_post(flux_fill, "img2img", init_images=[_b64(init)], mask=_b64(mask), prompt="a door", **SMALL),
             "distilled guidance only")
