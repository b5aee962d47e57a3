"""DPM fast, DPM adaptive and Restart against k-diffusion 0.1.1 itself (the webui's Restart loop built here
from k-diffusion's ``sample_heun``), around the same tiny UNet, conditioning, CFG and per-image noise.

The oracle is the webui's setup: k-diffusion's ``DiscreteEpsDDPMDenoiser`` (``CompVisDenoiser``) or
``DiscreteVDDPMDenoiser`` over the UNet, CFG on the denoised latents (``CFGDenoiser.combine_denoised``), the
ancestral noise drawn per image from that image's CPU generator, ``eta`` 1. Tolerance: float32 on CPU,
``rtol=atol=1e-4`` on latents of magnitude ~10 (only the order of float operations differs: CFG is applied
to the UNet's output here, to the denoised latents in the webui; measured differences are ~1e-6).

k-diffusion is installed without its dependencies (``pip install --no-deps k-diffusion==0.1.1.post1
torchdiffeq``): its ``__init__`` imports heavy optional modules, so its ``sampling``, ``utils`` and
``external`` files are loaded here under a package of their own.
"""
from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import sys
import types
from itertools import pairwise

import pytest
import torch

from adapterhub.errors import AdapterhubError
from adapterhub.sample import infotext
from adapterhub.sample.samplers import (
    SAMPLERS,
    make_scheduler,
    resolve_sampler,
    schedule_label,
)

SIZE = 64
PROMPT, NEGATIVE = "a red house", "blurry"


def load_kdiffusion() -> types.ModuleType | None:
    """k-diffusion's ``sampling``, ``utils`` and ``external`` modules under a synthetic package (None when
    the distribution is not installed)."""
    try:
        dist = importlib.metadata.distribution("k-diffusion")
    except importlib.metadata.PackageNotFoundError:
        return None
    name = "_kdiffusion_oracle"
    if name in sys.modules:
        return sys.modules[name]
    package = types.ModuleType(name)
    package.__path__ = [str(dist.locate_file("k_diffusion"))]
    sys.modules[name] = package
    for module in ("utils", "sampling", "external"):
        spec = importlib.util.spec_from_file_location(f"{name}.{module}", dist.locate_file(f"k_diffusion/{module}.py"))
        loaded = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = loaded
        spec.loader.exec_module(loaded)
        setattr(package, module, loaded)
    return package


K = load_kdiffusion()
needs_k = pytest.mark.skipif(K is None, reason="the oracle k-diffusion==0.1.1.post1 is not installed (--no-deps)")


@pytest.fixture(scope="module")
def gen(tiny_sd1):
    from adapterhub.sample.generator import Generator

    return Generator(copy.deepcopy(tiny_sd1), model_name="tiny-sd1", model_hash="0123456789")


def _request(sampler, seed=7, steps=4, batch=2, **kw):
    from adapterhub.sample.generator import Request

    return Request(PROMPT, negative=NEGATIVE, seed=seed, sampler=sampler, steps=steps, width=SIZE, height=SIZE,
                   batch=batch, cfg=5.0, **kw)


class WebuiDenoiser:
    """The webui's ``CFGDenoiser`` over k-diffusion's discrete DDPM denoiser wrapping the UNet: one batch of
    [cond, uncond], ``uncond + (cond - uncond) x cfg`` on the denoised latents. ``cfg_on_output``: the same
    guidance taken on the UNet's output, in the generator's batch order [uncond, cond] instead (the same
    affine combination, other float rounding)."""

    def __init__(self, gen, cfg: float, batch: int, v_prediction: bool = False, cfg_on_output: bool = False):
        cond, uncond = gen.encode(PROMPT, NEGATIVE)
        self.cond, self.uncond = cond.embeds.repeat(batch, 1, 1), uncond.embeds.repeat(batch, 1, 1)
        unet = gen.pipe.unet

        def model(x, t, cond):
            return unet(x, t, encoder_hidden_states=cond, return_dict=False)[0]

        wrapper = K.external.DiscreteVDDPMDenoiser if v_prediction else K.external.DiscreteEpsDDPMDenoiser
        self.inner = wrapper(model, gen.pipe.scheduler.alphas_cumprod.float(), quantize=False)
        self.cfg, self.cfg_on_output, self.calls = cfg, cfg_on_output, 0

    @property
    def sigmas(self):
        return self.inner.sigmas

    def __call__(self, x, sigma):
        self.calls += 1
        with torch.inference_mode():
            if self.cfg_on_output:
                return self._guided_output(x, sigma)
            out = self.inner(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=torch.cat([self.cond, self.uncond]))
        cond, uncond = out.chunk(2)
        return uncond + (cond - uncond) * self.cfg

    def _guided_output(self, x, sigma):
        scalings = [K.utils.append_dims(s, x.ndim) for s in self.inner.get_scalings(sigma)]
        c_in = scalings[-1]
        out = self.inner.inner_model(torch.cat([x, x]) * torch.cat([c_in, c_in]),
                                     self.inner.sigma_to_t(torch.cat([sigma, sigma])),
                                     cond=torch.cat([self.uncond, self.cond]))
        uncond, cond = out.chunk(2)
        guided = uncond + (cond - uncond) * self.cfg
        if len(scalings) == 3:  # v-prediction: c_skip, c_out, c_in
            return guided * scalings[1] + x * scalings[0]
        return x + guided * scalings[0]


def _noise(seeds, size=SIZE):
    """The initial noise and a k-diffusion noise sampler drawing per image from each image's generator."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    shape = (1, 4, size // 8, size // 8)
    first = torch.cat([torch.randn(shape, generator=g) for g in gens])
    return first, lambda *_: torch.cat([torch.randn(shape, generator=g) for g in gens])


def webui_restart(model, x, sigmas, noise):
    """The webui's ``restart_sampler`` with its automatic restart list, out of k-diffusion Heun steps."""
    steps = len(sigmas) - 1
    plan = {}
    if steps >= 20:
        every, times = (steps // 4, 2) if steps >= 36 else (9, 1)
        sigmas = K.sampling.get_sigmas_karras(steps - every * times, sigmas[-2].item(), sigmas[0].item())
        plan = {int(torch.argmin((sigmas - 0.1).abs())): (every + 1, times, 2.0)}
    pairs = []
    for i in range(len(sigmas) - 1):
        pairs.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in plan:
            count, times, high = plan[i + 1]
            top = int(torch.argmin((sigmas - high).abs()))
            if top < i + 1:
                down = K.sampling.get_sigmas_karras(count, sigmas[i + 1].item(), sigmas[top].item())[:-1]
                for _ in range(times):
                    pairs.extend(pairwise(down))
    last = None
    for sigma, sigma_next in pairs:
        if last is not None and last < sigma:
            x = x + noise() * (sigma ** 2 - last ** 2) ** 0.5
        x = K.sampling.sample_heun(model, x, torch.stack([sigma, sigma_next]), disable=True)
        last = sigma_next
    return x, len(pairs)


def oracle(gen, sampler, steps, seeds, cfg=5.0, v_prediction=False, init=None, strength=None, cfg_on_output=False,
           fixed=False):
    """The latents the webui's k-diffusion path gives: txt2img, or img2img from ``init`` latents
    (``setup_img2img_steps``; ``fixed``: the hires pass, exactly ``steps`` steps)."""
    model = WebuiDenoiser(gen, cfg, len(seeds), v_prediction, cfg_on_output)
    first, noise = _noise(seeds, SIZE if init is None else init.shape[-1] * 8)
    if fixed:
        steps, t_enc = int(steps / min(strength, 0.999)), steps - 1
    else:
        t_enc = int(min(strength or 1.0, 0.999) * steps)
    if sampler == "Restart":
        sigmas = K.sampling.get_sigmas_karras(steps, model.sigmas[0].item(), model.sigmas[-1].item())
    else:  # Automatic: the model's own schedule
        sigmas = model.inner.get_sigmas(steps)
    low, high = model.sigmas[0].item(), model.sigmas[-1].item()
    if init is None:
        x = first * sigmas[0]
    else:  # sample_img2img: sigma_sched, and its ends for DPM fast / adaptive
        sigmas = sigmas[steps - t_enc - 1:]
        x = init + first * sigmas[0]
        low, high = sigmas[-2].item(), sigmas[0].item()
    with torch.no_grad():
        if sampler == "DPM fast":
            n = steps if init is None else len(sigmas) - 1
            out = K.sampling.sample_dpm_fast(model, x, low, high, n, eta=1.0, noise_sampler=noise, disable=True)
        elif sampler == "DPM adaptive":
            out = K.sampling.sample_dpm_adaptive(model, x, low, high, eta=1.0, noise_sampler=noise, disable=True)
        else:
            out = webui_restart(model, x, sigmas, noise)[0]
    return out, model.calls


def assert_close(got, want):
    assert got.shape == want.shape and got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5 * float(want.abs().max()))


# -- against k-diffusion ------------------------------------------------------------------------
@needs_k
@pytest.mark.parametrize("sampler, steps", [("DPM fast", 5), ("DPM fast", 6), ("DPM adaptive", 4), ("Restart", 4),
                                            ("Restart", 20)])
def test_latents_equal_k_diffusion(gen, sampler, steps):
    calls = []
    result = gen.generate(_request(sampler, seed=7, steps=steps), output="latent",
                          progress=lambda done, total: calls.append((done, total)))
    want, model_calls = oracle(gen, sampler, steps, [7, 8])
    assert_close(result.latents, want)
    same_cfg, _ = oracle(gen, sampler, steps, [7, 8], cfg_on_output=True)
    assert torch.equal(result.latents, same_cfg)
    assert calls[-1] == (2 * steps, 2 * steps)  # progress adds up to the steps, whatever the calls
    if sampler == "DPM fast":
        assert model_calls == steps
    if sampler == "Restart" and steps == 20:
        assert model_calls == 2 * 20 - 1  # 11 Heun steps + a restart descent of 9 (Euler into sigma 0)


@needs_k
def test_v_prediction_follows_k_diffusion(gen):
    config = {**gen.pipe.scheduler.config, "prediction_type": "v_prediction"}
    cond, uncond = gen.encode(PROMPT, NEGATIVE)
    scheduler = make_scheduler("DPM fast", "Automatic", config)
    got = gen.sample(cond, uncond, scheduler, 4, 5.0, [3, 4], SIZE, SIZE)
    want, _ = oracle(gen, "DPM fast", 4, [3, 4], v_prediction=True)
    assert_close(got, want)
    assert torch.equal(got, oracle(gen, "DPM fast", 4, [3, 4], v_prediction=True, cfg_on_output=True)[0])
    eps = gen.sample(cond, uncond, make_scheduler("DPM fast", "Automatic", gen.pipe.scheduler.config), 4, 5.0,
                     [3, 4], SIZE, SIZE)
    assert not torch.allclose(got, eps, rtol=1e-2, atol=1e-2)  # the prediction type is honoured


@needs_k
@pytest.mark.parametrize("sampler", ["DPM fast", "DPM adaptive"])
def test_img2img_follows_the_webui(gen, sampler):
    from PIL import Image

    from adapterhub.sample.generator import resize_image

    image = Image.fromarray((torch.rand(SIZE, SIZE, 3, generator=torch.Generator().manual_seed(1)) * 255)
                            .to(torch.uint8).numpy())
    result = gen.generate(_request(sampler, seed=2, steps=6, init_image=image, denoising_strength=0.5),
                          output="latent")
    init = gen.encode_image(resize_image(image, SIZE, SIZE)).repeat(2, 1, 1, 1)
    want, _ = oracle(gen, sampler, 6, [2, 3], init=init, strength=0.5)
    assert_close(result.latents, want)


@needs_k
@pytest.mark.parametrize("sampler", ["DPM fast", "Restart"])
def test_hires_pass_follows_the_webui(gen, sampler):
    req = _request(sampler, seed=5, steps=3, batch=1, hr_scale=1.5, hr_steps=2, hr_denoise=0.6)
    result = gen.generate(req, output="latent")
    first = gen.generate(_request(sampler, seed=5, steps=3, batch=1), output="latent").latents
    upscaled = gen.upscale(first, 96, 96, "Latent")
    want, _ = oracle(gen, sampler, 2, [5], init=upscaled, strength=0.6, fixed=True)
    assert result.latents.shape == (1, 4, 12, 12)
    assert_close(result.latents, want)


def test_restart_plan_is_the_webuis():
    from adapterhub.sample.ksamplers import karras_sigmas, restart_steps

    short = karras_sigmas(10, 0.03, 14.6)
    assert len(restart_steps(short)) == 10  # under 20 steps: plain Heun steps
    for steps, every, times in ((20, 9, 1), (40, 10, 2)):
        pairs = restart_steps(karras_sigmas(steps, 0.0291675, 14.614642))
        assert len(pairs) == steps  # the restarts take their steps out of the main schedule
        ups = [k for k in range(1, len(pairs)) if pairs[k][0] > pairs[k - 1][1]]
        assert len(ups) == times
        for k in ups:  # back up to sigma ~2 from sigma ~0.1, then `every` steps down again
            assert abs(float(pairs[k][0]) - 2) < 0.5 and abs(float(pairs[k - 1][1]) - 0.1) < 0.05
            assert float(pairs[k + every - 1][1]) == pytest.approx(float(pairs[k - 1][1]))


# -- through the generator ----------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["DPM fast", "Restart"])
def test_batch_images_equal_single_runs(gen, sampler):
    batch = gen.generate(_request(sampler, seed=11, steps=3, batch=2), output="latent").latents
    for i in range(2):
        single = gen.generate(_request(sampler, seed=11 + i, steps=3, batch=1), output="latent").latents
        assert_close(batch[i:i + 1], single)  # the UNet's float rounding depends a little on the batch size
    assert not torch.allclose(batch[0], batch[1])


@pytest.mark.parametrize("sampler, schedule, label", [("DPM fast", "Automatic", "Automatic"),
                                                      ("DPM adaptive", "Automatic", "Automatic"),
                                                      ("Restart", "Automatic", "Karras"),
                                                      ("DPM fast", "Karras", "Karras"),
                                                      ("Restart", "Exponential", "Exponential")])
def test_infotext_is_the_webuis(gen, sampler, schedule, label):
    result = gen.generate(_request(sampler, steps=2, batch=1, schedule=schedule), output="latent")
    fields = infotext.parse(result.infotexts[0])
    assert (fields["Sampler"], fields["Schedule type"], fields["Steps"]) == (sampler, label, "2")
    assert "Eta" not in fields  # eta is the webui's default 1, which it does not write


def test_schedule_types_change_restart_but_not_txt2img_dpm_fast(gen):
    def run(sampler, schedule):
        return gen.generate(_request(sampler, steps=3, batch=1, schedule=schedule), output="latent").latents

    # the webui runs txt2img DPM fast over the model's sigma range: the schedule only sets the starting noise
    # scale, sigmas[0], which is sigma_max up to float rounding in every schedule
    assert_close(run("DPM fast", "Automatic"), run("DPM fast", "Karras"))
    assert not torch.allclose(run("Restart", "Automatic"), run("Restart", "Uniform"))


@pytest.mark.parametrize("text, name", [("DPM fast", "DPM fast"), ("k_dpm_fast", "DPM fast"),
                                        ("dpm adaptive", "DPM adaptive"), ("k_dpm_ad", "DPM adaptive"),
                                        ("restart", "Restart"), ("Restart Karras", "Restart")])
def test_names_resolve(text, name):
    sampler, key = resolve_sampler(text)
    assert sampler.name == name
    assert schedule_label(sampler, key) == ("Karras" if name == "Restart" else "Automatic")
    assert type(make_scheduler(sampler, key)).__name__ == "KDiffusionScheduler"


@pytest.mark.parametrize("name, schedule, match", [
    ("DPM fast", "Beta", "not available for DPM fast"), ("Restart", "Beta", "not available for Restart"),
    ("DPM adaptive", "Beta", "not available for DPM adaptive"), ("DPM fasst", None, "unknown sampler"),
])
def test_refusals_are_one_line(name, schedule, match):
    with pytest.raises(AdapterhubError, match=match) as err:
        resolve_sampler(name, schedule)
    message = str(err.value)
    assert "\n" not in message
    if "unknown sampler" in message:
        for valid in SAMPLERS:
            assert valid in message
        assert "DPM fast" in message and "Restart" in message


def test_cli_writes_a_png(tmp_path, capsys):
    from adapterhub import cli

    rc = cli.main(["sample", "--base", "tiny-sd1", "--size", "64x64", "--steps", "3", "--sampler", "DPM fast",
                   "--prompt", "a boat", "--seed", "4", "--out", str(tmp_path), "--json"])
    capsys.readouterr()
    assert rc == 0
    pngs = sorted(tmp_path.glob("*.png"))
    assert [p.name for p in pngs] == ["00000-4.png"]
    fields = infotext.parse(infotext.read_png(pngs[0]))
    assert (fields["Sampler"], fields["Schedule type"], fields["Seed"]) == ("DPM fast", "Automatic", "4")


# -- the diffusers-backed samplers, end to end, against the webui's k-diffusion path ------------------------
def _discarded(sigmas):
    return torch.cat([sigmas[:-2], sigmas[-1:]])


WEBUI_PATHS = {  # sampler: (k-diffusion function, sigmas from the denoiser and steps, ancestral noise)
    "Euler": ("sample_euler", lambda m, n: m.inner.get_sigmas(n), False),
    "Euler a": ("sample_euler_ancestral", lambda m, n: m.inner.get_sigmas(n), True),
    "Heun": ("sample_heun", lambda m, n: m.inner.get_sigmas(n), False),
    "LMS": ("sample_lms", lambda m, n: m.inner.get_sigmas(n), False),
    "DPM++ 2M": ("sample_dpmpp_2m", lambda m, n: K.sampling.get_sigmas_karras(n, m.sigmas[0].item(),
                                                                              m.sigmas[-1].item()), False),
    "DPM2": ("sample_dpm_2", lambda m, n: _discarded(K.sampling.get_sigmas_karras(n + 1, m.sigmas[0].item(),
                                                                                   m.sigmas[-1].item())), False),
    # ours, not diffusers': the webui's is ancestral (eta 1), diffusers' single-step solver is not
    "DPM++ 2S a": ("sample_dpmpp_2s_ancestral", lambda m, n: K.sampling.get_sigmas_karras(n, m.sigmas[0].item(),
                                                                                         m.sigmas[-1].item()), True),
}


@needs_k
@pytest.mark.parametrize("sampler", list(WEBUI_PATHS))
def test_diffusers_samplers_follow_the_webui(gen, sampler):
    """The samplers diffusers runs, on the webui's tables (``Automatic``: the model's log-linear discrete schedule,
    Karras for DPM++ 2M, Karras with the penultimate sigma discarded for DPM2), give the latents of k-diffusion's
    own function over the same UNet, CFG and per-image noise: only the order of float operations differs."""
    fn, table, ancestral = WEBUI_PATHS[sampler]
    steps, seeds = 5, [7, 8]
    got = gen.generate(_request(sampler, steps=steps), output="latent").latents
    model = WebuiDenoiser(gen, 5.0, len(seeds), cfg_on_output=True)
    first, noise = _noise(seeds)
    sigmas = table(model, steps)
    kwargs = {"noise_sampler": noise} if ancestral else {}
    with torch.no_grad():
        want = getattr(K.sampling, fn)(model, first * sigmas[0], sigmas, disable=True, **kwargs)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * float(want.abs().max()))
