"""Full fine-tuning (``--type full``): the whole UNet trains and the output is a checkpoint.

* fixed batch: the loss falls clearly; the VAE and the text encoder are bit for bit the base's, the UNet moved;
* outputs, read back by diffusers as the oracle: the diffusers folder with ``StableDiffusionPipeline.
  from_pretrained``, the original-layout single file with ``from_single_file`` (the tiny base's folder as
  config); both hold exactly the trained UNet; ``--save-precision fp16`` writes half tensors; the single
  file's metadata names a checkpoint (ModelSpec architecture of the base, no ``ss_network_*``);
* SDXL with ``--train-text-encoder``: both encoders train at ``--text-encoder-lr``, the sgm file loads back;
* resume: 6 steps == 3 steps, Ctrl-C, resume, 3 more;
* the plugin contract: ``plugins`` lists a type that recognises no file, ``inspect`` is unchanged,
  a single-file suffix other than .safetensors is refused before training.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import SMALL, fixed_batch_run, make_dataset

from adapterhub.base import load_base, tiny_base_folder
from adapterhub.cli import main
from adapterhub.io import read_safetensors_header
from adapterhub.train import TrainConfig, TrainingInterrupted, resolve, train


@pytest.fixture(scope="module")
def one_image(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("one"), names=("cat",), folder="1_cat")


@pytest.fixture(scope="module")
def trained(one_image, tmp_path_factory):
    """30 fixed-batch steps of full fine-tuning on tiny-sd1 (lr 1e-3), and the losses."""
    out = tmp_path_factory.mktemp("full") / "full.safetensors"
    return fixed_batch_run("full", one_image, out, steps=30, lr=1e-3, weight_decay=0.0)


def state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in module.state_dict().items()}


def assert_equal_states(got: dict, want: dict, atol: float = 0.0) -> None:
    assert got.keys() == want.keys(), sorted(got.keys() ^ want.keys())[:5]
    worst = max((got[k].float().cpu() - want[k].float().cpu()).abs().max().item() for k in want)
    assert worst <= atol, worst


def test_loss_falls_only_the_unet_moves(trained, tiny_sd1):
    trainer, losses = trained
    assert losses[-1] < 0.1 * losses[0], losses
    groups = trainer.trainable.param_groups
    assert [g["name"] for g in groups] == ["unet"] and not trainer.trainable.trains_text
    assert sum(p.numel() for p in groups[0]["params"]) == sum(p.numel() for p in tiny_sd1.unet.parameters())
    assert trainer.optimizer.param_groups[0]["lr"] == 1e-3
    for name in ("vae", "text_encoder"):
        ours, base = state(getattr(trainer.pipe, name)), state(getattr(tiny_sd1, name))
        changed = [k for k in base if not torch.equal(ours[k], base[k])]
        assert not changed, (name, changed[:5])
    ours, base = state(trainer.pipe.unet), state(tiny_sd1.unet)
    changed = [k for k in base if not torch.equal(ours[k], base[k])]
    assert len(changed) > 0.9 * len(base), (len(changed), len(base))
    assert "conv_in.weight" in changed and "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight" in changed


def test_diffusers_folder_loads_with_the_trained_unet(trained, tmp_path):
    from diffusers import StableDiffusionPipeline

    trainer, _ = trained
    out = trainer.write_adapter(tmp_path / "model")
    assert (out / "model_index.json").is_file() and not list(tmp_path.glob(".*")), "partial files left"
    pipe = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    assert_equal_states(state(pipe.unet), state(trainer.pipe.unet))
    assert_equal_states(state(pipe.vae), state(trainer.pipe.vae))
    assert_equal_states(state(pipe.text_encoder), state(trainer.pipe.text_encoder))


def test_single_file_loads_with_from_single_file(trained, tmp_path):
    from diffusers import StableDiffusionPipeline

    trainer, _ = trained
    out = trainer.write_adapter(tmp_path / "model.safetensors")
    pipe = StableDiffusionPipeline.from_single_file(str(out), config=str(tiny_base_folder("tiny-sd1")),
                                                    local_files_only=True)
    assert_equal_states(state(pipe.unet), state(trainer.pipe.unet))
    assert_equal_states(state(pipe.vae), state(trainer.pipe.vae))
    assert_equal_states(state(pipe.text_encoder), state(trainer.pipe.text_encoder))
    ours = load_base(str(out))  # what --base model.safetensors gives the next run or the sampler
    assert_equal_states(state(ours.unet), state(trainer.pipe.unet))

    header, meta, _ = read_safetensors_header(out)
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in header)
    assert {entry["dtype"] for entry in header.values()} == {"F32"}
    assert meta["adapterhub.base"] == "tiny-sd1"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"  # a checkpoint, not ".../lora"
    assert not [k for k in meta if k.startswith("ss_network")]
    assert meta["ss_steps"] == "30" and meta["ss_learning_rate"] == "0.001"
    raw = out.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + n:]).hexdigest()


def test_save_precision_fp16_writes_half_tensors(trained, tmp_path):
    trainer, _ = trained
    trainer.cfg = dataclasses.replace(trainer.cfg, save_precision="fp16")
    try:
        single = trainer.write_adapter(tmp_path / "half.safetensors")
        folder = trainer.write_adapter(tmp_path / "half")
    finally:
        trainer.cfg = dataclasses.replace(trainer.cfg, save_precision="fp32")
    header, _, _ = read_safetensors_header(single)
    assert {entry["dtype"] for entry in header.values()} == {"F16"}
    full = trainer.write_adapter(tmp_path / "full.safetensors")
    assert single.stat().st_size < 0.55 * full.stat().st_size
    want = {k: v.half() for k, v in load_file(str(full)).items()}
    assert_equal_states(load_file(str(single)), want)
    for weights in folder.rglob("*.safetensors"):
        header, _, _ = read_safetensors_header(weights)
        assert {entry["dtype"] for entry in header.values()} <= {"F16", "I64"}, weights
    assert trainer.pipe.unet.dtype == torch.float32  # only the file is cast


def test_sdxl_text_encoders_train_and_the_sgm_file_loads_back(one_image, tiny_sdxl, tmp_path):
    out = tmp_path / "xl.safetensors"
    trainer, _ = fixed_batch_run("full", one_image, out, steps=2, lr=1e-3, train_text_encoder=True,
                                 text_encoder_lr=5e-4, base="tiny-sdxl")
    groups = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert groups == {"unet": 1e-3, "text_encoder": 5e-4, "text_encoder_2": 5e-4}
    assert trainer.trainable.trains_text and not trainer.conditioner.cache
    for name in ("unet", "text_encoder", "text_encoder_2"):
        ours, base = state(getattr(trainer.pipe, name)), state(getattr(tiny_sdxl, name))
        assert any(not torch.equal(ours[k], base[k]) for k in base), name
    assert_equal_states(state(trainer.pipe.vae), state(tiny_sdxl.vae))

    trainer.write_adapter(out)
    _, meta, _ = read_safetensors_header(out)
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    again = load_base(str(out))
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert_equal_states(state(getattr(again, name)), state(getattr(trainer.pipe, name)))


RUN = dict(type="full", max_steps=6, batch_size=2, lr=1e-4, lr_scheduler="cosine", lr_warmup_steps=2,
           gradient_accumulation=2, ema_decay=0.9, noise_offset=0.05, **SMALL)


def test_six_steps_equal_three_interrupt_resume_three(tmp_path):
    dataset = make_dataset(tmp_path / "data", names=("cat", "rocket"))
    whole = tmp_path / "a" / "whole"
    assert train(TrainConfig(dataset=dataset, out=whole, **RUN))["steps"] == 6

    def interrupt_at_3(kind, **data):
        if kind == "step" and data["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends

    split = tmp_path / "b" / "split"
    with pytest.raises(TrainingInterrupted):
        train(TrainConfig(dataset=dataset, out=split, **RUN), on_event=interrupt_at_3)
    assert not split.exists() and (split.parent / "split-step000003" / "model_index.json").is_file()
    assert train(resolve(overrides={"resume": split.with_name("split-step000003-state")}))["steps"] == 6

    weights = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(str(whole / weights)), load_file(str(split / weights))
    assert_equal_states(b, a, atol=1e-6)
    base = load_file(str(tiny_base_folder("tiny-sd1") / weights))
    assert any(not torch.equal(a[k], base[k]) for k in base)


# --------------------------------------------------------------------------------------------
# the plugin contract and the CLI
# --------------------------------------------------------------------------------------------
def test_plugins_lists_full_and_inspect_is_unchanged(trained, tmp_path, capsys):
    assert main(["plugins", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["full"]["capabilities"] == ["train"] and rows["full"]["formats"] == []
    assert rows["full"]["builtin"] and rows["full"]["module"] == "adapterhub_plugins.full"

    from adapterhub.plugins import adapter_type

    lora = adapter_type("lora").example(trained[0].pipe, tmp_path / "small.safetensors", seed=0, rank=2)
    assert main(["inspect", str(lora), "--json", "--no-hash"]) == 0
    assert json.loads(capsys.readouterr().out)["type"] == "lora"
    checkpoint = trained[0].write_adapter(tmp_path / "model.safetensors")
    assert main(["inspect", str(checkpoint), "--no-hash"]) == 2
    assert "not a recognised adapter file" in capsys.readouterr().err


def test_other_single_file_suffix_is_refused_before_training(one_image, tmp_path, capsys):
    out = tmp_path / "model.ckpt"
    rc = main(["train", "--type", "full", "--base", "tiny-sd1", "--dataset", str(one_image), "--out", str(out),
               "--resolution", "64", "--bucket-step", "32", "--max-steps", "2"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip().splitlines()[-1].startswith(f"error: --out {out}: full fine-tuning writes")
    left = sorted(p.name for p in tmp_path.iterdir())  # the loop's own NAME-logs/ may exist; no model output
    assert not out.exists() and not [n for n in left if n.startswith((".", "model."))], left
