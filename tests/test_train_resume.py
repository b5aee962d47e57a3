"""Checkpoints and resume: 6 uninterrupted steps == 3 steps, Ctrl-C, resume, 3 more (CPU, within 1e-6).

The run exercises every piece of state a resume must restore: optimizer moments, a warm-up + cosine
schedule, the noise generator (noise offset, timesteps, latent samples), the caption generator (tag
shuffle, tag and caption dropout), gradient accumulation across batches, EMA weights, the data
position, and a held-out validation image.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from safetensors.torch import load_file

from adapterhub.train import TrainConfig, TrainingInterrupted, resolve, train

from test_train import SMALL, make_dataset

RUN = dict(type="locon", max_steps=6, batch_size=2, rank=2, alpha=1, conv_rank=2, lr=1e-3,
           lr_scheduler="cosine", lr_warmup_steps=2, gradient_accumulation=2, shuffle_tags=True, keep_tokens=1,
           tag_dropout=0.2, caption_dropout=0.2, noise_offset=0.05, min_snr_gamma=5.0, ema_decay=0.9,
           validation_split=0.25, **SMALL)


def _losses(csv: Path) -> list[str]:
    return [line.split(",")[1] for line in csv.read_text().splitlines()[1:]]


def test_six_steps_equal_three_interrupt_resume_three(tmp_path):
    dataset = make_dataset(tmp_path / "data")
    whole = tmp_path / "a" / "whole.safetensors"
    result = train(TrainConfig(dataset=dataset, out=whole, save_every=2, keep_last=1, **RUN))
    assert result["steps"] == 6 and result["validation_loss"] is not None
    kept = sorted(p.name for p in whole.parent.iterdir() if "-step" in p.name)
    assert kept == ["whole-step000004-state", "whole-step000004.safetensors"], kept  # keep_last 1

    starts = []

    def interrupt_at_3(kind, **data):
        if kind == "start":
            starts.append(data)
        if kind == "step" and data["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends

    split = tmp_path / "b" / "split.safetensors"
    with pytest.raises(TrainingInterrupted) as info:
        train(TrainConfig(dataset=dataset, out=split, **RUN), on_event=interrupt_at_3)
    state_dir = split.with_name("split-step000003-state")
    assert str(state_dir) in str(info.value) and info.value.exit_code == 130
    # the second run found every latent on disk; shuffled captions are encoded per batch, not cached
    assert starts[0]["latents"] == {"cached": 4, "encoded": 0} and starts[0]["text_cached"] is False
    assert starts[0]["validation"] == 1 and starts[0]["with_repeats"] == 15
    assert not split.exists(), "an interrupted run must not write the final output"
    assert split.with_name("split-step000003.safetensors").is_file()
    assert not [p for p in split.parent.iterdir() if p.name.startswith(".")], "temporary files left behind"

    with pytest.raises(Exception, match="cannot change: rank"):
        resolve(overrides={"resume": state_dir, "rank": 8})
    with pytest.raises(Exception, match="cannot change: base"):  # a base of another architecture
        resolve(overrides={"resume": state_dir, "base": "tiny-sdxl"})
    cfg = resolve(overrides={"resume": state_dir})
    assert cfg.out == split and cfg.seed == 0 and cfg.rank == 2
    resumed = train(cfg)
    assert resumed["steps"] == 6

    a, b = load_file(str(whole)), load_file(str(split))
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, worst
    assert any(a[k].abs().max() > 0 for k in a if k.endswith("lora_up.weight"))
    assert _losses(whole.with_name("whole.loss.csv")) == _losses(split.with_name("split.loss.csv"))
