"""Infotext: the webui's layout, key order and quoting; read back by the webui's regex (copied from
sampling.md §1.5) and by sd-parsers (an independent third-party reader); the hash definitions."""
from __future__ import annotations

import hashlib
import io
import json
import re
import struct

import pytest

from adapterhub.sample import infotext

# modules/infotext_utils.py re_param_code, verbatim (sampling.md §1.5)
RE_PARAM_CODE = r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)'
EXAMPLE = ("a (cat:1.2), <lora:myStyle:0.8> masterpiece\n"
           "Negative prompt: blurry, (worst quality:1.4)\n"
           "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234567890, Size: 512x768, "
           "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Clip skip: 2, "
           'Lora hashes: "myStyle: 0123456789ab", TI hashes: "easynegative: c74b4e810b03", Version: v1.10.1')
PARAMS = {"Steps": 20, "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": "7", "Seed": 1234567890,
          "Size": "512x768", "Model hash": "6ce0161689", "Model": "v1-5-pruned-emaonly", "Clip skip": 2,
          "Lora hashes": "myStyle: 0123456789ab", "TI hashes": "easynegative: c74b4e810b03", "Version": "v1.10.1"}


def webui_parse(text):
    """The webui's parameter loop, independent of adapterhub: last line, regex, json.loads if quoted."""
    lastline = text.strip().split("\n")[-1]
    found = re.compile(RE_PARAM_CODE).findall(lastline)
    assert len(found) >= 3
    return {k: json.loads(v) if v.startswith('"') and v.endswith('"') else v for k, v in found}


def test_create_reproduces_the_webui_example_literally():
    shuffled = dict(reversed(list(PARAMS.items())))  # order comes from the webui's table, not the caller
    text = infotext.create("a (cat:1.2), <lora:myStyle:0.8> masterpiece", "blurry, (worst quality:1.4)", shuffled)
    assert text == EXAMPLE


@pytest.mark.parametrize("value, quoted", [
    ("plain", "plain"), ("a, b", '"a, b"'), ("k: v", '"k: v"'), ("two\nlines", '"two\\nlines"'),
    ('say "hi", ok', '"say \\"hi\\", ok"'), ("猫, 犬", '"猫, 犬"'),
])
def test_quoting_rule(value, quoted):
    assert infotext.quote(value) == quoted
    assert infotext.unquote(quoted) == value


def test_none_values_are_skipped_and_negative_line_omitted():
    text = infotext.create("a cat", "", {"Steps": 4, "Sampler": "Euler", "Clip skip": None, "Seed": 1})
    assert text == "a cat\nSteps: 4, Sampler: Euler, Seed: 1"


def test_webui_regex_reads_every_value_back():
    assert webui_parse(EXAMPLE) == {k: str(v) for k, v in PARAMS.items()}
    two = infotext.create("x", "", {**PARAMS, "Lora hashes": "a: 0123456789ab, b: ba9876543210"})
    assert webui_parse(two)["Lora hashes"] == "a: 0123456789ab, b: ba9876543210"


def test_parse_is_the_webuis():
    multi = "line one\nline two <lora:x:1>\nNegative prompt: bad\nworse\n" + EXAMPLE.splitlines()[-1]
    fields = infotext.parse(multi)
    assert fields["Prompt"] == "line one\nline two <lora:x:1>"
    assert fields["Negative prompt"] == "bad\nworse"
    assert (fields["Size-1"], fields["Size-2"]) == ("512", "768")
    assert fields["Lora hashes"] == "myStyle: 0123456789ab"
    assert infotext.parse("just a prompt\nSteps: 20, Sampler: Euler")["Prompt"].endswith("Sampler: Euler")
    assert infotext.parse("p\nSteps: 1, Sampler: Euler, Seed: 2")["Schedule type"] == "Automatic"  # default
    assert infotext.parse_hashes("a: 0123, b c: 4567") == {"a": "0123", "b c": "4567"}


def _png_bytes(text):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG", pnginfo=infotext.pnginfo(text))
    return buf.getvalue()


def test_png_chunk_round_trip_latin1_and_utf8(tmp_path):
    for name, text in (("a.png", EXAMPLE), ("b.png", "一只猫, (cute:1.2)\nSteps: 2, Sampler: Euler, Seed: 3")):
        path = tmp_path / name
        path.write_bytes(_png_bytes(text))
        assert infotext.read_png(path) == text
    data = (tmp_path / "b.png").read_bytes()
    assert b"iTXt" in data and b"tEXt" not in data
    assert b"tEXt" in (tmp_path / "a.png").read_bytes()


def test_sd_parsers_reads_the_headline_fields():
    sd_parsers = pytest.importorskip("sd_parsers")
    info = sd_parsers.ParserManager().parse(io.BytesIO(_png_bytes(EXAMPLE)))
    assert info.generator.name == "AUTOMATIC1111"
    sampler = info.samplers[0]
    assert sampler.name == "DPM++ 2M"
    assert sampler.parameters == {"scheduler": "Karras", "cfg_scale": "7", "seed": "1234567890", "steps": "20"}
    assert sampler.model.name == "v1-5-pruned-emaonly" and sampler.model.hash == "6ce0161689"
    assert [p.value for p in info.prompts] == ["a (cat:1.2), <lora:myStyle:0.8> masterpiece"]
    assert [p.value for p in info.negative_prompts] == ["blurry, (worst quality:1.4)"]
    assert info.metadata["Size"] == "512x768" and info.metadata["Version"] == "v1.10.1"


def _safetensors(path, metadata):
    header = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "__metadata__": metadata}
    blob = json.dumps(header).encode()
    data = struct.pack("<2f", 1.0, 2.0)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return data


def test_hashes(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    data = _safetensors(a, {"x": "1"})
    _safetensors(b, {"x": "2", "more": "metadata"})
    assert infotext.lora_hash(a) == infotext.lora_hash(b) == hashlib.sha256(data).hexdigest()[:12]
    assert infotext.model_hash(a) == hashlib.sha256(a.read_bytes()).hexdigest()[:10] != infotext.model_hash(b)
    assert infotext.lora_hash(a, {"sshs_model_hash": "feedfacecafe0000"}) == "feedfacecafe"
    pt = tmp_path / "e.pt"
    pt.write_bytes(b"embedding")
    assert infotext.embedding_hash(pt) == infotext.lora_hash(pt) == hashlib.sha256(b"embedding").hexdigest()[:12]
    assert infotext.hashes_text({"my:name, v2": "0123456789ab", "b": "ba9876543210"}) == \
        "myname v2: 0123456789ab, b: ba9876543210"
