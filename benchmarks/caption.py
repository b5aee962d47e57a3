"""Captioning throughput of ``clip-tags`` with random-weight open_clip models (no downloads).

    python benchmarks/caption.py                  # CPU: a small model; GPU (when present): ViT-L-14, batch 64
    python benchmarks/caption.py --images 256 --extra-tags 20000 --model ViT-B-32

For each device it captions the same synthetic dataset (JPEGs cut from the demo images) twice:
with an empty embedding cache (the vocabulary is encoded first) and with the cache filled by that
run. It prints images/s end to end (model load + vocabulary + images), the setup time, the
steady-state images/s of the batch loop, the share of the loop the model sat idle (waiting for
data or writing captions: the GPU idle share on a GPU) and the cached/uncached ratio.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "datasets" / "demo" / "10_demo subject"
VOCAB = ROOT / "plugins" / "captioners" / "vocab"


def make_images(folder: Path, n: int, seed: int = 0) -> Path:
    """``n`` JPEGs (random crops of the demo photos, 384-512 px) in a kohya folder."""
    rng = random.Random(seed)
    sources = [Image.open(p).convert("RGB") for p in sorted(DEMO.glob("*.jpg"))]
    sub = folder / "1_bench"
    sub.mkdir(parents=True)
    for i in range(n):
        im = rng.choice(sources)
        w, h = im.size
        cw, ch = rng.randint(w // 2, w), rng.randint(h // 2, h)
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        crop = im.crop((x, y, x + cw, y + ch)).resize((rng.randint(384, 512), rng.randint(384, 512)))
        crop.save(sub / f"img {i:05d}.jpg", quality=90)
    return folder


def make_vocab(folder: Path, extra: int) -> tuple[str, ...]:
    """The shipped vocabularies, plus ``extra`` two-word tags (a clip-interrogator-sized table)."""
    files = [str(VOCAB / f"{n}.txt") for n in ("mediums", "general", "styles")]
    if extra:
        words = [t for t in (VOCAB / "general.txt").read_text().splitlines() if t and not t.startswith("#")]
        styles = [t for t in (VOCAB / "styles.txt").read_text().splitlines() if t and not t.startswith("#")]
        combos = [f"{s} {w}" for s in styles for w in words][:extra]
        (folder / "flavors.txt").write_text("\n".join(combos), encoding="utf-8")
        files.append(str(folder / "flavors.txt"))
    return tuple(files)


def run(images: Path, cache: Path, args, device: str) -> dict:
    from adapterhub.dataset import CaptionConfig
    from adapterhub.dataset.captioning import run_captioning

    cfg = CaptionConfig(dir=images, captioner="clip-tags", model=args.model, pretrained="random",
                        vocab=args.vocab_files, mode="overwrite", batch_size=args.batch_size,
                        device=device, cache_dir=cache, num_workers=args.workers, restart=True)
    r = run_captioning(cfg)
    r["setup_s"] = round(r["seconds"] - r["loop_s"], 2)
    return r


def bench(device: str, args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="adapterhub-bench-"))
    try:
        images = make_images(work / "data", args.images)
        args.vocab_files = make_vocab(work, args.extra_tags)
        args.tag_count = sum(1 for f in args.vocab_files for ln in Path(f).read_text().splitlines()
                             if ln.strip() and not ln.startswith("#"))
        cache = work / "cache"
        cold = run(images, cache, args, device)
        warm = run(images, cache, args, device)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    keys = ("images_per_s", "setup_s", "loop_images_per_s", "model_idle_share")
    return {"device": device, "model": args.model, "batch_size": args.batch_size, "images": args.images,
            "tags": args.tag_count,
            "uncached": {k: cold[k] for k in keys}, "cached": {k: warm[k] for k in keys},
            "cached_over_uncached": round(warm["images_per_s"] / cold["images_per_s"], 2)}


def main(argv=None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--model", default=None, help="open_clip model (default: ViT-B-32 on CPU, ViT-L-14 on GPU)")
    p.add_argument("--images", type=int, default=None, help="default 64 on CPU, 2048 on GPU")
    p.add_argument("--batch-size", type=int, default=None, help="default 16 on CPU, 64 on GPU")
    p.add_argument("--extra-tags", type=int, default=0, help="add this many two-word tags to the vocabulary")
    p.add_argument("--workers", type=int, default=-1)
    args = p.parse_args(argv)
    devices = ["cuda"] if args.device == "cuda" else ["cpu"] if args.device == "cpu" else \
        (["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"])
    results = []
    for device in devices:
        gpu = device == "cuda"
        a = argparse.Namespace(**vars(args))
        a.model = args.model or ("ViT-L-14" if gpu else "ViT-B-32")
        a.images = args.images or (2048 if gpu else 64)
        a.batch_size = args.batch_size or (64 if gpu else 16)
        results.append(bench(device, a))
        print(json.dumps(results[-1], indent=1), flush=True)
    for r in results:
        print(f"{r['device']}: {r['model']} batch {r['batch_size']}: uncached {r['uncached']['images_per_s']} img/s, "
              f"cached {r['cached']['images_per_s']} img/s (x{r['cached_over_uncached']}); loop "
              f"{r['cached']['loop_images_per_s']} img/s, model idle {r['cached']['model_idle_share']:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
