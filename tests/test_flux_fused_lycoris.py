"""LoKr, LoHa and full diffs on FLUX.1's fused BFL modules (``img_attn.qkv``, ``txt_attn.qkv``, ``linear1``).

BFL's original model holds q, k and v (and, in a single block, the MLP's input) as one Linear whose rows
diffusers keeps in separate modules. A LoKr / LoHa / full diff on such a module changes the fused weight; the
result must equal applying that change to the fused weight and splitting it by rows as diffusers' Flux
single-file converter does (``torch.chunk(3)`` for qkv, ``torch.split([h, h, h, mlp])`` for linear1).

Oracle: lycoris-lora's own modules (``LokrModule`` / ``LohaModule``) on a standalone fused ``nn.Linear`` of
tiny-flux's widths give the fused delta (their forward). ComfyUI's trainer (``comfy_extras/nodes_train.py``)
and extract node (``comfy_extras/nodes_lora_extract.py``) naming is reproduced here with tiny tensors: every
module's parameters under ``diffusion_model.<BFL module>.`` (``lokr_w1``, ``lokr_w2``, ``alpha``, the bias's
``diff_b`` ...), checked against the formula.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from flux_helpers import state as _state

# BFL module (dotted) -> the diffusers modules it fuses, in row order (BFL's layout, as diffusers' converter
# splits it); written out here, not taken from the code under test
FUSED = {
    "double_blocks.0.img_attn.qkv": ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                                     "transformer_blocks.0.attn.to_v"],
    "double_blocks.1.txt_attn.qkv": ["transformer_blocks.1.attn.add_q_proj", "transformer_blocks.1.attn.add_k_proj",
                                     "transformer_blocks.1.attn.add_v_proj"],
    "single_blocks.0.linear1": ["single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k",
                                "single_transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.proj_mlp"],
}


def _parts(bfl: str) -> list[str]:
    """The diffusers modules of any block's fused BFL module (``double_blocks.N.img_attn.qkv`` ...), in row order."""
    root, index, rest = bfl.split(".", 2)
    if root == "single_blocks":
        return [f"single_transformer_blocks.{index}.{t}" for t in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]
    names = ("to_q", "to_k", "to_v") if rest == "img_attn.qkv" else ("add_q_proj", "add_k_proj", "add_v_proj")
    return [f"transformer_blocks.{index}.attn.{t}" for t in names]


assert all(_parts(bfl) == parts for bfl, parts in FUSED.items())
# modules that are one diffusers module (the final modulation's (shift, scale) rows swapped: diffusers holds
# (scale, shift))
PLAIN = {"double_blocks.0.img_attn.proj": "transformer_blocks.0.attn.to_out.0",
         "single_blocks.1.linear2": "single_transformer_blocks.1.proj_out", "img_in": "x_embedder"}
SWAPPED = {"final_layer.adaLN_modulation.1": "norm_out.linear"}

# LyCORIS settings: factor -1 (w1 whole, w2 low-rank), both halves low-rank, both whole (full matrix)
LOKR = {"lokr": dict(lora_dim=4, alpha=2.0), "lokr-both": dict(lora_dim=1, alpha=3.0, decompose_both=True, factor=4),
        "lokr-full": dict(lora_dim=100000, alpha=1.0, full_matrix=True)}
LOHA = {"loha": dict(lora_dim=2, alpha=1.0)}
VARIANTS = {**LOKR, **LOHA}


def _modules(transformer) -> dict:
    return dict(transformer.named_modules())


def _fused_shape(transformer, bfl: str) -> tuple[int, int]:
    modules = _modules(transformer)
    parts = [PLAIN[bfl]] if bfl in PLAIN else [SWAPPED[bfl]] if bfl in SWAPPED else _parts(bfl)
    return sum(modules[p].weight.shape[0] for p in parts), modules[parts[0]].weight.shape[1]


def _lycoris(variant: str, out_f: int, in_f: int, seed: int, device=None):
    """LyCORIS' own module on a standalone fused ``nn.Linear(in_f, out_f)``, its factors random:
    (its state dict, its fused delta at multiplier 1 as its forward applies it, float32)."""
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        linear = torch.nn.Linear(in_f, out_f)
        cls = LohaModule if variant in LOHA else LokrModule
        module = cls("m", linear, **VARIANTS[variant])
    if device == "meta":
        return {k: torch.zeros(v.shape) for k, v in module.state_dict().items()}, None
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        eye = torch.eye(in_f)
        # LyCORIS' forward (what the file was trained with): its module's output minus the Linear's; its
        # get_diff_weight / merge_to (4.1.3) apply alpha / rank twice, which only alpha == rank hides
        delta = (module(eye) - linear(eye)).T.contiguous()
    return {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}, delta


def _split(bfl: str, delta: torch.Tensor, transformer) -> dict[str, torch.Tensor]:
    """diffusers target -> its rows of the fused delta (the single-file converter's split)."""
    modules = _modules(transformer)
    if bfl in SWAPPED:
        half = delta.shape[0] // 2
        return {SWAPPED[bfl]: torch.cat([delta[half:], delta[:half]])}
    if bfl in PLAIN:
        return {PLAIN[bfl]: delta}
    sizes = [modules[p].weight.shape[0] for p in _parts(bfl)]
    return dict(zip(_parts(bfl), torch.split(delta, sizes)))


def _name(bfl: str, style: str) -> str:
    return "diffusion_model." + bfl if style == "comfyui" else "lora_unet_" + bfl.replace(".", "_")


def _lycoris_file(path, transformer, plan: dict[str, str], style: str, seed=0):
    """A file of LyCORIS modules (``plan``: BFL module -> variant) and the expected delta per diffusers target."""
    sd, expected = {}, {}
    for i, (bfl, variant) in enumerate(plan.items()):
        tensors, delta = _lycoris(variant, *_fused_shape(transformer, bfl), seed + i)
        sd.update({f"{_name(bfl, style)}.{k}": v for k, v in tensors.items()})
        expected.update(_split(bfl, delta, transformer))
    save_file(sd, str(path))
    return path, expected


def _keys(path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return set(f.keys())


# ---------------------------------------------------------------------------------------------
# each diffusers target's patch yields exactly its rows of LyCORIS' fused delta
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("bfl", sorted(FUSED))
def test_patches_equal_lycoris_rows(tiny_flux, tmp_path, variant, bfl):
    import adapterhub

    transformer = tiny_flux.transformer
    path, expected = _lycoris_file(tmp_path / "a.safetensors", transformer, {bfl: variant}, "kohya")
    adapter = adapterhub.load(path)
    assert set(adapter.patches) == {f"transformer.{t}" for t in FUSED[bfl]}
    assert {k for p in adapter.patches.values() for k in p.file_keys.values()} == _keys(path)  # every key used
    modules = _modules(transformer)
    for target, rows in expected.items():
        patch, weight = adapter.patches[f"transformer.{target}"], modules[target].weight.detach()
        assert patch.kind == variant.split("-")[0] and patch.source == _name(bfl, "kohya")
        assert tuple(patch.expected_shape()) == tuple(weight.shape) and patch.fits(tuple(weight.shape))
        assert not patch.fits((weight.shape[0] + 1, weight.shape[1]))
        assert (patch.out_features, patch.in_features) == tuple(weight.shape)
        assert patch.low_rank_factors() is None  # the algebra re-factorises it by SVD
        torch.testing.assert_close(patch.delta(weight.float()), rows, atol=1e-5, rtol=0, msg=target)
        assert patch.squared_norm() == pytest.approx(float((rows.double() ** 2).sum()), rel=1e-5)
        acc = torch.zeros(weight.shape)
        patch.add_to(acc, 0.5)
        torch.testing.assert_close(acc, 0.5 * rows, atol=1e-5, rtol=0)
    ranks = {p.rank for p in adapter.patches.values()}
    assert ranks == {None if variant == "lokr-full" else VARIANTS[variant]["lora_dim"]}


PLAN = {"double_blocks.0.img_attn.qkv": "lokr", "double_blocks.1.txt_attn.qkv": "loha",
        "single_blocks.0.linear1": "lokr-both", "double_blocks.0.img_attn.proj": "lokr-full",
        "final_layer.adaLN_modulation.1": "lokr"}


@pytest.mark.parametrize("style,layout", [("kohya", "lycoris"), ("comfyui", "comfyui")])
def test_cli_merge_equals_the_rows_added(tiny_flux, tmp_path, capsys, style, layout):
    from diffusers import DiffusionPipeline

    from adapterhub.cli import main

    path, expected = _lycoris_file(tmp_path / "a.safetensors", tiny_flux.transformer, PLAN, style)
    capsys.readouterr()  # LyCORIS' log lines (it prints a warning for a full-matrix LoKr)
    rc = main(["inspect", "--json", "--no-hash", str(path)])
    facts = json.loads(capsys.readouterr().out)
    assert rc in (0, None)
    # the type: loha, the first of the kinds the file holds (keys.adapter_type_of)
    assert (facts["type"], facts["format"], facts["family"], facts["base"]) == ("loha", layout, "flux", "tiny-flux")
    assert facts["targets"] == len(expected) == 12
    rc = main(["merge", str(path), "--base", "tiny-flux", "--out", str(tmp_path / "out")])
    assert rc in (0, None), capsys.readouterr().err
    merged = DiffusionPipeline.from_pretrained(str(tmp_path / "out"), local_files_only=True).transformer.state_dict()
    base = _state(tiny_flux)
    for key, value in base.items():
        target = key.removesuffix(".weight")
        want = value + expected[target] if key.endswith(".weight") and target in expected else value
        torch.testing.assert_close(merged[key], want, atol=1e-5, rtol=0, msg=key)


def test_attach_detach_is_bitwise_and_equals_merge(tiny_flux, tmp_path):
    import adapterhub

    path, _ = _lycoris_file(tmp_path / "a.safetensors", tiny_flux.transformer, PLAN, "comfyui")
    before = _state(tiny_flux)
    pipe = copy.deepcopy(tiny_flux)
    handle = adapterhub.load(path).attach(pipe, 0.7)
    attached = _state(pipe)
    handle.detach()
    assert all(torch.equal(v, before[k]) for k, v in _state(pipe).items())
    merged = copy.deepcopy(tiny_flux)
    adapterhub.load(path).merge_into(merged, 0.7)
    assert all(torch.equal(attached[k], v) for k, v in _state(merged).items())
    assert sum(not torch.equal(attached[k], before[k]) for k in before) == 12


# ---------------------------------------------------------------------------------------------
# FLUX.1's real widths: every key binds with its exact shape (meta device)
# ---------------------------------------------------------------------------------------------
REAL = {"double_blocks.5.img_attn.qkv": (9216, 3072, {"lora_dim": 4, "alpha": 1.0, "factor": 16}),
        "double_blocks.5.txt_attn.qkv": (9216, 3072, {"lora_dim": 4, "alpha": 1.0}),
        "single_blocks.20.linear1": (21504, 3072, {"lora_dim": 4, "alpha": 1.0, "factor": 16}),
        "single_blocks.21.linear1": (21504, 3072, {"lora_dim": 4, "alpha": 1.0})}


@pytest.mark.parametrize("style,layout", [("kohya", "lycoris"), ("comfyui", "comfyui")])
def test_real_widths_bind_to_the_flux_preset(tmp_path, style, layout):
    import adapterhub
    from adapterhub.api import describe
    from adapterhub.transformer_bases import build_transformer_base
    from adapterhub.weights import bind

    sd = {}
    for bfl, (out_f, in_f, kw) in REAL.items():
        VARIANTS["real"] = kw
        try:
            tensors, _ = _lycoris("real", out_f, in_f, 0, device="meta")
        finally:
            del VARIANTS["real"]
        sd.update({f"{_name(bfl, style)}.{k}": v for k, v in tensors.items()})
    save_file(sd, str(tmp_path / "real.safetensors"))
    adapter, _ = describe(tmp_path / "real.safetensors")
    assert (adapter.type, adapter.format, adapter.family, adapter.base) == ("lokr", layout, "flux", "flux")
    adapter = adapterhub.load(tmp_path / "real.safetensors")
    assert {k for p in adapter.patches.values() for k in p.file_keys.values()} == set(sd)
    bindings = bind(build_transformer_base("flux-dev"), adapter)
    assert len(bindings) == len(adapter.patches) == 14
    for b in bindings:
        shape = tuple(b.param.shape)
        assert tuple(b.patch.expected_shape()) == shape and b.patch.fits(shape), b.patch.target
        assert (b.patch.out_features, b.patch.in_features) == shape


# ---------------------------------------------------------------------------------------------
# ComfyUI's own files: the trainer (TrainLoraNode + SaveLoRA) and the extract node (LoraSave)
# ---------------------------------------------------------------------------------------------
def _comfy_factorization(dimension: int, factor: int) -> tuple[int, int]:
    """The (small, large) split ComfyUI's ``LoKrAdapter.create_train`` uses, as LyCORIS' ``factorization``."""
    from lycoris.functional import factorization

    return factorization(dimension, factor)


def _expect(expected: dict, bfl: str, delta, bias, transformer) -> None:
    """``expected[target] = [weight rows, bias rows]`` of a fused module's ``delta`` and bias difference."""
    for target, rows in _split(bfl, delta, transformer).items():
        expected[target] = [rows, None]
    for target, rows in _split(bfl, bias.float()[:, None], transformer).items():
        expected[target][1] = rows[:, 0]


def _comfy_trainer_file(path, transformer, algorithm: str, seed=0, rank=2, bias_role="diff_b"):
    """What ComfyUI's trainer saves for Flux: for every trained Linear ``n`` (``diffusion_model.`` + BFL's module
    path) its adapter's parameters as ``n.<name>`` (LoRA ``lora_up.weight`` / ``lora_down.weight``, LoHa
    ``hada_w1_a`` ..., LoKr ``lokr_w1`` / ``lokr_w2`` made whole by ``create_train``), ``n.alpha`` (1.0, a
    parameter too) and the bias's difference ``n.diff_b``; everything in the LoRA dtype (bf16 by default).
    Returns the file and the expected (weight delta, bias delta) per diffusers target."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: (torch.randn(*shape, generator=gen) * 0.3).to(torch.bfloat16)  # noqa: E731
    sd, expected = {}, {}
    for bfl in (*FUSED, *PLAIN, *SWAPPED):
        out_f, in_f = _fused_shape(transformer, bfl)
        name = f"diffusion_model.{bfl}"
        if algorithm == "lokr":
            (l, k), (m, n) = _comfy_factorization(out_f, rank), _comfy_factorization(in_f, rank)
            w1, w2 = rand(l, m), rand(k, n)
            sd[f"{name}.lokr_w1"], sd[f"{name}.lokr_w2"] = w1, w2
            delta = torch.kron(w1.float(), w2.float())  # both whole: ComfyUI applies no alpha / rank
        elif algorithm == "loha":
            w1a, w1b, w2a, w2b = rand(out_f, rank), rand(rank, in_f), rand(out_f, rank), rand(rank, in_f)
            sd.update({f"{name}.hada_w1_a": w1a, f"{name}.hada_w1_b": w1b, f"{name}.hada_w2_a": w2a,
                       f"{name}.hada_w2_b": w2b})
            delta = (w1a.float() @ w1b.float()) * (w2a.float() @ w2b.float()) / rank
        else:
            up, down = rand(out_f, rank), rand(rank, in_f)
            sd[f"{name}.lora_up.weight"], sd[f"{name}.lora_down.weight"] = up, down
            delta = up.float() @ down.float() / rank
        sd[f"{name}.alpha"] = torch.tensor(1.0, dtype=torch.bfloat16)
        bias = rand(out_f)
        sd[f"{name}.{bias_role}"] = bias
        _expect(expected, bfl, delta, bias, transformer)
    save_file(sd, str(path))
    return path, expected


def _comfy_extract_file(path, transformer, full_diff: bool, seed=0, rank=2):
    """What ComfyUI's extract node (``LoraSave``) saves: ``diffusion_model.<module>.lora_up.weight`` /
    ``lora_down.weight`` (fp16, no alpha), or with ``full_diff`` the whole ``.diff``; ``.diff_b`` for biases."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: (torch.randn(*shape, generator=gen) * 0.3).half()  # noqa: E731
    sd, expected = {}, {}
    for bfl in (*FUSED, *PLAIN, *SWAPPED):
        out_f, in_f = _fused_shape(transformer, bfl)
        name = f"diffusion_model.{bfl}"
        if full_diff:
            sd[f"{name}.diff"] = diff = rand(out_f, in_f)
            delta = diff.float()
        else:
            up, down = rand(out_f, rank), rand(rank, in_f)
            sd[f"{name}.lora_up.weight"], sd[f"{name}.lora_down.weight"] = up, down
            delta = up.float() @ down.float()
        sd[f"{name}.diff_b"] = bias = rand(out_f)
        _expect(expected, bfl, delta, bias, transformer)
    save_file(sd, str(path))
    return path, expected


def _assert_merged(tiny_flux, path, expected, changed):
    import adapterhub

    merged = copy.deepcopy(tiny_flux)
    adapterhub.load(path).merge_into(merged)
    ours, base = _state(merged), _state(tiny_flux)
    for key, value in base.items():
        target, param = key.rsplit(".", 1)
        want = value
        if target in expected and expected[target][param == "bias"] is not None:
            want = value + expected[target][param == "bias"]
        torch.testing.assert_close(ours[key], want, atol=1e-5, rtol=0, msg=key)
    assert sum(not torch.equal(ours[k], base[k]) for k in base) == changed


@pytest.mark.parametrize("algorithm", ["lokr", "loha", "lora"])
def test_comfyui_trainer_file_reads_and_merges(tiny_flux, tmp_path, algorithm):
    from adapterhub.api import describe

    path, expected = _comfy_trainer_file(tmp_path / "trained.safetensors", tiny_flux.transformer, algorithm)
    adapter, _ = describe(path)
    assert (adapter.type, adapter.format, adapter.family, adapter.base) == (algorithm, "comfyui", "flux", "tiny-flux")
    _assert_merged(tiny_flux, path, expected, 2 * len(expected))


@pytest.mark.parametrize("algorithm", ["lora", "lokr"])
def test_b_norm_beside_a_module_patches_the_bias_as_diff_b_does(tiny_flux, tmp_path, algorithm):
    """LyCORIS / ComfyUI name a bias's difference ``b_norm`` as well as ``diff_b`` (ComfyUI reads both the same way):
    beside a LoRA or LoKr, on fused and plain modules alike, it patches the bias, never dropped."""
    import adapterhub

    path, expected = _comfy_trainer_file(tmp_path / "b.safetensors", tiny_flux.transformer, algorithm,
                                         bias_role="b_norm")
    adapter = adapterhub.load(path)
    used = {k for patch in adapter.patches.values() for k in patch.file_keys.values()}
    with safe_open(str(path), "pt") as f:
        assert used == set(f.keys())  # every key read: no b_norm left over
    _assert_merged(tiny_flux, path, expected, 2 * len(expected))


def test_train_norm_on_the_text_encoder_patches_its_layer_norm(tiny_flux, tmp_path):
    """LyCORIS train_norm beside a Flux LoRA: ``lora_te1_..._layer_norm1.w_norm`` / ``.b_norm`` change CLIP-L's
    LayerNorm weight and bias by exactly those tensors (times the weight)."""
    import adapterhub

    path, _ = _comfy_trainer_file(tmp_path / "a.safetensors", tiny_flux.transformer, "lora")
    sd = dict(_read(path))
    path_of = next(p for p, _ in tiny_flux.text_encoder.named_modules() if p.endswith("layers.0.layer_norm1"))
    norm = tiny_flux.text_encoder.get_submodule(path_of)
    gen = torch.Generator().manual_seed(3)
    name = "lora_te1_text_model_encoder_layers_0_layer_norm1"
    sd[f"{name}.w_norm"], sd[f"{name}.b_norm"] = (torch.randn(norm.weight.shape, generator=gen) for _ in range(2))
    save_file(sd, str(path))
    merged = copy.deepcopy(tiny_flux)
    adapterhub.load(path).merge_into(merged, 0.5)
    got = merged.text_encoder.get_submodule(path_of)
    torch.testing.assert_close(got.weight, norm.weight + 0.5 * sd[f"{name}.w_norm"], atol=1e-6, rtol=0)
    torch.testing.assert_close(got.bias, norm.bias + 0.5 * sd[f"{name}.b_norm"], atol=1e-6, rtol=0)


def _read(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("full_diff", [False, True], ids=["standard", "full_diff"])
def test_comfyui_extract_file_reads_and_merges(tiny_flux, tmp_path, full_diff):
    from adapterhub.api import describe

    path, expected = _comfy_extract_file(tmp_path / "extracted.safetensors", tiny_flux.transformer, full_diff)
    adapter, _ = describe(path)
    assert (adapter.format, adapter.family, adapter.base) == ("comfyui", "flux", "tiny-flux")
    _assert_merged(tiny_flux, path, expected, 2 * len(expected))


# ---------------------------------------------------------------------------------------------
# what cannot be written or read: one line naming the file, exit 2, nothing written
# ---------------------------------------------------------------------------------------------
def _one_error_line(capsys, argv, path) -> str:
    from adapterhub.cli import main

    capsys.readouterr()  # what came before (LyCORIS' log lines)
    rc = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert path.name in errors[0]
    return errors[0]


@pytest.mark.parametrize("layout,maker", [("diffusers", "lycoris"), ("peft", "lycoris"), ("kohya", "trainer"),
                                          ("diffusers", "trainer"), ("peft", "trainer"), ("a1111", "trainer")])
def test_writers_refuse_rows_and_bias_patches_in_one_line(tiny_flux, tmp_path, capsys, layout, maker):
    """diffusers / PEFT hold a LoKr / LoHa per diffusers module (a fused one's rows are no such module), and no
    Flux layout we write holds a bias difference."""
    if maker == "lycoris":
        path, _ = _lycoris_file(tmp_path / "a.safetensors", tiny_flux.transformer, PLAN, "comfyui")
    else:
        path, _ = _comfy_trainer_file(tmp_path / "a.safetensors", tiny_flux.transformer, "lora")
    out = tmp_path / "out.safetensors"
    line = _one_error_line(capsys, ["convert", str(path), "--to", layout, "--out", str(out)], path)
    assert not out.exists() and not (tmp_path / "out").exists()
    if maker == "trainer" and layout in ("kohya", "a1111"):
        assert "the bias difference of transformer." in line  # not the weight: that one has a kohya name


def test_a_lokr_whose_rows_do_not_fit_the_model_is_refused_before_any_change(tiny_flux, tmp_path, capsys):
    """A LoKr on qkv of 90 rows (tiny-flux's qkv has 96): each part would be 30 rows; the model's are 32."""
    gen = torch.Generator().manual_seed(0)
    name = "diffusion_model.double_blocks.0.img_attn.qkv"
    sd = {f"{name}.lokr_w1": torch.randn(6, 4, generator=gen), f"{name}.lokr_w2": torch.randn(15, 8, generator=gen)}
    save_file(sd, str(tmp_path / "narrow.safetensors"))
    line = _one_error_line(capsys, ["merge", str(tmp_path / "narrow.safetensors"), "--base", "tiny-flux",
                                    "--out", str(tmp_path / "out")], tmp_path / "narrow.safetensors")
    assert "to_q" in line and not (tmp_path / "out").exists()


def test_stack_switch_and_remove_restore_bitwise(tiny_flux, tmp_path):
    """A stack of a fused LoKr / LoHa file and a ComfyUI trainer file (bias differences), switched to the first
    alone (only what changes is rewritten), then removed: every weight and bias back bit for bit."""
    import adapterhub

    lyco, _ = _lycoris_file(tmp_path / "a.safetensors", tiny_flux.transformer, PLAN, "comfyui")
    trained, _ = _comfy_trainer_file(tmp_path / "b.safetensors", tiny_flux.transformer, "lokr")
    pipe, before = copy.deepcopy(tiny_flux), _state(tiny_flux)
    both = adapterhub.Stack([(str(lyco), 0.6), (str(trained), 0.5)]).apply(pipe)
    expected = copy.deepcopy(tiny_flux)
    adapterhub.load(lyco).merge_into(expected, 0.6)
    adapterhub.load(trained).merge_into(expected, 0.5)
    for k, v in _state(expected).items():
        torch.testing.assert_close(_state(pipe)[k], v, atol=1e-6, rtol=0, msg=k)
    one = adapterhub.Stack([(str(lyco), 0.6)]).apply(pipe, replace=True)
    alone = copy.deepcopy(tiny_flux)
    adapterhub.load(lyco).merge_into(alone, 0.6)
    for k, v in _state(alone).items():
        torch.testing.assert_close(_state(pipe)[k], v, atol=1e-6, rtol=0, msg=k)
    one.remove()
    assert both is not one and all(torch.equal(v, before[k]) for k, v in _state(pipe).items())


def test_resize_refactorises_the_rows_by_svd(tiny_flux, tmp_path, capsys):
    """No low-rank factors: ``lora resize`` takes each target's best rank-k approximation of its rows."""
    import adapterhub
    from adapterhub.cli import main

    path, expected = _lycoris_file(tmp_path / "a.safetensors", tiny_flux.transformer,
                                   {"double_blocks.0.img_attn.qkv": "loha", "single_blocks.0.linear1": "lokr"}, "kohya")
    out = tmp_path / "small.safetensors"
    rc = main(["lora", "resize", str(path), "--rank", "2", "--out", str(out)])
    assert rc in (0, None), capsys.readouterr().err
    small = adapterhub.load(out)
    modules = _modules(tiny_flux.transformer)
    for target, rows in expected.items():
        u, s, vh = torch.linalg.svd(rows.double(), full_matrices=False)
        best = ((u[:, :2] * s[:2]) @ vh[:2]).float()
        got = small.patches[f"transformer.{target}"].delta(modules[target].weight.detach().float())
        torch.testing.assert_close(got, best, atol=1e-5, rtol=0, msg=target)


# ---------------------------------------------------------------------------------------------
# LyCORIS' own wrapper on BFL's module names (``lycoris_double_blocks_0_img_attn_qkv``)
# ---------------------------------------------------------------------------------------------
def _bfl_toy(transformer):
    """BFL's Flux module tree (the Linears LoRAs patch) at the transformer's widths: double blocks' ``img_attn`` /
    ``txt_attn`` (``qkv``, ``proj``) and single blocks' ``linear1`` / ``linear2``."""
    from torch import nn

    cfg = transformer.config
    h = cfg.num_attention_heads * cfg.attention_head_dim
    mlp = _modules(transformer)["single_transformer_blocks.0.proj_mlp"].weight.shape[0]

    def attn():
        return nn.ModuleDict({"qkv": nn.Linear(h, 3 * h), "proj": nn.Linear(h, h)})

    double = nn.ModuleList(nn.ModuleDict({"img_attn": attn(), "txt_attn": attn()}) for _ in range(cfg.num_layers))
    single = nn.ModuleList(nn.ModuleDict({"linear1": nn.Linear(h, 3 * h + mlp), "linear2": nn.Linear(h + mlp, h)})
                           for _ in range(cfg.num_single_layers))
    return nn.ModuleDict({"double_blocks": double, "single_blocks": single})


@pytest.mark.parametrize("algo", ["lokr", "loha"])
def test_lycoris_wrapper_on_bfl_names_merges_its_rows(tiny_flux, tmp_path, monkeypatch, algo):
    """``create_lycoris`` on BFL's module tree and its ``save_weights`` write the file; each module's forward gives
    the fused delta (the oracle), split by rows as diffusers' converter splits the weight."""
    from lycoris import LycorisNetwork, create_lycoris

    from adapterhub.api import describe

    for attr in ("TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "USE_FNMATCH"):  # a class-wide preset: restored
        monkeypatch.setattr(LycorisNetwork, attr, getattr(LycorisNetwork, attr))
    LycorisNetwork.apply_preset({"target_module": [], "target_name": ["*qkv", "*linear1"], "use_fnmatch": True})
    torch.manual_seed(0)
    model = _bfl_toy(tiny_flux.transformer)
    network = create_lycoris(model, 1.0, linear_dim=2, linear_alpha=1.0, algo=algo)
    network.apply_to()
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    expected = {}
    for module in network.loras:
        bfl = module.lora_name.removeprefix("lycoris_").replace("_attn_", "_attn.").replace("_blocks_", "_blocks.")
        bfl = bfl.replace("_img_attn", ".img_attn").replace("_txt_attn", ".txt_attn").replace("_linear1", ".linear1")
        eye = torch.eye(module.shape[1])
        with torch.no_grad():
            expected.update(_split(bfl, (module(eye) - module.org_forward(eye)).T, tiny_flux.transformer))
    path = tmp_path / "wrapped.safetensors"
    network.save_weights(str(path), torch.float32, None)
    assert "lycoris_double_blocks_0_img_attn_qkv.alpha" in _keys(path)
    adapter, _ = describe(path)
    assert (adapter.type, adapter.format, adapter.family, adapter.base) == (algo, "lycoris", "flux", "tiny-flux")
    cfg = tiny_flux.transformer.config
    assert len(expected) == 3 * 2 * cfg.num_layers + 4 * cfg.num_single_layers
    _assert_merged(tiny_flux, path, {t: [rows, None] for t, rows in expected.items()}, len(expected))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rows_are_the_fused_deltas_rows_bit_for_bit(tiny_flux, tmp_path, variant):
    """The parts' rows come from the factors without the fused delta, and are its rows exactly (the final
    modulation's two swapped ranges too)."""
    import adapterhub

    plan = {"single_blocks.0.linear1": variant, "final_layer.adaLN_modulation.1": variant}
    path, _ = _lycoris_file(tmp_path / "a.safetensors", tiny_flux.transformer, plan, "comfyui")
    for patch in adapterhub.load(path).patches.values():
        full = patch.inner.delta(torch.zeros(patch.fused_shape))
        rows = torch.cat([full[a:b] for a, b in patch.rows])
        assert torch.equal(patch.delta(torch.zeros(patch.expected_shape())), rows), patch.target


@pytest.mark.parametrize("algorithm", ["lokr", "loha"])
def test_inspect_reads_no_tensor_and_shows_the_torch_paths_facts(tiny_flux, tmp_path, monkeypatch, algorithm):
    """inspect's header-only reading (``StoredTensor``) shows what the tensors read by torch show, NaN included."""
    from safetensors.torch import load_file

    from adapterhub import api
    from adapterhub.io import StoredTensor

    path, _ = _comfy_trainer_file(tmp_path / "t.safetensors", tiny_flux.transformer, algorithm)
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith((".lokr_w2", ".hada_w2_a")) and "linear1" in k)
    tensors[key][1, 0] = float("nan")
    save_file(tensors, str(path))
    light = api.inspect(path)
    adapter, _ = api.describe(path)
    assert all(isinstance(t, StoredTensor) for p in adapter.patches.values() for t in p.tensors.values())
    with monkeypatch.context() as m:
        m.setattr(api, "stored_view", lambda file: file)
        heavy = api.inspect(path)
    assert json.dumps(light, sort_keys=True, default=str) == json.dumps(heavy, sort_keys=True, default=str)
    assert light["format"] == "comfyui" and key in json.dumps(light)


@pytest.mark.parametrize("layout", ["kohya", "a1111"])
def test_kohya_writes_a_fused_lokr_loha_back_on_its_fused_module(tiny_flux, tmp_path, layout):
    """The parts' rows of one LoKr / LoHa are that module's again in sd-scripts' names (``lora_unet_double_blocks_0_
    img_attn_qkv.lokr_w1`` ...: what ComfyUI and LyCORIS' kohya loader read), its tensors as the file has them;
    read back, every target's delta is the same bit for bit."""
    import adapterhub
    from adapterhub.convert import convert

    path, _ = _lycoris_file(tmp_path / "a.safetensors", tiny_flux.transformer, PLAN, "comfyui")
    convert(path, layout, tmp_path / "kohya.safetensors")
    source = {f"{_name(bfl, 'kohya')}.{k.rsplit('.', 1)[1]}": v
              for k, v in safe_load(path).items() for bfl in PLAN if k.startswith(_name(bfl, "comfyui") + ".")}
    written = safe_load(tmp_path / "kohya.safetensors")
    assert written.keys() == source.keys() and all(torch.equal(written[k], v) for k, v in source.items())
    before, after = adapterhub.load(path).patches, adapterhub.load(tmp_path / "kohya.safetensors").patches
    modules = _modules(tiny_flux.transformer)
    assert before.keys() == after.keys()
    for target, patch in before.items():
        weight = modules[target.removeprefix("transformer.")].weight.detach()
        assert torch.equal(after[target].delta(weight), patch.delta(weight)), target


def test_kohya_refuses_a_fused_lokr_with_a_part_missing(tiny_flux, tmp_path):
    import adapterhub
    from adapterhub.errors import AdapterError

    path, _ = _lycoris_file(tmp_path / "a.safetensors", tiny_flux.transformer,
                            {"double_blocks.0.img_attn.qkv": "lokr"}, "comfyui")
    adapter = adapterhub.load(path)
    del adapter.patches["transformer.transformer_blocks.0.attn.to_k"]
    with pytest.raises(AdapterError, match="a.safetensors: .*lokr on .*img_attn_qkv"):
        adapter.save(tmp_path / "kohya.safetensors", "kohya")
    assert not (tmp_path / "kohya.safetensors").exists()


def safe_load(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.parametrize("variant", ["lokr", "loha"])
def test_sd3_fused_qkv_takes_its_rows_too(tiny_sd3, tmp_path, variant):
    """sd-scripts' SD3 names fuse the same way (SAI's ``x_block.attn.qkv``, ``context_block.attn.qkv``)."""
    import adapterhub

    modules = _modules(tiny_sd3.transformer)
    fused = {"lora_unet_joint_blocks_0_x_block_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
             "lora_unet_joint_blocks_1_context_block_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj",
                                                                 "attn.add_v_proj")}
    sd, expected = {}, {}
    for i, (name, parts) in enumerate(fused.items()):
        block = name.split("_")[4]
        targets = [f"transformer_blocks.{block}.{p}" for p in parts]
        width = modules[targets[0]].weight.shape[1]
        tensors, delta = _lycoris(variant, 3 * width, width, i)
        sd.update({f"{name}.{k}": v for k, v in tensors.items()})
        expected.update(zip(targets, torch.split(delta, width)))
    save_file(sd, str(tmp_path / "sd3.safetensors"))
    adapter = adapterhub.load(tmp_path / "sd3.safetensors")
    assert (adapter.family, adapter.base) == ("sd3", "tiny-sd3")
    merged = copy.deepcopy(tiny_sd3)
    adapter.merge_into(merged)
    ours, base = merged.transformer.state_dict(), tiny_sd3.transformer.state_dict()
    for target, rows in expected.items():
        torch.testing.assert_close(ours[f"{target}.weight"], base[f"{target}.weight"] + rows, atol=1e-5, rtol=0)
    assert sum(not torch.equal(ours[k], base[k]) for k in base) == 6
