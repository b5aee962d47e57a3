"""The training data: samples from a dataset folder, bucketed, with latents cached once on disk.

* Samples come from :func:`adapterhub.dataset.scan` (kohya ``N_trigger class`` folders give repeats and
  class tokens); captions are the first line of the sidecar file. Images without a caption are an
  error (naming the first) unless ``caption_default`` is given; unreadable images are skipped and
  reported.
* A dataset that is a ``.json`` file is kohya's fine-tuning metadata (``meta_cap.json``, ``meta_lat.json``):
  its entries are the samples, their images found in ``train_data_dir`` (default: the JSON's folder)
  and their captions taken from the JSON (:func:`adapterhub.dataset.kohya_json.read_training_metadata`);
  repeats come from the source (default 1), the subset name is the JSON's file name, as kohya's.
* Buckets are kohya's (:class:`adapterhub.dataset.buckets.Bucketer`): each image is scaled to cover its
  bucket and centre-cropped.
* Latents are cached once per (image bytes, bucket, resize, crop, VAE weights): a content-addressed
  file under the cache folder, so a changed image, bucket or VAE never reuses a stale entry and an
  unchanged one is never recomputed. The file keeps the latent distribution (mean, std); every step
  draws its own sample from it.
* Batches hold one bucket each; their order is a pure function of (seed, epoch), so a resumed run
  continues with exactly the batches the uninterrupted one would have used.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapterhub.dataset.buckets import Bucketer
from adapterhub.dataset.buckets import bucket_sides as dataset_bucket_sides
from adapterhub.dataset.config import BucketConfig
from adapterhub.dataset.folder import IMAGE_EXTS, scan
from adapterhub.dataset.images import ImageReadError, image_size, load_rgb
from adapterhub.errors import AdapterhubError
from adapterhub.hashes import sha256_file
from adapterhub.io import atomic_path

LATENT_FORMAT = "adapterhub-latents-1"


@dataclass
class Sample:
    path: Path
    rel: str
    folder: str  # the subset folder's name, as kohya's ss_dataset_dirs / ss_tag_frequency key it
    repeats: int
    class_tokens: str | None
    caption: str
    size: tuple[int, int]  # (w, h) as displayed
    bucket: tuple[int, int] = (0, 0)
    resized: tuple[int, int] = (0, 0)
    crop: tuple[int, int, int, int] = (0, 0, 0, 0)  # left, top, right, bottom in the resized image
    latent_file: Path | None = None
    loss_weight: float = 1.0  # DreamBooth class images: --prior-loss-weight
    is_reg: bool = False  # a class (regularisation) image


@dataclass
class Data:
    root: Path
    samples: list[Sample]
    skipped: list[dict] = field(default_factory=list)  # {"file", "problem"}
    validation: list[Sample] = field(default_factory=list)
    bucket_sides: tuple[int, int] = (256, 1024)

    @property
    def images_with_repeats(self) -> int:
        return sum(s.repeats for s in self.samples)


def bucket_sides(cfg, resolution: int | None = None) -> tuple[int, int]:
    """(min, max) bucket side: as given, else from the resolution by the rule ``dataset bucket`` and
    ``dataset prepare`` use (:func:`adapterhub.dataset.buckets.bucket_sides`)."""
    return dataset_bucket_sides(resolution or cfg.resolution, cfg.bucket_step, cfg.min_bucket, cfg.max_bucket)


def bucketer_for(cfg, resolution: int | None = None, root: Path | None = None) -> Bucketer:
    resolution = resolution or cfg.resolution  # a [[datasets]] entry with its own resolution scales its sides
    low, high = bucket_sides(cfg, resolution)
    return Bucketer(BucketConfig(dir=root or cfg.dataset, resolution=resolution, min=low, max=high,
                                 step=cfg.bucket_step, no_upscale=cfg.no_upscale))


def sources(cfg) -> list[dict]:
    """The dataset folders of a run: ``--dataset`` and the ``[[datasets]]`` entries."""
    out = [{"dir": Path(cfg.dataset)}] if cfg.dataset else []
    return out + [dict(e) for e in cfg.datasets]


def _collect_source(source: dict, cfg, samples: list, skipped: list) -> None:
    from adapterhub.train.control import is_sidecar

    root = Path(source["dir"])
    if root.suffix.lower() == ".json" and not root.is_dir():
        return _collect_metadata(source, cfg, samples, skipped)
    if not root.is_dir():
        raise AdapterhubError(f"{root}: no such dataset folder")
    caption_ext = source.get("caption_ext") or cfg.caption_ext
    default = source.get("class_tokens") or cfg.caption_default
    ds = scan(root, caption_ext)
    items = [i for i in ds.items if not is_sidecar(i.path, cfg.cond_suffix)]
    if not items:
        raise AdapterhubError(f"{root}: empty dataset: no images found ({', '.join(sorted(IMAGE_EXTS))})")
    bucketer = bucketer_for(cfg, source.get("resolution"), root)
    uncaptioned = []
    for item in items:
        folder = Path(item.subset.rel).name if item.subset.rel else root.resolve().name
        repeats = item.subset.repeats or source.get("repeats") or 1
        sample = Sample(item.path, item.rel, folder, repeats, item.subset.class_tokens or source.get("class_tokens"),
                        item.caption().first_line, (0, 0))
        if not _place(sample, bucketer, skipped):
            continue
        if not sample.caption:
            if default is None:
                uncaptioned.append(item.rel)
                continue
            sample.caption = default
        samples.append(sample)
    if uncaptioned:
        raise AdapterhubError(f"{root}: {len(uncaptioned)} of {len(items)} images have no caption (first: "
                              f"{uncaptioned[0]}); write {caption_ext} files (adapterhub dataset caption) or "
                              f"pass --caption-default TEXT")


def _collect_metadata(source: dict, cfg, samples: list, skipped: list) -> None:
    """The samples of a kohya fine-tuning metadata JSON: every key resolved to its image and every
    caption present (else ``caption_default``) before the first image header is read."""
    from adapterhub.dataset.kohya_json import read_training_metadata

    path = Path(source["dir"])
    image_dir = Path(getattr(cfg, "train_data_dir", None) or path.parent)
    entries = read_training_metadata(path, image_dir)
    default = source.get("class_tokens") or cfg.caption_default
    uncaptioned = [key for key, _, caption in entries if not caption and default is None]
    if uncaptioned:
        raise AdapterhubError(f"{path}: {len(uncaptioned)} of {len(entries)} entries have no caption or tags "
                              f"(first: {uncaptioned[0]!r}); pass --caption-default TEXT")
    bucketer = bucketer_for(cfg, source.get("resolution"), image_dir)
    for _, image, caption in entries:
        rel = image.relative_to(image_dir).as_posix() if image.is_relative_to(image_dir) else str(image)
        sample = Sample(image, rel, path.name, source.get("repeats") or 1, source.get("class_tokens"),
                        caption or default, (0, 0))
        if _place(sample, bucketer, skipped):
            samples.append(sample)


def _place(sample: Sample, bucketer: Bucketer, skipped: list) -> bool:
    """Size ``sample`` from its image header and place it in its bucket; False (and the image listed in
    ``skipped``) when the image cannot be read."""
    try:
        sample.size = image_size(sample.path)
    except ImageReadError as exc:
        skipped.append({"file": sample.rel, "problem": str(exc)})
        return False
    placement = bucketer.place(*sample.size)
    sample.bucket, sample.resized, sample.crop = placement.bucket, placement.resized, placement.crop_ltrb
    return True


def collect(cfg) -> Data:
    """Scan, caption-check and bucket the dataset folders (image headers only; nothing is decoded yet)."""
    samples, skipped = [], []
    for source in sources(cfg):
        _collect_source(source, cfg, samples, skipped)
    root = Path(sources(cfg)[0]["dir"])
    if not samples:
        raise AdapterhubError(f"{root}: no readable image ({len(skipped)} unreadable, first: {skipped[0]['file']}: "
                              f"{skipped[0]['problem']})")
    data = Data(root, samples, skipped, bucket_sides=bucket_sides(cfg))
    split_validation(data, cfg.validation_split, cfg.seed or 0)
    return data


def add_class_images(data: Data, cfg, class_dir: Path) -> int:
    """DreamBooth prior preservation: the class images join the samples with the class prompt as their
    caption and ``prior_loss_weight`` as their loss weight, repeated so that an epoch sees about as
    many class images as training images (kohya's balancing). Returns how many were added."""
    ds = scan(class_dir, cfg.caption_ext)
    paths = sorted(i.path for i in ds.items)[: cfg.num_class_images]
    if not paths:
        raise AdapterhubError(f"{class_dir}: no class images")
    bucketer = bucketer_for(cfg, None, class_dir)
    train_total = sum(s.repeats for s in data.samples)
    repeats = max(1, round(train_total / len(paths)))
    added = 0
    for path in paths:
        try:
            size = image_size(path)
        except ImageReadError as exc:
            data.skipped.append({"file": str(path), "problem": str(exc)})
            continue
        placement = bucketer.place(*size)
        data.samples.append(Sample(path, f"class/{path.name}", class_dir.name, repeats, None, cfg.class_prompt, size,
                                   placement.bucket, placement.resized, placement.crop_ltrb,
                                   loss_weight=float(cfg.prior_loss_weight), is_reg=True))
        added += 1
    return added


def split_validation(data: Data, fraction: float, seed: int) -> None:
    if fraction <= 0:
        return
    n = max(1, round(len(data.samples) * fraction))
    if n >= len(data.samples):
        raise AdapterhubError(f"--validation-split {fraction} leaves no training image ({len(data.samples)} images)")
    order = list(range(len(data.samples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n])
    data.validation = [s for i, s in enumerate(data.samples) if i in held]
    data.samples = [s for i, s in enumerate(data.samples) if i not in held]


# --------------------------------------------------------------------------------------------
# latents
# --------------------------------------------------------------------------------------------
def module_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over a module's config and every tensor's bytes (the VAE's identity for the cache)."""
    h = hashlib.sha256()
    config = getattr(module, "config", None)
    h.update(json.dumps(dict(config) if config is not None else {}, sort_keys=True, default=str).encode())
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def latent_path(cache: Path, sample: Sample, image_sha: str, vae_fp: str) -> Path:
    key = hashlib.sha256(json.dumps([LATENT_FORMAT, image_sha, sample.bucket, sample.resized, sample.crop, vae_fp])
                         .encode()).hexdigest()
    return cache / vae_fp[:16] / key[:2] / f"{key}.safetensors"


def pixels(sample: Sample) -> torch.Tensor:
    """The bucket-sized crop as a (3, h, w) float tensor in [-1, 1] (kohya's resize then centre crop)."""
    import numpy as np
    from PIL import Image

    im = load_rgb(sample.path)
    if im.size != sample.resized:
        im = im.resize(sample.resized, Image.LANCZOS)
    im = im.crop(sample.crop)
    array = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def cache_latents(data: Data, vae, cache: Path, device, on_progress=None, batch: int = 4) -> dict:
    """Give every sample its latent file, encoding those not cached yet; undecodable images are moved to
    ``data.skipped``. Returns {"cached": n found, "encoded": n computed}."""
    from safetensors.torch import save_file

    vae_fp = module_fingerprint(vae)
    todo: dict[tuple, list[Sample]] = defaultdict(list)
    found = 0
    everyone = data.samples + data.validation
    for sample in everyone:
        try:
            sha = sha256_file(sample.path)
        except OSError as exc:
            data.skipped.append({"file": sample.rel, "problem": str(exc)})
            continue
        sample.latent_file = latent_path(cache, sample, sha, vae_fp)
        if sample.latent_file.is_file():
            found += 1
        else:
            todo[sample.bucket].append(sample)
    encoded, bad = 0, set()
    total = sum(len(v) for v in todo.values())
    for bucket in sorted(todo):
        group = todo[bucket]
        for start in range(0, len(group), batch):
            chunk, images = [], []
            for sample in group[start:start + batch]:
                try:
                    images.append(pixels(sample))
                    chunk.append(sample)
                except ImageReadError as exc:
                    data.skipped.append({"file": sample.rel, "problem": str(exc)})
                    bad.add(id(sample))
            if chunk:
                with torch.no_grad():
                    dist = vae.encode(torch.stack(images).to(device, vae.dtype)).latent_dist
                for i, sample in enumerate(chunk):
                    tensors = {"mean": dist.mean[i].float().cpu().contiguous(),
                               "std": dist.std[i].float().cpu().contiguous()}
                    sample.latent_file.parent.mkdir(parents=True, exist_ok=True)
                    with atomic_path(sample.latent_file, suffix=".safetensors") as tmp:
                        save_file(tensors, str(tmp), metadata={"format": LATENT_FORMAT, "image": sample.rel})
                encoded += len(chunk)
            if on_progress:
                on_progress(len(group[start:start + batch]), total)
    if bad or any(s.latent_file is None for s in everyone):
        data.samples = [s for s in data.samples if id(s) not in bad and s.latent_file is not None]
        data.validation = [s for s in data.validation if id(s) not in bad and s.latent_file is not None]
        if not data.samples:
            raise AdapterhubError(f"{data.root}: no readable image (first failure: {data.skipped[0]['file']}: "
                                  f"{data.skipped[0]['problem']})")
    return {"cached": found, "encoded": encoded}


def load_latents(samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors.torch import load_file

    loaded = [load_file(str(s.latent_file)) for s in samples]
    return torch.stack([t["mean"] for t in loaded]), torch.stack([t["std"] for t in loaded])


# --------------------------------------------------------------------------------------------
# batches
# --------------------------------------------------------------------------------------------
def epoch_batches(samples: list[Sample], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch: every sample ``repeats`` times, grouped by bucket, shuffled, in batches of one bucket;
    a function of (seed, epoch) only."""
    rng = random.Random(seed * 1_000_003 + epoch)
    by_bucket: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        by_bucket[s.bucket].extend([i] * s.repeats)
    batches = []
    for bucket in sorted(by_bucket):
        members = by_bucket[bucket]
        rng.shuffle(members)
        batches.extend(members[j:j + batch_size] for j in range(0, len(members), batch_size))
    rng.shuffle(batches)
    return batches


def batches_per_epoch(samples: list[Sample], batch_size: int) -> int:
    counts = Counter()
    for s in samples:
        counts[s.bucket] += s.repeats
    return sum(math.ceil(n / batch_size) for n in counts.values())


# --------------------------------------------------------------------------------------------
# captions at use time (kohya's shuffle_caption / keep_tokens / tag and caption dropout)
# --------------------------------------------------------------------------------------------
def process_caption(caption: str, cfg, rng: random.Random) -> str:
    if cfg.caption_dropout and rng.random() < cfg.caption_dropout:
        return ""
    if not (cfg.shuffle_tags or cfg.tag_dropout):
        return caption
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    head, tail = tags[:cfg.keep_tokens], tags[cfg.keep_tokens:]
    if cfg.shuffle_tags:
        rng.shuffle(tail)
    if cfg.tag_dropout:
        tail = [t for t in tail if rng.random() >= cfg.tag_dropout]
    return ", ".join(head + tail)


def captions_vary(cfg) -> bool:
    return bool(cfg.shuffle_tags or cfg.tag_dropout or cfg.caption_dropout)


# --------------------------------------------------------------------------------------------
# dataset facts for the metadata
# --------------------------------------------------------------------------------------------
def tag_frequency(samples: list[Sample]) -> dict[str, dict[str, int]]:
    """kohya ``ss_tag_frequency``: {folder: {tag (lower-cased): images}}."""
    out: dict[str, dict[str, int]] = {}
    for s in samples:
        freq = out.setdefault(s.folder, {})
        for tag in s.caption.split(","):
            tag = tag.strip().lower()
            if tag:
                freq[tag] = freq.get(tag, 0) + 1
    return out


def dataset_dirs(samples: list[Sample]) -> dict[str, dict[str, int]]:
    """kohya ``ss_dataset_dirs``: {folder: {"n_repeats", "img_count"}}."""
    out: dict[str, dict[str, int]] = {}
    for s in samples:
        entry = out.setdefault(s.folder, {"n_repeats": s.repeats, "img_count": 0})
        entry["img_count"] += 1
    return out


def bucket_info(samples: list[Sample]) -> dict:
    """kohya ``ss_bucket_info``: {"buckets": {i: {"resolution": [w, h], "count": images x repeats}},
    "mean_img_ar_error"}."""
    counts = Counter()
    for s in samples:
        counts[s.bucket] += s.repeats
    errors = [abs(s.bucket[0] / s.bucket[1] - s.size[0] / s.size[1]) for s in samples]
    return {"buckets": {i: {"resolution": list(reso), "count": counts[reso]} for i, reso in enumerate(sorted(counts))},
            "mean_img_ar_error": sum(errors) / len(errors) if errors else 0.0}
