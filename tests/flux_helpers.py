"""Helpers for the SD3 / FLUX.1 tests: tiny adapter files in each layout, and diffusers as the oracle.

The files are made test-side from the tiny base's module shapes (never with adapterhub's writers), and
the oracle is diffusers' own loader (``load_lora_weights`` + ``fuse_lora``) on a copy of the same base.
"""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

RANK = 4


@pytest.fixture(scope="module")
def k():
    """k-diffusion's sampling module, the samplers' oracle (a test module imports this fixture by name)."""
    from test_sample_ksamplers import load_kdiffusion  # k-diffusion's sampling module without its training deps

    module = load_kdiffusion()
    if module is None:
        pytest.skip("the oracle k-diffusion is not installed")
    return module


def cli(capsys, *argv):
    """``adapterhub ARGV...`` through the console entry point (each argument as text): (rc, stdout, stderr)."""
    from adapterhub.cli import main

    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def flow_generator(pipe, **kwargs):
    """A Generator on a tiny Flux / SD3 pipeline (a FlowGenerator), named ``tiny``, the model not hashed."""
    from adapterhub.sample import Generator

    return Generator(pipe, model_name="tiny", hash_model=False, **kwargs)


def quiet_pipe(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def linear_shapes(transformer, paths):
    modules = dict(transformer.named_modules())
    return {p: tuple(modules[p].weight.shape) for p in paths}


def lora_pair(out_f, in_f, gen, rank=RANK):
    """(up, down) of a random LoRA."""
    return (torch.randn(out_f, rank, generator=gen) * 0.1, torch.randn(rank, in_f, generator=gen) * 0.1)


def peft_file(path, transformer, paths, seed=0, prefix="transformer."):
    """A diffusers / PEFT LoRA (``lora_A`` / ``lora_B``) on the given transformer modules."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for p, (out_f, in_f) in linear_shapes(transformer, paths).items():
        up, down = lora_pair(out_f, in_f, gen)
        sd[f"{prefix}{p}.lora_A.weight"], sd[f"{prefix}{p}.lora_B.weight"] = down, up
    save_file(sd, str(path))
    return path


def _dotted(bfl: str) -> str:
    """``img_attn_qkv`` -> ``img_attn.qkv``, ``img_mlp_0`` -> ``img_mlp.0`` (BFL's own dotted names)."""
    return bfl.replace("_attn_", "_attn.").replace("_mlp_", "_mlp.").replace("_mod_", "_mod.")


BFL_TOP = {"img_in": "img_in", "txt_in": "txt_in", "time_in_in_layer": "time_in.in_layer",
           "time_in_out_layer": "time_in.out_layer", "vector_in_in_layer": "vector_in.in_layer",
           "vector_in_out_layer": "vector_in.out_layer", "guidance_in_in_layer": "guidance_in.in_layer",
           "guidance_in_out_layer": "guidance_in.out_layer", "final_layer_linear": "final_layer.linear",
           "final_layer_adaLN_modulation_1": "final_layer.adaLN_modulation.1"}


def bfl_modules(transformer):
    """BFL module (dotted) -> the diffusers modules it fuses, in row order, on a Flux transformer."""
    from adapterhub_plugins.lora.transformer_keys import DOUBLE, SINGLE, TOP

    cfg = transformer.config
    out = {}
    for i in range(cfg.num_layers):
        out.update({f"double_blocks.{i}.{_dotted(k)}": [f"transformer_blocks.{i}.{t}" for t in v]
                    for k, v in DOUBLE.items()})
    for i in range(cfg.num_single_layers):
        out.update({f"single_blocks.{i}.{k.replace('modulation_', 'modulation.')}":
                    [f"single_transformer_blocks.{i}.{t}" for t in v] for k, v in SINGLE.items()})
    out.update({BFL_TOP[k]: [v] for k, v in TOP.items()})
    return out


def bfl_file(path, transformer, style, seed=0, skip=(), alpha=2.0):
    """A kohya (``lora_unet_double_blocks_0_img_attn_qkv``) or ComfyUI (``diffusion_model.double_blocks.0.
    img_attn.qkv``) Flux LoRA on every BFL module; a fused module's ``up`` spans all of its parts."""
    gen = torch.Generator().manual_seed(seed)
    modules = dict(transformer.named_modules())
    sd = {}
    for bfl, parts in bfl_modules(transformer).items():
        if any(s in bfl for s in skip):
            continue
        out_f = sum(modules[p].weight.shape[0] for p in parts)
        in_f = modules[parts[0]].weight.shape[1]
        up, down = lora_pair(out_f, in_f, gen)
        name = "lora_unet_" + bfl.replace(".", "_") if style == "kohya" else "diffusion_model." + bfl
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = down, up
        sd[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(sd, str(path))
    return path


def diffusers_fused(pipe, path, **kwargs):
    """The oracle: diffusers' loader and ``fuse_lora`` on a copy of ``pipe``; its transformer weights."""
    ref = copy.deepcopy(pipe)
    ref.load_lora_weights(str(path), adapter_name="oracle", **kwargs)
    ref.fuse_lora(components=["transformer"], lora_scale=1.0)
    ref.unload_lora_weights()
    return {k: v.detach().clone() for k, v in ref.transformer.state_dict().items()}


def ours_merged(pipe, path, weight=1.0):
    import adapterhub

    mine = copy.deepcopy(pipe)
    adapterhub.load(path).merge_into(mine, weight)
    return {k: v.detach().clone() for k, v in mine.transformer.state_dict().items()}


def state(pipe):
    return {k: v.detach().clone() for k, v in pipe.transformer.state_dict().items()}


def assert_same(ours, oracle, base_state, min_changed, atol=1e-5):
    assert ours.keys() == oracle.keys()
    changed = [k for k in oracle if not torch.equal(oracle[k], base_state[k])]
    assert len(changed) >= min_changed  # the oracle did apply the file
    for k in oracle:
        torch.testing.assert_close(ours[k], oracle[k], atol=atol, rtol=0, msg=k)


def deltas(adapter) -> dict[str, torch.Tensor]:
    """target -> the delta each patch adds at multiplier 1 (float32)."""
    return {target: patch.delta(torch.zeros(patch.expected_shape() or (patch.out_features, patch.in_features)))
            for target, patch in adapter.patches.items()}


def assert_bitwise_same_deltas(a, b):
    """Every target's delta is bit for bit the same; a target only one side names adds zeros there."""
    da, db = deltas(a), deltas(b)
    for target in sorted(da.keys() | db.keys()):
        left, right = da.get(target), db.get(target)
        left = torch.zeros_like(right) if left is None else left
        right = torch.zeros_like(left) if right is None else right
        assert torch.equal(left, right), target
