"""``adapterhub train``: TOML config + flags, ``--print-config``, and bad input (one line, exit 2)."""
from __future__ import annotations

import json
import shutil

import pytest

from adapterhub.cli import main
from adapterhub.train.config import TrainConfig, build, load_toml, resolve, to_toml

from test_train import DEMO, make_dataset


def run(capsys, *args) -> tuple[int, str, str]:
    rc = main(["train", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(err: str) -> str:
    """The error is one line, the last one (a progress bar may stand above it)."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    return errors[0]


def test_config_file_flags_override_json_and_register(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ADAPTERHUB_CATALOG", str(tmp_path / "catalog.db"))
    data = make_dataset(tmp_path / "data", names=("cat", "rocket"))
    config = tmp_path / "run.toml"
    config.write_text("""
[run]
type = "lora"
base = "tiny-sd1"
dataset = "data"
out = "out/style.safetensors"
max-steps = 5
seed = 3
[network]
rank = 2
alpha = 2
[optimizer]
lr = 2e-4
[data]
resolution = 64
bucket_step = 32
""")
    rc, out, err = run(capsys, "--config", config, "--max-steps", 2, "--rank", 3, "--register", "--json")
    assert rc == 0, err
    result = json.loads(out)
    assert result["steps"] == 2 and result["seed"] == 3 and result["images"] == 2
    import adapterhub

    facts = adapterhub.inspect(tmp_path / "out" / "style.safetensors", with_hash=False)
    assert facts["ranks"] == [3]  # the flag beat the file
    assert facts["metadata"]["ss_learning_rate"] == "0.0002" and facts["metadata"]["ss_network_alpha"] == "2.0"
    assert result["catalog"]["new"] == 1
    from adapterhub.catalog import open_catalog, show

    with open_catalog(str(tmp_path / "catalog.db")) as catalog:
        assert show(catalog, "style")["type"] == "lora"
    assert data.is_dir()


def test_print_config_round_trips(tmp_path, capsys):
    rc, out, err = run(capsys, "--type", "loha", "--base", "tiny-sd1", "--dataset", tmp_path, "--out",
                       tmp_path / "x.safetensors", "--conv-rank", 2, "--no-shuffle-tags", "--print-config")
    assert rc == 0, err
    assert "[network]" in out and 'type = "loha"' in out and "conv_rank = 2" in out
    written = tmp_path / "printed.toml"
    written.write_text(out)
    assert build(load_toml(written)) == resolve(overrides={"type": "loha", "base": "tiny-sd1", "dataset": tmp_path,
                                                           "out": tmp_path / "x.safetensors", "conv_rank": 2})
    assert to_toml(TrainConfig()).count("[") >= 8


@pytest.mark.parametrize("args, message", [
    (["--type", "aesthetic_embedding"], "cannot train 'aesthetic_embedding': trainable types are adalora, controlnet, full, hypernetwork, locon, loha, lokr, lora, t2i_adapter, textual_inversion"),
    (["--type", "lora", "--max-steps", "3", "--epochs", "1"], "not both"),
    (["--type", "lora", "--rank", "0"], "--rank must be positive"),
])
def test_bad_options_one_line_exit_2(args, message, tmp_path, capsys):
    data = make_dataset(tmp_path / "d", names=("cat",))
    rc, _, err = run(capsys, "--base", "tiny-sd1", "--dataset", data, "--out", tmp_path / "o.safetensors", *args)
    assert rc == 2 and message in one_line_error(err)


def test_unknown_toml_key_and_missing_options(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text('[network]\nrnak = 4\n')
    rc, _, err = run(capsys, "--config", config)
    assert rc == 2 and "unknown option 'rnak' (did you mean 'rank'?)" in one_line_error(err)
    rc, _, err = run(capsys, "--type", "lora")
    assert rc == 2 and "missing options: --base, --dataset, --out" in one_line_error(err)


def test_empty_dataset_and_missing_captions(tmp_path, capsys):
    common = ["--type", "lora", "--base", "tiny-sd1", "--out", tmp_path / "o.safetensors"]
    (tmp_path / "empty").mkdir()
    rc, _, err = run(capsys, *common, "--dataset", tmp_path / "empty")
    assert rc == 2 and "empty dataset" in one_line_error(err)

    data = make_dataset(tmp_path / "d", names=("cat", "rocket"))
    (data / "5_demo subject" / "cat.txt").unlink()
    rc, _, err = run(capsys, *common, "--dataset", data)
    line = one_line_error(err)
    assert rc == 2 and "1 of 2 images have no caption (first: 5_demo subject/cat.jpg)" in line
    assert "--caption-default" in line

    from adapterhub.train.data import collect

    cfg = resolve(overrides={"type": "lora", "base": "tiny-sd1", "dataset": data, "out": tmp_path / "o.safetensors",
                             "caption_default": "a demo subject", "seed": 0})
    captions = {s.rel: s.caption for s in collect(cfg).samples}
    assert captions["5_demo subject/cat.jpg"] == "a demo subject"


def test_corrupt_images_are_skipped_and_reported(tmp_path, capsys):
    data = make_dataset(tmp_path / "d", names=("cat", "rocket"))
    sub = data / "5_demo subject"
    (sub / "garbage.png").write_bytes(b"not an image at all")
    (sub / "garbage.txt").write_text("garbage")
    shutil.copy(DEMO / "coffee.jpg", sub / "truncated.jpg")  # a valid header, then the data stops
    (sub / "truncated.jpg").write_bytes((DEMO / "coffee.jpg").read_bytes()[:3000])
    (sub / "truncated.txt").write_text("truncated")
    rc, out, err = run(capsys, "--type", "lora", "--base", "tiny-sd1", "--dataset", data, "--out",
                       tmp_path / "o.safetensors", "--resolution", 64, "--bucket-step", 32, "--max-steps", 1,
                       "--seed", 0, "--json")
    assert rc == 0, err
    result = json.loads(out)
    assert sorted(s["file"] for s in result["skipped"]) == ["5_demo subject/garbage.png",
                                                           "5_demo subject/truncated.jpg"]
    assert result["images"] == 2
    assert "skipped 5_demo subject/garbage.png" in err and "skipped 5_demo subject/truncated.jpg" in err

    for name in ("cat.jpg", "rocket.jpg"):
        (sub / name).write_bytes(b"\x00" * 10)
    rc, _, err = run(capsys, "--type", "lora", "--base", "tiny-sd1", "--dataset", data, "--out",
                     tmp_path / "o2.safetensors", "--resolution", 64, "--bucket-step", 32)
    assert rc == 2 and "no readable image" in one_line_error(err)
