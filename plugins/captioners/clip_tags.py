"""``clip-tags``: zero-shot ranking of tag vocabularies with an open_clip model.

Each vocabulary (a text file, one tag a line, ``#`` comments) is encoded once by the text tower;
the L2-normalised embeddings are cached on disk as safetensors, keyed by the model, its weights,
the precision and the SHA-256 of the tags, and kept in memory for the run. An image's tags are the
top-k of ``cosine(image, tag)`` per vocabulary (exact ``topk``), at or above ``threshold``.
"""
from __future__ import annotations

import hashlib
import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from adapterhub.errors import AdapterhubError
from adapterhub.hashes import sha256_file

VOCAB_DIR = Path(__file__).parent / "vocab"
DEFAULT_VOCABS = ("mediums", "general", "styles")
_TEXT_CHUNK = 256
_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass
class Vocabulary:
    name: str
    tags: list[str]

    @property
    def sha256(self) -> str:
        return hashlib.sha256("\n".join(self.tags).encode("utf-8")).hexdigest()


def read_vocabulary(path: Path) -> Vocabulary:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise AdapterhubError(f"{path}: cannot read vocabulary ({exc.__class__.__name__})") from None
    tags = list(dict.fromkeys(ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")))
    if not tags:
        raise AdapterhubError(f"{path}: the vocabulary is empty")
    return Vocabulary(Path(path).stem, tags)


def vocabularies(options) -> list[Vocabulary]:
    paths = list(options.vocab) or [VOCAB_DIR / f"{n}.txt" for n in DEFAULT_VOCABS]
    return [read_vocabulary(Path(p)) for p in paths]


def parse_top_k(spec: str | int, names: list[str]) -> dict[str, int]:
    """``"8"`` for every vocabulary, or ``"general=8,mediums=1"`` (others default to 8)."""
    default, per = 8, {}
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        name, _, value = part.rpartition("=")
        if not value.strip().isdigit():
            raise AdapterhubError(f"--top-k: {part!r} is not N or name=N")
        if name:
            per[name.strip()] = int(value)
        else:
            default = int(value)
    return {n: per.get(n, default) for n in names}


def _file_identity(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def model_identity(options) -> tuple[str, str | None, str]:
    """(open_clip model name, pretrained argument, identity of architecture + weights)."""
    model = options.model or "ViT-L-14"
    ident = [model]
    if model.endswith(".json") and Path(model).is_file():
        import open_clip

        open_clip.add_model_config(model)
        ident.append(sha256_file(model))
        model = Path(model).stem
    if model.startswith("local-dir:"):
        folder = Path(model.split(":", 1)[1])
        ident += [_file_identity(p) for p in sorted(folder.glob("*")) if p.is_file()]
        return model, None, "|".join(ident)
    if model.startswith("hf-hub:"):
        return model, None, "|".join(ident)
    pretrained = options.pretrained
    if not pretrained:
        raise AdapterhubError("clip-tags needs --pretrained: a checkpoint file, an open_clip tag "
                              "(e.g. openai), or 'random' (tests and benchmarks only)")
    if pretrained == "random":
        return model, None, "|".join(ident + [f"random-seed{options.seed}"])
    if Path(pretrained).is_file():
        return model, pretrained, "|".join(ident + [_file_identity(Path(pretrained))])
    return model, pretrained, "|".join(ident + [pretrained])


def encode_text_trimmed(model, tokens):
    """``model.encode_text`` over only the context the longest tag uses.

    A CLIP text tower is causal and pools at the end-of-text token, so the zero padding after it
    cannot change the result: cutting 77 positions down to the ~5-10 a tag needs gives the same
    embeddings (up to float rounding) an order of magnitude faster. Towers that are not causal
    (SigLIP, custom text models) take the plain path.
    """
    import open_clip
    import torch
    from open_clip.transformer import text_global_pool

    plain = (type(model) is not open_clip.CLIP or getattr(model, "attn_mask", None) is None
             or getattr(model, "text_pool_type", "argmax") != "argmax")
    if plain:
        return model.encode_text(tokens)
    length = max(2, int((tokens != 0).sum(dim=1).max()))
    tokens = tokens[:, :length]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast) + model.positional_embedding[:length].to(cast)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
    x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    if model.text_projection is None:
        return x
    if isinstance(model.text_projection, torch.nn.Linear):
        return model.text_projection(x)
    return x @ model.text_projection


class ClipTags:
    name = "clip-tags"
    description = "open_clip zero-shot ranking of tag vocabularies (general, mediums, styles)"

    def __init__(self):
        self._key = self._options = None
        self.model = self.preprocess = self.tokenizer = None
        self.tables: list[tuple[Vocabulary, object]] = []
        self.embedding_stats = {"computed": 0, "from_cache": 0}

    # -- loading -------------------------------------------------------------------------------
    def load(self, options) -> None:
        if options is self._options:
            return  # the runner passes one options object for the whole run
        name, pretrained, identity = model_identity(options)
        key = (identity, str(options.device), options.precision)
        if self._key != key:
            self._load_model(name, pretrained, options)
            self._key = key
            self.tables = []
        vocabs = vocabularies(options)
        if [v.sha256 for v, _ in self.tables] != [v.sha256 for v in vocabs]:
            self.tables = [(v, self._embeddings(v, identity, options)) for v in vocabs]
        self._options = options

    def _load_model(self, name: str, pretrained: str | None, options) -> None:
        import open_clip
        import torch

        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(options.seed)
                model, _, preprocess = open_clip.create_model_and_transforms(
                    name, pretrained=pretrained, device=options.device, precision=options.precision)
            tokenizer = open_clip.get_tokenizer(name)
        except (RuntimeError, ValueError, FileNotFoundError, OSError) as exc:
            raise AdapterhubError(f"clip-tags: cannot load {name} ({pretrained}): {exc}") from None
        self.model, self.preprocess, self.tokenizer = model.eval(), preprocess, tokenizer

    def transform(self, options):
        self.load(options)
        return self.preprocess

    # -- text embeddings -------------------------------------------------------------------------
    def _cache_path(self, vocab: Vocabulary, identity: str, options) -> Path:
        key = hashlib.sha256(f"{identity}|{options.precision}|{vocab.sha256}".encode()).hexdigest()
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in (options.model or "model"))[-60:]
        return Path(options.cache_dir or Path.home() / ".cache" / "adapterhub") / "clip-tags" / \
            f"{safe}-{vocab.name}-{key[:20]}.safetensors"

    def _embeddings(self, vocab: Vocabulary, identity: str, options):
        from safetensors.torch import load_file, save_file

        path = self._cache_path(vocab, identity, options)
        if not options.no_cache and path.is_file():
            try:
                cached = load_file(str(path))
                if cached["embeds"].shape[0] == len(vocab.tags) and \
                        bytes(cached["sha256"].tolist()).decode() == vocab.sha256:
                    self.embedding_stats["from_cache"] += 1
                    return cached["embeds"].to(options.device)
            except Exception:  # noqa: BLE001 - a damaged cache is recomputed
                pass
        embeds = self.encode_text(vocab.tags, options)
        self.embedding_stats["computed"] += 1
        if not options.no_cache:
            self._save_cache(path, embeds, vocab, identity, save_file)
        return embeds

    @staticmethod
    def _save_cache(path: Path, embeds, vocab: Vocabulary, identity: str, save_file) -> None:
        import torch

        from adapterhub.io import atomic_path

        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"embeds": embeds.detach().cpu().contiguous(),
                   "sha256": torch.tensor(list(vocab.sha256.encode()), dtype=torch.uint8)}
        meta = {"identity": identity, "vocabulary": vocab.name, "tags": str(len(vocab.tags))}
        with atomic_path(path, suffix=".safetensors") as tmp:
            save_file(tensors, str(tmp), metadata={k: json.dumps(v) for k, v in meta.items()})

    def _autocast(self, options):
        import torch

        if str(options.device).startswith("cuda") and options.precision in ("fp16", "bf16"):
            return torch.autocast("cuda", dtype=getattr(torch, _DTYPES[options.precision]))
        return nullcontext()

    def encode_text(self, tags: list[str], options):
        import torch

        out = []
        with torch.inference_mode(), self._autocast(options):
            for i in range(0, len(tags), _TEXT_CHUNK):
                tokens = self.tokenizer(tags[i:i + _TEXT_CHUNK]).to(options.device)
                out.append(torch.nn.functional.normalize(encode_text_trimmed(self.model, tokens).float(), dim=-1))
        return torch.cat(out)

    # -- images ----------------------------------------------------------------------------------
    def encode_images(self, images, options):
        import torch

        self.load(options)
        pixels = [im if isinstance(im, torch.Tensor) else self.preprocess(im) for im in images]
        batch = torch.stack(pixels).to(options.device, non_blocking=True)
        with torch.inference_mode(), self._autocast(options):
            feats = self.model.encode_image(batch)
        return torch.nn.functional.normalize(feats.float(), dim=-1)

    def rank(self, images, options) -> list[list[tuple[str, float]]]:
        """Per image, ``(tag, cosine)`` pairs: each vocabulary's top-k in vocabulary order."""
        import torch

        feats = self.encode_images(images, options)
        top_k = parse_top_k(options.top_k, [v.name for v, _ in self.tables])
        ranked = [[] for _ in images]
        for vocab, embeds in self.tables:
            k = min(top_k[vocab.name], len(vocab.tags))
            if k <= 0:
                continue
            scores, idx = torch.topk(feats @ embeds.float().T, k, dim=1)
            for row, (s, ix) in enumerate(zip(scores.cpu().tolist(), idx.cpu().tolist())):
                ranked[row] += [(vocab.tags[j], v) for v, j in zip(s, ix)
                                if options.threshold is None or v >= options.threshold]
        return ranked

    def caption(self, images, options) -> list[list[str]]:
        return [[tag for tag, _ in row] for row in self.rank(images, options)]
