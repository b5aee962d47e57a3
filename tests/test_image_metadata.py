"""Every image's metadata (issue #15, items 4-5): the webui's infotext in PNG text and in JPEG/WebP EXIF
``UserComment``, written by ``sample --format`` and read by ``png-info`` / ``--from-png``; webui images made
elsewhere re-run as the webui would (missing networks warned about, model upscalers replaced, old sampler
names, ``RNG`` GPU reproduced with NV); other generators' metadata parsed into the same fields or refused by
name.

Oracles: sd-parsers reads the webui's EXIF ``UserComment`` and the other generators' formats; the other
generators' metadata is synthesised here the way each writes it (ComfyUI ``SaveImage``: ``prompt`` and
``workflow`` text chunks, or EXIF Make/Model ``workflow:``/``prompt:`` in WebP; InvokeAI 3+:
``invokeai_metadata``; NovelAI: ``Software``/``Description``/``Source``/``Comment``; Fooocus: ``parameters``
JSON with its ``version`` and ``fooocus_scheme``; SwarmUI: ``parameters`` JSON with ``sui_image_params``).
SwarmUI is unknown to sd-parsers: its fields are checked against the values written.
"""
from __future__ import annotations

import json

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from adapterhub import cli
from adapterhub.sample import infotext

SMALL = ["--base", "tiny-sd1", "--size", "64x64", "--steps", "2", "--sampler", "Euler"]
USER_COMMENT, EXIF_IFD = 0x9286, 0x8769


def run(capsys, *args):
    rc = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def pixels(path) -> bytes:
    with Image.open(path) as image:
        return image.convert("RGB").tobytes()


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, tiny_sd1):
    from adapterhub.plugins import adapter_type

    folder = tmp_path_factory.mktemp("meta_loras")
    adapter_type("lora").example(tiny_sd1, folder / "style.safetensors", seed=3)
    return folder


# ---------------------------------------------------------------------------------------------
# JPEG / WebP: written as the webui writes them, read back, re-run
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt, prompt", [("jpg", "一只猫, a castle at dusk"), ("webp", "a castle, (dusk:1.2)")])
def test_jpeg_and_webp_infotext_round_trips(fmt, prompt, tmp_path, capsys):
    sd_parsers = pytest.importorskip("sd_parsers")
    rc, out, err = run(capsys, "sample", *SMALL, "--prompt", prompt, "--negative", "fog", "--seed", "5",
                       "--format", fmt, "--out", tmp_path / "a", "--json")
    assert rc == 0, err
    summary = json.loads(out)
    path, text = summary["images"][0]["path"], summary["parameters"]
    assert path.endswith(f"00000-5.{fmt}")
    with Image.open(path) as image:
        assert image.format == {"jpg": "JPEG", "webp": "WEBP"}[fmt]
        raw = image.getexif().get_ifd(EXIF_IFD)[USER_COMMENT]
    # piexif.helper.UserComment.dump(text, encoding="unicode"), as the webui's save_image_with_geninfo
    assert raw == b"UNICODE\0" + text.encode("utf-16-be")
    info = sd_parsers.ParserManager().parse(path)  # the oracle reads what we wrote
    assert info.generator.name == "AUTOMATIC1111"
    assert [p.value for p in info.prompts] == [prompt] and [p.value for p in info.negative_prompts] == ["fog"]
    assert info.samplers[0].name == "Euler" and info.samplers[0].parameters["seed"] == "5"
    rc, shown, _ = run(capsys, "png-info", path)
    assert rc == 0 and shown.rstrip("\n") == text
    rc, shown, _ = run(capsys, "png-info", path, "--json")
    assert json.loads(shown)["Prompt"] == prompt
    rc, out, err = run(capsys, "sample", "--base", "tiny-sd1", "--from-png", path, "--format", fmt,
                       "--out", tmp_path / "b", "--json")
    assert rc == 0, err
    again = json.loads(out)["images"][0]["path"]
    assert infotext.read_png(again) == text
    assert pixels(again) == pixels(path)


def test_a_text_too_long_for_jpeg_exif_is_one_line_and_nothing_is_written(tmp_path):
    from adapterhub.errors import AdapterhubError

    target = tmp_path / "long.jpg"
    text = "a castle, " * 3274  # 65,488 bytes as UTF-16: with the EXIF headers, over the 65,533 of a segment
    with pytest.raises(AdapterhubError, match="too long for a JPEG's EXIF.*--format png"):
        infotext.save_image(Image.new("RGB", (8, 8)), target, text, "jpg")
    assert not target.exists()
    infotext.save_image(Image.new("RGB", (8, 8)), tmp_path / "long.webp", text, "webp")  # WebP has no such limit
    assert infotext.read_png(tmp_path / "long.webp") == text


@pytest.mark.parametrize("raw, text", [
    (b"UNICODE\0" + "a cat, 猫: 1".encode("utf-16-be"), "a cat, 猫: 1"),  # piexif, the webui
    (b"UNICODE\0" + "a cat, 猫: 1".encode("utf-16-le"), "a cat, 猫: 1"),  # exiftool in a little-endian EXIF
    (b"UNICODE\0" + "a cat".encode("utf-16"), "a cat"),  # with a byte order mark
    (b"ASCII\0\0\0a cat\0", "a cat"),
    (b"\0" * 8 + "a cat, 猫".encode(), "a cat, 猫"),  # undefined code: UTF-8, as the webui falls back
    ("a cat", "a cat"),  # Pillow hands back text for some writers
])
def test_user_comment_codes(raw, text):
    assert infotext.read_user_comment(raw) == text


def test_format_is_checked_before_anything_is_written(tmp_path, capsys):
    rc, _, err = run(capsys, "sample", *SMALL, "--prompt", "a cat", "--format", "gif", "--out", tmp_path / "x")
    assert rc == 2 and "gif" in err and err.count("\n") == 1 and not (tmp_path / "x").exists()


def test_numbering_counts_every_format(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    Image.new("RGB", (8, 8)).save(out / "00003-1.jpg")
    rc, stdout, err = run(capsys, "sample", *SMALL, "--prompt", "a cat", "--seed", "9", "--format", "webp",
                          "--out", out, "--json")
    assert rc == 0, err
    assert json.loads(stdout)["images"][0]["path"].endswith("00004-9.webp")


# ---------------------------------------------------------------------------------------------
# a webui image made elsewhere
# ---------------------------------------------------------------------------------------------
WEBUI_TEXT = (
    "masterpiece, a castle at dusk <lora:add_detail:0.6> <lora:style:0.5>\n"
    "Negative prompt: easynegative, (worst quality:1.4)\n"
    "Steps: 2, Sampler: DPM++ SDE Karras, CFG scale: 7, Seed: 1234, Size: 64x64, Model hash: 6ce0161689, "
    "Model: v1-5-pruned-emaonly, Denoising strength: 0.5, Clip skip: 2, Hires upscale: 1.5, Hires steps: 1, "
    "Hires upscaler: 4x-UltraSharp, Lora hashes: \"add_detail: 7c6bad76eb54, style: 0123456789ab\", "
    "TI hashes: \"easynegative: c74b4e810b03\", Version: v1.6.0")


def test_webui_png_made_elsewhere_reruns_with_warnings(tmp_path, lora_dir, capsys):
    info = PngInfo()
    info.add_text("parameters", WEBUI_TEXT)
    source = tmp_path / "webui.png"
    Image.new("RGB", (64, 64), (90, 60, 30)).save(source, pnginfo=info)
    rc, out, err = run(capsys, "sample", "--base", "tiny-sd1", "--from-png", source, "--adapter-dir", lora_dir,
                       "--out", tmp_path / "again", "--json")
    assert rc == 0, err
    lines = err.splitlines()
    assert any("Lora 'add_detail'" in line for line in lines)  # the tag's label, as the webui names the kind
    assert any("easynegative" in line and "embedding" in line for line in lines)
    assert any("4x-UltraSharp" in line and "Lanczos" in line for line in lines)
    assert any("RNG" in line and "NV" in line and "GPU" in line for line in lines)
    assert any("v1-5-pruned-emaonly [6ce0161689]" in line and "tiny-sd1" in line for line in lines)
    summary = json.loads(out)
    fields = infotext.parse(summary["parameters"])
    assert fields["Prompt"] == "masterpiece, a castle at dusk <lora:style:0.5>"  # the missing tag is dropped
    assert (fields["Sampler"], fields["Schedule type"]) == ("DPM++ SDE", "Karras")
    assert (fields["RNG"], fields["Hires upscaler"], fields["Seed"], fields["Clip skip"]) == \
        ("NV", "Lanczos", "1234", "2")
    assert list(infotext.parse_hashes(fields["Lora hashes"])) == ["style"]
    with Image.open(summary["images"][0]["path"]) as image:
        assert image.size == (96, 96)  # the hires pass ran at 1.5x


def test_explicit_rng_wins_and_a_missing_lora_in_a_typed_prompt_is_still_an_error(tmp_path, lora_dir, capsys):
    info = PngInfo()
    info.add_text("parameters", "a cat\nSteps: 1, Sampler: Euler, CFG scale: 7, Seed: 3, Size: 64x64")
    source = tmp_path / "plain.png"
    Image.new("RGB", (64, 64)).save(source, pnginfo=info)
    rc, out, err = run(capsys, "sample", "--base", "tiny-sd1", "--from-png", source, "--rng", "cpu",
                       "--out", tmp_path / "a", "--json")
    assert rc == 0, err
    assert infotext.parse(json.loads(out)["parameters"])["RNG"] == "CPU" and "NV" not in err
    rc, _, err = run(capsys, "sample", "--base", "tiny-sd1", "--from-png", source, "--prompt", "a <lora:gone:1>",
                     "--adapter-dir", lora_dir, "--out", tmp_path / "b")
    assert rc == 2 and "gone" in err and not (tmp_path / "b").exists()


def test_an_embedding_named_in_ti_hashes_is_loaded_from_the_adapter_dir(tmp_path, tiny_sd1, capsys):
    from adapterhub.plugins import adapter_type

    folder = tmp_path / "embeddings"
    folder.mkdir()
    adapter_type("textual_inversion").example(tiny_sd1, folder / "goodneg.safetensors", seed=1)
    info = PngInfo()
    info.add_text("parameters", "a cat\nNegative prompt: goodneg, blurry\nSteps: 1, Sampler: Euler, CFG scale: 7, "
                                "Seed: 3, Size: 64x64, RNG: CPU, TI hashes: \"goodneg: 0123456789ab\"")
    source = tmp_path / "ti.png"
    Image.new("RGB", (64, 64)).save(source, pnginfo=info)
    rc, out, err = run(capsys, "sample", "--base", "tiny-sd1", "--from-png", source, "--adapter-dir", folder,
                       "--out", tmp_path / "a", "--json")
    assert rc == 0, err
    assert "goodneg" not in err
    fields = infotext.parse(json.loads(out)["parameters"])
    assert list(infotext.parse_hashes(fields["TI hashes"])) == ["goodneg"]


# ---------------------------------------------------------------------------------------------
# other generators
# ---------------------------------------------------------------------------------------------
def _png(path, chunks: dict):
    info = PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    Image.new("RGB", (16, 16)).save(path, pnginfo=info)
    return path


COMFY_PROMPT = {
    "3": {"inputs": {"seed": 42, "steps": 20, "cfg": 8.0, "sampler_name": "euler", "scheduler": "normal",
                     "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
                     "latent_image": ["5", 0]}, "class_type": "KSampler"},
    "4": {"inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}, "class_type": "CheckpointLoaderSimple"},
    "5": {"inputs": {"width": 512, "height": 512, "batch_size": 1}, "class_type": "EmptyLatentImage"},
    "6": {"inputs": {"text": "a castle at dusk", "clip": ["4", 1]}, "class_type": "CLIPTextEncode"},
    "7": {"inputs": {"text": "blurry, text", "clip": ["4", 1]}, "class_type": "CLIPTextEncode"},
    "8": {"inputs": {"samples": ["3", 0], "vae": ["4", 2]}, "class_type": "VAEDecode"},
    "9": {"inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}, "class_type": "SaveImage"},
}
COMFY_WORKFLOW = {"last_node_id": 9, "last_link_id": 9, "nodes": [], "links": [
    [1, 4, 0, 3, 0, "MODEL"], [2, 6, 0, 3, 1, "CONDITIONING"], [3, 7, 0, 3, 2, "CONDITIONING"],
    [4, 5, 0, 3, 3, "LATENT"], [5, 4, 1, 6, 0, "CLIP"], [6, 4, 1, 7, 0, "CLIP"], [7, 3, 0, 8, 0, "LATENT"],
    [8, 4, 2, 8, 1, "VAE"], [9, 8, 0, 9, 0, "IMAGE"]], "groups": [], "config": {}, "extra": {}, "version": 0.4}


def comfyui(path):
    return _png(path.with_suffix(".png"), {"prompt": COMFY_PROMPT, "workflow": COMFY_WORKFLOW})


def comfyui_webp(path):
    """ComfyUI's SaveAnimatedWEBP: the workflow in EXIF Make (0x010f), the prompt in Model (0x0110)."""
    exif = Image.Exif()
    exif[0x010F] = "workflow:" + json.dumps(COMFY_WORKFLOW)
    exif[0x0110] = "prompt:" + json.dumps(COMFY_PROMPT)
    path = path.with_suffix(".webp")
    Image.new("RGB", (16, 16)).save(path, exif=exif, lossless=True)
    return path


def invokeai(path):
    meta = {"generation_mode": "txt2img", "positive_prompt": "a castle at dusk", "negative_prompt": "blurry, text",
            "width": 512, "height": 512, "seed": 42, "rand_device": "cpu", "cfg_scale": 8.0, "steps": 20,
            "scheduler": "euler", "model": {"model_name": "stable-diffusion-v1-5", "base_model": "sd-1",
                                            "model_type": "main"}, "app_version": "3.4.0"}
    return _png(path.with_suffix(".png"), {"invokeai_metadata": meta})


def novelai(path):
    comment = {"prompt": "a castle at dusk", "steps": 20, "height": 512, "width": 512, "scale": 8.0, "seed": 42,
               "n_samples": 1, "noise_schedule": "native", "sampler": "k_euler_ancestral", "strength": 0.7,
               "noise": 0.0, "uc": "blurry, text", "request_type": "PromptGenerateRequest"}
    return _png(path.with_suffix(".png"), {"Title": "AI generated image", "Description": "a castle at dusk",
                                           "Software": "NovelAI", "Source": "NovelAI Diffusion V3 4BDE2A90",
                                           "Comment": comment})


def fooocus(path):
    meta = {"adm_guidance": "(1.5, 0.8, 0.3)", "base_model": "juggernautXL_v8Rundiffusion.safetensors",
            "base_model_hash": "aeb7e9e689", "clip_skip": 2, "full_negative_prompt": ["blurry, text"],
            "full_prompt": ["a castle at dusk"], "guidance_scale": 8.0, "negative_prompt": "blurry, text",
            "performance": "Speed", "prompt": "a castle at dusk", "refiner_model": "None", "resolution": "(512, 512)",
            "sampler": "dpmpp_2m_sde_gpu", "scheduler": "karras", "seed": "42", "sharpness": 2.0, "steps": 20,
            "styles": "['Fooocus V2', 'Fooocus Enhance', 'Fooocus Sharp', '(worst quality:1.4), bad art: 1.4)']",
            "vae": "Default (model)", "version": "Fooocus v2.5.5"}
    return _png(path.with_suffix(".png"), {"parameters": json.dumps(meta), "fooocus_scheme": "fooocus"})


def swarmui(path):
    meta = {"sui_image_params": {"prompt": "a castle at dusk", "negativeprompt": "blurry, text",
                                 "model": "OfficialStableDiffusion/sd_xl_base_1.0", "seed": 42, "steps": 20,
                                 "cfgscale": 8.0, "aspectratio": "1:1", "width": 512, "height": 512,
                                 "sampler": "euler", "scheduler": "normal", "swarm_version": "0.9.4.0"},
            "sui_models": [{"name": "sd_xl_base_1.0.safetensors", "param": "model", "hash": "0x31e35c80fc"}]}
    return _png(path.with_suffix(".png"), {"parameters": json.dumps(meta)})


GENERATORS = {"ComfyUI": comfyui, "ComfyUI (WebP)": comfyui_webp, "InvokeAI": invokeai, "NovelAI": novelai,
              "Fooocus": fooocus, "SwarmUI": swarmui}
EXPECTED = {"Prompt": "a castle at dusk", "Negative prompt": "blurry, text", "Seed": "42", "Steps": "20",
            "CFG scale": "8"}


@pytest.mark.parametrize("label", list(GENERATORS))
def test_other_generators_are_parsed_or_refused_by_name(label, tmp_path, capsys):
    sd_parsers = pytest.importorskip("sd_parsers")
    name = label.split(" ")[0]
    path = GENERATORS[label](tmp_path / "made")
    oracle = sd_parsers.ParserManager().parse(path)
    if name == "SwarmUI":
        assert oracle is None or oracle.generator.value != "AUTOMATIC1111" or not oracle.prompts
    elif label != "ComfyUI (WebP)":  # sd-parsers does not read ComfyUI's WebP EXIF
        assert oracle.generator.value == name
        assert [p.value for p in oracle.prompts] == ["a castle at dusk"]
    rc, out, err = run(capsys, "png-info", path, "--json")
    assert rc == 0, err
    fields = json.loads(out)
    assert fields["Generator"] == name and fields["parameters"] is None
    assert {k: fields.get(k) for k in EXPECTED} == EXPECTED
    rc, out, _ = run(capsys, "png-info", path)
    assert rc == 0 and out.splitlines()[0].startswith(f"Generator: {name}")
    assert "bad art" not in out
    rc, _, err = run(capsys, "sample", "--base", "tiny-sd1", "--from-png", path, "--out", tmp_path / "never")
    assert rc == 2 and err.count("\n") == 1 and name in err and str(path) in err
    assert not (tmp_path / "never").exists()


def test_unknown_json_and_broken_metadata_are_refused_by_name(tmp_path, capsys):
    unknown = _png(tmp_path / "unknown.png", {"parameters": json.dumps({"foo": 1})})
    rc, _, err = run(capsys, "png-info", unknown)
    assert rc == 2 and "JSON" in err and str(unknown) in err and err.count("\n") == 1
    graph_only = _png(tmp_path / "graph.png", {"invokeai_graph": json.dumps({"nodes": {}})})
    rc, _, err = run(capsys, "png-info", graph_only)
    assert rc == 2 and "InvokeAI" in err and err.count("\n") == 1
    broken = _png(tmp_path / "broken.png", {"prompt": "{not json", "workflow": "{}"})
    rc, _, err = run(capsys, "png-info", broken)
    assert rc == 2 and "ComfyUI" in err and err.count("\n") == 1 and "Traceback" not in err


def test_a_webui_infotext_beside_a_comfyui_graph_is_read_as_the_webuis(tmp_path, capsys):
    """ComfyUI nodes that save webui-style infotext (e.g. Image Saver) keep the graph too: the infotext is the
    part --from-png can re-run, as sd-parsers also prefers it."""
    sd_parsers = pytest.importorskip("sd_parsers")
    text = "a cat\nSteps: 1, Sampler: Euler, CFG scale: 7, Seed: 3, Size: 64x64, RNG: CPU"
    path = _png(tmp_path / "both.png", {"parameters": text, "prompt": COMFY_PROMPT, "workflow": COMFY_WORKFLOW})
    assert sd_parsers.ParserManager().parse(path).generator.name == "AUTOMATIC1111"
    rc, out, _ = run(capsys, "png-info", path, "--json")
    assert rc == 0 and json.loads(out)["parameters"] == text and "Generator" not in json.loads(out)


def test_without_sd_parsers_other_generators_are_refused_by_name(tmp_path, capsys, monkeypatch):
    """sd-parsers is a test dependency, not a runtime one: without it the generator is still named."""
    import sys

    for name in [m for m in sys.modules if m == "sd_parsers" or m.startswith("sd_parsers.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "sd_parsers", None)  # import sd_parsers -> ImportError
    rc, _, err = run(capsys, "png-info", comfyui(tmp_path / "made"))
    assert rc == 2 and err.count("\n") == 1 and "ComfyUI" in err and "sd-parsers" in err
    rc, out, _ = run(capsys, "png-info", swarmui(tmp_path / "swarm"), "--json")  # read here, not by sd-parsers
    assert rc == 0 and json.loads(out)["Generator"] == "SwarmUI"
