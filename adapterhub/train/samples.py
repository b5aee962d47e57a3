"""Validation images during training (``--sample-every N``).

Every N optimiser steps (and at the end) the model as it is being trained (its EMA weights when
``--ema-decay`` is on) renders each ``--sample-prompt`` (default: the first training caption) with a
fixed seed, so the images of successive steps are comparable; the files go to ``NAME-samples/``
beside the output as ``stepNNNNNN-K.png``, with the generation parameters in the PNG. Prompts pass
through the trainable's caption hook (a textual inversion's token is inserted as in training).
Conditioning types (ControlNet, T2I-Adapter) render with the first training image's conditioning,
attached through the trainable's ``sampling(pipe, image)`` context manager.
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from adapterhub.io import atomic_path


def samples_dir(out: Path) -> Path:
    out = Path(out)
    return out.with_name(out.stem + "-samples")


def prompts(trainer) -> list[str]:
    cfg = trainer.cfg
    if cfg.sample_prompt:
        return list(cfg.sample_prompt)
    first = next((s for s in trainer.data.samples if not s.is_reg), trainer.data.samples[0])
    return [first.caption]


@torch.no_grad()
def write_samples(trainer, step: int) -> list[Path]:
    from adapterhub.sample import Generator, Request

    cfg, pipe, trainable = trainer.cfg, trainer.pipe, trainer.trainable
    folder = samples_dir(cfg.out)
    folder.mkdir(parents=True, exist_ok=True)
    side = max(64, cfg.resolution // 8 * 8)
    training = [m for m in [pipe.unet, *trainable.modules] if m.training]
    for module in training:
        module.eval()
    context = nullcontext()
    if trainable.conditioning and hasattr(trainable, "sampling"):
        from adapterhub.train.control import condition_image

        first = next(s for s in trainer.data.samples if not s.is_reg)
        context = trainable.sampling(pipe, condition_image(first, cfg).resize((side, side)))
    written = []
    try:
        with context:
            generator = Generator(pipe, backend="eager", hash_model=False, model_name=cfg.output_name)
            for k, prompt in enumerate(prompts(trainer)):
                result = generator.generate(Request(trainable.caption(prompt), seed=int(cfg.seed), width=side,
                                                    height=side, steps=cfg.sample_steps, sampler=cfg.sample_sampler))
                path = folder / f"step{step:06d}-{k}.png"
                with atomic_path(path, suffix=".png") as tmp:
                    result.images[0].save(tmp, format="PNG", pnginfo=result.pnginfo(0))
                written.append(path)
    finally:
        for module in training:
            module.train()
    return written
