"""Flux / SD3 LoRA files written by the reference tools themselves (issue #21).

``tests/data/transformer-wild/`` holds files that sd-scripts (FLUX.1 and SD3.5 Medium, CLIP-L / CLIP-G / T5
parts, split qkv), x-flux, ai-toolkit, lycoris-lora (LoKr, LoHa, as SimpleTuner wraps diffusers' Flux) and
diffusers' DreamBooth LoRA path wrote with their own writer code at rank 1 (``MANIFEST.tsv``;
``tools/make_transformer_fixtures.py``). Each is read with its layout, family and base, and binds to the
meta-device preset of its architecture with every key used and every shape exact. Where diffusers' loader
reads the layout (``lora_state_dict``), it is the oracle of which module each name lands on and its shape.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data" / "transformer-wild"
HEADER, *LINES = (DATA / "MANIFEST.tsv").read_text().splitlines()
ROWS = [dict(zip(HEADER.split("\t"), line.split("\t"))) for line in LINES]
IDS = [row["file"] for row in ROWS]


def _family(row) -> str:
    return "sd3" if row["preset"].startswith("sd3") else "flux"


@pytest.fixture(scope="module")
def presets():
    """preset name -> its meta-device base (built once per module: shapes only, no memory)."""
    from adapterhub.transformer_bases import build_transformer_base

    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = build_transformer_base(name)
        return cache[name]
    return get


def test_the_manifest_lists_every_file_with_its_bytes():
    from safetensors.torch import load

    on_disk = sorted(p.name for p in DATA.glob("*.safetensors"))
    assert on_disk == sorted(IDS)
    total = 0
    for row in ROWS:
        data = (DATA / row["file"]).read_bytes()
        assert not data.startswith(b"version https://git-lfs")  # a real file, not an LFS pointer
        assert (len(data), hashlib.sha256(data).hexdigest()) == (int(row["size"]), row["sha256"])
        assert row["how"].startswith(("written by ", "found at ")) and row["tool_commit"]
        total += len(data)
        tensors = load(data)  # seeded values the tools saved as they are: finite, of the scale written
        assert all(t.float().isfinite().all() and t.float().abs().max() <= 1 for t in tensors.values()), row["file"]
    assert total < 25 * 2**20


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_describe_and_inspect_name_layout_family_and_base(row, capsys):
    from adapterhub.api import describe
    from adapterhub.cli import main

    expected = (row["type"], row["layout"], _family(row), row["base"])
    adapter, _ = describe(DATA / row["file"])
    assert (adapter.type, adapter.format, adapter.family, adapter.base) == expected
    rc = main(["inspect", "--json", "--no-hash", str(DATA / row["file"])])
    facts = json.loads(capsys.readouterr().out)
    assert rc in (0, None)
    assert (facts["type"], facts["format"], facts["family"], facts["base"]) == expected


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_every_key_binds_to_the_meta_preset_with_its_shape(row, presets):
    import adapterhub
    from adapterhub.weights import bind

    from safetensors import safe_open

    adapter = adapterhub.load(DATA / row["file"])
    with safe_open(str(DATA / row["file"]), "pt") as f:
        keys = set(f.keys())
    used = {k for patch in adapter.patches.values() for k in patch.file_keys.values()}
    assert used == keys  # no key left over
    assert not adapter.extra["stray_keys"] and not adapter.extra["refused"]
    bindings = bind(presets(row["preset"]), adapter)
    assert len(bindings) == len(adapter.patches)  # no module missing
    for b in bindings:
        shape = tuple(b.param.shape)
        if b.patch.kind == "lokr":  # its factors' (l x k, m x n), compared whole by its fits
            assert b.patch.fits(shape) and b.patch.in_features == shape[1], b.patch.target
            continue
        expected = b.patch.expected_shape() or (b.patch.out_features, b.patch.in_features)  # LoHa: (out, in)
        assert tuple(expected) == shape, b.patch.target


# ---------------------------------------------------------------------------------------------
# the oracle: diffusers' loader, where it reads the layout
# ---------------------------------------------------------------------------------------------
# diffusers keeps CLIP LoRAs of converted kohya files in its old attention-processor names
_OLD_TEXT = {".to_q_lora": ".q_proj", ".to_k_lora": ".k_proj", ".to_v_lora": ".v_proj", ".to_out_lora": ".out_proj",
             ".lora_linear_layer": ""}


def _diffusers_modules(pipeline_cls, path) -> dict[str, dict]:
    """module -> {"down": A, "up": B} as diffusers' ``lora_state_dict`` converts the file (its transformer and
    CLIP parts, alpha folded into the factors; names it leaves unconverted are not its reading)."""
    from adapterhub_plugins.lora.transformer_keys import TRANSFORMER_ROOTS

    sd = pipeline_cls.lora_state_dict(str(path))
    sd = sd[0] if isinstance(sd, tuple) else sd
    out: dict[str, dict] = {}
    for key, value in sd.items():
        for suffix, role in ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".down.weight", "down"),
                             (".up.weight", "up")):
            if key.endswith(suffix):
                module = key[: -len(suffix)]
                for old, new in _OLD_TEXT.items():
                    module = module.replace(old, new)
                if module.split(".")[0] in TRANSFORMER_ROOTS:  # its kohya converter leaves the embedders bare
                    module = "transformer." + module
                if module.startswith(("transformer.", "text_encoder.")):
                    out.setdefault(module, {})[role] = value.float()
    return out


# diffusers' SD3 loader converts no sd-scripts names (``lora_unet_joint_blocks_…`` come back as they are) and
# its loaders read no LoKr / LoHa tensors: those files are checked by binding and by their writers' naming
DIFFUSERS_READS = [row for row in ROWS if row["type"] in ("lora", "locon")
                   and not (_family(row) == "sd3" and row["layout"] == "kohya")]


@pytest.mark.parametrize("row", DIFFUSERS_READS, ids=[r["file"] for r in DIFFUSERS_READS])
def test_diffusers_maps_the_file_to_the_modules_we_bind(row):
    """The same modules, (out, in) and deltas as diffusers' loader converts the file to: the fused qkv /
    linear1 split into q, k, v (and the MLP) by the same rows, split qkv's stacked ranks kept apart.
    diffusers reads no T5 (``lora_te3_``) part: it is left out of the comparison."""
    import adapterhub
    import diffusers

    pipeline_cls = diffusers.StableDiffusion3Pipeline if _family(row) == "sd3" else diffusers.FluxPipeline
    theirs = _diffusers_modules(pipeline_cls, DATA / row["file"])
    adapter = adapterhub.load(DATA / row["file"])
    ours = {t: p for t, p in adapter.patches.items() if t.startswith(("transformer.", "text_encoder."))}
    assert theirs and ours.keys() == theirs.keys()
    gen = torch.Generator().manual_seed(0)
    for target, patch in ours.items():
        up, down = theirs[target]["up"], theirs[target]["down"]
        assert tuple(patch.expected_shape()) == (up.shape[0], down.shape[1]), target
        # the same delta, seen through a random vector (the deltas themselves are up to 18432 x 3072)
        x = torch.randn(down.shape[1], generator=gen)
        mine = patch.scale * (patch.tensors["up"].float() @ (patch.tensors["down"].float() @ x))
        torch.testing.assert_close(mine, up @ (down @ x), rtol=1e-3, atol=1e-6, msg=target)


FACTORED = [row for row in ROWS if row["type"] in ("lokr", "loha")]


@pytest.mark.parametrize("row", FACTORED, ids=[r["file"] for r in FACTORED])
def test_lokr_loha_names_are_the_modules_we_bind(row):
    """diffusers' Flux loader leaves LoKr / LoHa files unconverted; their writers' naming is the oracle:
    LyCORIS' ``lycoris_`` + the wrapped module's path joined by ``_``, ai-toolkit's ``transformer.`` + the
    path as it is."""
    import adapterhub

    adapter = adapterhub.load(DATA / row["file"])
    for target, patch in adapter.patches.items():
        path = target.removeprefix("transformer.")
        assert patch.source == ("lycoris_" + path.replace(".", "_") if row["layout"] == "lycoris"
                                else "transformer." + path)
