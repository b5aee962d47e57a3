"""Textual inversion: learned token embeddings, in every layout users have (see ``formats``).

Attach adds the tokens to the tokenizer(s) and token table(s) as diffusers ``load_textual_inversion``
does (same token ids, same prompt embeddings); detach removes them and restores the tables exactly.
Merge leaves them in, so saving the pipeline afterwards bakes them into its tokenizer and text encoder.
The weight scales the vectors (1 = the file's vectors, bit for bit).

Also here: the aesthetic-gradients embedding (a bare pickled CLIP image embedding), recognised and
named for what it is rather than mistaken for a textual inversion.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from adapterhub.archs import TEXT_WIDTH
from adapterhub.errors import AdapterError
from adapterhub.hookspecs import hookimpl
from adapterhub.io import AdapterFile
from adapterhub.types import UNET_UNTOUCHED, Adapter, AdapterType, ModuleBackedType, Sniff, TrainOption

from . import formats  # light at the top: torch is imported where tensors are read or a pipe is changed

if TYPE_CHECKING:
    from . import vocab


class TextualInversionType(ModuleBackedType):
    name = "textual_inversion"
    impl = formats
    description = "Textual inversion: learned token embeddings (A1111 .pt/.safetensors, diffusers, SDXL clip_l/clip_g)"
    formats = formats.FORMATS
    capabilities = ("inspect", "attach", "merge", "save", "example", "train")
    single_file_merge = False
    weight_space = False
    unet_runtime = UNET_UNTOUCHED  # the text encoder's token table only
    convert_targets = ("a1111", "diffusers")
    prompt_tokens = True  # ``extra["token"]``: a prompt naming it uses it
    extra_network = "embedding"
    train_options = (
        TrainOption("token", str, None, "textual inversion: the new token (default: the output file's stem)"),
        TrainOption("init_word", str, "*", "textual inversion: word whose embedding starts the vectors"),
        TrainOption("num_vectors", int, 1, "textual inversion: vectors per token", minimum=1),
    )

    def infotext_fields(self, adapter: Adapter, entry, prompt: str) -> list:
        """A ``TI hashes`` entry (token: sha256 of the file, 12 digits) when ``prompt`` names the token, as the
        webui lists the embeddings a prompt used."""
        from functools import partial

        from adapterhub.infotext_fields import embedding_hash

        path = entry.path or adapter.path
        token = str(adapter.extra.get("token") or entry.label)
        if path is None or token.lower() not in prompt.lower():
            return []
        return [("TI hashes", token, partial(embedding_hash, path))]

    def make_trainable(self, model, config):
        """New token rows (``config.token``, ``num_vectors``, ``init_word``); see ``train``."""
        from .train import make_trainable

        return make_trainable(model, config)

    def attach(self, adapter: Adapter, pipe, weight: float = 1.0) -> vocab.EmbeddingHandle:
        from . import vocab

        return vocab.attach(adapter, pipe, weight)

    def merge_into(self, adapter: Adapter, pipe, weight: float = 1.0) -> None:
        """Add the tokens for good: a pipeline saved afterwards carries them in tokenizer and encoder."""
        from . import vocab

        vocab.attach(adapter, pipe, weight)


class AestheticEmbeddingType(AdapterType):
    """vicgalle/stable-diffusion-aesthetic-gradients: ``torch.save`` of a (1, d) mean CLIP image embedding.

    It is not a token: the extension fine-tunes the text encoder toward it for a few steps per prompt.
    """

    name = "aesthetic_embedding"
    description = "Aesthetic-gradients embedding: a bare (1, d) CLIP image embedding; recognised, not applied"
    formats = ("aesthetic-gradients",)
    capabilities = ("inspect",)

    def sniff(self, file: AdapterFile) -> Sniff | None:
        raw = file.raw
        if not formats.is_tensor(raw) or not raw.is_floating_point():
            return None
        if raw.dim() == 2 and raw.shape[0] == 1 or raw.dim() == 1:
            return Sniff(0.5, "aesthetic-gradients", {"width": int(raw.shape[-1])})
        return None

    def parse(self, file: AdapterFile, sniff: Sniff) -> Adapter:
        raw = file.raw.reshape(1, -1)
        width = int(raw.shape[-1])
        extra = {"width": width, "vectors": 1, "norm": round(float(raw.float().norm()), 4),
                 "dtype": str(raw.dtype).removeprefix("torch.")}
        return Adapter(type=self.name, format=sniff.format, patches={}, path=file.path, file=file,
                       base=TEXT_WIDTH.get(width, "unknown"), extra=extra)

    def info(self, adapter: Adapter) -> dict:
        return dict(adapter.extra)

    def _refuse(self, adapter: Adapter):
        raise AdapterError(adapter.path, "an aesthetic-gradients embedding steers a per-prompt fine-tune of the "
                                         "text encoder; it is not a token embedding or a weight delta, and is "
                                         "not applied")

    def attach(self, adapter, pipe, weight=1.0):
        self._refuse(adapter)

    def merge_into(self, adapter, pipe, weight=1.0):
        self._refuse(adapter)


@hookimpl
def adapterhub_adapter_types():
    return [TextualInversionType(), AestheticEmbeddingType()]
