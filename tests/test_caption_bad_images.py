"""A damaged image in the set: every captioner skips it, lists it (file and reason) in the summary,
captions the others exactly as a clean run would and exits 0, as ``clip-tags`` does
(tests/test_dataset_captioning.py); in the loop and in data-loading worker processes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from adapterhub.cli import main  # noqa: E402
from adapterhub.dataset import scan  # noqa: E402
from test_captioner_wd import DEMO, captions, kohya_set, kohya_tags, reference_scores, tagger  # noqa: E402,F401
from test_dataset_captioning import tiny_blip  # noqa: E402,F401 - the tiny BLIP fixture

BROKEN = {"3_style/garbage.png": "cannot identify image file",
          "3_style/half cat.jpg": "image file is truncated",
          "10_sks girl/empty.webp": "cannot identify image file"}


def add_broken_images(root: Path) -> dict:
    """A PNG of garbage, a JPEG cut off after a third, an empty file; returns the clean captions'
    files for comparison (``rel -> path``)."""
    clean = {i.rel: i.path for i in scan(root).items}
    (root / "3_style" / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png at all")
    data = (DEMO / "10_demo subject" / "cat.jpg").read_bytes()
    (root / "3_style" / "half cat.jpg").write_bytes(data[: len(data) // 3])
    (root / "10_sks girl" / "empty.webp").write_bytes(b"")
    return clean


def run(capsys, root: Path, *args) -> tuple[int, str, str]:
    rc = main(["dataset", "caption", str(root), "--mode", "overwrite", "--device", "cpu", "--batch-size", "2",
               *map(str, args)])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return rc, out, err


def assert_broken_listed(report: dict, root: Path) -> None:
    failed = {f["file"]: f["problem"] for f in report["failed"]}
    assert set(failed) == set(BROKEN)
    for rel, reason in BROKEN.items():
        assert reason in failed[rel], failed[rel]
        assert not (root / rel).with_suffix(".txt").exists()


@pytest.mark.parametrize("workers", [0, 2])  # in the loop; in worker processes
def test_wd_skips_and_lists_damaged_images(tagger, kohya_set, capsys, workers):
    d, w, b = tagger
    clean = add_broken_images(kohya_set)
    rc, out, _ = run(capsys, kohya_set, "--captioner", "wd", "--model", d, "--num-workers", workers, "--json")
    assert rc == 0
    report = json.loads(out)
    assert report["captioned"] == len(clean) == 6
    assert_broken_listed(report, kohya_set)
    got = captions(kohya_set)
    for rel, path in clean.items():
        assert got[rel] == ", ".join(kohya_tags(reference_scores(path, w, b)))


def test_the_summary_names_each_damaged_file_and_why(tagger, kohya_set, capsys):
    d, _, _ = tagger
    add_broken_images(kohya_set)
    rc, out, _ = run(capsys, kohya_set, "--captioner", "wd", "--model", d, "--num-workers", 0)
    assert rc == 0
    assert "not captioned" in out
    lines = out.splitlines()
    for rel, reason in BROKEN.items():
        row = [ln for ln in lines if rel in ln]
        assert row and reason in " ".join(lines[lines.index(row[0]):lines.index(row[0]) + 2]), out


@pytest.mark.parametrize("captioner", ["caption", "caption+wd"])
def test_sentence_captioners_skip_and_list_damaged_images(tagger, tiny_blip, kohya_set, capsys, captioner):
    d, _, _ = tagger
    clean = add_broken_images(kohya_set)
    rc, out, _ = run(capsys, kohya_set, "--captioner", captioner, "--model", tiny_blip, "--tagger", d,
                     "--max-length", 3, "--num-workers", 0, "--json")
    assert rc == 0
    report = json.loads(out)
    assert report["captioned"] == len(clean)
    assert_broken_listed(report, kohya_set)
    assert all(captions(kohya_set)[rel] for rel in clean)


def test_a_set_of_only_damaged_images_writes_nothing(tagger, tmp_path, capsys):
    d, _, _ = tagger
    root = tmp_path / "set"
    (root / "3_style").mkdir(parents=True)
    (root / "10_sks girl").mkdir()
    add_broken_images(root)
    rc, out, _ = run(capsys, root, "--captioner", "wd", "--model", d, "--num-workers", 0, "--json")
    assert rc == 0
    report = json.loads(out)
    assert report["captioned"] == 0
    assert_broken_listed(report, root)
    assert sorted(p.name for p in root.rglob("*") if p.is_file() and ".adapterhub" not in p.parts) == \
        ["empty.webp", "garbage.png", "half cat.jpg"]


def test_a_banner_image_is_tagged_without_a_giant_canvas(tmp_path):
    """A 1 x 20000 px strip (a 60 KB PNG) padded whole to its square needs a 20000² canvas (a 1.6 GB
    peak); the tagger reduces a side past 8192 px first, bounding the canvas for any file. Measured in
    a process of its own (about 40 MB before the image; about 220 MB with it)."""
    import subprocess
    import sys

    from PIL import Image

    strip = tmp_path / "strip.png"
    Image.new("RGB", (1, 20000), (200, 30, 30)).save(strip)
    # the peak of this process's own memory (VmHWM): getrusage's ru_maxrss keeps the forking parent's
    code = ("import re, sys; from PIL import Image; from adapterhub_plugins.captioners.wd import prepare_image\n"
            "x = prepare_image(Image.open(sys.argv[1]), 448)\n"
            "peak = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)\n"
            "print(x.shape, x.dtype, int(peak) // 1024)")
    out = subprocess.run([sys.executable, "-c", code, str(strip)], capture_output=True, text=True, check=True).stdout
    shape, dtype, peak_mib = out.rsplit(" ", 2)
    assert shape + " " + dtype == "(448, 448, 3) float32" and int(peak_mib) < 400, out
