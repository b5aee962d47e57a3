"""Training a textual inversion: new token rows in each text encoder's table, nothing else.

The tokens are added exactly as attaching an embedding adds them (``vocab.attach``: ``tok``, ``tok_1``
... appended to tokenizer and table), starting from the embedding of ``init_word`` (repeated or cut
to ``num_vectors``, as kohya does). The whole table is the optimiser's parameter, as in the diffusers
and kohya scripts, and after every step every other row is copied back from the original, so weight
decay and momentum cannot move them: only the new rows change. Captions get the token in front
unless they already name it. The result is written as A1111's ``{"emb_params": (n, d)}`` safetensors
(``.pt``: the A1111 pickle; two encoders: ``clip_l`` / ``clip_g``).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from adapterhub.errors import AdapterhubError
from adapterhub.types import Adapter, Trainable
from adapterhub.weights import architecture_of, component

from . import formats, vocab
from .formats import ENCODERS, EmbeddingPatch


def _init_vectors(tokenizer, encoder, word: str, n: int) -> torch.Tensor:
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if not ids:
        raise AdapterhubError(f"--init-word {word!r} has no tokens")
    table = encoder.get_input_embeddings().weight.detach()
    rows = [table[ids[i % len(ids)]].clone() for i in range(n)]
    return torch.stack(rows).float()


class EmbeddingTrainable(Trainable):
    default_lr = 5e-3  # AUTOMATIC1111's embedding learning rate
    formats = ("a1111", "diffusers")
    format = None

    def __init__(self, token: str, encoders: list[str], slots: list, handle, metadata: dict[str, str]):
        tables = [slot.text_encoder.get_input_embeddings() for slot in slots]
        for table in tables:
            table.weight.requires_grad_(True)
        super().__init__([{"name": "embeddings", "params": [t.weight for t in tables]}], trains_text=True,
                         metadata=metadata)
        self.token, self.encoders, self.slots, self.handle, self.tables = token, encoders, slots, handle, tables
        self.ids = [torch.tensor(slot.tokenizer.convert_tokens_to_ids(slot.tokens)) for slot in slots]
        self.original = [t.weight.detach().clone() for t in tables]
        self.frozen = []
        for table, ids in zip(tables, self.ids):
            mask = torch.ones(table.num_embeddings, dtype=torch.bool, device=table.weight.device)
            mask[ids] = False
            self.frozen.append(mask)
        self._pattern = re.compile(rf"(?<![\w<]){re.escape(token)}(?![\w>])")

    def caption(self, text: str) -> str:
        if not self._pattern.search(text):
            text = f"{self.token}, {text}" if text else self.token
        return self.handle.expand_prompt(text)

    @torch.no_grad()
    def after_step(self) -> None:
        for table, original, mask in zip(self.tables, self.original, self.frozen):
            table.weight[mask] = original[mask]

    def vectors(self) -> dict[str, torch.Tensor]:
        return {encoder: table.weight[ids].detach().float().cpu().clone()
                for encoder, table, ids in zip(self.encoders, self.tables, self.ids)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.vectors()

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for encoder, table, ids in zip(self.encoders, self.tables, self.ids):
            table.weight[ids] = state[encoder].to(table.weight)

    def save(self, path: Path, metadata: dict[str, str]) -> Path:
        vectors = self.vectors()
        path = Path(path)
        pickle = path.suffix.lower() in (".pt", ".bin")
        fmt = "sdxl" if "clip_g" in vectors else ("a1111-pt" if pickle else "a1111-safetensors")
        if self.format == "diffusers" and fmt != "sdxl":
            fmt = "diffusers"
        extra = {"internal_name": self.token, "step": int(metadata.get("ss_steps", 0) or 0),
                 "sd_checkpoint": metadata.get("ss_sd_model_hash"),
                 "sd_checkpoint_name": metadata.get("ss_sd_model_name")}
        return formats.write(vectors, path, fmt, token=self.token if fmt == "diffusers" else None, extra=extra,
                             metadata={**self.metadata, **metadata})


def make_trainable(model, config) -> EmbeddingTrainable:
    token = config.token or config.output_name
    n = int(config.num_vectors)
    patches = {}
    for encoder_name, (te_name, tok_name) in ENCODERS.items():
        encoder, tokenizer = component(model, te_name), component(model, tok_name)
        if encoder is None or tokenizer is None:
            continue
        known = [t for t in formats.expand(token, n) if t in tokenizer.get_vocab()]
        if known:
            raise AdapterhubError(f"textual inversion: {known[0]!r} is already in the tokenizer's vocabulary; choose "
                                  "another --token (the output file's stem by default), e.g. a rare made-up word")
        vectors = _init_vectors(tokenizer, encoder, config.init_word, n)
        patch = EmbeddingPatch(encoder_name, encoder_name, vectors, formats.expand(token, n))
        patches[patch.target] = patch
    if not patches:
        raise AdapterhubError("textual inversion: the model has no text encoder")
    adapter = Adapter(type="textual_inversion", format="a1111-safetensors", patches=patches,
                      base=architecture_of(model), extra={"token": token})
    handle = vocab.attach(adapter, model, 1.0)  # refuses a token the tokenizer already knows
    encoders = [p.encoder for p in adapter.patches.values()]  # attach makes one slot per patch, in order
    trainable = EmbeddingTrainable(token, encoders, handle.slots, handle,
                                   {"modelspec.architecture": "textual-inversion"})
    trainable.format = getattr(config, "format", None)
    return trainable
