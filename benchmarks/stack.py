"""Apply, remove and switch stacks of 3 LoRAs on an SD1-sized UNet (random weights): adapterhub vs diffusers.

    python benchmarks/stack.py                      # CPU, fp32, rank 32
    python benchmarks/stack.py --device cuda --dtype fp16

Both sides start from the same three random kohya LoRA files (rank 32, UNet only) and read them once,
outside the timings. Two stacks over them differ in every weight: A = 0.8, 0.6, 0.4 and B = 0.3, 0.9, 0.5.

* adapterhub: ``Stack.apply(model)`` / ``remove()``; a switch is ``B.apply(model, replace=True)`` (one
  pass over the touched weights from their pristine copies); a re-weight is ``set_weights`` of one entry.
* diffusers: ``load_lora_into_unet`` once per file, then ``set_adapters`` + ``fuse_lora`` /
  ``unfuse_lora``: a switch is ``unfuse_lora`` + ``set_adapters(B)`` + ``fuse_lora``.

The two sides run on two copies of the same UNet, their timings interleaved (a shared machine's load
hits both alike); the script prints best-of-N times, their ratios, and how far apart the merged
weights of stack A are.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from _common import DTYPES, sync, timed, write_loras  # noqa: F401 - benchmarks/ is on sys.path

WEIGHTS_A = [0.8, 0.6, 0.4]
WEIGHTS_B = [0.3, 0.9, 0.5]


def targeted(files: list[Path]) -> list[str]:
    """The UNet state-dict keys the LoRAs change."""
    import adapterhub

    return sorted({f"{t.split('.', 1)[1]}.weight" for f in files for t in adapterhub.load(f).patches})


def state_of(unet, keys: list[str]) -> dict[str, torch.Tensor]:
    state = {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items() if "lora_" not in k}
    return {k: state[k].detach().to("cpu", copy=True) for k in keys}


class Adapterhub:
    """Stacks A and B over the three files; the adapters are read once, here."""

    def __init__(self, unet, files: list[Path]):
        from adapterhub.stack import Stack

        self.unet, self.model = unet, {"unet": unet}
        self.a = Stack(zip(files, WEIGHTS_A)).load()
        self.b = Stack(zip(files, WEIGHTS_B)).load()
        self.on, self.first = None, WEIGHTS_A[0]

    def apply_remove(self):
        self.a.apply(self.model)
        self.a.remove()

    def start(self):  # stack A on
        self.a.set_weights(WEIGHTS_A)
        self.a.apply(self.model)
        self.on, self.first = self.a, WEIGHTS_A[0]

    def switch(self):  # A -> B, then B -> A ...
        self.on = self.b if self.on is self.a else self.a
        self.on.apply(self.model, replace=True)

    def reweight(self):  # the first LoRA of A: 0.8 <-> 0.2
        self.first = 0.2 if self.first == WEIGHTS_A[0] else WEIGHTS_A[0]
        self.a.set_weights([self.first, None, None])

    def stop(self):
        self.on.remove()


class Diffusers:
    """The same files loaded once into PEFT layers; set_adapters + fuse_lora / unfuse_lora after that."""

    def __init__(self, unet, files: list[Path]):
        from diffusers.loaders import StableDiffusionLoraLoaderMixin as Loader

        self.unet, self.names = unet, [f"a{i}" for i in range(len(files))]
        for name, f in zip(self.names, files):
            state, alphas = Loader.lora_state_dict(str(f), unet_config=unet.config)
            Loader.load_lora_into_unet(state, alphas, unet, adapter_name=name)
        self.on, self.first = None, WEIGHTS_A[0]

    def fuse(self, weights):
        self.unet.set_adapters(self.names, weights)
        self.unet.fuse_lora(lora_scale=1.0, adapter_names=self.names)

    def apply_remove(self):
        self.fuse(WEIGHTS_A)
        self.unet.unfuse_lora()

    def start(self):
        self.fuse(WEIGHTS_A)
        self.on, self.first = WEIGHTS_A, WEIGHTS_A[0]

    def switch(self):
        self.on = WEIGHTS_B if self.on is WEIGHTS_A else WEIGHTS_A
        self.unet.unfuse_lora()
        self.fuse(self.on)

    def reweight(self):
        self.first = 0.2 if self.first == WEIGHTS_A[0] else WEIGHTS_A[0]
        self.unet.unfuse_lora()
        self.fuse([self.first, *WEIGHTS_A[1:]])

    def stop(self):
        self.unet.unfuse_lora()


def bench(ours: Adapterhub, ref: Diffusers, device: str, repeat: int) -> dict[str, tuple[float, float]]:
    """Best-of-``repeat`` seconds per operation, the two sides interleaved so they share the
    machine's conditions (other load on a shared CPU)."""
    times = {}
    for name, op in (("apply+remove", "apply_remove"), ("switch A->B", "switch"), ("re-weight one", "reweight")):
        if op != "apply_remove":
            ours.start(), ref.start()
        pairs = [(timed(getattr(ours, op), device), timed(getattr(ref, op), device)) for _ in range(repeat)]
        if op != "apply_remove":
            ours.stop(), ref.stop()
        times[name] = (min(p[0] for p in pairs), min(p[1] for p in pairs))
    return times


def main(argv=None) -> None:
    from adapterhub.base import build_preset

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    unets = [build_preset("sd1", device=args.device, dtype=DTYPES[args.dtype], components=("unet",), seed=0).unet
             for _ in range(2)]  # the same random weights twice: one per side
    with tempfile.TemporaryDirectory() as tmp:
        files = write_loras(unets[0], Path(tmp), args.rank, 3)
        keys = targeted(files)
        ours, ref = Adapterhub(unets[0], files), Diffusers(unets[1], files)
        times = bench(ours, ref, args.device, args.repeat)
        ours.start(), ref.start()
        err = max((a.float() - b.float()).abs().max().item()
                  for a, b in zip(state_of(ours.unet, keys).values(), state_of(ref.unet, keys).values()))
    threads = f", {torch.get_num_threads()} threads" if args.device == "cpu" else ""
    print(f"device {args.device}{threads}, dtype {args.dtype}, SD1 UNet "
          f"{sum(p.numel() for p in unets[0].parameters()) / 1e6:.0f}M params, 3 LoRAs rank {args.rank} "
          f"on {len(keys)} weights, best of {args.repeat}")
    print(f"{'':<15} {'diffusers s':>12} {'adapterhub s':>13} {'speedup':>8}")
    for name, (mine, theirs) in times.items():
        print(f"{name:<15} {theirs:>12.3f} {mine:>13.3f} {theirs / mine:>7.1f}x")
    print(f"stack A: max |adapterhub - diffusers| over the merged weights = {err:.2e}")


if __name__ == "__main__":
    main()
