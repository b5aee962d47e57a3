"""Prompt embeddings as the webui computes them: chunks, clip skip, emphasis, SDXL's two encoders.

For every text encoder of the pipeline the prompt is parsed and packed into 77-token chunks
(:mod:`adapterhub.sample.prompt`); each chunk is encoded, multiplied by its token weights and
re-normalised to its original mean (``modules/sd_emphasis.py`` ``EmphasisOriginal``), and the
chunks are concatenated on the token axis. SD1/SD2 take the last hidden state, or with ``Clip
skip: N > 1`` the N-th from last followed by the final layer norm. SDXL takes both encoders'
penultimate hidden states (no final norm) concatenated on the channel axis, and the second
encoder's projected pooled output of the first chunk; like the webui it ignores clip skip.

A denoising pass takes :class:`Prompts` (:func:`pass_prompts`): the ``AND`` sub-prompts and the negative
prompt, each a :class:`Scheduled` list of conditionings over the sampler calls (prompt editing
``[from:to:when]`` and alternation ``[a|b]``), the texts of one schedule encoded as one batch as the webui does
(:func:`encode_texts`).
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from adapterhub.errors import AdapterhubError
from adapterhub.sample.prompt import (
    Tokenized,
    prompt_schedule,
    schedule_index,
    split_and,
    tokenize_prompt,
    vocabulary_of,
)


@dataclass
class Conditioning:
    """One prompt's embeddings: ``embeds`` (1, 77*k, C), ``pooled`` (1, P) for SDXL."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None
    token_count: int

    @property
    def chunks(self) -> int:
        return self.embeds.shape[1] // 77

    def zeros(self) -> Conditioning:
        pooled = torch.zeros_like(self.pooled) if self.pooled is not None else None
        return Conditioning(torch.zeros_like(self.embeds), pooled, 0)


def apply_emphasis(z: torch.Tensor, multipliers: torch.Tensor, mode: str = "Original") -> torch.Tensor:
    """The webui's emphasis on one chunk ``z`` (B, 77, C) with ``multipliers`` (B, 77).

    All-ones multipliers leave ``z`` as it is: the webui's ``z * (mean / mean)`` is the same whenever
    it is defined, and a chunk whose mean is exactly 0 (a final layer norm without bias, as in the
    tiny test bases) would otherwise become NaN."""
    if mode in ("Ignore", "None") or bool((multipliers == 1).all()):
        return z
    original_mean = z.mean()
    z = z * multipliers.reshape(multipliers.shape + (1,)).expand(z.shape)
    if mode == "No norm":
        return z
    ratio = original_mean / z.mean()
    if not torch.isfinite(ratio):  # a chunk whose weighted mean is exactly 0: the webui would give NaN
        return z
    return z * ratio


def _final_layer_norm(encoder):
    return getattr(encoder, "text_model", encoder).final_layer_norm


class PromptEncoder:
    """Encodes prompts for one pipeline (SD1, SD2 or SDXL); built once, used per request."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.is_xl = getattr(pipe, "text_encoder_2", None) is not None
        pairs = [(pipe.tokenizer, pipe.text_encoder)]
        if self.is_xl:
            pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
        self.pairs = pairs

    def tokenize(self, prompt: str, emphasis: str = "Original") -> list[Tokenized]:
        """Chunks per tokenizer (the vocabulary is read each time: textual inversions add tokens)."""
        out = []
        for tokenizer, _ in self.pairs:
            def ids(texts, tokenizer=tokenizer):
                return tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]

            out.append(tokenize_prompt(prompt, ids, vocabulary_of(tokenizer), emphasis))
        if len({len(t.chunks) for t in out}) > 1:
            raise AdapterhubError("prompt: the two tokenizers split it into different numbers of chunks")
        return out

    def encode(self, prompt: str, clip_skip: int = 1, emphasis: str = "Original") -> Conditioning:
        if clip_skip < 1:
            raise AdapterhubError(f"clip skip {clip_skip}: must be 1 (the last layer) or more")
        tokenized = self.tokenize(prompt, emphasis)
        parts, pooled = [], None
        for (tokenizer, encoder), tok in zip(self.pairs, tokenized):
            ids = torch.tensor([c.tokens for c in tok.chunks], device=encoder.device)
            ids = _pad_after_end(ids, tokenizer)
            mults = torch.tensor([c.multipliers for c in tok.chunks], device=encoder.device)
            with torch.no_grad():
                z, pool = self._hidden(encoder, ids, clip_skip)
                z = torch.cat([apply_emphasis(z[i:i + 1], mults[i:i + 1].to(z.dtype), emphasis)
                               for i in range(z.shape[0])], dim=1)
            parts.append(z)
            if pool is not None:
                pooled = pool[:1]  # the first chunk's, as the webui does
        embeds = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
        return Conditioning(embeds, pooled, tokenized[0].token_count)

    def _hidden(self, encoder, ids: torch.Tensor, clip_skip: int):
        if self.is_xl:
            out = encoder(ids, output_hidden_states=True)
            pooled = getattr(out, "text_embeds", None)
            return out.hidden_states[-2], pooled
        if clip_skip > 1:
            out = encoder(ids, output_hidden_states=True)
            return _final_layer_norm(encoder)(out.hidden_states[-clip_skip]), None
        return encoder(ids)[0], None


def _pad_after_end(ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """OpenCLIP tokenizers pad with a token other than EOS: everything after the first EOS becomes it."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    if pad is None or pad == eos:
        return ids
    ids = ids.clone()
    for row in ids:
        first = int((row == eos).nonzero()[0])
        row[first + 1:] = pad
    return ids


def add_time_ids(width: int, height: int, batch: int, dtype: torch.dtype, device) -> torch.Tensor:
    """SDXL's size conditioning: original size, crop (0, 0), target size, as (h, w) pairs."""
    ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype)
    return ids.to(device).repeat(batch, 1)


# -- a pass's conditioning: AND sub-prompts and prompt-editing schedules ------------------------------------
@dataclass
class Scheduled:
    """One prompt's conditioning over the sampler calls: ``conds[i]`` up to call ``ends[i]`` (the webui's
    list of ``ScheduledPromptConditioning``; one entry for a prompt without editing or alternation)."""

    ends: list[int]
    conds: list[Conditioning]

    def index(self, step: int) -> int:
        return schedule_index(self.ends, step)


@dataclass
class Prompts:
    """What a denoising pass needs from the prompts: the ``AND`` sub-prompts with their weights, and the
    negative prompt."""

    conds: list[tuple[Scheduled, float]]
    uncond: Scheduled

    @classmethod
    def constant(cls, cond: Conditioning, uncond: Conditioning) -> Prompts:
        return cls([(Scheduled([sys.maxsize], [cond]), 1.0)], Scheduled([sys.maxsize], [uncond]))

    @property
    def plain(self) -> bool:
        """One prompt of weight 1: with CFG 1 the unconditional prediction is not needed."""
        return len(self.conds) == 1 and self.conds[0][1] == 1.0


def stack_conds(embeds: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sub-prompts of different lengths padded by repeating their last vector (``stack_conds``)."""
    longest = max(e.shape[1] for e in embeds)
    return [e if e.shape[1] == longest else torch.cat([e, e[:, -1:].repeat(1, longest - e.shape[1], 1)], dim=1)
            for e in embeds]


def _zeroes_empty_negative(pipe, encoder: PromptEncoder) -> bool:
    """SDXL's empty negative prompt is zeros, in the webui and in diffusers (``force_zeros_for_empty_prompt``)."""
    return encoder.is_xl and pipe.config.get("force_zeros_for_empty_prompt", False)


def encode_pair(encoder: PromptEncoder, pipe, stack, prompt: str, negative: str, clip_skip: int = 1,
                emphasis: str = "Original") -> tuple[Conditioning, Conditioning]:
    """A prompt and its negative prompt, each as one conditioning (no ``AND``, no schedule), with ``stack``'s
    prompt rewrites (embedding words) applied."""
    if stack is not None:
        prompt, negative = stack.rewrite_prompt(prompt), stack.rewrite_prompt(negative)
    cond = encoder.encode(prompt, clip_skip, emphasis)
    if negative == "" and _zeroes_empty_negative(pipe, encoder):
        uncond = cond.zeros()  # the webui and diffusers both zero SDXL's empty negative prompt
    else:
        uncond = encoder.encode(negative, clip_skip, emphasis)
    return cond, uncond


def pass_prompts(encoder: PromptEncoder, pipe, stack, prompt: str, negative: str, steps: int,
                 hires_steps: int | None = None, clip_skip: int = 1, emphasis: str = "Original",
                 cache: dict | None = None) -> Prompts:
    """The conditioning of one pass: ``prompt`` split at ``AND``, every sub-prompt and the negative prompt
    scheduled over ``steps`` sampler calls (with ``hires_steps``: the hires pass of that many calls,
    ``steps`` being the first pass's), ``stack``'s prompt rewrites applied. ``cache`` shares encodings
    between passes."""
    cache = {} if cache is None else cache

    def scheduled(text: str, negative: bool = False) -> Scheduled:
        schedule = prompt_schedule(text, steps, hires_steps)
        texts = tuple(stack.rewrite_prompt(t) if stack is not None else t for _, t in schedule)
        key = (texts, negative, clip_skip, emphasis)
        if key not in cache:
            cache[key] = encode_texts(encoder, texts, clip_skip, emphasis)
            if negative and all(t == "" for t in texts) and _zeroes_empty_negative(pipe, encoder):
                cache[key] = [c.zeros() for c in cache[key]]  # the webui and diffusers zero it
        return Scheduled([end for end, _ in schedule], cache[key])

    return Prompts([(scheduled(text), weight) for text, weight in split_and(prompt)], scheduled(negative, True))


def encode_texts(encoder: PromptEncoder, texts: Sequence[str], clip_skip: int, emphasis: str) -> list[Conditioning]:
    """The texts of one prompt's schedule, encoded as the webui encodes them: as one batch, in which a
    text with fewer chunks gets empty chunks (BOS, then EOS) and emphasis re-normalises each chunk by the
    mean over the whole batch (``sd_hijack_clip``, ``sd_emphasis``). One text: ``PromptEncoder.encode``."""
    if len(texts) == 1:
        return [encoder.encode(texts[0], clip_skip, emphasis)]
    unique = list(dict.fromkeys(texts))
    rows = [unique.index(t) for t in texts]  # the batch, duplicates included, as rows of ``unique``
    tokenized = [encoder.tokenize(t, emphasis) for t in unique]
    per_encoder, pooled = [], None
    for k, (tokenizer, text_encoder) in enumerate(encoder.pairs):
        empty = [tokenizer.bos_token_id] + [tokenizer.eos_token_id] * 76
        chunks = max(len(tok[k].chunks) for tok in tokenized)
        zs = []
        for c in range(chunks):
            picked = [tok[k].chunks[c] if c < len(tok[k].chunks) else None for tok in tokenized]
            ids = torch.tensor([p.tokens if p else empty for p in picked], device=text_encoder.device)
            mults = torch.tensor([p.multipliers if p else [1.0] * 77 for p in picked], device=text_encoder.device)
            with torch.no_grad():
                z, pool = encoder._hidden(text_encoder, _pad_after_end(ids, tokenizer), clip_skip)
                z = apply_emphasis(z[rows], mults[rows].to(z.dtype), emphasis)
            zs.append(z)
            if c == 0 and pool is not None:
                pooled = pool[rows]  # each text's first chunk, as the webui
        per_encoder.append(torch.cat(zs, dim=1))
    embeds = torch.cat(per_encoder, dim=-1) if len(per_encoder) > 1 else per_encoder[0]
    first = {t: texts.index(t) for t in unique}
    counts = {t: tokenized[i][0].token_count for i, t in enumerate(unique)}
    out = []
    for t in texts:
        i = first[t]
        out.append(Conditioning(embeds[i:i + 1], pooled[i:i + 1] if pooled is not None else None, counts[t]))
    return out
