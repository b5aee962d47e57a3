"""The LoRA family's pure math (plugins/lora/math.py) against independent formulas.

Every expected value is computed here another way: the conv identity with ``F.conv2d`` (kohya's
form, formats.md §0.2) and by running the layers themselves, the CP/Tucker cores with explicit loops,
the Kronecker product by building its blocks by hand, and the LyCORIS functional implementations
where they exist.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adapterhub_plugins.lora import math as lmath
from adapterhub_plugins.lora.patches import AdaLoRAPatch, LoHaPatch, LoKrPatch, LoRAPatch

GEN = torch.Generator().manual_seed(0)


def rnd(*shape):
    return torch.randn(*shape, generator=GEN)


def close(a, b, atol=1e-5):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a.float() - b.float()).abs().max().item()
    assert err <= atol, err


# ---------------------------------------------------------------------------------------------
# LoRA / LoCon
# ---------------------------------------------------------------------------------------------
def test_linear_lora_is_up_times_down():
    up, down = rnd(7, 3), rnd(3, 5)
    expected = torch.stack([sum(up[i, k] * down[k] for k in range(3)) for i in range(7)])
    close(lmath.lora(up, down), expected)


@pytest.mark.parametrize("kernel,stride,padding", [((3, 3), 1, 1), ((3, 3), 2, 1), ((1, 1), 1, 0), ((3, 1), 1, 0)])
def test_conv_identity_matches_conv2d_form_and_the_layers(kernel, stride, padding):
    out_c, in_c, r = 6, 4, 3
    down, up = rnd(r, in_c, *kernel), rnd(out_c, r, 1, 1)
    delta = lmath.lora(up, down)
    # kohya merge_to / merge_lora.py form
    close(delta, F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3))
    # and the two layers it replaces: conv(x, D) then 1x1 conv(., U)
    x = rnd(2, in_c, 9, 8)
    chained = F.conv2d(F.conv2d(x, down, stride=stride, padding=padding), up)
    close(F.conv2d(x, delta, stride=stride, padding=padding), chained, atol=1e-4)


def test_cp_locon_matches_loops_and_layer_chain():
    out_c, in_c, r = 5, 4, 3
    up, mid, down = rnd(out_c, r, 1, 1), rnd(r, r, 3, 3), rnd(r, in_c, 1, 1)
    delta = lmath.lora(up, down, mid)
    expected = torch.zeros(out_c, in_c, 3, 3)
    for o in range(out_c):
        for i in range(in_c):
            for n in range(r):
                for m in range(r):
                    expected[o, i] += up[o, n, 0, 0] * mid[n, m] * down[m, i, 0, 0]
    close(delta, expected)
    x = rnd(1, in_c, 7, 7)  # lora_down (1x1) -> lora_mid (3x3, carries the padding) -> lora_up (1x1)
    chained = F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up)
    close(F.conv2d(x, delta, padding=1), chained, atol=1e-4)


def test_lora_patch_scale_rules():
    up, down = rnd(4, 2), rnd(2, 6)
    weight = torch.zeros(4, 6)
    close(LoRAPatch("t", "s", {"up": up, "down": down}, alpha=1.0).delta(weight), (up @ down) * 0.5)
    close(LoRAPatch("t", "s", {"up": up, "down": down}, alpha=None).delta(weight), up @ down)  # no alpha: 1
    # a 1x1 conv target takes the same linear factors (kohya squeezes / unsqueezes)
    close(LoRAPatch("t", "s", {"up": up[..., None, None], "down": down[..., None, None]}, alpha=4.0)
          .delta(torch.zeros(4, 6, 1, 1)), (2 * up @ down)[..., None, None])


# ---------------------------------------------------------------------------------------------
# LoHa
# ---------------------------------------------------------------------------------------------
def test_loha_plain_is_hadamard_of_two_products():
    w1a, w1b, w2a, w2b = rnd(6, 2), rnd(2, 10), rnd(6, 2), rnd(2, 10)
    expected = torch.empty(6, 10)
    for i in range(6):
        for j in range(10):
            expected[i, j] = (w1a[i] @ w1b[:, j]) * (w2a[i] @ w2b[:, j])
    close(lmath.loha(w1a, w1b, w2a, w2b), expected)


def _tucker_by_loops(t, wa, wb):
    """W[p, q, k, l] = sum_{i,j} t[i, j, k, l] * wa[i, p] * wb[j, q] (formats.md §2.2, transposed wa)."""
    r1, r2, kh, kw = t.shape
    out = torch.zeros(wa.shape[1], wb.shape[1], kh, kw)
    for p in range(wa.shape[1]):
        for q in range(wb.shape[1]):
            for i in range(r1):
                for j in range(r2):
                    out[p, q] += t[i, j] * wa[i, p] * wb[j, q]
    return out


def test_loha_cp_matches_explicit_sum():
    r, out_c, in_c = 2, 4, 3
    t1, t2 = rnd(r, r, 3, 3), rnd(r, r, 3, 3)
    w1a, w1b, w2a, w2b = rnd(r, out_c), rnd(r, in_c), rnd(r, out_c), rnd(r, in_c)
    expected = _tucker_by_loops(t1, w1a, w1b) * _tucker_by_loops(t2, w2a, w2b)
    close(lmath.loha(w1a, w1b, w2a, w2b, t1, t2), expected)
    patch = LoHaPatch("t", "s", {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b,
                                 "hada_t1": t1, "hada_t2": t2}, alpha=1.0)
    assert patch.expected_shape() == (out_c, in_c, 3, 3) and patch.rank == r
    close(patch.delta(torch.zeros(out_c, in_c, 3, 3)), expected / r)


def test_loha_matches_lycoris_functional():
    from lycoris.functional import loha as ly

    w1a, w1b, w2a, w2b = rnd(6, 3), rnd(3, 8), rnd(6, 3), rnd(3, 8)
    # LyCORIS names them by direction: hada_w1_a is "w1u" (out, r), hada_w1_b is "w1d" (r, in)
    close(lmath.loha(w1a, w1b, w2a, w2b), ly.make_weight(w1b, w1a, w2b, w2a, torch.tensor(1.0)))
    t1, t2 = rnd(3, 3, 3, 3), rnd(3, 3, 3, 3)
    a1, b1, a2, b2 = rnd(3, 5), rnd(3, 4), rnd(3, 5), rnd(3, 4)
    close(lmath.loha(a1, b1, a2, b2, t1, t2), ly.make_weight_tucker(t1, b1, a1, t2, b2, a2, torch.tensor(1.0)))


# ---------------------------------------------------------------------------------------------
# LoKr
# ---------------------------------------------------------------------------------------------
def _kron_by_blocks(a, b):
    rows = [torch.cat([a[i, j] * b for j in range(a.shape[1])], dim=1) for i in range(a.shape[0])]
    return torch.cat(rows, dim=0)


def test_lokr_whole_factors_is_block_matrix():
    w1, w2 = rnd(2, 3), rnd(4, 5)
    close(lmath.lokr(w1=w1, w2=w2), _kron_by_blocks(w1, w2))


def test_lokr_low_rank_factors():
    w1a, w1b, w2a, w2b = rnd(3, 2), rnd(2, 2), rnd(5, 2), rnd(2, 4)
    close(lmath.lokr(w1_a=w1a, w1_b=w1b, w2_a=w2a, w2_b=w2b), _kron_by_blocks(w1a @ w1b, w2a @ w2b))


def test_lokr_conv_is_kron_per_kernel_position():
    w1, w2 = rnd(2, 3), rnd(4, 5, 3, 3)
    delta = lmath.lokr(w1=w1, w2=w2).reshape(8, 15, 3, 3)
    for y in range(3):
        for x in range(3):
            close(delta[:, :, y, x], _kron_by_blocks(w1, w2[:, :, y, x]))
    # formats.md §2.3: kron(W1[:, :, None, None], W2)
    close(delta, torch.kron(w1[:, :, None, None], w2))


def test_lokr_tucker_w2():
    r, k, n = 2, 4, 3
    w1, t2, w2a, w2b = rnd(2, 2), rnd(r, r, 3, 3), rnd(r, k), rnd(r, n)
    w2 = _tucker_by_loops(t2, w2a, w2b)
    delta = lmath.lokr(w1=w1, w2_a=w2a, w2_b=w2b, t2=t2).reshape(2 * k, 2 * n, 3, 3)
    close(delta, torch.kron(w1[:, :, None, None], w2))


def test_lokr_scale_rules():
    # rank from w1_b (else w2_b); both factors whole -> scale 1 (A1111, ComfyUI)
    whole = LoKrPatch("t", "s", {"lokr_w1": rnd(2, 2), "lokr_w2": rnd(3, 3)}, alpha=8.0)
    assert whole.rank is None and whole.scale == 1.0
    low = LoKrPatch("t", "s", {"lokr_w1": rnd(2, 2), "lokr_w2_a": rnd(3, 4), "lokr_w2_b": rnd(4, 3)}, alpha=2.0)
    assert low.rank == 4 and low.scale == 0.5
    both = LoKrPatch("t", "s", {"lokr_w1_a": rnd(2, 1), "lokr_w1_b": rnd(1, 2), "lokr_w2_a": rnd(3, 4),
                               "lokr_w2_b": rnd(4, 3)}, alpha=2.0)
    assert both.rank == 1 and both.scale == 2.0


def test_lokr_matches_lycoris_functional():
    from lycoris.functional import lokr as ly

    w1, w2a, w2b = rnd(2, 4), rnd(6, 2), rnd(2, 5)
    expected = ly.make_kron(w1, w2a @ w2b, 1.0)
    close(lmath.lokr(w1=w1, w2_a=w2a, w2_b=w2b), expected.reshape(12, 20))


# ---------------------------------------------------------------------------------------------
# AdaLoRA
# ---------------------------------------------------------------------------------------------
def test_adalora_triplet_and_scale():
    a, e, b = rnd(3, 5), rnd(3, 1), rnd(4, 3)
    expected = sum(b[:, i:i + 1] * e[i, 0] * a[i:i + 1, :] for i in range(3))
    close(lmath.adalora(a, e, b), expected)
    patch = AdaLoRAPatch("t", "s", {"down": a, "E": e, "up": b}, lora_alpha=6.0)
    close(patch.delta(torch.zeros(4, 5)), expected * 6.0 / (3 + 1e-5))
    # PEFT keeps ranknum = init_r after the rank allocator slices the triplets
    sliced = AdaLoRAPatch("t", "s", {"down": a[:2], "E": e[:2], "up": b[:, :2]}, lora_alpha=6.0, ranknum=3)
    close(sliced.delta(torch.zeros(4, 5)), lmath.adalora(a[:2], e[:2], b[:, :2]) * 6.0 / (3 + 1e-5))


def test_math_is_float32_for_half_inputs():
    up, down = rnd(4, 2).half(), rnd(2, 3).bfloat16()
    out = lmath.lora(up, down)
    assert out.dtype == torch.float32
    close(out, up.float() @ down.float())
