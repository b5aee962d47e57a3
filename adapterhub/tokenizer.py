"""The real CLIP BPE tokenizer, built offline from the vocabulary open_clip ships.

Every Stable Diffusion text encoder (CLIP ViT-L, OpenCLIP ViT-H and ViT-bigG) uses the same 49,408-token
BPE vocabulary; only the padding token differs ("<|endoftext|>" for SD1 and SDXL's first encoder, "!"
for SD2 and SDXL's second). open_clip carries that vocabulary as ``bpe_simple_vocab_16e6.txt.gz``, so we
rebuild ``vocab.json`` + ``merges.txt`` from it exactly as open_clip's ``SimpleTokenizer`` numbers its
encoder, instead of downloading ``openai/clip-vit-large-patch14``.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

from adapterhub.errors import AdapterhubError
from adapterhub.io import atomic_path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
VOCAB_SIZE = 49408
MAX_LENGTH = 77
PAD_SD1 = EOS  # SD1, SDXL's first tokenizer
PAD_OPENCLIP = "!"  # SD2, SDXL's second tokenizer (id 0, as open_clip pads)
# open_clip keeps the first 49152 - 256 - 2 merges of the file (its line 0 is a version header).
_MERGE_LINES = slice(1, 49152 - 256 - 2 + 1)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character table (the first 256 vocabulary entries)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, codes)}


def _open_clip_bpe_file() -> Path:
    try:
        import open_clip
    except ImportError:  # pragma: no cover - open_clip is a dependency
        raise AdapterhubError("the CLIP tokenizer needs open_clip_torch (pip install open_clip_torch)") from None
    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():  # pragma: no cover
        raise AdapterhubError(f"{path}: open_clip's BPE vocabulary file is missing")
    return path


def build_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """The CLIP encoder as open_clip numbers it: bytes, bytes + '</w>', merges joined, then BOS, EOS."""
    lines = gzip.open(_open_clip_bpe_file()).read().decode("utf-8").split("\n")[_MERGE_LINES]
    merges = [tuple(line.split()) for line in lines]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    return {token: i for i, token in enumerate(vocab)}, [" ".join(m) for m in merges]


def bpe_files(cache: str | Path | None = None) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` once under the cache; return their folder."""
    if cache is None:
        from adapterhub.base import cache_dir  # base imports this module; late import avoids the cycle

        cache = cache_dir()
    folder = Path(cache) / "tokenizers" / "clip-bpe"
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    if vocab_path.is_file() and merges_path.is_file():
        return folder
    vocab, merges = build_vocab_and_merges()
    with atomic_path(merges_path) as tmp:
        tmp.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    # vocab.json last: its presence marks a complete folder
    with atomic_path(vocab_path) as tmp:
        tmp.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    return folder


def _read_bpe(folder: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    return vocab, merges


def clip_tokenizer(pad_token: str = PAD_SD1, cache: str | Path | None = None):
    """A fresh ``transformers.CLIPTokenizer`` (vocab 49408, 77 tokens) padding with ``pad_token``.

    A new object each call: textual-inversion adapters add tokens to a tokenizer, and one pipeline's
    additions must not leak into another's.
    """
    from transformers import CLIPTokenizer

    vocab, merges = _read_bpe(bpe_files(cache))
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, bos_token=BOS, eos_token=EOS,
                         unk_token=EOS, model_max_length=MAX_LENGTH)
