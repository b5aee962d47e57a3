"""``adapterhub dataset kohya-json``: kohya's fine-tuning metadata from the sidecar captions, checked
against kohya's merge_dd_tags_to_metadata.py + merge_captions_to_metadata.py written out below."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from adapterhub.cli import main


def make_set(root: Path) -> Path:
    rng = np.random.default_rng(0)
    a, b = root / "10_sks girl", root / "3_style"
    a.mkdir(parents=True)
    b.mkdir()
    for folder, stem in ((a, "one"), (a, "two"), (b, "three"), (b, "four")):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{stem}.png")
    (a / "one.txt").write_text("1girl, solo, smile\n", encoding="utf-8")
    (a / "one.caption").write_text("a girl smiling\n", encoding="utf-8")
    (a / "two.txt").write_text("1girl, \u00e9t\u00e9, long hair", encoding="utf-8")
    (b / "three.caption").write_text("a painting\nof a hill\n", encoding="utf-8")
    return root


def kohya_merge(images: list[Path], metadata: dict, full_path: bool) -> dict:
    """kohya's two merge scripts in turn: tags from .txt, then captions from .caption (the scripts
    need every image to have the file; images without one are left out here)."""
    for field, ext in (("tags", ".txt"), ("caption", ".caption")):
        for image_path in images:
            text_path = image_path.with_suffix(ext)
            if not text_path.is_file():
                continue
            key = str(image_path) if full_path else image_path.stem
            metadata.setdefault(key, {})[field] = text_path.read_text(encoding="utf-8").strip()
    return metadata


def images_of(root: Path) -> list[Path]:
    return sorted(p.resolve() for p in root.rglob("*.png"))


def test_export_equals_kohyas_merge_and_keeps_other_fields(tmp_path, capsys):
    root = make_set(tmp_path / "set")
    out = tmp_path / "meta_cap_dd.json"
    earlier = {"old_image": {"tags": "x", "train_resolution": [512, 512]},
               "one": {"tags": "stale", "train_resolution": [640, 384]}}
    out.write_text(json.dumps(earlier, indent=2), encoding="utf-8")
    assert main(["dataset", "kohya-json", str(root), str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    want = kohya_merge(images_of(root), json.loads(json.dumps(earlier)), full_path=False)
    got = json.loads(out.read_text(encoding="utf-8"))
    assert got == want and list(got) == list(want)
    assert got["one"] == {"tags": "1girl, solo, smile", "train_resolution": [640, 384], "caption": "a girl smiling"}
    assert "four" not in got  # no sidecar: nothing to say
    assert (report["images"], report["tags"], report["captions"], report["kept"]) == (4, 2, 2, 1)


def test_full_path_keys_and_an_explicit_input(tmp_path):
    root = make_set(tmp_path / "set")
    src, out = tmp_path / "in.json", tmp_path / "out" / "meta.json"
    src.write_text(json.dumps({"keep": {"caption": "c"}}), encoding="utf-8")
    assert main(["dataset", "kohya-json", str(root), str(out), "--in-json", str(src), "--full-path"]) == 0
    want = kohya_merge(images_of(root), {"keep": {"caption": "c"}}, full_path=True)
    assert json.loads(out.read_text(encoding="utf-8")) == want
    assert all(Path(k).is_file() for k in want if k != "keep")


def test_duplicate_stems_and_bad_input_are_one_line_exit_2(tmp_path, capsys):
    root = make_set(tmp_path / "set")
    (root / "3_style" / "one.txt").write_text("duplicate stem", encoding="utf-8")
    Image.new("RGB", (8, 8)).save(root / "3_style" / "one.png")
    out = tmp_path / "meta.json"

    def one_line(args) -> str:
        assert main(args) == 2
        captured = capsys.readouterr()
        assert len(captured.err.strip().splitlines()) == 1 and "Traceback" not in captured.err
        assert not out.exists()
        return captured.err

    err = one_line(["dataset", "kohya-json", str(root), str(out)])
    assert "one" in err and "--full-path" in err
    bad = tmp_path / "bad.json"
    for text in ("{not json", "[1, 2]", '{"a": 3}'):
        bad.write_text(text, encoding="utf-8")
        err = one_line(["dataset", "kohya-json", str(root), str(out), "--in-json", str(bad), "--full-path"])
        assert str(bad) in err


# -- back to sidecars ------------------------------------------------------------------------------
def sidecars(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.suffix in (".txt", ".caption") and ".adapterhub" not in p.parts}


def test_import_writes_the_sidecars_kohya_would_read_and_undo_restores(tmp_path, capsys):
    root = make_set(tmp_path / "set")
    before = sidecars(root)
    meta = {"one": {"tags": "1girl, solo, smile, new", "caption": "a girl smiling", "train_resolution": [8, 8]},
            "four": {"tags": "landscape", "caption": "a field\nat dusk"},
            str((root / "3_style" / "three.png").resolve()): {"caption": "a painting of a hill"},
            "nowhere": {"tags": "x"}}
    src = tmp_path / "meta.json"
    src.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    assert main(["dataset", "from-kohya-json", str(root), str(src), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["written"], report["unchanged"], report["not_found"]) == (4, 1, ["nowhere"])
    a, b = root / "10_sks girl", root / "3_style"
    # what kohya's fine-tuning reads: the JSON's strings, as the sidecars now hold them
    assert (a / "one.txt").read_text(encoding="utf-8") == "1girl, solo, smile, new\n"
    assert (a / "one.caption").read_bytes() == before["10_sks girl/one.caption"]  # unchanged
    assert (b / "four.txt").read_text(encoding="utf-8") == "landscape\n"
    assert (b / "four.caption").read_text(encoding="utf-8") == "a field\nat dusk\n"
    assert (b / "three.caption").read_text(encoding="utf-8") == "a painting of a hill\n"
    # and the export gives the same metadata back
    out = tmp_path / "again.json"
    assert main(["dataset", "kohya-json", str(root), str(out)]) == 0
    again = json.loads(out.read_text(encoding="utf-8"))
    assert again["one"]["tags"] == meta["one"]["tags"] and again["four"] == meta["four"]
    assert main(["dataset", "undo", str(root)]) == 0
    assert sidecars(root) == before


def test_import_skip_mode_and_bad_input(tmp_path, capsys):
    root = make_set(tmp_path / "set")
    before = sidecars(root)
    src = tmp_path / "meta.json"
    src.write_text(json.dumps({"one": {"tags": "other"}, "four": {"tags": "landscape"}}), encoding="utf-8")
    assert main(["dataset", "from-kohya-json", str(root), str(src), "--mode", "skip"]) == 0
    assert sidecars(root) == {**before, "3_style/four.txt": b"landscape\n"}

    root2 = make_set(tmp_path / "set2")
    Image.new("RGB", (8, 8)).save(root2 / "3_style" / "one.png")
    before2 = sidecars(root2)
    for text, words in (('{"one": {"tags": "t"}}', ["one", "--full-path"]), ("{oops", [str(src)]),
                        ('{"two": {"tags": 3}}', ["'two'", "tags"])):
        src.write_text(text, encoding="utf-8")
        assert main(["dataset", "from-kohya-json", str(root2), str(src)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and all(w in err for w in words), err
        assert sidecars(root2) == before2
