"""Black Forest Labs' FLUX.1 control LoRAs (FLUX.1 Canny / Depth dev LoRA, issue #21): read, inspect, merge, convert.

A control LoRA holds LoRA pairs in BFL's names (``double_blocks.0.img_attn.qkv.lora_A.weight``), a bias for
each LoRA's output (``lora_B.bias``), the q/k RMS norms' scales (``img_attn.norm.query_norm.scale``: whole
replacements) and an ``img_in`` LoRA twice as wide as the transformer's input: the control image's latents are
concatenated to the noise latents, so the transformer's ``x_embedder`` grows (64 -> 128 inputs on FLUX.1).

The oracle is diffusers: ``load_lora_weights`` (its ``_convert_bfl_flux_control_lora_to_diffusers``, with the
layer counts and width it has written in for FLUX.1 set to the tiny base's) + ``fuse_lora`` on tiny-flux, and
``FluxControlPipeline`` reading the merged model back. One module differs, on purpose: BFL's final modulation
(``final_layer.adaLN_modulation.1``) emits (shift, scale) where diffusers' ``norm_out.linear`` emits (scale,
shift), and diffusers' converter swaps the halves of ``lora_A`` (its rank rows) as well as ``lora_B``'s rows,
which changes the product; ours is checked against BFL's own formula there, ``W + swap(B @ A)``, and diffusers'
deviation is pinned by a test of its own.
"""
from __future__ import annotations

import copy
import json
import re
import types

import pytest
import torch
from flux_helpers import bfl_modules, state
from safetensors.torch import load_file, save_file
from flux_helpers import cli as _cli

RANK = 4
NORMS = ("query_norm", "key_norm")


def control_file(path, transformer, seed=0, img_in_width=None, rank=RANK, metadata=None):
    """A control LoRA in BFL's layout for ``transformer``: every BFL module a LoRA with a ``lora_B.bias``, the
    ``img_in`` LoRA ``img_in_width`` wide (default: twice the input, as BFL's canny / depth), every q/k norm
    scale. Made test-side from the module shapes (never with adapterhub's writers)."""
    gen = torch.Generator().manual_seed(seed)
    modules = dict(transformer.named_modules())
    cfg = transformer.config
    sd = {}
    for bfl, parts in bfl_modules(transformer).items():
        out_f = sum(modules[p].weight.shape[0] for p in parts)
        in_f = modules[parts[0]].weight.shape[1]
        if bfl == "img_in":
            in_f = img_in_width or 2 * cfg.in_channels
        sd[f"{bfl}.lora_A.weight"] = torch.randn(rank, in_f, generator=gen) * 0.1
        sd[f"{bfl}.lora_B.weight"] = torch.randn(out_f, rank, generator=gen) * 0.1
        sd[f"{bfl}.lora_B.bias"] = torch.randn(out_f, generator=gen) * 0.1
    head = cfg.attention_head_dim
    for i in range(cfg.num_layers):
        for stream in ("img_attn", "txt_attn"):
            for norm in NORMS:
                sd[f"double_blocks.{i}.{stream}.norm.{norm}.scale"] = 1 + torch.randn(head, generator=gen) * 0.1
    for i in range(cfg.num_single_layers):
        for norm in NORMS:
            sd[f"single_blocks.{i}.norm.{norm}.scale"] = 1 + torch.randn(head, generator=gen) * 0.1
    save_file(sd, str(path), metadata=metadata)
    return path


def _tiny_converter(transformer):
    """diffusers' BFL control converter with FLUX.1's 19 double blocks, 38 single blocks and 3072 width (written
    into its code) replaced by ``transformer``'s: the same code, at the tiny base's size."""
    from diffusers.loaders import lora_conversion_utils as conversion

    original = conversion._convert_bfl_flux_control_lora_to_diffusers
    cfg = transformer.config
    sizes = {19: cfg.num_layers, 38: cfg.num_single_layers, 3072: cfg.num_attention_heads * cfg.attention_head_dim}
    code = original.__code__
    consts = tuple(sizes.get(c, c) if type(c) is int else c for c in code.co_consts)
    return types.FunctionType(code.replace(co_consts=consts), original.__globals__, original.__name__)


@pytest.fixture
def tiny_converter(tiny_flux, monkeypatch):
    import diffusers.loaders.lora_pipeline as lora_pipeline

    monkeypatch.setattr(lora_pipeline, "_convert_bfl_flux_control_lora_to_diffusers", _tiny_converter(tiny_flux.transformer))


def diffusers_control(pipe, path, scale=1.0):
    """The oracle: a copy of ``pipe`` after diffusers' ``load_lora_weights`` + ``fuse_lora`` (what
    FluxControlPipeline runs); its PEFT layers then removed, keeping the fused weights and the loaded norms."""
    ref = copy.deepcopy(pipe)
    ref.load_lora_weights(str(path), adapter_name="oracle")
    ref.fuse_lora(components=["transformer"], lora_scale=scale)
    ref.transformer._transformer_norm_layers = None  # keep the norms loaded (unload would put the old ones back)
    ref.unload_lora_weights()
    return ref


SWAPPED = "norm_out.linear.weight"  # diffusers reads BFL's final modulation differently: see the module doc


def _swap(t):
    """BFL's (shift, scale) halves <-> diffusers' (scale, shift) (diffusers' swap_scale_shift)."""
    return torch.cat(t.chunk(2, dim=0)[::-1])


def _bfl_final_modulation(pipe, path, weight=1.0):
    """BFL's own formula for the final modulation in diffusers' row order: ``W + weight * swap(B @ A)``."""
    sd = load_file(str(path))
    name = "final_layer.adaLN_modulation.1"
    delta = _swap(sd[f"{name}.lora_B.weight"] @ sd[f"{name}.lora_A.weight"])
    return state(pipe)[SWAPPED] + weight * delta


def _assert_states_close(ours, oracle, atol=1e-5, skip=()):
    assert ours.keys() == oracle.keys()
    for k in oracle:
        if k in skip:
            continue
        assert ours[k].shape == oracle[k].shape, k
        torch.testing.assert_close(ours[k], oracle[k], atol=atol, rtol=0, msg=k)


# ---------------------------------------------------------------------------------------------
# recognise
# ---------------------------------------------------------------------------------------------
def test_inspect_names_the_layout_the_base_and_the_control_image(tiny_flux, tmp_path, capsys):
    path = control_file(tmp_path / "flux1-canny-dev-lora.safetensors", tiny_flux.transformer)
    rc, out, err = _cli(capsys, "inspect", "--json", "--no-hash", str(path))
    assert rc == 0, err
    facts = json.loads(out)
    assert (facts["type"], facts["format"], facts["family"], facts["base"]) == ("lora", "bfl-control", "flux",
                                                                                 "tiny-flux")
    assert facts["control"] == "canny"
    assert facts["input_width"] == 32
    assert "control image" in facts["needs"] and "canny" in facts["needs"]
    assert "other_keys" not in facts  # the norm scales and biases are part of the adapter


def test_control_kind_from_metadata_else_unknown(tiny_flux, tmp_path):
    import adapterhub

    depth = control_file(tmp_path / "c.safetensors", tiny_flux.transformer, metadata={"modelspec.title": "FLUX.1 Depth"})
    plain = control_file(tmp_path / "d.safetensors", tiny_flux.transformer)
    assert adapterhub.inspect(depth, with_hash=False)["control"] == "depth"
    facts = adapterhub.inspect(plain, with_hash=False)
    assert facts["control"] == "unknown" and "control image" in facts["needs"]


def test_real_flux_dev_shapes_read_as_flux_dev(tmp_path, capsys):
    """At FLUX.1's real widths (a rank-1 file: the header decides): base flux-dev (it patches the guidance
    embedder), the control input 128 wide."""
    from adapterhub.transformer_bases import build_transformer_base

    transformer = build_transformer_base("flux-dev").transformer  # meta device: shapes only
    modules = dict(transformer.named_modules())
    sd = {}
    for bfl, parts in bfl_modules(transformer).items():
        if bfl.startswith(("double_blocks.", "single_blocks.")) and not bfl.startswith(("double_blocks.0.",
                                                                                        "single_blocks.0.")):
            continue
        out_f = sum(modules[p].weight.shape[0] for p in parts)
        in_f = 128 if bfl == "img_in" else modules[parts[0]].weight.shape[1]
        sd[f"{bfl}.lora_A.weight"], sd[f"{bfl}.lora_B.weight"] = torch.zeros(1, in_f), torch.zeros(out_f, 1)
    sd["double_blocks.0.img_attn.norm.query_norm.scale"] = torch.ones(128)
    save_file(sd, str(tmp_path / "flux1-depth-dev-lora.safetensors"))
    rc, out, err = _cli(capsys, "inspect", "--json", "--no-hash", str(tmp_path / "flux1-depth-dev-lora.safetensors"))
    facts = json.loads(out)
    assert rc == 0, err
    assert (facts["format"], facts["base"], facts["control"], facts["input_width"]) == ("bfl-control", "flux-dev",
                                                                                         "depth", 128)


def test_binds_to_the_flux_dev_preset_at_real_widths(tmp_path):
    """BFL's names at FLUX.1's widths (the first and last blocks, every top-level module; rank 1) bind to the
    flux-dev preset on the meta device: every key on a module, every shape right, ``x_embedder`` 64 -> 128."""
    import adapterhub
    from adapterhub.errors import AdapterError
    from adapterhub.transformer_bases import build_transformer_base
    from adapterhub.weights import bind

    base = build_transformer_base("flux-dev")  # meta device: shapes only
    transformer = base.transformer
    modules, cfg = dict(transformer.named_modules()), transformer.config
    keep = ("double_blocks.0.", f"double_blocks.{cfg.num_layers - 1}.", "single_blocks.0.",
            f"single_blocks.{cfg.num_single_layers - 1}.")
    sd = {}
    for bfl, parts in bfl_modules(transformer).items():
        if bfl.startswith(("double_blocks.", "single_blocks.")) and not bfl.startswith(keep):
            continue
        out_f = sum(modules[p].weight.shape[0] for p in parts)
        in_f = 128 if bfl == "img_in" else modules[parts[0]].weight.shape[1]
        sd[f"{bfl}.lora_A.weight"], sd[f"{bfl}.lora_B.weight"] = torch.zeros(1, in_f), torch.zeros(out_f, 1)
        sd[f"{bfl}.lora_B.bias"] = torch.zeros(out_f)
    for block in keep:
        streams = ("img_attn.", "txt_attn.") if block.startswith("double") else ("",)
        for stream in streams:
            for norm in NORMS:
                sd[f"{block}{stream}norm.{norm}.scale"] = torch.ones(cfg.attention_head_dim)
    path = tmp_path / "flux1-canny-dev-lora.safetensors"
    save_file(sd, str(path))
    adapter = adapterhub.load(path)
    assert adapter.base == "flux-dev"
    bindings = bind(base, adapter, widen=True)
    assert len(bindings) == len(adapter.patches)
    # every file key is used: a norm per scale, a weight and a bias patch per diffusers module a LoRA stands for
    assert {k for p in adapter.patches.values() for k in p.file_keys.values()} == set(sd)
    widened = [b for b in bindings if b.widened]
    assert [(b.patch.target, tuple(b.param.shape), b.widened) for b in widened] == [
        ("transformer.x_embedder", (3072, 64), (3072, 128))]
    with pytest.raises(AdapterError, match="widens the transformer's input"):
        bind(base, adapter)


# ---------------------------------------------------------------------------------------------
# merge: equal to diffusers' load_lora_weights + fuse_lora
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weight", [1.0, 0.7])
def test_merge_equals_diffusers_control_fuse(tiny_flux, tmp_path, tiny_converter, weight):
    """x_embedder widened (the new input columns zero, then the delta added), every LoRA delta and bias added,
    the q/k norm scales replaced (whatever the weight, as diffusers loads them), ``in_channels`` updated."""
    import adapterhub

    path = control_file(tmp_path / "control.safetensors", tiny_flux.transformer)
    oracle = diffusers_control(tiny_flux, path, weight)
    mine = copy.deepcopy(tiny_flux)
    adapterhub.load(path).merge_into(mine, weight)
    ours, theirs, before = state(mine), state(oracle), state(tiny_flux)
    assert theirs["x_embedder.weight"].shape == (32, 32) and before["x_embedder.weight"].shape == (32, 16)
    changed = [k for k in theirs if theirs[k].shape != before[k].shape or not torch.equal(theirs[k], before[k])]
    assert len(changed) > 100  # the oracle applied the whole file: weights, biases and norms
    _assert_states_close(ours, theirs, skip=(SWAPPED,))
    torch.testing.assert_close(ours[SWAPPED], _bfl_final_modulation(tiny_flux, path, weight), atol=1e-5, rtol=0)
    assert mine.transformer.config.in_channels == oracle.transformer.config.in_channels == 32
    assert mine.transformer.x_embedder.in_features == 32


def test_diffusers_swaps_the_final_modulation_lora_A_rank_halves(tiny_flux, tmp_path, tiny_converter):
    """Why ``norm_out.linear`` is checked against BFL's formula: diffusers' converter applies swap_scale_shift to
    ``lora_A`` (rank rows) too, so it fuses ``W + swap(B) @ swap(A)``, not BFL's ``W + swap(B @ A)``."""
    path = control_file(tmp_path / "control.safetensors", tiny_flux.transformer)
    sd = load_file(str(path))
    a, b = sd["final_layer.adaLN_modulation.1.lora_A.weight"], sd["final_layer.adaLN_modulation.1.lora_B.weight"]
    theirs = state(diffusers_control(tiny_flux, path))[SWAPPED]
    torch.testing.assert_close(theirs, state(tiny_flux)[SWAPPED] + _swap(b) @ _swap(a), atol=1e-6, rtol=0)
    assert (theirs - _bfl_final_modulation(tiny_flux, path)).abs().max() > 1e-3


def test_cli_merge_writes_a_model_flux_control_pipeline_reads(tiny_flux, tmp_path, capsys):
    import adapterhub
    from diffusers import FluxControlPipeline

    path = control_file(tmp_path / "control.safetensors", tiny_flux.transformer)
    rc, out, err = _cli(capsys, "merge", str(path), "--base", "tiny-flux", "--out", str(tmp_path / "out"), "--json")
    assert rc == 0, err
    loaded = FluxControlPipeline.from_pretrained(str(tmp_path / "out"), local_files_only=True)
    assert (loaded.transformer.config.in_channels, loaded.transformer.out_channels) == (32, 16)
    mine = copy.deepcopy(tiny_flux)
    adapterhub.load(path).merge_into(mine)
    _assert_states_close(state(loaded), state(mine), atol=0)


def test_merged_with_a_style_lora_in_one_run_equals_one_after_the_other(tiny_flux, tmp_path):
    """A control LoRA and a kohya Flux LoRA merged together: the widened x_embedder and every other weight as
    when merged one after the other (each checked against diffusers above)."""
    import adapterhub
    from flux_helpers import bfl_file

    control = control_file(tmp_path / "control.safetensors", tiny_flux.transformer)
    style = bfl_file(tmp_path / "style.safetensors", tiny_flux.transformer, "kohya", seed=3, skip=("img_in",))
    together, apart = copy.deepcopy(tiny_flux), copy.deepcopy(tiny_flux)
    adapterhub.Stack([(str(control), 0.8), (str(style), 0.6)]).apply(together, mode="merge")
    adapterhub.load(control).merge_into(apart, 0.8)
    adapterhub.load(style).merge_into(apart, 0.6)
    _assert_states_close(state(together), state(apart), atol=1e-6)
    assert together.transformer.config.in_channels == 32


def test_a_lora_of_the_old_input_width_cannot_join_the_widening(tiny_flux, tmp_path):
    import adapterhub
    from adapterhub.errors import AdapterError
    from flux_helpers import bfl_file

    control = control_file(tmp_path / "control.safetensors", tiny_flux.transformer)
    style = bfl_file(tmp_path / "style.safetensors", tiny_flux.transformer, "kohya", seed=3)  # img_in 16 wide
    pipe = copy.deepcopy(tiny_flux)
    before = state(pipe)
    with pytest.raises(AdapterError, match=r"style\.safetensors: needs transformer\.x_embedder\.weight of shape "
                                           r"\(32, 16\), which control widens to \(32, 32\)"):
        adapterhub.Stack([(str(control), 1.0), (str(style), 1.0)]).apply(pipe, mode="merge")
    after = state(pipe)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert pipe.transformer.config.in_channels == 16


# ---------------------------------------------------------------------------------------------
# attach: refused before anything changes (the engine restores tensors in place; a shape cannot be)
# ---------------------------------------------------------------------------------------------
def test_attach_and_stack_refuse_in_one_line_model_untouched(tiny_flux, tmp_path):
    import adapterhub
    from adapterhub.errors import AdapterError

    path = control_file(tmp_path / "control.safetensors", tiny_flux.transformer)
    pipe = copy.deepcopy(tiny_flux)
    before, x_embedder = state(pipe), pipe.transformer.x_embedder
    with pytest.raises(AdapterError, match=r"control\.safetensors: a Flux control LoRA widens the transformer's input"
                                           r".*adapterhub merge"):
        adapterhub.load(path).attach(pipe, 1.0)
    with pytest.raises(AdapterError, match="widens the transformer's input"):
        adapterhub.Stack([(str(path), 1.0)]).apply(pipe)
    after = state(pipe)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert pipe.transformer.x_embedder is x_embedder and pipe.transformer.config.in_channels == 16


# ---------------------------------------------------------------------------------------------
# convert: diffusers' layout, as diffusers' own converter names it
# ---------------------------------------------------------------------------------------------
def test_convert_to_diffusers_reads_back_as_the_original_in_diffusers(tiny_flux, tmp_path, capsys, tiny_converter):
    """Our diffusers-layout file holds diffusers' converted tensors key for key (the final modulation's ``lora_A``
    as BFL's file has it, unswapped), and diffusers' loader reading it gives the model reading the original gives,
    and our merge there: the file carries BFL's product to diffusers' users."""
    import adapterhub
    from diffusers import FluxPipeline

    path = control_file(tmp_path / "control.safetensors", tiny_flux.transformer)
    out = tmp_path / "control_diffusers.safetensors"
    rc, _, err = _cli(capsys, "convert", str(path), "--to", "diffusers", "--out", str(out))
    assert rc == 0, err
    converted, written = FluxPipeline.lora_state_dict(str(path)), load_file(str(out))
    final_a = "transformer.norm_out.linear.lora_A.weight"
    assert written.keys() == converted.keys()
    assert all(torch.equal(written[k], converted[k]) for k in converted if k != final_a)
    assert torch.equal(written[final_a], load_file(str(path))["final_layer.adaLN_modulation.1.lora_A.weight"])
    from_ours, from_original = state(diffusers_control(tiny_flux, out)), state(diffusers_control(tiny_flux, path))
    _assert_states_close(from_ours, from_original, atol=0, skip=(SWAPPED,))
    mine = copy.deepcopy(tiny_flux)
    adapterhub.load(path).merge_into(mine)
    _assert_states_close(from_ours, state(mine))


def test_converted_file_is_still_a_control_lora_and_merges_the_same(tiny_flux, tmp_path, capsys):
    import adapterhub

    path = control_file(tmp_path / "control.safetensors", tiny_flux.transformer)
    out = tmp_path / "control_diffusers.safetensors"
    assert _cli(capsys, "convert", str(path), "--to", "diffusers", "--out", str(out))[0] == 0
    facts = adapterhub.inspect(out, with_hash=False)
    assert (facts["format"], facts["base"], facts["input_width"]) == ("diffusers", "tiny-flux", 32)
    a, b = copy.deepcopy(tiny_flux), copy.deepcopy(tiny_flux)
    adapterhub.load(path).merge_into(a)
    adapterhub.load(out).merge_into(b)
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("to", ["kohya", "peft"])
def test_convert_to_a_layout_without_norms_and_biases_is_refused(tiny_flux, tmp_path, capsys, to):
    path = control_file(tmp_path / "control.safetensors", tiny_flux.transformer)
    rc, out, err = _cli(capsys, "convert", str(path), "--to", to, "--out", str(tmp_path / "out.safetensors"))
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "control.safetensors" in err and "diffusers" in err
    assert not (tmp_path / "out.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["control.safetensors"]


# ---------------------------------------------------------------------------------------------
# bad input: one line, exit 2, nothing written
# ---------------------------------------------------------------------------------------------
def test_img_in_narrower_than_the_base_is_refused(tiny_flux, tmp_path, capsys):
    path = control_file(tmp_path / "narrow.safetensors", tiny_flux.transformer, img_in_width=8)
    rc, out, err = _cli(capsys, "merge", str(path), "--base", "tiny-flux", "--out", str(tmp_path / "out"))
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err
    assert "narrow.safetensors" in err and "x_embedder" in err and "img_in" in err
    assert not (tmp_path / "out").exists()


def test_truncated_control_file_is_refused(tiny_flux, tmp_path, capsys):
    path = control_file(tmp_path / "cut.safetensors", tiny_flux.transformer)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    rc, out, err = _cli(capsys, "merge", str(path), "--base", "tiny-flux", "--out", str(tmp_path / "out"))
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err and "cut.safetensors" in err
    assert not (tmp_path / "out").exists()


def test_a_norm_scale_of_the_wrong_width_is_refused_before_any_change(tiny_flux, tmp_path):
    import adapterhub
    from adapterhub.errors import AdapterError

    path = control_file(tmp_path / "bad.safetensors", tiny_flux.transformer)
    sd = load_file(str(path))
    sd["single_blocks.1.norm.key_norm.scale"] = torch.ones(7)
    save_file(sd, str(path))
    pipe = copy.deepcopy(tiny_flux)
    before = state(pipe)
    with pytest.raises(AdapterError, match=r"bad\.safetensors: .*single_transformer_blocks\.1\.attn\.norm_k"):
        adapterhub.load(path).merge_into(pipe)
    after = state(pipe)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


# ---------------------------------------------------------------------------------------------
# sampling a control model with its control image: FluxControlPipeline's latents, bit for bit
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def control_model(tiny_flux, tmp_path_factory):
    """tiny-flux with a control LoRA merged (its x_embedder 32 wide: 16 packed latents + 16 control)."""
    import adapterhub

    path = control_file(tmp_path_factory.mktemp("control") / "flux1-canny-dev-lora.safetensors", tiny_flux.transformer)
    pipe = copy.deepcopy(tiny_flux)
    adapterhub.load(path).merge_into(pipe)
    return pipe


def _control_image(size=32):
    from PIL import Image

    gen = torch.Generator().manual_seed(5)
    pixels = (torch.rand(size, size, 3, generator=gen) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def test_control_sampling_equals_flux_control_pipeline(control_model):
    """Each image's own noise and generator (its seed): the latents equal diffusers' FluxControlPipeline given
    the same noise and a generator seeded the same, bit for bit."""
    from diffusers import FluxControlPipeline

    from adapterhub.sample.flow_control import FlowControlGenerator, FlowControlRequest

    gen = FlowControlGenerator(control_model)
    image, size, steps = _control_image(), 32, 2
    result = gen.generate(FlowControlRequest("a castle", seed=7, images=2, steps=steps, width=size, height=size,
                                             sampler="Euler", cfg=1.0, control_image=image), output="latent")
    parts = {k: getattr(control_model, k) for k in ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2",
                                                     "tokenizer_2", "transformer")}
    ref = FluxControlPipeline(**parts)
    ref.set_progress_bar_config(disable=True)
    for i, seed in enumerate((7, 8)):
        noise = gen.noise([seed], size, size)
        packed = ref._pack_latents(noise, *noise.shape)
        out = ref("a castle", control_image=image, height=size, width=size, num_inference_steps=steps,
                  guidance_scale=3.5, latents=packed, generator=torch.Generator().manual_seed(seed),
                  output_type="latent").images
        expected = ref._unpack_latents(out, size, size, ref.vae_scale_factor)
        assert torch.equal(result.latents[i:i + 1], expected)
    assert "Distilled CFG Scale: 3.5" in result.infotexts[0]


def test_control_requests_a_control_model_cannot_run_are_refused(control_model, tiny_flux):
    from adapterhub.errors import AdapterhubError
    from adapterhub.sample.flow import FlowGenerator
    from adapterhub.sample.flow_control import FlowControlGenerator

    with pytest.raises(AdapterhubError, match="a FLUX.1 control model .* sample it with a control image"):
        FlowGenerator(control_model)
    with pytest.raises(AdapterhubError, match="not a FLUX.1 control model"):
        FlowControlGenerator(tiny_flux)
    gen = FlowControlGenerator(control_model)
    for options, problem in (({}, "needs a control image"), ({"cfg": 3.0}, "distilled guidance only"),
                             ({"init_image": _control_image(), "mask": _control_image()}, "inpainting")):
        options = {"control_image": _control_image(), **options} if problem != "needs a control image" else options
        with pytest.raises(AdapterhubError, match=problem):
            gen("a castle", steps=1, width=32, height=32, **options)


def test_cli_sampling_a_merged_control_model_without_its_image_is_refused(tiny_flux, tmp_path, capsys):
    path = control_file(tmp_path / "control.safetensors", tiny_flux.transformer)
    assert _cli(capsys, "merge", str(path), "--base", "tiny-flux", "--out", str(tmp_path / "merged"))[0] == 0
    rc, out, err = _cli(capsys, "sample", "--base", str(tmp_path / "merged"), "--prompt", "a castle", "--steps", "1",
                        "--out", str(tmp_path / "images"))
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err and "control image" in err
    assert not (tmp_path / "images").exists() or not any((tmp_path / "images").iterdir())


def test_cli_samples_a_control_model_with_its_control_image(tiny_flux, tmp_path, capsys):
    """``adapterhub sample --control-image``: the image the Python API gives for the same request, pixel for pixel;
    a control image for a model without a control input is one line, nothing written."""
    import numpy as np
    from PIL import Image

    from adapterhub.sample.flow_control import FlowControlGenerator

    path = control_file(tmp_path / "control.safetensors", tiny_flux.transformer)
    assert _cli(capsys, "merge", str(path), "--base", "tiny-flux", "--out", str(tmp_path / "merged"))[0] == 0
    _control_image().save(tmp_path / "edges.png")
    rc, out, err = _cli(capsys, "sample", "--base", str(tmp_path / "merged"), "--prompt", "a castle", "--steps", "2",
                        "--size", "32x32", "--seed", "7", "--control-image", str(tmp_path / "edges.png"),
                        "--out", str(tmp_path / "images"))
    assert rc == 0, err
    written = sorted((tmp_path / "images").glob("*.png"))
    assert len(written) == 1
    expected = FlowControlGenerator(str(tmp_path / "merged"))("a castle", steps=2, width=32, height=32, seed=7,
                                                               control_image=str(tmp_path / "edges.png")).images[0]
    assert np.array_equal(np.asarray(Image.open(written[0]).convert("RGB")), np.asarray(expected.convert("RGB")))
    rc, out, err = _cli(capsys, "sample", "--base", "tiny-flux", "--prompt", "a castle", "--steps", "1",
                        "--control-image", str(tmp_path / "edges.png"), "--out", str(tmp_path / "plain"))
    assert rc == 2 and "not a FLUX.1 control model" in err and "Traceback" not in err
    assert not (tmp_path / "plain").exists() or not any((tmp_path / "plain").iterdir())


@pytest.mark.parametrize("options,problem", [(("--cfg", "3"), "distilled guidance only"),
                                             ((), "control image")])
def test_cli_control_image_problems_are_refused_before_a_model_loads(tmp_path, capsys, monkeypatch, options,
                                                                     problem):
    from adapterhub.sample import flow_control

    monkeypatch.setattr(flow_control.FlowControlGenerator, "__init__", lambda *a, **k: pytest.fail("a model loaded"))
    image = tmp_path / ("edges.png" if problem != "control image" else "missing.png")
    if problem != "control image":
        _control_image().save(image)
    rc, out, err = _cli(capsys, "sample", "--base", "tiny-flux", "--prompt", "a castle", "--steps", "1", *options,
                        "--control-image", str(image), "--out", str(tmp_path / "out"))
    assert rc == 2 and problem in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key,shape", [("double_blocks.0.img_attn.norm.extra.scale", (16,)),
                                       ("txt_in.lora_B.bias_extra", (4,)), ("img_out.lora_B.bias", (32,))])
def test_a_key_no_control_lora_has_is_refused(tiny_flux, tmp_path, key, shape):
    """Nothing of a control file is dropped silently: a tensor that is none of its parts is named."""
    import adapterhub
    from adapterhub.errors import AdapterError

    path = control_file(tmp_path / "odd.safetensors", tiny_flux.transformer)
    sd = load_file(str(path))
    sd[key] = torch.ones(shape)
    save_file(sd, str(path))
    with pytest.raises(AdapterError, match=rf"odd\.safetensors: holds a tensor that is no part of a Flux control "
                                           rf"LoRA .*\(key {re.escape(key)}\)"):
        adapterhub.load(path)


# ---------------------------------------------------------------------------------------------
# a plain Flux LoRA on a control model: its img_in LoRA takes the leading input columns (diffusers pads lora_A)
# ---------------------------------------------------------------------------------------------
def test_a_plain_lora_with_img_in_on_a_control_model_equals_diffusers(control_model, tiny_flux, tmp_path):
    """A FLUX.1 LoRA whose ``x_embedder`` LoRA is the base's 16 inputs wide, on a control model (32): diffusers
    zero-pads its ``lora_A`` to the model's width (``_maybe_expand_lora_state_dict``); merged and attached alike,
    and detaching restores the control model bit for bit."""
    import adapterhub
    from flux_helpers import diffusers_fused, peft_file

    # made for tiny-flux (x_embedder 16 wide), in diffusers' names (its kohya converter drops top-level modules)
    style = peft_file(tmp_path / "style.safetensors", tiny_flux.transformer,
                      ["x_embedder", "transformer_blocks.0.attn.to_q", "single_transformer_blocks.1.proj_mlp"], seed=3)
    mine = copy.deepcopy(control_model)
    adapterhub.load(style).merge_into(mine, 1.0)
    oracle = diffusers_fused(control_model, style)
    _assert_states_close(state(mine), oracle)
    assert not torch.equal(oracle["x_embedder.weight"], state(control_model)["x_embedder.weight"])
    attached = copy.deepcopy(control_model)
    before = state(attached)
    with adapterhub.load(style).attach(attached, 1.0):
        _assert_states_close(state(attached), state(mine), atol=0)
    after = state(attached)
    assert all(torch.equal(after[k], before[k]) for k in before)
