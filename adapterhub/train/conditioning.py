"""Text conditioning as the pipelines compute it, and its cache.

SD1/SD2: the text encoder's last hidden state, or with ``clip_skip`` N the N-th last layer passed
through the final layer norm (diffusers ``encode_prompt``). SDXL: both encoders' penultimate hidden
states concatenated, the second encoder's projected pooled output, and the six ``time_ids``
(original size, crop top-left, target size) kohya and diffusers feed the UNet.

While the text encoders are frozen (the trainable says so) each distinct caption is encoded once, one
caption at a time so the result never depends on which captions share a batch; a resumed run
therefore sees the same tensors as the uninterrupted one.
"""
from __future__ import annotations

import torch

from adapterhub.weights import component


class TextConditioner:
    def __init__(self, pipe, clip_skip: int, device, cache: bool):
        self.pairs = [(component(pipe, t), component(pipe, e)) for t, e in
                      (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
                      if component(pipe, e) is not None]
        self.sdxl = len(self.pairs) == 2
        self.clip_skip, self.device, self.cache_on = max(1, int(clip_skip)), device, cache
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def _ids(self, tokenizer, captions: list[str]) -> torch.Tensor:
        return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids.to(self.device)

    def _encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden, pooled = [], None
        for tokenizer, encoder in self.pairs:
            out = encoder(self._ids(tokenizer, captions), output_hidden_states=True)
            if self.sdxl:
                hidden.append(out.hidden_states[-(self.clip_skip + 1)])
                if encoder is self.pairs[-1][1]:
                    pooled = out.text_embeds if hasattr(out, "text_embeds") else out[0]
            elif self.clip_skip > 1:
                norm = getattr(encoder, "text_model", encoder).final_layer_norm
                hidden.append(norm(out.hidden_states[-self.clip_skip]))
            else:
                hidden.append(out.last_hidden_state)
        return torch.cat(hidden, dim=-1), pooled

    def warm(self, captions) -> None:
        """Encode and keep every caption (frozen text encoders only)."""
        if not self.cache_on:
            return
        with torch.no_grad():
            for caption in sorted(set(captions)):
                if caption not in self.cache:
                    h, p = self._encode([caption])
                    self.cache[caption] = (h[0], None if p is None else p[0])

    def __call__(self, captions: list[str], grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.cache_on and all(c in self.cache for c in captions):
            hidden = torch.stack([self.cache[c][0] for c in captions])
            pooled = None if not self.sdxl else torch.stack([self.cache[c][1] for c in captions])
            return hidden, pooled
        with torch.set_grad_enabled(grad):
            return self._encode(captions)


def time_ids(samples) -> torch.Tensor:
    """SDXL micro-conditioning per sample: (orig h, orig w, crop top, crop left, target h, target w)."""
    rows = [[s.size[1], s.size[0], s.crop[1], s.crop[0], s.bucket[1], s.bucket[0]] for s in samples]
    return torch.tensor(rows, dtype=torch.float32)
