"""What core asks the registry instead of naming a built-in type (issue #18): which type the LoRA algebra writes
its results through (``AdapterType.factor_modules``), the modelspec architecture of a trained type that says
none, and the webui tag kinds a stack reads. Stub types stand in for a third party's: nothing here names them in
core, so a result of theirs proves the declaration is what decided.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

TO_Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"  # Linear (32, 32) in tiny-sd1
CONV = "unet.down_blocks.1.resnets.0.conv1"  # (64, 32, 3, 3)


def _stub(name: str, modules: tuple[str, ...], builtin: bool = False):
    """A registered type as the algebra sees it: ``factor_modules`` and a ``from_factors`` that says who built."""
    from adapterhub.types import Adapter, AdapterType

    class Stub(AdapterType):
        factor_modules = frozenset(modules)

        def from_factors(self, factors, metadata=None, base="unknown"):
            return Adapter(type=self.name, format="stub", patches={}, metadata=dict(metadata or {}), base=base)

        def target_modules(self, model, text=True):
            return {t: m for t, m in model.items() if "conv" not in t or "conv" in self.factor_modules}

    stub = Stub()
    stub.name, stub.source = name, SimpleNamespace(builtin=builtin)
    return stub


def _lora(targets: dict[str, tuple[int, ...]], seed: int = 0):
    """An in-memory low-rank adapter with rank-2 factors for ``targets`` (path -> weight shape)."""
    from adapterhub.plugins import adapter_type

    gen = torch.Generator().manual_seed(seed)
    factors = {}
    for target, shape in targets.items():
        down = torch.randn(2, *shape[1:], generator=gen)
        up = torch.randn(shape[0], 2, *([1, 1] if len(shape) == 4 else []), generator=gen)
        factors[target] = (up, down, 2.0)
    return adapter_type("locon").from_factors(factors, {}, "sd1")


@pytest.fixture
def registry(monkeypatch):
    """The algebra's registry replaced by stubs (a linear-only writer, a conv writer, an unrelated type)."""
    types = {t.name: t for t in (_stub("other", ()), _stub("wide", ("linear", "conv")), _stub("narrow", ("linear",)))}
    monkeypatch.setattr("adapterhub.algebra.ops.adapter_types", lambda: types)
    return types


def test_the_writer_is_the_declaring_type_with_the_fewest_kinds(registry):
    from adapterhub.algebra.ops import factor_type

    assert factor_type(conv=False).name == "narrow"
    assert factor_type(conv=True).name == "wide"
    registry["narrow"].factor_modules = frozenset()
    assert factor_type(conv=False).name == "wide"  # a type holding convs holds linear layers too


def test_a_tie_goes_to_the_product_s_own_type_then_registration_order(monkeypatch):
    from adapterhub.algebra.ops import factor_type

    types = {t.name: t for t in (_stub("plugin", ("linear",)), _stub("own", ("linear",), builtin=True),
                                 _stub("own2", ("linear",), builtin=True))}
    monkeypatch.setattr("adapterhub.algebra.ops.adapter_types", lambda: types)
    assert factor_type(conv=False).name == "own"


def test_no_declaring_type_is_one_clear_error(monkeypatch):
    from adapterhub.algebra.ops import factor_type
    from adapterhub.errors import AdapterhubError

    monkeypatch.setattr("adapterhub.algebra.ops.adapter_types", lambda: {"other": _stub("other", ())})
    with pytest.raises(AdapterhubError, match="no registered adapter type declares factor_modules"):
        factor_type(conv=True)


def test_combine_and_resize_write_through_the_declared_type(registry):
    from adapterhub.algebra import combine, resize

    linear = _lora({TO_Q: (32, 32)})
    both = _lora({TO_Q: (32, 32), CONV: (64, 32, 3, 3)}, seed=1)
    assert combine([(linear, 1.0), (linear, 0.5)]).adapter.type == "narrow"
    assert combine([(linear, 1.0), (both, 1.0)], method="svd", rank=2).adapter.type == "wide"
    assert resize(linear, rank=1).adapter.type == "narrow"
    assert resize(both, rank=1).adapter.type == "wide"


def test_extract_targets_and_writes_through_the_declared_type(registry, monkeypatch):
    """``extract`` asks the writer for its targets (convs only with ``conv_rank``) and writes through it."""
    from adapterhub.algebra import extract

    monkeypatch.setattr("adapterhub.base.detect_architecture", lambda model: "sd1")
    gen = torch.Generator().manual_seed(0)
    base = {TO_Q: torch.nn.Linear(32, 32), CONV: torch.nn.Conv2d(32, 64, 3)}
    tuned = {t: type(m)(*((32, 32) if t == TO_Q else (32, 64, 3))) for t, m in base.items()}
    for module in tuned.values():
        torch.nn.init.normal_(module.weight, generator=gen)
    assert extract(base, tuned, rank=2).adapter.type == "narrow"
    result = extract(base, tuned, rank=2, conv_rank=2)
    assert result.adapter.type == "wide" and {m.module for m in result.modules} == {TO_Q, CONV}


def test_the_built_in_writers_are_declared():
    """With the real registry: the linear-only writer and the conv writer are the low-rank types that declare
    them, and each builds what it declares (a conv factor through the conv writer reads back with its shape)."""
    from adapterhub.algebra.ops import factor_type
    from adapterhub.plugins import adapter_types

    declared = {name: set(t.factor_modules) for name, t in adapter_types().items() if t.factor_modules}
    assert declared == {"lora": {"linear"}, "locon": {"linear", "conv"}}
    assert (factor_type(conv=False).name, factor_type(conv=True).name) == ("lora", "locon")
    built = _lora({CONV: (64, 32, 3, 3)})
    assert built.type == "locon" and built.patches[CONV].expected_shape() == (64, 32, 3, 3)
    with pytest.raises(Exception, match="cannot be built from low-rank factors"):
        adapter_types()["loha"].from_factors({}, {}, "sd1")


# -- modelspec: the trained type names its architecture --------------------------------------------
def _modelspec(trainable_meta: dict[str, str], kind: str = "stub-kind") -> str:
    from adapterhub.train.metadata import modelspec

    cfg = SimpleNamespace(type=kind, output_name="out", resolution=64, clip_skip=None, comment="", trigger=None)
    data = SimpleNamespace(samples=[])
    return modelspec(cfg, {"started": 0}, data, trainable_meta, "sd1", False)["modelspec.architecture"]


def test_modelspec_architecture_of_a_type_that_names_none_is_its_own_name():
    """A trainable whose metadata names no architecture (a third party's) is ``<base>/<its type>``, never
    another type's; one that names it keeps its word."""
    assert _modelspec({}) == "stable-diffusion-v1/stub-kind"
    assert _modelspec({"modelspec.architecture": "widget"}) == "stable-diffusion-v1/widget"
    assert _modelspec({"modelspec.architecture": "stable-diffusion-xl-v1-base"}) == "stable-diffusion-xl-v1-base"


# -- the train command's description: the types that train, from the registry ---------------------------
def test_train_help_names_the_types_registered_when_it_is_written(monkeypatch):
    """A type registered by a plugin is named in ``adapterhub train --help``'s description like a built-in;
    types that do not train are not, and the top-level short help holds no placeholder."""
    from click.testing import CliRunner

    from adapterhub import plugins
    from adapterhub.cli import _short_help
    from adapterhub.cli.train import train_cmd

    real = plugins.adapter_types()
    stub = _stub("stub-kind", ())
    stub.capabilities = ("inspect", "train")
    monkeypatch.setattr(plugins, "adapter_types", lambda: {**real, "stub-kind": stub})
    result = CliRunner().invoke(train_cmd, ["--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    description = result.output.split("Options:")[0]
    trains = [name for name, t in real.items() if "train" in t.capabilities]
    assert all(name in description for name in [*trains, "stub-kind"])
    assert "aesthetic_embedding" not in description and "{" not in description
    assert "{" not in _short_help("train", 200) and "Train" in _short_help("train", 200)
