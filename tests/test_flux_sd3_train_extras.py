"""Flux / SD3 training extras: the loss weighting by σ, and LoRA on the text encoders.

Oracles: diffusers' ``training_utils.compute_loss_weighting_for_sd3`` (the formula here; one step's loss and
gradient with it in tests/test_flux_sd3_train.py); diffusers' ``load_lora_weights`` + ``fuse_lora`` for the
CLIP text encoders of a trained file (FLUX.1: the sd-scripts file itself; SD3 through the diffusers layout,
as diffusers reads no sd-scripts SD3 names); the T5 encoder, which no diffusers loader reads, against PEFT's
own merge of the trained layers (the LoRA formula ``W + up @ down * alpha / r``).
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

from adapterhub.train import TrainConfig
from adapterhub.train.flow import loss_weighting
from adapterhub.train.loop import Trainer
from flux_helpers import quiet_pipe
from test_flux_sd3_train import SMALL, _diffusers_readable
from test_train import make_dataset

ENCODERS = {"tiny-flux": {"clip": ("text_encoder",), "t5": "text_encoder_2"},
            "tiny-sd3": {"clip": ("text_encoder", "text_encoder_2"), "t5": "text_encoder_3"}}
PREFIX = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}  # CLIP-L, CLIP-G as sd-scripts names them


@pytest.mark.parametrize("scheme", ["none", "sigma_sqrt", "cosmap"])
def test_loss_weighting_equals_diffusers_training_utils(scheme):
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    sigmas = torch.linspace(1e-3, 1.0, 257).view(-1, 1, 1, 1)
    theirs = compute_loss_weighting_for_sd3(weighting_scheme=scheme, sigmas=sigmas)
    ours = loss_weighting(scheme, sigmas.flatten())
    assert torch.equal(ours, theirs.flatten())
    assert scheme == "none" or not torch.equal(ours, torch.ones_like(ours))


def test_a_density_named_as_weighting_scheme_is_refused_with_the_option_that_draws_it(tmp_path):
    """sd-scripts' and diffusers' --weighting_scheme also takes the densities; here they are timestep sampling."""
    from adapterhub.errors import AdapterhubError
    from adapterhub.train.flow import check

    cfg = TrainConfig(type="lora", base="tiny-flux", dataset=tmp_path, out=tmp_path / "x.safetensors",
                      weighting_scheme="logit_normal")
    with pytest.raises(AdapterhubError, match=r"^--weighting-scheme logit_normal: .*--timestep-sampling"):
        check(cfg)


@pytest.fixture(scope="module")
def two_images(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("two"), names=("cat", "coffee"), folder="1_demo subject")


@pytest.fixture(scope="module", params=["tiny-flux", "tiny-sd3"])
def base(request, adapterhub_cache):
    from adapterhub.base import load_base

    return request.param, quiet_pipe(load_base(request.param))


def _encoder_states(pipe, names) -> dict[str, dict[str, torch.Tensor]]:
    return {n: {k: v.detach().clone() for k, v in getattr(pipe, n).state_dict().items()} for n in names}


def _peft_truth(pipe, trainer, names) -> dict[str, dict[str, torch.Tensor]]:
    """Each encoder's weights with PEFT's own delta of every trained layer added (the layout's formula)."""
    truth = _encoder_states(pipe, names)
    for name in names:
        root = getattr(trainer.pipe, name)
        real = {id(m): path for path, m in root.named_modules()}
        for target, layer in trainer.trainable.layers.items():
            if target.startswith(name + "."):
                key = real[id(layer)] + ".weight"
                truth[name][key] = truth[name][key] + layer.get_delta_weight("default").detach()
    return truth


def _ours(pipe, path, names):
    import adapterhub

    mine = copy.deepcopy(pipe)
    adapterhub.load(path).merge_into(mine, 1.0)
    return _encoder_states(mine, names)


def _diffusers(pipe, path, names):
    ref = copy.deepcopy(pipe)
    ref.load_lora_weights(str(path), adapter_name="oracle")
    ref.fuse_lora(components=list(names), lora_scale=1.0)
    ref.unload_lora_weights()
    return _encoder_states(ref, names)


def _assert_same(ours, truth, base_state, atol=1e-5) -> int:
    """Every weight of every encoder equal (atol); returns how many differ from the base."""
    moved = 0
    for name, weights in truth.items():
        assert ours[name].keys() == weights.keys()
        for k, v in weights.items():
            torch.testing.assert_close(ours[name][k], v, atol=atol, rtol=0, msg=f"{name}.{k}")
            moved += not torch.equal(v, base_state[name][k])
    return moved


def _train(name, dataset, out, **options) -> Trainer:
    cfg = TrainConfig(base=name, dataset=dataset, out=out, **{**SMALL, "type": "lora", "max_steps": 2, "lr": 1e-2,
                                                               "train_text_encoder": True, **options})
    trainer = Trainer(cfg)
    trainer.run()
    return trainer


def test_text_encoder_lora_trains_clip_and_loads_in_diffusers(base, two_images, tmp_path):
    """--train-text-encoder: CLIP-L (FLUX.1) or CLIP-L and CLIP-G (SD3) train beside the transformer, with no
    cached text embeddings; written as sd-scripts' lora_te1_ / lora_te2_; diffusers' fuse equals ours and PEFT's."""
    name, pipe = base
    clip = ENCODERS[name]["clip"]
    out = tmp_path / "te.safetensors"
    trainer = _train(name, two_images, out)
    assert trainer.conditioner.cache == {} and not trainer.conditioner.cache_on  # encoded anew every step
    groups = {g["name"] for g in trainer.trainable.param_groups}
    assert groups == {"transformer", *clip}
    with safe_open(str(out), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    for encoder in clip:
        assert f"{PREFIX[encoder]}text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
        assert f"{PREFIX[encoder]}text_model_encoder_layers_0_mlp_fc1.lora_up.weight" in keys
    assert not any(k.startswith("lora_te3_") for k in keys)  # T5 only with --train-t5
    assert any(k.startswith("lora_unet_") for k in keys)
    assert meta["ss_text_encoder_lr"] == "0.01"
    base_state = _encoder_states(pipe, clip)
    truth = _peft_truth(pipe, trainer, clip)
    moved = _assert_same(_ours(pipe, out, clip), truth, base_state)
    assert moved >= 6 * len(clip)  # q, k, v, out, fc1, fc2 of at least one layer per encoder
    family = "flux" if name == "tiny-flux" else "sd3"
    readable = _diffusers_readable(out, tmp_path / "readable.safetensors", family)
    assert _assert_same(_diffusers(pipe, readable, clip), truth, base_state) == moved


def _t5_path(name: str) -> str:
    """``encoder_block_0_layer_1_DenseReluDense_wi_0`` -> ``encoder.block.0.layer.1.DenseReluDense.wi_0.weight``."""
    head, _, module = name.partition("_DenseReluDense_") if "_DenseReluDense_" in name else name.partition(
        "_SelfAttention_")
    block = "DenseReluDense" if "_DenseReluDense_" in name else "SelfAttention"
    return f"{head.replace('_', '.')}.{block}.{module}.weight"


@pytest.mark.parametrize("kind, tensor", [("lora", "lora_down.weight"), ("loha", "hada_w1_a"), ("lokr", "lokr_w1")])
def test_train_t5_adds_the_t5_encoder_in_sd_scripts_names(base, two_images, tmp_path, kind, tensor):
    """--train-t5 (sd-scripts network_args train_t5xxl): the family's T5 encoder trains too, written as
    lora_te3_<T5EncoderModel path joined by _> (CLIP as lora_te1_ / lora_te2_, for LoHa and LoKr too, beside
    their LyCORIS-named transformer modules); no diffusers loader reads T5 LoRAs, so our merge of the file is
    checked against PEFT's own merge of the trained layers."""
    name, pipe = base
    t5 = ENCODERS[name]["t5"]
    out = tmp_path / "t5.safetensors"
    trainer = _train(name, two_images, out, type=kind, max_steps=1, train_t5=True)
    with safe_open(str(out), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    for module in ("layer_0_SelfAttention_q", "layer_0_SelfAttention_o", "layer_1_DenseReluDense_wi_0",
                   "layer_1_DenseReluDense_wo"):
        assert f"lora_te3_encoder_block_0_{module}.{tensor}" in keys
    for encoder in ENCODERS[name]["clip"]:
        assert f"{PREFIX[encoder]}text_model_encoder_layers_0_self_attn_q_proj.{tensor}" in keys
    args = json.loads(meta["ss_network_args"])
    assert args["train_t5xxl"] == "True" and args.get("algo", "lora") == kind
    names = (*ENCODERS[name]["clip"], t5)
    ours = _ours(pipe, out, names)
    moved = _assert_same(ours, _peft_truth(pipe, trainer, names), _encoder_states(pipe, names))
    if kind == "lora":  # the file's own T5 tensors by the kohya formula W + up @ down * alpha / rank
        from safetensors.torch import load_file

        tensors, base_t5 = load_file(str(out)), getattr(pipe, t5).state_dict()
        stems = {k.split(".")[0] for k in tensors if k.startswith("lora_te3_")}
        for stem in stems:
            up, down = tensors[f"{stem}.lora_up.weight"], tensors[f"{stem}.lora_down.weight"]
            path = _t5_path(stem.removeprefix("lora_te3_"))
            expected = base_t5[path] + up @ down * (tensors[f"{stem}.alpha"] / down.shape[0])
            torch.testing.assert_close(ours[t5][path], expected, atol=1e-6, rtol=0)
        assert len(stems) == 7 * getattr(pipe, t5).config.num_layers
    t5_layers = [t for t in trainer.trainable.layers if t.startswith(t5 + ".")]
    assert len(t5_layers) == 7 * getattr(pipe, t5).config.num_layers and moved > 0


@pytest.mark.parametrize("spec", ["tiny-flux", "folder"])
def test_refusals_come_before_the_base_loads(two_images, tmp_path, capsys, monkeypatch, spec):
    """A flow-matching base known by its name or its folder's model_index.json (a transformer, no UNet) refuses
    what flow training does not define before anything is loaded."""
    import adapterhub.base
    from adapterhub.cli import main
    from test_train_cli import one_line_error

    def no_load(*args, **kwargs):
        raise AssertionError("the base was loaded")

    monkeypatch.setattr(adapterhub.base, "load_base", no_load)
    if spec == "folder":
        folder = tmp_path / "my-flux"
        folder.mkdir()
        (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline", "transformer": [
            "diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}))
        spec = str(folder)
    out = tmp_path / "out" / "x.safetensors"
    rc = main(["train", "--type", "lora", "--base", spec, "--dataset", str(two_images), "--out", str(out),
               "--resolution", "64", "--bucket-step", "32", "--max-steps", "1", "--log-with", "none",
               "--noise-offset", "0.1"])
    err = capsys.readouterr().err
    assert rc == 2 and "--noise-offset" in one_line_error(err) and "Traceback" not in err
    assert not out.parent.exists()


def test_resumed_text_encoder_run_equals_the_uninterrupted_one(two_images, tmp_path):
    """With the text encoders training (CLIP-L and T5 on FLUX.1) and a loss weighting: 4 steps at once == resumed
    from the step-2 checkpoint for 2 more."""
    from safetensors.torch import load_file

    from adapterhub.train import resolve, train

    run = dict(type="lora", base="tiny-flux", dataset=two_images, max_steps=4, lr=1e-3, train_text_encoder=True,
               train_t5=True, text_encoder_lr=5e-4, weighting_scheme="cosmap", timestep_sampling="logit_normal",
               **SMALL)
    whole = tmp_path / "a" / "whole.safetensors"
    train(TrainConfig(out=whole, save_every=2, **run))
    resumed = train(resolve(overrides={"resume": whole.with_name("whole-step000002-state"),
                                       "out": tmp_path / "b" / "resumed.safetensors"}))
    a, b = load_file(str(whole)), load_file(resumed["out"])
    assert a.keys() == b.keys() and any(k.startswith("lora_te3_") for k in a)
    assert any(a[k].abs().max() > 0 for k in a if k.startswith("lora_te1_") and k.endswith("lora_up.weight"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
