"""Captioning throughput of ``clip-tags`` and ``wd`` with random-weight models (no downloads).

    python benchmarks/caption.py                  # both captioners; CPU, and the GPU when present
    python benchmarks/caption.py --captioner clip-tags --images 256 --extra-tags 20000 --model ViT-B-32
    python benchmarks/caption.py --captioner wd --images 32 --wd-depth 12

``clip-tags`` (open_clip; a small model on the CPU, ViT-L-14 batch 64 on a GPU) captions the same
synthetic dataset (JPEGs cut from the demo images) twice: with an empty embedding cache (the
vocabulary is encoded first) and with the cache filled by that run; the ratio is cached/uncached.

``wd`` runs a random-weight tagger with a ViT-B/16's shape (wd-v1-4-vit-tagger-v2: 448 px input,
12 blocks of width 768, 9,083 tags; built offline with ``onnx.helper``) over larger JPEGs
(768-1,280 px, as photo datasets hold) two ways, ``--rounds`` times each, alternated (the best of
each is kept, as a shared machine's load drifts): with the images decoded and preprocessed in the
loop before each batch (``--num-workers 0``: the model waits for them), and in data-loading worker
processes that prepare the next batches while the model runs (the runner's default). The ratio is
overlapped/serial loop throughput, printed beside the most any overlap can give: 1 / (1 - the
serial loop's model-idle share), which a noisy machine blurs far less. The GPU row needs
onnxruntime-gpu (the CUDA execution provider).

Every row prints images/s end to end (model load included), the setup time, the steady-state
images/s of the batch loop and the share of the loop the model sat idle (waiting for data or
writing captions: the GPU idle share on a GPU).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "datasets" / "demo" / "10_demo subject"
VOCAB = ROOT / "plugins" / "captioners" / "vocab"


def make_images(folder: Path, n: int, seed: int = 0, sides: tuple[int, int] = (384, 512)) -> Path:
    """``n`` JPEGs (random crops of the demo photos, ``sides`` px) in a kohya folder."""
    rng = random.Random(seed)
    sources = [Image.open(p).convert("RGB") for p in sorted(DEMO.glob("*.jpg"))]
    sub = folder / "1_bench"
    sub.mkdir(parents=True)
    for i in range(n):
        im = rng.choice(sources)
        w, h = im.size
        cw, ch = rng.randint(w // 2, w), rng.randint(h // 2, h)
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        crop = im.crop((x, y, x + cw, y + ch)).resize((rng.randint(*sides), rng.randint(*sides)))
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


# -- wd: a ViT-B/16-sized random tagger ------------------------------------------------------------
VIT = {"size": 448, "patch": 16, "width": 768, "depth": 12, "heads": 12, "mlp": 3072}  # wd-v1-4-vit-tagger-v2's shape
WD_TAGS = 9083  # rows in wd-v1-4-vit-tagger-v2's selected_tags.csv


def _block(i: int, x: str, shape: dict, rng, nodes: list, weights: dict, std: float) -> str:
    """One pre-norm transformer block (attention, then a GELU MLP) appended to ``nodes``."""
    from onnx import helper

    w, heads = shape["width"], shape["heads"]
    n = f"b{i}_"

    def param(name, *dims, value=None):
        weights[n + name] = value if value is not None else (rng.standard_normal(dims) * std).astype(np.float32)
        return n + name

    def node(op, inputs, out, **attrs):
        nodes.append(helper.make_node(op, inputs, [n + out], **attrs))
        return n + out

    ones, zeros = np.ones(w, np.float32), np.zeros(w, np.float32)
    h = node("LayerNormalization", [x, param("ln1_s", value=ones), param("ln1_b", value=zeros)], "ln1", axis=-1)
    qkv = node("Add", [node("MatMul", [h, param("qkv_w", w, 3 * w)], "qkv0"), param("qkv_b", 3 * w)], "qkv")
    split = node("Transpose", [node("Reshape", [qkv, param("qkv_shape", value=np.array(
        [0, 0, 3, heads, w // heads], np.int64))], "qkv5")], "qkvT", perm=[2, 0, 3, 1, 4])
    q, k, v = (node("Gather", [split, param(f"i{j}", value=np.array(j, np.int64))], f"{t}", axis=0)
               for j, t in enumerate("qkv"))
    scores = node("Mul", [node("MatMul", [q, node("Transpose", [k], "kT", perm=[0, 1, 3, 2])], "s0"),
                          param("scale", value=np.array((w // heads) ** -0.5, np.float32))], "s")
    att = node("MatMul", [node("Softmax", [scores], "p", axis=-1), v], "att")
    att = node("Reshape", [node("Transpose", [att], "attT", perm=[0, 2, 1, 3]),
                           param("merge_shape", value=np.array([0, 0, w], np.int64))], "att2")
    proj = node("Add", [node("MatMul", [att, param("o_w", w, w)], "o0"), param("o_b", w)], "o")
    x = node("Add", [x, proj], "r1")
    h = node("LayerNormalization", [x, param("ln2_s", value=ones), param("ln2_b", value=zeros)], "ln2", axis=-1)
    h = node("Add", [node("MatMul", [h, param("fc1_w", w, shape["mlp"])], "f0"), param("fc1_b", shape["mlp"])], "f1")
    # exact GELU, x * (1 + erf(x / sqrt 2)) / 2: onnxruntime fuses the pattern into one kernel
    erf = node("Erf", [node("Mul", [h, param("rsqrt2", value=np.array(2 ** -0.5, np.float32))], "g0")], "g1")
    h = node("Mul", [node("Mul", [h, node("Add", [erf, param("one", value=np.array(1, np.float32))], "g2")], "g3"),
                     param("half", value=np.array(0.5, np.float32))], "g")
    h = node("Add", [node("MatMul", [h, param("fc2_w", shape["mlp"], w)], "f2"), param("fc2_b", w)], "f3")
    return node("Add", [x, h], "out")


def write_vit_tagger(folder: Path, shape: dict = VIT, tags: int = WD_TAGS, seed: int = 0,
                     std: float = 0.02) -> Path:
    """``model.onnx`` + ``selected_tags.csv`` with the WD interface and a ViT-B/16's layers and
    weights count (random weights, normal with ``std``): NHWC float32 in, one sigmoid score per tag out."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w, size, patch = shape["width"], shape["size"], shape["patch"]
    tokens = (size // patch) ** 2
    weights = {"patch_w": (rng.standard_normal((w, 3, patch, patch)) * std / 255).astype(np.float32),
               "patch_b": np.zeros(w, np.float32), "flat_shape": np.array([0, w, -1], np.int64),
               "pos": (rng.standard_normal((1, tokens, w)) * std).astype(np.float32),
               "ln_s": np.ones(w, np.float32), "ln_b": np.zeros(w, np.float32),
               "head_w": (rng.standard_normal((w, tags)) * std).astype(np.float32),
               "head_b": np.full(tags, -2.0, np.float32)}
    nodes = [helper.make_node("Transpose", ["input_1:0"], ["nchw"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["nchw", "patch_w", "patch_b"], ["patches"], strides=[patch, patch],
                              kernel_shape=[patch, patch]),
             helper.make_node("Reshape", ["patches", "flat_shape"], ["flat"]),
             helper.make_node("Transpose", ["flat"], ["seq"], perm=[0, 2, 1]),
             helper.make_node("Add", ["seq", "pos"], ["x0"])]
    x = "x0"
    for i in range(shape["depth"]):
        x = _block(i, x, shape, rng, nodes, weights, std)
    nodes += [helper.make_node("LayerNormalization", [x, "ln_s", "ln_b"], ["ln"], axis=-1),
              helper.make_node("ReduceMean", ["ln"], ["pooled"], axes=[1], keepdims=0),
              helper.make_node("MatMul", ["pooled", "head_w"], ["logits0"]),
              helper.make_node("Add", ["logits0", "head_b"], ["logits"]),
              helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"])]
    graph = helper.make_graph(
        nodes, "vit_wd_bench",
        [helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, ["batch", size, size, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, ["batch", tags])],
        initializer=[numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"))
    with open(folder / "selected_tags.csv", "w", encoding="utf-8", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["tag_id", "name", "category", "count"])
        for i in range(tags):
            category = 9 if i < 4 else 4 if i >= tags - 2000 else 0  # 4 ratings, general, 2000 characters
            rows.writerow([i, f"tag_{i}", category, tags - i])
    return folder


def run_wd(images: Path, model: Path, args, device: str, workers: int) -> dict:
    from adapterhub.dataset import CaptionConfig
    from adapterhub.dataset.captioning import run_captioning

    cfg = CaptionConfig(dir=images, captioner="wd", model=str(model), mode="overwrite", batch_size=args.batch_size,
                        device=device, num_workers=workers, restart=True)
    r = run_captioning(cfg)
    r["setup_s"] = round(r["seconds"] - r["loop_s"], 2)
    return r


def _loop_rate(report: dict) -> float:
    return report.get("loop_images_per_s", -1.0)


def bench_wd(device: str, args) -> dict:
    """The same images captioned without, then with, data loading overlapping the model."""
    work = Path(tempfile.mkdtemp(prefix="adapterhub-bench-wd-"))
    shape = {**VIT, "depth": args.wd_depth}
    try:
        images = make_images(work / "data", args.images, sides=(768, 1280))
        model = write_vit_tagger(work / "tagger", shape)
        workers = args.workers if args.workers > 0 else min(8, os.cpu_count() or 1)
        serial = overlapped = None
        for _ in range(args.rounds):  # alternated, the best of each kept: a shared machine's load drifts
            serial = max(serial or {}, run_wd(images, model, args, device, 0), key=_loop_rate)
            overlapped = max(overlapped or {}, run_wd(images, model, args, device, workers), key=_loop_rate)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    keys = ("images_per_s", "setup_s", "loop_images_per_s", "model_idle_share")
    return {"captioner": "wd", "device": device, "model": f"random ViT-B/16-shaped tagger, depth {args.wd_depth}",
            "batch_size": args.batch_size, "images": args.images, "tags": WD_TAGS, "workers": workers,
            "rounds": args.rounds,
            "serial": {k: serial[k] for k in keys}, "overlapped": {k: overlapped[k] for k in keys},
            "overlapped_over_serial": round(overlapped["loop_images_per_s"] / serial["loop_images_per_s"], 2),
            # the most any overlap can give: the serial loop without its model-idle share (loading, writing)
            "overlap_bound": round(1 / max(1e-9, 1 - serial["model_idle_share"]), 3)}


def _wd_devices(devices: list[str]) -> list[str]:
    """The devices the wd rows can run on: CUDA only with onnxruntime's CUDA provider."""
    import onnxruntime as ort

    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if "cuda" in devices and not cuda:
        print("wd: this onnxruntime has no CUDA provider (install onnxruntime-gpu): no GPU row", file=sys.stderr)
    return [d for d in devices if d == "cpu" or cuda]


def _summary(r: dict) -> str:
    if r["captioner"] == "wd":
        return (f"{r['device']}: wd {r['model']} batch {r['batch_size']}: loop {r['serial']['loop_images_per_s']} "
                f"img/s serial (model idle {r['serial']['model_idle_share']:.0%}), "
                f"{r['overlapped']['loop_images_per_s']} img/s with {r['workers']} loading workers (model idle "
                f"{r['overlapped']['model_idle_share']:.0%}): x{r['overlapped_over_serial']} (at most "
                f"x{r['overlap_bound']})")
    return (f"{r['device']}: {r['model']} batch {r['batch_size']}: uncached {r['uncached']['images_per_s']} img/s, "
            f"cached {r['cached']['images_per_s']} img/s (x{r['cached_over_uncached']}); loop "
            f"{r['cached']['loop_images_per_s']} img/s, model idle {r['cached']['model_idle_share']:.0%}")


def main(argv=None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--captioner", choices=("all", "clip-tags", "wd"), default="all")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--model", default=None, help="open_clip model (default: ViT-B-32 on CPU, ViT-L-14 on GPU)")
    p.add_argument("--images", type=int, default=None, help="default 64 on CPU (wd: 16), 2048 on GPU (wd: 512)")
    p.add_argument("--batch-size", type=int, default=None, help="default 16 on CPU (wd: 4), 64 on GPU")
    p.add_argument("--wd-depth", type=int, default=VIT["depth"], help="transformer blocks of the wd model")
    p.add_argument("--rounds", type=int, default=2, help="wd: serial and overlapped runs, alternated; the best of "
                                                         "each is reported")
    p.add_argument("--extra-tags", type=int, default=0, help="add this many two-word tags to the vocabulary")
    p.add_argument("--workers", type=int, default=-1)
    args = p.parse_args(argv)
    devices = ["cuda"] if args.device == "cuda" else ["cpu"] if args.device == "cpu" else \
        (["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"])
    results = []
    for device in devices if args.captioner in ("all", "clip-tags") else []:
        gpu = device == "cuda"
        a = argparse.Namespace(**vars(args))
        a.model = args.model or ("ViT-L-14" if gpu else "ViT-B-32")
        a.images = args.images or (2048 if gpu else 64)
        a.batch_size = args.batch_size or (64 if gpu else 16)
        results.append({"captioner": "clip-tags", **bench(device, a)})
        print(json.dumps(results[-1], indent=1), flush=True)
    for device in _wd_devices(devices) if args.captioner in ("all", "wd") else []:
        gpu = device == "cuda"
        a = argparse.Namespace(**vars(args))
        a.images = args.images or (512 if gpu else 16)
        a.batch_size = args.batch_size or (64 if gpu else 4)
        results.append(bench_wd(device, a))
        print(json.dumps(results[-1], indent=1), flush=True)
    for r in results:
        print(_summary(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
