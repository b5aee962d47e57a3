"""validate: every check on crafted bad files, --fix safety, exit codes, undo of fixes."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from adapterhub.cli import main
from adapterhub.dataset import ValidateConfig
from adapterhub.dataset.journal import undo_last
from adapterhub.dataset.validate import validate

DEMO = Path(__file__).resolve().parents[1] / "datasets" / "demo"


def snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".adapterhub" not in p.parts}


@pytest.fixture
def bad(tmp_path) -> Path:
    root = tmp_path / "bad set"
    sub = root / "5_thing"
    shutil.copytree(DEMO / "10_demo subject", sub)
    cat = Image.open(sub / "cat.jpg").convert("RGB")
    cat.convert("CMYK").save(sub / "cmyk.jpg")
    cat.convert("P").save(sub / "palette é.png")
    rgba = cat.convert("RGBA")
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    rgba.save(sub / "alpha.png")
    Image.new("RGB", (100, 80), "blue").save(sub / "tiny.png")
    (sub / "corrupt.png").write_bytes(b"definitely not an image")
    data = (sub / "astronaut.jpg").read_bytes()
    (sub / "truncated.jpg").write_bytes(data[: len(data) // 2])
    shutil.copy(sub / "rocket.jpg", sub / "rocket copy.jpg")                 # exact duplicate
    cat.resize((300, 200)).save(sub / "cat small.jpg", quality=70)            # near duplicate
    cat.save(sub / "really png.jpg", format="PNG")
    for name in ("cmyk", "palette é", "alpha", "tiny", "corrupt", "truncated", "rocket copy",
                 "cat small", "really png"):
        (sub / f"{name}.txt").write_text("thing", encoding="utf-8")
    (sub / "cat small.txt").write_bytes("thing, caf\xe9".encode("cp1252"))  # not UTF-8
    (sub / "retina.txt").unlink()                                           # missing caption
    (sub / "coffee.txt").write_text("  \n", encoding="utf-8")               # empty caption
    (sub / "ghost.txt").write_text("orphan", encoding="utf-8")
    return root


def by_check(result) -> dict:
    found: dict = {}
    for f in result["findings"]:
        found.setdefault(f["check"], set()).add(f["file"].split("/")[-1])
    return found


def test_validate_finds_every_problem(bad):
    before = snapshot(bad)
    r = validate(ValidateConfig(dir=bad, min_side=150))
    assert snapshot(bad) == before
    found = by_check(r)
    assert found["unreadable"] == {"corrupt.png"}
    assert found["truncated"] == {"truncated.jpg"}
    assert found["odd-mode"] == {"cmyk.jpg", "palette é.png", "alpha.png"}
    assert found["too-small"] == {"tiny.png"}
    assert found["duplicate"] == {"rocket.jpg"} or found["duplicate"] == {"rocket copy.jpg"}
    assert "cat small.jpg" in found["near-duplicate"] or "cat.jpg" in found["near-duplicate"]
    assert found["wrong-extension"] == {"really png.jpg"}
    assert found["caption-encoding"] == {"cat small.jpg"}
    assert found["missing-caption"] == {"retina.jpg"}
    assert found["empty-caption"] == {"coffee.jpg"}
    assert found["orphan-caption"] == {"ghost.txt"}
    assert "oversized" not in found
    assert not r["ok"] and r["errors"] >= 5


def test_oversized_and_clean_demo(tmp_path):
    demo = tmp_path / "demo"
    shutil.copytree(DEMO, demo)
    assert validate(ValidateConfig(dir=demo))["ok"]
    r = validate(ValidateConfig(dir=demo, max_file_mb=0.05))
    assert by_check(r)["oversized"] == {"astronaut.jpg", "camera.jpg", "hubble deep field.jpg"}


def test_fix_is_safe_and_undoable(bad):
    before = snapshot(bad)
    r = validate(ValidateConfig(dir=bad, fix=True, min_side=150))
    fixed = {(f["check"], f["file"].split("/")[-1]) for f in r["findings"] if f["fixed"]}
    assert fixed == {("odd-mode", "cmyk.jpg"), ("odd-mode", "palette é.png"), ("odd-mode", "alpha.png"),
                     ("unreadable", "corrupt.png"), ("truncated", "truncated.jpg"),
                     ("caption-encoding", "cat small.jpg")}
    sub = bad / "5_thing"
    with Image.open(sub / "cmyk.jpg") as im, Image.open(sub / "alpha.png") as a:
        assert im.mode == "RGB" and a.mode == "RGB" and a.getpixel((0, 0)) == (255, 255, 255)
    assert not (sub / "corrupt.png").exists()
    assert (sub / "cat small.txt").read_text(encoding="utf-8") == "thing, café\n"
    state = bad / ".adapterhub"
    originals = list((state / "originals").rglob("*.*"))
    assert {p.name for p in originals} == {"cmyk.jpg", "palette é.png", "alpha.png"}
    assert {p.name for p in (state / "quarantine").rglob("*.*")} == {
        "corrupt.png", "corrupt.txt", "truncated.jpg", "truncated.txt"}
    again = validate(ValidateConfig(dir=bad, min_side=150))
    assert "odd-mode" not in by_check(again) and "unreadable" not in by_check(again)
    undo_last(bad)
    assert snapshot(bad) == before


def test_cli_exit_codes(bad, tmp_path, capsys):
    assert main(["dataset", "validate", str(bad), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False
    demo = tmp_path / "demo"
    shutil.copytree(DEMO, demo)
    assert main(["dataset", "validate", str(demo)]) == 0
    assert "8 image(s): ok" in capsys.readouterr().out
    assert main(["dataset", "validate", str(tmp_path / "missing")]) == 2
