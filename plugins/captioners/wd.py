"""``wd``: SmilingWolf's WD taggers (wd-v1-4 and wd-v3: ViT, ConvNeXt, SwinV2, EVA02) on onnxruntime.

A tagger is a folder or a Hugging Face hub id holding ``model.onnx`` and ``selected_tags.csv``
(``tag_id,name,category,count``; category 9 rating, 0 general, 4 character), or the ``.onnx`` file
with the tag list beside it. The model
takes a batch of NHWC float32 images of its own input size (BGR, 0-255) and returns one sigmoid
score per CSV row.

Preprocessing is the model author's (the wd-tagger space): transparency on white, padded to a
centred white square, bicubic resize to the input size, RGB -> BGR. (kohya's script pads the same
way but resizes with OpenCV; we read images with PIL only.)

Tag selection and order are kohya sd-scripts' ``tag_images_by_wd14_tagger.py``: general tags
scoring at or above the general threshold, in CSV order, then character tags at or above theirs
(with ``character_tags_first`` each is put in front in turn, so they come first in reverse CSV
order); the rating is the argmax of the rating rows, put first or last; every ``always_first_tags``
tag present is moved to the front in turn (the last listed ends up first); kohya's character tag
expansion and tag replacement come before the lists are matched. Where we differ from
kohya, on purpose: the tag lists are comma-separated whatever the separator, and match tags with
or without underscores, in any case; ``remove_underscore`` also keeps the long kaomoji the
space keeps (``<o>_<o>``, ``||_||`` ...); MCut thresholds (from the space) and escaping parentheses
for prompt attention syntax are options.
"""
from __future__ import annotations

import csv
import logging
import math
import os
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path

import numpy as np

from adapterhub.errors import AdapterhubError

log = logging.getLogger("adapterhub.captioners.wd")

MODEL_FILE, TAGS_FILE = "model.onnx", "selected_tags.csv"
DEFAULT_MODEL = "SmilingWolf/wd-v1-4-convnext-tagger-v2"  # kohya's default
RATING, GENERAL, CHARACTER = 9, 0, 4
DEFAULT_THRESHOLD = 0.35  # kohya's --thresh
RELEASED_SIZE = 448  # every released tagger's input; for exports that leave height and width free
MAX_PAD_SIDE = 8192  # longer sides are reduced before padding (memory), far above every real input
MIN_CHARACTER_MCUT = 0.15  # the space never lets MCut take a character tag below this
# kohya keeps tags of 3 characters or fewer as they are; these longer kaomoji too (the space's list)
KAOMOJI = frozenset(["0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3",
                     "6_9", ">_o", "@_@", "^_^", "o_o", "u_u", "x_x", "|_|", "||_||"])


# -- selected_tags.csv ---------------------------------------------------------------------------
@dataclass(frozen=True)
class TagTable:
    """The rows of ``selected_tags.csv``: row i names the model's i-th score."""

    names: tuple[str, ...]
    categories: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.names)

    def rows(self, category: int) -> np.ndarray:
        """The row indices of ``category``, in CSV order."""
        return self._rows.get(category, np.empty(0, dtype=np.int64))

    @cached_property
    def _rows(self) -> dict[int, np.ndarray]:  # once per table: a tagger has ~10k rows
        cats = np.asarray(self.categories)
        return {c: np.flatnonzero(cats == c) for c in set(self.categories)}


def read_tags(path: Path) -> TagTable:
    """The tag table; a file that is not one raises :class:`AdapterhubError` naming it."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise AdapterhubError(f"{path}: cannot read the tag list ({exc.__class__.__name__})") from None
    header = [h.strip().lower() for h in rows[0]] if rows else []
    if "name" not in header or "category" not in header:
        raise AdapterhubError(f"{path}: not a WD tag list (the header needs name and category columns, "
                              f"found {','.join(header) or 'nothing'})")
    at_name, at_cat = header.index("name"), header.index("category")
    names, cats = [], []
    for line, row in enumerate(rows[1:], start=2):
        try:
            names.append(row[at_name])
            cats.append(int(row[at_cat]))
        except (IndexError, ValueError):
            raise AdapterhubError(f"{path}: line {line} has no tag name and integer category") from None
    if not names:
        raise AdapterhubError(f"{path}: the tag list is empty")
    return TagTable(tuple(names), tuple(cats))


# -- locating and opening the model -------------------------------------------------------------
def _looks_like_hub_id(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "~")) and "\\" not in model


def locate(model: str) -> tuple[Path, Path]:
    """(tag list, model file): ``selected_tags.csv`` and ``model.onnx`` in the folder ``model``, or
    in the hub cache's snapshot of the hub id ``model`` (fetched unless the hub is offline); or
    ``model`` is the ``.onnx`` file itself, with ``selected_tags.csv`` beside it."""
    path = Path(model).expanduser()
    if path.is_file() and path.suffix.lower() == ".onnx":
        folder, onnx_file = path.parent, path
    elif path.is_dir():
        folder, onnx_file = path, path / MODEL_FILE
    elif _looks_like_hub_id(model):
        folder = _from_hub(model)
        onnx_file = folder / MODEL_FILE
    else:
        raise AdapterhubError(f"{model}: no such folder (a WD tagger is a folder or a hub id "
                              f"holding {MODEL_FILE} and {TAGS_FILE})")
    for file in (folder / TAGS_FILE, onnx_file):
        if not file.is_file():
            raise AdapterhubError(f"{folder}: no {file.name} (a WD tagger folder holds {MODEL_FILE} and "
                                  f"{TAGS_FILE})")
    return folder / TAGS_FILE, onnx_file


def _from_hub(repo: str) -> Path:
    from huggingface_hub import hf_hub_download

    paths = []
    for name in (TAGS_FILE, MODEL_FILE):
        try:
            paths.append(Path(hf_hub_download(repo, name)))
        except Exception as exc:  # noqa: BLE001 - offline, missing repo or file, network: one line
            first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
            raise AdapterhubError(f"{repo}: cannot fetch {name} from the hub ({first[:200]})") from None
    return paths[0].parent


def providers(device: str) -> list:
    """onnxruntime execution providers for ``device`` (CUDA with CPU behind it, or CPU)."""
    import onnxruntime as ort

    if not str(device).startswith("cuda"):
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        log.warning("wd: this onnxruntime has no CUDA provider (install onnxruntime-gpu); tagging on the CPU")
        return ["CPUExecutionProvider"]
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]


def open_session(path: Path, device: str):
    """The inference session; on the CPU the processes of one launch split the cores between them
    (each session would otherwise start a thread per core, and N processes oversubscribe N-fold)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise AdapterhubError("the wd captioner needs onnxruntime: pip install 'adapterhub[wd]' "
                              "(onnxruntime-gpu for CUDA)") from None
    options = ort.SessionOptions()
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:
        options.intra_op_num_threads = max(1, (os.cpu_count() or 1) // world)
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers(device))
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for damaged files
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        raise AdapterhubError(f"{path}: not a loadable ONNX model ({first[:200]})") from None


@dataclass(frozen=True)
class Interface:
    input: str
    output: str
    size: int
    batch: int | None  # a fixed batch size the model was exported with, else None


def interface(session, path: Path, table: TagTable, tags_path: Path) -> Interface:
    """The model's input and output, checked against the WD interface and the tag table."""
    inp, out = session.get_inputs()[0], session.get_outputs()[0]
    shape = list(inp.shape)
    if len(shape) == 4 and not isinstance(shape[1], int) and not isinstance(shape[2], int):
        shape[1] = shape[2] = RELEASED_SIZE
    square = len(shape) == 4 and isinstance(shape[1], int) and shape[1] == shape[2] and shape[3] == 3
    if not square or inp.type != "tensor(float)":
        raise AdapterhubError(f"{path}: input {inp.name} is {inp.type} {shape}; a WD tagger takes float "
                              "(batch, size, size, 3)")
    width = out.shape[-1] if out.shape else None
    if isinstance(width, int) and width != len(table):
        raise AdapterhubError(f"{path}: the model scores {width} tags but {tags_path} lists {len(table)}")
    batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
    return Interface(inp.name, out.name, shape[1], batch)


# -- preprocessing ------------------------------------------------------------------------------
def prepare_image(image, size: int) -> np.ndarray:
    """(size, size, 3) float32 BGR 0-255: padded to a centred white square, bicubic-resized.

    ``image`` is a PIL image; transparency is composited on white first. An image longer than
    ``MAX_PAD_SIDE`` on a side is box-reduced by a whole factor before padding (the reference taggers
    pad it whole), which bounds the canvas for any file.
    """
    from PIL import Image

    from adapterhub.dataset.images import to_rgb

    image = to_rgb(image)
    side = max(image.size)
    if side > MAX_PAD_SIDE:  # box-reduce first: a 1 x 60000 banner's square would be 10 GB of pixels
        image = image.reduce(math.ceil(side / MAX_PAD_SIDE))
        side = max(image.size)
    if image.size != (side, side):
        canvas = Image.new("RGB", (side, side), (255, 255, 255))
        canvas.paste(image, ((side - image.size[0]) // 2, (side - image.size[1]) // 2))
        image = canvas
    if side != size:
        image = image.resize((size, size), Image.BICUBIC)
    # flip the uint8 pixels, then one contiguous float copy: 4x faster than converting PIL to float
    return np.asarray(image)[:, :, ::-1].astype(np.float32)


# -- selecting tags -----------------------------------------------------------------------------
def mcut_threshold(probs) -> float:
    """MCut (Largeron et al. 2012): the midpoint of the largest gap between consecutive scores
    sorted in descending order."""
    s = np.sort(np.asarray(probs, dtype=np.float64))[::-1]
    t = int(np.argmax(s[:-1] - s[1:]))
    return float((s[t] + s[t + 1]) / 2)


def norm(tag: str) -> str:
    """The form tags are matched in: underscores as spaces, spaces collapsed, lower case,
    parentheses unescaped."""
    tag = tag.replace("\\(", "(").replace("\\)", ")")
    return " ".join(tag.replace("_", " ").split()).lower()


def _tag_list(text: str) -> tuple[str, ...]:
    return tuple(norm(t) for t in text.split(",") if t.strip())


def display(tag: str, remove_underscore: bool) -> str:
    if remove_underscore and len(tag) > 3 and tag not in KAOMOJI:
        return tag.replace("_", " ")
    return tag


def expand_character(tag: str) -> list[str]:
    """kohya's ``--character_tag_expand``: the last parenthesised part is the series, a tag of its
    own: ``chara_(costume)_(series)`` -> ``chara_(costume)``, ``series``."""
    if not tag.endswith(")") or "(" not in tag:
        return [tag]
    head, _, series = tag[:-1].rpartition("(")
    head = head[:-1] if head.endswith("_") else head
    return [head, series.replace(")", "")]


def parse_replacements(spec: str) -> dict[str, str]:
    """``source,target;source,target`` (``\\,`` and ``\\;`` inside a tag) -> {norm(source): target}."""
    out = {}
    escaped = spec.replace("\\,", "\0").replace("\\;", "\1")
    for pair in escaped.split(";"):
        if not pair.strip():
            continue
        parts = [p.replace("\0", ",").replace("\1", ";").strip() for p in pair.split(",")]
        if len(parts) != 2 or not all(parts):
            shown = pair.replace("\0", "\\,").replace("\1", "\\;")
            raise AdapterhubError(f"wd: --tag-replacement: {shown!r} is not source,target")
        out[norm(parts[0])] = parts[1]
    return out


@dataclass(frozen=True)
class Settings:
    general: float = DEFAULT_THRESHOLD
    character: float = DEFAULT_THRESHOLD
    mcut: str = "off"
    rating: str = "off"
    character_tags_first: bool = False
    always_first: tuple[str, ...] = ()
    undesired: frozenset[str] = frozenset()
    remove_underscore: bool = False
    escape_parens: bool = False
    separator: str = ", "
    character_tag_expand: bool = False
    replacements: tuple[tuple[str, str], ...] = ()

    @cached_property
    def replace(self) -> dict[str, str]:
        return dict(self.replacements)

    @classmethod
    def from_options(cls, o) -> "Settings":
        general = DEFAULT_THRESHOLD if o.threshold is None else o.threshold
        character = general if o.character_threshold is None else o.character_threshold
        for flag, value in (("--threshold", general), ("--character-threshold", character)):
            if not 0 <= value <= 1:
                raise AdapterhubError(f"wd: {flag} is a score between 0 and 1, not {value}")
        return cls(general, character, o.mcut, o.rating, o.character_tags_first, _tag_list(o.always_first_tags),
                   frozenset(_tag_list(o.undesired_tags)), o.remove_underscore, o.escape_parens,
                   o.caption_separator, o.character_tag_expand,
                   tuple(parse_replacements(o.tag_replacement).items()))


def row_tags(name: str, category: int, s: Settings) -> list[str]:
    """The tags one table row writes (two for an expanded character), as kohya prepares them:
    expanded, underscores removed, replaced."""
    parts = expand_character(name) if s.character_tag_expand and category == CHARACTER else [name]
    tags = [display(p, s.remove_underscore) for p in parts]
    return [s.replace.get(norm(t), t) for t in tags] if s.replacements else tags


def select_tags(probs: np.ndarray, table: TagTable, s: Settings) -> list[str]:
    """One image's tags from its scores (one per table row), in kohya's order."""
    def above(rows, threshold):
        return [row_tags(table.names[i], table.categories[i], s) for i in rows[probs[rows] >= threshold]]

    def wanted(units):
        units = [[t for t in unit if norm(t) not in s.undesired] for unit in units]
        return [unit for unit in units if unit]

    general_rows, character_rows = table.rows(GENERAL), table.rows(CHARACTER)
    g, c = s.general, s.character
    if s.mcut in ("general", "both") and len(general_rows) > 1:
        g = mcut_threshold(probs[general_rows])
    if s.mcut in ("character", "both") and len(character_rows) > 1:
        c = max(MIN_CHARACTER_MCUT, mcut_threshold(probs[character_rows]))
    general, characters = wanted(above(general_rows, g)), wanted(above(character_rows, c))
    units = characters[::-1] + general if s.character_tags_first else general + characters
    tags = [t for unit in _with_rating(units, probs, table, s) for t in unit]
    for want in s.always_first:
        found = [t for t in tags if norm(t) == want]
        tags = found + [t for t in tags if norm(t) != want]
    if s.escape_parens:
        tags = [t.replace("(", "\\(").replace(")", "\\)") for t in tags]
    return tags


def _with_rating(units: list[list[str]], probs, table: TagTable, s: Settings) -> list[list[str]]:
    rows = table.rows(RATING)
    if s.rating == "off" or not len(rows):
        return units
    rating = row_tags(table.names[rows[int(np.argmax(probs[rows]))]], RATING, s)
    if any(norm(t) in s.undesired for t in rating):
        return units
    return [rating] + units if s.rating == "first" else units + [rating]


# -- the captioner ------------------------------------------------------------------------------
class WDTagger:
    name = "wd"
    description = "WD tagger family (SmilingWolf wd-v1-4 / wd-v3 ONNX: ViT, ConvNeXt, SwinV2, EVA02)"

    def __init__(self):
        self._key = self._options = None
        self.session = self.table = self.io = self.model_path = None
        self.settings = Settings()

    @property
    def size(self) -> int:
        return self.io.size

    def load(self, options) -> None:
        """Open the model once per (model files, device); check the options before any image."""
        if options is self._options:
            return  # the runner passes one options object for the whole run
        if options.mode == "append" and options.caption_separator != ", ":
            raise AdapterhubError("wd: --caption-separator other than ', ' cannot be used with --mode append "
                                  "(appending reads existing captions as comma-separated tags)")
        settings = Settings.from_options(options)
        files = list(locate(options.model or DEFAULT_MODEL))
        key = (tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files),
               str(options.device))
        if key != self._key:
            table = read_tags(files[0])
            session = open_session(files[1], str(options.device))
            self.io = interface(session, files[1], table, files[0])
            self.session, self.table, self._key = session, table, key
            self.model_path = files[1]
        self.settings, self._options = settings, options

    def transform(self, options):
        self.load(options)
        return partial(prepare_image, size=self.io.size)

    def scores(self, images) -> np.ndarray:
        """(images, tags) sigmoid scores; ``images`` are prepared arrays or PIL images."""
        x = np.stack([im if isinstance(im, np.ndarray) else prepare_image(im, self.io.size) for im in images])
        step = self.io.batch or len(x)
        out = []
        for i in range(0, len(x), step):
            chunk = x[i:i + step]
            n = len(chunk)
            if n < step:  # a model exported with a fixed batch size: pad the last batch
                chunk = np.concatenate([chunk, np.zeros((step - n, *chunk.shape[1:]), np.float32)])
            out.append(self.session.run([self.io.output], {self.io.input: chunk})[0][:n])
        probs = np.concatenate(out)
        if probs.ndim != 2 or probs.shape[1] != len(self.table):
            raise AdapterhubError(f"{self.model_path}: the model scores {probs.shape[-1]} tags but "
                                  f"{TAGS_FILE} lists {len(self.table)}")
        return probs

    def caption(self, images, options) -> list:
        """Tag lists (joined with the separator when it is not the dataset's ', ')."""
        self.load(options)
        rows = [select_tags(p, self.table, self.settings) for p in self.scores(images)]
        if self.settings.separator == ", ":
            return rows
        return [self.settings.separator.join(r) for r in rows]
