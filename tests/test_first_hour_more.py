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
