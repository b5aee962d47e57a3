"""Adding and removing textual-inversion tokens: tokenizer entries plus token-table rows.

Attach follows diffusers ``load_textual_inversion``: each vector becomes one added token (``tok``,
``tok_1`` ...), appended to the tokenizer and to the text encoder's token table, so token ids and prompt
embeddings are the ones diffusers produces. Detach removes exactly those tokens and rows, renumbering
tokens added after them (as diffusers ``unload_textual_inversion`` does); when nothing else was added
in between, the original table module itself is put back, so the tables are restored bit for bit.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from torch import nn

from adapterhub.errors import AdapterError
from adapterhub.types import Adapter, Handle
from adapterhub.weights import component

from .formats import ENCODERS, EmbeddingPatch


@dataclass
class Slot:
    """One text encoder's share of an attached embedding."""

    tokenizer: object
    text_encoder: nn.Module
    tokens: list[str]
    vectors: torch.Tensor
    original_table: nn.Embedding
    original_vocab_size: int | None


# --------------------------------------------------------------------------------------------
# validation: everything is checked before the first change
# --------------------------------------------------------------------------------------------
def _targets(adapter: Adapter, pipe) -> list[tuple[EmbeddingPatch, object, nn.Module]]:
    found = []
    patches = {p.encoder: p for p in adapter.patches.values()}
    for encoder, patch in patches.items():
        te_name, tok_name = ENCODERS[encoder]
        te, tok = component(pipe, te_name), component(pipe, tok_name)
        if te is None or tok is None:
            raise AdapterError(adapter.path, f"the model has no {te_name} / {tok_name} for the {encoder} vectors "
                                             f"(an embedding for {adapter.base})", patch.source)
        found.append((patch, tok, te))
    if "clip_g" not in patches and component(pipe, "text_encoder_2") is not None:
        raise AdapterError(adapter.path, f"a single-encoder {adapter.base} embedding ({patches['clip_l'].width} wide) "
                                         "cannot be used by a two-encoder (sdxl) model: it has no clip_g vectors")
    return found


def _check(adapter: Adapter, patch: EmbeddingPatch, tok, te: nn.Module) -> None:
    table = te.get_input_embeddings()
    width = table.weight.shape[1]
    if patch.width != width:
        raise AdapterError(adapter.path, f"vectors are {patch.width} wide but {patch.component} takes {width} "
                                         f"(the embedding is for {adapter.base})", patch.source)
    vocab = tok.get_vocab()
    for token in patch.tokens:
        if token in vocab:
            raise AdapterError(adapter.path, f"token {token!r} is already in {patch.tokenizer}'s vocabulary "
                                             "(attached twice, or a name the tokenizer knows)", patch.source)
    if len(tok) != table.num_embeddings:
        raise AdapterError(adapter.path, f"{patch.tokenizer} has {len(tok)} tokens but {patch.component}'s table "
                                         f"has {table.num_embeddings} rows; they must agree", patch.source)


# --------------------------------------------------------------------------------------------
# the token table
# --------------------------------------------------------------------------------------------
def _new_table(old: nn.Embedding, weight: torch.Tensor) -> nn.Embedding:
    table = nn.Embedding.from_pretrained(weight, freeze=not old.weight.requires_grad, padding_idx=old.padding_idx,
                                         max_norm=old.max_norm, norm_type=old.norm_type,
                                         scale_grad_by_freq=old.scale_grad_by_freq, sparse=old.sparse)
    table.train(old.training)
    return table


def _set_table(te: nn.Module, table: nn.Embedding) -> None:
    te.set_input_embeddings(table)
    config = getattr(te, "config", None)
    if config is not None and hasattr(config, "vocab_size"):
        config.vocab_size = table.num_embeddings


def _rows(vectors: torch.Tensor, weight: float, like: torch.Tensor) -> torch.Tensor:
    rows = vectors.to(device=like.device)
    if weight != 1.0:
        rows = rows.float() * weight
    return rows.to(like.dtype)


def _grow(te: nn.Module, ids: list[int], vectors: torch.Tensor, weight: float) -> None:
    old = te.get_input_embeddings()
    rows = max(old.num_embeddings, max(ids) + 1)
    weight_tensor = torch.zeros(rows, old.embedding_dim, device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        weight_tensor[: old.num_embeddings].copy_(old.weight)
        weight_tensor[ids] = _rows(vectors, weight, weight_tensor)
    _set_table(te, _new_table(old, weight_tensor))


def write_rows(slot: Slot, weight: float) -> None:
    table = slot.text_encoder.get_input_embeddings()
    ids = slot.tokenizer.convert_tokens_to_ids(slot.tokens)
    with torch.no_grad():
        table.weight[ids] = _rows(slot.vectors, weight, table.weight)


# --------------------------------------------------------------------------------------------
# the tokenizer
# --------------------------------------------------------------------------------------------
def _added_tokens_span(text: str) -> tuple[int, int, list[dict]]:
    """Where the ``added_tokens`` array sits in a serialized tokenizer, and its entries.

    Only that small array is parsed; the vocabulary and merges (megabytes) are copied through as text.
    """
    marker = '"added_tokens":'
    at = text.find(marker)
    if at < 0:
        raise ValueError("serialized tokenizer has no added_tokens")
    start = at + len(marker)
    while text[start].isspace():
        start += 1
    entries, end = json.JSONDecoder().raw_decode(text, start)
    return start, end, entries


def _remove_tokens(tok, tokens: list[str]) -> list[int]:
    """Remove added ``tokens`` (ids returned); later added tokens move down to close the gap."""
    encoder = tok.added_tokens_encoder
    removed = sorted(encoder[t] for t in tokens if t in encoder)
    if not removed:
        return []
    shift = lambda i: i - sum(1 for r in removed if r < i)  # noqa: E731
    backend = getattr(tok, "_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        from tokenizers import Tokenizer

        text = backend.to_str()
        start, end, entries = _added_tokens_span(text)
        kept = []
        for entry in entries:
            if entry.get("id") in removed and entry.get("content") in tokens:
                continue
            entry["id"] = shift(entry["id"])
            kept.append(entry)
        tok._tokenizer = Tokenizer.from_str(text[:start] + json.dumps(kept, ensure_ascii=False) + text[end:])
    else:  # a python (slow) tokenizer
        decoder = dict(tok._added_tokens_decoder)
        tok._added_tokens_decoder.clear()
        tok._added_tokens_encoder.clear()
        for i, added in sorted(decoder.items()):
            if i in removed:
                continue
            tok._added_tokens_decoder[shift(i)] = added
            tok._added_tokens_encoder[str(added)] = shift(i)
        for update in ("_update_trie", "_update_total_vocab_size"):
            if hasattr(tok, update):
                getattr(tok, update)()
    return removed


# --------------------------------------------------------------------------------------------
# attach / detach
# --------------------------------------------------------------------------------------------
def attach(adapter: Adapter, pipe, weight: float = 1.0) -> "EmbeddingHandle":
    targets = _targets(adapter, pipe)
    for patch, tok, te in targets:
        _check(adapter, patch, tok, te)
    slots = []
    for patch, tok, te in targets:
        original = te.get_input_embeddings()
        vocab_size = getattr(getattr(te, "config", None), "vocab_size", None)
        for token in patch.tokens:
            tok.add_tokens(token)
        ids = tok.convert_tokens_to_ids(patch.tokens)
        _grow(te, ids, patch.vectors, weight)
        slots.append(Slot(tok, te, list(patch.tokens), patch.vectors, original, vocab_size))
    return EmbeddingHandle(adapter, slots, weight)


def detach_slot(slot: Slot) -> None:
    removed = _remove_tokens(slot.tokenizer, slot.tokens)
    te = slot.text_encoder
    table = te.get_input_embeddings()
    gone = set(removed)
    keep = [i for i in range(table.num_embeddings) if i not in gone]
    weight = table.weight.detach()[keep]
    original = slot.original_table
    if original.weight.shape == weight.shape and torch.equal(original.weight.detach(), weight):
        te.set_input_embeddings(original)  # the very module (and parameter) from before attach
        if slot.original_vocab_size is not None:
            te.config.vocab_size = slot.original_vocab_size
    else:
        _set_table(te, _new_table(table, weight.clone()))


def expand_prompt(prompt: str, tokenizer) -> str:
    """Spell each multi-vector name out as ``tok tok_1 ... tok_{n-1}``, as diffusers ``maybe_convert_prompt``.

    Found through the tokenizer (its offsets), so a name matches wherever the tokenizer matches it:
    ``EasyNegative`` written in any case. diffusers compares the *normalised* (lower-cased) token with
    the added token's spelling and then replaces case-sensitively, so under transformers 5 it leaves
    any name with a capital letter unexpanded (one vector used of n); where it does expand, the result
    is the same string as here. A name already followed by its ``_1`` is left as written.
    """
    added = tokenizer.added_tokens_encoder
    bases = {i: t for t, i in added.items() if f"{t}_1" in added}
    if not bases:
        return prompt
    try:
        encoded = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    except (NotImplementedError, TypeError, ValueError):  # a tokenizer without offsets: diffusers' way
        return _expand_by_text(prompt, tokenizer)
    ids, spans = encoded["input_ids"], encoded["offset_mapping"]
    pieces, last = [], 0
    for n, (token_id, (_, end)) in enumerate(zip(ids, spans)):
        base = bases.get(token_id)
        if base is None or (n + 1 < len(ids) and ids[n + 1] == added[f"{base}_1"]):
            continue
        more, i = [], 1
        while f"{base}_{i}" in added:
            more.append(f"{base}_{i}")
            i += 1
        pieces += [prompt[last:end], " " + " ".join(more)]
        last = end
    return "".join(pieces) + prompt[last:]


def _expand_by_text(prompt: str, tokenizer) -> str:
    added = tokenizer.added_tokens_encoder
    for token in set(tokenizer.tokenize(prompt)):
        if token in added:
            replacement, i = token, 1
            while f"{token}_{i}" in added:
                replacement += f" {token}_{i}"
                i += 1
            prompt = prompt.replace(token, replacement)
    return prompt


class EmbeddingHandle(Handle):
    """An attached embedding: ``set_weight`` rescales its rows, ``detach`` removes it."""

    def __init__(self, adapter: Adapter, slots: list[Slot], weight: float):
        self.adapter, self.slots, self.weight, self.attached = adapter, slots, float(weight), True

    @property
    def token(self) -> str:
        return self.adapter.extra.get("token", "")

    @property
    def tokens(self) -> list[str]:
        return list(self.slots[0].tokens) if self.slots else []

    def expand_prompt(self, prompt: str) -> str:
        """The prompt as the text encoder must see it (multi-vector names spelled out)."""
        return expand_prompt(prompt, self.slots[0].tokenizer) if self.slots else prompt

    rewrite_prompt = expand_prompt  # the Handle contract's name for it

    def set_weight(self, weight: float) -> None:
        if not self.attached:
            raise RuntimeError("embedding is detached")
        self.weight = float(weight)
        for slot in self.slots:
            write_rows(slot, self.weight)

    def detach(self) -> None:
        if self.attached:
            for slot in reversed(self.slots):
                detach_slot(slot)
            self.attached = False
