"""The webui's k-diffusion samplers on Flux / SD3: adapterhub's loop vs k-diffusion's own, same base, same run.

    python benchmarks/flux_samplers.py                                   # CPU, tiny-flux, 64 px, 8 steps
    python benchmarks/flux_samplers.py --base tiny-sd3 --samplers "DPM++ 2M" Heun --device cuda

Reference path: k-diffusion's ``sample_<x>`` (the installed ``k-diffusion`` package) driven by a denoiser written
here from the pipeline (the prompt encoded by the pipeline, ``x - sigma v`` from its transformer; SD3 with CFG 5),
on the same Karras sigmas and the same noise (the seed's generator; a Brownian tree per seed for the SDE
samplers). adapterhub path: ``Generator(pipe).generate`` with that sampler and schedule (prompt encoding, noise,
schedule and loop included). The two take turns, round by round, so a shared machine's load hits both alike; the
script prints the largest latent difference and the time ratio.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import sys
import types

import torch
from _common import timed  # noqa: F401 - benchmarks/ is on sys.path

FUNCTIONS = {"Euler": "euler", "Euler a": "euler_ancestral", "Heun": "heun", "DPM2": "dpm_2",
             "DPM2 a": "dpm_2_ancestral", "LMS": "lms", "DPM++ 2M": "dpmpp_2m", "DPM++ 2S a": "dpmpp_2s_ancestral",
             "DPM++ SDE": "dpmpp_sde", "DPM++ 2M SDE": "dpmpp_2m_sde", "DPM++ 3M SDE": "dpmpp_3m_sde"}
NOISELESS = ("Euler", "Heun", "DPM2", "LMS", "DPM++ 2M")


def k_diffusion():
    """k-diffusion's ``sampling`` module (its package ``__init__`` imports training-only dependencies)."""
    dist = importlib.metadata.distribution("k-diffusion")
    package = types.ModuleType("_kd_bench")
    package.__path__ = [str(dist.locate_file("k_diffusion"))]
    sys.modules[package.__name__] = package
    for name in ("utils", "sampling"):
        spec = importlib.util.spec_from_file_location(f"_kd_bench.{name}", dist.locate_file(f"k_diffusion/{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        setattr(package, name, module)
    return package.sampling


def reference_denoiser(pipe, family: str, prompt: str, size: int, cfg: float):
    """The flow model as k-diffusion's denoiser, written from the pipeline (Flux: guidance 3.5, no CFG)."""
    device = pipe.transformer.device
    if family == "flux":
        pe, pooled, ids = pipe.encode_prompt(prompt, prompt_2=None, device=device)
        rows = size // pipe.vae_scale_factor
        img_ids = pipe._prepare_latent_image_ids(1, rows // 2, rows // 2, device, torch.float32)
        guidance = torch.full([1], 3.5, device=device) if pipe.transformer.config.guidance_embeds else None

        def denoiser(x, sigma):
            packed = pipe._pack_latents(x, 1, x.shape[1], rows, rows)
            v = pipe.transformer(hidden_states=packed, timestep=sigma * 1000 / 1000, guidance=guidance,
                                 pooled_projections=pooled, encoder_hidden_states=pe, txt_ids=ids, img_ids=img_ids,
                                 joint_attention_kwargs={}, return_dict=False)[0]
            return x - sigma.reshape(-1, 1, 1, 1) * pipe._unpack_latents(v, size, size, pipe.vae_scale_factor)
        return denoiser
    pe, ne, pp, npp = pipe.encode_prompt(prompt, None, None, negative_prompt="", device=device,
                                         do_classifier_free_guidance=True)

    def denoiser(x, sigma):
        v = pipe.transformer(hidden_states=torch.cat([x, x]), timestep=(sigma * 1000).repeat(2),
                             encoder_hidden_states=torch.cat([ne, pe]), pooled_projections=torch.cat([npp, pp]),
                             return_dict=False)[0]
        v_u, v_c = v.chunk(2)
        return x - sigma.reshape(-1, 1, 1, 1) * (v_u + cfg * (v_c - v_u))
    return denoiser


def sampler_row(sampling, gen, name: str, size: int, steps: int, repeat: int, device: str) -> dict:
    from adapterhub.sample.flow import FlowRequest
    from adapterhub.sample.flow_samplers import SAMPLERS, flow_sigmas, flow_table

    pipe, family, seed, prompt = gen.pipe, gen.family, 7, "a lighthouse at dusk"
    cfg = 1.0 if family == "flux" else 5.0
    request = gen.request(FlowRequest(prompt, seed=seed, steps=steps, width=size, height=size, cfg=cfg,
                                      sampler=name, schedule="Karras"))
    table = flow_table(pipe.scheduler.config, family, size, size, pipe.vae_scale_factor,
                       2 if family == "flux" else int(pipe.transformer.config.patch_size))
    lo, hi = float(table[0]), float(table[-1])
    discard = SAMPLERS[name].discard_penultimate
    sigmas = sampling.get_sigmas_karras(steps + int(discard), lo, hi)
    if discard:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    assert torch.allclose(sigmas, flow_sigmas("Karras", steps, table, None, discard), rtol=1e-6)
    shape = (1, int(pipe.vae.config.latent_channels), size // pipe.vae_scale_factor, size // pipe.vae_scale_factor)

    def ours():
        return gen.generate(request, output="latent").latents

    def theirs():
        with torch.no_grad():
            rng = torch.Generator().manual_seed(seed)
            x = (torch.randn(shape, generator=rng) * sigmas[0]).to(device)
            kwargs = {}
            if name in ("DPM++ SDE", "DPM++ 2M SDE", "DPM++ 3M SDE"):
                kwargs["noise_sampler"] = sampling.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(),
                                                                            sigmas.max(), seed=[seed])
            elif name not in NOISELESS:
                kwargs["noise_sampler"] = lambda s, t: torch.randn(shape, generator=rng).to(device)
            denoiser = reference_denoiser(pipe, family, prompt, size, cfg)
            return getattr(sampling, f"sample_{FUNCTIONS[name]}")(denoiser, x, sigmas.to(device), disable=True,
                                                                  **kwargs)

    diff = (ours().float() - theirs().float()).abs().max().item()  # also the warm-up of both paths
    times = {"ours": [], "theirs": []}
    for _ in range(repeat):  # alternated rounds
        times["ours"].append(timed(ours, device))
        times["theirs"].append(timed(theirs, device))
    return {"k_diffusion_s": min(times["theirs"]), "adapterhub_s": min(times["ours"]), "max_abs_diff": diff}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="tiny-flux")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--samplers", nargs="+", default=["Euler a", "DPM++ 2M", "DPM++ 2M SDE", "Heun"])
    args = parser.parse_args(argv)
    import warnings

    # torchsde compares a tree's float32 ends with its rounded copies and warns (the reference's trees too)
    warnings.filterwarnings("ignore", message="Should have ta>=t0")
    from adapterhub.base import load_base
    from adapterhub.sample.flow import FlowGenerator

    pipe = load_base(args.base, device=args.device, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    gen = FlowGenerator(pipe, model_name="bench", hash_model=False, dtype=torch.float32)
    sampling = k_diffusion()
    print(f"device {args.device}, fp32, {args.base}, {args.size}px, {args.steps} steps, schedule Karras")
    for name in args.samplers:
        row = sampler_row(sampling, gen, name, args.size, args.steps, args.repeat, args.device)
        print(f"{name}: k-diffusion {row['k_diffusion_s']:.3f} s, adapterhub {row['adapterhub_s']:.3f} s, "
              f"ratio {row['adapterhub_s'] / row['k_diffusion_s']:.2f}x, max|diff| {row['max_abs_diff']:.2e}",
              flush=True)
    gen.close()


if __name__ == "__main__":
    main()
