"""Textual inversion: every layout, attach/detach/merge, diffusers ``load_textual_inversion`` as the oracle.
"""
from __future__ import annotations

import copy
import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

import adapterhub
from adapterhub.errors import AdapterError

from conftest import WILD_ADAPTERS as WILD  # noqa: E402
PROMPT = "a photo of {} on a beach, best quality"


# --------------------------------------------------------------------------------------------
# fixtures: registration, tokenizers, tiny text encoders
# --------------------------------------------------------------------------------------------
def _local_tokenizer(pad: str):
    """A character-level CLIP tokenizer, for when adapterhub.tokenizer is not there."""
    from transformers import CLIPTokenizer

    chars = [chr(c) for c in range(33, 127)]
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    return CLIPTokenizer(vocab=vocab, merges=[], pad_token=pad, bos_token="<|startoftext|>",
                         eos_token="<|endoftext|>", unk_token="<|endoftext|>", model_max_length=77)


@pytest.fixture(scope="module")
def make_tokenizer(tmp_path_factory):
    """The real CLIP BPE tokenizer (adapterhub.tokenizer), its files cached where adapterhub caches."""
    try:
        from adapterhub.tokenizer import clip_tokenizer
    except ImportError:  # pragma: no cover - the shared tokenizer is normally there
        return _local_tokenizer
    try:
        from adapterhub.base import cache_dir

        cache = cache_dir()
    except ImportError:  # pragma: no cover
        cache = tmp_path_factory.mktemp("bpe")
    return lambda pad: clip_tokenizer(pad, cache=cache)


def _encoder(width: int, vocab: int, projection: bool = False, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=max(1, width // 64), max_position_embeddings=77,
                            projection_dim=32)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config).eval()


def _pipe(make_tokenizer, widths: tuple[int, ...]):
    tok = make_tokenizer("<|endoftext|>")
    parts = {"tokenizer": tok, "text_encoder": _encoder(widths[0], len(tok))}
    if len(widths) > 1:
        tok2 = make_tokenizer("!")
        parts.update(tokenizer_2=tok2, text_encoder_2=_encoder(widths[1], len(tok2), projection=True, seed=1))
    return SimpleNamespace(**parts)


@pytest.fixture(scope="module")
def sd1(make_tokenizer):
    return _pipe(make_tokenizer, (64,))


@pytest.fixture(scope="module")
def sdxl(make_tokenizer):
    return _pipe(make_tokenizer, (32, 64))


# --------------------------------------------------------------------------------------------
# the oracle: diffusers' own loader on a copy of the same components
# --------------------------------------------------------------------------------------------
class _Diffusers:
    """diffusers ``TextualInversionLoaderMixin`` over bare components (no full pipeline needed)."""

    def __init__(self, pipe, copied: bool = True):
        from diffusers.loaders import TextualInversionLoaderMixin

        self.loader = type("Loader", (TextualInversionLoaderMixin,), {"hf_device_map": None})()
        self.loader.components = {}
        self.pipe = copy.deepcopy(pipe) if copied else pipe

    def load(self, state, token, encoder="text_encoder", tokenizer="tokenizer"):
        self.loader.load_textual_inversion(state, token=token, tokenizer=getattr(self.pipe, tokenizer),
                                           text_encoder=getattr(self.pipe, encoder))

    def convert(self, prompt, tokenizer="tokenizer"):
        return self.loader.maybe_convert_prompt(prompt, getattr(self.pipe, tokenizer))

    def unload(self, tokens, encoder="text_encoder", tokenizer="tokenizer"):
        te = getattr(self.pipe, encoder)
        self.loader.unload_textual_inversion(tokens, tokenizer=getattr(self.pipe, tokenizer), text_encoder=te)
        te.config.vocab_size = te.get_input_embeddings().num_embeddings  # diffusers leaves it stale


def _ids(tok, prompt):
    return tok(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def _encode(te, ids):
    with torch.no_grad():
        return te(ids).last_hidden_state


def _vocab_state(tok) -> str:
    """The serialized tokenizer without the per-call padding/truncation settings a call leaves behind."""
    tok._tokenizer.no_padding()
    tok._tokenizer.no_truncation()
    return tok._tokenizer.to_str()


def _snapshot(pipe):
    snap = {}
    for tok_name, te_name in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
        tok, te = getattr(pipe, tok_name, None), getattr(pipe, te_name, None)
        if tok is None:
            continue
        table = te.get_input_embeddings()
        snap[te_name] = (_vocab_state(tok), len(tok), table, table.weight.detach().clone(), te.config.vocab_size)
    return snap


def _assert_restored(pipe, snap):
    for te_name, (tok_json, n, table, weight, vocab_size) in snap.items():
        tok = pipe.tokenizer if te_name == "text_encoder" else pipe.tokenizer_2
        te = getattr(pipe, te_name)
        assert _vocab_state(tok) == tok_json and len(tok) == n
        assert te.get_input_embeddings() is table  # the very module, hence the very parameter
        assert torch.equal(table.weight, weight) and te.config.vocab_size == vocab_size


# --------------------------------------------------------------------------------------------
# synthetic files in every layout (tiny widths: 64 = tiny-sd1; 32 + 64 = tiny-sdxl)
# --------------------------------------------------------------------------------------------
def _vec(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.02


def _write_layouts(folder: Path) -> dict[str, dict]:
    """file -> what inspect must say, and how diffusers is told to load it."""
    folder.mkdir(parents=True, exist_ok=True)
    cases = {}
    v = _vec(3, 64, seed=1)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": v}, "name": "inner-name", "step": 42,
                "sd_checkpoint": "abcd1234", "sd_checkpoint_name": "tiny"}, folder / "stylized.pt")
    cases["stylized.pt"] = dict(format="a1111-pt", token="stylized", vectors=3, internal_name="inner-name",
                                state={"string_to_param": {"*": v}, "name": "inner-name"})
    v = _vec(2, 64, seed=2)
    save_file({"emb_params": v}, str(folder / "negembed.safetensors"))
    cases["negembed.safetensors"] = dict(format="a1111-safetensors", token="negembed", vectors=2,
                                         state={"emb_params": v})
    v = _vec(4, 64, seed=3)
    torch.save({"emb_params": v}, folder / "resaved.pt")
    cases["resaved.pt"] = dict(format="a1111-pt", token="resaved", vectors=4, state={"emb_params": v})
    v = _vec(64, seed=4)
    torch.save({"<cat-toy>": v}, folder / "learned_embeds.bin")
    cases["learned_embeds.bin"] = dict(format="diffusers", token="<cat-toy>", vectors=1, state={"<cat-toy>": v})
    v = _vec(5, 64, seed=5).to(torch.bfloat16)
    save_file({"<multi>": v}, str(folder / "learned_embeds.safetensors"), metadata={"format": "pt"})
    cases["learned_embeds.safetensors"] = dict(format="diffusers", token="<multi>", vectors=5, state={"<multi>": v})
    return cases


def _write_sdxl_layouts(folder: Path) -> dict[str, dict]:
    folder.mkdir(parents=True, exist_ok=True)
    cases = {}
    l, g = _vec(3, 32, seed=6), _vec(3, 64, seed=7).half()
    save_file({"clip_l": l, "clip_g": g}, str(folder / "xlneg.safetensors"))
    cases["xlneg.safetensors"] = dict(format="sdxl", token="xlneg", vectors=3, l=l, g=g, tokens=None)
    (folder / "cog").mkdir()
    l, g = _vec(2, 32, seed=8).bfloat16(), _vec(2, 64, seed=9).bfloat16()
    save_file({"text_encoders_0": l, "text_encoders_1": g}, str(folder / "cog" / "embeddings.pti"))
    (folder / "cog" / "special_params.json").write_text(json.dumps({"TOK": "<s0><s1>"}))
    cases["cog/embeddings.pti"] = dict(format="cog-sdxl", token="<s0><s1>", vectors=2, l=l, g=g,
                                       tokens=["<s0>", "<s1>"], trigger="TOK")
    return cases


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ti")
    return folder, _write_layouts(folder / "sd1"), _write_sdxl_layouts(folder / "sdxl")


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------
def test_every_layout_is_identified(layouts):
    folder, sd1_cases, sdxl_cases = layouts
    for sub, cases, base, width in (("sd1", sd1_cases, "tiny-sd1", "64"), ("sdxl", sdxl_cases, "tiny-sdxl", "32+64")):
        for name, case in cases.items():
            facts = adapterhub.inspect(folder / sub / name)
            assert (facts["type"], facts["format"], facts["base"]) == ("textual_inversion", case["format"], base), name
            assert facts["vectors"] == case["vectors"] and facts["width"] == width and facts["token"] == case["token"]
            if "internal_name" in case:
                assert facts["internal_name"] == case["internal_name"] and facts["step"] == 42
            if "trigger" in case:
                assert facts["trigger"] == case["trigger"]


def test_attach_matches_diffusers_sd1(layouts, sd1):
    folder, cases, _ = layouts
    for name, case in cases.items():
        snap = _snapshot(sd1)
        handle = adapterhub.load(folder / "sd1" / name).attach(sd1, 1.0)
        prompt = PROMPT.format(case["token"])
        ours_prompt = handle.expand_prompt(prompt)
        ours_ids = _ids(sd1.tokenizer, ours_prompt)
        assert (ours_ids >= 49408).sum() == case["vectors"]  # every vector is in the prompt
        ours = _encode(sd1.text_encoder, ours_ids)
        handle.detach()
        _assert_restored(sd1, snap)
        # then diffusers, reading the same file into the same (restored) components
        oracle = _Diffusers(sd1, copied=False)
        oracle.load(str(folder / "sd1" / name), case["token"])
        assert ours_prompt == oracle.convert(prompt)
        their_ids = _ids(sd1.tokenizer, oracle.convert(prompt))
        assert torch.equal(ours_ids, their_ids), name
        assert torch.equal(ours, _encode(sd1.text_encoder, their_ids)), name
        oracle.unload(handle.tokens)


def test_attach_matches_diffusers_sdxl(layouts, sdxl):
    folder, _, cases = layouts
    pairs = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
    for name, case in cases.items():
        snap = _snapshot(sdxl)
        handle = adapterhub.load(folder / "sdxl" / name).attach(sdxl, 1.0)
        prompt = PROMPT.format(case["token"])
        ours = []
        for tok, te in pairs:
            ids = _ids(getattr(sdxl, tok), handle.expand_prompt(prompt))
            assert (ids >= 49408).sum() == case["vectors"]
            ours.append((ids, _encode(getattr(sdxl, te), ids)))
        handle.detach()
        _assert_restored(sdxl, snap)
        oracle = _Diffusers(sdxl, copied=False)  # the documented manual SDXL recipe, per encoder
        token = case["tokens"] or case["token"]
        oracle.load(case["l"], token, "text_encoder", "tokenizer")
        oracle.load(case["g"], token, "text_encoder_2", "tokenizer_2")
        for (tok, te), (ids, hidden) in zip(pairs, ours):
            theirs = _ids(getattr(sdxl, tok), oracle.convert(prompt, tok))
            assert torch.equal(ids, theirs), (name, tok)
            assert torch.equal(hidden, _encode(getattr(sdxl, te), theirs)), (name, te)
            oracle.unload(handle.tokens, te, tok)


def test_stacking_weight_and_out_of_order_detach(layouts, sd1):
    folder, _, _ = layouts
    snap = _snapshot(sd1)
    first = adapterhub.load(folder / "sd1" / "stylized.pt").attach(sd1, 1.0)
    second = adapterhub.load(folder / "sd1" / "learned_embeds.safetensors").attach(sd1, 1.0)
    tok, te = sd1.tokenizer, sd1.text_encoder
    ids = tok.convert_tokens_to_ids(second.tokens)
    vectors = adapterhub.load(folder / "sd1" / "learned_embeds.safetensors").patches
    expected = next(iter(vectors.values())).vectors.float()
    assert torch.equal(te.get_input_embeddings().weight[ids], expected)
    second.set_weight(0.5)
    assert torch.allclose(te.get_input_embeddings().weight[ids], expected * 0.5)
    second.set_weight(1.0)
    first.detach()  # the earlier one first: the later tokens move down, their rows with them
    ids = tok.convert_tokens_to_ids(second.tokens)
    assert ids == list(range(49408, 49408 + 5))
    assert torch.equal(te.get_input_embeddings().weight[ids], expected)
    assert te.get_input_embeddings().num_embeddings == len(tok) == 49413
    second.detach()
    second.detach()  # twice is harmless
    for te_name, (tok_json, n, table, weight, vocab_size) in snap.items():
        assert _vocab_state(tok) == tok_json and len(tok) == n
        assert torch.equal(te.get_input_embeddings().weight, weight) and te.config.vocab_size == vocab_size


def test_names_match_in_any_case(sd1, tmp_path):
    save_file({"emb_params": _vec(3, 64)}, str(tmp_path / "EasyNeg.safetensors"))
    with adapterhub.load(tmp_path / "EasyNeg.safetensors").attach(sd1, 1.0) as handle:
        expanded = handle.expand_prompt("easyneg, a EASYNEG b EasyNeg EasyNeg_1 EasyNeg_2")
        assert expanded == ("easyneg EasyNeg_1 EasyNeg_2, a EASYNEG EasyNeg_1 EasyNeg_2 b "
                            "EasyNeg EasyNeg_1 EasyNeg_2")  # the one already spelled out stays as written
        assert (_ids(sd1.tokenizer, expanded) >= 49408).sum() == 9


def test_removal_from_a_python_tokenizer():
    """The slow (python) tokenizer branch: removal renumbers the later tokens and restores the rest."""
    from transformers.tokenization_python import PythonBackend

    from adapterhub_plugins.textual_inversion.vocab import _remove_tokens

    class Words(PythonBackend):
        def __init__(self, **kwargs):
            self.vocab = {w: i for i, w in enumerate(["[UNK]", "a", "b"])}
            super().__init__(unk_token="[UNK]", **kwargs)

        @property
        def vocab_size(self):
            return len(self.vocab)

        def get_vocab(self):
            return {**self.vocab, **self.added_tokens_encoder}

        def _tokenize(self, text, **kwargs):
            return text.split()

        def _convert_token_to_id(self, token):
            return self.vocab.get(token, 0)

        def _convert_id_to_token(self, index):
            return next((t for t, i in self.vocab.items() if i == index), "[UNK]")

    tok = Words()
    before = (dict(tok.added_tokens_encoder), len(tok))
    tok.add_tokens(["tok", "tok_1"])
    tok.add_tokens(["zz"])
    assert _remove_tokens(tok, ["tok", "tok_1"]) == [3, 4]
    assert tok.added_tokens_encoder["zz"] == 3 and tok("a zz").input_ids == [1, 3]
    assert _remove_tokens(tok, ["zz"]) == [3] and (dict(tok.added_tokens_encoder), len(tok)) == before


def test_prompt_in_a_diffusers_pipeline(layouts, make_tokenizer):
    """The pipeline's own encode_prompt (which expands multi-vector names) sees our tokens as diffusers'."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    folder, cases, _ = layouts
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
                                attention_head_dim=4)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    tok = make_tokenizer("<|endoftext|>")
    parts = dict(unet=unet, vae=vae, scheduler=DDIMScheduler(), tokenizer=tok, text_encoder=_encoder(64, len(tok)),
                 safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ours = StableDiffusionPipeline(**parts)
    theirs = StableDiffusionPipeline(**{**parts, "tokenizer": copy.deepcopy(tok),
                                        "text_encoder": copy.deepcopy(parts["text_encoder"])})
    case = cases["learned_embeds.safetensors"]
    adapterhub.load(folder / "sd1" / "learned_embeds.safetensors").attach(ours, 1.0)
    theirs.load_textual_inversion(str(folder / "sd1" / "learned_embeds.safetensors"))
    prompt = PROMPT.format(case["token"])
    a = ours.encode_prompt(prompt, "cpu", 1, False)[0]
    b = theirs.encode_prompt(prompt, "cpu", 1, False)[0]
    assert torch.equal(a, b)


def test_merge_bakes_tokens_into_a_saved_checkpoint(layouts, make_tokenizer, tmp_path):
    from transformers import CLIPTextModel, CLIPTokenizer

    folder, cases, _ = layouts
    pipe = _pipe(make_tokenizer, (64,))
    adapter = adapterhub.load(folder / "sd1" / "stylized.pt")
    adapter.merge_into(pipe, 1.0)
    prompt = PROMPT.format("stylized")
    ids = _ids(pipe.tokenizer, prompt.replace("stylized", "stylized stylized_1 stylized_2"))
    expected = _encode(pipe.text_encoder, ids)
    pipe.tokenizer.save_pretrained(tmp_path / "tokenizer")
    pipe.text_encoder.save_pretrained(tmp_path / "text_encoder")
    tok = CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")
    te = CLIPTextModel.from_pretrained(tmp_path / "text_encoder").eval()
    assert te.config.vocab_size == 49408 + 3 == len(tok)
    assert torch.equal(_ids(tok, prompt.replace("stylized", "stylized stylized_1 stylized_2")), ids)
    assert torch.equal(_encode(te, ids), expected)


def test_save_converts_between_layouts(layouts, tmp_path):
    folder, cases, sdxl_cases = layouts
    source = adapterhub.load(folder / "sd1" / "stylized.pt")
    vectors = next(iter(source.patches.values())).vectors
    for fmt, name in (("a1111-pt", "a.pt"), ("a1111-safetensors", "b.safetensors"), ("diffusers", "c.bin"),
                      ("diffusers", "d.safetensors")):
        out = source.save(tmp_path / name, fmt)
        again = adapterhub.load(out)
        assert again.format == fmt and torch.equal(next(iter(again.patches.values())).vectors, vectors)
    again = adapterhub.load(tmp_path / "a.pt")
    assert again.extra["internal_name"] == "inner-name" and again.extra["step"] == 42
    xl = adapterhub.load(folder / "sdxl" / "cog" / "embeddings.pti")
    out = xl.save(tmp_path / "xl.safetensors", "sdxl")
    assert adapterhub.inspect(out)["format"] == "sdxl"
    with pytest.raises(AdapterError, match="cannot be written as a1111-pt"):
        xl.save(tmp_path / "bad.pt", "a1111-pt")


def test_example_writer(make_tokenizer, sd1, sdxl, tmp_path):
    from adapterhub.plugins import adapter_type

    plugin = adapter_type("textual_inversion")
    for pipe, base, suffix in ((sd1, "tiny-sd1", ".safetensors"), (sd1, "tiny-sd1", ".pt"),
                               (sdxl, "tiny-sdxl", ".safetensors")):
        path = plugin.example(pipe, tmp_path / f"demo_ti_{base}{suffix}", seed=3)
        facts = adapterhub.inspect(path)
        assert (facts["type"], facts["base"], facts["vectors"]) == ("textual_inversion", base, 2)
        snap = _snapshot(pipe)
        adapterhub.load(path).attach(pipe, 1.0).detach()
        _assert_restored(pipe, snap)


def test_bad_input_leaves_the_pipeline_untouched(layouts, sd1, sdxl, tmp_path):
    folder, _, _ = layouts
    snap, snap_xl = _snapshot(sd1), _snapshot(sdxl)
    wide = tmp_path / "wide.pt"
    torch.save({"string_to_param": {"*": _vec(2, 768)}, "name": "wide"}, wide)
    with pytest.raises(AdapterError) as err:
        adapterhub.load(wide).attach(sd1, 1.0)
    message = str(err.value)
    assert str(wide) in message and "768 wide" in message and "64" in message and "\n" not in message
    with pytest.raises(AdapterError, match="two-encoder"):
        adapterhub.load(folder / "sd1" / "stylized.pt").attach(sdxl, 1.0)
    with pytest.raises(AdapterError, match="text_encoder_2"):
        adapterhub.load(folder / "sdxl" / "xlneg.safetensors").attach(sd1, 1.0)
    handle = adapterhub.load(folder / "sd1" / "negembed.safetensors").attach(sd1, 1.0)
    inner = _snapshot(sd1)
    with pytest.raises(AdapterError, match="already in tokenizer"):
        adapterhub.load(folder / "sd1" / "negembed.safetensors").attach(sd1, 1.0)
    _assert_restored(sd1, inner)
    handle.detach()
    _assert_restored(sd1, snap)
    _assert_restored(sdxl, snap_xl)
    # a pickle that needs code to load is refused, never run
    code = tmp_path / "needs_code.pt"
    torch.save({"string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(_vec(1, 64))}), "name": "x"}, code)
    with pytest.raises(AdapterError) as err:
        adapterhub.load(code)
    assert str(code) in str(err.value) and "weights_only" in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------------------------
# the wild files
# --------------------------------------------------------------------------------------------
EXPECTED_FORMAT = {
    "aki_ng_deepnegative_v1_75t.pt": "a1111-pt", "fgjd_EasyNegative_vfbb0.pt": "a1111-pt",
    "fgjd_bad-artist.pt": "a1111-pt", "fgjd_badhandv4.pt": "a1111-pt", "fgjd_charturnerv2.pt": "a1111-pt",
    "fgjd_negative_hand-neg.pt": "a1111-pt", "seija_untrained_test_embedding.pt": "a1111-pt",
    "fgjd_EasyNegativeV2.safetensors": "a1111-safetensors",
    "diffusers_branch_frida_learned_embeds_10vec.bin": "diffusers", "ttekcor_learned_embeds.safetensors": "diffusers",
    "waymonx_learned_embeds.bin": "diffusers", "emojii_embeddings.pti": "cog-sdxl",
    "leeaeron_FastNegative_sdxl_modelspec.safetensors": "sdxl", "leeaeron_ImgFixerPre0.3_sdxl_f16.safetensors": "sdxl",
}


def _manifest() -> list[dict]:
    with open(WILD / "MANIFEST.tsv", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


@pytest.mark.skipif(not WILD.is_dir(), reason="the wild adapter files are not here")
def test_wild_embeddings_are_identified():
    rows = [r for r in _manifest() if r["kind"].startswith("ti-")]
    assert {r["file"] for r in rows} - set(EXPECTED_FORMAT) == {"leeaeron_bad-image-v2-39000_PICKLE_REFUSED.pt"}
    for row in rows:
        path = WILD / row["file"]
        if "PICKLE_REFUSED" in row["file"]:
            with pytest.raises(AdapterError, match="needs code"):
                adapterhub.inspect(path, with_hash=False)
            continue
        facts = adapterhub.inspect(path, with_hash=False)
        assert (facts["type"], facts["format"], facts["base"]) == ("textual_inversion", EXPECTED_FORMAT[row["file"]],
                                                                  row["base"]), row["file"]
    assert adapterhub.inspect(WILD / "fgjd_badhandv4.pt", with_hash=False)["internal_name"] == "badhandv3"
    assert adapterhub.inspect(WILD / "fgjd_badhandv4.pt", with_hash=False)["token"] == "fgjd_badhandv4"
    bare = adapterhub.inspect(WILD / "vicgalle_aesthetic_watercolor_baretensor.pt", with_hash=False)
    assert (bare["type"], bare["format"], bare["width"]) == ("aesthetic_embedding", "aesthetic-gradients", 768)
    with pytest.raises(AdapterError, match="aesthetic-gradients"):
        adapterhub.load(WILD / "vicgalle_aesthetic_watercolor_baretensor.pt").attach(SimpleNamespace(), 1.0)
    for row in _manifest():  # nothing else is mistaken for an embedding
        if not row["kind"].startswith("ti-") and row["kind"] not in ("malformed",):
            try:
                facts = adapterhub.inspect(WILD / row["file"], with_hash=False)
            except AdapterError:
                continue
            assert facts["type"] != "textual_inversion", row["file"]


@pytest.mark.skipif(not WILD.is_dir(), reason="the wild adapter files are not here")
def test_wild_embeddings_match_diffusers():
    """Each loadable wild embedding on real-width (768 / 768 + 1280) one-layer encoders, against diffusers
    reading the same file. Ours first, detach (restored exactly), then diffusers on the same encoders."""
    from safetensors.torch import load_file

    pipe = _pipe(_local_tokenizer, (768, 1280))  # a small vocabulary keeps 1280-wide tables cheap
    sd1 = SimpleNamespace(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder)
    for name, fmt in EXPECTED_FORMAT.items():
        adapter = adapterhub.load(WILD / name)
        two = fmt in ("sdxl", "cog-sdxl")
        target = pipe if two else sd1
        pairs = [("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")][: 2 if two else 1]
        prompt = adapter.extra["token"]  # alone: 75 vectors and BOS/EOS fill the 77 tokens exactly
        snap = _snapshot(target)
        handle = adapter.attach(target, 1.0)
        expanded, ours = handle.expand_prompt(prompt), []
        n = adapter.extra["vectors"]
        for tok, te in pairs:
            ids = _ids(getattr(target, tok), expanded)
            assert (ids >= len(getattr(target, tok)) - n).sum() == n, name  # every vector is in the prompt
            ours.append((ids, _encode(getattr(target, te), ids)))
        handle.detach()
        _assert_restored(target, snap)

        oracle = _Diffusers(target, copied=False)
        token = adapter.extra["tokens"] if fmt == "cog-sdxl" else adapter.extra["token"]
        if two:
            state = load_file(str(WILD / name))
            first, second = ("clip_l", "clip_g") if fmt == "sdxl" else ("text_encoders_0", "text_encoders_1")
            oracle.load(state[first], token, "text_encoder", "tokenizer")
            oracle.load(state[second], token, "text_encoder_2", "tokenizer_2")
        else:
            oracle.load(str(WILD / name), token)
        for (tok, te), (ids, hidden) in zip(pairs, ours):
            converted = oracle.convert(prompt, tok)
            # diffusers leaves names with capitals unexpanded (see vocab.expand_prompt); where it
            # expands, it says what we say
            assert converted == expanded or converted == prompt and any(c.isupper() for c in adapter.extra["token"])
            theirs = _ids(getattr(target, tok), expanded)
            assert torch.equal(ids, theirs), (name, tok)
            assert torch.equal(hidden, _encode(getattr(target, te), theirs)), (name, te)
        for tok, te in pairs:
            oracle.unload(adapter.extra["tokens"], te, tok)
