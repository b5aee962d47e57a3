"""AUTOMATIC1111 prompt syntax: emphasis, ``BREAK`` and 75-token chunks.

A port of the webui's ``modules/prompt_parser.parse_prompt_attention`` and of the chunking in
``modules/sd_hijack_clip.FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line`` (see
``shared/reference/sampling.md`` §4): same regular expressions, same multipliers (``(x)`` x1.1,
``[x]`` /1.1, ``(x:w)`` x w, nesting multiplies, unclosed brackets apply to the rest), same merging of
equal-weight runs, same comma back-off and same padding. Pure Python: no tokenizer is imported here.

Also the prompt's schedule (``get_learned_conditioning_prompt_schedules``: prompt editing ``[from:to:when]``
and alternation ``[a|b]``, :func:`prompt_schedule`) and its ``AND`` sub-prompts (``get_multicond_prompt_list``,
:func:`split_and`). The webui parses schedules with an ambiguous lark (Earley) grammar; the parser here
reads the same language deterministically, taking a bracket that opens a construct as that construct. On
prompts whose brackets nest it gives what the webui's grammar gives under lark 1.1.2 (the webui's pin) and
1.3.1 (compared on random such prompts), and it passes the webui's doctests but one that the webui's own code
fails too. Where a construct is directly followed by unmatched ``] ) :`` characters, lark's choice between
the construct and plain text depends on its internal derivation order (and differs between those two
versions); the construct is taken here.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

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
""", re.VERBOSE)
RE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.DOTALL)
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


# ---------------------------------------------------------------------------------------------
# Prompt editing [from:to:when], alternation [a|b] (prompt_parser.get_learned_conditioning_prompt_schedules)
# ---------------------------------------------------------------------------------------------
# The webui parses with a lark grammar; this is a small recursive-descent parser for the same language.
# At the top level brackets and colons that do not close a construct are kept as text; inside a
# construct everything must nest. A ``|`` outside an alternation, or a backslash with nothing to escape,
# makes the grammar fail, and then the whole prompt is used as written at every step.
RE_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")  # text, with backslash escapes
RE_SCHEDULE_NUMBER = re.compile(r"[+-]?(?:\d+[eE][+-]?\d+|(?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?|\d+)")  # SIGNED_NUMBER
RE_SPACE = re.compile(r"\s*")


@dataclass
class Edit:
    """``[before:after:when]``: ``before`` (None when omitted) up to step ``when``, then ``after``."""

    before: list | None
    after: list
    when: str  # the number as written: a decimal point makes it a fraction of the steps


@dataclass
class Alternation:
    """``[a|b|…]``: option ``(step - 1) % len(options)`` at each step; empty options are empty text."""

    options: list[list]


class _ScheduleParser:
    def __init__(self, text: str):
        self.text, self.pos = text, 0

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def parse(self) -> list | None:
        """The top level: constructs, text, and stray ``[ ] ( ) :`` kept as text; None if the grammar fails."""
        out: list = []
        while self.pos < len(self.text):
            c = self.text[self.pos]
            if c in "[(":
                start = self.pos
                node = self.construct()
                if node is not None:
                    out += node
                    continue
                self.pos = start + 1
                out.append(c)
            elif c in "]):":
                self.pos += 1
                out.append(c)
            else:
                m = RE_PLAIN.match(self.text, self.pos)
                if m is None:  # "|" outside [a|b], or a lone backslash
                    return None
                self.pos = m.end()
                out.append(m.group(0))
        return out

    def sequence(self) -> list | None:
        """Text and nested constructs up to ``] ) : |`` or the end; None if a nested construct fails."""
        out: list = []
        while (c := self.peek()) and c not in "]):|":
            if c in "[(":
                node = self.construct()
                if node is None:
                    return None
                out += node
                continue
            m = RE_PLAIN.match(self.text, self.pos)
            if m is None:
                return None
            self.pos = m.end()
            out.append(m.group(0))
        return out

    def construct(self) -> list | None:
        opening = self.text[self.pos]
        self.pos += 1
        first = self.sequence()
        if first is None:
            return None
        if opening == "(":  # emphasis stays text here; parse_prompt_attention reads it later
            if self.take(")"):
                return ["(", *first, ")"]
            if self.take(":"):
                second = self.sequence()
                if second is not None and self.take(")"):
                    return ["(", *first, ":", *second, ")"]
            return None
        if self.take("]"):
            return ["[", *first, "]"]
        if self.peek() == "|":
            options = [first]
            while self.take("|"):
                option = self.sequence()
                if option is None:
                    return None
                options.append(option)
            return [Alternation(options)] if self.take("]") else None
        if not self.take(":"):
            return None
        after_colon = self.pos
        when = self.closing_number()
        if when is not None:
            return [Edit(None, first, when)]
        self.pos = after_colon
        second = self.sequence()
        if second is None or not self.take(":"):
            return None
        when = self.closing_number()
        return [Edit(first, second, when)] if when is not None else None

    def take(self, char: str) -> bool:
        if self.peek() == char:
            self.pos += 1
            return True
        return False

    def closing_number(self) -> str | None:
        """``[spaces] NUMBER [spaces] ]``: the number, the position after the bracket."""
        pos = RE_SPACE.match(self.text, self.pos).end()
        m = RE_SCHEDULE_NUMBER.match(self.text, pos)
        if m is None:
            return None
        pos = RE_SPACE.match(self.text, m.end()).end()
        if not self.text.startswith("]", pos):
            return None
        self.pos = pos + 1
        return m.group(0)


def _walk(nodes: list):
    for node in nodes:
        if isinstance(node, Edit):
            yield node
            yield from _walk(node.before or [])
            yield from _walk(node.after)
        elif isinstance(node, Alternation):
            yield node
            for option in node.options:
                yield from _walk(option)


def _render(nodes: list, step: int, whens: dict[int, int]) -> str:
    parts = []
    for node in nodes:
        if isinstance(node, str):
            parts.append(node)
        elif isinstance(node, Edit):
            parts.append(_render(node.before or [], step, whens) if step <= whens[id(node)]
                         else _render(node.after, step, whens))
        else:
            parts.append(_render(node.options[(step - 1) % len(node.options)], step, whens))
    return "".join(parts)


def prompt_schedule(prompt: str, steps: int, hires_steps: int | None = None) -> list[tuple[int, str]]:
    """``[(end_at_step, text), …]``: the webui's ``get_learned_conditioning_prompt_schedules`` for one
    prompt (its current scheduling, not ``use_old_scheduling``).

    ``when`` with a decimal point is a fraction of ``steps`` (``int(v * steps)``), otherwise a step
    number; clamped to ``steps``. For the hires pass (``hires_steps`` given, ``steps`` the first pass's)
    integers count on from the first pass and fractions from 1.0, over ``hires_steps``. Alternation adds
    every step. Step ``s`` (1-based) uses the text of the first entry whose end is at least ``s``.

    >>> prompt_schedule("a [b:c:0.5] d", 10)
    [(5, 'a b d'), (10, 'a c d')]
    """
    int_offset, float_offset, total = (0, 0.0, steps) if hires_steps is None else (steps, 1.0, hires_steps)
    tree = _ScheduleParser(prompt).parse()
    if tree is None:
        return [(total, prompt)]
    ends = {total}
    whens: dict[int, int] = {}
    for node in _walk(tree):
        if isinstance(node, Alternation):
            ends.update(range(1, total + 1))
            continue
        value = float(node.when)
        value = (value - float_offset) * total if "." in node.when else value - int_offset
        whens[id(node)] = int(min(total, value)) if value > -math.inf else -(1 << 62)
        if whens[id(node)] >= 1:
            ends.add(whens[id(node)])
    return [(end, _render(tree, end, whens)) for end in sorted(ends)]


def schedule_index(ends: Sequence[int], step: int) -> int:
    """The entry used at sampler call ``step`` (0-based), as ``reconstruct_cond_batch`` picks it: the
    first whose end is at least ``step``, the first entry if none is."""
    for i, end in enumerate(ends):
        if step <= end:
            return i
    return 0


# ---------------------------------------------------------------------------------------------
# Composable diffusion: "a cat AND a dog :0.5" (prompt_parser.get_multicond_prompt_list)
# ---------------------------------------------------------------------------------------------
RE_AND = re.compile(r"\bAND\b")
RE_SUBPROMPT_WEIGHT = re.compile(r"^(.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$", re.DOTALL)


def split_and(prompt: str) -> list[tuple[str, float]]:
    """``[(sub-prompt, weight), …]``: the prompt split at every whole-word ``AND``; a sub-prompt ending
    in ``:number`` has that weight (1 otherwise), even when there is no ``AND``.

    >>> split_and("a cat AND a dog :0.5")
    [('a cat', 1.0), (' a dog', 0.5)]
    """
    out = []
    for part in RE_AND.split(prompt):
        m = RE_SUBPROMPT_WEIGHT.match(part)
        text, weight = m.group(1), m.group(2)
        out.append((text, float(weight) if weight is not None else 1.0))
    return out
