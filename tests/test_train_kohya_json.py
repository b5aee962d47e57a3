"""``adapterhub train --dataset meta.json``: kohya's fine-tuning metadata as the training set.

The reference is kohya sd-scripts' ``FineTuningDataset`` (library/train_util.py), its steps written
out below: an entry's image is its key when that path exists, else the key plus an image extension
in ``--train_data_dir`` (``glob_images``); its caption is ``caption``, then ``", "`` and ``tags``
when both are there and the tags are not empty, ``tags`` alone when there is no caption.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from adapterhub.train.config import resolve
from adapterhub.train.data import collect

from test_train import DEMO
from test_train_cli import one_line_error, run

SMALL = ["--type", "lora", "--base", "tiny-sd1", "--resolution", 64, "--bucket-step", 32, "--max-steps", 2,
         "--seed", 0, "--rank", 2, "--alpha", 2, "--lr", 1e-2]


def kohya_caption(entry: dict) -> str:
    """FineTuningDataset's caption for one metadata entry."""
    caption, tags = entry.get("caption"), entry.get("tags")
    if caption is None:
        caption = tags
    elif tags is not None and len(tags) > 0:
        caption = caption + ", " + tags
    return caption if caption is not None else ""


def images_only(folder: Path, names=("cat", "rocket")) -> Path:
    folder.mkdir(parents=True)
    for name in names:
        shutil.copy(DEMO / f"{name}.jpg", folder / f"{name}.jpg")
    return folder


def cfg_for(dataset: Path, tmp_path: Path, **kw):
    return resolve(overrides={"type": "lora", "base": "tiny-sd1", "dataset": dataset, "out": tmp_path / "o.safetensors",
                              "resolution": 64, "bucket_step": 32, "seed": 0, **kw})


def test_training_on_metadata_equals_training_on_the_sidecars(tmp_path, capsys):
    """The same images and captions as a metadata JSON (no sidecars beside the images) and as a folder
    of ``.txt`` sidecars train to the same tensors."""
    sidecars = images_only(tmp_path / "sidecars")
    meta = {}
    for name in ("cat", "rocket"):
        text = (DEMO / f"{name}.txt").read_text(encoding="utf-8").strip()
        (sidecars / f"{name}.txt").write_text(text, encoding="utf-8")
        meta[name] = {"tags": text}  # as merge_dd_tags_to_metadata.py writes the tagger's .txt files
    (tmp_path / "meta_cap_dd.json").write_text(json.dumps(meta), encoding="utf-8")
    images = images_only(tmp_path / "train_data")

    rc, _, err = run(capsys, *SMALL, "--dataset", sidecars, "--out", tmp_path / "a.safetensors")
    assert rc == 0, err
    rc, out, err = run(capsys, *SMALL, "--dataset", tmp_path / "meta_cap_dd.json", "--train-data-dir", images,
                       "--out", tmp_path / "b.safetensors", "--json")
    assert rc == 0, err
    assert json.loads(out)["images"] == 2
    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)

    from safetensors import safe_open

    with safe_open(tmp_path / "b.safetensors", "pt") as f:
        dirs = json.loads(f.metadata()["ss_dataset_dirs"])
    assert dirs == {"meta_cap_dd.json": {"n_repeats": 1, "img_count": 2}}  # kohya keys a metadata subset so


def test_images_and_captions_are_found_as_kohya_finds_them(tmp_path):
    images = images_only(tmp_path / "train", names=("cat", "rocket"))
    (images / "sub").mkdir()
    shutil.copy(DEMO / "coffee.jpg", images / "sub" / "coffee.png")  # the extension kohya's glob tries
    elsewhere = images_only(tmp_path / "elsewhere", names=("retina",))
    meta = {"cat": {"caption": "a photo of a cat", "tags": "cat, solo"},  # stem + glob
            "rocket.jpg": {"caption": "a rocket", "tags": ""},  # the key names the file
            "sub/coffee": {"tags": "cup, table"},  # a relative path without extension
            str(elsewhere / "retina.jpg"): {"caption": "an eye", "train_resolution": [64, 64]}}  # absolute
    path = tmp_path / "meta_lat.json"
    path.write_text(json.dumps(meta), encoding="utf-8")
    data = collect(cfg_for(path, tmp_path, train_data_dir=images))
    got = {s.path: s.caption for s in data.samples}
    assert got == {images / "cat.jpg": kohya_caption(meta["cat"]),
                   images / "rocket.jpg": kohya_caption(meta["rocket.jpg"]),
                   images / "sub" / "coffee.png": kohya_caption(meta["sub/coffee"]),
                   elsewhere / "retina.jpg": kohya_caption(meta[str(elsewhere / "retina.jpg")])}
    assert [s.repeats for s in data.samples] == [1] * 4 and {s.folder for s in data.samples} == {"meta_lat.json"}
    assert [s.rel for s in data.samples][:3] == ["cat.jpg", "rocket.jpg", "sub/coffee.png"]


def test_the_images_default_to_the_json_folder_and_repeats_come_from_the_source(tmp_path):
    images = images_only(tmp_path / "set")
    path = images / "meta.json"
    path.write_text(json.dumps({"cat": {"tags": "cat"}, "rocket": {"caption": "rocket"}}), encoding="utf-8")
    data = collect(cfg_for(None, tmp_path, datasets=({"dir": path, "repeats": 3},)))
    assert sorted(s.path.name for s in data.samples) == ["cat.jpg", "rocket.jpg"]
    assert {s.repeats for s in data.samples} == {3}


def test_an_entry_without_caption_or_tags_needs_a_default(tmp_path, capsys):
    images = images_only(tmp_path / "set")
    path = images / "meta.json"
    path.write_text(json.dumps({"cat": {"tags": "cat"}, "rocket": {"train_resolution": [64, 64]}}), encoding="utf-8")
    rc, _, err = run(capsys, *SMALL, "--dataset", path, "--out", tmp_path / "o.safetensors")
    line = one_line_error(err)
    assert rc == 2 and str(path) in line and "1 of 2 entries have no caption or tags (first: 'rocket')" in line
    data = collect(cfg_for(path, tmp_path, caption_default="a thing"))
    assert {s.path.name: s.caption for s in data.samples} == {"cat.jpg": "cat", "rocket.jpg": "a thing"}


def _bad(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("name, text, message", [
    ("broken.json", '{"cat": {"tags": "cat"', "not readable kohya metadata (JSONDecodeError)"),
    ("list.json", '[["cat", "cat"]]', "not kohya metadata"),
    ("empty.json", "{}", "no entries"),
    ("number.json", '{"cat": {"caption": 3}}', "'cat': caption is not text"),
    ("missing.json", '{"cat": {"tags": "cat"}, "dog": {"tags": "dog"}, "owl": {}}',
     "2 of 3 entries have no image in {images} (first: 'dog')"),
    ("twice.json", '{"rocket": {"tags": "rocket"}}', "key 'rocket' matches 2 images"),
])
def test_bad_metadata_is_one_line_exit_2_and_nothing_trained(tmp_path, capsys, name, text, message):
    images = images_only(tmp_path / "images")
    shutil.copy(DEMO / "rocket.jpg", images / "rocket.png")
    path = _bad(tmp_path, name, text)
    out = tmp_path / "o.safetensors"
    rc, _, err = run(capsys, *SMALL, "--dataset", path, "--train-data-dir", images, "--out", out)
    line = one_line_error(err)
    assert rc == 2 and str(path) in line and message.format(images=images) in line, line
    assert "Traceback" not in err and not out.exists() and list(tmp_path.glob("o*")) == []


def test_a_missing_train_data_dir_is_one_line(tmp_path, capsys):
    path = _bad(tmp_path, "meta.json", '{"cat": {"tags": "cat"}}')
    rc, _, err = run(capsys, *SMALL, "--dataset", path, "--train-data-dir", tmp_path / "nowhere",
                     "--out", tmp_path / "o.safetensors")
    line = one_line_error(err)
    assert rc == 2 and f"{tmp_path / 'nowhere'}: no such folder (the images of {path})" in line


def test_a_config_file_names_the_json_and_the_images_relative_to_itself(tmp_path):
    images = images_only(tmp_path / "project" / "train_data")
    (tmp_path / "project" / "meta_cap.json").write_text(json.dumps({"cat": {"tags": "cat"}}), encoding="utf-8")
    config = tmp_path / "project" / "run.toml"
    config.write_text('[run]\ntype = "lora"\nbase = "tiny-sd1"\ndataset = "meta_cap.json"\nout = "o.safetensors"\n'
                      '[data]\ntrain_data_dir = "train_data"\nresolution = 64\nbucket_step = 32\n', encoding="utf-8")
    cfg = resolve(config)
    assert cfg.train_data_dir == images and cfg.dataset == tmp_path / "project" / "meta_cap.json"
    assert [s.path for s in collect(cfg).samples] == [images / "cat.jpg"]
