"""Merge N LoRAs into an SD1-sized UNet (random weights): adapterhub vs diffusers, same files, same run.

    python benchmarks/merge.py                      # CPU, ranks 32 and 128, 1 and 3 LoRAs
    python benchmarks/merge.py --device cuda --dtype fp16

Reference path: diffusers ``lora_state_dict`` + ``load_lora_into_unet`` per file, ``set_adapters`` with
the weights, ``fuse_lora``. adapterhub path: ``adapterhub.load`` per file + the weight engine's
``merge``. Both start from the same files on disk and end with merged UNet weights; the script checks
the two results agree and prints the time ratio. On CUDA it also prints the achieved memory
bandwidth of the merge against a large device-to-device copy measured in the same run.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from _common import DTYPES, sync, timed, write_loras  # noqa: F401 - benchmarks/ is on sys.path



def make_unet(device: str, dtype: torch.dtype):
    from adapterhub.base import build_preset

    return build_preset("sd1", device=device, dtype=dtype, components=("unet",), seed=0).unet


def snapshot(unet) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


def restore(unet, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for k, v in unet.state_dict().items():
            v.copy_(state[k])


def run_adapterhub(unet, files: list[Path], weights: list[float]) -> None:
    import adapterhub
    from adapterhub.weights import merge

    merge({"unet": unet}, [(adapterhub.load(f), w) for f, w in zip(files, weights)])


def run_diffusers(unet, files: list[Path], weights: list[float]) -> None:
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as Loader

    names = []
    for i, f in enumerate(files):
        state, alphas = Loader.lora_state_dict(str(f), unet_config=unet.config)
        Loader.load_lora_into_unet(state, alphas, unet, adapter_name=f"a{i}")
        names.append(f"a{i}")
    unet.set_adapters(names, weights)
    unet.fuse_lora(lora_scale=1.0, adapter_names=names)


def merged_weights(unet) -> dict[str, torch.Tensor]:
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in unet.state_dict().items() if "lora_" not in k}


def bandwidth_gbs(device: str) -> float:
    x = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    t = min(timed(lambda: y.copy_(x), device) for _ in range(5))
    return 2 * x.numel() / t / 1e9


def bench_case(unet, pristine, folder: Path, rank: int, count: int, device: str, repeat: int) -> dict:
    files = write_loras(unet, folder, rank, count)
    weights = [0.8 / count] * count
    ours = []
    for _ in range(repeat):
        restore(unet, pristine)
        ours.append(timed(lambda: run_adapterhub(unet, files, weights), device))
    ours_state = merged_weights(unet)
    ref = []
    for _ in range(repeat):
        restore(unet, pristine)
        ref.append(timed(lambda: run_diffusers(unet, files, weights), device))
        ref_state = merged_weights(unet)
        unet.unload_lora()
    restore(unet, pristine)
    err = max((ours_state[k].float() - ref_state[k].float()).abs().max().item() for k in ours_state)
    touched = sum(v.numel() * v.element_size() for k, v in ours_state.items() if not torch.equal(v, pristine[k]))
    return {"rank": rank, "loras": count, "diffusers_s": min(ref), "adapterhub_s": min(ours),
            "speedup": min(ref) / min(ours), "max_abs_diff": err, "touched_bytes": touched}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--ranks", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    unet = make_unet(args.device, DTYPES[args.dtype])
    pristine = snapshot(unet)
    peak = bandwidth_gbs(args.device) if args.device.startswith("cuda") else None
    print(f"device {args.device}, dtype {args.dtype}, SD1 UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.0f}M params")
    print(f"{'rank':>5} {'loras':>5} {'diffusers s':>12} {'adapterhub s':>13} {'speedup':>8} {'max|diff|':>10}"
          + ("  merge GB/s (share of copy peak)" if peak else ""))
    with tempfile.TemporaryDirectory() as tmp:
        for rank in args.ranks:
            for count in args.counts:
                r = bench_case(unet, pristine, Path(tmp), rank, count, args.device, args.repeat)
                line = (f"{r['rank']:>5} {r['loras']:>5} {r['diffusers_s']:>12.3f} {r['adapterhub_s']:>13.3f} "
                        f"{r['speedup']:>7.2f}x {r['max_abs_diff']:>10.2e}")
                if peak:
                    gbs = 2 * r["touched_bytes"] / r["adapterhub_s"] / 1e9
                    line += f"  {gbs:8.1f} ({gbs / peak:.0%} of {peak:.0f})"
                print(line, flush=True)


if __name__ == "__main__":
    main()
