"""LoKr training on tiny-sd1 (CPU, float32, 64 px): PEFT ``LoKrConfig`` layers, written in the LyCORIS layout.

Oracles:

* the trained PEFT layers' own ``W + ΔW`` (``get_delta_weight``, PEFT's ``alpha / r`` included) equals our
  merge of the written file, for modules with ``lokr_w2`` whole and with ``lokr_w2_a`` / ``lokr_w2_b`` (every
  module written with scale 1: ``alpha / r`` folded into ``lokr_w1``, ``alpha = r``);
* lycoris-lora's kohya network loader builds every module of the file and its merge equals ours (1e-5);
* LyCORIS' ``LokrModule`` with its defaults (factor -1, decompose_both off) on each base layer has exactly
  our tensors' names and shapes; holding them, its delta is PEFT's and its ``apply_max_norm`` gives our
  max-norm tensors;
* the CLI trains ``--type lokr`` and refuses ``--loraplus-lr-ratio`` for it in one line, exit 2.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lora_helpers import frozen_parameters, ours_merged, parts, quiet, randomize_, snapshot
from test_train import SMALL, fixed_batch_run, header, lycoris_matches, make_dataset
from test_train_cli import one_line_error, run

import adapterhub
from adapterhub.errors import AdapterhubError
from adapterhub.plugins import adapter_type
from adapterhub.train import TrainConfig

quiet()


@pytest.fixture(scope="module")
def one_image(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("one"), names=("cat",), folder="1_cat")


def test_fixed_batch_loss_falls_base_untouched_and_file_gives_peft_delta(one_image, tiny_sd1, tmp_path):
    # rank 4: lokr_w2 whole on the 32-wide layers, lokr_w2_a / lokr_w2_b on the wider ones; conv rank 2:
    # lokr_w2_a / lokr_w2_b on the 3x3 convs; alpha / r (0.5) folded into lokr_w1 on writing
    trainer, losses = fixed_batch_run("lokr", one_image, tmp_path / "lokr.safetensors", alpha=2, conv_rank=2,
                                      conv_alpha=1)
    assert losses[-1] < 0.4 * losses[0], losses
    adapter = ("lokr_",)  # the adapter's own tensors, left out
    ours, base = frozen_parameters(trainer.pipe, adapter), frozen_parameters(tiny_sd1, adapter)
    assert ours.keys() == base.keys()
    changed = [k for k in base if not torch.equal(ours[k], base[k])]
    assert not changed, changed[:5]

    path = trainer.write_adapter(trainer.cfg.out)
    adapter = adapterhub.load(path)
    assert (adapter.type, adapter.format, adapter.base) == ("lokr", "lycoris", "tiny-sd1")
    assert len(adapter.patches) == len(trainer.trainable.layers)
    _, head = header(path)
    keys = [k for k in head if k != "__metadata__"]
    assert all(k.startswith("lora_unet_") for k in keys)
    assert any(k.endswith(".lokr_w2") for k in keys) and any(k.endswith(".lokr_w2_b") for k in keys)
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lokr_w2_b" in keys
    assert "lora_unet_down_blocks_0_resnets_0_conv1.alpha" in keys
    meta = head["__metadata__"]
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "2.0")
    assert json.loads(meta["ss_network_args"]) == {"algo": "lokr", "factor": "-1", "decompose_both": "False",
                                                   "use_tucker": "False", "conv_dim": "2", "conv_alpha": "1.0"}

    # our merge == the trained PEFT layers' own ΔW (the file holds what was trained, scale included)
    fresh = parts("tiny-sd1")
    original = snapshot(fresh)
    adapterhub.load(path).merge_into(fresh, 1.0)
    worst, whole = 0.0, 0
    for target, layer in trainer.trainable.layers.items():
        key = f"{target}.weight"
        got = fresh.unet.get_submodule(target.split(".", 1)[1]).weight - original[key]
        expected = layer.get_delta_weight("default")
        assert expected.abs().max() > 0, target  # every module trained
        worst = max(worst, (got - expected).abs().max().item())
        whole += "default" in layer.lokr_w2
    assert worst < 1e-6, worst
    assert 0 < whole < len(trainer.trainable.layers), "want modules with lokr_w2 whole and decomposed"
    assert {float(p.alpha) for p in adapter.patches.values()} == {2.0, 4.0}  # alpha = r: scale 1
    lycoris_matches(path)


def _trainable(max_norm: float | None):
    cfg = TrainConfig(type="lokr", dataset=Path("."), out=Path("x.safetensors"), rank=4, alpha=2, conv_rank=2,
                      conv_alpha=1, max_norm=max_norm, **SMALL)
    return adapter_type("lokr").make_trainable(parts("tiny-sd1"), cfg)


def lycoris_module(layer, patch):
    """LyCORIS' LoKr module with its defaults on the same base layer (scale 1), holding the written tensors."""
    from lycoris.modules.lokr import LokrModule

    rank = int(layer.r["default"])
    module = LokrModule("m", layer.get_base_layer(), lora_dim=rank, alpha=rank)
    saved = module.custom_state_dict()
    assert {k: tuple(v.shape) for k, v in saved.items() if k != "alpha"} == \
           {k: tuple(v.shape) for k, v in patch.tensors.items()}
    assert float(saved["alpha"]) == patch.alpha
    with torch.no_grad():
        for name, tensor in patch.tensors.items():
            getattr(module, name).copy_(tensor)
    return module


def test_factorisation_and_max_norm_match_lycoris():
    max_norm = 0.5
    trainable = _trainable(max_norm)
    for i, layer in enumerate(trainable.layers.values()):  # deltas on both sides of the limit
        randomize_(layer, seed=i, std=0.3 if i % 2 else 0.05, only=("lokr_",))
    before = trainable.adapter().patches
    modules = {t: lycoris_module(layer, before[t]) for t, layer in trainable.layers.items()}
    for target, module in modules.items():  # LyCORIS' delta of the file == PEFT's delta of the layer
        peft = trainable.layers[target].get_delta_weight("default")
        assert torch.allclose(module.get_weight(module.shape), peft, rtol=1e-5, atol=1e-7), target
    trainable.after_step()
    after = trainable.adapter().patches
    scaled = 0
    for target, module in modules.items():
        was_scaled, _ = module.apply_max_norm(max_norm)
        scaled += bool(was_scaled)
        saved = module.custom_state_dict()
        for name, tensor in after[target].tensors.items():
            assert torch.allclose(tensor, saved[name].detach(), rtol=1e-5, atol=1e-7), (target, name)
    assert 0 < scaled < len(after)
    assert trainable.norm_stats[0] == scaled and trainable.norm_stats[2] <= max_norm * (1 + 1e-5)


def test_refuses_loraplus_and_leaves_the_model_alone():
    cfg = TrainConfig(dataset=Path("."), out=Path("x"), max_steps=10, **{**SMALL, "type": "lokr", "rank": 2,
                                                                          "loraplus_lr_ratio": 4.0})
    model = parts("tiny-sd1")
    with pytest.raises(AdapterhubError, match="not defined for LoKr"):
        adapter_type("lokr").make_trainable(model, cfg)
    assert not any("lokr_" in n for n, _ in model.unet.named_parameters()), "model was changed"


def test_cli_trains_lokr_with_max_norm_and_refuses_loraplus(one_image, tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    rc, stdout, err = run(capsys, "--type", "lokr", "--base", "tiny-sd1", "--dataset", one_image, "--out", out,
                          "--max-steps", 2, "--resolution", 64, "--bucket-step", 32, "--rank", 2, "--conv-rank", 2,
                          "--max-norm", 1, "--json")
    assert rc == 0, err
    assert json.loads(stdout)["steps"] == 2
    info = adapterhub.inspect(out, with_hash=False)
    assert info["type"] == "lokr"
    meta = header(out)[1]["__metadata__"]
    assert meta["ss_scale_weight_norms"] == "1.0" and json.loads(meta["ss_network_args"])["algo"] == "lokr"
    assert ours_merged("tiny-sd1", [(out, 1.0)])  # the written file merges

    bad = tmp_path / "bad.safetensors"
    rc, _, err = run(capsys, "--type", "lokr", "--base", "tiny-sd1", "--dataset", one_image, "--out", bad,
                     "--max-steps", 2, "--loraplus-lr-ratio", 16)
    assert rc == 2 and "--loraplus-lr-ratio is not defined for LoKr" in one_line_error(err)
    assert not bad.exists()
