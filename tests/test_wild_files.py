"""Real adapter files from public repositories (shared/wild-adapters, MANIFEST.tsv is the truth).

* every LoRA-family file (kinds ``diffusers-lora-*``, ``lycoris-*``, ``peft-*``) is identified with
  the MANIFEST's type, layout and base;
* every Stable Diffusion LoRA-family file binds to a random-weight base of its architecture built
  on the meta device (every key maps to a module, every shape fits), and to no other architecture;
* malformed files and pickles that need code give a one-line AdapterError naming the file;
* files of other kinds (textual inversion, cloneofsimo, ...) are not claimed as LoRA types.
"""
from __future__ import annotations

import csv

import pytest

import adapterhub
from adapterhub.errors import AdapterError
from adapterhub.weights import bind

from lora_helpers import parts, quiet

quiet()
from conftest import WILD_ADAPTERS as WILD  # noqa: E402
ROWS = list(csv.DictReader(open(WILD / "MANIFEST.tsv", encoding="utf-8"), delimiter="\t")) \
    if (WILD / "MANIFEST.tsv").is_file() else []
pytestmark = pytest.mark.skipif(not ROWS, reason="shared/wild-adapters is not available")

LORA_FAMILY_TYPES = {"lora", "locon", "loha", "lokr", "adalora"}
FORMAT_OF_KIND = {"diffusers-lora-attnproc": "diffusers-attnproc", "diffusers-lora-new": "diffusers"}
# kind -> type where the kind's name does not say it; a PEFT Conv2d LoRA with a 3x3 lora_A is LoCon
TYPE_OF_FILE = {"peft_regression_lora_conv2d_adapter_model.bin": "locon"}
SD_ARCHS = ("sd1", "sd2", "sdxl")


def _is_lora_family(row) -> bool:
    return row["kind"].startswith(("diffusers-lora-", "lycoris-", "peft-"))


def _refused_pickle(row) -> bool:
    return "PICKLE_REFUSED" in row["file"]


def _expected(row) -> tuple[str, str]:
    kind = row["kind"]
    if kind.startswith("diffusers-lora-"):
        return TYPE_OF_FILE.get(row["file"], "lora"), FORMAT_OF_KIND[kind]
    if kind.startswith("lycoris-"):
        return kind.split("-", 1)[1], "lycoris"
    return TYPE_OF_FILE.get(row["file"], kind.split("-", 1)[1]), "peft"


def _ids(rows):
    return [r["file"] for r in rows]


LORA_ROWS = [r for r in ROWS if _is_lora_family(r)]
SD_LORA_ROWS = [r for r in LORA_ROWS if r["base"] in SD_ARCHS]
BROKEN_ROWS = [r for r in ROWS if r["kind"] == "malformed" or _refused_pickle(r)]
OTHER_ROWS = [r for r in ROWS if not _is_lora_family(r) and r not in BROKEN_ROWS]


def test_manifest_covers_the_cases():
    assert len(LORA_ROWS) >= 10 and len(SD_LORA_ROWS) >= 6 and len(BROKEN_ROWS) >= 3 and len(OTHER_ROWS) >= 10


@pytest.mark.parametrize("row", LORA_ROWS, ids=_ids(LORA_ROWS))
def test_lora_family_file_is_identified(row):
    facts = adapterhub.inspect(WILD / row["file"])
    expected_type, expected_format = _expected(row)
    assert (facts["type"], facts["format"]) == (expected_type, expected_format)
    assert facts["base"] == row["base"]
    if row["base"] == "unknown":
        assert facts["family"] != "stable-diffusion"
    else:
        assert facts["family"] == "stable-diffusion"
    assert facts["sha256"] == row["sha256"]
    assert facts["targets"] > 0


@pytest.fixture(scope="module")
def meta_bases():
    return {arch: parts(arch, device="meta") for arch in SD_ARCHS}


@pytest.mark.parametrize("row", SD_LORA_ROWS, ids=_ids(SD_LORA_ROWS))
def test_sd_file_fits_its_architecture_on_meta(row, meta_bases):
    adapter = adapterhub.load(WILD / row["file"])
    model = meta_bases[row["base"]]
    bindings = bind(model, adapter)
    assert len(bindings) == len(adapter.patches) > 0
    assert all(b.param.is_meta for b in bindings)
    assert len({id(b.param) for b in bindings}) == len(bindings)  # no two patches on one weight
    for other in SD_ARCHS:
        if other != row["base"]:
            with pytest.raises(AdapterError) as err:
                bind(meta_bases[other], adapter)
            assert "\n" not in str(err.value) and row["file"] in str(err.value)


def test_non_sd_file_is_refused_by_the_engine(meta_bases):
    adapter = adapterhub.load(WILD / "anirudhak_peft_gpt2_adapter_model.safetensors")
    with pytest.raises(AdapterError, match="not a Stable Diffusion"):
        bind(meta_bases["sd1"], adapter)


@pytest.mark.parametrize("row", BROKEN_ROWS, ids=_ids(BROKEN_ROWS))
def test_broken_file_gives_one_line_error_naming_it(row):
    with pytest.raises(AdapterError) as err:
        adapterhub.load(WILD / row["file"])
    message = str(err.value)
    assert "\n" not in message and row["file"] in message
    if _refused_pickle(row):
        assert "refused" in message and "code" in message


@pytest.mark.parametrize("row", OTHER_ROWS, ids=_ids(OTHER_ROWS))
def test_other_kinds_are_not_claimed_as_lora(row):
    try:
        facts = adapterhub.inspect(WILD / row["file"], with_hash=False)
    except AdapterError as exc:  # not recognised by any registered type: fine, if said in one line
        assert "\n" not in str(exc) and row["file"] in str(exc)
        return
    assert facts["type"] not in LORA_FAMILY_TYPES, facts["type"]
