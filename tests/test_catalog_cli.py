"""``adapterhub catalog ...`` end to end, in process (the console entry point ``main``)."""
from __future__ import annotations

import json
import os

import pytest
import test_catalog_support as support
from test_catalog_support import make_lora

from adapterhub.cli import main

catalog_url = support.catalog_url  # a shared fixture


def run(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def lib(tmp_path):
    root = tmp_path / "my loras"
    make_lora(root / "neon.safetensors", seed=1, metadata={"ss_tag_frequency": json.dumps({"4_nx": {"glow": 3}}),
                                                             "ss_steps": "500"})
    make_lora(root / "a" / "pastel.safetensors", seed=2)
    make_lora(root / "b" / "pastel.safetensors", seed=3)
    (root / "b" / "pastel.json").write_text(json.dumps({"activation text": "pastel style"}))
    (root / "empty.safetensors").write_bytes(b"")
    return root


def test_scan_then_browse(catalog_url, lib, capsys, tmp_path):
    code, out, err = run(capsys, "catalog", "--catalog", catalog_url, "scan", str(lib), "--jobs", "2")
    assert code == 0 and "new" in out and "empty file" in out
    code, out, _ = run(capsys, "catalog", "list", "--json", "--catalog", catalog_url)  # option after the command
    entries = json.loads(out)
    assert code == 0 and len(entries) == 4 and "metadata" not in entries[0]
    code, out, _ = run(capsys, "catalog", "--catalog", catalog_url, "list", "--type", "lora", "--sort", "size")
    assert code == 0 and "neon" in out and "pastel" in out
    code, out, _ = run(capsys, "catalog", "--catalog", catalog_url, "show", "neon")
    assert code == 0 and "ss_tag_frequency" in out and '"glow": 3' in out  # metadata pretty-printed
    code, out, _ = run(capsys, "catalog", "--catalog", catalog_url, "show", "neon", "--json")
    neon = json.loads(out)
    assert neon["trigger_words"] == ["nx", "glow"] and neon["training"] == {"steps": 500}
    code, out, _ = run(capsys, "catalog", "--catalog", catalog_url, "show", neon["sha256"][:8], "--json")
    assert json.loads(out)["name"] == "neon"
    code, out, _ = run(capsys, "catalog", "--catalog", catalog_url, "search", "pastel", "style", "--json")
    assert [e["path"] for e in json.loads(out)] == [str(lib / "b" / "pastel.safetensors")]
    code, out, _ = run(capsys, "catalog", "--catalog", catalog_url, "stats", "--json")
    assert json.loads(out)["entries"] == 4 and json.loads(out)["unreadable"] == 1


def test_edit_commands_and_errors(catalog_url, lib, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("ADAPTERHUB_CATALOG", catalog_url)
    assert run(capsys, "catalog", "scan", str(lib), "--jobs", "1", "--json")[0] == 0
    code, out, _ = run(capsys, "catalog", "tag", "neon", "add", "fav", "night", "--json")
    assert code == 0 and json.loads(out)["tags"] == ["fav", "night"]
    assert run(capsys, "catalog", "tag", "neon", "rm", "night")[0] == 0
    assert run(capsys, "catalog", "note", "neon", "best", "at", "0.8")[0] == 0
    assert run(capsys, "catalog", "rate", "neon", "5")[0] == 0
    code, out, _ = run(capsys, "catalog", "list", "--tag", "fav", "--json")
    assert [(e["name"], e["notes"], e["rating"]) for e in json.loads(out)] == [("neon", "best at 0.8", 5)]
    code, _, err = run(capsys, "catalog", "show", "pastel")
    assert code == 2 and err.count("\n") == 1 and "ambiguous" in err and str(lib / "a" / "pastel.safetensors") in err
    code, _, err = run(capsys, "catalog", "show", "nothing")
    assert code == 2 and err.startswith("error: 'nothing': not found")
    code, _, err = run(capsys, "catalog", "rate", "neon", "7")
    assert code == 2 and "0<=x<=5" in err
    export = tmp_path / "export.json"
    assert run(capsys, "catalog", "export", "--json", "-o", str(export))[0] == 0
    code, out, _ = run(capsys, "catalog", "--catalog", str(tmp_path / "copy.db"), "import", str(export), "--json")
    assert code == 0 and json.loads(out) == {"merged": 0, "added": 4, "invalid": 0}
    code, out, _ = run(capsys, "catalog", "export")
    assert json.loads(out)["format"] == "adapterhub-catalog"
    os.unlink(lib / "a" / "pastel.safetensors")
    assert run(capsys, "catalog", "scan", str(lib), "--json")[0] == 0
    code, out, _ = run(capsys, "catalog", "list", "--missing", "--json")
    assert [e["path"] for e in json.loads(out)] == [str(lib / "a" / "pastel.safetensors")]
    code, out, _ = run(capsys, "catalog", "prune", "--json")
    assert json.loads(out)["removed"] == 1
    code, out, _ = run(capsys, "catalog", "dupes", "--json")
    assert code == 0 and json.loads(out) == []


def test_missing_catalog_and_read_only_catalog(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ADAPTERHUB_CATALOG", raising=False)
    code, _, err = run(capsys, "catalog", "list")
    assert code == 2 and f"no catalog at {tmp_path / 'catalog.db'}" in err
    make_lora(tmp_path / "lib" / "a.safetensors")
    assert run(capsys, "catalog", "scan", "lib")[0] == 0  # ./catalog.db by default
    db = tmp_path / "catalog.db"
    os.chmod(db, 0o444)
    try:
        make_lora(tmp_path / "lib" / "b.safetensors", seed=1)
        code, _, err = run(capsys, "catalog", "scan", "lib")
        assert code == 2 and err == f"error: catalog {db} is read-only; nothing was changed\n"
        code, out, _ = run(capsys, "catalog", "list", "--json")
        assert code == 0 and [e["name"] for e in json.loads(out)] == ["a"]
    finally:
        os.chmod(db, 0o644)
