"""Prompt embeddings as the webui computes them: chunks, clip skip, emphasis, SDXL's two encoders.

For every text encoder of the pipeline the prompt is parsed and packed into 77-token chunks
(:mod:`adapterhub.sample.prompt`); each chunk is encoded, multiplied by its token weights and
re-normalised to its original mean (``modules/sd_emphasis.py`` ``EmphasisOriginal``), and the
chunks are concatenated on the token axis. SD1/SD2 take the last hidden state, or with ``Clip
skip: N > 1`` the N-th from last followed by the final layer norm. SDXL takes both encoders'
penultimate hidden states (no final norm) concatenated on the channel axis, and the second
encoder's projected pooled output of the first chunk; like the webui it ignores clip skip.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from adapterhub.errors import AdapterhubError
from adapterhub.sample.prompt import Tokenized, tokenize_prompt, vocabulary_of


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
