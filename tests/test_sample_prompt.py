"""A1111 prompt syntax and weighting: the webui's own doctest table, chunking, and the emphasis formula
recomputed here, independently, on the tiny text encoders."""
from __future__ import annotations

import copy

import pytest
import torch

from adapterhub.errors import AdapterhubError
from adapterhub.sample.conditioning import PromptEncoder
from adapterhub.sample.prompt import parse_prompt_attention, tokenize_prompt, vocabulary_of


# modules/prompt_parser.py doctests and the extra cases of sampling.md §4.1, literally
ATTENTION_CASES = [
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
      [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1]]),
    ("((word))", [["word", 1.2100000000000002]]),
    ("[word]", [["word", 0.9090909090909091]]),
    ("[[word]]", [["word", 0.8264462809917354]]),
    ("(word:1.5)", [["word", 1.5]]),
    ("(word: 1.5)", [["word", 1.5]]),
    ("( word : 1.5 )", [[" word ", 1.5]]),
    ("a BREAK b", [["a", 1.0], ["BREAK", -1], ["b", 1.0]]),
    ("aBREAKb", [["aBREAKb", 1.0]]),
    ("(a:0)", [["a", 0.0]]),
    ("(a:-1)", [["a", -1.0]]),
    ("(word:1.5", [["word:1.5", 1.1]]),
    ("a (b BREAK c:1.2)", [["a ", 1.0], ["b", 1.2], ["BREAK", -1.2], ["c", 1.2]]),
    ("", [["", 1.0]]),
]


@pytest.mark.parametrize("text, expected", ATTENTION_CASES)
def test_parse_prompt_attention_matches_the_webui(text, expected):
    assert parse_prompt_attention(text) == expected


def test_unparsable_weight_is_one_line_error():
    with pytest.raises(AdapterhubError, match="not a number"):
        parse_prompt_attention("(cat:.)")


# ------------------------------------------------------------------------------------------------
# chunking
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok(tiny_sd1):
    return tiny_sd1.tokenizer


def _chunks(prompt, tok, **kw):
    ids = lambda texts: tok(texts, truncation=False, add_special_tokens=False)["input_ids"]  # noqa: E731
    return tokenize_prompt(prompt, ids, vocabulary_of(tok), **kw)


def test_75_tokens_fit_one_chunk_76_make_two(tok):
    cat = tok("cat", add_special_tokens=False)["input_ids"]
    assert len(cat) == 1
    one = _chunks("cat " * 75, tok)
    two = _chunks("cat " * 76, tok)
    assert len(one.chunks) == 1 and one.token_count == 75
    assert len(two.chunks) == 2 and two.token_count == 76
    for c in two.chunks:
        assert len(c.tokens) == 77 and c.tokens[0] == tok.bos_token_id and c.tokens[-1] == tok.eos_token_id
    assert two.chunks[1].tokens[:3] == [tok.bos_token_id, cat[0], tok.eos_token_id]


def test_break_starts_a_chunk_and_empty_prompt_is_one_chunk(tok):
    t = _chunks("a cat BREAK a dog", tok)
    a_dog = tok("a dog", add_special_tokens=False)["input_ids"]
    assert len(t.chunks) == 2
    assert t.chunks[1].tokens[1:1 + len(a_dog)] == a_dog
    empty = _chunks("", tok)
    assert len(empty.chunks) == 1
    assert empty.chunks[0].tokens == [tok.bos_token_id] + [tok.eos_token_id] * 76


def test_comma_backtrack_moves_the_tail_to_the_next_chunk(tok):
    cat, dog = (tok(w, add_special_tokens=False)["input_ids"][0] for w in ("cat", "dog"))
    comma = tok.convert_tokens_to_ids(",</w>")
    t = _chunks("cat " * 70 + ", " + "dog " * 10, tok)
    first, second = t.chunks
    assert first.tokens[1:72] == [cat] * 70 + [comma]
    assert first.tokens[72:] == [tok.eos_token_id] * 5  # padded after the comma
    assert second.tokens[1:11] == [dog] * 10
    no_backtrack = _chunks("cat " * 70 + ", " + "dog " * 10, tok, comma_backtrack=0)
    assert no_backtrack.chunks[0].tokens[72:76] == [dog] * 4


def test_weights_follow_tokens_and_ignore_mode_drops_them(tok):
    t = _chunks("a (cat:1.5) [dog]", tok)
    mults = t.chunks[0].multipliers
    assert mults[:5] == [1.0, 1.0, 1.5, pytest.approx(1 / 1.1), 1.0]
    assert set(_chunks("a (cat:1.5) [dog]", tok, emphasis="Ignore").chunks[0].multipliers) == {1.0}


# ------------------------------------------------------------------------------------------------
# the emphasis formula on the tiny text encoder, recomputed here
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd1(tiny_sd1):
    """A copy whose final layer norm has a bias (the tiny base's is zero, so every chunk's mean would
    be 0 and the webui's re-normalisation undefined; real encoders have one)."""
    pipe = copy.copy(tiny_sd1)
    te = copy.deepcopy(tiny_sd1.text_encoder)
    ln = getattr(te, "text_model", te).final_layer_norm
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        ln.bias.copy_(0.05 + 0.1 * torch.randn(ln.bias.shape, generator=g))
    pipe.text_encoder = te
    return pipe


def _reference(pipe, fragments, chunk_breaks=()):
    """A1111 by hand: tokens per fragment, 75-token chunks, encode each chunk, z*w, z*(mean/mean')."""
    tok, te = pipe.tokenizer, pipe.text_encoder
    tokens, weights = [], []
    for text, w in fragments:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        tokens += ids
        weights += [w] * len(ids)
    chunks = [(tokens[i:i + 75], weights[i:i + 75]) for i in range(0, max(len(tokens), 1), 75)]
    out = []
    for ids, ws in chunks:
        pad = 75 - len(ids)
        ids = [tok.bos_token_id] + ids + [tok.eos_token_id] * (pad + 1)
        ws = torch.tensor([[1.0] + ws + [1.0] * (pad + 1)])
        with torch.no_grad():
            z = te(torch.tensor([ids]))[0]
        mean = z.mean()
        z = z * ws[..., None]
        out.append(z * (mean / z.mean()))
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("prompt, fragments", [
    ("a photo of a (cat:1.4) on a [mat]", [("a photo of a ", 1.0), ("cat", 1.4), (" on a ", 1.0), ("mat", 1 / 1.1)]),
    ("((red)) " * 40, [("red", 1.21)] * 40),  # 80 tokens: two chunks
])
def test_emphasis_equals_the_webui_formula(sd1, prompt, fragments):
    got = PromptEncoder(sd1).encode(prompt)
    want = _reference(sd1, fragments)
    assert got.embeds.shape == want.shape
    torch.testing.assert_close(got.embeds, want, rtol=1e-5, atol=1e-6)


def test_each_chunk_keeps_its_mean(sd1):
    enc = PromptEncoder(sd1)
    weighted = enc.encode("(cat:1.5) " * 76)
    plain = enc.encode("cat " * 76)
    assert weighted.embeds.shape[1] == 154 and plain.embeds.shape[1] == 154
    for i in range(2):
        a, b = weighted.embeds[:, 77 * i:77 * (i + 1)], plain.embeds[:, 77 * i:77 * (i + 1)]
        torch.testing.assert_close(a.mean(), b.mean(), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(weighted.embeds, plain.embeds)
    assert enc.encode("cat " * 75).embeds.shape[1] == 77
    assert enc.encode("cat BREAK dog").embeds.shape[1] == 154


def test_unweighted_prompt_equals_diffusers(sd1):
    ours = PromptEncoder(sd1).encode("a photo of a cat").embeds
    theirs = sd1.encode_prompt("a photo of a cat", "cpu", 1, False)[0]
    assert torch.equal(ours, theirs)


def test_clip_skip_takes_an_earlier_layer_then_the_final_norm(sd1):
    te = sd1.text_encoder
    ours = PromptEncoder(sd1).encode("a cat", clip_skip=2).embeds
    ids = sd1.tokenizer("a cat", padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = te(ids, output_hidden_states=True).hidden_states[-2]
        want = getattr(te, "text_model", te).final_layer_norm(hidden)
    torch.testing.assert_close(ours, want)
    assert not torch.allclose(ours, PromptEncoder(sd1).encode("a cat").embeds)


def test_sdxl_two_encoders_pooled_from_first_chunk(tiny_sdxl):
    enc = PromptEncoder(tiny_sdxl)
    ours = enc.encode("a photo of a cat")
    embeds, _, pooled, _ = tiny_sdxl.encode_prompt("a photo of a cat", device="cpu", num_images_per_prompt=1,
                                                   do_classifier_free_guidance=False)
    widths = tiny_sdxl.text_encoder.config.hidden_size + tiny_sdxl.text_encoder_2.config.hidden_size
    assert ours.embeds.shape == (1, 77, widths)
    assert torch.equal(ours.embeds, embeds) and torch.equal(ours.pooled, pooled)
    long = enc.encode("a photo of a cat BREAK in the snow")
    assert long.embeds.shape == (1, 154, widths)
    torch.testing.assert_close(long.pooled, enc.encode("a photo of a cat").pooled)  # chunks are encoded as one batch
    # the second tokenizer pads with "!" (id 0) after the end token, as open_clip does
    ids = enc.tokenize("a cat")[1].chunks[0].tokens
    assert ids[:4] == [49406, 320, 2368, 49407]
