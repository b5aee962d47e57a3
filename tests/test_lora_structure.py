"""Structural validation of LoRA-family files before any weight changes (issue #16 items 3 and 4).

Every broken tensor set (an alpha that is not one number, 1-D factors, rank 0, up/down ranks that
disagree, a down without its up or an up without its down, LoHa / LoKr factors that do not chain,
NaN / Inf anywhere, a delta that overflows the model's dtype) is one ``AdapterError`` line naming the
file and the key, exit code 2 from the CLI, and the model bit-for-bit untouched. A seeded fuzz over
LoRA tensor sets on the tiny SD1 base's real module names checks that for every bad file, and that
the good ones merge to what lycoris-lora's reference functions compute.
"""
from __future__ import annotations

import copy
import random

import pytest
import torch
from safetensors.torch import save_file

import adapterhub
from adapterhub.cli import main as cli_main
from adapterhub.errors import AdapterError
from adapterhub.plugins import adapter_type
from adapterhub.weights import attach, merge

from lora_helpers import parts, quiet

quiet()

# kohya module names on tiny-sd1 -> (component, module path inside it)
LIN = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # Linear 32 -> 32
FF = "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2"  # Linear 256 -> 64
TE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"  # CLIP Linear
PROJ = "lora_unet_down_blocks_0_attentions_0_proj_in"  # 1x1 conv
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"  # 3x3 conv
MODULES = {
    LIN: ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
    FF: ("unet", "mid_block.attentions.0.transformer_blocks.0.ff.net.2"),
    TE: ("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj"),
    PROJ: ("unet", "down_blocks.0.attentions.0.proj_in"),
    CONV: ("unet", "down_blocks.0.resnets.0.conv1"),
}


@pytest.fixture(scope="module")
def sd1():
    return parts("tiny-sd1")


@pytest.fixture(scope="module")
def sd1_half():
    return parts("tiny-sd1", dtype=torch.float16)


def _module(model, name):
    comp, path = MODULES[name]
    root = getattr(model, comp)
    try:
        return root.get_submodule(path)
    except AttributeError:  # transformers >= 5 flattens CLIPTextModel (no ``text_model.``)
        return root.get_submodule(path.removeprefix("text_model."))


def _key(model, name) -> str:
    """The ``component.param`` name of the module's weight, as :func:`_params` spells it."""
    comp = MODULES[name][0]
    target = _module(model, name)
    return next(f"{comp}.{n}.weight" for n, m in getattr(model, comp).named_modules() if m is target)


def _write(tensors, path):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def _lora(model, name, r=2, gen=None, dtype=torch.float32, alpha=1.0):
    shape = _module(model, name).weight.shape
    gen = gen or torch.Generator().manual_seed(0)
    up_shape = (shape[0], r, 1, 1) if len(shape) == 4 else (shape[0], r)
    out = {f"{name}.lora_down.weight": (torch.randn(r, *shape[1:], generator=gen) * 0.1).to(dtype),
           f"{name}.lora_up.weight": (torch.randn(*up_shape, generator=gen) * 0.1).to(dtype)}
    if alpha is not None:
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def _params(model) -> dict[str, torch.Tensor]:
    """Every parameter of every component (what the weight engine may write), by name; no copies."""
    return {f"{comp}.{n}": p for comp in ("unet", "text_encoder") for n, p in getattr(model, comp).named_parameters()}


def _changed(model, before: dict[str, torch.Tensor]) -> list[str]:
    after = _params(model)
    assert after.keys() == before.keys()
    return [k for k, v in before.items() if not torch.equal(after[k], v)]


def _refused(model, path, key, how=("merge", "attach"), before=None):
    """Loading and applying ``path`` raises one AdapterError line naming the file and ``key``; the
    model is bit-for-bit what it was (``before``: its parameters' values). Returns the message."""
    before = before if before is not None else {k: v.detach().clone() for k, v in _params(model).items()}
    messages = []
    for way in how:
        with pytest.raises(AdapterError) as err:
            adapter = adapterhub.load(path)
            if way == "merge":
                merge(model, [(adapter, 1.0)])
            else:
                attach(model, adapter, 1.0)
        message = str(err.value)
        assert "\n" not in message, message
        assert str(path) in message, message
        assert key in message, message
        assert _changed(model, before) == []
        messages.append(message)
    return messages[0]


# ---------------------------------------------------------------------------------------------
# one case per rule (LoRA / LoCon)
# ---------------------------------------------------------------------------------------------
def _lora_cases(model):
    """name -> (tensors, the key the message must name, a word it must contain)."""
    good = _lora(model, FF)
    d, u, a = f"{LIN}.lora_down.weight", f"{LIN}.lora_up.weight", f"{LIN}.alpha"
    base = _lora(model, LIN)
    cm = f"{CONV}.lora_mid.weight"
    conv_cp = {f"{CONV}.lora_down.weight": torch.randn(2, 32, 1, 1), f"{CONV}.lora_up.weight": torch.randn(32, 2, 1, 1),
               cm: torch.randn(2, 2, 3, 3)}
    return {
        "alpha_not_scalar": ({**good, **base, a: torch.ones(3)}, a, "alpha"),
        "alpha_2d": ({**good, **base, a: torch.ones(1, 2)}, a, "alpha"),
        "down_1d": ({**good, **base, d: torch.randn(32)}, d, "1-D"),
        "up_1d": ({**good, **base, u: torch.randn(32)}, u, "1-D"),
        "down_3d": ({**good, **base, d: torch.randn(2, 32, 1)}, d, "3-D"),
        "rank_0": ({**good, d: torch.randn(0, 32), u: torch.randn(32, 0)}, d, "rank 0"),
        "ranks_disagree": ({**good, d: torch.randn(2, 32), u: torch.randn(32, 3)}, u, "rank"),
        "down_without_up": ({**good, d: torch.randn(2, 32)}, d, "no up"),
        "up_without_down": ({**good, u: torch.randn(32, 2)}, u, "down"),
        "mid_rank_disagrees": ({**good, **conv_cp, cm: torch.randn(3, 2, 3, 3)}, cm, "rank"),
        "mid_is_2d": ({**good, **conv_cp, cm: torch.randn(2, 2)}, cm, "4-D"),
        "mid_with_kxk_down": ({**good, **conv_cp, f"{CONV}.lora_down.weight": torch.randn(2, 32, 3, 3)},
                              f"{CONV}.lora_down.weight", "1x1"),
    }


CASES = ["alpha_not_scalar", "alpha_2d", "down_1d", "up_1d", "down_3d", "rank_0", "ranks_disagree",
         "down_without_up", "up_without_down", "mid_rank_disagrees", "mid_is_2d", "mid_with_kxk_down"]


@pytest.mark.parametrize("case", CASES)
def test_lora_structure_is_one_line_and_changes_nothing(case, sd1, tmp_path):
    tensors, key, word = _lora_cases(sd1)[case]
    path = _write(tensors, tmp_path / f"{case}.safetensors")
    message = _refused(sd1, path, key)
    assert word in message, message


def _loha(r=2, out=32, inn=32):
    g = torch.Generator().manual_seed(1)
    return {f"{LIN}.hada_w1_a": torch.randn(out, r, generator=g), f"{LIN}.hada_w1_b": torch.randn(r, inn, generator=g),
            f"{LIN}.hada_w2_a": torch.randn(out, r, generator=g), f"{LIN}.hada_w2_b": torch.randn(r, inn, generator=g),
            f"{LIN}.alpha": torch.tensor(1.0)}


def _loha_cp(r=2):
    g = torch.Generator().manual_seed(2)
    out = {f"{CONV}.hada_{w}": torch.randn(r, 32, generator=g) for w in ("w1_a", "w1_b", "w2_a", "w2_b")}
    return {**out, **{f"{CONV}.hada_{t}": torch.randn(r, r, 3, 3, generator=g) for t in ("t1", "t2")}}


def _lokr(r=2):
    g = torch.Generator().manual_seed(3)  # 32x32 = kron((4, 4), (8, 8)), w2 low rank
    return {f"{LIN}.lokr_w1": torch.randn(4, 4, generator=g), f"{LIN}.lokr_w2_a": torch.randn(8, r, generator=g),
            f"{LIN}.lokr_w2_b": torch.randn(r, 8, generator=g), f"{LIN}.alpha": torch.tensor(1.0)}


def _lycoris_cases():
    k = lambda role, m=LIN: f"{m}.{role}"  # noqa: E731
    loha, cp, lokr = _loha(), _loha_cp(), _lokr()
    drop = lambda d, key: {n: v for n, v in d.items() if n != key}  # noqa: E731
    return {
        "loha_ranks_disagree": ({**loha, k("hada_w1_b"): torch.randn(3, 32)}, k("hada_w1_b"), "rank"),
        "loha_halves_disagree": ({**loha, k("hada_w2_a"): torch.randn(16, 2), k("hada_w2_b"): torch.randn(2, 64)},
                                 k("hada_w2_a"), "shape"),
        "loha_missing_w2_b": (drop(loha, k("hada_w2_b")), k("hada_w2_a"), "hada_w2_b"),
        "loha_1d": ({**loha, k("hada_w1_a"): torch.randn(32)}, k("hada_w1_a"), "1-D"),
        "loha_rank_0": ({**loha, k("hada_w1_a"): torch.randn(32, 0), k("hada_w1_b"): torch.randn(0, 32)},
                        k("hada_w1_b"), "rank 0"),
        "loha_t1_without_t2": (drop(cp, k("hada_t2", CONV)), k("hada_t1", CONV), "hada_t2"),
        "loha_core_disagrees": ({**cp, k("hada_t1", CONV): torch.randn(3, 2, 3, 3)}, k("hada_t1", CONV), "rank"),
        "lokr_ranks_disagree": ({**lokr, k("lokr_w2_b"): torch.randn(3, 8)}, k("lokr_w2_b"), "rank"),
        "lokr_no_w2": (drop(drop(lokr, k("lokr_w2_a")), k("lokr_w2_b")), k("lokr_w1"), "lokr_w2"),
        "lokr_w2_a_without_b": (drop(lokr, k("lokr_w2_b")), k("lokr_w2_a"), "lokr_w2_b"),
        "lokr_w1_1d": ({**lokr, k("lokr_w1"): torch.randn(16)}, k("lokr_w1"), "1-D"),
        "lokr_rank_0": ({**lokr, k("lokr_w2_a"): torch.randn(8, 0), k("lokr_w2_b"): torch.randn(0, 8)},
                        k("lokr_w2_b"), "rank 0"),
        "lokr_w2_without_w1": (drop(lokr, k("lokr_w1")), k("lokr_w2_a"), "lokr_w1"),
    }


LYCORIS_CASES = ["loha_ranks_disagree", "loha_halves_disagree", "loha_missing_w2_b", "loha_1d", "loha_rank_0",
                 "loha_t1_without_t2", "loha_core_disagrees", "lokr_ranks_disagree", "lokr_no_w2",
                 "lokr_w2_a_without_b", "lokr_w1_1d", "lokr_rank_0", "lokr_w2_without_w1"]


@pytest.mark.parametrize("case", LYCORIS_CASES)
def test_loha_lokr_structure_is_one_line_and_changes_nothing(case, sd1, tmp_path):
    tensors, key, word = _lycoris_cases()[case]
    good = _lora(sd1, FF)  # a good module beside it, so the file is a LoRA-family file either way
    path = _write({**good, **tensors}, tmp_path / f"{case}.safetensors")
    message = _refused(sd1, path, key)
    assert word in message, message


def test_good_lycoris_files_still_merge(sd1, tmp_path):
    """The checks refuse nothing lycoris-lora accepts: its reference functions give the same delta."""
    from lycoris.functional import loha as ly_loha
    from lycoris.functional import lokr as ly_lokr

    for tensors, name, expected in (
            (_loha(), LIN, lambda t: ly_loha.diff_weight(t["hada_w1_b"], t["hada_w1_a"], t["hada_w2_b"], t["hada_w2_a"],
                                                         None, None, gamma=0.5, backend="torch")),
            (_loha_cp(), CONV, lambda t: ly_loha.diff_weight(t["hada_w1_b"], t["hada_w1_a"], t["hada_w2_b"],
                                                             t["hada_w2_a"], t["hada_t1"], t["hada_t2"], gamma=1.0,
                                                             backend="torch")),
            (_lokr(), LIN, lambda t: ly_lokr.diff_weight(t["lokr_w1"], None, None, None, t["lokr_w2_a"], t["lokr_w2_b"],
                                                         None, gamma=1.0, backend="torch"))):
        path = _write(tensors, tmp_path / "good.safetensors")
        model = copy.deepcopy(sd1)
        before = _module(model, name).weight.detach().clone()
        merge(model, [(adapterhub.load(path), 1.0)])
        roles = {k.split(".", 1)[1]: v for k, v in tensors.items()}
        want = before + expected(roles).reshape(before.shape)
        assert torch.allclose(_module(model, name).weight, want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# the command line: one line on stderr, exit code 2, nothing written
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["alpha_not_scalar", "rank_0", "ranks_disagree", "down_without_up", "down_1d"])
def test_cli_merge_refuses_with_one_line(case, sd1, tmp_path, capsys):
    tensors, key, _ = _lora_cases(sd1)[case]
    path = _write(tensors, tmp_path / f"{case}.safetensors")
    out = tmp_path / "merged"
    capsys.readouterr()
    rc = cli_main(["merge", "--base", "tiny-sd1", "--out", str(out), str(path)])
    err = capsys.readouterr().err
    assert rc == 2
    lines = [line for line in err.splitlines() if line.startswith("error")]  # the others are progress lines
    assert len(lines) == 1 and str(path) in lines[0] and key in lines[0], err
    assert "Traceback" not in err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# the fuzz: seeded random LoRA tensor sets on real module names
# ---------------------------------------------------------------------------------------------
BAD = ("alpha_vector", "alpha_inf", "alpha_nan", "alpha_f64_overflow", "down_1d", "up_1d", "down_3d", "rank_0",
       "rank_mismatch", "no_up", "no_down", "nan_element", "inf_element", "product_overflow", "mid_mismatch")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _fuzz_module(rng: random.Random, gen, model, name: str, half_model: bool):
    """A good kohya LoRA / LoCon (CP for the 3x3 conv at random) tensor set, and its reference delta."""
    shape = _module(model, name).weight.shape
    r = rng.randint(1, 6)
    dtype = rng.choice(DTYPES)
    std = rng.choice((0.01, 0.1, 1.0))
    cp = len(shape) == 4 and shape[2] > 1 and rng.random() < 0.5
    down_shape = (r, shape[1], 1, 1) if cp else (r, *shape[1:])
    up_shape = (shape[0], r, 1, 1) if len(shape) == 4 else (shape[0], r)
    t = {"lora_down.weight": (torch.randn(*down_shape, generator=gen) * std).to(dtype),
         "lora_up.weight": (torch.randn(*up_shape, generator=gen) * std).to(dtype)}
    if cp:
        t["lora_mid.weight"] = (torch.randn(r, r, *shape[2:], generator=gen) * std).to(dtype)
    alpha_form = rng.choice(("none", "f32", "f16", "f64", "shape1"))
    alpha = round(rng.uniform(0.5, 8.0), 1)
    if alpha_form != "none":
        dt = {"f16": torch.float16, "f64": torch.float64}.get(alpha_form, torch.float32)
        t["alpha"] = torch.tensor([alpha] if alpha_form == "shape1" else alpha, dtype=dt)
    if half_model and rng.random() < 0.3:  # large but representable in float16: must still merge
        t["lora_up.weight"] = torch.full(up_shape, 100.0, dtype=dtype)
        t["lora_down.weight"] = torch.full(down_shape, 100.0 / (r * (shape[1] if cp else 1)) / 4, dtype=dtype)
        if cp:
            t["lora_mid.weight"] = torch.eye(r).reshape(r, r, 1, 1).expand(r, r, *shape[2:]).contiguous().to(dtype)
        t.pop("alpha", None)
    return t


def _reference_delta(t: dict, shape) -> torch.Tensor:
    """lycoris-lora's LoCon ``diff_weight`` with kohya's scale (alpha / rank; no alpha: 1)."""
    from lycoris.functional import locon

    down, up, mid = (t[k].float() if k in t else None
                     for k in ("lora_down.weight", "lora_up.weight", "lora_mid.weight"))
    scale = t["alpha"].float().item() / down.shape[0] if "alpha" in t else 1.0
    return locon.diff_weight(down, up, mid, gamma=scale, backend="torch").reshape(shape)


def _corrupt(rng: random.Random, gen, t: dict, how: str, half_model: bool) -> dict:
    t = dict(t)
    down, up = t["lora_down.weight"], t["lora_up.weight"]
    if how == "alpha_vector":
        t["alpha"] = torch.ones(rng.randint(2, 4))
    elif how == "alpha_inf":
        t["alpha"] = torch.tensor(rng.choice((float("inf"), float("-inf"))))
    elif how == "alpha_nan":
        t["alpha"] = torch.tensor(float("nan"))
    elif how == "alpha_f64_overflow":  # finite as float64, Inf once cast to float32
        t["alpha"] = torch.tensor(rng.choice((1e300, -1e40)), dtype=torch.float64)
    elif how == "down_1d":
        t["lora_down.weight"] = down.flatten()[: down.shape[1]].clone()
    elif how == "up_1d":
        t["lora_up.weight"] = up[:, 0].flatten().clone()
    elif how == "down_3d":
        t["lora_down.weight"] = down.reshape(down.shape[0], down.shape[1], -1)[..., :1].clone()
    elif how == "rank_0":
        t["lora_down.weight"] = down[:0].clone()
        t["lora_up.weight"] = up[:, :0].clone()
        t.pop("lora_mid.weight", None)
    elif how == "rank_mismatch":
        t["lora_up.weight"] = torch.cat([up, up[:, :1]], dim=1)
    elif how == "no_up":
        t.pop("lora_up.weight")
    elif how == "no_down":
        t.pop("lora_down.weight")
        t.pop("lora_mid.weight", None)
    elif how in ("nan_element", "inf_element"):
        role = rng.choice([k for k in t if k != "alpha"])
        bad = t[role].clone()
        flat = bad.view(-1)
        flat[rng.randrange(flat.numel())] = float("nan") if how == "nan_element" else rng.choice((1, -1)) * float("inf")
        t[role] = bad
    elif how == "product_overflow":  # finite factors; the product overflows the model's dtype
        big = 1e3 if half_model else 1e20
        t["lora_up.weight"] = torch.full(up.shape, big, dtype=torch.float32)
        t["lora_down.weight"] = torch.full(down.shape, big, dtype=torch.float32)
        if "lora_mid.weight" in t:
            t["lora_mid.weight"] = torch.ones(t["lora_mid.weight"].shape)
        t.pop("alpha", None)
    elif how == "mid_mismatch":
        if "lora_mid.weight" not in t:
            return _corrupt(rng, gen, t, "rank_mismatch", half_model)
        m = t["lora_mid.weight"]
        t["lora_mid.weight"] = torch.cat([m, m[:1]], dim=0)
    return t


def _fuzz_case(seed: int, sd1, sd1_half):
    """(model, {file key: tensor}, bad module or None, {module: reference delta})."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    half = rng.random() < 0.3
    model = sd1_half if half else sd1
    names = rng.sample(list(MODULES), rng.randint(1, 3))
    sets = {n: _fuzz_module(rng, gen, model, n, half) for n in names}
    bad = rng.choice(names) if rng.random() < 0.7 else None
    refs = {}
    if bad is not None:
        how = rng.choice(BAD)
        if how == "no_down" and len(names) == 1:
            how = "no_up"  # a file of one lone up is no LoRA file at all (tested in test_bad_input)
        sets[bad] = _corrupt(rng, gen, sets[bad], how, half)
        bad = (bad, how)
    else:
        refs = {n: _reference_delta(t, _module(model, n).weight.shape) for n, t in sets.items()}
    tensors = {f"{n}.{role}": v for n, t in sets.items() for role, v in t.items()}
    return model, tensors, bad, refs


@pytest.fixture(scope="module")
def pristine(sd1, sd1_half):
    """Each fuzz base's parameter values, by id of the model."""
    return {id(m): {k: v.detach().clone() for k, v in _params(m).items()} for m in (sd1, sd1_half)}


@pytest.mark.parametrize("block", range(4))
def test_fuzz_lora_tensor_sets(block, sd1, sd1_half, pristine, tmp_path):
    seen = {"bad": 0, "good": 0}
    for seed in range(block * 20, block * 20 + 20):
        model, tensors, bad, refs = _fuzz_case(seed, sd1, sd1_half)
        before = pristine[id(model)]
        path = _write(tensors, tmp_path / f"fuzz_{seed}.safetensors")
        if bad is not None:
            name, how = bad
            _refused(model, path, name, before=before)
            seen["bad"] += 1
            continue
        merge(model, [(adapterhub.load(path), 1.0)])
        after = _params(model)
        touched = {_key(model, n) for n in refs}
        try:
            for name, delta in refs.items():
                key = _key(model, name)
                want = (before[key].float() + delta).to(before[key].dtype)
                assert torch.isfinite(after[key]).all(), (seed, key)
                tol = 1e-5 if before[key].dtype == torch.float32 else 2e-3
                assert torch.allclose(after[key].float(), want.float(), atol=tol, rtol=tol), (seed, key)
            assert sorted(set(_changed(model, before)) - touched) == [], seed
        finally:
            with torch.no_grad():  # the merge is for good: put the base back by hand for the next case
                for key in touched:
                    after[key].copy_(before[key])
        seen["good"] += 1
    assert seen["bad"] and seen["good"], seen  # both sides exercised in every block


def test_adalora_without_its_config_reports_alpha_unknown(tmp_path):
    """#17 item 14: PEFT keeps lora_alpha in adapter_config.json; without it the alpha is unknown, not 0.0."""
    import shutil

    from adapterhub.base import load_base

    folder = adapter_type("adalora").example(load_base("tiny-sd1"), tmp_path / "ada", seed=3)
    assert adapterhub.inspect(folder, with_hash=False)["alpha"] == 4.0
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(next(folder.rglob("adapter_model.safetensors")), bare / "adapter_model.safetensors")
    facts = adapterhub.inspect(bare, with_hash=False)
    assert facts["type"] == "adalora" and facts["alpha"] is None and facts["alphas"] == []
    assert "unknown" in facts["alpha_note"] and "adapter_config.json" in facts["alpha_note"]
