"""Training DoRA (``adapterhub train --type lora|locon --dora``): PEFT's ``use_dora`` layers, written with LyCORIS'
``dora_scale`` per output row beside the kohya factors.

Oracle: PEFT's own merge of the trained layers (``layer.merge()``: ``m * V / ||V||`` with ``V = W + s B A``) on the
base trained on. (diffusers' loader is none here: it filters ``dora_scale`` out of kohya files, with a warning.)
"""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open

import adapterhub
from adapterhub.train import TrainConfig
from adapterhub.train.loop import Trainer
from lora_helpers import quiet
from test_train import make_dataset

quiet()
SMALL = dict(resolution=64, bucket_step=32, seed=0, rank=4, alpha=4, lr=1e-2, max_steps=2, log_with="none")


@pytest.fixture(scope="module")
def two_images(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("two"), names=("cat", "coffee"), folder="1_demo subject")


def _peft_merged(trainer) -> dict[str, torch.Tensor]:
    """target -> the weight PEFT's own merge of that trained DoRA layer gives (on a copy of the layer)."""
    out = {}
    for target, layer in trainer.trainable.layers.items():
        assert layer.use_dora["default"]
        copied = copy.deepcopy(layer)
        copied.merge(adapter_names=["default"])
        out[target] = copied.base_layer.weight.detach().float()
    return out


def _keys_and_meta(path):
    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, f.metadata()


@pytest.mark.parametrize("kind", ["lora", "locon"])
def test_sd1_dora_file_is_what_peft_trained_and_loads_in_diffusers(kind, two_images, tiny_sd1, fresh_sd1, tmp_path):
    import json

    cfg = TrainConfig(type=kind, base="tiny-sd1", dataset=two_images, out=tmp_path / "dora.safetensors",
                      dora=True, conv_rank=2, conv_alpha=2, **SMALL)
    trainer = Trainer(cfg)
    trainer.run()
    keys, meta = _keys_and_meta(cfg.out)
    modules = {k.rsplit(".", 2)[0] for k in keys if k.endswith(".lora_down.weight")}
    assert modules and all(f"{m}.dora_scale" in keys for m in modules)  # a magnitude beside every module
    for m in modules:  # LyCORIS' wd_on_out=True form: (out, 1) / (out, 1, 1, 1)
        scale, up = keys[f"{m}.dora_scale"], keys[f"{m}.lora_up.weight"]
        assert scale[0] == up[0] and all(d == 1 for d in scale[1:]) and len(scale) == len(up)
    args = json.loads(meta["ss_network_args"])
    assert (meta["ss_network_module"], args["algo"], args["dora_wd"]) == ("lycoris.kohya", kind, "True")
    adapter = adapterhub.load(cfg.out)
    assert adapter.type == kind and adapter.extra["dora"] == len(modules)

    truth = _peft_merged(trainer)  # on the base trained on (a DoRA's change depends on it)
    adapter.merge_into(fresh_sd1, 1.0)
    moved = 0
    for target, want in truth.items():
        path = target.split(".", 1)[1]
        got = fresh_sd1.unet.get_submodule(path).weight.detach().float()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=target)
        moved += not torch.equal(want, tiny_sd1.unet.get_submodule(path).weight)
    assert moved >= len(truth) // 2


def test_flux_dora_joins_fused_modules_and_is_what_peft_trained(two_images, tmp_path):
    """On tiny-flux the parts of BFL's fused qkv / linear1 are written as one kohya module with their magnitudes
    stacked by rows (exact: the norm is per output row); read back, our merge equals PEFT's merge."""
    from flux_helpers import quiet_pipe, state

    from adapterhub.base import load_base

    cfg = TrainConfig(type="lora", base="tiny-flux", dataset=two_images, out=tmp_path / "flux.safetensors",
                      dora=True, **SMALL)
    trainer = Trainer(cfg)
    trainer.run()
    keys, _ = _keys_and_meta(cfg.out)
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    assert keys[f"{qkv}.dora_scale"][0] == keys[f"{qkv}.lora_up.weight"][0]  # q, k and v rows together
    pipe = quiet_pipe(load_base("tiny-flux"))
    merged = copy.deepcopy(pipe)
    adapterhub.load(cfg.out).merge_into(merged)
    ours, base = state(merged), state(pipe)
    truth = _peft_merged(trainer)
    for target, want in truth.items():
        key = target.removeprefix("transformer.") + ".weight"
        torch.testing.assert_close(ours[key], want, atol=1e-5, rtol=0, msg=target)
    assert sum(not torch.equal(ours[k], base[k]) for k in base) >= len(truth) - 1


@pytest.mark.parametrize("args, words", [
    (["--type", "lora", "--dora", "--max-norm", "1"], "--max-norm is not defined for DoRA"),
    (["--type", "loha", "--dora"], "--dora"),
])
def test_what_dora_does_not_define_is_refused_in_one_line(args, words, two_images, tmp_path, capsys):
    from adapterhub.cli import main

    out = tmp_path / "x.safetensors"
    rc = main(["train", "--base", "tiny-sd1", "--dataset", str(two_images), "--out", str(out), "--max-steps", "1",
               "--resolution", "64", *args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and "Traceback" not in err and any(words in line for line in lines), err
    assert not out.exists()
