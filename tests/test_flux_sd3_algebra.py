"""``adapterhub lora combine / resize / extract`` on FLUX.1 and SD3 LoRAs (#21), on the tiny bases.

The oracle is diffusers: each input file's delta is what ``load_lora_weights`` + ``fuse_lora`` add to the
transformer (flux_helpers.diffusers_fused). combine (concat) must merge to ``sum_i w_i * delta_i``; resize to
rank k to each module's best rank-k approximation of its delta (a truncated SVD of diffusers' delta);
extract from a base and a tuned transformer whose difference has rank <= k must give back the tuned weights.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from flux_helpers import bfl_file, diffusers_fused, ours_merged, peft_file, state
from flux_helpers import cli as _cli

SD3_PATHS = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj",
             "transformer_blocks.1.ff.net.0.proj", "transformer_blocks.0.attn.to_out.0"]
FLUX_PATHS = ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.add_v_proj",
              "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.1.proj_out"]


def _two_files(pipe, family, tmp_path):
    """Two LoRAs of the family in two layouts (Flux: sd-scripts' fused BFL names and PEFT; SD3: PEFT twice).
    No linear1: diffusers' kohya converter splits it at the real width only."""
    if family == "flux":
        first = bfl_file(tmp_path / "a.safetensors", pipe.transformer, "kohya",
                         skip=("linear1", "img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer", "mod"))
        second = peft_file(tmp_path / "b.safetensors", pipe.transformer, FLUX_PATHS, seed=1)
    else:
        first = peft_file(tmp_path / "a.safetensors", pipe.transformer, SD3_PATHS, seed=0)
        second = peft_file(tmp_path / "b.safetensors", pipe.transformer, SD3_PATHS[:2], seed=1)
    return first, second


def _close(ours, expected, base, min_changed, atol=1e-5):
    changed = [k for k in expected if not torch.equal(expected[k], base[k])]
    assert len(changed) >= min_changed
    for k in expected:
        torch.testing.assert_close(ours[k], expected[k], atol=atol, rtol=0, msg=k)


@pytest.mark.parametrize("family,method", [("flux", "concat"), ("sd3", "concat"), ("flux", "svd")])
def test_combine_is_the_weighted_sum_of_diffusers_deltas(family, method, request, tmp_path, capsys):
    """concat exactly; svd at rank 8 >= the sum's rank (4 + 4) exactly too, up to float32 rounding."""
    import adapterhub

    pipe = request.getfixturevalue(f"tiny_{family}")
    first, second = _two_files(pipe, family, tmp_path)
    out = tmp_path / "sum.safetensors"
    rc, stdout, err = _cli(capsys, "lora", "combine", f"{first}:0.7", f"{second}:-0.4", "--out", str(out), "--json",
                           "--method", method, *(["--rank", "8"] if method == "svd" else []))
    assert rc == 0, err
    base = state(pipe)
    one, two = diffusers_fused(pipe, first), diffusers_fused(pipe, second)
    expected = {k: base[k] + 0.7 * (one[k] - base[k]) - 0.4 * (two[k] - base[k]) for k in base}
    combined = adapterhub.load(out)
    assert (combined.family, combined.base) == (family, f"tiny-{family}")
    _close(ours_merged(pipe, out), expected, base, min_changed=4)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_resize_is_the_truncated_svd_of_each_delta(family, request, tmp_path, capsys):
    pipe = request.getfixturevalue(f"tiny_{family}")
    source, _ = _two_files(pipe, family, tmp_path)
    out = tmp_path / "small.safetensors"
    rc, _, err = _cli(capsys, "lora", "resize", str(source), "--rank", "2", "--out", str(out))
    assert rc == 0, err
    base, full = state(pipe), diffusers_fused(pipe, source)
    expected = {}
    for k, w in base.items():
        delta = full[k] - w
        if w.dim() != 2 or not delta.any():
            expected[k] = full[k]
            continue
        u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
        expected[k] = w + ((u[:, :2] * s[:2]) @ vh[:2]).float()
    _close(ours_merged(pipe, out), expected, base, min_changed=4)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_extract_gives_back_a_low_rank_fine_tune(family, request, tmp_path):
    """tuned = base + a rank-4 PEFT LoRA fused by diffusers: extracting at rank 4 and merging gives tuned back."""
    from adapterhub.algebra.ops import extract

    pipe = request.getfixturevalue(f"tiny_{family}")
    paths = FLUX_PATHS if family == "flux" else SD3_PATHS
    source = peft_file(tmp_path / "ft.safetensors", pipe.transformer, paths, seed=3)
    tuned = copy.deepcopy(pipe)
    tuned.transformer.load_state_dict(diffusers_fused(pipe, source))
    result = extract(pipe, tuned, rank=4)
    out = result.save(tmp_path / "extracted.safetensors")
    assert (result.adapter.family, result.adapter.base) == (family, f"tiny-{family}")
    assert len(result.adapter.patches) == len(paths)
    _close(ours_merged(pipe, out), state(tuned), state(pipe), min_changed=len(paths))


def test_combining_flux_and_sd3_is_refused_in_one_line(tiny_flux, tiny_sd3, tmp_path, capsys):
    flux = peft_file(tmp_path / "flux.safetensors", tiny_flux.transformer, FLUX_PATHS[:1])
    sd3 = peft_file(tmp_path / "sd3.safetensors", tiny_sd3.transformer, SD3_PATHS[:1])
    rc, _, err = _cli(capsys, "lora", "combine", str(flux), str(sd3), "--out", str(tmp_path / "o.safetensors"))
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert str(sd3) in errors[0] and "tiny-flux" in errors[0] and "tiny-sd3" in errors[0]
    assert not (tmp_path / "o.safetensors").exists()


def test_flux_dev_and_width_only_flux_loras_combine(tmp_path, capsys):
    """flux-dev (the guidance embedder patched) and flux (no telling module) are one architecture."""
    import adapterhub
    from safetensors.torch import save_file

    def lora(path, name, out_f, in_f):
        gen = torch.Generator().manual_seed(len(name))
        save_file({f"{name}.lora_down.weight": torch.randn(1, in_f, generator=gen),
                   f"{name}.lora_up.weight": torch.randn(out_f, 1, generator=gen)}, str(path))
        return path

    dev = lora(tmp_path / "dev.safetensors", "lora_unet_guidance_in_in_layer", 3072, 256)
    plain = lora(tmp_path / "plain.safetensors", "lora_unet_double_blocks_0_img_attn_proj", 3072, 3072)
    assert (adapterhub.load(dev).base, adapterhub.load(plain).base) == ("flux-dev", "flux")
    out = tmp_path / "both.safetensors"
    rc, stdout, err = _cli(capsys, "lora", "combine", str(dev), str(plain), "--out", str(out), "--json")
    assert rc == 0, err
    assert (adapterhub.load(out).family, adapterhub.load(out).base) == ("flux", "flux-dev")
    assert json.loads(stdout)
