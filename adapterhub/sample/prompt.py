"""AUTOMATIC1111 prompt syntax: emphasis, ``BREAK`` and 75-token chunks.

A port of the webui's ``modules/prompt_parser.parse_prompt_attention`` and of the chunking in
``modules/sd_hijack_clip.FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line`` (see
``shared/reference/sampling.md`` §4): same regular expressions, same multipliers (``(x)`` x1.1,
``[x]`` /1.1, ``(x:w)`` x w, nesting multiplies, unclosed brackets apply to the rest), same merging of
equal-weight runs, same comma back-off and same padding. Pure Python: no tokenizer is imported here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

from adapterhub.errors import AdapterhubError

RE_ATTENTION = re.compile(r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""", re.X)
RE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
ROUND, SQUARE = 1.1, 1 / 1.1
CHUNK_LENGTH = 75  # tokens per chunk between BOS and EOS
COMMA_BACKTRACK = 20  # the webui's ``comma_padding_backtrack`` default
EMPHASIS_MODES = ("Original", "No norm", "Ignore", "None")


def parse_prompt_attention(text: str) -> list[list]:
    """``[[text, weight], ...]`` for an A1111 prompt; ``BREAK`` becomes ``["BREAK", -1]``.

    >>> parse_prompt_attention("an (important) word")
    [['an ', 1.0], ['important', 1.1], [' word', 1.0]]
    """
    res: list[list] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply_range(start: int, multiplier: float) -> None:
        for p in range(start, len(res)):
            res[p][1] *= multiplier

    for m in RE_ATTENTION.finditer(text):
        piece, weight = m.group(0), m.group(1)
        if piece.startswith("\\"):
            res.append([piece[1:], 1.0])
        elif piece == "(":
            round_brackets.append(len(res))
        elif piece == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), _weight(weight, piece))
        elif piece == ")" and round_brackets:
            multiply_range(round_brackets.pop(), ROUND)
        elif piece == "]" and square_brackets:
            multiply_range(square_brackets.pop(), SQUARE)
        else:
            for i, part in enumerate(RE_BREAK.split(piece)):
                if i > 0:
                    res.append(["BREAK", -1])
                res.append([part, 1.0])
    for pos in round_brackets:
        multiply_range(pos, ROUND)
    for pos in square_brackets:
        multiply_range(pos, SQUARE)
    if not res:
        res = [["", 1.0]]
    i = 0
    while i + 1 < len(res):  # merge runs of identical weights
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return res


def _weight(text: str, piece: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise AdapterhubError(f"prompt: weight {text!r} in {piece.strip()!r} is not a number") from None


@dataclass
class Chunk:
    """77 token ids (BOS, 75 tokens or padding, EOS) and one multiplier per token."""

    tokens: list[int] = field(default_factory=list)
    multipliers: list[float] = field(default_factory=list)


@dataclass
class Tokenized:
    chunks: list[Chunk]
    token_count: int  # what the webui reports: 75 per full chunk + the length of the last


@dataclass(frozen=True)
class Vocabulary:
    """The ids chunking needs from a tokenizer; ``base_size``: ids at or above it are added tokens
    (textual-inversion vectors), which are never split across chunks."""

    bos: int
    eos: int
    comma: int
    base_size: int


def vocabulary_of(tokenizer) -> Vocabulary:
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    return Vocabulary(tokenizer.bos_token_id, tokenizer.eos_token_id, comma, tokenizer.vocab_size)


def fragments(prompt: str, emphasis: str = "Original") -> list[list]:
    if emphasis not in EMPHASIS_MODES:
        raise AdapterhubError(f"emphasis {emphasis!r}: choose one of {', '.join(EMPHASIS_MODES)}")
    if emphasis == "None":
        return [[prompt, 1.0]]
    return parse_prompt_attention(prompt)


def tokenize_prompt(prompt: str, tokenize: Callable[[list[str]], Sequence[Sequence[int]]], vocab: Vocabulary,
                    emphasis: str = "Original", comma_backtrack: int = COMMA_BACKTRACK) -> Tokenized:
    """The webui's ``tokenize_line``: fragments tokenized separately (``tokenize`` takes a list of
    texts and returns their ids without BOS/EOS), then packed into 75-token chunks. With ``Ignore``
    emphasis the syntax is parsed but every multiplier is 1."""
    parsed = fragments(prompt, emphasis)
    tokenized = tokenize([text for text, _ in parsed])
    chunks: list[Chunk] = []
    chunk = Chunk()
    token_count = 0
    last_comma = -1

    def next_chunk(is_last: bool = False) -> None:
        nonlocal chunk, token_count, last_comma
        token_count += len(chunk.tokens) if is_last else CHUNK_LENGTH
        to_add = CHUNK_LENGTH - len(chunk.tokens)
        if to_add > 0:
            chunk.tokens += [vocab.eos] * to_add
            chunk.multipliers += [1.0] * to_add
        chunk.tokens = [vocab.bos] + chunk.tokens + [vocab.eos]
        chunk.multipliers = [1.0] + chunk.multipliers + [1.0]
        last_comma = -1
        chunks.append(chunk)
        chunk = Chunk()

    for tokens, (text, weight) in zip(tokenized, parsed):
        if text == "BREAK" and weight == -1:
            next_chunk()
            continue
        if emphasis == "Ignore":
            weight = 1.0
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == vocab.comma:
                last_comma = len(chunk.tokens)
            elif (comma_backtrack and len(chunk.tokens) == CHUNK_LENGTH and last_comma != -1
                  and len(chunk.tokens) - last_comma <= comma_backtrack):
                cut = last_comma + 1
                moved_tokens, moved_mults = chunk.tokens[cut:], chunk.multipliers[cut:]
                chunk.tokens, chunk.multipliers = chunk.tokens[:cut], chunk.multipliers[:cut]
                next_chunk()
                chunk.tokens, chunk.multipliers = moved_tokens, moved_mults
            if len(chunk.tokens) == CHUNK_LENGTH:
                next_chunk()
            run = _added_run(tokens, position, vocab.base_size)
            if run > 1 and len(chunk.tokens) + run > CHUNK_LENGTH:  # an embedding stays in one chunk
                next_chunk()
            step = max(run, 1)
            chunk.tokens += list(tokens[position:position + step])
            chunk.multipliers += [weight] * step
            position += step
    if chunk.tokens or not chunks:
        next_chunk(is_last=True)
    return Tokenized(chunks, token_count)


def _added_run(tokens: Sequence[int], position: int, base_size: int) -> int:
    """How many added-token ids (a multi-vector embedding) start at ``position`` (0 if none)."""
    end = position
    while end < len(tokens) and tokens[end] >= base_size and end - position < CHUNK_LENGTH:
        end += 1
    return end - position
