"""The catalog service: hashes, scanning, incremental rescans, moves, bad files, browsing, editing,
name resolution and schema upgrades, on SQLite and PostgreSQL."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import test_catalog_support as support
import torch
from safetensors.torch import save_file
from test_catalog_support import WILD, make_lora, needs_wild

from adapterhub import catalog as cat_api
from adapterhub import hashes as hashing
from adapterhub.catalog import CatalogError, open_catalog, resolve_adapter_arg
from adapterhub.catalog.schema import VERSION

catalog_url = support.catalog_url  # a shared fixture

KOHYA_META = {
    "ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "4.0",
    "ss_steps": "1200", "ss_epoch": "6", "ss_resolution": "(512, 512)", "ss_base_model_version": "sd_v1",
    "ss_tag_frequency": json.dumps({"10_ohwx woman": {"ohwx woman": 30, "smile": 12, "red hair": 20},
                                    "5_style": {"smile": 10, "watercolor": 3}}),
}


@pytest.fixture
def catalog(catalog_url):
    with open_catalog(catalog_url, create=True) as cat:
        yield cat


def _scan(cat, *roots, jobs=1, **kw):
    return cat_api.scan(cat, [str(r) for r in roots], jobs=jobs, **kw)


# ------------------------------------------------------------------------------------------------
# hashing
# ------------------------------------------------------------------------------------------------
def test_hashes_follow_the_definitions_in_one_pass(tmp_path, monkeypatch):
    path = make_lora(tmp_path / "big.safetensors", rank=64, modules=6, metadata={"title": "a"})
    data = path.read_bytes()
    assert len(data) > 0x110000
    (n,) = struct.unpack("<Q", data[:8])
    monkeypatch.setattr(hashing, "CHUNK", 4099)  # odd chunks: windows cross chunk boundaries
    got = hashing.hash_file(path)
    assert got.sha256 == hashlib.sha256(data).hexdigest()
    assert got.autov2 == got.sha256[:10]
    assert got.autov1 == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert got.autov3 == hashlib.sha256(data[8 + n:]).hexdigest()
    edited = make_lora(tmp_path / "edited.safetensors", rank=64, modules=6, metadata={"title": "b, longer"})
    again = hashing.hash_file(edited)
    assert again.autov3 == got.autov3 and again.sha256 != got.sha256  # metadata edit keeps AutoV3


def test_pickles_have_no_autov3_and_folders_hash_like_inspect(tmp_path):
    torch.save({"w": torch.ones(3)}, tmp_path / "x.pt")
    assert hashing.hash_file(tmp_path / "x.pt").autov3 is None
    from adapterhub.api import sha256_file

    folder = tmp_path / "f"
    make_lora(folder / "pytorch_lora_weights.safetensors")
    (folder / "config.json").write_text("{}")
    assert hashing.hash_folder(folder, folder / "pytorch_lora_weights.safetensors").sha256 == sha256_file(folder)


# ------------------------------------------------------------------------------------------------
# scanning
# ------------------------------------------------------------------------------------------------
def test_scan_stores_every_field(catalog, tmp_path):
    lib = tmp_path / "lib"
    path = make_lora(lib / "style.safetensors", metadata=KOHYA_META)
    (lib / "style.civitai.info").write_text(json.dumps({"trainedWords": ["stylish, neon"]}))
    (lib / "style.preview.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    make_lora(lib / "sub" / "other.safetensors", seed=1)
    report = _scan(catalog, lib, jobs=2)  # worker processes
    assert (report.new, report.skipped, report.unreadable) == (2, 2, [])
    entry = cat_api.show(catalog, "style")
    data = path.read_bytes()
    assert entry["path"] == str(path) and entry["size"] == len(data) and entry["status"] == "ok"
    assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["autov2"] == entry["sha256"][:10]
    assert len(entry["autov1"]) == 8 and len(entry["autov3"]) == 12
    assert entry["tensor_sha256"].startswith(entry["autov3"])
    assert (entry["type"], entry["format"], entry["base"], entry["rank"], entry["alpha"], entry["targets"]) == \
        ("lora", "kohya", "sd1", 4, 4.0, 2)
    assert entry["metadata"]["ss_network_dim"] == "4"
    assert entry["trigger_words"][:4] == ["stylish", "neon", "ohwx woman", "style"]
    assert "smile" in entry["trigger_words"]
    assert entry["training"]["steps"] == 1200 and entry["training"]["epochs"] == 6
    assert entry["training"]["resolution"] == [512, 512]
    assert entry["preview"] == str(lib / "style.preview.png")


def test_rescan_reads_only_what_changed(catalog, tmp_path, monkeypatch):
    lib = tmp_path / "lib"
    for i in range(5):
        make_lora(lib / f"l{i}.safetensors", seed=i)
    _scan(catalog, lib)
    hashed = []
    real = hashing.hash_stream
    monkeypatch.setattr(hashing, "hash_stream", lambda files, w=None: hashed.append(files) or real(files, w))
    again = _scan(catalog, lib)
    assert (again.unchanged, again.examined, hashed) == (5, 0, [])
    (lib / "l0.json").write_text(json.dumps({"activation text": "magic word"}))
    sidecar = _scan(catalog, lib)
    assert (sidecar.updated, sidecar.skipped, hashed) == (1, 1, [])  # re-enriched, not re-hashed
    assert cat_api.show(catalog, "l0")["trigger_words"] == ["magic word"]
    make_lora(lib / "l1.safetensors", seed=99)
    changed = _scan(catalog, lib)
    assert changed.updated == 1 and len(hashed) == 1
    assert cat_api.show(catalog, "l1")["sha256"] == hashlib.sha256((lib / "l1.safetensors").read_bytes()).hexdigest()


def test_moved_or_renamed_file_keeps_tags_and_notes(catalog, tmp_path):
    lib = tmp_path / "lib"
    make_lora(lib / "a.safetensors", seed=1)
    make_lora(lib / "b.safetensors", seed=2)
    _scan(catalog, lib)
    cat_api.tag(catalog, "a", "add", ["fav", "anime"])
    cat_api.note(catalog, "a", "great at 0.7")
    cat_api.rate(catalog, "a", 5)
    (lib / "new").mkdir()
    os.rename(lib / "a.safetensors", lib / "new" / "renamed.safetensors")
    report = _scan(catalog, lib)
    assert (report.moved, report.new, report.missing) == (1, 0, 0)
    entry = cat_api.show(catalog, "renamed")
    assert (entry["tags"], entry["notes"], entry["rating"]) == (["anime", "fav"], "great at 0.7", 5)
    assert entry["missing"] is False
    assert len(cat_api.list_entries(catalog)) == 2 and cat_api.list_entries(catalog, missing=True) == []
    other = tmp_path / "elsewhere"  # moved out of the scanned root, then that folder scanned alone
    other.mkdir()
    shutil.move(str(lib / "b.safetensors"), other / "b.safetensors")
    cat_api.tag(catalog, "b", "add", ["keep"])
    assert _scan(catalog, other).moved == 1
    assert cat_api.show(catalog, "b")["path"] == str(other / "b.safetensors")
    assert cat_api.show(catalog, "b")["tags"] == ["keep"]


def test_vanished_files_are_marked_missing_then_pruned(catalog, tmp_path):
    lib = tmp_path / "lib"
    for i in range(3):
        make_lora(lib / f"l{i}.safetensors", seed=i)
    _scan(catalog, lib)
    moved_away = tmp_path / "l2.bak"
    os.rename(lib / "l2.safetensors", moved_away)
    assert _scan(catalog, lib).missing == 1
    assert [e["name"] for e in cat_api.list_entries(catalog, missing=True)] == ["l2"]
    os.rename(moved_away, lib / "l2.safetensors")  # back, same size and mtime
    assert _scan(catalog, lib).reappeared == 1
    (lib / "l0.safetensors").unlink()
    _scan(catalog, lib)
    assert cat_api.stats(catalog)["missing"] == 1
    assert cat_api.prune(catalog) == [str(lib / "l0.safetensors")]
    assert {e["name"] for e in cat_api.list_entries(catalog)} == {"l1", "l2"}
    assert cat_api.search(catalog, "l0") == []


class _Evil:
    """Unpickling this runs a shell command: a scan must refuse it, never run it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def test_bad_files_are_recorded_with_a_reason_and_never_executed(catalog, tmp_path):
    lib = tmp_path / "lib"
    make_lora(lib / "good.safetensors")
    data = make_lora(tmp_path / "t.safetensors", seed=3).read_bytes()
    (lib / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (lib / "empty.safetensors").write_bytes(b"")
    (lib / "empty.txt").write_bytes(b"")
    (lib / "readme.md").write_text("# my loras\n")
    save_file({"decoder.conv_in.weight": torch.zeros(4, 4)}, str(lib / "vae_like.safetensors"))
    marker = tmp_path / "pwned"
    torch.save({"w": _Evil(marker)}, lib / "evil.pt")
    (lib / "garbage.bin").write_bytes(b"\x80\x02" + os.urandom(300))
    report = _scan(catalog, lib, jobs=2)
    assert not marker.exists()
    reasons = {Path(u["path"]).name: u["error"] for u in report.unreadable}
    assert set(reasons) == {"truncated.safetensors", "empty.safetensors", "vae_like.safetensors", "evil.pt",
                            "garbage.bin"}
    assert "truncated" in reasons["truncated.safetensors"] and reasons["empty.safetensors"] == "empty file"
    assert "not a recognised adapter" in reasons["vae_like.safetensors"]
    assert "refused" in reasons["evil.pt"] and "weights_only" in reasons["evil.pt"]
    assert report.skipped == 2 and cat_api.show(catalog, "good")["status"] == "ok"
    bad = cat_api.list_entries(catalog, unreadable=True)
    assert len(bad) == 5 and all(e["sha256"] and e["error"] for e in bad)
    assert _scan(catalog, lib).skipped == 2  # remembered, not reopened


@needs_wild
def test_wild_files(catalog, tmp_path):
    lib = tmp_path / "wild"
    lib.mkdir()
    for name in ("monsy101_peftconfig_PICKLE_REFUSED.bin", "srikanth_sdxl_attnproc_TRUNCATED.safetensors",
                 "lycoris_repo_smart_falcon_8_lokr_oldimpl.safetensors", "haseebae_pytorch_lora_weights.safetensors"):
        shutil.copy(WILD / name, lib / name)
    report = _scan(catalog, lib, jobs=2)
    reasons = {Path(u["path"]).name: u["error"] for u in report.unreadable}
    assert "peft.utils.peft_types.PeftType" in reasons["monsy101_peftconfig_PICKLE_REFUSED.bin"]
    assert reasons["srikanth_sdxl_attnproc_TRUNCATED.safetensors"].startswith("truncated")
    lokr = cat_api.show(catalog, "lycoris_repo_smart_falcon_8_lokr_oldimpl")
    assert (lokr["type"], lokr["base"], lokr["rank"]) == ("lokr", "sd1", 8)
    assert lokr["sha256"].startswith("a2a6168e313e") and lokr["trigger_words"][0] == "smf girl"
    assert lokr["training"]["steps"] == 3010
    assert cat_api.show(catalog, "a850120d67")["name"] == "haseebae_pytorch_lora_weights"


def test_spaces_non_ascii_and_diffusers_folders(catalog, tmp_path):
    lib = tmp_path / "my loras" / "ñandú 画風"
    path = make_lora(lib / "ö style v2.safetensors")
    folder = tmp_path / "my loras" / "peft out"
    weights = {}
    for m in ("to_k", "to_v"):
        key = f"base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn2.{m}"
        weights[f"{key}.lora_A.weight"], weights[f"{key}.lora_B.weight"] = torch.randn(4, 768), torch.randn(320, 4)
    folder.mkdir(parents=True)
    save_file(weights, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "peft_type": "LORA"}))
    report = _scan(catalog, tmp_path / "my loras")
    assert (report.new, report.unreadable) == (2, [])
    assert cat_api.show(catalog, "ö style v2")["path"] == str(path)
    assert cat_api.show(catalog, str(path))["name"] == "ö style v2"
    assert [e["name"] for e in cat_api.search(catalog, "STYLE")] == ["ö style v2"]
    peft = cat_api.show(catalog, "peft out")
    assert (peft["kind"], peft["type"], peft["format"], peft["alpha"]) == ("folder", "lora", "peft", 8.0)
    assert resolve_adapter_arg("peft out", catalog.url) == folder


# ------------------------------------------------------------------------------------------------
# browsing and editing
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def library(catalog, tmp_path):
    lib = tmp_path / "lib"
    make_lora(lib / "anime" / "neon.safetensors", seed=1, metadata=KOHYA_META)
    make_lora(lib / "anime" / "pastel.safetensors", seed=2, rank=8)
    make_lora(lib / "photo" / "pastel.safetensors", seed=3)
    shutil.copy(lib / "anime" / "neon.safetensors", lib / "photo" / "neon copy.safetensors")
    make_lora(lib / "photo" / "neon retitled.safetensors", seed=1, metadata={**KOHYA_META, "ss_output_name": "x"})
    _scan(catalog, lib)
    return lib


def test_list_filters_and_sorts(catalog, library):
    assert len(cat_api.list_entries(catalog)) == 5
    cat_api.tag(catalog, str(library / "anime" / "pastel.safetensors"), "add", ["soft"])
    soft = cat_api.list_entries(catalog, tags=("soft",))
    assert [e["path"] for e in soft] == [str(library / "anime" / "pastel.safetensors")]
    assert [e["rank"] for e in cat_api.list_entries(catalog, sort="rank", limit=1)] == [4]
    assert len(cat_api.list_entries(catalog, type="LORA", base="sd1")) == 5
    assert cat_api.list_entries(catalog, type="ti") == []
    with pytest.raises(CatalogError, match="cannot sort"):
        cat_api.list_entries(catalog, sort="colour")


def test_search_names_tags_triggers_metadata(catalog, library):
    cat_api.tag(catalog, "neon", "add", ["cyberpunk"])
    assert [e["name"] for e in cat_api.search(catalog, "cyber")] == ["neon"]
    assert {e["name"] for e in cat_api.search(catalog, "ohwx")} == {"neon", "neon copy", "neon retitled"}
    assert {e["name"] for e in cat_api.search(catalog, "networks lora ohwx")} == {"neon", "neon copy", "neon retitled"}
    assert [e["name"] for e in cat_api.search(catalog, "retitled")] == ["neon retitled"]
    assert cat_api.search(catalog, "nothing-like-this") == []
    with pytest.raises(CatalogError, match="nothing to search"):
        cat_api.search(catalog, "  --- ")


def test_show_by_name_hash_path_and_ambiguity(catalog, library):
    neon = cat_api.show(catalog, "neon")
    assert cat_api.show(catalog, neon["sha256"][:10])["sha256"] == neon["sha256"]  # copies: any will do
    with pytest.raises(CatalogError, match="ambiguous: 3 catalog entries"):  # same tensors, other metadata
        cat_api.show(catalog, neon["autov3"])
    with pytest.raises(CatalogError, match="ambiguous: 2 catalog entries match") as err:
        cat_api.show(catalog, "pastel")
    assert str(library / "photo" / "pastel.safetensors") in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(CatalogError, match="not found"):
        cat_api.show(catalog, "nope")
    assert cat_api.show(catalog, str(library / "photo" / "pastel.safetensors"))["rank"] == 4


def test_tag_note_rate(catalog, library):
    assert cat_api.tag(catalog, "neon", "add", ["a", " b ", "a"])["tags"] == ["a", "b"]
    assert cat_api.tag(catalog, "neon", "rm", ["a"])["tags"] == ["b"]
    cat_api.note(catalog, "neon", "  use 0.6  ")
    cat_api.rate(catalog, "neon", 4)
    entry = cat_api.show(catalog, "neon")
    assert (entry["notes"], entry["rating"]) == ("use 0.6", 4)
    with pytest.raises(CatalogError, match="out of range"):
        cat_api.rate(catalog, "neon", 9)
    with pytest.raises(CatalogError, match="ambiguous"):
        cat_api.tag(catalog, "pastel", "add", ["x"])


def test_dupes_and_stats(catalog, library):
    groups = cat_api.dupes(catalog)
    identical = [g for g in groups if g["kind"] == "identical"]
    same_tensors = [g for g in groups if g["kind"] == "same tensors"]
    assert [sorted(e["name"] for e in g["entries"]) for g in identical] == [["neon", "neon copy"]]
    assert [sorted(e["name"] for e in g["entries"]) for g in same_tensors] == [["neon", "neon copy", "neon retitled"]]
    stats = cat_api.stats(catalog)
    assert (stats["entries"], stats["by_type"], stats["duplicate_groups"]) == (5, {"lora": 5}, 1)


def test_export_import_round_trip(catalog, library, tmp_path):
    cat_api.tag(catalog, "neon", "add", ["fav"])
    cat_api.note(catalog, "neon", "keeper")
    data = cat_api.export(catalog)
    data["entries"].append({**data["entries"][0], "path": "/nowhere/ghost.safetensors", "name": "ghost",
                            "sha256": "f" * 64, "tags": ["ghost"]})
    with open_catalog(tmp_path / "other.db", create=True) as other:
        assert cat_api.import_(other, data) == {"merged": 0, "added": 6, "invalid": 0}
        assert cat_api.show(other, "ghost")["missing"] is True
        neon = cat_api.list_entries(other, tags=("fav",))
        assert [(e["name"], e["notes"]) for e in neon] == [("neon", "keeper")]
        assert cat_api.import_(other, data)["merged"] == 6
        assert [e["name"] for e in cat_api.search(other, "fav")] == ["neon"]
    with pytest.raises(CatalogError, match="not an adapterhub catalog export"):
        cat_api.import_(catalog, {"entries": "nope"})


def test_resolve_adapter_arg(catalog, library, tmp_path, monkeypatch):
    path = library / "photo" / "pastel.safetensors"
    assert resolve_adapter_arg(str(path), catalog.url) == path
    assert resolve_adapter_arg("neon retitled", catalog.url) == library / "photo" / "neon retitled.safetensors"
    neon = cat_api.show(catalog, "neon retitled")
    assert resolve_adapter_arg(neon["sha256"][:12], catalog.url).name == "neon retitled.safetensors"
    with pytest.raises(CatalogError, match="ambiguous"):
        resolve_adapter_arg("pastel", catalog.url)
    with pytest.raises(CatalogError, match="not found"):
        resolve_adapter_arg("unknown-name", catalog.url)
    os.unlink(path)
    with pytest.raises(CatalogError, match="missing"):
        resolve_adapter_arg(str(cat_api.show(catalog, str(path))["sha256"][:16]), catalog.url)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ADAPTERHUB_CATALOG", raising=False)
    with pytest.raises(CatalogError, match="no catalog at"):
        resolve_adapter_arg("neon")


# ------------------------------------------------------------------------------------------------
# schema, read-only catalogs
# ------------------------------------------------------------------------------------------------
V1_DDL = {
    "sqlite": ["CREATE TABLE catalog_entries (id INTEGER PRIMARY KEY, path VARCHAR NOT NULL UNIQUE, "
               "name VARCHAR NOT NULL, kind VARCHAR NOT NULL, size BIGINT NOT NULL, mtime_ns BIGINT NOT NULL, "
               "sha256 VARCHAR, autov1 VARCHAR, autov2 VARCHAR, autov3 VARCHAR, status VARCHAR NOT NULL, "
               "error VARCHAR, type VARCHAR, format VARCHAR, base VARCHAR, family VARCHAR, rank INTEGER, "
               "alpha FLOAT, targets INTEGER, metadata JSON NOT NULL, missing BOOLEAN NOT NULL, "
               "added_at FLOAT NOT NULL, scanned_at FLOAT NOT NULL)",
               "CREATE TABLE catalog_tags (entry_id INTEGER NOT NULL REFERENCES catalog_entries(id) ON DELETE CASCADE, "
               "tag VARCHAR NOT NULL, PRIMARY KEY (entry_id, tag))"],
}
V1_DDL["postgresql"] = [V1_DDL["sqlite"][0].replace("id INTEGER PRIMARY KEY", "id SERIAL PRIMARY KEY"),
                        V1_DDL["sqlite"][1]]


def test_opening_an_older_catalog_upgrades_it(catalog_url, tmp_path):
    from sqlalchemy import text

    from adapterhub.catalog.db import catalog_url as to_url
    from adapterhub.catalog.db import make_engine

    url = to_url(catalog_url)
    Path(catalog_url).parent.mkdir(parents=True, exist_ok=True) if "://" not in catalog_url else None
    engine = make_engine(url)
    with engine.begin() as conn:
        for ddl in V1_DDL[engine.dialect.name]:
            conn.exec_driver_sql(ddl)
        conn.execute(text("INSERT INTO catalog_entries (path, name, kind, size, mtime_ns, sha256, status, type, "
                          "metadata, missing, added_at, scanned_at) VALUES ('/x/old style.safetensors', 'old style', "
                          "'file', 10, 1, :h, 'ok', 'lora', '{\"ss_output_name\": \"vintage\"}', false, 0, 0)"),
                     {"h": "ab" * 32})
        conn.execute(text("INSERT INTO catalog_tags (entry_id, tag) SELECT id, 'kept' FROM catalog_entries"))
    engine.dispose()
    with open_catalog(catalog_url) as cat:
        with cat.engine.connect() as conn:
            assert conn.execute(text("SELECT version FROM catalog_schema")).scalar() == VERSION
        entry = cat_api.show(cat, "old style")
        assert (entry["tags"], entry["trigger_words"], entry["notes"]) == (["kept"], [], "")
        assert [e["name"] for e in cat_api.search(cat, "vintage")] == ["old style"]
        cat_api.rate(cat, "old style", 3)
    with open_catalog(catalog_url) as cat:  # idempotent
        assert cat_api.show(cat, "abababab")["rating"] == 3


def test_newer_schema_is_refused(catalog):
    from sqlalchemy import text

    with catalog.engine.begin() as conn:
        conn.execute(text("UPDATE catalog_schema SET version = 99"))
    with pytest.raises(CatalogError, match="newer than this adapterhub"):
        open_catalog(catalog.url)


def test_read_only_catalog_file(tmp_path):
    db = tmp_path / "ro.db"
    make_lora(tmp_path / "lib" / "a.safetensors")
    with open_catalog(db, create=True) as cat:
        _scan(cat, tmp_path / "lib")
    before = db.read_bytes()
    os.chmod(db, 0o444)
    try:
        with open_catalog(db) as cat:
            assert cat.readonly and [e["name"] for e in cat_api.list_entries(cat)] == ["a"]
            assert cat_api.search(cat, "a")[0]["name"] == "a"
            make_lora(tmp_path / "lib" / "b.safetensors", seed=2)
            with pytest.raises(CatalogError, match="read-only; nothing was changed"):
                _scan(cat, tmp_path / "lib")
            with pytest.raises(CatalogError, match="read-only"):
                cat_api.tag(cat, "a", "add", ["x"])
        assert db.read_bytes() == before
    finally:
        os.chmod(db, 0o644)
    with open_catalog(db) as cat:
        assert _scan(cat, tmp_path / "lib").new == 1


def test_no_catalog_and_bad_url_are_one_line_errors(tmp_path):
    with pytest.raises(CatalogError, match="no catalog at"):
        open_catalog(tmp_path / "absent.db")
    with open_catalog(tmp_path / "c.db", create=True) as cat, \
            pytest.raises(CatalogError, match="no such file or folder"):
        _scan(cat, tmp_path / "does not exist")
