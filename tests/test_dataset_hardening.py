"""Dataset prep that never loses an edit: one writer at a time per folder, killed runs cleaned up,
symlinked captions undone exactly, and one bucketing rule for ``bucket``, ``prepare`` and ``train``."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from PIL import Image

from adapterhub.cli import main

DEMO = Path(__file__).resolve().parents[1] / "datasets" / "demo"
PY = sys.executable


def snapshot(root: Path) -> dict:
    """Every path under ``root`` outside the state folder: file bytes, or ("link", target)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if ".adapterhub" in p.relative_to(root).parts:
            continue
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p))
        elif p.is_file():
            out[rel] = p.read_bytes()
    return out


def one_line_error(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def cli(*args) -> subprocess.Popen:
    return subprocess.Popen([PY, "-m", "adapterhub", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def captioned(root: Path, n: int) -> Path:
    """``n`` captions (tag edits never decode the images, so empty image files do)."""
    sub = root / "1_x"
    sub.mkdir(parents=True)
    for i in range(n):
        (sub / f"img{i:03d}.png").write_bytes(b"")
        (sub / f"img{i:03d}.txt").write_bytes(f"tag{i}, common\r\n".encode())
    return root


@pytest.fixture
def many(tmp_path) -> Path:
    """Enough captions (120) that two edits started together overlap: unlocked, edits are lost
    (in 3 of 3 trials at 120, and 4 of 4 at 60, with the code before the lock)."""
    return captioned(tmp_path / "many", 120)


@pytest.fixture
def few(tmp_path) -> Path:
    return captioned(tmp_path / "few", 12)


@pytest.fixture
def demo(tmp_path) -> Path:
    dst = tmp_path / "demo"
    shutil.copytree(DEMO, dst)
    return dst


# ---------------------------------------------------------------------------------------------
# issue 16 item 2: concurrent writers serialise


def test_concurrent_tag_edits_keep_both_and_undo_exactly(many):
    """Two real processes started together: the second waits for the lock, then edits the result."""
    before = snapshot(many)
    runs = [cli("dataset", "tags", many, "add", tag, "--json") for tag in ("alpha", "beta")]
    for proc in runs:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
    captions = [p.read_text() for p in sorted(many.rglob("*.txt"))]
    assert len(captions) == 120
    assert [c for c in captions if "alpha" not in c or "beta" not in c] == []
    ops = [op["op"] for op in _journal(many)]
    assert ops == ["tags add", "tags add"]
    for _ in runs:
        assert main(["dataset", "undo", str(many), "--json"]) == 0
    assert snapshot(many) == before


def _journal(root: Path) -> list[dict]:
    from adapterhub.dataset.journal import operations

    return [op.summary() for op in operations(root)]


def _hold(root: Path, op: str, shared: bool) -> subprocess.Popen:
    """A real process holding the folder's lock until killed."""
    holder = subprocess.Popen([PY, "-c", textwrap.dedent(f"""
        import time
        from adapterhub.dataset.lock import dataset_lock
        with dataset_lock({str(root)!r}, {op!r}, shared={shared}):
            print("held", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_lock_holder_makes_a_second_writer_stop_with_one_line(few, monkeypatch, capsys):
    from adapterhub.dataset import lock as lock_mod

    monkeypatch.setattr(lock_mod, "WAIT_S", 0.5)
    holder = _hold(few, "tags add", shared=False)
    try:
        before = snapshot(few)
        for args in (["tags", str(few), "add", "x"], ["undo", str(few)],
                     ["validate", str(few), "--fix"]):
            capsys.readouterr()
            assert main(["dataset", *args]) == 2
            line = one_line_error(capsys.readouterr().err)
            assert str(few) in line and "another adapterhub process" in line and "tags add" in line
        assert snapshot(few) == before
        # a preview writes nothing and needs no lock
        assert main(["dataset", "tags", str(few), "add", "x", "--dry-run", "--json"]) == 0
    finally:
        holder.kill()
        holder.wait()
    # the lock dies with its holder: the next writer goes ahead at once
    assert main(["dataset", "tags", str(few), "add", "x", "--json"]) == 0


def test_captioning_shards_share_the_lock_and_exclude_other_writers(few, monkeypatch, capsys):
    from adapterhub.dataset import lock as lock_mod
    from adapterhub.dataset.lock import dataset_lock
    from adapterhub.errors import AdapterhubError

    monkeypatch.setattr(lock_mod, "WAIT_S", 0.5)
    shard = _hold(few, "caption clip-tags", shared=True)
    try:
        with dataset_lock(few, "caption clip-tags", shared=True):  # the other shard of the launch
            pass
        with pytest.raises(AdapterhubError, match="caption clip-tags"):
            with dataset_lock(few, "tags add"):
                pass
    finally:
        shard.kill()
        shard.wait()
    editor = _hold(few, "tags add", shared=False)
    try:  # and a captioning run waits for (here: stops at) an edit in progress
        assert main(["dataset", "caption", str(few), "--device", "cpu"]) == 2
        assert "another adapterhub process" in one_line_error(capsys.readouterr().err)
    finally:
        editor.kill()
        editor.wait()


def test_a_folder_whose_state_cannot_be_written_is_one_line(few, capsys):
    (few / ".adapterhub").write_bytes(b"not a folder")  # (as root, a read-only folder would not stop us)
    before = snapshot(few)
    assert main(["dataset", "tags", str(few), "add", "x"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert str(few) in line and ".adapterhub" in line
    assert snapshot(few) == before


@pytest.mark.skipif(os.name == "nt", reason="SIGKILL is POSIX")
def test_killed_edit_leaves_temp_files_that_the_next_run_cleans(few):
    """A real SIGKILL halfway through writing caption 5 (its temp file written, not yet renamed)."""
    before = snapshot(few)
    killer = textwrap.dedent(f"""
        import os, signal
        from adapterhub.dataset import folder
        from adapterhub.cli import main
        real, calls = folder.os.fsync, []
        def fsync(fd):
            real(fd)
            calls.append(fd)
            if len(calls) == 10:  # journal line + temp file per caption: the 5th caption's temp file
                os.kill(os.getpid(), signal.SIGKILL)
        folder.os.fsync = fsync
        main(["dataset", "tags", {str(few)!r}, "add", "killed"])
        """)
    proc = subprocess.run([PY, "-c", killer], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    leftovers = [p for p in (few / "1_x").iterdir() if p.name.startswith(".")]
    assert leftovers, "the kill should have left a temp file behind"
    # the next run cleans them and works; undo then restores everything exactly
    assert main(["dataset", "tags", str(few), "add", "after", "--json"]) == 0
    assert [p for p in (few / "1_x").iterdir() if p.name.startswith(".")] == []
    assert main(["dataset", "undo", str(few), "--json"]) == 0
    assert main(["dataset", "undo", str(few), "--json"]) == 0
    assert snapshot(few) == before


def test_a_plan_made_stale_by_another_writer_is_refused_whole(few):
    """``plan`` then ``apply`` (a preview, then confirm): another edit in between must not be lost."""
    from adapterhub.dataset import TagEditConfig
    from adapterhub.dataset.tags import apply, plan
    from adapterhub.errors import AdapterhubError

    cfg = TagEditConfig(dir=few, action="add", values=("mine",))
    changes = plan(cfg)
    assert main(["dataset", "tags", str(few), "add", "theirs", "--json"]) == 0
    after_theirs = snapshot(few)
    with pytest.raises(AdapterhubError, match="changed since the edit was planned"):
        apply(cfg, changes)
    assert snapshot(few) == after_theirs


# ---------------------------------------------------------------------------------------------
# issue 16 item 7 (part): symlinked captions


@pytest.mark.skipif(os.name == "nt", reason="symlinks need privileges on Windows")
def test_undo_restores_a_symlinked_caption_exactly(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "cat.txt").write_bytes(b"cat, shared caption\n")
    root = tmp_path / "set"
    root.mkdir()
    (root / "cat.png").write_bytes(b"")
    (root / "cat.txt").symlink_to(Path("..", "shared", "cat.txt"))
    (root / "dog.png").write_bytes(b"")
    (root / "dog.txt").write_bytes(b"dog\n")
    before, shared_before = snapshot(root), snapshot(shared)

    assert main(["dataset", "tags", str(root), "add", "new", "--json"]) == 0
    assert (root / "cat.txt").read_text() == "cat, shared caption, new\n"
    assert snapshot(shared) == shared_before  # the edit stays in this dataset
    assert main(["dataset", "undo", str(root), "--json"]) == 0
    assert snapshot(root) == before  # the link itself is back, same target
    assert snapshot(shared) == shared_before


@pytest.mark.skipif(os.name == "nt", reason="symlinks need privileges on Windows")
def test_undo_of_a_fix_restores_a_symlinked_image_exactly(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    Image.new("RGBA", (300, 300), (255, 0, 0, 128)).save(shared / "red.png")
    root = tmp_path / "set"
    root.mkdir()
    (root / "red.png").symlink_to(shared / "red.png")  # an absolute link this time
    (root / "red.txt").write_bytes(b"red\n")
    before, shared_before = snapshot(root), snapshot(shared)
    main(["dataset", "validate", str(root), "--fix", "--json"])
    assert not (root / "red.png").is_symlink()
    with Image.open(root / "red.png") as im:
        assert im.mode == "RGB"
    assert snapshot(shared) == shared_before
    assert main(["dataset", "undo", str(root), "--json"]) == 0
    assert snapshot(root) == before and snapshot(shared) == shared_before


# ---------------------------------------------------------------------------------------------
# issue 16 item 5: prepare validates its flags and writes atomically


def test_prepare_very_wide_image_is_skipped_not_a_crash(demo, tmp_path, capsys):
    # at 512² its bucket height rounds to 0 (kohya divides by it)
    Image.new("RGB", (8000, 100), "blue").save(demo / "10_demo subject" / "banner.png")
    out = tmp_path / "out"
    assert main(["dataset", "prepare", str(demo), "--out", str(out), "--no-upscale", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["written"] == 8
    assert [s["file"] for s in r["skipped"]] == ["10_demo subject/banner.png"]
    assert "smaller than one step" in r["skipped"][0]["problem"]
    assert main(["dataset", "bucket", str(demo), "--no-upscale", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [u["file"] for u in report["unreadable"]] == ["10_demo subject/banner.png"]


def test_prepare_demo_at_resolution_64(demo, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["dataset", "prepare", str(demo), "--out", str(out), "--resolution", "64", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["written"] == 8 and r["buckets"] == ["64x64"]


@pytest.mark.parametrize("flags, problem", [
    (["--step", "0"], "step"),
    (["--quality", "0"], "quality"),
    (["--min", "512", "--max", "256"], "min"),
    (["--resolution", "2048", "--max", "1024"], "resolution"),
])
def test_prepare_rejects_bad_flags_before_writing(demo, tmp_path, capsys, flags, problem):
    out = tmp_path / "out"
    assert main(["dataset", "prepare", str(demo), "--out", str(out), *flags]) == 2
    assert problem in one_line_error(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == [demo]


def test_prepare_failure_leaves_nothing(demo, tmp_path, capsys, monkeypatch):
    from adapterhub.dataset import prepare as prepare_mod

    real, calls = prepare_mod._save, []

    def failing(im, path, fmt, quality):
        calls.append(path)
        if len(calls) == 4:
            raise OSError(28, "No space left on device")
        real(im, path, fmt, quality)
    monkeypatch.setattr(prepare_mod, "_save", failing)
    out = tmp_path / "out"
    assert main(["dataset", "prepare", str(demo), "--out", str(out)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "No space left on device" in line
    assert list(tmp_path.iterdir()) == [demo]  # no output folder, no staging folder
    # an existing output folder (--overwrite) is left as it was
    out.mkdir()
    (out / "keep.txt").write_text("x")
    calls.clear()
    assert main(["dataset", "prepare", str(demo), "--out", str(out), "--overwrite"]) == 2
    assert snapshot(out) == {"keep.txt": b"x"} and sorted(tmp_path.iterdir()) == [demo, out]


@pytest.mark.skipif(os.name == "nt", reason="SIGKILL and the liveness check are POSIX")
def test_killed_prepare_leaves_no_output_and_the_next_run_removes_its_staging(demo, tmp_path):
    out = tmp_path / "out"
    killer = textwrap.dedent(f"""
        import os, signal
        from adapterhub.dataset import prepare
        from adapterhub.cli import main
        real, calls = prepare._save, []
        def save(*args):
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            real(*args)
        prepare._save = save
        main(["dataset", "prepare", {str(demo)!r}, "--out", {str(out)!r}])
        """)
    proc = subprocess.run([PY, "-c", killer], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")], "a staging folder is left"
    assert main(["dataset", "prepare", str(demo), "--out", str(out), "--json"]) == 0
    assert sorted(tmp_path.iterdir()) == [demo, out]


# ---------------------------------------------------------------------------------------------
# issue 17 item 11: one bucketing rule


def _train_buckets(data: Path, tmp_path: Path, resolution: int, step: int, no_upscale: bool) -> dict:
    from adapterhub.train import resolve
    from adapterhub.train.data import collect

    cfg = resolve(overrides={"type": "lora", "base": "tiny-sd1", "dataset": data, "out": tmp_path / "o.safetensors",
                             "resolution": resolution, "bucket_step": step, "no_upscale": no_upscale})
    return {s.rel: list(s.bucket) for s in collect(cfg).samples}


@pytest.mark.parametrize("resolution, step, no_upscale", [(64, 32, False), (64, 32, True), (512, 64, False),
                                                          (128, 64, True)])
def test_bucket_prepare_and_train_assign_the_same_buckets(demo, tmp_path, capsys, resolution, step, no_upscale):
    flags = ["--resolution", str(resolution), "--step", str(step)] + (["--no-upscale"] if no_upscale else [])
    assert main(["dataset", "bucket", str(demo), *flags, "--json"]) == 0
    bucket = {i["file"]: i["bucket"] for i in json.loads(capsys.readouterr().out)["images"]}
    out = tmp_path / "out"
    assert main(["dataset", "prepare", str(demo), "--out", str(out), *flags, "--json"]) == 0
    prepared = {r["source"]: r["bucket"] for r in json.loads((out / "buckets.json").read_text())}
    for rel, (w, h) in prepared.items():
        with Image.open(out / Path(rel)) as im:
            assert im.size == (w, h)
    train = _train_buckets(demo, tmp_path, resolution, step, no_upscale)
    assert len(train) == 8 and bucket == prepared == train


def test_bucket_sides_default_from_the_resolution_as_train_does():
    from adapterhub.dataset.buckets import bucket_sides
    from adapterhub.train.data import bucket_sides as train_sides
    from adapterhub.train import resolve

    for resolution, step in ((64, 32), (512, 64), (768, 64), (1024, 128)):
        cfg = resolve(overrides={"type": "lora", "base": "tiny-sd1", "dataset": ".", "out": "o.safetensors",
                                 "resolution": resolution, "bucket_step": step})
        assert bucket_sides(resolution, step) == train_sides(cfg)
    assert bucket_sides(512, 64) == (256, 1024)  # kohya's defaults at 512
    assert bucket_sides(512, 64, 128, 2048) == (128, 2048)
