"""Core and services name no built-in adapter type (issue #18): what varies by type is the type's declaration.

The scan reads every module of ``adapterhub/`` (not ``plugins/``) with :mod:`ast` and collects, outside
docstrings and help texts (documentation; comments are not in the tree): identifiers (names, attributes,
functions, classes, arguments) that are a built-in type's name; string constants that are one (any case:
``"LoRA"`` as a label); and string constants holding one as a lower-case word (``_`` counts as a separator,
so ``lora_unet_`` and ``"lora, locon"`` are found, ``"a LoRA cannot hold"`` prose is not). Each finding must
be in :data:`ALLOWED` (an outside format's or tool's name that happens to spell a type: the webui's
``<lora:…>`` tags, kohya key prefixes, CLI command names) or in :data:`PENDING` (a type named in code owned
elsewhere, still to move into a declaration); an entry that no longer matches anything fails too, so both
lists stay exact.

The declarations that replaced the names are checked here with a stub type: convert targets, infotext fields,
the server's extra-network page and prompt tokens come from the type, never from its name.
"""
from __future__ import annotations

import ast
import re
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUILTIN = ("lora", "locon", "loha", "lokr", "adalora", "textual_inversion", "hypernetwork", "controlnet",
           "t2i_adapter")
WORD = re.compile(r"(?<![a-z0-9])(" + "|".join(BUILTIN) + r")(?![a-z0-9])")

_TAG = "the webui's <lora:…> / <hypernet:…> tag kind and extra-network page, an outside syntax"
_CN_API = "the sd-webui-controlnet extension's API routes, an outside interface"
_KOHYA = "kohya's key prefix (lora_unet_, lora_te1_ …), the outside file layout, not our type"
ALLOWED: dict[tuple[str, str], str] = {
    ("adapterhub/serve/networks.py", "lora"): _TAG,
    ("adapterhub/serve/networks.py", "hypernetwork"): "the webui's hypernetworks page (/sdapi/v1/hypernetworks)",
    ("adapterhub/serve/app.py", "lora"): _TAG,
    ("adapterhub/serve/app.py", "hypernetwork"): "the webui's hypernetworks page (/sdapi/v1/hypernetworks)",
    ("adapterhub/sample/xy.py", "lora"): "the webui X/Y axis name for a <lora:…> weight",
    ("adapterhub/keymaps/__init__.py", "lora_unet_"): _KOHYA,
    ("adapterhub/keymaps/__init__.py", "lora_te1_"): _KOHYA,
    ("adapterhub/keymaps/__init__.py", "lora_te2_"): _KOHYA,
    ("adapterhub/keymaps/__init__.py", "lora_te_"): _KOHYA,
    ("adapterhub/keymaps/__init__.py", "lora_unet"): _KOHYA,
    ("adapterhub/keymaps/__init__.py", "lora_te"): _KOHYA,
    ("adapterhub/keymaps/__init__.py", "lora_te1"): _KOHYA,
    ("adapterhub/keymaps/__init__.py", "lora_te2"): _KOHYA,
    ("adapterhub/io.py", "pytorch_lora_weights.safetensors"): "diffusers' save_lora_weights file name",
    ("adapterhub/io.py", "pytorch_lora_weights.bin"): "diffusers' save_lora_weights file name",
    ("adapterhub/io.py", "a cloneofsimo lora_diffusion LoRA (positional keys such as unet:0:up): not supported, "
                         "its keys do not name the modules they change"): "cloneofsimo's package, lora_diffusion",
    ("adapterhub/io.py", "a cloneofsimo lora_diffusion LoRA (a bare list of up/down tensors): not supported, it "
                         "does not name the modules it changes"): "cloneofsimo's package, lora_diffusion",
    ("adapterhub/infotext_fields.py", "ControlNet"): "sd-webui-controlnet's infotext field (ControlNet 0, …)",
    ("adapterhub/serve/app.py", "/controlnet/model_list"): _CN_API,
    ("adapterhub/serve/app.py", "/controlnet/module_list"): _CN_API,
    ("adapterhub/serve/controls.py", "controlnet"): "sd-webui-controlnet's always-on script name (alwayson_scripts)",
    ("adapterhub/serve/controls.py", " not found (GET /controlnet/model_list lists this server's)"): _CN_API,
    ("adapterhub/algebra/provenance.py", "networks.lora"): "the webui Lora extension's module (networks.lora)",
    ("adapterhub/cli/__init__.py", "lora"): "the `adapterhub lora` command group",
    ("adapterhub/cli/__init__.py", "adapterhub.cli.lora:lora"): "the `adapterhub lora` command group",
    ("adapterhub/cli/lora.py", "lora"): "the `adapterhub lora` command group",
    ("adapterhub/cli/bench.py", "--no-lora-reference"): "a CLI option naming diffusers' fuse_lora reference run",
    ("adapterhub/compat.py", "diffusers + PEFT LoRA loading (load_lora_weights on text encoders, the bench's LoRA "
                             "reference)"): "diffusers' load_lora_weights, an outside API",
}
# built-in types named in code still to move into a declaration (none left: keep it empty)
PENDING: dict[tuple[str, str], str] = {}


def _docstrings(tree: ast.AST) -> set[int]:
    bodies = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return {id(node.body[0].value) for node in ast.walk(tree) if isinstance(node, bodies) and node.body
            and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}


def _help_texts(tree: ast.AST) -> set[int]:
    """The string constants of help texts (documentation for the user): ``help=`` arguments (click options) and
    the second argument of ``opt(default, help, section)`` (the train config's option helper)."""
    values = [node.value for node in ast.walk(tree) if isinstance(node, ast.keyword) and node.arg == "help"]
    values += [node.args[1] for node in ast.walk(tree) if isinstance(node, ast.Call)
               and isinstance(node.func, ast.Name) and node.func.id == "opt" and len(node.args) > 1]
    return {id(c) for value in values for c in ast.walk(value) if isinstance(c, ast.Constant)}


def _identifier(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return node.name
    if isinstance(node, ast.arg):
        return node.arg
    return None


def scan(source: str) -> set[str]:
    """The identifiers and string constants of ``source`` (outside docstrings) that name a built-in type."""
    tree = ast.parse(source)
    docs = _docstrings(tree) | _help_texts(tree)
    found = set()
    for node in ast.walk(tree):
        name = _identifier(node)
        if name is not None and name.lower() in BUILTIN:
            found.add(name)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            if node.value.strip().lower() in BUILTIN or WORD.search(node.value):
                found.add(node.value)
    return found


def _findings() -> set[tuple[str, str]]:
    return {(str(path.relative_to(ROOT)), text) for path in sorted((ROOT / "adapterhub").rglob("*.py"))
            for text in scan(path.read_text(encoding="utf-8"))}


def test_scan_finds_names_and_skips_documentation():
    source = ('"""A lora module."""\nKIND = "textual_inversion"  # a lora comment\n'
              'def f(lora):\n    """the controlnet doc"""\n'
              '    return x.t2i_adapter, "LoRA", "a LoRA prose", "lora_unet_"\n'
              'opt(1, "hypernetwork help", "s")\nclick.option("--x", help="a loha help")\n')
    assert scan(source) == {"textual_inversion", "lora", "t2i_adapter", "LoRA", "lora_unet_"}


def test_core_and_services_name_no_builtin_type():
    found = _findings()
    unexpected = sorted(found - set(ALLOWED) - set(PENDING))
    assert not unexpected, "built-in type names in core/services (declare them on the type instead):\n" + \
        "\n".join(f"  {path}: {text!r}" for path, text in unexpected)
    stale = sorted((set(ALLOWED) | set(PENDING)) - found)
    assert not stale, "allow-list entries that match nothing (remove them):\n" + \
        "\n".join(f"  {path}: {text!r}" for path, text in stale)


@pytest.mark.parametrize("path", ["adapterhub/convert.py", "adapterhub/sample/infotext.py",
                                  "adapterhub/sample/generator.py", "adapterhub/types.py",
                                  "adapterhub/hookspecs.py", "adapterhub/train/config.py",
                                  "adapterhub/cli/train.py"])
def test_slice_files_are_clean(path):
    """The files of this slice name no built-in type but the outside names of :data:`ALLOWED` (nothing pending)."""
    allowed = {text for where, text in ALLOWED if where == path}
    assert scan((ROOT / path).read_text(encoding="utf-8")) - allowed == set()


# -- the declarations that replaced the names, with a type nobody built in ------------------------------
class _Stub:
    """A third-party type as the core sees it: only declarations, no built-in name."""

    def __init__(self, **declared):
        from adapterhub.types import AdapterType

        self.type = type("StubType", (AdapterType,), {"name": "stub-kind", **declared})()


def test_convert_targets_come_from_the_declaration(tmp_path):
    from adapterhub.convert import targets_of
    from adapterhub.plugins import adapter_types

    assert targets_of(_Stub(convert_targets=("peft",)).type) == ("peft",)
    assert targets_of(_Stub().type) == ()
    types = adapter_types()
    assert targets_of(types["lokr"]) == ("kohya", "a1111")
    assert targets_of(types["hypernetwork"]) == ("a1111",)
    assert targets_of(types["textual_inversion"]) == ("a1111", "diffusers")


def _entry(adapter, label, path, **options):
    return SimpleNamespace(adapter=adapter, label=label, path=path, weight=1.0, options=options)


def test_infotext_fields_come_from_the_type(tmp_path):
    """Hash lists join in stack order (first of a name wins; a callable value is computed only when written)
    and units are numbered, whatever the type's name; ``only`` computes nothing of the other fields."""
    from adapterhub.sample import infotext

    calls = []

    def hashed(label):
        calls.append(label)
        return "h-" + label

    def fields(self, adapter, entry, prompt):
        if entry.label == "unit":
            return [("Widget", None, "a: 1")]
        return [("Stub hashes", entry.label, partial(hashed, entry.label))]

    adapter = SimpleNamespace(plugin=_Stub(infotext_fields=fields).type)
    stack = SimpleNamespace(entries=[_entry(adapter, "one", tmp_path / "a"), _entry(adapter, "unit", None),
                                     _entry(adapter, "two", tmp_path / "b"), _entry(adapter, "one", tmp_path / "c"),
                                     _entry(adapter, "unit", None), _entry(None, "gone", None)])
    assert infotext.adapter_fields(stack, "p") == {"Stub hashes": "one: h-one, two: h-two", "Widget 0": "a: 1",
                                                   "Widget 1": "a: 1"}
    assert calls == ["one", "two"]
    assert infotext.adapter_fields(stack, "p", only="Widget") == {"Widget 0": "a: 1", "Widget 1": "a: 1"}
    assert calls == ["one", "two"]


def test_extra_network_page_and_prompt_tokens_are_declared():
    from adapterhub.plugins import adapter_types
    from adapterhub.serve.networks import _kind

    assert _kind(_Stub(extra_network="embedding").type) == "embedding"
    assert _kind(_Stub(extra_network="no-such-page").type) is None
    assert _kind(_Stub().type) is None
    assert _kind(_Stub(weight_space=True).type) == "lora"
    tokens = [name for name, t in adapter_types().items() if t.prompt_tokens]
    assert tokens == ["textual_inversion"]


@pytest.mark.parametrize("name,extra,options,mode", [
    ("controlnet", {"config": {"global_pool_conditions": True}}, {}, "ControlNet is more important"),
    ("controlnet", {"config": {"global_pool_conditions": True}}, {"guess_mode": False}, "Balanced"),
    ("controlnet", {}, {"start": 0.25}, "Balanced"),
    ("t2i_adapter", {"config": {"global_pool_conditions": True}}, {}, "Balanced"),
    ("t2i_adapter", {}, {"guess_mode": True}, "ControlNet is more important"),
])
def test_conditioning_types_write_their_units(tmp_path, name, extra, options, mode):
    """The ControlNet and T2I-Adapter types write sd-webui-controlnet units (the type, not the core, knows that a
    shuffle-like ControlNet's config means guess mode); a stack of both numbers them in order."""
    from adapterhub.infotext_fields import unit_number
    from adapterhub.plugins import adapter_types
    from adapterhub.sample import infotext
    from adapterhub.types import Adapter

    path = tmp_path / "cn, v1.safetensors"
    path.write_bytes(b"\0" * 16)
    adapter = Adapter(type=name, format="x", patches={}, path=path, extra=extra)
    entry = _entry(adapter, "cn", None, **options)
    [(field, key, unit)] = adapter_types()[name].infotext_fields(adapter, entry, "prompt")
    assert (field, key) == ("ControlNet", None)
    start = unit_number(options.get("start", 0.0))
    assert unit == (f"Module: none, Model: cn v1 [{infotext.short_hash(path)}], Weight: 1.0, Resize Mode: Just "
                    f"Resize, Guidance Start: {start}, Guidance End: 1.0, Pixel Perfect: False, Control Mode: {mode}")
    assert infotext.control_units(SimpleNamespace(entries=[entry, entry])) == {"ControlNet 0": unit,
                                                                               "ControlNet 1": unit}
