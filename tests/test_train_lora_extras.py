"""LoRA-family training extras on tiny-sd1 (CPU, float32): AdaLoRA, LoRA+ and max-norm regularisation.

* AdaLoRA runs PEFT's own ``AdaLoraModel`` inside the one loop. Oracles: PEFT loads the written folder
  (``PeftModel.from_pretrained`` + ``merge_and_unload``) and its merge equals ours and the trained layers'
  own deltas; PEFT's ``AdaLoraModel.forward`` computes the orthogonal regulariser our ``extra_loss`` adds;
  diffusers ``load_lora_weights`` + ``fuse_lora`` of the kohya export equals the PEFT merge. The rank
  allocator pruned to exactly PEFT's budget, and a resumed run ends where an uninterrupted one does.
* LoRA+: the optimiser's groups and rates, and one SGD step that moves the up matrices exactly R x lr x grad.
* max-norm: sd-scripts' ``apply_max_norm_regularization`` written out independently (LoRA/LoCon) and
  LyCORIS ``LohaModule.apply_max_norm`` (LoHa) as oracles; after training every delta is within the norm.
* the CLI, and its one-line errors for the combinations that are refused.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lora_helpers import diffusers_fused, frozen_parameters, ours_merged, parts, quiet, randomize_, weights
from safetensors import safe_open
from test_train import SMALL, fixed_batch_run, make_dataset
from test_train_cli import one_line_error, run

import adapterhub
from adapterhub.errors import AdapterhubError
from adapterhub.plugins import adapter_type
from adapterhub.train import TrainConfig, resolve, train
from adapterhub.train.loop import Trainer

quiet()
ATOL = 1e-5
ADALORA = {"rank": 2, "alpha": 4, "adalora_init_rank": 4, "adalora_tinit": 3, "adalora_tfinal": 5,
           "adalora_delta_t": 2}


@pytest.fixture(scope="module")
def one_image(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("one"), names=("cat",), folder="1_cat")


def peft_merged(folder: Path) -> dict[str, torch.Tensor]:
    import warnings

    from peft import PeftModel

    with warnings.catch_warnings():  # PEFT's own AdaLoRA rank_pattern also passes through its LoRA pattern check
        warnings.filterwarnings("ignore", message="The following rank_pattern keys did not match")
        merged = PeftModel.from_pretrained(parts("tiny-sd1").unet, str(folder)).merge_and_unload()
    return {f"unet.{k}": v for k, v in merged.state_dict().items()}


def worst(a: dict, b: dict, prefix: str = "unet.") -> float:
    keys = [k for k in b if k.startswith(prefix)]
    assert keys and all(k in a for k in keys)
    return max((a[k] - b[k]).abs().max().item() for k in keys)


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


# --------------------------------------------------------------------------------------------
# AdaLoRA
# --------------------------------------------------------------------------------------------
def peft_orthogonal_loss(trainable) -> torch.Tensor:
    """PEFT's own regulariser: ``AdaLoraModel.forward`` adds it to an output that carries ``.loss``."""
    tuner = trainable.peft.base_model
    tuner.model.forward = lambda *a, **k: SimpleNamespace(loss=torch.zeros(()))
    try:
        return tuner().loss
    finally:
        del tuner.model.forward


def test_adalora_prunes_ranks_and_writes_peft_and_kohya(one_image, tiny_sd1, tmp_path):
    trainer, losses = fixed_batch_run("adalora", one_image, tmp_path / "ada", steps=30, **ADALORA)
    assert losses[-1] < 0.6 * losses[0], losses
    adapter = ("lora_", "hada_", "ranknum")  # the adapter's own tensors, left out
    ours, base = frozen_parameters(trainer.pipe, adapter), frozen_parameters(tiny_sd1, adapter)
    assert ours.keys() == base.keys()
    assert not [k for k in base if not torch.equal(ours[k], base[k])]

    trainable = trainer.trainable
    layers = list(trainable.layers.values())
    assert {type(layer).__name__ for layer in layers} == {"SVDLinear", "SVDConv2d"}  # 1x1 proj_in/out too
    # PEFT's allocator ended at its target budget, target_r x modules, masking singular values to 0
    pattern = trainable.peft_config.rank_pattern
    kept = {n: sum(v) for n, v in pattern.items()}
    assert sum(kept.values()) == 2 * len(layers) and len(set(kept.values())) > 1, kept
    zeros = sum(int((layer.lora_E["default"] == 0).sum()) for layer in layers)
    assert zeros == 4 * len(layers) - 2 * len(layers)

    reg = trainable.extra_loss()
    assert reg.requires_grad and reg.item() > 0
    assert torch.allclose(reg, peft_orthogonal_loss(trainable), rtol=1e-6, atol=0)

    folder = trainer.write_adapter(trainer.cfg.out)
    assert sorted(p.name for p in folder.iterdir()) == ["ada.kohya.safetensors", "adapter_config.json",
                                                        "adapter_model.safetensors"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "init_r", "target_r", "total_step", "tinit", "tfinal", "deltaT",
                                   "lora_alpha", "orth_reg_weight")} == {
        "peft_type": "ADALORA", "init_r": 4, "target_r": 2, "total_step": 30, "tinit": 3, "tfinal": 5, "deltaT": 2,
        "lora_alpha": 4.0, "orth_reg_weight": 0.1}
    assert adapterhub.load(folder).type == "adalora"

    reference = peft_merged(folder)  # PEFT reads its layout (rank pattern applied) and merges
    assert worst(ours_merged("tiny-sd1", [(folder, 1.0)]), reference) < ATOL
    original = weights(parts("tiny-sd1"))
    for target, layer in trainable.layers.items():  # what was trained is what was written
        key = f"{target}.weight"
        got = reference[key] - original[key]
        assert (got - layer.get_delta_weight("default")).abs().max().item() < 1e-6, target

    kohya = folder / "ada.kohya.safetensors"
    exported = adapterhub.load(kohya)
    assert (exported.type, exported.format) == ("lora", "kohya")
    assert {p.rank for p in exported.patches.values()} == {v for v in kept.values() if v}
    meta = metadata(kohya)
    assert meta["ss_network_dim"] == "Dynamic" and meta["ss_network_module"] == "networks.lora"
    assert json.loads(meta["ss_network_args"])["adalora_init_rank"] == "4"
    assert worst(diffusers_fused("tiny-sd1", [(kohya, 1.0)]), reference) < ATOL


def test_adalora_resume_restores_the_rank_allocator(one_image, tmp_path):
    """8 steps == 3 (or 6) steps, resume, the rest: pruning at step 4 needs the saved importance averages,
    the final phase (steps 7, 8) the saved rank pattern."""
    run_cfg = dict(type="adalora", dataset=one_image, max_steps=8, lr=1e-2,
                   **{**SMALL, **ADALORA, "adalora_tinit": 1, "adalora_tfinal": 2})
    whole = tmp_path / "whole"
    train(TrainConfig(out=whole, save_every=3, **run_cfg))
    assert (whole.with_name("whole-step000003") / "whole.kohya.safetensors").is_file()
    a = adapterhub.load(whole).patches
    for step in (3, 6):
        split = tmp_path / f"split{step}"
        assert train(resolve(overrides={"resume": whole.with_name(f"whole-step{step:06d}-state"), "out": split}))[
            "steps"] == 8
        b = adapterhub.load(split).patches
        assert a.keys() == b.keys()
        assert {k: p.rank for k, p in a.items()} == {k: p.rank for k, p in b.items()}
        for key in a:
            for name, tensor in a[key].tensors.items():
                assert torch.allclose(tensor, b[key].tensors[name], atol=1e-6, rtol=0), (step, key, name)


# --------------------------------------------------------------------------------------------
# LoRA+
# --------------------------------------------------------------------------------------------
def test_loraplus_groups_and_one_sgd_step(one_image, tmp_path):
    cfg = TrainConfig(type="lora", dataset=one_image, out=tmp_path / "plus.safetensors", max_steps=1,
                      optimizer="sgd", weight_decay=0.0, max_grad_norm=0.0, lr=1e-3, text_encoder_lr=5e-4,
                      train_text_encoder=True, loraplus_lr_ratio=4, rank=2, alpha=2, **SMALL)
    trainer = Trainer(cfg)
    trainer.setup()
    rates = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert rates == {"unet": 1e-3, "unet_up": 4e-3, "text_encoder": 5e-4, "text_encoder_up": 2e-3}
    trainable = trainer.trainable
    ups = {id(layer.lora_B["default"].weight) for layer in trainable.layers.values()}
    for group in trainable.param_groups:
        assert all((id(p) in ups) == group["name"].endswith("_up") for p in group["params"]), group["name"]

    for i, layer in enumerate(trainable.layers.values()):  # B = 0 would leave A without a gradient
        randomize_(layer.lora_B, seed=i, std=0.05)
    before = {id(p): p.detach().clone() for p in trainable.parameters}
    grads = {}
    trainable.before_zero_grad = lambda step: grads.update({id(p): p.grad.clone() for p in trainable.parameters})
    trainer.pipe.unet.train()
    trainer.step()
    for group in trainer.optimizer.param_groups:
        lr = group["lr"]
        for p in group["params"]:
            assert torch.equal(p.detach(), before[id(p)].add(grads[id(p)], alpha=-lr)), group["name"]
    moved = next(g for g in trainer.optimizer.param_groups if g["name"] == "unet_up")["params"]
    assert any(grads[id(p)].abs().max() > 0 for p in moved)

    trainer.write_adapter(cfg.out)
    args = json.loads(metadata(cfg.out)["ss_network_args"])
    assert args == {"loraplus_lr_ratio": "4"}


def test_loraplus_adalora_puts_lora_b_in_the_up_group(one_image, tmp_path):
    cfg = TrainConfig(type="adalora", dataset=one_image, out=tmp_path / "x", max_steps=10, loraplus_lr_ratio=8,
                      lr=1e-3, **{**SMALL, **ADALORA})
    trainer = Trainer(cfg)
    trainer.setup()
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert {k: g["lr"] for k, g in groups.items()} == {"unet": 1e-3, "unet_up": 8e-3}
    ups = {id(layer.lora_B["default"]) for layer in trainer.trainable.layers.values()}
    assert {id(p) for p in groups["unet_up"]["params"]} == ups
    assert json.loads(trainer.trainable.metadata["ss_network_args"])["loraplus_lr_ratio"] == "8"


# --------------------------------------------------------------------------------------------
# max-norm
# --------------------------------------------------------------------------------------------
def kohya_max_norm(up: torch.Tensor, down: torch.Tensor, alpha: float, max_norm: float):
    """sd-scripts ``apply_max_norm_regularization`` for one module, on kohya-shaped tensors."""
    scale = alpha / down.shape[0]
    if up.shape[2:] == (1, 1) and down.shape[2:] == (1, 1):
        updown = (up.squeeze(3).squeeze(2) @ down.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3)
    elif up.shape[2:] == (3, 3) or down.shape[2:] == (3, 3):
        updown = torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
    else:
        updown = up @ down
    updown = updown * scale
    norm = updown.norm().clamp(min=max_norm / 2)
    ratio = torch.clamp(norm, max=max_norm) / norm
    if ratio != 1:
        return up * ratio ** 0.5, down * ratio ** 0.5, True
    return up, down, False


def _trainable(kind: str, max_norm: float):
    cfg = TrainConfig(type=kind, dataset=Path("."), out=Path("x.safetensors"), rank=2, alpha=1, conv_rank=2,
                      conv_alpha=2, max_norm=max_norm, **SMALL)
    return adapter_type(kind).make_trainable(parts("tiny-sd1"), cfg)


@pytest.mark.parametrize("kind", ["locon", "loha"])
def test_max_norm_formula_matches_sd_scripts_and_lycoris(kind):
    max_norm = 0.5
    trainable = _trainable(kind, max_norm)
    for i, layer in enumerate(trainable.layers.values()):  # deltas on both sides of the limit
        randomize_(layer, seed=i, std=0.3 if i % 2 else 0.05, only=("lora_", "hada_"))
    before = trainable.adapter().patches
    trainable.after_step()
    after = trainable.adapter().patches
    scaled = 0
    for target, layer in trainable.layers.items():
        if kind == "locon":
            t = before[target].tensors
            up, down, was_scaled = kohya_max_norm(t["up"], t["down"], before[target].alpha, max_norm)
            expected = {"up": up, "down": down}
        else:
            expected, was_scaled = lycoris_loha(layer, before[target], max_norm)
        scaled += was_scaled
        for name, tensor in expected.items():
            assert torch.allclose(after[target].tensors[name], tensor, rtol=1e-5, atol=1e-7), (target, name)
    assert 0 < scaled < len(after)
    assert trainable.norm_stats[0] == scaled and trainable.norm_stats[2] <= max_norm * (1 + 1e-5)


def lycoris_loha(layer, patch, max_norm: float):
    """LyCORIS' LoHa module on the same weights: ``apply_max_norm`` then the file it would write."""
    from lycoris.modules.loha import LohaModule

    base = layer.get_base_layer()
    module = LohaModule("m", base, lora_dim=patch.rank, alpha=patch.alpha)
    with torch.no_grad():
        for name, tensor in patch.tensors.items():
            getattr(module, name).copy_(tensor)
    scaled, _ = module.apply_max_norm(max_norm)
    saved = module.custom_state_dict()
    return {k: saved[k].detach() for k in patch.tensors}, bool(scaled)


@pytest.mark.parametrize("kind,max_norm", [("lora", 0.3), ("loha", 0.1)])
def test_max_norm_holds_after_training(kind, max_norm, one_image, tmp_path):
    trainer, _losses = fixed_batch_run(kind, one_image, tmp_path / f"{kind}.safetensors", steps=6, rank=2, alpha=2,
                                      conv_rank=2, conv_alpha=2, max_norm=max_norm)
    norms = [layer.get_delta_weight("default").norm().item() for layer in trainer.trainable.layers.values()]
    assert max(norms) <= max_norm * (1 + 1e-5)
    assert any(abs(n - max_norm) < 1e-5 * max_norm for n in norms), "no module was clipped"
    assert trainer.trainable.norm_stats[0] > 0
    path = trainer.write_adapter(trainer.cfg.out)
    assert metadata(path)["ss_scale_weight_norms"] == str(max_norm)
    layers = trainer.trainable.layers
    patches = adapterhub.load(path).patches
    written = [p.delta(layers[t].get_base_layer().weight).norm().item() for t, p in patches.items()]
    assert len(written) == len(layers) and max(written) <= max_norm * (1 + 1e-5)


# --------------------------------------------------------------------------------------------
# the CLI and refused combinations
# --------------------------------------------------------------------------------------------
def test_cli_trains_adalora_and_lora_with_loraplus_and_max_norm(one_image, tmp_path, capsys):
    out = tmp_path / "ada"
    rc, stdout, err = run(capsys, "--type", "adalora", "--base", "tiny-sd1", "--dataset", one_image, "--out", out,
                          "--max-steps", 4, "--resolution", 64, "--bucket-step", 32, "--rank", 2, "--seed", 0,
                          "--json")
    assert rc == 0, err
    assert json.loads(stdout)["steps"] == 4
    assert adapterhub.inspect(out, with_hash=False)["type"] == "adalora"
    assert adapterhub.inspect(out / "ada.kohya.safetensors", with_hash=False)["type"] == "lora"
    assert json.loads((out / "adapter_config.json").read_text())["init_r"] == 3  # 1.5 x --rank

    single = tmp_path / "single.safetensors"  # a .safetensors OUT: the kohya export alone
    rc, _, err = run(capsys, "--type", "adalora", "--base", "tiny-sd1", "--dataset", one_image, "--out", single,
                     "--max-steps", 2, "--resolution", 64, "--bucket-step", 32)
    assert rc == 0, err
    assert adapterhub.inspect(single, with_hash=False)["type"] == "lora" and "sshs_model_hash" in metadata(single)

    lora = tmp_path / "plus.safetensors"
    rc, _, err = run(capsys, "--type", "lora", "--base", "tiny-sd1", "--dataset", one_image, "--out", lora,
                     "--max-steps", 2, "--resolution", 64, "--bucket-step", 32, "--loraplus-lr-ratio", 16,
                     "--max-norm", 1)
    assert rc == 0, err
    meta = metadata(lora)
    assert json.loads(meta["ss_network_args"]) == {"loraplus_lr_ratio": "16"}
    assert meta["ss_scale_weight_norms"] == "1.0"

    rc, _, err = run(capsys, "--type", "loha", "--base", "tiny-sd1", "--dataset", one_image,
                     "--out", tmp_path / "bad.safetensors", "--max-steps", 2, "--loraplus-lr-ratio", 16)
    assert rc == 2 and "--loraplus-lr-ratio" in one_line_error(err)
    assert not (tmp_path / "bad.safetensors").exists()


@pytest.mark.parametrize("options,message", [
    ({"type": "adalora", "max_norm": 1.0}, "--max-norm is not supported"),
    ({"type": "adalora", "train_text_encoder": True}, "--train-text-encoder is not supported"),
    ({"type": "adalora", "adalora_tinit": 6, "adalora_tfinal": 4}, "leave no rank-pruning phase in a run of 10 steps"),
    ({"type": "adalora", "adalora_init_rank": 1}, "must be at least --rank"),
    ({"type": "adalora", "adalora_orth_reg": -0.1}, "--adalora-orth-reg must not be negative"),
    ({"type": "loha", "loraplus_lr_ratio": 4.0}, "not defined for LoHa"),
])
def test_refused_combinations(options, message):
    cfg = TrainConfig(dataset=Path("."), out=Path("x"), max_steps=10, **{**SMALL, "rank": 2, **options})
    model = parts("tiny-sd1")
    with pytest.raises(AdapterhubError, match=message):
        adapter_type(cfg.type).make_trainable(model, cfg)
    assert not any("lora_" in n or "hada_" in n for n, _ in model.unet.named_parameters()), "model was changed"
