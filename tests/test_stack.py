"""Stacks: apply / remove / switch / re-weight (bit-exact), mixed types, spec strings, A1111 prompt tags."""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import pytest
import torch

import adapterhub
from adapterhub import blocks
from adapterhub.errors import AdapterError, AdapterhubError
from adapterhub.plugins import adapter_type
from adapterhub.stack import Entry, Stack, active_stack
from adapterhub.types import Adapter
from adapterhub.weights import merge, patcher_for

PARTS = {"tiny-sd1": ("unet", "text_encoder"), "tiny-sdxl": ("unet", "text_encoder", "text_encoder_2")}
TI_NAME = "zqxwv"  # not a word the tokenizer knows


def parts(arch: str = "tiny-sd1", dtype: torch.dtype | None = None):
    from adapterhub.base import build_preset

    return build_preset(arch, device="cpu", components=PARTS[arch], seed=11, dtype=dtype)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v.detach().clone() for name in ("unet", "text_encoder", "text_encoder_2")
            if getattr(model, name, None) is not None for k, v in getattr(model, name).state_dict().items()}


def assert_bitwise(a: dict, b: dict):
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"{len(bad)} tensors differ, first {bad[0]}"


@contextlib.contextmanager
def mark(params: list[torch.Tensor]):
    """Overwrite ``params`` with a sentinel for the block, check the block left them alone, put them back."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.fill_(1234.5)
    yield
    with torch.no_grad():
        for p, value in zip(params, saved):
            assert bool((p == 1234.5).all()), "a parameter outside the change was rewritten"
            p.copy_(value)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("stack")
    base = parts()
    return {
        "lora": adapter_type("lora").example(base, folder / "style.safetensors", seed=1),
        "locon": adapter_type("locon").example(base, folder / "char.safetensors", seed=2),
        "loha": adapter_type("loha").example(base, folder / "detail.safetensors", seed=3, text=False),
        "ti": adapter_type("textual_inversion").example(base, folder / f"{TI_NAME}.safetensors", seed=4),
        "hn": adapter_type("hypernetwork").example(base, folder / "anime.pt", seed=5),
    }


@pytest.fixture(scope="module")
def adapters(files) -> dict[str, Adapter]:
    return {k: adapterhub.load(p) for k, p in files.items()}


# ---------------------------------------------------------------------------------------------
# exactness
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_remove_restores_every_tensor_bitwise(dtype, adapters):
    model = parts(dtype=dtype)
    original = snapshot(model)
    stack = Stack([Entry(adapters["lora"], 0.8), Entry(adapters["locon"], te=0.5, unet=-0.7, lbw="MIDD"),
                   Entry(adapters["loha"], 1.3)])
    stack.apply(model)
    changed = snapshot(model)
    assert any(not torch.equal(changed[k], original[k]) for k in original if k.startswith("text_encoder."))
    assert sum(not torch.equal(changed[k], original[k]) for k in original) > 50
    stack.set_weights([0.1, "0.2:lbw=OUTS", None])
    stack.remove()
    assert_bitwise(snapshot(model), original)
    assert not patcher_for(model).pristine and active_stack(model) is None
    stack.remove()  # a second remove is a no-op


def test_apply_equals_merge_of_the_same_entries(adapters):
    entries = [Entry(adapters["lora"], 0.8), Entry(adapters["locon"], te=0.5, unet=-0.7),
               Entry(adapters["loha"], 0.6, lbw="INALL")]
    attached, merged, baked = parts(), parts(), parts()
    Stack(entries).apply(attached)
    Stack(copy.deepcopy(entries)).apply(merged, mode="merge")
    factors = blocks.resolve("INALL", "sd1")
    weight = {t: 0.6 * blocks.factor(t, factors) for t in adapters["loha"].patches}
    merge(baked, [(adapters["lora"], 0.8),
                  (adapters["locon"], lambda t: 0.5 if t.startswith("text_encoder") else -0.7),
                  (adapters["loha"], weight)])
    assert_bitwise(snapshot(attached), snapshot(baked))
    assert_bitwise(snapshot(merged), snapshot(baked))


def test_switching_equals_a_fresh_apply_and_touches_only_what_changes(adapters):
    lora, locon = adapters["lora"], adapters["locon"]
    downs = Adapter("lora", "kohya", {t: p for t, p in lora.patches.items() if ".down_blocks." in t},
                    path=Path("downs.safetensors"))
    ups = Adapter("lora", "kohya", {t: p for t, p in lora.patches.items() if ".up_blocks." in t},
                  path=Path("ups.safetensors"))
    a = Stack([Entry(locon, 0.5), Entry(downs, 0.7)])
    b = Stack([Entry(locon, 0.5), Entry(ups, -0.4)])
    model = parts()
    original = snapshot(model)
    a.apply(model)
    unet = model.unet
    # sentinels: a weight only the shared entry touches (same patch, same weight in A and B), and
    # one no entry touches; a switch that rewrote them would erase the marks
    marked = [unet.mid_block.resnets[0].conv1.weight, unet.conv_out.weight]
    with mark(marked):
        b.apply(model, replace=True)
    assert active_stack(model) is b and a.mode is None
    fresh = parts()
    Stack([Entry(locon, 0.5), Entry(ups, -0.4)]).apply(fresh)
    assert_bitwise(snapshot(model), snapshot(fresh))
    b.remove()
    assert_bitwise(snapshot(model), original)


def test_set_weights_rewrites_only_the_parameters_whose_multiplier_changes(adapters):
    model = parts()
    stack = Stack([Entry(adapters["locon"], 0.8), Entry(adapters["lora"], 0.5)]).apply(model)
    other_block = model.unet.down_blocks[0].attentions[0].proj_in.weight  # IN01
    with mark([other_block]):
        stack.set_weights({"style": "0.5:lbw=1,1,1,1,1,1,1,1,0.25,1,1,1,1,1,1,1,1"})  # only OUT03 changes
    fresh = parts()
    Stack([Entry(adapters["locon"], 0.8), Entry(adapters["lora"], 0.5, lbw=(1,) * 8 + (0.25,) + (1,) * 8)]).apply(fresh)
    assert_bitwise(snapshot(model), snapshot(fresh))
    assert stack.entries[1].lbw[8] == 0.25 and stack.entries[1].te == 0.5
    stack.set_weights("char:0.1, style:unet=0.2")
    assert (stack.entries[0].te, stack.entries[0].unet) == (0.1, 0.1)
    assert (stack.entries[1].te, stack.entries[1].unet) == (0.5, 0.2) and stack.entries[1].lbw is not None
    stack.set_weights([0.3, {"lbw": None}])
    assert stack.entries[1].lbw is None
    with pytest.raises(AdapterhubError, match="no entry of that name"):
        stack.set_weights({"nobody": 0.5})
    stack.remove()


def _unet_out(pipe) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 32, 32, generator=gen)
    context = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=gen)
    with torch.no_grad():
        return pipe.unet(latents, 500, encoder_hidden_states=context).sample


@pytest.fixture
def controlnet_registered():
    """The ControlNet plugin, registered for the test if the installed entry points do not list it yet."""
    import adapterhub.plugins as plugins

    plugin = pytest.importorskip("adapterhub_plugins.controlnet")
    pm = plugins.manager()
    added = "controlnet" not in plugins.adapter_types() and not pm.is_registered(plugin)
    if added:
        pm.register(plugin)
        plugins.adapter_types.cache_clear()
    yield
    if added:
        pm.unregister(plugin)
        plugins.adapter_types.cache_clear()


def test_mixed_stack_lora_loha_ti_hypernetwork_controlnet_applies_and_removes_cleanly(fresh_sd1, files, tmp_path,
                                                                                       controlnet_registered):
    from PIL import Image

    pipe = fresh_sd1
    original, output = snapshot(pipe), _unet_out(pipe)
    vocab = len(pipe.tokenizer)
    processors = {k: type(v) for k, v in pipe.unet.attn_processors.items()}
    stack = Stack.parse(f"{files['lora']}:0.8, {files['loha']}:0.5:lbw=OUTALL, {files['ti']}, {files['hn']}:0.4")
    cn = adapter_type("controlnet").example(pipe, tmp_path / "cn", seed=1)
    stack.entries.append(Entry(cn, 0.7, options={"image": Image.new("RGB", (256, 256), (200, 30, 90))}))
    stack.apply(pipe)
    assert len(pipe.tokenizer) == vocab + 2
    assert any(type(p).__name__ == "HypernetworkAttnProcessor" for p in pipe.unet.attn_processors.values())
    assert stack.rewrite_prompt(f"a {TI_NAME} castle") == f"a {TI_NAME} {TI_NAME}_1 castle"
    stack.set_weights([None, None, None, 0.9, 0.5])
    assert stack._applied.handles[3].hypernetwork.multiplier == 0.9
    with torch.no_grad():
        out = pipe.text_encoder(pipe.tokenizer(f"a {TI_NAME} {TI_NAME}_1", return_tensors="pt").input_ids)[0]
    assert torch.isfinite(out).all()
    assert not torch.equal(_unet_out(pipe), output)
    stack.remove()
    assert len(pipe.tokenizer) == vocab
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == processors
    assert_bitwise(snapshot(pipe), original)
    assert torch.equal(_unet_out(pipe), output)


def test_a_failing_entry_changes_nothing_and_keeps_the_previous_stack(fresh_sd1, files, adapters):
    pipe = fresh_sd1
    first = Stack([Entry(adapters["lora"], 0.8)]).apply(pipe)
    with_first = snapshot(pipe)
    twice = Stack([Entry(adapters["locon"], 0.5), Entry(adapters["ti"]), Entry(adapters["ti"])])
    with pytest.raises(AdapterError, match="already in"):  # the second copy of the token is refused
        twice.apply(pipe, replace=True)
    assert active_stack(pipe) is first and twice.mode is None
    assert_bitwise(snapshot(pipe), with_first)
    first.remove()


# ---------------------------------------------------------------------------------------------
# guard and modes
# ---------------------------------------------------------------------------------------------
def test_one_stack_per_pipeline(adapters):
    model = parts()
    original = snapshot(model)
    first = Stack([Entry(adapters["lora"], 0.8)]).apply(model)
    second = Stack([Entry(adapters["locon"], 0.3)])
    with pytest.raises(AdapterhubError, match="already attached") as err:
        second.apply(model)
    assert "\n" not in str(err.value)
    with pytest.raises(AdapterhubError, match="already attached"):
        first.apply(model)
    second.apply(model, replace=True)
    assert first.mode is None and second.mode == "attach"
    first.remove()  # not applied any more: a no-op
    second.remove()
    assert_bitwise(snapshot(model), original)


def test_merge_mode_bakes_and_cannot_be_removed(adapters):
    model = parts()
    stack = Stack([Entry(adapters["lora"], 0.8)]).apply(model, mode="merge")
    assert stack.mode == "merge" and active_stack(model) is None and not patcher_for(model).pristine
    with pytest.raises(AdapterhubError, match="cannot be removed"):
        stack.remove()
    with pytest.raises(AdapterhubError, match="cannot be re-weighted"):
        stack.set_weights([0.1])
    attached = Stack([Entry(adapters["locon"], 0.3)]).apply(model)
    with pytest.raises(AdapterhubError, match="already attached"):
        Stack([Entry(adapters["loha"], 0.3)]).apply(model, mode="merge")
    attached.remove()
    handle = adapters["locon"].attach(model, 0.3)  # attached outside any stack
    with pytest.raises(AdapterhubError, match="detach them before merging"):
        Stack([Entry(adapters["loha"], 0.3)]).apply(model, mode="merge")
    handle.detach()
    with pytest.raises(AdapterhubError, match="mode"):
        Stack([]).apply(model, mode="fuse")


def test_merge_mode_refuses_a_hypernetwork_before_any_change(adapters):
    model = parts()
    before = snapshot(model)
    with pytest.raises(AdapterError, match="cannot be merged; attach it instead"):
        Stack([Entry(adapters["lora"], 0.8), Entry(adapters["hn"], 0.5)]).apply(model, mode="merge")
    assert_bitwise(snapshot(model), before)
    with pytest.raises(AdapterError, match="block weights apply to weight deltas only"):
        Stack([Entry(adapters["hn"], 0.5, lbw="ALL")]).apply(model)


def test_block_weights_on_sdxl_take_sdxl_lengths(tmp_path):
    model = parts("tiny-sdxl")
    original = snapshot(model)
    path = adapter_type("lora").example(model, tmp_path / "xl.safetensors", seed=1)
    with pytest.raises(AdapterhubError, match="sdxl take 12 or 20 values, not 17"):
        Stack.parse(f"{path}:1:lbw={','.join(['1'] * 17)}").apply(model)
    assert_bitwise(snapshot(model), original)
    stack = Stack.parse(f"{path}:1:lbw=OUTS").apply(model)  # BASE + OUT03-05
    now = snapshot(model)
    assert torch.equal(now["unet.down_blocks.1.attentions.0.proj_in.weight"],
                       original["unet.down_blocks.1.attentions.0.proj_in.weight"])
    assert not torch.equal(now["unet.up_blocks.1.attentions.0.proj_in.weight"],
                           original["unet.up_blocks.1.attentions.0.proj_in.weight"])
    stack.remove()
    assert_bitwise(snapshot(model), original)


# ---------------------------------------------------------------------------------------------
# spec strings
# ---------------------------------------------------------------------------------------------
def test_spec_grammar(files, tmp_path):
    lora, locon = files["lora"], files["locon"]
    lbw = ",".join(["1"] * 8 + ["0.5"] * 9)
    stack = Stack.parse(f"{lora}:0.8, {locon}:0.6:unet=0.3:lbw={lbw}, {files['loha']}:te=0.2, {lora}:0.5:0.25")
    e = stack.entries
    assert [(x.te, x.unet) for x in e] == [(0.8, 0.8), (0.6, 0.3), (0.2, 0.2), (0.5, 0.25)]
    assert e[1].lbw == (1.0,) * 8 + (0.5,) * 9 and e[0].lbw is None and e[1].path == locon
    assert Stack.parse(f"{lora}").entries[0].te == 1.0
    assert Stack.parse(f"{lora}:lbw=ins").entries[0].lbw == "INS"
    assert Stack.parse(stack.spec().replace("style", str(lora)).replace("char", str(locon))
                       .replace("detail", str(files["loha"]))).spec() == stack.spec()
    # a colon in a path stays in the name (the rule of `adapterhub merge`)
    colon = tmp_path / "we:ird.safetensors"
    colon.write_bytes(lora.read_bytes())
    assert Stack.parse(f"{colon}:0.5").entries[0].path == colon
    assert Stack.parse(str(colon)).entries[0].te == 1.0
    comma = tmp_path / "a,b.safetensors"
    comma.write_bytes(lora.read_bytes())
    assert Stack.parse(f"{comma}:0.5").entries[0].path == comma
    assert Stack([(lora, 0.5), (locon, {"te": 0.2, "unet": 0.4}), (lora, "0.3:lbw=OUTS")]).spec() == \
        "style:0.5, char:0.2:unet=0.4, style:0.3:lbw=OUTS"


@pytest.mark.parametrize("spec, message", [
    ("{lora}:abc", "not a number"),
    ("{lora}:nan", "not a finite number"),
    ("{lora}:0.5:foo=1", "unknown field foo="),
    ("{lora}:lbw=NOPE", "unknown preset"),
    ("{lora}:lbw=", "lbw= is empty"),
    ("{lora}:te=abc", "not a number"),
    ("{lora}:1:2:3:4", "too many weights"),
    ("no_such_adapter_zz:0.5", "no_such_adapter_zz"),
])
def test_spec_errors_are_one_line(spec, message, files, monkeypatch, tmp_path):
    monkeypatch.setenv("ADAPTERHUB_CATALOG", str(tmp_path / "none.db"))
    with pytest.raises(AdapterhubError, match=message) as err:
        Stack.parse(spec.format(lora=files["lora"]))
    assert "\n" not in str(err.value)


def test_names_resolve_through_the_catalog(files, tmp_path, monkeypatch):
    from adapterhub.catalog import open_catalog, scan
    from adapterhub.api import sha256_file

    db = tmp_path / "catalog.db"
    with open_catalog(db, create=True) as catalog:
        scan(catalog, [files["lora"].parent], jobs=1)
    monkeypatch.setenv("ADAPTERHUB_CATALOG", str(db))
    stack = Stack.parse(f"char:0.5, {sha256_file(files['lora'])[:12]}:0.7")
    assert [e.path.resolve() for e in stack] == [files["locon"].resolve(), files["lora"].resolve()]


# ---------------------------------------------------------------------------------------------
# A1111 prompt tags
# ---------------------------------------------------------------------------------------------
def test_prompt_tags(files):
    folder = files["lora"].parent
    prompt = (f"a {TI_NAME} castle <lora:style:0.8>, <lora:char:0.5:1.0> <lora:style:1:te=0.3> "
              "<LoRA:style> <lyco:detail:0.7:unet=0.2> <hypernet:anime:0.5> <lora:\"style\":1:lbw=OUTS> "
              "<lora:char:1:INS> <lora:style:0.8:0.6:16> <lora:style:1:stop=10> <other:thing:1> masterpiece")
    stack, cleaned = Stack.from_prompt(prompt, dirs=[folder])
    assert cleaned == f"a {TI_NAME} castle , <other:thing:1> masterpiece"
    e = stack.entries
    assert [x.path.name for x in e] == ["style.safetensors", "char.safetensors", "style.safetensors",
                                        "style.safetensors", "detail.safetensors", "anime.pt",
                                        "style.safetensors", "char.safetensors", "style.safetensors",
                                        "style.safetensors"]
    assert [(x.te, x.unet) for x in e] == [(0.8, 0.8), (0.5, 1.0), (0.3, 0.3), (1.0, 1.0), (0.7, 0.2), (0.5, 0.5),
                                           (1.0, 1.0), (1.0, 1.0), (0.8, 0.6), (1.0, 1.0)]
    assert e[6].lbw == "OUTS" and e[7].lbw == "INS" and e[0].lbw is None
    assert e[8].extra == {"dyn": "16"} and e[9].extra == {"stop": "10"}


@pytest.mark.parametrize("tag, message", [
    ("<lora:nobody_zz:0.5>", "<lora:nobody_zz:0.5>"),
    ("<lora:style:x>", "'x' is not a number"),
    ("<lora:style:0.5:foo=2>", "unknown field foo="),
    ("<hypernet:anime:0.5:0.3>", "too many weights"),
    ("<hypernet:anime:0.5:unet=0.3>", "unknown field unet="),
    ("<lora:style:0.5:lbw=1,1>", None),  # a wrong length is found when applied (it depends on the model)
])
def test_prompt_tag_errors(tag, message, files, monkeypatch, tmp_path):
    monkeypatch.setenv("ADAPTERHUB_CATALOG", str(tmp_path / "none.db"))
    if message is None:
        stack, _ = Stack.from_prompt(tag, dirs=[files["lora"].parent])
        with pytest.raises(AdapterhubError, match="take 17 or 26 values, not 2"):
            stack.apply(parts())
        return
    with pytest.raises(AdapterhubError, match=message) as err:
        Stack.from_prompt(f"a {tag} b", dirs=[files["lora"].parent])
    assert "\n" not in str(err.value)


def test_prompt_stack_applies(files):
    model = parts()
    original = snapshot(model)
    stack, prompt = Stack.from_prompt("a cat <lora:style:0.8> <lora:char:0.4:0.2>", dirs=[files["lora"].parent])
    assert prompt == "a cat"
    stack.apply(model)
    expected = parts()
    merge(expected, [(adapterhub.load(files["lora"]), 0.8),
                     (adapterhub.load(files["locon"]), lambda t: 0.4 if t.startswith("text_encoder") else 0.2)])
    assert_bitwise(snapshot(model), snapshot(expected))
    stack.remove()
    assert_bitwise(snapshot(model), original)


# ---------------------------------------------------------------------------------------------
# adapterhub merge takes stack specs
# ---------------------------------------------------------------------------------------------
def test_cli_merge_takes_specs_with_block_weights(files, tmp_path, fresh_sd1):
    from click.testing import CliRunner

    from adapterhub.base import load_base
    from adapterhub.cli import cli

    out = tmp_path / "merged"
    spec = f"{files['lora']}:0.7:unet=0.3:lbw=INS, {files['loha']}:0.5"
    res = CliRunner().invoke(cli, ["merge", "--base", "tiny-sd1", "--out", str(out), spec, "--json"])
    assert res.exit_code == 0, res.output
    Stack.parse(spec).apply(fresh_sd1, mode="merge")
    merged = load_base(str(out))
    for name in ("unet", "text_encoder"):
        mine, ref = getattr(merged, name).state_dict(), getattr(fresh_sd1, name).state_dict()
        assert all(torch.equal(mine[k], ref[k]) for k in ref)


def test_a_dropped_pipeline_and_stack_are_freed(adapters):
    import gc
    import weakref

    model = parts()
    Stack([Entry(adapters["lora"], 0.8)]).apply(model)  # the stack object itself is dropped at once
    unet = weakref.ref(model.unet)
    del model
    gc.collect()
    assert unet() is None
