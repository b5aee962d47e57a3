"""DreamBooth prior preservation: class images, generated with the base model when missing.

``--class-prompt "a photo of a dog"`` keeps the model's idea of the class while it learns the
instance: class images (``--class-dir``, default ``class_images/`` beside OUT) are trained together
with the instance images, captioned with the class prompt and weighted by ``--prior-loss-weight``
(kohya's regularisation images; the diffusers DreamBooth script's prior loss). When the folder holds
fewer than ``--num-class-images`` images, the missing ones are generated first with the base model
through the sampling code (:class:`adapterhub.sample.Generator`, eager, the run's seed), written with
their generation parameters in the PNG, and kept for the next run.
"""
from __future__ import annotations

import gc
from pathlib import Path

from adapterhub.dataset.folder import IMAGE_EXTS
from adapterhub.errors import AdapterhubError
from adapterhub.io import atomic_path

CLASS_BATCH = 4


def class_folder(cfg) -> Path:
    return Path(cfg.class_dir) if cfg.class_dir else Path(cfg.out).parent / "class_images"


def existing(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))


def ensure_class_images(cfg, folder: Path, emit=lambda kind, **data: None) -> list[Path]:
    """Fill ``folder`` up to ``cfg.num_class_images`` images of ``cfg.class_prompt``; returns the new files."""
    have = existing(folder)
    missing = cfg.num_class_images - len(have)
    if missing <= 0:
        return []
    from adapterhub.sample import Generator, Request

    if folder.exists() and not folder.is_dir():
        raise AdapterhubError(f"{folder}: --class-dir is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    side = max(64, cfg.resolution // 8 * 8)
    device = None if cfg.device == "auto" else cfg.device
    generator = Generator(cfg.base, backend="eager", device=device, hash_model=False)
    written = []
    try:
        start = len(have)
        for first in range(0, missing, CLASS_BATCH):
            count = min(CLASS_BATCH, missing - first)
            seed = int(cfg.seed or 0) + start + first
            result = generator.generate(Request(cfg.class_prompt, seed=seed, steps=cfg.class_steps, width=side,
                                                height=side, images=count, batch=count, sampler="DPM++ 2M"))
            for i, image in enumerate(result.images):
                path = folder / f"class-{start + first + i:05d}-{result.seeds[i]}.png"
                with atomic_path(path, suffix=".png") as tmp:
                    image.save(tmp, format="PNG", pnginfo=result.pnginfo(i))
                written.append(path)
            emit("class_images_generated", n=len(written), total=missing)
    finally:
        generator.close()
        del generator
        gc.collect()
    return written
