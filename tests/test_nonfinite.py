"""No silent NaN (issue #16 item 3): a NaN / Inf in a factor, a non-finite alpha, a float64 alpha that
overflows float32, finite factors whose product overflows the model's dtype (or the dtype the merge is
saved in) are refused before the first weight changes, by merge, attach, set_weight and Stack alike,
with one line naming the file and the key; ``inspect`` reports non-finite tensors. And #18 item 7: a
dict of modules without a UNet has one patcher, so attach / detach in any order restores exactly.
"""
from __future__ import annotations

import itertools

import pytest
import torch
from safetensors.torch import load_file, save_file

import adapterhub
from adapterhub.cli import main as cli_main
from adapterhub.errors import AdapterError
from adapterhub.plugins import adapter_type
from adapterhub.stack import Stack
from adapterhub.weights import attach, check_adapter_finite, merge

from lora_helpers import parts, quiet

quiet()

LIN = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # Linear 32 -> 32
LIN_PATH = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
FF = "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2"  # Linear 256 -> 64
NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def sd1():
    return parts("tiny-sd1")


@pytest.fixture(scope="module")
def sd1_half():
    return parts("tiny-sd1", dtype=torch.float16)


def _params(model) -> dict[str, torch.Tensor]:
    """Every parameter the weight engine may write, by name; no copies."""
    parts_ = {c: getattr(model, c) for c in ("unet", "text_encoder")}
    return {f"{c}.{n}": p for c, module in parts_.items() for n, p in module.named_parameters()}


def _copy(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in _params(model).items()}


def _same(model, before) -> None:
    after = _params(model)
    assert after.keys() == before.keys()
    changed = [k for k, v in before.items() if not torch.equal(after[k], v)]
    assert changed == [], changed[:3]


def _write(tensors, path):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def _lora(name=LIN, out=32, inn=32, r=2, seed=0, alpha=1.0):
    g = torch.Generator().manual_seed(seed)
    t = {f"{name}.lora_down.weight": torch.randn(r, inn, generator=g) * 0.1,
         f"{name}.lora_up.weight": torch.randn(out, r, generator=g) * 0.1}
    if alpha is not None:
        t[f"{name}.alpha"] = torch.tensor(alpha)
    return t


def _with(t: dict, key: str, value) -> dict:
    return {**t, key: value}


def _poke(t: torch.Tensor, value: float, index: int = 5) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[index] = value
    return t


def _bad_files(tmp_path) -> dict[str, tuple]:
    """case -> (path, the key the message names, a word it holds)."""
    good = {**_lora(), **_lora(FF, out=64, inn=256, seed=1)}
    d, u, a = f"{LIN}.lora_down.weight", f"{LIN}.lora_up.weight", f"{LIN}.alpha"
    cases = {
        "nan_in_up": (_with(good, u, _poke(good[u], NAN)), u, "NaN"),
        "inf_in_down": (_with(good, d, _poke(good[d], -INF)), d, "infinite"),
        "alpha_inf": (_with(good, a, torch.tensor(INF)), a, "alpha"),
        "alpha_nan": (_with(good, a, torch.tensor(NAN)), a, "alpha"),
        "alpha_float64_overflows_float32": (_with(good, a, torch.tensor(1e300, dtype=torch.float64)), a, "alpha"),
        "product_overflows_float32": ({**good, d: torch.full((2, 32), 1e20), u: torch.full((32, 2), 1e20)}, LIN,
                                      "overflows float32"),
        "fp16_factors_with_inf": (_with(good, u, _poke(good[u].half(), INF)), u, "infinite"),
    }
    return {c: (_write(t, tmp_path / f"{c}.safetensors"), key, word) for c, (t, key, word) in cases.items()}


CASES = ["nan_in_up", "inf_in_down", "alpha_inf", "alpha_nan", "alpha_float64_overflows_float32",
         "product_overflows_float32", "fp16_factors_with_inf"]


def _one_line(err, path, key, word):
    message = str(err.value)
    assert "\n" not in message and str(path) in message and key in message and word in message, message
    return message


@pytest.mark.parametrize("case", CASES)
def test_merge_and_attach_refuse_nonfinite_before_any_change(case, sd1, tmp_path):
    path, key, word = _bad_files(tmp_path)[case]
    before = _copy(sd1)
    adapter = adapterhub.load(path)  # loading is fine: the file is what it is, and inspect shows it
    for apply in (lambda: merge(sd1, [(adapter, 1.0)]), lambda: attach(sd1, adapter, 1.0),
                  lambda: Stack([(adapter, 0.7)]).apply(sd1), lambda: Stack([(adapter, 0.7)]).apply(sd1, mode="merge")):
        with pytest.raises(AdapterError) as err:
            apply()
        _one_line(err, path, key, word)
        _same(sd1, before)


def test_a_weight_zero_does_not_excuse_a_nan(sd1, tmp_path):
    """A broken file is refused at any multiplier (set_weight could not raise it later without a NaN)."""
    path, key, word = _bad_files(tmp_path)["nan_in_up"]
    before = _copy(sd1)
    with pytest.raises(AdapterError) as err:
        attach(sd1, adapterhub.load(path), 0.0)
    _one_line(err, path, key, word)
    _same(sd1, before)


def test_fp16_model_refuses_a_delta_beyond_65504(sd1_half, tmp_path):
    d, u = f"{LIN}.lora_down.weight", f"{LIN}.lora_up.weight"
    # each element of the delta is 2 * 300 * 300 = 180000: a float32 number, not a float16 one
    path = _write({d: torch.full((2, 32), 300.0), u: torch.full((32, 2), 300.0)}, tmp_path / "big.safetensors")
    before = _copy(sd1_half)
    adapter = adapterhub.load(path)
    for apply in (lambda: merge(sd1_half, [(adapter, 1.0)]), lambda: attach(sd1_half, adapter, 1.0)):
        with pytest.raises(AdapterError) as err:
            apply()
        _one_line(err, path, LIN, "float16")
        _same(sd1_half, before)
    # at weight 0.25 every element is 45000 plus the weight: float16 holds it, so it merges
    handle = attach(sd1_half, adapter, 0.25)
    w = sd1_half.unet.get_submodule(LIN_PATH).weight
    assert torch.isfinite(w).all() and w.abs().max() > 40000
    handle.detach()
    _same(sd1_half, before)


def test_large_bound_but_finite_result_merges_exactly(sd1_half, tmp_path):
    """The cheap bound is only a bound: factors whose bound exceeds float16 but whose product cancels
    are computed exactly and merged (no false refusal), to the same bits as a plain float32 merge."""
    d, u = f"{LIN}.lora_down.weight", f"{LIN}.lora_up.weight"
    down = torch.stack([torch.full((32,), 300.0), torch.full((32,), -300.0)])
    up = torch.full((32, 2), 300.0)  # up @ down == 0 exactly; the bound says 180000
    path = _write({d: down, u: up}, tmp_path / "cancels.safetensors")
    before = _copy(sd1_half)
    handle = attach(sd1_half, adapterhub.load(path), 1.0)
    _same(sd1_half, before)  # W + 0, cast back: the same bits
    handle.detach()


def test_set_weight_that_would_overflow_is_refused_and_the_handle_lives_on(sd1_half, tmp_path):
    path = _write(_lora(), tmp_path / "good.safetensors")
    before = _copy(sd1_half)
    handle = attach(sd1_half, adapterhub.load(path), 1.0)
    during = _copy(sd1_half)
    with pytest.raises(AdapterError) as err:
        handle.set_weight(1e9)
    _one_line(err, path, LIN, "float16")
    _same(sd1_half, during)
    handle.set_weight(0.5)
    handle.set_weight(1.0)
    _same(sd1_half, during)
    handle.detach()
    _same(sd1_half, before)


def test_a_bad_attach_leaves_a_live_one_working(sd1, tmp_path):
    files = _bad_files(tmp_path)
    good = adapterhub.load(_write(_lora(seed=3), tmp_path / "good.safetensors"))
    before = _copy(sd1)
    handle = attach(sd1, good, 0.8)
    during = _copy(sd1)
    for case in ("nan_in_up", "product_overflows_float32"):
        with pytest.raises(AdapterError):
            attach(sd1, adapterhub.load(files[case][0]), 1.0)
        _same(sd1, during)
    handle.detach()
    _same(sd1, before)


def test_stack_set_weights_that_would_overflow_changes_nothing(sd1_half, tmp_path):
    path = _write(_lora(), tmp_path / "style.safetensors")
    before = _copy(sd1_half)
    stack = Stack([(path, 1.0)]).apply(sd1_half)
    during = _copy(sd1_half)
    with pytest.raises(AdapterError):
        stack.set_weights([1e9])
    _same(sd1_half, during)
    stack.remove()
    _same(sd1_half, before)


def test_merge_checks_the_dtype_it_is_saved_in(sd1, tmp_path):
    """``adapterhub merge --dtype fp16`` merges in the base's float32 and casts on save: the check takes
    that dtype too (``merge(..., dtype=)``, ``Stack.apply(..., dtype=)``)."""
    d, u = f"{LIN}.lora_down.weight", f"{LIN}.lora_up.weight"
    path = _write({d: torch.full((2, 32), 300.0), u: torch.full((32, 2), 300.0)}, tmp_path / "big.safetensors")
    adapter = adapterhub.load(path)
    before = _copy(sd1)
    for apply in (lambda: merge(sd1, [(adapter, 1.0)], dtype=torch.float16),
                  lambda: Stack([(adapter, 1.0)]).apply(sd1, mode="merge", dtype=torch.float16)):
        with pytest.raises(AdapterError) as err:
            apply()
        _one_line(err, path, LIN, "float16")
        _same(sd1, before)
    merged = parts("tiny-sd1")
    merge(merged, [(adapter, 1.0)], dtype=torch.bfloat16)  # bfloat16 holds 180000
    assert torch.isfinite(merged.unet.get_submodule(LIN_PATH).weight).all()


@pytest.mark.parametrize("case", ["nan_in_up", "alpha_float64_overflows_float32", "product_overflows_float32"])
def test_cli_merge_is_one_line_exit_2_nothing_written(case, tmp_path, capsys):
    path, key, word = _bad_files(tmp_path)[case]
    out = tmp_path / "merged.safetensors"
    capsys.readouterr()
    rc = cli_main(["merge", "--base", "tiny-sd1", "--out", str(out), str(path)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert rc == 2 and len(errors) == 1 and key in errors[0] and str(path) in errors[0], err
    assert "Traceback" not in err and not out.exists() and not list(tmp_path.glob(".merged*"))


# ---------------------------------------------------------------------------------------------
# inspect and the hook for convert
# ---------------------------------------------------------------------------------------------
def test_inspect_reports_nonfinite_tensors(tmp_path):
    files = _bad_files(tmp_path)
    facts = adapterhub.inspect(files["nan_in_up"][0], with_hash=False)
    assert facts["non_finite"] == {"tensors": 1, "first_key": f"{LIN}.lora_up.weight"}
    facts = adapterhub.inspect(files["alpha_float64_overflows_float32"][0], with_hash=False)
    assert facts["non_finite"]["first_key"] == f"{LIN}.alpha"
    clean = _write(_lora(), tmp_path / "clean.safetensors")
    assert "non_finite" not in adapterhub.inspect(clean, with_hash=False)


def test_check_adapter_finite_names_the_key(tmp_path):
    files = _bad_files(tmp_path)
    for case in ("inf_in_down", "alpha_inf"):
        path, key, word = files[case]
        with pytest.raises(AdapterError) as err:
            check_adapter_finite(adapterhub.load(path))
        _one_line(err, path, key, word)
    check_adapter_finite(adapterhub.load(_write(_lora(), tmp_path / "clean.safetensors")))


# ---------------------------------------------------------------------------------------------
# #18 item 7: a dict of modules without a UNet has one patcher
# ---------------------------------------------------------------------------------------------
def _text_only(model, path, seed):
    full = adapter_type("lora").example(model, path.with_name(f"full{seed}.safetensors"), seed=seed)
    tensors = {k: v for k, v in load_file(str(full)).items() if k.startswith("lora_te_")}
    assert tensors
    return adapterhub.load(_write(tensors, path))


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_dict_model_without_unet_detaches_exactly_in_any_order(order, sd1, tmp_path):
    te = parts("tiny-sd1").text_encoder
    adapters = [_text_only(sd1, tmp_path / f"te{i}.safetensors", seed=i + 1) for i in range(3)]
    before = {n: p.detach().clone() for n, p in te.named_parameters()}
    handles = [attach({"text_encoder": te}, a, w) for a, w in zip(adapters, (1.0, 0.7, -0.4))]  # a new dict each call
    assert any(not torch.equal(p, before[n]) for n, p in te.named_parameters())
    for i in order:
        handles[i].detach()
    changed = [n for n, p in te.named_parameters() if not torch.equal(p, before[n])]
    assert changed == []


def test_dict_model_without_unet_has_one_stack_guard(sd1, tmp_path):
    te = parts("tiny-sd1").text_encoder
    a = _text_only(sd1, tmp_path / "te.safetensors", seed=1)
    before = {n: p.detach().clone() for n, p in te.named_parameters()}
    first = Stack([(a, 1.0)]).apply({"text_encoder": te})
    with pytest.raises(adapterhub.errors.AdapterhubError):
        Stack([(a, 0.5)]).apply({"text_encoder": te})
    first.remove()
    assert all(torch.equal(p, before[n]) for n, p in te.named_parameters())


@pytest.mark.parametrize("to", ["kohya", "diffusers"])
def test_convert_refuses_nonfinite_files_and_writes_nothing(tmp_path, capsys, to):
    """convert writes an adapter without applying it: the finite check guards it too (one line, exit 2)."""
    files = _bad_files(tmp_path)
    for case in ("nan_in_up", "alpha_inf"):
        path, key, word = files[case]
        out = tmp_path / f"{case}-{to}.safetensors"
        rc = cli_main(["convert", str(path), "--to", to, "--out", str(out)])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error")]
        assert rc == 2 and len(errors) == 1 and key in errors[0] and str(path) in errors[0], err
        assert not out.exists() and not list(tmp_path.glob(f".{out.name}*"))


def test_merge_dtype_fp16_refuses_a_result_beyond_fp16(tmp_path, capsys):
    """Finite in float32, past float16's 65504: `merge --dtype fp16` refuses before writing; fp32 merges."""
    t = {f"{LIN}.lora_down.weight": torch.full((1, 32), 300.0), f"{LIN}.lora_up.weight": torch.full((32, 1), 300.0),
         f"{LIN}.alpha": torch.tensor(1.0)}
    path = _write(t, tmp_path / "big.safetensors")
    out = tmp_path / "half"
    rc = cli_main(["merge", "--base", "tiny-sd1", "--dtype", "fp16", "--out", str(out), str(path)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert rc == 2 and len(errors) == 1 and str(path) in errors[0], err
    assert not out.exists()
    assert cli_main(["merge", "--base", "tiny-sd1", "--out", str(tmp_path / "full"), str(path)]) == 0


@pytest.mark.parametrize("command", ["combine", "resize"])
def test_lora_algebra_refuses_nonfinite_inputs_and_writes_nothing(tmp_path, capsys, command):
    """combine / resize re-factorise deltas: a NaN factor or an infinite alpha is one line, exit 2, no output."""
    files = _bad_files(tmp_path)
    good = _write(_lora(), tmp_path / "good.safetensors")
    for case in ("nan_in_up", "alpha_inf"):
        path, key, word = files[case]
        out = tmp_path / f"{case}-{command}.safetensors"
        args = (["lora", "combine", f"{good}:0.5", f"{path}:0.5", "--out", str(out)] if command == "combine"
                else ["lora", "resize", str(path), "--rank", "1", "--out", str(out)])
        rc = cli_main(args)
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error")]
        assert rc == 2 and len(errors) == 1 and key in errors[0] and str(path) in errors[0], err
        assert "Traceback" not in err and not out.exists()
