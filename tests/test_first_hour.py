"""The first hour of a new user (issue #17): what a webui user expects to just work.

* a textual-inversion name written in the prompt or negative loads the embedding from ``--adapter-dir``
  (the webui's embeddings folder), matched as the webui matches it (token sequences: any case, whole words);
  diffusers' ``load_textual_inversion`` is the oracle for the prompt embeddings;
* progress lines when stderr is not a terminal; offline hub loading fails fast; narrow tables keep names and
  paths whole; X/Y sampler x schedule grids with DDIM/UniPC; the demo says why its picture is noise.
"""
from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from click.testing import CliRunner

from adapterhub.cli import cli


def _invoke(args, **kw):
    return CliRunner().invoke(cli, args, catch_exceptions=False, **kw)


# --------------------------------------------------------------------------------------------
# 1. textual-inversion names in the prompt load the embedding from --adapter-dir
# --------------------------------------------------------------------------------------------
@pytest.fixture
def embeddings(tmp_path, tiny_sd1, tiny_sdxl):
    """A webui-style embeddings folder: EasyNegative (2 vectors), an unused one, an SDXL one that does not fit
    the SD1 base, and a LoRA-ish file name that is no embedding."""
    from adapterhub.plugins import adapter_types

    ti = adapter_types()["textual_inversion"]
    folder = tmp_path / "embeddings"
    folder.mkdir()
    ti.example(tiny_sd1, folder / "EasyNegative.safetensors", seed=3)
    ti.example(tiny_sd1, folder / "unused_style.pt", seed=4)
    (folder / "xl").mkdir()
    ti.example(tiny_sdxl, folder / "xl" / "bigneg.safetensors", seed=5)
    return folder


def _sample(tmp_path, folder, prompt, negative, *extra):
    out = tmp_path / "out"
    res = _invoke(["sample", "--base", "tiny-sd1", "--prompt", prompt, "--negative", negative, "--steps", "1",
                   "--size", "64x64", "--seed", "1", "--sampler", "Euler", "--adapter-dir", str(folder), "--out",
                   str(out), "--json", *extra])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_embedding_named_in_negative_is_loaded_and_hashed(tmp_path, embeddings):
    from adapterhub.sample import infotext

    summary = _sample(tmp_path, embeddings, "a cat", "(easynegative:1.2), bigneg, blurry")
    fields = infotext.parse(summary["parameters"])
    digest = infotext.embedding_hash(embeddings / "EasyNegative.safetensors")
    assert infotext.parse_hashes(fields["TI hashes"]) == {"EasyNegative": digest}
    assert any("bigneg" in w and "does not fit" in w for w in summary["warnings"]), summary["warnings"]


def test_embedding_words_match_whole_names_only(tmp_path, embeddings):
    summary = _sample(tmp_path, embeddings, "a cat, unused", "EasyNegativeV2, easy negative")
    assert "TI hashes" not in summary["parameters"]


def test_prompt_embeddings_equal_diffusers_load_textual_inversion(tiny_sd1, embeddings):
    """The negative's conditioning with the embedding found by name equals diffusers' encoding of the same text
    after ``load_textual_inversion`` of the file (a plain prompt: the webui and diffusers encode it alike)."""
    from adapterhub.sample.generator import Generator, Request

    gen = Generator(copy.deepcopy(tiny_sd1), adapter_dirs=[embeddings])
    stack, prompt = gen.apply_stack(Request("a cat", negative="blurry, EasyNegative"))
    ours = gen.prompts(prompt, "blurry, EasyNegative", 1).uncond.conds[0].embeds

    ref = copy.deepcopy(tiny_sd1)
    # diffusers compares lower-cased tokens with the token's spelling: load it under the spelling it looks for
    ref.load_textual_inversion(str(embeddings / "EasyNegative.safetensors"), token="easynegative")
    with torch.no_grad():
        _, theirs = ref.encode_prompt("a cat", "cpu", 1, True, negative_prompt="blurry, easynegative")
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    plain = Generator(copy.deepcopy(tiny_sd1)).prompts("a cat", "blurry, EasyNegative", 1).uncond.conds[0].embeds
    assert not torch.allclose(plain, theirs, atol=1e-3)  # the embedding changed the conditioning


# --------------------------------------------------------------------------------------------
# 3. progress lines when stderr is not a terminal
# --------------------------------------------------------------------------------------------
def test_sampling_prints_progress_lines_when_stderr_is_not_a_terminal(tmp_path):
    res = CliRunner().invoke(cli, ["sample", "--base", "tiny-sd1", "--prompt", "a cat", "--steps", "3", "--size",
                                   "64x64", "--seed", "1", "--sampler", "Euler", "--out", str(tmp_path / "o")],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    lines = [line for line in res.stderr.splitlines() if line.startswith("sampling")]
    assert lines and re.match(r"sampling: 3/3 \(100%\), \d+(\.\d+)? s", lines[-1]), res.stderr


def test_plain_progress_is_rate_limited_and_ends_with_the_last(monkeypatch, capsys):
    from adapterhub.cli import output

    clock = iter([0.0, 0.0, 0.5, 1.0, 6.0, 6.5, 7.0, 7.0])
    monkeypatch.setattr(output, "_now", lambda: next(clock))
    with output.progress("scanning", total=5) as advance:
        for _ in range(5):
            advance()
    lines = capsys.readouterr().err.splitlines()
    # nothing in the first 2 s (a quick command or an early error stays quiet), the step at 6 s, and the end
    assert [line.split(",")[0] for line in lines] == ["scanning: 4/5 (80%)", "scanning: 5/5 (100%)"], lines
    clock = iter([0.0, 2.5, 3.0, 7.6, 7.7, 7.7])
    monkeypatch.setattr(output, "_now", lambda: next(clock))
    with output.progress("scanning", total=5) as advance:
        for _ in range(4):
            advance()
    lines = capsys.readouterr().err.splitlines()
    # the first step after 2 s, nothing within 5 s of it, the step at 7.6 s, the last one reached at the end
    assert [line.split(",")[0] for line in lines] == ["scanning: 1/5 (20%)", "scanning: 3/5 (60%)",
                                                     "scanning: 4/5 (80%)"], lines


# --------------------------------------------------------------------------------------------
# 5. offline, a hub id that is not cached fails at once with a line that says what to do
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"},
                                 {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}],  # nothing listens
                         ids=["HF_HUB_OFFLINE", "unreachable-endpoint"])
def test_uncached_hub_id_offline_fails_fast_with_one_line(tmp_path, monkeypatch, capsys, env):
    import time

    import diffusers  # noqa: F401 - imported before the clock starts: only the loading is timed

    from adapterhub.cli import main

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for proxy in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)  # the endpoint itself is probed, not a proxy the machine has
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    start = time.perf_counter()
    rc = main(["sample", "--base", "someone/uncached-model", "--prompt", "a cat", "--out", str(tmp_path / "o")])
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "someone/uncached-model" in err[0] and "not in the local Hugging Face cache" in err[0]
    assert "local diffusers folder" in err[0] and "local_files_only" not in err[0], err[0]
    assert seconds < 5, seconds  # was 19 s (refused) to 80 s (no route), with the hub's warnings printed twice
    assert not (tmp_path / "o").exists()


def test_cached_hub_id_loads_offline_without_the_network(tmp_path, monkeypatch, tiny_sd1):
    import shutil

    from adapterhub.base import load_base, tiny_base_folder

    repo = tmp_path / "hf" / "models--someone--tiny"
    shutil.copytree(tiny_base_folder("tiny-sd1"), repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # not told it is offline: the cache must still come first
    pipe = load_base("someone/tiny")
    assert torch.equal(pipe.unet.conv_in.weight, tiny_sd1.unet.conv_in.weight)


# --------------------------------------------------------------------------------------------
# 6. narrow or piped output keeps names and paths whole
# --------------------------------------------------------------------------------------------
@pytest.fixture
def long_named_lora(tmp_path, tiny_sd1):
    from adapterhub.plugins import adapter_types

    folder = tmp_path / "a_rather_deep_folder_of_adapters" / "for_one_project_that_has_long_names"
    folder.mkdir(parents=True)
    return adapter_types()["lora"].example(tiny_sd1, folder / "my_character_style_v2_final_final.safetensors")


@pytest.mark.parametrize("width", [None, 60, 100], ids=["piped", "narrow-terminal-60", "terminal-100"])
def test_plugins_and_inspect_keep_names_paths_and_hashes_whole(monkeypatch, long_named_lora, width):
    from adapterhub.cli import output
    from adapterhub.cli.plugins import plugin_rows
    from adapterhub.api import sha256_file

    monkeypatch.setattr(output, "_terminal_width", lambda: width, raising=False)
    shown = _invoke(["plugins"]).stdout
    lines = shown.splitlines()
    header = [line for line in lines if line.startswith("┃")]
    for row in plugin_rows():
        assert any(row["name"] in line for line in lines), (row["name"], shown)
        if width is None or not header:  # piped (not wrapped), or the list layout: each description on one line
            assert any(row["description"] in line for line in lines), (row["description"], shown)
    if header and width:  # a table on a terminal: it fits, and the folded description is no column of single words
        assert max(len(line) for line in lines) <= width, shown
        assert len(header[0].split("┃")[-2]) >= 16, shown
    else:
        assert width != 100, shown  # 100 columns are enough for a table
    shown = _invoke(["inspect", str(long_named_lora)]).stdout
    assert str(long_named_lora) in shown and sha256_file(long_named_lora) in shown, shown


# --------------------------------------------------------------------------------------------
# 13. X/Y: a sampler x schedule grid with timestep samplers (DDIM, UniPC) on the axis
# --------------------------------------------------------------------------------------------
def test_xy_sampler_by_schedule_runs_timestep_samplers_on_their_own_schedule(tmp_path):
    import numpy as np
    from PIL import Image

    from adapterhub.sample import infotext

    res = _invoke(["sample", "--base", "tiny-sd1", "--prompt", "a cat", "--steps", "2", "--size", "64x64", "--seed",
                   "3", "--x", "sampler=Euler,DDIM,UniPC", "--y", "schedule=Automatic,Karras", "--out",
                   str(tmp_path / "o"), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    cells = {(c["values"]["sampler"], c["values"]["schedule"]): c for c in summary["cells"]}
    assert len(cells) == 6
    for name in ("DDIM", "UniPC"):
        own, asked = cells[(name, "Automatic")], cells[(name, "Karras")]
        assert np.array_equal(np.asarray(Image.open(own["path"])), np.asarray(Image.open(asked["path"])))
        assert infotext.parse(asked["parameters"]).get("Schedule type", "Automatic") == "Automatic"
    assert infotext.parse(cells[("Euler", "Karras")]["parameters"])["Schedule type"] == "Karras"
    notes = [w for w in summary["warnings"] if "own schedule" in w]
    assert len(notes) == 1 and "DDIM" in notes[0] and "UniPC" in notes[0] and "Karras" in notes[0], summary["warnings"]


# --------------------------------------------------------------------------------------------
# 9. the demo says why its picture is noise, and draws what a person can read: per-block delta norms
# --------------------------------------------------------------------------------------------
def test_inspect_plot_draws_block_norms_equal_to_diffusers_fused_deltas(tmp_path):
    from PIL import Image

    from adapterhub.blocks import block_of
    from adapterhub.plugins import adapter_types
    from lora_helpers import diffusers_fused, parts, snapshot

    path = adapter_types()["lora"].example(parts("tiny-sd1"), tmp_path / "style.safetensors", seed=2)
    chart = tmp_path / "style-blocks.png"
    res = _invoke(["inspect", str(path), "--plot", str(chart), "--json", "--no-hash"])
    assert res.exit_code == 0, res.output
    ours = json.loads(res.stdout)["block_norms"]

    before, after = snapshot(parts("tiny-sd1")), diffusers_fused("tiny-sd1", [(path, 1.0)])
    squares: dict[str, float] = {}
    for key in before:
        module = key.rsplit(".", 1)[0]
        slot = "BASE" if key.startswith("text_encoder") else block_of(module) or "other"
        squares[slot] = squares.get(slot, 0.0) + float(((after[key] - before[key]).double() ** 2).sum())
    theirs = {slot: s ** 0.5 for slot, s in squares.items() if s > 0}
    assert ours.keys() == theirs.keys()
    for slot in theirs:
        assert ours[slot] == pytest.approx(theirs[slot], rel=1e-4), slot
    with Image.open(chart) as image:
        assert image.format == "PNG" and image.width >= 400 and len(image.getcolors(1 << 16) or []) > 3


def test_inspect_plot_of_an_embedding_is_one_line_exit_2(tmp_path, capsys):
    from adapterhub.cli import main
    from adapterhub.plugins import adapter_types
    from lora_helpers import parts

    path = adapter_types()["textual_inversion"].example(parts("tiny-sd1"), tmp_path / "emb.safetensors")
    rc = main(["inspect", str(path), "--plot", str(tmp_path / "c.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "emb.safetensors" in err[0] and "no weight deltas" in err[0], err
    assert not (tmp_path / "c.png").exists()


def test_demo_says_its_image_is_noise_and_draws_the_block_chart(tmp_path):
    from PIL import Image

    res = _invoke(["demo", "--out", str(tmp_path / "demo"), "--catalog", str(tmp_path / "c.db")])
    assert res.exit_code == 0, res.output
    assert "random weights" in res.stdout and "noise" in res.stdout, res.stdout
    chart = tmp_path / "demo" / "blocks.png"
    assert str(chart) in res.stdout
    with Image.open(chart) as image:
        assert image.format == "PNG" and image.height > 100


def test_sample_on_a_tiny_base_says_its_images_are_noise(tmp_path):
    args = ["sample", "--base", "tiny-sd1", "--prompt", "a cat", "--steps", "1", "--size", "64x64", "--seed", "1"]
    res = _invoke([*args, "--out", str(tmp_path / "o")])
    assert res.exit_code == 0 and "random weights" in res.stderr and "noise" in res.stderr, res.stderr
    res = _invoke([*args, "--x", "cfg=3,7", "--out", str(tmp_path / "p")])
    assert res.exit_code == 0 and "random weights" in res.stderr, res.stderr


def test_xy_sampler_axis_with_a_fixed_schedule_plans_ddim_on_its_own():
    from adapterhub.sample.generator import Request
    from adapterhub.sample.xy import plan_plot

    plot = plan_plot(Request("a cat", schedule="Karras", seed=1), x="sampler=Euler,DDIM")
    assert [c.request.schedule for c in plot.cells] == ["Karras", "Automatic"]
    assert len(plot.notes) == 1 and "DDIM" in plot.notes[0] and "Karras" in plot.notes[0]
