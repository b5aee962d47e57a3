"""Catalogs that cannot be opened as asked: one line naming the catalog and the problem, exit code 2, no
traceback, nothing written; and a catalog in a read-only folder that can still be browsed."""
from __future__ import annotations

import json
import os
import sqlite3
import sys

import pytest
from test_catalog_support import make_lora

from adapterhub.cli import main


def run(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert "Traceback" not in err
    return err


@pytest.fixture
def scanned(tmp_path, capsys):
    """A catalog of one LoRA (``neon``), in a folder of its own."""
    make_lora(tmp_path / "lib" / "neon.safetensors", seed=1)
    db = tmp_path / "shelf" / "catalog.db"
    code, _, err = run(capsys, "catalog", "--catalog", str(db), "scan", str(tmp_path / "lib"), "--jobs", "1", "--json")
    assert code == 0, err
    return db


# ------------------------------------------------------------------------------------------------
# URLs
# ------------------------------------------------------------------------------------------------
def test_unknown_url_scheme(capsys):
    code, _, err = run(capsys, "catalog", "--catalog", "foo://host/db", "list")
    assert code == 2
    assert "foo://host/db" in one_line(err) and "'foo'" in err and "postgresql://" in err


def test_postgresql_without_a_driver_names_the_package(capsys, monkeypatch):
    # neither PostgreSQL driver importable: None in sys.modules makes `import psycopg` fail
    monkeypatch.setitem(sys.modules, "psycopg", None)
    monkeypatch.setitem(sys.modules, "psycopg2", None)
    code, _, err = run(capsys, "catalog", "--catalog", "postgresql://me:secret@localhost/team", "list")
    assert code == 2
    line = one_line(err)
    assert "://me:***@localhost/team" in line and "secret" not in line  # no password on screen
    assert "pip install 'psycopg[binary]'" in line


def test_mysql_without_a_driver_names_the_package(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "MySQLdb", None)
    code, _, err = run(capsys, "catalog", "--catalog", "mysql://me@localhost/team", "list")
    assert code == 2 and "pip install mysqlclient" in one_line(err)


# ------------------------------------------------------------------------------------------------
# a damaged schema version
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["'two'", "1.5", "0", "-3", "X'02'", None])
def test_corrupt_schema_version(scanned, capsys, version):
    con = sqlite3.connect(scanned)
    with con:
        if version is None:
            con.execute("DELETE FROM catalog_schema")
        else:
            con.execute(f"UPDATE catalog_schema SET version = {version}")
    con.close()
    before = scanned.read_bytes()
    for command in (["list"], ["scan", str(scanned.parent.parent / "lib")]):
        code, _, err = run(capsys, "catalog", "--catalog", str(scanned), *command)
        assert code == 2
        line = one_line(err)
        assert str(scanned) in line and "schema version" in line and "damaged" in line, line
    assert scanned.read_bytes() == before  # not "repaired" behind the user's back


# ------------------------------------------------------------------------------------------------
# a read-only folder
# ------------------------------------------------------------------------------------------------
def test_catalog_in_a_read_only_folder_can_be_browsed(scanned, capsys):
    """chmod 0555 on the folder: list / search / show work and leave no file behind; edits are refused.

    Root ignores permission bits, so a write would succeed there: the folder's mode bits are what count
    (as for a read-only catalog file), and the assertions that nothing was written hold for root too."""
    folder = scanned.parent
    before = scanned.read_bytes()
    os.chmod(folder, 0o555)
    try:
        code, out, err = run(capsys, "catalog", "--catalog", str(scanned), "list", "--json")
        assert code == 0, err
        assert [e["name"] for e in json.loads(out)] == ["neon"]
        code, out, err = run(capsys, "catalog", "--catalog", str(scanned), "search", "neon", "--json")
        assert code == 0 and [e["name"] for e in json.loads(out)] == ["neon"], err
        code, out, err = run(capsys, "catalog", "--catalog", str(scanned), "show", "neon", "--json")
        assert code == 0 and json.loads(out)["name"] == "neon", err
        code, _, err = run(capsys, "catalog", "--catalog", str(scanned), "tag", "neon", "add", "fav")
        assert code == 2 and one_line(err) == f"error: catalog {scanned} is read-only; nothing was changed\n"
        assert sorted(os.listdir(folder)) == ["catalog.db"]  # no -wal, -shm or journal left behind
        assert scanned.read_bytes() == before
    finally:
        os.chmod(folder, 0o755)
    code, out, _ = run(capsys, "catalog", "--catalog", str(scanned), "tag", "neon", "add", "fav", "--json")
    assert code == 0 and json.loads(out)["tags"] == ["fav"]  # writable again once the folder is


def test_no_new_catalog_in_a_read_only_folder(tmp_path, capsys):
    make_lora(tmp_path / "lib" / "neon.safetensors", seed=1)
    folder = tmp_path / "shelf"
    folder.mkdir()
    os.chmod(folder, 0o555)
    try:
        code, _, err = run(capsys, "catalog", "--catalog", str(folder / "catalog.db"), "scan", str(tmp_path / "lib"))
        assert code == 2 and str(folder) in one_line(err) and "read-only" in err, err
        assert os.listdir(folder) == []
    finally:
        os.chmod(folder, 0o755)


# ------------------------------------------------------------------------------------------------
# export's output
# ------------------------------------------------------------------------------------------------
from test_hardening_writes import full_disk, read_only  # noqa: E402,F401  (fixtures)


def test_export_to_a_full_disk_or_a_read_only_folder(scanned, full_disk, read_only, tmp_path, capsys):
    full = tmp_path / "full"
    full.mkdir()
    (full / "export.json").write_text("the previous export")
    full_disk(full)
    code, _, err = run(capsys, "catalog", "--catalog", str(scanned), "export", "-o", str(full / "export.json"))
    assert code == 2
    line = one_line(err)
    assert str(full / "export.json") in line and "No space left on device" in line, line
    assert os.listdir(full) == ["export.json"] and (full / "export.json").read_text() == "the previous export"

    ro = read_only(tmp_path / "ro")
    code, _, err = run(capsys, "catalog", "--catalog", str(scanned), "export", "-o", str(ro / "export.json"))
    assert code == 2 and str(ro) in one_line(err) and "read-only" in err, err
    assert os.listdir(ro) == []
