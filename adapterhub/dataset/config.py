"""Every dataset command's options, declared once.

Each command has one frozen dataclass. A field's ``metadata`` carries its help text (and, where the
flag differs from the field name, the flag); ``adapterhub.cli.dataset`` turns the fields into click
options, and Python callers build the same objects directly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

CAPTION_EXTS = (".txt", ".caption")


def opt(default, help: str, *, flag: str | None = None, choices: tuple | None = None,
        argument: bool = False, nargs: int = 1):
    """A config field with its CLI help (``argument=True`` makes it positional)."""
    meta = {"help": help, "flag": flag, "choices": choices, "argument": argument, "nargs": nargs}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda d=tuple(default): d, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True, kw_only=True)
class FolderConfig:
    dir: Path = opt(None, "dataset folder", argument=True)
    ext: str = opt(".txt", "caption extension written (.txt and .caption are both read)")

    def __post_init__(self):
        object.__setattr__(self, "dir", Path(self.dir))
        if not self.ext.startswith("."):
            object.__setattr__(self, "ext", "." + self.ext)


@dataclass(frozen=True, kw_only=True)
class CaptionConfig(FolderConfig):
    captioner: str = opt("clip-tags", "captioner plugin name (see `adapterhub plugins`)")
    model: str | None = opt(None, "model: open_clip name / local-dir:PATH / config.json, or a "
                                  "transformers path or hub id")
    pretrained: str | None = opt(None, "weights: a checkpoint file or an open_clip tag; "
                                       "'random' builds random weights (tests, benchmarks)")
    vocab: tuple[str, ...] = opt((), "tag vocabulary file (repeatable); default: the shipped "
                                     "general, mediums and styles lists")
    top_k: str = opt("general=8,mediums=1,styles=1",
                     "tags kept per vocabulary: N for all, or name=N,...")
    threshold: float | None = opt(None, "minimum cosine similarity for a tag (clip-tags); minimum score "
                                        "of a general tag (wd, default 0.35)")
    character_threshold: float | None = opt(None, "wd: minimum score of a character tag (default: --threshold)")
    mcut: str = opt("off", "wd: MCut automatic thresholds (largest score gap) for these tags",
                    choices=("off", "general", "character", "both"))
    rating: str = opt("off", "wd: add the most likely rating tag first or last", choices=("off", "first", "last"))
    character_tags_first: bool = opt(False, "wd: character tags before the general tags")
    always_first_tags: str = opt("", "wd: comma-separated tags moved to the front when predicted")
    undesired_tags: str = opt("", "wd: comma-separated tags never written")
    remove_underscore: bool = opt(False, "wd: long_hair -> long hair (kaomoji such as ^_^ are kept)")
    escape_parens: bool = opt(False, "wd: write ( ) as \\( \\) (prompt attention syntax)")
    caption_separator: str = opt(", ", "wd: text between tags")
    character_tag_expand: bool = opt(False, "wd: chara_(series) -> chara, series")
    tag_replacement: str = opt("", "wd: source,target;source,target replaces tags (\\, and \\; inside tags)")
    tagger: str | None = opt(None, "caption+wd: the WD tagger (folder, .onnx file or hub id) whose tags "
                                   "follow the --model sentence")
    mode: str = opt("skip", "existing captions: overwrite, append, or skip the image",
                    choices=("overwrite", "append", "skip"))
    batch_size: int = opt(32, "images per batch")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N")
    precision: str = opt("auto", "auto (fp16 on GPU, fp32 on CPU), fp32, fp16, bf16",
                         choices=("auto", "fp32", "fp16", "bf16"))
    num_workers: int = opt(-1, "data-loading workers (-1: automatic)")
    cache_dir: Path | None = opt(None, "text-embedding cache (default ~/.cache/adapterhub)")
    no_cache: bool = opt(False, "compute vocabulary embeddings afresh and write no cache")
    prompt: str | None = opt(None, "text prefix for captioning models (e.g. 'a photograph of')")
    max_length: int = opt(40, "longest generated caption, in tokens")
    num_beams: int = opt(1, "beam search width for captioning models")
    restart: bool = opt(False, "ignore the progress of an interrupted run and start over")
    seed: int = opt(0, "seed for random weights")


@dataclass(frozen=True, kw_only=True)
class TagEditConfig(FolderConfig):
    action: str = opt(None, "the edit", argument=True, choices=(
        "add", "remove", "replace", "move-front", "dedupe", "sort", "trigger"))
    values: tuple[str, ...] = opt((), "tags (comma-separated lists allowed)", argument=True, nargs=-1)
    where: tuple[str, ...] = opt((), "only captions having every one of these tags")
    where_not: tuple[str, ...] = opt((), "only captions having none of these tags")
    position: int = opt(-1, "add: insert at this index (0 = front, -1 = end)")
    by: str = opt("alpha", "sort: alpha or frequency (dataset-wide)", choices=("alpha", "frequency"))
    keep_first: int = opt(0, "sort: leave the first N tags in place (trigger words)")
    dry_run: bool = opt(False, "show the changes, write nothing")


@dataclass(frozen=True, kw_only=True)
class UndoConfig(FolderConfig):
    list_only: bool = opt(False, "list the recorded operations, undo nothing", flag="--list")
    force: bool = opt(False, "restore even files that changed after the operation")


@dataclass(frozen=True, kw_only=True)
class StatsConfig(FolderConfig):
    top: int = opt(30, "rows in the table and bars in the chart")
    chart: Path | None = opt(None, "bar chart PNG (default DIR/.adapterhub/tag_frequency.png)")
    no_chart: bool = opt(False, "do not write the chart")


@dataclass(frozen=True, kw_only=True)
class BucketConfig(FolderConfig):
    resolution: int = opt(512, "training resolution (max area = resolution²)")
    height: int | None = opt(None, "training height, when not square")
    min: int | None = opt(None, "smallest bucket side (default: resolution / 2 floored to the step, "
                                "as train: 256 at 512)", flag="--min")
    max: int | None = opt(None, "largest bucket side (default: resolution x 2, as train: 1024 at 512)",
                          flag="--max")
    step: int = opt(64, "bucket sides are multiples of this")
    no_upscale: bool = opt(False, "kohya --bucket_no_upscale: buckets from each image, never upscale")
    batch_size: int = opt(1, "warn about buckets holding fewer images than a batch")

    @property
    def max_reso(self) -> tuple[int, int]:
        return self.resolution, self.height or self.resolution


@dataclass(frozen=True, kw_only=True)
class PrepareConfig(BucketConfig):
    out: Path = opt(None, "output folder (must not be inside DIR)")
    format: str = opt("keep", "image format written", choices=("keep", "png", "jpg", "webp"))
    quality: int = opt(95, "JPEG/WebP quality")
    overwrite: bool = opt(False, "write into an OUT folder that is not empty")


@dataclass(frozen=True, kw_only=True)
class KohyaJsonConfig(FolderConfig):
    out: Path = opt(None, "the metadata JSON written (kept entries merged, as kohya)", argument=True)
    in_json: Path | None = opt(None, "metadata to start from (default: OUT when it exists)")
    full_path: bool = opt(False, "key images by absolute path, not file stem (needed for repeated stems)")
    tags_ext: str = opt(".txt", "sidecar read as tags")
    caption_ext: str = opt(".caption", "sidecar read as the caption")


@dataclass(frozen=True, kw_only=True)
class KohyaImportConfig(FolderConfig):
    json_file: Path = opt(None, "kohya metadata JSON to read", argument=True)
    mode: str = opt("overwrite", "existing sidecars: overwrite, or skip them", choices=("overwrite", "skip"))
    tags_ext: str = opt(".txt", "sidecar written from tags")
    caption_ext: str = opt(".caption", "sidecar written from the caption")


@dataclass(frozen=True, kw_only=True)
class ValidateConfig(FolderConfig):
    fix: bool = opt(False, "apply the safe fixes (originals are kept under DIR/.adapterhub)")
    min_side: int = opt(256, "images with a shorter side are too small")
    max_file_mb: float = opt(20.0, "larger files are reported as oversized")
    max_megapixels: float = opt(40.0, "images with more pixels are reported as oversized")
    near_distance: int = opt(6, "perceptual-hash Hamming distance counted as a near duplicate (0-64)")
    workers: int = opt(0, "image-decoding threads (0: one per CPU)")
