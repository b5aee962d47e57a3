"""Textual-inversion file layouts: recognise them from keys and shapes, read them, write them.

| format              | layout                                                                  | token        |
|---------------------|-------------------------------------------------------------------------|--------------|
| ``a1111-pt``        | ``string_to_param{'*': (n, d)}`` + ``name``, ``step``, ``sd_checkpoint``; | file stem    |
|                     | also ``{'emb_params': (n, d)}`` re-saved as a torch pickle               |              |
| ``a1111-safetensors``| ``{'emb_params': (n, d)}`` (kohya's writer)                            | file stem    |
| ``diffusers``       | ``learned_embeds``: ``{'<token>': (d,) or (n, d)}``, one key             | the key      |
| ``sdxl``            | ``{'clip_l': (n, 768), 'clip_g': (n, 1280)}``                           | file stem    |
| ``cog-sdxl``        | replicate cog-sdxl ``embeddings.pti``: ``text_encoders_0`` / ``_1``     | ``<s0>``...  |

The prompt name follows AUTOMATIC1111, which names an embedding after its file; the name stored inside
(``badhandv4.pt`` says ``badhandv3``) is kept as ``internal_name`` for ``inspect``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from adapterhub.archs import TEXT2_WIDTH, TEXT_WIDTH
from adapterhub.errors import AdapterError
from adapterhub.io import AdapterFile, atomic_path, save_safetensors
from adapterhub.types import Adapter, Patch, Sniff

if TYPE_CHECKING:  # torch is imported where values are read or written: sniffing needs keys and shapes only
    import torch

FORMATS = ("a1111-pt", "a1111-safetensors", "diffusers", "sdxl", "cog-sdxl")
# ``save`` also takes ``a1111`` (and ``diffusers`` for SDXL vectors): see ``layout_for``
# text encoder -> (component, tokenizer, module path of its token table)
ENCODERS = {
    "clip_l": ("text_encoder", "tokenizer"),
    "clip_g": ("text_encoder_2", "tokenizer_2"),
}
TABLE = "text_model.embeddings.token_embedding"
PAIRS = {"sdxl": ("clip_l", "clip_g"), "cog-sdxl": ("text_encoders_0", "text_encoders_1")}
A1111_TOKEN_ID = 265  # what A1111 writes in string_to_token (the id of '*')
MAX_VECTORS = 77


class EmbeddingPatch(Patch):
    """New rows for one text encoder's token table: ``vectors`` (n, d), one per entry of ``tokens``."""

    kind = "embedding"
    linear_in_multiplier = True

    def __init__(self, encoder: str, source: str, vectors: torch.Tensor, tokens: list[str]):
        component, tokenizer = ENCODERS[encoder]
        super().__init__(f"{component}.{TABLE}", source, {"vectors": vectors})
        self.encoder, self.component, self.tokenizer, self.tokens = encoder, component, tokenizer, tokens

    @property
    def vectors(self) -> torch.Tensor:
        return self.tensors["vectors"]

    @property
    def width(self) -> int:
        return int(self.vectors.shape[-1])

    @property
    def in_features(self) -> int:
        return self.width

    def delta(self, weight):
        raise NotImplementedError("an embedding adds rows to the token table; it is not a weight delta")


# --------------------------------------------------------------------------------------------
# recognise
# --------------------------------------------------------------------------------------------
def is_tensor(obj) -> bool:
    """Whether ``obj`` is a torch tensor, without importing torch: only a loaded pickle holds one, and
    loading it imported torch."""
    tensor = getattr(sys.modules.get("torch"), "Tensor", None)  # None too while torch is half imported
    return tensor is not None and isinstance(obj, tensor)


def _vector_shape(shape: tuple[int, ...]) -> bool:
    return len(shape) == 1 and shape[0] >= 8 or len(shape) == 2 and 1 <= shape[0] <= MAX_VECTORS and shape[1] >= 8


def layout(file: AdapterFile) -> tuple[str, dict[str, str], float] | None:
    """(format, encoder -> key in the file, score) from keys and shapes only, or None."""
    if is_tensor(file.raw):
        return None  # a bare tensor has no name: not claimed (see the aesthetic-gradients type)
    keys = file.keys
    param_keys = [k for k in keys if k.startswith("string_to_param.")]
    if param_keys:
        return "a1111-pt", {"clip_l": param_keys[0]}, 0.95
    for fmt, (first, second) in PAIRS.items():
        if first in keys and second in keys:
            return fmt, {"clip_l": first, "clip_g": second}, 0.95
    if "emb_params" in keys:
        return ("a1111-pt" if file.container == "pickle" else "a1111-safetensors"), {"clip_l": "emb_params"}, 0.9
    if len(keys) == 1:
        (key, info), = keys.items()
        if _vector_shape(info.shape) and info.dtype in ("F32", "F16", "BF16", "F64"):
            known = info.shape[-1] in TEXT_WIDTH
            return "diffusers", {"clip_l": key}, 0.6 if known else 0.4
    return None


def sniff(file: AdapterFile) -> Sniff | None:
    found = layout(file)
    if found is None:
        return None
    fmt, keys, score = found
    shapes = {enc: file.keys[k].shape for enc, k in keys.items()}
    if any(not _vector_shape(s) for s in shapes.values()):
        return None
    vectors = {s[0] if len(s) == 2 else 1 for s in shapes.values()}
    widths = {enc: s[-1] for enc, s in shapes.items()}
    if len(vectors) != 1:
        return None  # clip_l and clip_g must have as many vectors
    return Sniff(score, fmt, {"vectors": vectors.pop(), "widths": widths, "keys": keys})


def base_of(widths: dict[str, int]) -> str:
    """sd1 (768), sd2 (1024), sdxl (768 + 1280) or a tiny base, from the vector widths."""
    if "clip_g" in widths:
        return TEXT2_WIDTH.get(widths["clip_g"], "unknown")
    return TEXT_WIDTH.get(widths.get("clip_l", 0), "unknown")


# --------------------------------------------------------------------------------------------
# read
# --------------------------------------------------------------------------------------------
def expand(token: str, n: int) -> list[str]:
    """The token names diffusers gives n vectors: ``tok``, ``tok_1`` ... ``tok_{n-1}``."""
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def _cog_trigger(path: Path) -> str | None:
    sidecar = path.parent / "special_params.json"
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8")) if sidecar.is_file() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return next(iter(data), None) if isinstance(data, dict) and data else None


def parse(file: AdapterFile, found: Sniff, type_name: str) -> Adapter:
    import torch

    fmt, keys, n = found.format, found.facts["keys"], found.facts["vectors"]
    if fmt == "a1111-pt" and len([k for k in file.keys if k.startswith("string_to_param.")]) > 1:
        raise AdapterError(file.path, "string_to_param holds several terms; an embedding file holds one",
                           "string_to_param")
    tensors = file.tensors(list(keys.values()))
    if fmt == "diffusers":
        token = next(iter(keys.values()))
        tokens = expand(token, n)
    elif fmt == "cog-sdxl":
        tokens = [f"<s{i}>" for i in range(n)]
        token = "".join(tokens)
    else:
        token = file.name
        tokens = expand(token, n)
    patches = {}
    for encoder, key in keys.items():
        vectors = tensors[key]
        vectors = vectors.reshape(1, -1) if vectors.dim() == 1 else vectors
        if not torch.isfinite(vectors.float()).all():
            raise AdapterError(file.path, "the embedding holds NaN or infinite values", key)
        patch = EmbeddingPatch(encoder, key, vectors, tokens)
        patches[patch.target] = patch
    extra = {"token": token, "tokens": tokens, "vectors": n}
    for name in ("name", "step", "sd_checkpoint", "sd_checkpoint_name"):
        if name in file.extra:
            extra["internal_name" if name == "name" else name] = file.extra[name]
    if fmt == "cog-sdxl" and (trigger := _cog_trigger(file.path)):
        extra["trigger"] = trigger
    widths = {p.encoder: p.width for p in patches.values()}
    return Adapter(type=type_name, format=fmt, patches=patches, metadata=dict(file.metadata), path=file.path,
                   file=file, base=base_of(widths), extra=extra)


def widths_of(adapter: Adapter) -> dict[str, int]:
    return {p.encoder: p.width for p in adapter.patches.values()}


def _short(tokens: list[str]) -> str:
    return ", ".join(tokens) if len(tokens) <= 4 else f"{tokens[0]}, {tokens[1]}, ..., {tokens[-1]}"


def summary(adapter: Adapter) -> dict:
    widths = widths_of(adapter)
    facts = {"token": adapter.extra.get("token"), "vectors": adapter.extra.get("vectors"),
             "width": "+".join(str(widths[e]) for e in ENCODERS if e in widths),
             "tokens": _short(adapter.extra.get("tokens") or [])}
    for key in ("internal_name", "step", "sd_checkpoint", "sd_checkpoint_name", "trigger"):
        if key in adapter.extra:
            facts[key] = adapter.extra[key]
    return facts


# --------------------------------------------------------------------------------------------
# write
# --------------------------------------------------------------------------------------------
def _torch_save(obj, path: Path) -> Path:
    import torch

    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(obj, str(tmp))
    return path


def _is_pickle_path(path: Path) -> bool:
    return path.suffix.lower() in (".pt", ".bin", ".pth", ".ckpt")


def write(vectors: dict[str, torch.Tensor], path: Path, fmt: str, token: str | None = None,
          extra: dict | None = None, metadata: dict | None = None) -> Path:
    """Write ``{encoder: (n, d)}`` in ``fmt``; single-encoder layouts refuse two encoders and back."""
    extra = extra or {}
    vectors = {e: v.detach().to("cpu").contiguous() for e, v in vectors.items()}
    two = "clip_g" in vectors
    if two != (fmt in PAIRS):
        kind = "an sdxl (clip_l + clip_g)" if two else "a single-encoder"
        raise AdapterError(path, f"{kind} embedding cannot be written as {fmt}")
    if fmt in PAIRS:
        first, second = PAIRS[fmt]
        tensors = {first: vectors["clip_l"], second: vectors["clip_g"]}
        if _is_pickle_path(path):
            return _torch_save(tensors, path)
        return save_safetensors(tensors, path, metadata)
    vec = vectors["clip_l"]
    if fmt == "a1111-pt":
        data = {"string_to_token": {"*": A1111_TOKEN_ID}, "string_to_param": {"*": vec},
                "name": extra.get("internal_name", token or path.stem), "step": extra.get("step", 0),
                "sd_checkpoint": extra.get("sd_checkpoint"), "sd_checkpoint_name": extra.get("sd_checkpoint_name")}
        if metadata:  # the webui reads only the keys above; adapterhub.io reads this one back
            data["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        return _torch_save(data, path)
    if fmt == "a1111-safetensors":
        return save_safetensors({"emb_params": vec}, path, metadata)
    if fmt == "diffusers":
        tensors = {token or f"<{path.stem}>": vec}
        return _torch_save(tensors, path) if _is_pickle_path(path) else save_safetensors(tensors, path, metadata)
    raise AdapterError(path, f"unknown textual-inversion format {fmt!r}; choose one of {', '.join(FORMATS)}")


def layout_for(fmt: str, vectors: dict, path: Path) -> str:
    """The layout a generic name means for these vectors: ``a1111`` is what the webui loads (``emb_params``
    in a .safetensors, ``string_to_param`` in a .pt; SDXL ``clip_l`` + ``clip_g``); ``diffusers`` is
    ``learned_embeds`` (one ``<token>`` key) for one encoder and ``clip_l`` + ``clip_g`` for SDXL, the file
    diffusers' documentation loads into each encoder with ``load_textual_inversion``."""
    two = "clip_g" in vectors
    if fmt == "a1111":
        return "sdxl" if two else ("a1111-pt" if _is_pickle_path(path) else "a1111-safetensors")
    if fmt == "diffusers" and two:
        return "sdxl"
    return fmt


def save(adapter: Adapter, path: Path, fmt: str | None) -> Path:
    vectors = {p.encoder: p.vectors for p in adapter.patches.values()}
    fmt = layout_for(fmt or adapter.format, vectors, Path(path))
    # the name the source is called by: its diffusers token, or (A1111) its file name
    token = adapter.extra.get("token") if fmt == "diffusers" else None
    return write(vectors, Path(path), fmt, token, adapter.extra, adapter.metadata)


def example(model, path: Path, seed: int = 0, vectors: int = 2) -> Path:
    """Random vectors with the spread of the model's own token table, in the layout the model takes."""
    import torch

    from adapterhub.weights import component

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for encoder, (te_name, _) in ENCODERS.items():
        te = component(model, te_name)
        if te is None:
            continue
        table = te.get_input_embeddings().weight.detach().float()
        std = float(table[:1000].std()) if table.numel() else 0.02
        out[encoder] = torch.randn(vectors, table.shape[1], generator=gen) * std
    if not out:
        raise AdapterError(path, "the model has no text encoder to write an embedding for")
    path = Path(path)
    if "clip_g" in out:
        fmt = "sdxl"
    else:
        fmt = "a1111-pt" if _is_pickle_path(path) else "a1111-safetensors"
    return write(out, path, fmt, metadata={"adapterhub.example": "textual_inversion"})
