"""Real public Flux / SD3 adapter files (issue #21): the headers of files found in public repositories.

``tests/data/transformer-wild/public_headers.json`` records each file's tensor names, dtypes, shapes and
metadata exactly as the file has them (no tensor values), with the repository, commit, path, size and sha256
where it was found. A file of that header is rebuilt here with seeded values: reading a file's layout, family
and base and binding it to a model use the header alone, so the rebuilt file answers as the real one. Where
``ADAPTERHUB_TRANSFORMER_PUBLIC`` names a folder holding the real files (by their ``file`` name), the same checks
run on the real bytes too, after their sha256 is checked.

The first of them is a Replicate / ai-toolkit FLUX.1 LoRA on four single blocks whose metadata says
``ss_base_model_version: sd_1.5`` (the trainer's template): the family and base come from the shapes.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data" / "transformer-wild"
RECORDS = json.loads((DATA / "public_headers.json").read_text())["files"]
IDS = [r["file"] for r in RECORDS]
DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


def _rebuilt(record: dict, folder: Path) -> Path:
    """A safetensors file with ``record``'s header: names, dtypes, shapes and metadata; seeded small values."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    tensors = {name: ((torch.rand(shape, generator=gen) - 0.5) * 0.02).to(DTYPES[dtype])
                      if shape else torch.tensor(1.0).to(DTYPES[dtype])
               for name, (dtype, shape) in record["tensors"].items()}
    path = folder / record["file"]
    save_file(tensors, str(path), metadata=record["metadata"])
    return path


def _real(record: dict) -> Path | None:
    folder = os.environ.get("ADAPTERHUB_TRANSFORMER_PUBLIC")
    path = Path(folder) / record["file"] if folder else None
    if path is None or not path.is_file():
        return None
    assert hashlib.sha256(path.read_bytes()).hexdigest() == record["sha256"], path
    return path


@pytest.fixture(params=RECORDS, ids=IDS)
def case(request, tmp_path):
    """(record, [the rebuilt file, and the real one where it is at hand])."""
    record = request.param
    paths = [_rebuilt(record, tmp_path)]
    real = _real(record)
    if real is not None:
        paths.append(real)
    return record, paths


def test_the_records_name_where_each_file_was_found():
    for record in RECORDS:
        assert record["repo"].count("/") == 1 and len(record["commit"]) == 40 and len(record["sha256"]) == 64
        assert record["size"] > 0 and record["tensors"]
        assert all(dtype in DTYPES for dtype, _ in record["tensors"].values())


def test_a_rebuilt_file_has_the_recorded_header(tmp_path):
    from safetensors import safe_open

    for record in RECORDS:
        path = _rebuilt(record, tmp_path)
        with safe_open(str(path), "pt") as f:
            assert f.metadata() == record["metadata"]
            header = {k: [str(f.get_slice(k).get_dtype()), list(f.get_slice(k).get_shape())] for k in f.keys()}
        assert header == record["tensors"]


def test_describe_and_inspect_tell_layout_family_and_base_from_shapes(case, capsys):
    from adapterhub.api import describe
    from adapterhub.cli import main

    record, paths = case
    want = record["expected"]
    for path in paths:
        adapter, _ = describe(path)
        assert (adapter.type, adapter.format, adapter.family, adapter.base) == \
            (want["type"], want["layout"], want["family"], want["base"]), path
        rc = main(["inspect", "--json", "--no-hash", str(path)])
        facts = json.loads(capsys.readouterr().out)
        assert rc in (0, None)
        assert (facts["type"], facts["format"], facts["family"], facts["base"]) == \
            (want["type"], want["layout"], want["family"], want["base"])


def test_every_key_binds_to_the_meta_preset_with_its_shape(case):
    import adapterhub
    from adapterhub.transformer_bases import build_transformer_base
    from adapterhub.weights import bind

    record, paths = case
    model = build_transformer_base(record["expected"]["preset"])
    for path in paths:
        adapter = adapterhub.load(path)
        used = {k for patch in adapter.patches.values() for k in patch.file_keys.values()}
        assert used == set(record["tensors"])  # every key read, none left over
        assert not adapter.extra["stray_keys"] and not adapter.extra["refused"]
        bindings = bind(model, adapter)
        assert len(bindings) == len(adapter.patches)
        for b in bindings:
            assert tuple(b.patch.expected_shape()) == tuple(b.param.shape), b.patch.target


def test_it_is_refused_on_a_base_of_another_family_before_loading(case):
    """The misleading ``sd_1.5`` metadata does not let it through to an SD1 base."""
    import adapterhub
    from adapterhub.errors import AdapterError
    from adapterhub.merge import check_fits_base

    record, paths = case
    other = "sd1" if record["expected"]["family"] != "sd1" else "sdxl"
    for path in paths:
        with pytest.raises(AdapterError):
            check_fits_base(other, [adapterhub.load(path)])


def test_the_catalog_records_family_base_and_trigger_words(case, tmp_path, capsys):
    from adapterhub.cli import main

    record, paths = case
    want = record["expected"]
    frequency = json.loads(record["metadata"].get("ss_tag_frequency", "{}"))
    triggers = {tag for tags in frequency.values() for tag in tags}
    for n, path in enumerate(paths):
        lib = tmp_path / f"lib{n}"
        lib.mkdir()
        (lib / path.name).write_bytes(path.read_bytes())
        url = f"sqlite:///{tmp_path / f'catalog{n}.db'}"
        assert main(["catalog", "--catalog", url, "scan", str(lib), "--jobs", "1"]) in (0, None)
        capsys.readouterr()
        assert main(["catalog", "--catalog", url, "list", "--json", "--base", want["family"]]) in (0, None)
        (entry,) = json.loads(capsys.readouterr().out)
        assert (entry["base"], entry["format"]) == (want["base"], want["layout"])
        assert triggers <= set(entry["trigger_words"])


# ---------------------------------------------------------------------------------------------
# key lists of real files kept by other projects' test suites (InvokeAI's
# ``tests/backend/patches/lora_conversions/lora_state_dicts/``: every key and shape of a real Flux file, as a
# Python module ``state_dict_keys = {key: shape}``), where ``ADAPTERHUB_KEYLISTS`` names a folder holding them;
# nothing of them is kept here. Read with ``ast.literal_eval`` (never executed), rebuilt with seeded values.
# ---------------------------------------------------------------------------------------------
KEYLISTS = {  # module name -> the layout it is (each module's header names the real file it lists)
    "flux_lora_kohya_format": "kohya", "flux_lora_kohya_with_te1_format": "kohya",
    "flux_lora_diffusers_format": "diffusers", "flux_lora_diffusers_no_proj_mlp_format": "diffusers",
    "flux_lora_diffusers_base_model_format": "peft", "flux_lora_aitoolkit_format": "comfyui",
    "flux_lora_xlabs_format": "xlabs", "flux_dora_onetrainer_format": "onetrainer",
    "flux_control_lora_format": "bfl-control",
}


def keylist_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """``state_dict_keys`` of a key-list module, read as a literal (the module is never run)."""
    import ast

    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "state_dict_keys" for t in node.targets):
            return {k: tuple(v) for k, v in ast.literal_eval(node.value).items()}
    raise AssertionError(f"{path}: no state_dict_keys")


@pytest.mark.parametrize("name", sorted(KEYLISTS))
def test_a_real_files_key_list_reads_and_binds_to_flux_dev(name, tmp_path):
    import adapterhub
    from safetensors.torch import save_file

    from adapterhub.api import describe
    from adapterhub.transformer_bases import build_transformer_base
    from adapterhub.weights import bind

    folder = os.environ.get("ADAPTERHUB_KEYLISTS")
    source = Path(folder) / f"{name}.py" if folder else None
    if source is None or not source.is_file():
        pytest.skip("ADAPTERHUB_KEYLISTS names no folder holding this key list")
    shapes = keylist_shapes(source)
    gen = torch.Generator().manual_seed(0)
    tensors = {k: ((torch.rand(s, generator=gen) - 0.5) * 0.02).to(torch.bfloat16) if s else torch.tensor(8.0)
               for k, s in shapes.items()}
    path = tmp_path / f"{name}.safetensors"
    save_file(tensors, str(path))
    adapter, _ = describe(path)
    assert (adapter.family, adapter.format) == ("flux", KEYLISTS[name])
    loaded = adapterhub.load(path)
    assert {k for patch in loaded.patches.values() for k in patch.file_keys.values()} == set(shapes)
    if KEYLISTS[name] == "bfl-control":  # a control LoRA widens x_embedder: merged, never bound in place
        return
    bindings = bind(build_transformer_base("flux-dev"), loaded)
    assert len(bindings) == len(loaded.patches)
    for b in bindings:
        assert b.patch.fits(tuple(b.param.shape)), b.patch.target
