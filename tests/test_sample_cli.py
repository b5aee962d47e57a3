"""``adapterhub sample`` and ``adapterhub png-info`` through the real console entry point (in process)."""
from __future__ import annotations

import io
import json

import pytest

from adapterhub import cli
from adapterhub.sample import infotext

SMALL = ["--base", "tiny-sd1", "--size", "64x64", "--steps", "2", "--sampler", "Euler a"]


def run(capsys, *args):
    rc = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, tiny_sd1, tiny_sdxl):
    from adapterhub.plugins import adapter_type

    folder = tmp_path_factory.mktemp("cli_loras")
    adapter_type("lora").example(tiny_sd1, folder / "style.safetensors", seed=3)
    adapter_type("lora").example(tiny_sdxl, folder / "xl.safetensors", seed=3)
    return folder


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, lora_dir):
    """One run shared by the read-back tests: 3 images in batches of 2, a LoRA tag, a grid."""
    out = tmp_path_factory.mktemp("sampled")
    rc = cli.main(["sample", *SMALL, "--prompt", "a (castle:1.2) <lora:style:0.8>, dusk", "--negative", "fog, rain",
                   "--adapter-dir", str(lora_dir), "--seed", "5", "--batch", "2", "--images", "3", "--grid",
                   "--cfg", "6.5", "--out", str(out), "--json"])
    assert rc == 0
    return out


def test_sample_writes_images_with_infotext(sampled, lora_dir):
    names = sorted(p.name for p in sampled.glob("*.png"))
    assert names == ["00000-5.png", "00001-6.png", "00002-7.png", "grid-00000.png"]
    text = infotext.read_png(sampled / "00001-6.png")
    lines = text.splitlines()
    assert lines[0] == "a (castle:1.2) <lora:style:0.8>, dusk"
    assert lines[1] == "Negative prompt: fog, rain"
    fields = infotext.parse(text)
    assert (fields["Steps"], fields["Sampler"], fields["Schedule type"], fields["CFG scale"], fields["Seed"]) == \
        ("2", "Euler a", "Automatic", "6.5", "6")
    assert fields["Size"] == "64x64" and fields["Model"] == "tiny-sd1" and len(fields["Model hash"]) == 10
    assert fields["Lora hashes"] == f"style: {infotext.lora_hash(lora_dir / 'style.safetensors')}"
    keys = [k for k, _ in infotext.RE_PARAM.findall(lines[-1])]
    assert keys[0] == "Steps" and keys[-1] == "Version"
    assert keys == [k for k in infotext.KEY_ORDER if k in keys]
    from PIL import Image

    assert Image.open(sampled / "grid-00000.png").size == (128, 128)  # 3 images: 2 rows of 2


def test_png_info_prints_and_parses(sampled, capsys):
    rc, out, _ = run(capsys, "png-info", sampled / "00000-5.png")
    assert rc == 0 and out.rstrip("\n") == infotext.read_png(sampled / "00000-5.png")
    rc, out, _ = run(capsys, "png-info", sampled / "00000-5.png", "--json")
    data = json.loads(out)
    assert data["Seed"] == "5" and data["Prompt"].startswith("a (castle:1.2)")
    assert list(data["Lora hashes"]) == ["style"]


def test_sd_parsers_reads_our_images(sampled):
    sd_parsers = pytest.importorskip("sd_parsers")
    info = sd_parsers.ParserManager().parse(io.BytesIO((sampled / "00002-7.png").read_bytes()))
    sampler = info.samplers[0]
    assert info.generator.name == "AUTOMATIC1111"
    assert sampler.name == "Euler a"
    assert sampler.parameters == {"scheduler": "Automatic", "cfg_scale": "6.5", "seed": "7", "steps": "2"}
    assert sampler.model.name == "tiny-sd1"
    assert [p.value for p in info.prompts] == ["a (castle:1.2) <lora:style:0.8>, dusk"]
    assert [p.value for p in info.negative_prompts] == ["fog, rain"]


def test_from_png_reproduces_the_image(sampled, lora_dir, tmp_path, capsys):
    from PIL import Image

    # 00002-7 was alone in its batch (3 images in batches of 2), so a batch of one reproduces it exactly
    rc, out, err = run(capsys, "sample", "--base", "tiny-sd1", "--from-png", sampled / "00002-7.png",
                       "--adapter-dir", lora_dir, "--out", tmp_path, "--json")
    assert rc == 0, err
    made = json.loads(out)["images"]
    assert [r["seed"] for r in made] == [7]
    again = made[0]["path"]
    assert infotext.read_png(again) == infotext.read_png(sampled / "00002-7.png")
    assert list(Image.open(again).getdata()) == list(Image.open(sampled / "00002-7.png").getdata())


@pytest.mark.parametrize("extra, message", [
    (["--sampler", "Eulr"], "unknown sampler 'Eulr'; valid: DPM++ 2M"),
    (["--size", "100x64"], "multiples of 8"),
    (["--size", "big"], "WIDTHxHEIGHT"),
    (["--prompt", "a <lora:nosuchthing:0.8>"], "nosuchthing"),
    (["--prompt", "a <lora:style:heavy>"], "not a number"),
    (["--stack", "nosuchfile.safetensors:0.5"], "nosuchfile"),
    (["--schedule", "Karass"], "unknown schedule type"),
    (["--backend", "warp"], "unknown sampler backend 'warp'"),
    (["--prompt", "a <lora:xl:1>"], "xl.safetensors: "),  # found after the base loads; still nothing written
])
def test_bad_input_is_one_line_exit_2_nothing_written(capsys, tmp_path, lora_dir, extra, message):
    out = tmp_path / "never"
    args = [*SMALL, "--prompt", "a cat", "--adapter-dir", lora_dir, "--out", out, *extra]
    rc, stdout, err = run(capsys, "sample", *args)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert not out.exists()


def test_png_info_without_parameters(capsys, tmp_path):
    from PIL import Image

    path = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(path)
    rc, _, err = run(capsys, "png-info", path)
    assert rc == 2 and "no parameters" in err and err.count("\n") == 1


def test_control_flag_attaches_a_controlnet_with_its_image(tmp_path, tiny_sd1):
    import numpy as np
    from PIL import Image

    from adapterhub.conditioning import example_condition_image
    from adapterhub.plugins import adapter_type
    from adapterhub.sample.generator import Generator, Request
    from adapterhub.stack import Entry, Stack

    cn = adapter_type("controlnet").example(tiny_sd1, tmp_path / "cn", seed=1)
    edges = tmp_path / "edges.png"
    example_condition_image(tiny_sd1).resize((64, 64)).save(edges)
    plain, ctrl = tmp_path / "plain", tmp_path / "ctrl"
    assert cli.main(["sample", *SMALL, "--prompt", "a house", "--seed", "3", "--out", str(plain)]) == 0
    assert cli.main(["sample", *SMALL, "--prompt", "a house", "--seed", "3", "--control", f"{edges}:{cn}:0.9:0:1",
                     "--out", str(ctrl)]) == 0
    with_control = np.asarray(Image.open(ctrl / "00000-3.png"))
    assert not np.array_equal(np.asarray(Image.open(plain / "00000-3.png")), with_control)
    # the flag means exactly a stack entry whose attach options carry the image and the window
    entry = Entry(str(cn), te=0.9, options={"image": Image.open(edges).convert("RGB"), "start": 0.0, "end": 1.0})
    request = Request("a house", seed=3, width=64, height=64, steps=2, sampler="Euler a", stack=Stack([entry]))
    assert np.array_equal(np.asarray(Generator("tiny-sd1").generate(request).images[0]), with_control)


@pytest.mark.parametrize("spec", ["missing.png:cn:0.5", "{edges}:{cn}", "{edges}:{cn}:heavy"])
def test_bad_control_specs_fail_before_anything_is_written(tmp_path, tiny_sd1, capsys, spec):
    from adapterhub.conditioning import example_condition_image
    from adapterhub.plugins import adapter_type

    cn = adapter_type("controlnet").example(tiny_sd1, tmp_path / "cn", seed=1)
    edges = tmp_path / "edges.png"
    example_condition_image(tiny_sd1).save(edges)
    out = tmp_path / "out"
    rc = cli.main(["sample", *SMALL, "--prompt", "x", "--control", spec.format(edges=edges, cn=cn), "--out", str(out)])
    assert rc == 2 and "--control" in capsys.readouterr().err
    assert not out.exists()


def test_the_result_table_lists_the_grid(tmp_path, capsys):
    """#17 item 14: the contact sheet written by --grid is in the table of written files."""
    rc, out, err = run(capsys, "sample", *SMALL, "--prompt", "a house", "--images", "2", "--grid",
                       "--out", tmp_path)
    assert rc == 0, err
    assert str(tmp_path / "grid-00000.png") in out and (tmp_path / "grid-00000.png").is_file()
