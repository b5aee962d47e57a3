"""``Generator.step_hook``: called after every denoising step with the step's index, the latents after it and its
denoised estimate. The oracle of the estimate is diffusers' own scheduler step (its ``pred_original_sample``,
recorded from the very steps the generator runs), for a plain prompt and for ``AND`` sub-prompts, whose guided
prediction the estimate must carry exactly."""
from __future__ import annotations

import pytest
import torch


def _recorded_run(gen, request, sampler_class):
    """The hook's calls and diffusers' ``pred_original_sample`` of every step of one run."""
    import diffusers

    seen, calls = [], []
    original = getattr(diffusers, sampler_class).step

    def recording(self, *args, **kwargs):
        out = original(self, *args, **{**kwargs, "return_dict": True})
        seen.append(out.pred_original_sample.clone())
        return out if kwargs.get("return_dict", True) else (out.prev_sample, out.pred_original_sample)

    gen.step_hook = lambda i, latents, denoised: calls.append((i, latents.clone(), denoised.clone()))
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(getattr(diffusers, sampler_class), "step", recording)
            result = gen.generate(request, output="latent")
    finally:
        gen.step_hook = None
    return calls, seen, result


@pytest.mark.parametrize("prompt, sampler, sampler_class", [
    ("a hill", "Euler", "EulerDiscreteScheduler"),
    ("a hill AND a red sky :0.6 AND fog :-0.3", "Euler", "EulerDiscreteScheduler"),
    ("a hill AND a red sky :0.6", "DDIM", "DDIMScheduler"),
])
def test_step_hook_gets_each_steps_latents_and_denoised_estimate(tiny_sd1, prompt, sampler, sampler_class):
    from adapterhub.sample.generator import Generator, Request

    gen = Generator(tiny_sd1, hash_model=False)
    request = Request(prompt, negative="blurry", seed=3, steps=4, sampler=sampler, width=64, height=64, cfg=6.5,
                      batch=2)
    calls, seen, result = _recorded_run(gen, request, sampler_class)
    assert [i for i, _, _ in calls] == [0, 1, 2, 3] and len(seen) == 4
    for (_, _, denoised), want in zip(calls, seen):
        torch.testing.assert_close(denoised, want.float(), rtol=1e-5, atol=1e-5)
    assert torch.equal(calls[-1][1], result.latents)  # the latents after the last step are the result
    plain = gen.generate(request, output="latent")  # the hook changes nothing
    assert torch.equal(plain.latents, result.latents)
