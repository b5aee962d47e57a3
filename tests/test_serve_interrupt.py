"""``/sdapi/v1/interrupt`` returns the image so far, as the webui does: the denoised estimate of the last step
(the generator's step hook), decoded. The estimate is checked against diffusers' schedulers (their
``pred_original_sample``) as the oracle, and end to end: a request interrupted after its second step returns the
decoded ``pred_original_sample`` of that step in a reference run of the same request, ``AND`` prompts too."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
webuiapi = pytest.importorskip("webuiapi")

from serve_helpers import running_server  # noqa: E402

SMALL = {"width": 64, "height": 64, "cfg_scale": 6.5}


@pytest.mark.parametrize("name, options", [
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),  # fractional timesteps, k-diffusion scaled input
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True, "prediction_type": "v_prediction"}),
    ("DDIMScheduler", {}),
    ("DDIMScheduler", {"prediction_type": "v_prediction"}),
])
def test_clean_estimate_is_diffusers_pred_original_sample(tiny_sd1, name, options):
    import diffusers

    from adapterhub.sample.denoise import alpha_at, clean_estimate

    scheduler = getattr(diffusers, name).from_config(tiny_sd1.scheduler.config, **options)
    scheduler.set_timesteps(10)
    generator = torch.Generator().manual_seed(0)
    for i in (0, 3, 9):
        t = scheduler.timesteps[i]
        if hasattr(scheduler, "_step_index"):
            scheduler._step_index = i
        sample = torch.randn(2, 4, 8, 8, generator=generator) * scheduler.init_noise_sigma
        prediction = torch.randn(2, 4, 8, 8, generator=generator)
        x_t = scheduler.scale_model_input(sample, t)  # what the UNet is called with
        expected = scheduler.step(prediction, t, sample).pred_original_sample
        got = clean_estimate(x_t, prediction, alpha_at(scheduler.alphas_cumprod, t),
                             scheduler.config.prediction_type)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def reference_estimates(prompt: str, seed: int, steps: int) -> tuple[list, object]:
    """The per-step ``pred_original_sample`` of diffusers' Euler step in a run of its own, and that generator."""
    import diffusers

    from adapterhub.sample.generator import Generator, Request

    seen = []
    original = diffusers.EulerDiscreteScheduler.step

    def recording(self, *args, **kwargs):
        out = original(self, *args, **{**kwargs, "return_dict": True})
        seen.append(out.pred_original_sample.clone())
        return out if kwargs.get("return_dict", True) else (out.prev_sample, out.pred_original_sample)

    generator = Generator("tiny-sd1")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(diffusers.EulerDiscreteScheduler, "step", recording)
        generator.generate(Request(prompt, seed=seed, steps=steps, sampler="Euler", width=64, height=64, cfg=6.5))
    return seen, generator


@pytest.mark.parametrize("prompt", ["a hill", "a hill AND a red sky :0.6 AND fog :-0.4"])
def test_interrupt_returns_the_image_so_far(prompt):
    from adapterhub.sample import infotext
    from adapterhub.sample.generator import Generator
    from adapterhub.serve.app import Service

    estimates, reference = reference_estimates(prompt, seed=4, steps=6)
    service = Service(Generator("tiny-sd1"), catalog=False)
    progress = service.worker._progress

    def interrupt_after_two_steps(req, plan=None):  # deterministic: /interrupt's flag set in the callback of step 2
        report = progress(req, plan)

        def on_progress(done, total):
            if done == 2:
                service.worker.state.interrupt()
            report(done, total)

        return on_progress

    service.worker._progress = interrupt_after_two_steps
    with running_server(service) as port:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=port)
        result = api.txt2img(prompt=prompt, seed=4, steps=6, sampler_name="Euler", **SMALL)
    expected = np.asarray(reference.decode(estimates[1])[0].convert("RGB"), dtype=int)
    got = np.asarray(result.image.convert("RGB"), dtype=int)
    assert len(result.images) == 1 and np.abs(got - expected).max() <= 1
    assert result.info["interrupted"] is True and result.info["all_seeds"] == [4]
    fields = infotext.parse(result.info["infotexts"][0])
    assert (fields["Seed"], fields["Steps"], fields["Sampler"]) == ("4", "6", "Euler")
    assert result.image.info["parameters"] == result.info["infotexts"][0]
    assert result.info["comments"].splitlines()[-1] == "interrupted"
