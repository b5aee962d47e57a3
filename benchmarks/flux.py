"""Flux on the tiny base: sampling and LoRA merge, adapterhub vs diffusers, same base, same run.

    python benchmarks/flux.py                       # CPU, tiny-flux, 64 px, 4 steps, rank 8
    python benchmarks/flux.py --size 128 --steps 8 --device cuda

Sampling: reference path diffusers' ``FluxPipeline`` called with one CPU generator per image (seeds
``seed + n``); adapterhub path ``Generator(pipe)`` (the flow generator, which drives the same pipeline from
noise it draws per image as the webui does). The two take turns, round by round, so a shared machine's load
hits both alike; the script checks that the latents are equal bit for bit and prints the time ratio.

Merge: a diffusers / PEFT LoRA on every linear module of the transformer. Reference path diffusers'
``load_lora_weights`` + ``fuse_lora``; adapterhub path ``adapterhub.load`` + ``merge_into``. Both start from
the same file and base and end with merged weights; the script prints the largest difference and the ratio.
"""
from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
from _common import timed  # noqa: F401 - benchmarks/ is on sys.path


def load(base: str, device: str):
    from adapterhub.base import load_base

    pipe = load_base(base, device=device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def state(pipe) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in pipe.transformer.state_dict().items()}


def restore(pipe, pristine: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for k, v in pipe.transformer.state_dict().items():
            v.copy_(pristine[k])


def write_lora(transformer, path: Path, rank: int, seed: int = 0) -> Path:
    """A diffusers / PEFT LoRA (``transformer.<module>.lora_A/B``) on every linear module."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear):
            out_f, in_f = module.weight.shape
            sd[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, in_f, generator=gen) * 0.05
            sd[f"transformer.{name}.lora_B.weight"] = torch.randn(out_f, rank, generator=gen) * 0.05
    save_file(sd, str(path))
    return path


def sample_row(pipe, size: int, steps: int, batch: int, repeat: int, device: str) -> dict:
    from adapterhub.sample import Generator

    gen = Generator(pipe, model_name="bench", hash_model=False)
    prompt, seeds = "a lighthouse at dusk", list(range(7, 7 + batch))
    request = dict(seed=seeds[0], batch=batch, steps=steps, width=size, height=size)

    def ours():
        return gen.generate(gen.request(_flow_request(prompt, request)), output="latent").latents

    def theirs():
        out = pipe(prompt, height=size, width=size, num_inference_steps=steps, guidance_scale=3.5,
                   generator=[torch.Generator().manual_seed(s) for s in seeds], num_images_per_prompt=batch,
                   output_type="latent").images
        return pipe._unpack_latents(out, size, size, pipe.vae_scale_factor)

    same = torch.equal(ours(), theirs())  # also the warm-up of both paths
    times = {"ours": [], "theirs": []}
    for _ in range(repeat):  # alternated rounds
        times["ours"].append(timed(ours, device))
        times["theirs"].append(timed(theirs, device))
    gen.close()
    return {"diffusers_s": min(times["theirs"]), "adapterhub_s": min(times["ours"]), "bitwise": same}


def _flow_request(prompt: str, values: dict):
    from adapterhub.sample.flow import FlowRequest

    return FlowRequest(prompt, cfg=1.0, **values)


def merge_row(pipe, folder: Path, rank: int, repeat: int, device: str) -> dict:
    import adapterhub

    path = write_lora(pipe.transformer, folder / f"flux_r{rank}.safetensors", rank)
    pristine = state(pipe)
    ours, theirs, ours_state, ref_state = [], [], None, None
    ref = copy.deepcopy(pipe)
    for _ in range(repeat):  # alternated rounds, each from the pristine weights
        restore(pipe, pristine)
        ours.append(timed(lambda: adapterhub.load(path).merge_into(pipe, 1.0), device))
        ours_state = state(pipe)

        def fuse():
            ref.load_lora_weights(str(path), adapter_name="bench")
            ref.fuse_lora(components=["transformer"], lora_scale=1.0)

        restore(ref, pristine)
        theirs.append(timed(fuse, device))
        ref.unload_lora_weights()
        ref_state = state(ref)
    restore(pipe, pristine)
    err = max((ours_state[k] - ref_state[k]).abs().max().item() for k in ours_state)
    modules = sum(isinstance(m, torch.nn.Linear) for m in pipe.transformer.modules())
    return {"rank": rank, "modules": modules, "diffusers_s": min(theirs), "adapterhub_s": min(ours),
            "max_abs_diff": err}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="tiny-flux")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--ranks", type=int, nargs="+", default=[8])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    pipe = load(args.base, args.device)
    params = sum(p.numel() for p in pipe.transformer.parameters())
    print(f"device {args.device}, fp32, {args.base} (transformer {params / 1e6:.2f}M params)")
    row = sample_row(pipe, args.size, args.steps, args.batch, args.repeat, args.device)
    print(f"sample {args.size}px x{args.batch}, {args.steps} steps: diffusers {row['diffusers_s']:.3f} s, "
          f"adapterhub {row['adapterhub_s']:.3f} s, ratio {row['adapterhub_s'] / row['diffusers_s']:.2f}x, "
          f"latents bitwise equal: {row['bitwise']}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for rank in args.ranks:
            r = merge_row(pipe, Path(tmp), rank, args.repeat, args.device)
            print(f"merge rank {r['rank']} on {r['modules']} modules: diffusers {r['diffusers_s']:.3f} s, "
                  f"adapterhub {r['adapterhub_s']:.3f} s, ratio {r['adapterhub_s'] / r['diffusers_s']:.2f}x, "
                  f"max|diff| {r['max_abs_diff']:.2e}", flush=True)


if __name__ == "__main__":
    main()
