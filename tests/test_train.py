"""Training: the one loop over every trainable type, on the tiny bases, CPU, float32.

* fixed batch: the loss falls clearly and every frozen parameter is bit for bit the base's;
* outputs: LoRA / LoCon load with diffusers ``load_lora_weights`` and fuse to our merge (1e-5), and
  our merge equals the trained PEFT layers' own ``W + ΔW``; LoHa loads in LyCORIS (kohya network
  loader) and its merge equals ours; kohya ``ss_*`` metadata, ModelSpec and ``sshs_*`` hashes;
* textual inversion (only the new rows move; diffusers ``load_textual_inversion`` reads the file) and
  hypernetwork (A1111 schedule string; the .pt loads and attaches);
* SDXL with text-encoder LoRA.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

import adapterhub
from adapterhub.train import TrainConfig, train
from adapterhub.train.loop import Trainer

from lora_helpers import assert_same_weights, diffusers_fused, ours_merged, parts, quiet, snapshot, weights

quiet()
DEMO = Path(__file__).resolve().parents[1] / "datasets" / "demo" / "10_demo subject"
SMALL = dict(base="tiny-sd1", resolution=64, bucket_step=32, seed=0)


def make_dataset(root: Path, names=("cat", "coffee", "rocket", "retina"), folder="5_demo subject") -> Path:
    sub = root / folder
    sub.mkdir(parents=True, exist_ok=True)
    for name in names:
        for suffix in (".jpg", ".txt"):
            shutil.copy(DEMO / f"{name}{suffix}", sub / f"{name}{suffix}")
    return root


@pytest.fixture(scope="module")
def one_image(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("one"), names=("cat",), folder="1_cat")


@pytest.fixture(scope="module")
def four_images(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("four"))


def fixed_batch_run(kind: str, dataset: Path, out: Path, steps: int = 25, **options) -> tuple[Trainer, list[float]]:
    """Steps of the real loop on one image with the same noise and timestep every step."""
    cfg = TrainConfig(type=kind, dataset=dataset, out=out, max_steps=steps,
                      **{**SMALL, "lr": 1e-2, "rank": 4, "alpha": 4, **options})
    trainer = Trainer(cfg)
    trainer.setup()
    trainer.pipe.unet.train()
    losses = []
    for _ in range(steps):
        trainer.noise.manual_seed(0)
        losses.append(trainer.step()[0])
    return trainer, losses


def base_parameters(pipe) -> dict[str, torch.Tensor]:
    """Every base parameter, under its name in the plain model (PEFT's ``base_layer`` folded back)."""
    out = {}
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, comp, None)
        if module is None:
            continue
        for name, p in module.named_parameters():
            if "lora_" in name or "hada_" in name:
                continue
            out[f"{comp}.{name.replace('.base_layer', '')}"] = p.detach()
    return out


def header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return n, json.loads(f.read(n))


# --------------------------------------------------------------------------------------------
# LoRA / LoCon / LoHa
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lora", "locon", "loha"])
def test_fixed_batch_loss_falls_base_untouched_and_output_loads(kind, one_image, tiny_sd1, tmp_path):
    trainer, losses = fixed_batch_run(kind, one_image, tmp_path / f"{kind}.safetensors",
                                      conv_rank=2, conv_alpha=2)
    assert losses[-1] < 0.4 * losses[0], losses
    ours, base = base_parameters(trainer.pipe), base_parameters(tiny_sd1)
    assert ours.keys() == base.keys()
    changed = [k for k in base if not torch.equal(ours[k], base[k])]
    assert not changed, changed[:5]

    path = trainer.write_adapter(trainer.cfg.out)
    adapter = adapterhub.load(path)
    expected_format = "lycoris" if kind == "loha" else "kohya"
    assert (adapter.type, adapter.format, adapter.base) == (kind, expected_format, "tiny-sd1")
    assert len(adapter.patches) == len(trainer.trainable.layers)
    _, head = header(path)
    keys = [k for k in head if k != "__metadata__"]
    assert all(k.startswith("lora_unet_") for k in keys)
    if kind == "loha":
        assert any(k.endswith(".hada_w2_b") for k in keys)
    else:
        assert any(k.endswith(".lora_down.weight") for k in keys) and any(k.endswith(".alpha") for k in keys)
    if kind != "lora":
        assert "lora_unet_down_blocks_0_resnets_0_conv1.alpha" in keys

    # our merge == the trained PEFT layers' own ΔW (the file holds what was trained, scale included)
    fresh = parts("tiny-sd1")
    original = snapshot(fresh)
    adapterhub.load(path).merge_into(fresh, 1.0)
    worst = 0.0
    for target, layer in trainer.trainable.layers.items():
        key = f"{target}.weight"
        got = fresh.unet.get_submodule(target.split(".", 1)[1]).weight - original[key]
        worst = max(worst, (got - layer.get_delta_weight("default")).abs().max().item())
    assert worst < 1e-6, worst

    if kind in ("lora", "locon"):
        assert_same_weights(ours_merged("tiny-sd1", [(path, 0.8)]), diffusers_fused("tiny-sd1", [(path, 0.8)]),
                            weights(parts("tiny-sd1")))
    else:
        lycoris_matches(path)


def lycoris_matches(path: Path) -> None:
    """LyCORIS' kohya network loader builds every module of the file and its merge equals ours.

    lycoris-lora 4.1.3's default targets list the class TimestepEmbedding (for Anima) beside the names
    time_embedding.linear_1/2, so building its network on an SD UNet asserts "duplicated lora name"
    before the file's modules are loaded; the class is left out of the defaults while loading."""
    from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights

    model = parts("tiny-sd1")
    original = snapshot(model)
    targets = LycorisNetworkKohya.UNET_TARGET_REPLACE_MODULE
    LycorisNetworkKohya.UNET_TARGET_REPLACE_MODULE = [t for t in targets if t != "TimestepEmbedding"]
    try:
        net, sd = create_network_from_weights(1.0, str(path), None, None, model.unet)
    finally:
        LycorisNetworkKohya.UNET_TARGET_REPLACE_MODULE = targets
    assert len(net.unet_loras) == len(adapterhub.load(path).patches)
    net.merge_to(None, model.unet, sd, torch.float32, "cpu")
    assert_same_weights(ours_merged("tiny-sd1", [(path, 1.0)]), weights(model), original)


def test_metadata_kohya_keys_modelspec_and_sshs_hashes(four_images, tmp_path):
    out = tmp_path / "meta.safetensors"
    result = train(TrainConfig(type="locon", dataset=four_images, out=out, max_steps=2, batch_size=2, rank=4,
                               alpha=2, conv_rank=2, conv_alpha=1, comment="unit test", **SMALL))
    assert result["steps"] == 2 and Path(result["out"]) == out
    n, head = header(out)
    meta = head["__metadata__"]
    expected = {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "2.0",
                "ss_steps": "2", "ss_max_train_steps": "2", "ss_resolution": "(64, 64)", "ss_v2": "False",
                "ss_base_model_version": "sd_v1", "ss_num_train_images": "20", "ss_batch_size_per_device": "2",
                "ss_sd_model_name": "tiny-sd1", "ss_seed": "0", "ss_training_comment": "unit test",
                "ss_learning_rate": "0.0001", "ss_output_name": "meta", "ss_cache_latents": "True",
                "modelspec.architecture": "stable-diffusion-v1/lora", "modelspec.sai_model_spec": "1.0.1",
                "modelspec.resolution": "64x64", "modelspec.trigger_phrase": "demo subject",
                "modelspec.title": "meta", "modelspec.prediction_type": "epsilon"}
    assert {k: meta.get(k) for k in expected} == expected
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0"}
    assert json.loads(meta["ss_dataset_dirs"]) == {"5_demo subject": {"n_repeats": 5, "img_count": 4}}
    tags = json.loads(meta["ss_tag_frequency"])["5_demo subject"]
    assert tags["photograph"] == 3 and tags["cat"] == 1 and tags["orange"] == 1
    buckets = json.loads(meta["ss_bucket_info"])
    assert sum(b["count"] for b in buckets["buckets"].values()) == 20
    for key in ("ss_session_id", "ss_training_started_at", "ss_training_finished_at", "ss_num_batches_per_epoch",
                "ss_optimizer", "ss_lr_scheduler", "ss_min_bucket_reso", "ss_max_bucket_reso", "modelspec.date"):
        assert key in meta, key

    # sshs_model_hash: sha256 of the tensor data (it does not depend on the header)
    data = out.read_bytes()
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + n:]).hexdigest()
    # sshs_legacy_hash: kohya's addnet_hash_legacy over the file re-serialised with only ss_* metadata
    from safetensors.torch import load_file, save

    ss_only = save(load_file(str(out)), {k: v for k, v in meta.items() if k.startswith("ss_")})
    assert meta["sshs_legacy_hash"] == hashlib.sha256(ss_only[0x100000:0x110000]).hexdigest()[:8]
    assert not list(tmp_path.glob(".*partial*")), "a partial file was left behind"
    assert (tmp_path / "meta.loss.csv").read_text().startswith("step,loss,lr,val_loss\n1,")
    assert (tmp_path / "meta.loss.png").read_bytes()[:4] == b"\x89PNG"


def test_sdxl_with_text_encoder_lora_matches_diffusers(one_image, tmp_path):
    out = tmp_path / "xl.safetensors"
    result = train(TrainConfig(type="lora", dataset=one_image, out=out, max_steps=3, lr=1e-2, rank=2, alpha=2,
                               train_text_encoder=True, text_encoder_lr=5e-3,
                               **{**SMALL, "base": "tiny-sdxl"}))
    assert result["steps"] == 3
    _, head = header(out)
    keys = [k for k in head if k != "__metadata__"]
    assert any(k.startswith("lora_te1_text_model_encoder_layers_") for k in keys)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_") for k in keys)
    meta = head["__metadata__"]
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert adapterhub.load(out).base == "tiny-sdxl"
    assert_same_weights(ours_merged("tiny-sdxl", [(out, 1.0)]), diffusers_fused("tiny-sdxl", [(out, 1.0)]),
                        weights(parts("tiny-sdxl")))


# --------------------------------------------------------------------------------------------
# textual inversion and hypernetwork
# --------------------------------------------------------------------------------------------
def test_textual_inversion_trains_only_new_rows_and_loads_in_diffusers(one_image, fresh_sd1, tmp_path):
    trainer, losses = fixed_batch_run("textual_inversion", one_image, tmp_path / "zqxtok.safetensors", steps=8,
                                      lr=5e-2, num_vectors=2, init_word="cat")
    assert losses[-1] < losses[0]
    table = trainer.pipe.text_encoder.get_input_embeddings().weight.detach()
    original = fresh_sd1.text_encoder.get_input_embeddings().weight.detach()
    assert table.shape[0] == original.shape[0] + 2
    assert torch.equal(table[: original.shape[0]], original), "a row other than the new tokens moved"
    init = original[fresh_sd1.tokenizer("cat", add_special_tokens=False).input_ids[0]]
    assert not torch.allclose(table[-1], init), "the new rows did not train"
    assert trainer.trainable.caption("a photo") == "zqxtok zqxtok_1, a photo"

    path = trainer.write_adapter(trainer.cfg.out)
    adapter = adapterhub.load(path)
    assert (adapter.type, adapter.format, adapter.extra["vectors"]) == ("textual_inversion", "a1111-safetensors", 2)
    _, head = header(path)
    assert set(head) == {"emb_params", "__metadata__"}
    assert head["__metadata__"]["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"

    fresh_sd1.load_textual_inversion(str(path), token="zqxtok")  # diffusers' own loader
    ids = fresh_sd1.tokenizer.convert_tokens_to_ids(["zqxtok", "zqxtok_1"])
    loaded = fresh_sd1.text_encoder.get_input_embeddings().weight[ids]
    assert torch.equal(loaded, table[-2:])


def test_hypernetwork_lr_schedule_string_and_a1111_file(one_image, fresh_sd1, tmp_path):
    out = tmp_path / "hn.pt"
    events = {}
    result = train(TrainConfig(type="hypernetwork", dataset=one_image, out=out, lr_schedule="1e-3:2, 1e-4:4",
                               hn_activation="relu", **SMALL), on_event=lambda kind, **d: events.setdefault(kind, d))
    assert result["steps"] == 4  # the schedule ends the run
    assert events["start"]["text_cached"] is True  # frozen text encoder: each caption encoded once
    assert set(events["start"]["trainable"]) == {"hypernetwork"}
    rows = (tmp_path / "hn.loss.csv").read_text().splitlines()[1:]
    assert [float(r.split(",")[2]) for r in rows] == [1e-3, 1e-3, 1e-4, 1e-4]
    adapter = adapterhub.load(out)
    assert (adapter.type, adapter.format) == ("hypernetwork", "a1111")
    info = adapter.info()
    assert info["widths"] == [32, 64] and info["activation_func"] == "relu" and info["step"] == 4
    raw = torch.load(out, weights_only=True)
    assert raw["layer_structure"] == [1, 2, 1] and set(raw) >= {32, 64, "name", "sd_checkpoint_name"}
    assert any(not torch.equal(t, torch.zeros_like(t)) for t in raw[64][0].values())
    with adapter.attach(fresh_sd1, 1.0) as handle:
        assert handle.layers > 0
