"""Writes that fail: ``merge``, ``convert`` and ``train`` on a full disk, into a read-only folder, or onto a
folder in the way; and ``train --resume`` from a damaged checkpoint.

Each is one line naming the path and the problem, exit code 2, no traceback, and nothing half-written
(an older output is kept as it was). A full disk is simulated: every write into one folder raises
``OSError(ENOSPC)`` after writing a few bytes, as a real full disk does, while other folders stay
writable. Tests run as root, which ignores permission bits; the read-only cases rely on the folder's
mode bits counting (as they do for a read-only catalog), so they hold for root and everyone else.
"""
from __future__ import annotations

import builtins
import errno
import io
import json
import os
from pathlib import Path

import pytest
import torch

from adapterhub.cli import main
from adapterhub.plugins import adapter_type


def run(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    """The error is one line, the last one (a progress bar or progress lines may stand above it)."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    return errors[0]


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _inside(path, folder: Path) -> bool:
    try:
        return Path(os.fsdecode(path)).resolve().is_relative_to(folder.resolve())
    except (TypeError, ValueError):
        return False


@pytest.fixture
def full_disk(monkeypatch):
    """``full_disk(folder)``: from now on writes under ``folder`` fail with ENOSPC after a few bytes."""
    import safetensors.torch

    folders: list[Path] = []

    def full(path) -> bool:
        return any(_inside(path, f) for f in folders)

    def enospc(path):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fsdecode(path))

    real_open, real_save_file, real_torch_save = builtins.open, safetensors.torch.save_file, torch.save

    def fake_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+") and full(file):
            with real_open(file, mode, *args, **kwargs) as f:  # a few bytes land, then the disk is full
                f.write(b"\0" * 8 if "b" in mode else " " * 8)
            raise enospc(file)
        return real_open(file, mode, *args, **kwargs)

    def fake_save_file(tensors, filename, *args, **kwargs):
        if full(filename):
            Path(filename).write_bytes(b"\0" * 8) if not Path(filename).is_dir() else None
            raise enospc(filename)
        return real_save_file(tensors, filename, *args, **kwargs)

    def fake_torch_save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and full(f):
            raise enospc(f)
        return real_torch_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(safetensors.torch, "save_file", fake_save_file)
    monkeypatch.setattr(torch, "save", fake_torch_save)
    return folders.append


@pytest.fixture
def read_only(tmp_path):
    """``read_only(folder)``: chmod 0555 for the test (restored after, so tmp_path can be cleaned)."""
    made = []

    def make(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, 0o555)
        made.append(folder)
        return folder

    yield make
    for folder in made:
        os.chmod(folder, 0o755)


@pytest.fixture(scope="module")
def lora(tmp_path_factory, tiny_sd1):
    return adapter_type("lora").example(tiny_sd1, tmp_path_factory.mktemp("adapters") / "style.safetensors", seed=5)


# ------------------------------------------------------------------------------------------------
# merge
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["merged.safetensors", "merged"])
def test_merge_on_a_full_disk_keeps_the_old_output(name, lora, full_disk, tmp_path, capsys):
    folder = tmp_path / "out"
    out = folder / name
    if out.suffix:
        out.parent.mkdir(parents=True)
        out.write_bytes(b"the previous merge")
    full_disk(folder)
    before = listing(folder) if folder.exists() else []
    code, _, err = run(capsys, "merge", "--base", "tiny-sd1", "--out", out, lora, "--json")
    assert code == 2
    line = one_line(err)
    assert str(out) in line and "No space left on device" in line, line
    assert (listing(folder) if folder.exists() else []) == before  # no temp file, no partial folder
    if out.suffix:
        assert out.read_bytes() == b"the previous merge"


def test_merge_into_a_read_only_folder(lora, read_only, tmp_path, capsys):
    folder = read_only(tmp_path / "ro")
    code, _, err = run(capsys, "merge", "--base", "tiny-sd1", "--out", folder / "merged.safetensors", lora, "--json")
    assert code == 2
    line = one_line(err)
    assert str(folder) in line and "read-only" in line, line
    assert listing(folder) == []


def test_merge_onto_a_folder_in_the_way(lora, tmp_path, capsys):
    """A single-file output named like an existing folder, and a diffusers output over a folder that holds
    no diffusers model: refused, the folder kept."""
    odd = tmp_path / "merged.safetensors"
    (odd / "keep.txt").parent.mkdir()
    (odd / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "merge", "--base", "tiny-sd1", "--out", odd, lora, "--json")
    assert code == 2 and str(odd) in one_line(err) and "is a folder" in err, err
    assert listing(tmp_path) == ["merged.safetensors", "merged.safetensors/keep.txt"]

    photos = tmp_path / "photos"
    (photos / "cat.jpg").parent.mkdir()
    (photos / "cat.jpg").write_bytes(b"jpeg")
    code, _, err = run(capsys, "merge", "--base", "tiny-sd1", "--out", photos, lora, "--json")
    assert code == 2 and str(photos) in one_line(err) and "not a diffusers model" in err, err
    assert (photos / "cat.jpg").read_bytes() == b"jpeg" and listing(photos) == ["cat.jpg"]


def test_merge_replaces_an_earlier_diffusers_output(lora, tmp_path, capsys):
    """The refusal above spares a folder of the user's; a folder an earlier merge wrote is still replaced."""
    out = tmp_path / "merged"
    assert run(capsys, "merge", "--base", "tiny-sd1", "--out", out, lora, "--json")[0] == 0
    (out / "stale.txt").write_text("old")
    code, _, err = run(capsys, "merge", "--base", "tiny-sd1", "--out", out, lora, "--json")
    assert code == 0, err
    assert (out / "model_index.json").is_file() and not (out / "stale.txt").exists()


# ------------------------------------------------------------------------------------------------
# convert
# ------------------------------------------------------------------------------------------------
def test_convert_on_a_full_disk_keeps_the_old_output(lora, full_disk, tmp_path, capsys):
    folder = tmp_path / "out"
    folder.mkdir()
    out = folder / "webui.safetensors"
    out.write_bytes(b"the previous conversion")
    full_disk(folder)
    code, _, err = run(capsys, "convert", lora, "--to", "a1111", "--out", out, "--force")
    assert code == 2
    line = one_line(err)
    assert str(out) in line and "No space left on device" in line, line
    assert listing(folder) == ["webui.safetensors"] and out.read_bytes() == b"the previous conversion"


def test_convert_into_a_read_only_folder(lora, read_only, tmp_path, capsys):
    folder = read_only(tmp_path / "ro")
    for to, name in (("a1111", "webui.safetensors"), ("peft", "peft")):
        code, _, err = run(capsys, "convert", lora, "--to", to, "--out", folder / name)
        assert code == 2
        line = one_line(err)
        assert str(folder) in line and "read-only" in line, line
    assert listing(folder) == []


def test_convert_onto_a_folder_in_the_way(lora, tmp_path, capsys):
    """A file layout onto an existing folder: refused even with --force (it would delete the folder)."""
    odd = tmp_path / "webui.safetensors"
    odd.mkdir()
    (odd / "keep.txt").write_text("mine")
    for force in ((), ("--force",)):
        code, _, err = run(capsys, "convert", lora, "--to", "a1111", "--out", odd, *force)
        assert code == 2 and str(odd) in one_line(err), err
    assert listing(odd) == ["keep.txt"]


# ------------------------------------------------------------------------------------------------
# train
# ------------------------------------------------------------------------------------------------
TINY = ["--type", "lora", "--base", "tiny-sd1", "--resolution", "64", "--bucket-step", "32", "--rank", "2",
        "--seed", "0", "--batch-size", "1"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from test_train import make_dataset

    return make_dataset(tmp_path_factory.mktemp("data"), names=("cat", "rocket"))


@pytest.fixture(scope="module")
def checkpoint(dataset, tmp_path_factory):
    """A run of 2 steps that kept a resumable checkpoint at step 1 (``run-step000001-state``)."""
    from adapterhub.train import TrainConfig, train

    out = tmp_path_factory.mktemp("run") / "run.safetensors"
    train(TrainConfig(type="lora", base="tiny-sd1", dataset=dataset, out=out, resolution=64, bucket_step=32, rank=2,
                      seed=0, batch_size=1, max_steps=2, save_every=1))
    state = out.with_name("run-step000001-state")
    assert state.is_dir()
    return state


def _damage(state: Path, how: str) -> Path:
    import shutil

    from safetensors.torch import load_file, save_file

    if how == "truncated trainable.safetensors":
        data = (state / "trainable.safetensors").read_bytes()
        (state / "trainable.safetensors").write_bytes(data[: len(data) - 100])
        return state / "trainable.safetensors"
    if how == "truncated state.pt":
        data = (state / "state.pt").read_bytes()
        (state / "state.pt").write_bytes(data[: len(data) // 2])
        return state / "state.pt"
    if how == "state.pt of something else":
        torch.save({"step": 1, "weights": torch.zeros(3)}, str(state / "state.pt"))
        return state / "state.pt"
    if how == "trainable.safetensors of another adapter":
        tensors = load_file(str(state / "trainable.safetensors"))
        save_file({k: v[..., :1].contiguous() for k, v in tensors.items()}, str(state / "trainable.safetensors"))
        return state / "trainable.safetensors"
    if how == "trainable.safetensors missing a tensor":
        tensors = load_file(str(state / "trainable.safetensors"))
        tensors.pop(sorted(tensors)[0])
        save_file(tensors, str(state / "trainable.safetensors"))
        return state / "trainable.safetensors"
    if how == "truncated config.json":
        text = (state / "config.json").read_text()
        (state / "config.json").write_text(text[: len(text) // 2])
        return state / "config.json"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated trainable.safetensors", "truncated state.pt", "state.pt of something else",
                                 "trainable.safetensors of another adapter", "trainable.safetensors missing a tensor",
                                 "truncated config.json"])
def test_resume_from_a_damaged_checkpoint(how, checkpoint, tmp_path, capsys):
    import shutil

    state = shutil.copytree(checkpoint, tmp_path / checkpoint.name)
    damaged = _damage(state, how)
    out = tmp_path / "resumed" / "run.safetensors"
    code, _, err = run(capsys, "train", "--resume", state, "--out", out)
    assert code == 2
    line = one_line(err)
    assert str(damaged) in line or (str(state) in line and damaged.name in line), line
    assert not out.parent.exists() or listing(out.parent) == []


@pytest.mark.parametrize("where", ["read-only folder", "a file in the path", "a folder in the way"])
def test_train_refuses_an_unwritable_output_before_the_first_step(where, dataset, read_only, tmp_path, capsys):
    from adapterhub.errors import AdapterhubError
    from adapterhub.train import TrainConfig, train

    if where == "read-only folder":
        folder = read_only(tmp_path / "ro")
        out, named, problem = folder / "a.safetensors", folder, "read-only"
    elif where == "a file in the path":
        (tmp_path / "notes.txt").write_text("a file, not a folder")
        out, named, problem = tmp_path / "notes.txt" / "runs" / "a.safetensors", tmp_path / "notes.txt", "not a folder"
    else:  # found only at the final save, after the whole run, until checked up front
        out = named = tmp_path / "a.safetensors"
        (out / "keep.txt").parent.mkdir()
        (out / "keep.txt").write_text("mine")
        problem = "is a folder"
    code, _, err = run(capsys, "train", *TINY, "--dataset", dataset, "--out", out, "--max-steps", "2")
    assert code == 2
    line = one_line(err)
    assert str(named) in line and problem in line, line
    events = []
    with pytest.raises(AdapterhubError):
        train(TrainConfig(type="lora", base="tiny-sd1", dataset=dataset, out=out, resolution=64, bucket_step=32,
                          seed=0, max_steps=2), on_event=lambda kind, **data: events.append(kind))
    assert events == []  # refused before loading the base, let alone training


@pytest.mark.parametrize("when", ["checkpoint", "final save"])
def test_train_on_a_full_disk_keeps_the_state_elsewhere_and_resumes(when, dataset, full_disk, monkeypatch,
                                                                    tmp_path, capsys):
    monkeypatch.setenv("ADAPTERHUB_CACHE", str(tmp_path / "cache"))  # the fallback folder lives here
    folder = tmp_path / "out"
    out = folder / "run.safetensors"
    full_disk(folder)
    # no TensorBoard log: its first write (before step 1) would meet the full disk before anything is trained
    steps = ["--max-steps", "3", "--log-with", "none"] + (["--save-every", "1"] if when == "checkpoint" else [])
    code, _, err = run(capsys, "train", *TINY, "--dataset", dataset, "--out", out, *steps)
    assert code == 2
    line = one_line(err)
    assert str(folder) in line and "No space left on device" in line, line
    step = 1 if when == "checkpoint" else 3
    rescued = sorted((tmp_path / "cache" / "rescued").glob(f"*/run-step{step:06d}-state"))
    assert len(rescued) == 1 and f"--resume '{rescued[0]}'" in line, (line, rescued)
    assert rescued[0].with_name(f"run-step{step:06d}.safetensors").is_file()  # the adapter as it was, too
    assert [p for p in (listing(folder) if folder.exists() else []) if not p.startswith("run-step")] == [], \
        listing(folder)  # nothing half-written beside the output

    elsewhere = tmp_path / "elsewhere" / "run.safetensors"
    code, out_text, err = run(capsys, "train", "--resume", rescued[0], "--out", elsewhere, "--json")
    assert code == 0, err
    assert json.loads(out_text)["steps"] == 3
    from safetensors.torch import load_file

    assert any(t.abs().max() > 0 for k, t in load_file(str(elsewhere)).items() if "lora_up" in k)


@pytest.mark.parametrize("also_full", ["cache", "cache and temp"])
def test_train_rescue_falls_back_to_the_temp_folder_then_says_it_kept_nothing(also_full, dataset, full_disk,
                                                                              monkeypatch, tmp_path, capsys):
    import tempfile

    monkeypatch.setenv("ADAPTERHUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    out = tmp_path / "out" / "run.safetensors"
    for folder in [out.parent, tmp_path / "cache" / "rescued"] + ([tmp_path / "tmp"] if also_full == "cache and temp" else []):
        full_disk(folder)
    code, _, err = run(capsys, "train", *TINY, "--dataset", dataset, "--out", out, "--max-steps", "2",
                       "--log-with", "none")
    assert code == 2
    line = one_line(err)
    assert str(out) in line and "No space left on device" in line, line
    kept = sorted((tmp_path / "tmp" / "adapterhub-rescued").glob("*/run-step000002-state"))
    if also_full == "cache":
        assert len(kept) == 1 and f"kept in {kept[0]}" in line, line
    else:
        assert kept == [] and "could not be kept either" in line and str(tmp_path / "cache" / "rescued") in line, line
