"""The command line as scripts use it: inspect --json, merge to a folder or a single file, demo, errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adapterhub.base import load_base
from adapterhub.plugins import adapter_type

from conftest import WILD_ADAPTERS as WILD  # noqa: E402
CLI = [sys.executable, "-m", "adapterhub"]


def run(*args, check=False):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, check=check)


@pytest.fixture(scope="module")
def sd1_lora(tmp_path_factory, tiny_sd1):
    folder = tmp_path_factory.mktemp("adapters")
    return adapter_type("lora").example(tiny_sd1, folder / "style.safetensors", seed=5)


@pytest.fixture(scope="module")
def sdxl_lora(tmp_path_factory, tiny_sdxl):
    folder = tmp_path_factory.mktemp("adapters_xl")
    return adapter_type("lora").example(tiny_sdxl, folder / "xl.safetensors", seed=6)


def test_inspect_json_has_the_documented_fields(sd1_lora):
    out = run("inspect", sd1_lora, "--json", check=True)
    data = json.loads(out.stdout)
    for field in ("type", "format", "base", "rank", "alpha", "targets", "metadata", "sha256"):
        assert field in data
    assert (data["type"], data["format"], data["base"]) == ("lora", "kohya", "tiny-sd1")
    import hashlib

    assert data["sha256"] == hashlib.sha256(Path(sd1_lora).read_bytes()).hexdigest()
    assert data["metadata"]["ss_network_module"] == "networks.lora"


def test_inspect_table_for_people(sd1_lora):
    out = run("inspect", sd1_lora, check=True)
    assert "kohya" in out.stdout and "tiny-sd1" in out.stdout


@pytest.mark.parametrize("name, problem", [
    ("srikanth_sdxl_attnproc_TRUNCATED.safetensors", "truncated"),
    ("monsy101_peftconfig_PICKLE_REFUSED.bin", "refused"),
    ("fgjd_EasyNegative_v7620.pt", "corrupt"),
])
def test_inspect_bad_files_one_line_exit_2(name, problem):
    path = WILD / name
    if not path.exists():
        pytest.skip("wild adapters not available")
    out = run("inspect", path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and name in lines[0] and problem in lines[0]


def _unet_equal(a, b):
    sa, sb = a.unet.state_dict(), b.unet.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def test_merge_to_a_diffusers_folder_equals_the_api_merge(tmp_path, sd1_lora, fresh_sd1):
    out = tmp_path / "merged"
    res = run("merge", "--base", "tiny-sd1", "--out", out, f"{sd1_lora}:0.7", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["adapters"][0]["weight"] == 0.7
    import adapterhub

    adapterhub.load(sd1_lora).merge_into(fresh_sd1, 0.7)
    merged = load_base(str(out))
    assert _unet_equal(merged, fresh_sd1)
    te_a, te_b = merged.text_encoder.state_dict(), fresh_sd1.text_encoder.state_dict()
    assert all(torch.equal(te_a[k], te_b[k]) for k in te_a)


def test_merge_to_a_single_file_with_dtype(tmp_path, sd1_lora, fresh_sd1):
    out = tmp_path / "merged.safetensors"
    res = run("merge", "--base", "tiny-sd1", "--out", out, "--dtype", "fp16", sd1_lora)
    assert res.returncode == 0, res.stderr
    import adapterhub

    adapterhub.load(sd1_lora).merge_into(fresh_sd1, 1.0)
    merged = load_base(str(out))
    for k, v in merged.unet.state_dict().items():
        expected = fresh_sd1.unet.state_dict()[k].to(torch.float16)
        assert torch.equal(v.to(torch.float16), expected), k
    assert not list(tmp_path.glob(".*"))  # no temp files left


def test_merge_sdxl_lora_on_sd1_base_refused_nothing_written(tmp_path, sd1_lora, sdxl_lora):
    out = tmp_path / "merged.safetensors"
    res = run("merge", "--base", "tiny-sd1", "--out", out, sd1_lora, sdxl_lora)
    assert res.returncode == 2
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1
    line = errors[0]
    assert "xl.safetensors" in line and "tiny-sdxl" in line and "(key lora_" in line
    assert not out.exists() and not list(tmp_path.iterdir())


def test_merge_missing_file_and_bad_weight(tmp_path, sd1_lora):
    res = run("merge", "--base", "tiny-sd1", "--out", tmp_path / "o", tmp_path / "nope.safetensors")
    assert res.returncode == 2 and "nope.safetensors" in res.stderr
    res = run("merge", "--base", "tiny-sd1", "--out", tmp_path / "o", f"{sd1_lora}:0.x5")
    assert res.returncode == 2 and "not a number" in res.stderr
    assert not (tmp_path / "o").exists()


def test_demo_runs_offline(tmp_path):
    res = run("demo", "--out", tmp_path / "demo", "--catalog", tmp_path / "catalog.db", "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(res.stdout)
    assert {a["type"] for a in data["adapters"]} >= {"lora", "locon", "loha", "adalora", "textual_inversion",
                                                    "hypernetwork"}
    listed = json.loads(run("catalog", "--catalog", tmp_path / "catalog.db", "list", "--json", check=True).stdout)
    assert {e["type"] for e in listed} >= {"lora", "locon", "loha", "adalora"}
    # every command that takes an adapter file takes a catalog name too
    import os

    env = dict(os.environ, ADAPTERHUB_CATALOG=str(tmp_path / "catalog.db"))
    by_name = subprocess.run(CLI + ["inspect", "demo_loha", "--json"], capture_output=True, text=True, env=env)
    assert by_name.returncode == 0, by_name.stderr
    assert json.loads(by_name.stdout)["type"] == "loha"
    unknown = subprocess.run(CLI + ["inspect", "no_such_adapter"], capture_output=True, text=True, env=env)
    assert unknown.returncode == 2 and "no_such_adapter" in unknown.stderr
    from PIL import Image

    image = Image.open(data["image"])
    assert image.size[0] == 3 * image.size[1] - 60  # three 256 px panels under a 20 px caption strip


def test_textual_inversion_merges_into_a_folder_not_a_single_file(tmp_path, tiny_sd1):
    ti = adapter_type("textual_inversion").example(tiny_sd1, tmp_path / "zzqtoken.safetensors", seed=1)
    res = run("merge", "--base", "tiny-sd1", "--out", tmp_path / "m.safetensors", ti)
    assert res.returncode == 2 and "single-file" in res.stderr and "zzqtoken.safetensors" in res.stderr
    assert not (tmp_path / "m.safetensors").exists()
    res = run("merge", "--base", "tiny-sd1", "--out", tmp_path / "m", ti)
    assert res.returncode == 0, res.stderr
    merged = load_base(str(tmp_path / "m"))
    assert merged.tokenizer.convert_tokens_to_ids("zzqtoken") >= 49408
