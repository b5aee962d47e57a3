"""The plugin contract, proved for every registered adapter type (the third-party test plugin included).

Each row is a registered type; each column a promise of the contract, checked where the type declares it:
its own example is sniffed as its own and parses; saved and read back it behaves the same; attach changes
the model and detach restores it bit for bit; a weight delta merges to exactly what attach gives; it
converts to each target ``adapterhub.convert.targets_of`` lists and the result behaves the same; it samples
with the eager backend and, where its ``runtime_kind`` is one the compiled backend runs, with the compiled
backend (dynamo ``aot_eager``, tiny-sd1, 2 steps, 64 px) bit for bit like eager; the image's infotext holds
exactly the fields its ``infotext_fields`` declares; where it lists ``train``, two optimiser steps on tiny-sd1
(64 px, two images) write a file that reads back as the type and, attached, changes the model. A new type gets
every column from its declarations alone.

The third-party distribution (``tests/thirdparty_plugin``) is pip-installed into a private folder and found
through its entry point like any other; the table's rows are read at collection from the built-ins and from
the plugin's own hook, and the ``registry`` fixture checks that they are exactly what is registered.
"""
from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
PLUGIN = HERE / "thirdparty_plugin"
DISTRIBUTION = "adapterhub-example-plugin"
SIZE = 64


def _declared_types() -> dict:
    """name -> type object for the table's rows: the built-ins' registered objects and the third-party
    plugin's, read from its hook without registering it (the ``registry`` fixture does that)."""
    from adapterhub.plugins import adapter_types

    spec = importlib.util.spec_from_file_location(
        "_contract_thirdparty_probe", PLUGIN / "src" / "adapterhub_example_plugin" / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    types = {name: t for name, t in adapter_types().items() if t.source.distribution != DISTRIBUTION}
    types.update({t.name: t for t in module.adapterhub_adapter_types()})
    return types


DECLARED = _declared_types()
THIRD_PARTY = ("scale-diff", "residual-shift")


def _rows(predicate) -> list[str]:
    return [name for name, t in DECLARED.items() if predicate(t)]


def _conversions() -> list[tuple[str, str]]:
    from adapterhub.convert import targets_of

    return [(name, to) for name in _rows(lambda t: "example" in t.capabilities) for to in targets_of(DECLARED[name])]


def _compiled_runs(adapter_type) -> bool:
    from adapterhub_plugins.backends.compiled import RUNS

    return adapter_type.runtime_kind in RUNS


EXAMPLES = _rows(lambda t: "example" in t.capabilities)
ATTACHES = _rows(lambda t: {"example", "attach"} <= set(t.capabilities))
SAVES = _rows(lambda t: {"example", "save"} <= set(t.capabilities))
MERGES = _rows(lambda t: t.weight_space and {"example", "merge", "attach"} <= set(t.capabilities))
TRAINS = _rows(lambda t: "train" in t.capabilities)
TAGGED = _rows(lambda t: t.prompt_tags and {"example", "attach"} <= set(t.capabilities))


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """The registry with the third-party distribution installed (pip, into a private folder on ``sys.path``);
    the registry as it was afterwards."""
    from adapterhub import plugins

    site = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(PLUGIN)], check=True, capture_output=True)
    sys.path.insert(0, str(site))
    plugins.reset()
    try:
        types = plugins.adapter_types()
        assert set(types) == set(DECLARED)  # the table has a row for every registered type, and no other
        assert all(types[name].source.distribution == DISTRIBUTION for name in THIRD_PARTY)
        yield types
    finally:
        sys.path.remove(str(site))
        sys.modules.pop("adapterhub_example_plugin", None)
        plugins.reset()


@pytest.fixture(scope="module")
def examples(registry, tiny_sd1, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("contract_examples")
    return {name: Path(registry[name].example(tiny_sd1, folder / f"{name}{registry[name].example_suffix}",
                                              seed=1)) for name in EXAMPLES}


@pytest.fixture(scope="module")
def two_images(tmp_path_factory) -> Path:
    """A dataset of two 64 px images with captions and conditioning sidecars (``x.cond.png``: a control type
    trains on them, the others never see them)."""
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("dataset") / "1_square"
    folder.mkdir()
    gen = np.random.default_rng(0)
    for i, caption in enumerate(("a red square", "a blue square")):
        pixels = gen.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        Image.fromarray((pixels > 127).astype(np.uint8) * 255).save(folder / f"{i}.cond.png")
        (folder / f"{i}.txt").write_text(caption, encoding="utf-8")
    return folder.parent


@pytest.fixture(scope="module")
def backends(registry, tiny_sd1):
    """An eager and a compiled (``aot_eager``) generator on copies of tiny-sd1, shared by the table."""
    import torch._dynamo

    from adapterhub.sample.generator import Generator

    torch._dynamo.reset()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADAPTERHUB_COMPILE_BACKEND", "aot_eager")
        compiled = Generator(copy.deepcopy(tiny_sd1), backend="compiled", hash_model=False)
    eager = Generator(copy.deepcopy(tiny_sd1), backend="eager", hash_model=False)
    yield eager, compiled
    compiled.close()
    eager.close()
    torch._dynamo.reset()


def _load(path):
    import adapterhub

    return adapterhub.load(path)


def _state(pipe) -> dict[str, torch.Tensor]:
    """Every parameter and buffer the adapters could touch, and the tokenizer's size (as a tensor)."""
    state = {f"unet.{k}": v for k, v in pipe.unet.state_dict().items()}
    state.update({f"text_encoder.{k}": v for k, v in pipe.text_encoder.state_dict().items()})
    state["tokenizer"] = torch.tensor(len(pipe.tokenizer))
    return {k: v.detach().clone() for k, v in state.items()}


def _unet_output(pipe) -> torch.Tensor:
    """One UNet call on fixed inputs (hooks and attention processors included)."""
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, pipe.unet.config.in_channels, SIZE // 8, SIZE // 8, generator=gen)
    context = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=gen)
    with torch.no_grad():
        return pipe.unet(sample, torch.tensor(500), encoder_hidden_states=context, return_dict=False)[0]


def _probe(pipe) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return _unet_output(pipe), _state(pipe)


def _same(a, b, tol: float = 0.0) -> None:
    out_a, state_a = a
    out_b, state_b = b
    torch.testing.assert_close(out_a, out_b, rtol=tol, atol=tol)
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        torch.testing.assert_close(state_a[key], state_b[key], rtol=tol, atol=tol, msg=key)


def _attached_probe(registry, name, path, tiny_sd1, weight=1.0):
    """The probe of a fresh tiny-sd1 with ``path`` attached (the type's example options)."""
    pipe = copy.deepcopy(tiny_sd1)
    adapter = _load(path)
    with adapter.attach(pipe, weight, **registry[name].example_options(pipe)):
        return _probe(pipe)


# --------------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", EXAMPLES)
def test_sniffs_and_parses_its_own_example(registry, examples, name):
    from adapterhub.io import open_adapter_file

    adapter_type = registry[name]
    file = open_adapter_file(examples[name])
    own = adapter_type.sniff(file)
    assert own is not None and 0 < own.score <= 1
    others = {n: t.sniff(file) for n, t in registry.items() if n != name}
    assert all(s is None or s.score < own.score for s in others.values()), others
    adapter = _load(examples[name])
    assert adapter.type == name and adapter.format == own.format
    assert adapter.format in adapter_type.formats
    assert isinstance(adapter_type.info(adapter), dict)


def _same_type(name: str, again, layout: str) -> None:
    """``again``, written by type ``name`` in ``layout``, reads back as ``name`` or as the type the type declares
    for that layout (``reads_back_as``: an AdaLoRA written as kohya is the plain LoRA it equals)."""
    assert again.type == DECLARED[name].reads_back_as.get(layout, name)


@pytest.mark.parametrize("name", SAVES)
def test_save_and_read_back_equal(registry, examples, tiny_sd1, tmp_path, name):
    adapter = _load(examples[name])
    again = _load(adapter.save(tmp_path / examples[name].name))  # the same name: a token may come from it
    if "attach" in registry[name].capabilities:  # bit for bit: a type's own layout keeps its tensors
        _same(_attached_probe(registry, name, examples[name], tiny_sd1),
              _attached_probe(registry, name, again.path, tiny_sd1))
    _same_type(name, again, adapter.format)
    assert again.format == adapter.format
    assert registry[name].info(again) == registry[name].info(adapter)
    assert again.patches.keys() == adapter.patches.keys()
    for target, patch in adapter.patches.items():
        assert patch.tensors.keys() == again.patches[target].tensors.keys()
        for key, tensor in patch.tensors.items():
            assert torch.equal(tensor, again.patches[target].tensors[key]), (target, key)


@pytest.mark.parametrize("name", ATTACHES)
def test_attach_changes_and_detach_restores_bitwise(registry, examples, fresh_sd1, name):
    before = _probe(fresh_sd1)
    adapter = _load(examples[name])
    handle = adapter.attach(fresh_sd1, 1.0, **registry[name].example_options(fresh_sd1))
    attached = _probe(fresh_sd1)
    with pytest.raises(AssertionError):
        _same(before, attached)  # the attachment does something
    handle.detach()
    _same(before, _probe(fresh_sd1))


@pytest.mark.parametrize("name", MERGES)
def test_merge_equals_attach(registry, examples, tiny_sd1, name):
    merged = copy.deepcopy(tiny_sd1)
    _load(examples[name]).merge_into(merged, 0.7)
    _same(_probe(merged), _attached_probe(registry, name, examples[name], tiny_sd1, weight=0.7))


def _convert(source: Path, to: str, out: Path) -> Path:
    """``convert`` to ``out``, named as the layout wants (a file for a one-file layout, else a folder)."""
    from adapterhub.convert import convert
    from adapterhub.errors import AdapterhubError

    try:
        convert(source, to, out)
    except AdapterhubError as exc:
        if "is a single file" in str(exc):
            out = out.with_name(f"{out.name}.safetensors")
        elif "is a folder" in str(exc):
            out = out.with_suffix("")
        else:
            raise
        convert(source, to, out)
    return out


@pytest.mark.parametrize("name,to", _conversions())
def test_converts_to_each_declared_target(registry, examples, tiny_sd1, tmp_path, name, to):
    out = _convert(examples[name], to, tmp_path / examples[name].name)
    if "attach" in registry[name].capabilities:
        # layouts differ in dtype and scaling conventions: the same model within float32 rounding
        _same(_attached_probe(registry, name, examples[name], tiny_sd1),
              _attached_probe(registry, name, out, tiny_sd1), tol=1e-5)
    _same_type(name, _load(out), to)


@pytest.mark.parametrize("name", ATTACHES)
def test_samples_eager_and_compiled_where_declared(registry, examples, backends, name):
    from adapterhub.errors import AdapterhubError
    from adapterhub.sample.generator import Request
    from adapterhub.stack import Entry, Stack

    eager, compiled = backends

    def request(entries):  # the file's name in the prompt: a textual inversion's token is its file name
        return Request(f"a house, {examples[name].stem}", stack=Stack(entries), seed=4, steps=2, sampler="Euler",
                       width=SIZE, height=SIZE)

    def entries():
        return [Entry(str(examples[name]), te=1.0, options=registry[name].example_options(eager.pipe))]

    plain = eager.generate(request([]), output="latent").latents
    got = eager.generate(request(entries()), output="latent").latents
    assert not torch.equal(plain, got)  # the adapter reaches the sample
    if not _compiled_runs(registry[name]):
        with pytest.raises(AdapterhubError, match=f"a {name} changes the UNet's code.*--backend eager"):
            compiled.generate(request(entries()), output="latent")
        return
    assert torch.equal(compiled.generate(request(entries()), output="latent").latents, got)


@pytest.mark.parametrize("name", TRAINS)
def test_trains_two_steps_and_the_result_is_its_type(registry, two_images, fresh_sd1, tmp_path, name):
    """Two optimiser steps on tiny-sd1 (64 px, the type's defaults): the loss is finite; what is written reads
    back as the type (where it ``inspect``s) and changes the model when attached, detached bit for bit (where it
    ``attach``es)."""
    import math

    from adapterhub.train import TrainConfig, train

    out = tmp_path / f"trained{registry[name].example_suffix}"
    result = train(TrainConfig(type=name, base="tiny-sd1", dataset=two_images, out=out, max_steps=2,
                               resolution=SIZE, bucket_step=32, seed=0, log_with="none", register=False))
    assert result["steps"] == 2 and math.isfinite(result["last_loss"])
    assert Path(result["out"]).exists()
    if "inspect" in registry[name].capabilities:
        trained = _load(result["out"])
        _same_type(name, trained, trained.format)
        assert trained.format in registry[name].formats
    if "attach" in registry[name].capabilities:
        before = _probe(fresh_sd1)
        handle = _load(result["out"]).attach(fresh_sd1, 1.0, **registry[name].example_options(fresh_sd1))
        with pytest.raises(AssertionError):
            _same(before, _probe(fresh_sd1))  # two steps moved it away from doing nothing
        handle.detach()
        _same(before, _probe(fresh_sd1))


@pytest.mark.parametrize("name", ATTACHES)
def test_infotext_holds_the_fields_the_type_declares(registry, examples, backends, name):
    """The entry adds to the image's infotext exactly the fields its type's ``infotext_fields`` declares (none
    where it declares none), with the declared values: a hash list's entry under the entry's name, a unit
    numbered from 0."""
    from adapterhub.sample import infotext
    from adapterhub.sample.generator import Request
    from adapterhub.stack import Entry, Stack

    eager, _ = backends
    prompt = f"a house, {examples[name].stem}"
    entry = Entry(str(examples[name]), te=0.5, options=registry[name].example_options(eager.pipe))

    def fields(entries):
        return infotext.parse(eager.generate(Request(prompt, stack=Stack(entries), seed=4, steps=1, sampler="Euler",
                                                     width=SIZE, height=SIZE), output="latent").infotexts[0])

    plain, got = fields([]), fields([entry])
    declared = registry[name].infotext_fields(entry.adapter, entry, prompt + "\n")
    assert set(got) - set(plain) == {field if label else f"{field} 0" for field, label, _ in declared}
    for field, label, value in declared:
        value = value() if callable(value) else value
        if label is None:
            assert got[f"{field} 0"] == value, field
        else:
            assert infotext.parse_hashes(got[field])[label] == value, field


@pytest.mark.parametrize("name", TAGGED)
def test_prompt_tags_load_the_type_as_a_stack_entry_does(registry, examples, tiny_sd1, name):
    """Each ``<tag:NAME:w>`` the type declares (``prompt_tags``), NAME a file in the adapter folder, samples
    exactly what a ``--stack`` entry of that file at ``w`` does, and leaves the prompt (the text encoder sees the
    prompt without it)."""
    from adapterhub.sample.generator import Generator, Request
    from adapterhub.stack import Entry, Stack

    gen = Generator(copy.deepcopy(tiny_sd1), backend="eager", hash_model=False, adapter_dirs=[examples[name].parent])
    assert not registry[name].example_options(gen.pipe)  # a tag carries no attach options

    def latents(prompt, entries=()):
        return gen.generate(Request(prompt, stack=Stack(list(entries)), seed=4, steps=2, sampler="Euler",
                                    width=SIZE, height=SIZE), output="latent").latents

    staged = latents("a house", [Entry(str(examples[name]), te=0.5)])
    assert not torch.equal(staged, latents("a house"))
    for tag in registry[name].prompt_tags:
        assert torch.equal(latents(f"a house <{tag.tag}:{examples[name].stem}:0.5>"), staged), tag.tag
    gen.close()


def test_a_prompt_tag_belongs_to_one_type(registry, monkeypatch):
    """A type declaring a tag another type declares (any case), or a tag that is not a word, is refused in one
    line naming both types when the tags are first read."""
    from adapterhub import plugins
    from adapterhub.errors import AdapterhubError
    from adapterhub.types import AdapterType, PromptTag

    taken = next(iter(plugins.prompt_tags()))
    owner = plugins.prompt_tags()[taken][1].name
    for tag, message in ((taken.upper(), rf"prompt tag <{taken}:…>, already declared by type '{owner}'"),
                         ("two words", "prompt tag 'two words', which is not a word")):
        stub = type("Stub", (AdapterType,), {"name": "stub-tags", "prompt_tags": (PromptTag(tag, "Stub"),)})()
        types = {**registry, "stub-tags": stub}
        monkeypatch.setattr(plugins, "adapter_types", lambda types=types: types)
        plugins.prompt_tags.cache_clear()
        with pytest.raises(AdapterhubError, match=rf"type 'stub-tags' declares {message}"):
            plugins.prompt_tags()
    monkeypatch.undo()
    plugins.prompt_tags.cache_clear()


# --------------------------------------------------------------------------------------------
# the third-party plugin: every column, through the public contract only
# --------------------------------------------------------------------------------------------
def test_thirdparty_types_are_in_every_column():
    """The third-party rows reach every column: both train, ``scale-diff`` converts (its kohya layout) and merges,
    both sample with the compiled backend (a weight delta; residuals)."""
    assert {"scale-diff", "residual-shift"} <= set(TRAINS) & set(ATTACHES) & set(SAVES)
    assert ("scale-diff", "kohya") in _conversions() and "scale-diff" in MERGES
    assert all(_compiled_runs(DECLARED[name]) for name in THIRD_PARTY)


def test_thirdparty_prompt_tag_is_read_and_reported_as_its_own(registry, examples):
    """``<shift:…>`` (residual-shift's declared tag) takes one multiplier as the webui's ``<hypernet:…>`` does, and
    a missing one is reported under the type's label, as the server's ``info`` words it."""
    from adapterhub.errors import AdapterhubError
    from adapterhub.serve.networks import drop_missing_networks, missing_notes
    from adapterhub.stack import Stack

    folder = examples["residual-shift"].parent
    stack, prompt = Stack.from_prompt("a house <SHIFT:residual-shift:0.25>, red", dirs=[folder])
    assert prompt == "a house , red" and [(e.path, e.te) for e in stack.entries] == [(examples["residual-shift"], 0.25)]
    with pytest.raises(AdapterhubError, match=r"<shift:residual-shift:0.25:0.5>: too many weights"):
        Stack.from_prompt("<shift:residual-shift:0.25:0.5>", dirs=[folder])
    cleaned, missing = drop_missing_networks("a <shift:nowhere:1> <lora:gone> house", [folder])
    assert cleaned == "a house" and missing == [("Residual shift", "nowhere"), ("Lora", "gone")]
    assert missing_notes(missing) == ["Residual shift not found: nowhere", "Lora not found: gone"]


def test_thirdparty_kohya_layout_is_kohya_named(registry, examples, tmp_path):
    """``scale-diff`` in the kohya layout names its module as sd-scripts does (``lora_unet_`` + the diffusers path
    with ``_``) and reads back as a kohya-layout ``scale-diff`` with the same tensor."""
    from safetensors import safe_open

    out = _convert(examples["scale-diff"], "kohya", tmp_path / "kohya.safetensors")
    with safe_open(out, "pt") as f:
        assert set(f.keys()) == {"lora_unet_conv_in.scale_diff"}
        converted = f.get_tensor("lora_unet_conv_in.scale_diff")
    again, source = _load(out), _load(examples["scale-diff"])
    assert (again.type, again.format) == ("scale-diff", "kohya")
    assert torch.equal(converted, source.patches["unet.conv_in"].tensors["diff"])


def test_thirdparty_infotext_fields_are_its_own(registry, examples, backends):
    """``scale-diff`` lists ``Scale-diff hashes`` (name: the first 12 hex digits of the file's sha256, hashlib as
    the oracle) and ``residual-shift`` writes numbered ``Residual shift`` units (name and weight)."""
    import hashlib

    from adapterhub.sample import infotext
    from adapterhub.sample.generator import Request
    from adapterhub.stack import Entry, Stack

    eager, _ = backends
    entries = [Entry(str(examples["scale-diff"]), te=0.8), Entry(str(examples["residual-shift"]), te=0.5),
               Entry(str(examples["residual-shift"]), te=0.25)]
    text = eager.generate(Request("a house", stack=Stack(entries), seed=4, steps=1, sampler="Euler", width=SIZE,
                                  height=SIZE), output="latent").infotexts[0]
    fields = infotext.parse(text)
    digest = hashlib.sha256(examples["scale-diff"].read_bytes()).hexdigest()[:12]
    assert fields["Scale-diff hashes"] == f"scale-diff: {digest}"
    assert (fields["Residual shift 0"], fields["Residual shift 1"]) == ("residual-shift 0.5", "residual-shift 0.25")
    assert "Lora hashes" not in fields
