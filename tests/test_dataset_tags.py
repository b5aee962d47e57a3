"""Dataset folder reading, tag edits with their preview, undo (byte-exact) and stats."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from adapterhub.cli import main
from adapterhub.dataset import StatsConfig, TagEditConfig, scan
from adapterhub.dataset.folder import Subset, decode_caption
from adapterhub.dataset.journal import undo_last
from adapterhub.dataset.stats import tag_stats
from adapterhub.dataset.tags import apply, edit_tags, plan
from adapterhub.errors import AdapterhubError

DEMO = Path(__file__).resolve().parents[1] / "datasets" / "demo"


def snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".adapterhub" not in p.parts}


@pytest.fixture
def demo(tmp_path) -> Path:
    dst = tmp_path / "demo"
    shutil.copytree(DEMO, dst)
    return dst


@pytest.fixture
def odd(tmp_path) -> Path:
    """Names with spaces and non-ASCII characters, .caption files, a non-UTF-8 caption."""
    root = tmp_path / "odd set" / "3_ohwx dog"
    root.mkdir(parents=True)
    for name in ("café au lait", "日本 の 犬", "plain", "no caption"):
        Image.new("RGB", (64, 48), "red").save(root / f"{name}.png")
    (root / "café au lait.txt").write_bytes("Dog, café, Red\r\n".encode("utf-8"))
    (root / "日本 の 犬.caption").write_text("dog, 犬, grass", encoding="utf-8")
    (root / "plain.txt").write_bytes("dog, na\xefve, red".encode("cp1252"))
    return tmp_path / "odd set"


def test_scan_reads_kohya_folders_and_both_caption_extensions(odd):
    ds = scan(odd)
    assert [i.rel for i in ds.items] == ["3_ohwx dog/café au lait.png", "3_ohwx dog/no caption.png",
                                         "3_ohwx dog/plain.png", "3_ohwx dog/日本 の 犬.png"]
    assert ds.items[0].subset == Subset("3_ohwx dog", 3, "ohwx dog")
    assert ds.items[3].caption().tags == ["dog", "犬", "grass"]
    assert ds.items[3].caption_path.suffix == ".caption"
    assert not ds.items[1].caption().exists and ds.items[1].caption_path.suffix == ".txt"
    plain = ds.items[2].caption()
    assert plain.encoding == "cp1252" and plain.tags == ["dog", "naïve", "red"]


def test_decode_caption_strips_bom_and_crlf():
    assert decode_caption(b"\xef\xbb\xbfa, b\r\n\r\n") == ("a, b", "utf-8")
    assert decode_caption(b"\x81\x8d")[1] == "latin-1"


@pytest.mark.parametrize("action, values, opts, expected", [
    ("add", ("dog, new tag",), {}, ["Dog", "café", "Red", "new tag"]),
    ("add", ("front",), {"position": 0}, ["front", "Dog", "café", "Red"]),
    ("remove", ("red", "CAFÉ"), {}, ["Dog"]),
    ("replace", ("café", "coffee, milk"), {}, ["Dog", "coffee", "milk", "Red"]),
    ("move-front", ("red",), {}, ["Red", "Dog", "café"]),
    ("sort", (), {}, ["café", "Dog", "Red"]),
    ("sort", (), {"keep_first": 1}, ["Dog", "café", "Red"]),  # already in order: no change
    ("trigger", (), {}, ["ohwx dog", "Dog", "café", "Red"]),
    ("trigger", ("sks",), {}, ["sks", "Dog", "café", "Red"]),
])
def test_tag_edits(odd, action, values, opts, expected):
    cfg = TagEditConfig(dir=odd, action=action, values=values, **opts)
    changes, written = edit_tags(cfg)
    item = next(i for i in scan(odd).items if i.rel.endswith("café au lait.png"))
    assert item.caption().tags == expected
    assert written == len(changes)


def test_dedupe_where_and_dry_run(odd):
    cap = odd / "3_ohwx dog" / "plain.txt"
    cap.write_text("dog, Dog, red,  dog ", encoding="utf-8")
    before = snapshot(odd)
    dry = TagEditConfig(dir=odd, action="dedupe", dry_run=True)
    changes, written = edit_tags(dry)
    assert written == 0 and snapshot(odd) == before
    assert [c.after for c in changes] == ["dog, red"]
    only_grass = TagEditConfig(dir=odd, action="add", values=("x",), where=("grass",))
    assert [c.item.rel for c in plan(only_grass)] == ["3_ohwx dog/日本 の 犬.png"]
    not_grass = TagEditConfig(dir=odd, action="remove", values=("dog",), where_not=("grass",))
    assert len(plan(not_grass)) == 2


def test_add_creates_missing_captions_and_undo_restores_exact_bytes(odd):
    before = snapshot(odd)
    edit_tags(TagEditConfig(dir=odd, action="trigger"))
    edit_tags(TagEditConfig(dir=odd, action="replace", values=("red", "blue")))
    after = snapshot(odd)
    assert after["3_ohwx dog/no caption.txt"] == b"ohwx dog\n"
    assert after["3_ohwx dog/plain.txt"] == "ohwx dog, dog, naïve, blue\n".encode()
    assert undo_last(odd)["op"] == "tags replace"
    assert undo_last(odd)["op"] == "tags trigger"
    assert snapshot(odd) == before  # CRLF, cp1252 bytes, .caption, missing file: all exact
    with pytest.raises(AdapterhubError, match="nothing to undo"):
        undo_last(odd)


def test_undo_refuses_files_edited_since_unless_forced(odd):
    edit_tags(TagEditConfig(dir=odd, action="add", values=("x",)))
    cap = odd / "3_ohwx dog" / "plain.txt"
    cap.write_text("edited by hand", encoding="utf-8")
    with pytest.raises(AdapterhubError, match="changed since"):
        undo_last(odd)
    assert cap.read_text(encoding="utf-8") == "edited by hand"
    undo_last(odd, force=True)
    assert cap.read_bytes() == "dog, na\xefve, red".encode("cp1252")


def test_interrupted_edit_is_undoable(odd, monkeypatch):
    """A crash halfway leaves a journal whose written files undo restores."""
    from adapterhub.dataset import tags as tags_mod

    before = snapshot(odd)
    cfg = TagEditConfig(dir=odd, action="add", values=("x",))
    changes = plan(cfg)
    real = tags_mod.write_caption
    calls = []

    def flaky(journal, path, old, new):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real(journal, path, old, new)
    monkeypatch.setattr(tags_mod, "write_caption", flaky)
    with pytest.raises(KeyboardInterrupt):
        apply(cfg, changes)
    assert snapshot(odd) != before
    undo_last(odd)
    assert snapshot(odd) == before


def test_stats_counts_and_chart(demo, tmp_path):
    chart = tmp_path / "chart.png"
    s = tag_stats(StatsConfig(dir=demo, top=5, chart=chart))
    assert s["images"] == s["captioned"] == 8
    assert s["top"][0] == {"tag": "photograph", "images": 5, "share": "62%"}
    assert s["ss_tag_frequency"]["10_demo subject"]["nasa"] == 2
    with Image.open(chart) as im:
        assert im.format == "PNG" and im.width > 400


def test_cli_tags_preview_json_and_undo(demo, capsys):
    before = snapshot(demo)
    assert main(["dataset", "tags", str(demo), "add", "masterpiece", "--dry-run", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["changes"]) == 8 and out["written"] == 0 and snapshot(demo) == before
    assert main(["dataset", "tags", str(demo), "remove", "nasa"]) == 0
    assert "changed 2 caption(s)" in capsys.readouterr().out
    assert main(["dataset", "undo", str(demo), "--list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["op"] == "tags remove"
    assert main(["dataset", "undo", str(demo)]) == 0
    assert snapshot(demo) == before


def test_cli_stats(demo, capsys):
    assert main(["dataset", "stats", str(demo), "--top", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["tag"] for r in out["top"]] == ["photograph", "black background", "grayscale"]
    assert Path(out["chart"]).is_file() and ".adapterhub" in out["chart"]
    assert main(["dataset", "stats", str(demo), "--no-chart"]) == 0
    assert "tag frequency" in capsys.readouterr().out


def test_cli_bad_input_exits_2(tmp_path, capsys):
    assert main(["dataset", "tags", str(tmp_path / "nope"), "dedupe"]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert main(["dataset", "undo", str(tmp_path)]) == 2
