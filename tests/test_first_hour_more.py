"""The first hour of a new user, part 2 (issue #17 items 4, 10, 12, 14): mistakes found early, searches
that find what the user typed, honest summaries. Every test goes through the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from adapterhub.cli import cli


def _invoke(args, **kw):
    return CliRunner().invoke(cli, [str(a) for a in args], **kw)


def _main(args, capsys) -> tuple[int, str, str]:
    """The console entry point (known errors: one line, exit 2): return code, stdout, stderr."""
    from adapterhub.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def _lora(path: Path, context: int, metadata: dict | None = None) -> Path:
    """A kohya LoRA on one UNet cross-attention to_k whose input width is ``context`` (768 = sd1,
    2048 = sdxl, 64 = tiny-sd1, 96 = tiny-sdxl): the width is what tells its base."""
    from safetensors.torch import save_file

    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    tensors = {f"{name}.lora_down.weight": torch.randn(2, context), f"{name}.lora_up.weight": torch.zeros(64, 2),
               f"{name}.alpha": torch.tensor(2.0)}
    save_file(tensors, str(path), metadata=metadata)
    return path


# --------------------------------------------------------------------------------------------
# item 4: a base/adapter mismatch is reported before the base is loaded
# --------------------------------------------------------------------------------------------
@pytest.fixture
def no_loading(monkeypatch):
    """Loading the base fails the test: the mismatch must be found from the files alone."""
    import adapterhub.base

    def refuse(*args, **kwargs):
        raise AssertionError("the base was loaded")

    monkeypatch.setattr(adapterhub.base, "load_base", refuse)


def _assert_one_line_mismatch(result, path: Path, adapter_arch: str, base_arch: str, out: Path):
    rc, stdout, stderr = result
    assert rc == 2, stdout + stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("reading")]
    assert len(lines) == 1, stderr
    assert str(path) in lines[0] and adapter_arch in lines[0] and base_arch in lines[0], lines[0]
    assert not out.exists()


def test_merge_sdxl_lora_into_a_preset_base_fails_before_loading(tmp_path, no_loading, capsys):
    lora = _lora(tmp_path / "sdxl_lora.safetensors", 2048)
    out = tmp_path / "merged"
    res = _main(["merge", "--base", "tiny-sd1", "--out", out, lora], capsys)
    _assert_one_line_mismatch(res, lora, "sdxl", "tiny-sd1", out)


def test_merge_mismatch_read_from_a_diffusers_folders_config(tmp_path, no_loading, capsys):
    folder = tmp_path / "my-model"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    (folder / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": 2048}))
    lora = _lora(tmp_path / "sd1_lora.safetensors", 768)
    out = tmp_path / "merged"
    res = _main(["merge", "--base", folder, "--out", out, lora], capsys)
    _assert_one_line_mismatch(res, lora, "sd1", "sdxl", out)


def test_merge_mismatch_read_from_a_checkpoints_header(tmp_path, no_loading, capsys):
    from safetensors.torch import save_file

    ckpt = tmp_path / "model.safetensors"
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    save_file({key: torch.zeros(320, 768)}, str(ckpt))
    lora = _lora(tmp_path / "sdxl_lora.safetensors", 2048)
    out = tmp_path / "merged.safetensors"
    res = _main(["merge", "--base", ckpt, "--out", out, lora], capsys)
    _assert_one_line_mismatch(res, lora, "sdxl", "sd1", out)


def test_merge_of_an_unknown_base_adapter_still_loads_the_base(tmp_path, no_loading, capsys):
    """An adapter whose base cannot be told is checked after loading, as before."""
    from safetensors.torch import save_file

    lora = tmp_path / "te_only.safetensors"
    name = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    save_file({f"{name}.lora_down.weight": torch.randn(2, 5), f"{name}.lora_up.weight": torch.zeros(7, 2)}, str(lora))
    with pytest.raises(AssertionError, match="the base was loaded"):
        _main(["merge", "--base", "tiny-sd1", "--out", tmp_path / "merged", lora], capsys)


def test_merge_of_a_matching_adapter_still_works(tmp_path):
    lora = _lora(tmp_path / "tiny.safetensors", 64)
    res = _invoke(["merge", "--base", "tiny-sd1", "--out", tmp_path / "merged", "--json", lora])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "merged" / "model_index.json").is_file()


# --------------------------------------------------------------------------------------------
# item 10: catalog search finds what is inside names; not-found offers candidates
# --------------------------------------------------------------------------------------------
NAMES = ("EasyNegative", "FastNegative", "ng_deepnegative_v1_75t", "negative_hand", "negative", "cute_style")


@pytest.fixture
def embeddings_catalog(tmp_path, capsys):
    """Textual-inversion embeddings (A1111 safetensors) named like the popular ones, scanned."""
    from safetensors.torch import save_file

    lib = tmp_path / "lib"
    lib.mkdir()
    for i, name in enumerate(NAMES):
        save_file({"emb_params": torch.full((1, 768), float(i))}, str(lib / f"{name}.safetensors"))
    db = tmp_path / "catalog.db"
    rc, _, err = _main(["catalog", "--catalog", db, "scan", lib, "--jobs", "1", "--json"], capsys)
    assert rc == 0, err
    return db


def _search(db, capsys, *words) -> list[str]:
    rc, out, err = _main(["catalog", "--catalog", db, "search", *words, "--json"], capsys)
    assert rc == 0, err
    return [entry["name"] for entry in json.loads(out)]


def test_search_matches_inside_names_ranked_exact_prefix_word_substring(embeddings_catalog, capsys):
    found = _search(embeddings_catalog, capsys, "negative")
    assert found == ["negative", "negative_hand", "EasyNegative", "FastNegative", "ng_deepnegative_v1_75t"]
    assert _search(embeddings_catalog, capsys, "deepneg") == ["ng_deepnegative_v1_75t"]
    assert _search(embeddings_catalog, capsys, "NEGATIVE", "hand") == ["negative_hand"]


def test_search_with_no_match_says_so(embeddings_catalog, capsys):
    rc, out, err = _main(["catalog", "--catalog", embeddings_catalog, "search", "zebra"], capsys)
    assert rc == 0
    assert "no entries match 'zebra'" in out + err
    assert _search(embeddings_catalog, capsys, "zebra") == []  # JSON stays a list


def test_not_found_offers_did_you_mean(embeddings_catalog, capsys):
    rc, out, err = _main(["catalog", "--catalog", embeddings_catalog, "tag", "fgjd_EasyNegative", "add", "neg"],
                         capsys)
    assert rc == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "not found" in lines[0] and "did you mean" in lines[0], err
    assert "EasyNegative" in lines[0].split("did you mean")[1]


def test_show_prints_times_as_dates(embeddings_catalog, capsys):
    import re

    rc, out, err = _main(["catalog", "--catalog", embeddings_catalog, "show", "EasyNegative"], capsys)
    assert rc == 0, err
    for field in ("added_at", "scanned_at", "mtime"):
        line = next(line for line in out.splitlines() if f" {field} " in line)
        assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", line), line
    assert not re.search(r"\b1\d{9}\.\d+", out)  # no epoch floats


def test_scan_table_never_truncates_paths_on_a_narrow_terminal(tmp_path, capsys, monkeypatch):
    from adapterhub.cli import output

    deep = tmp_path / "lib" / ("a_rather_long_folder_name_" * 4) / "more_folders_here"
    deep.mkdir(parents=True)
    bad = deep / "broken_adapter_with_a_long_name.safetensors"
    bad.write_bytes(b"not a safetensors file at all" * 3)
    monkeypatch.setattr(output, "_terminal_width", lambda: 60)
    rc, out, err = _main(["catalog", "--catalog", tmp_path / "c.db", "scan", tmp_path / "lib", "--jobs", "1"],
                         capsys)
    assert rc == 0, err
    assert any(str(bad) in line for line in out.splitlines()), out  # whole, on one line


# --------------------------------------------------------------------------------------------
# item 12: lora combine / resize --json report ranks as numbers
# --------------------------------------------------------------------------------------------
def test_algebra_json_reports_ranks_as_ints(tmp_path, capsys):
    a, b = _lora(tmp_path / "a.safetensors", 64), _lora(tmp_path / "b.safetensors", 64)
    rc, out, err = _main(["lora", "combine", a, f"{b}:0.5", "--out", tmp_path / "ab.safetensors", "--json"], capsys)
    assert rc == 0, err
    (module,) = json.loads(out)["per_module"]
    assert (module["old_rank"], module["old_ranks"], module["new_rank"]) == (4, [2, 2], 4)
    rc, out, err = _main(["lora", "resize", a, "--rank", "1", "--out", tmp_path / "r.safetensors", "--json"], capsys)
    assert rc == 0, err
    (module,) = json.loads(out)["per_module"]
    assert (module["old_rank"], module["old_ranks"], module["new_rank"]) == (2, [2], 1)
    rc, out, err = _main(["lora", "resize", a, "--rank", "1", "--out", tmp_path / "r2.safetensors"], capsys)
    assert rc == 0 and "2->1" in out, out  # the table still reads old->new


# --------------------------------------------------------------------------------------------
# item 14: train's flags, summary, timing and loss plot
# --------------------------------------------------------------------------------------------
def test_train_upscale_is_one_clean_flag_pair(capsys):
    rc, out, _ = _main(["train", "--help"], capsys)
    assert rc == 0 and "--upscale / --no-upscale" in out and "--no-no-upscale" not in out
    for flag, value in (("--no-upscale", "true"), ("--upscale", "false")):
        rc, out, err = _main(["train", "--print-config", flag], capsys)
        assert rc == 0, err
        assert f"no_upscale = {value}" in out


def test_train_help_documents_the_config_key_spelling(capsys):
    rc, out, _ = _main(["train", "--help"], capsys)
    text = " ".join(out.split())
    assert "--max-steps is max_steps" in text, text[:2000]


TRAIN = ["train", "--type", "lora", "--base", "tiny-sd1", "--resolution", "64", "--bucket-step", "32", "--rank", "2",
         "--seed", "0", "--max-steps", "5", "--save-every", "4", "--log-with", "none"]


@pytest.fixture
def quarter_epoch_run(tmp_path, capsys):
    """5 steps over 4 images x 5 repeats (20 steps an epoch): a quarter epoch, a checkpoint at step 4."""
    from test_train import make_dataset

    data = make_dataset(tmp_path / "data")
    out = tmp_path / "run" / "quarter.safetensors"
    rc, stdout, err = _main([*TRAIN, "--dataset", data, "--out", out], capsys)
    assert rc == 0, err[-2000:]
    return out, stdout


def test_train_summary_counts_fractional_epochs(quarter_epoch_run):
    _, stdout = quarter_epoch_run
    line = next(line for line in stdout.splitlines() if " epochs " in line)
    assert "0.25" in line, stdout


def test_loss_png_has_a_step_axis_and_an_ema_line(quarter_epoch_run):
    from PIL import Image

    from adapterhub.train import plot

    out, _ = quarter_epoch_run
    image = Image.open(out.with_name("quarter.loss.png")).convert("RGB")
    width, height = image.size
    below = [image.getpixel((x, y)) for x in range(plot.MARGIN, width - plot.MARGIN)
             for y in range(height - plot.MARGIN + 2, height)]
    assert sum(p != (255, 255, 255) for p in below) > 50, "no x axis (ticks, step labels) under the plot"
    pixels = list(image.getdata())
    ema = sum(p == plot.EMA_COLOUR for p in pixels)
    raw = sum(p == plot.RAW_COLOUR for p in pixels)
    assert ema > 100 and raw > 100, (ema, raw)  # two curves, both visible: the EMA does not hide the raw loss


def test_resumed_run_counts_training_time_only(quarter_epoch_run, capsys):
    out, _ = quarter_epoch_run
    state_dir = out.with_name("quarter-step000004-state")
    state = torch.load(state_dir / "state.pt", weights_only=False)
    state["started"] -= 3600  # the run began an hour ago: it sat idle between the two sessions
    torch.save(state, state_dir / "state.pt")
    rc, stdout, err = _main(["train", "--resume", state_dir, "--out", out.with_name("resumed.safetensors"), "--json"],
                            capsys)
    assert rc == 0, err[-2000:]
    result = json.loads(stdout)
    assert result["steps"] == 5 and 0 < result["seconds"] < 600, result["seconds"]


def test_autov1_of_small_files_is_shown_but_never_an_identifier(embeddings_catalog, capsys):
    """Files under 1 MiB all have the webui's AutoV1 e3b0c442 (the sha256 of no bytes)."""
    import hashlib

    empty = hashlib.sha256(b"").hexdigest()[:8]
    rc, out, err = _main(["catalog", "--catalog", embeddings_catalog, "show", "EasyNegative", "--json"], capsys)
    assert rc == 0 and json.loads(out)["autov1"] == empty  # shown, as the webui computes it
    rc, out, err = _main(["catalog", "--catalog", embeddings_catalog, "show", "EasyNegative"], capsys)
    assert "under 1 MiB" in next(line for line in out.splitlines() if " autov1 " in line)
    rc, out, err = _main(["catalog", "--catalog", embeddings_catalog, "show", empty], capsys)
    assert rc == 2 and "ambiguous" not in err and "under 1 MiB" in err, err
    assert len(err.strip().splitlines()) == 1


def test_caption_of_a_fully_captioned_folder_says_nothing_to_do(tmp_path, capsys):
    from test_train import make_dataset

    folder = make_dataset(tmp_path / "data", names=("cat", "coffee"), folder="1_x") / "1_x"
    before = {p.name: p.read_text() for p in folder.glob("*.txt")}
    for args in ([], ["--json"]):
        rc, out, err = _main(["dataset", "caption", folder, *args], capsys)
        assert rc == 0, err
        assert "nothing to do" in err and "2 already captioned" in err and "--mode overwrite" in err, err
    assert {p.name: p.read_text() for p in folder.glob("*.txt")} == before
    assert json.loads(out)["skipped"] == 2  # the JSON on stdout stays clean
