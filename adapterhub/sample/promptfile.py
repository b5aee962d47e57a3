"""Many prompts in one process (``adapterhub sample --prompts FILE``), split across processes.

One prompt per line; blank lines and lines starting with ``#`` are skipped. A line that starts with
``{`` is a JSON object of options (``{"prompt": "a cat", "seed": 5}``). A line that starts with
``--`` carries options, as the webui's "Prompts from file or textbox" script reads them (``shlex``
words; ``--prompt`` and ``--negative_prompt`` take every word up to the next option)::

    a castle on a hill, (masterpiece:1.2)
    # a comment
    --prompt "a cat <lora:style:0.8>" --negative_prompt blurry --seed 5 --steps 20 --cfg_scale 6.5
    --prompt a red fox --sampler_name "Euler a" --width 512 --height 768 --batch_size 2 --n_iter 2

Options: the webui's ``prompt``, ``negative_prompt``, ``seed``, ``steps``, ``cfg_scale``, ``sampler_name``,
``width``, ``height``, ``batch_size``, ``n_iter`` (images = batch size x n_iter), and adapterhub's own
``negative``, ``cfg``, ``sampler``, ``schedule``, ``clip_skip``, ``size``, ``batch``, ``images``,
``stack`` (dashes or underscores). Anything a line leaves out comes from the base request (the
command line). A bad option is an error naming the file and line, raised before any model loads.

Under ``accelerate launch`` (or ``torchrun``) process ``RANK`` of ``WORLD_SIZE`` takes the prompts ``i``
with ``i % WORLD_SIZE == RANK`` (:func:`shard`); output names come from the prompt's position in the
whole file, so the processes never write the same name.
"""
from __future__ import annotations

import os
import re
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from adapterhub.errors import AdapterhubError
from adapterhub.sample.request import Request

T = TypeVar("T")


def _size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m:
        raise ValueError(text)
    return int(m.group(1)), int(m.group(2))


# option -> (Request field(s), converter); words of the prompt options are joined
OPTIONS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "prompt": ("prompt", str), "negative_prompt": ("negative", str), "negative": ("negative", str),
    "seed": ("seed", int), "steps": ("steps", int), "cfg_scale": ("cfg", float), "cfg": ("cfg", float),
    "sampler_name": ("sampler", str), "sampler": ("sampler", str), "schedule": ("schedule", str),
    "clip_skip": ("clip_skip", int), "width": ("width", int), "height": ("height", int), "size": ("size", _size),
    "batch_size": ("batch", int), "batch": ("batch", int), "n_iter": ("n_iter", int), "images": ("images", int),
    "stack": ("stack", str),
}
TEXT_OPTIONS = ("prompt", "negative_prompt", "negative")


@dataclass
class Job:
    """One prompt of the file: its position among the file's prompts, its line number, its request."""

    index: int
    line: int
    request: Request

    @property
    def image_count(self) -> int:
        return int(self.request.images or self.request.batch)


def parse_options(text: str, where: str = "line") -> dict[str, Any]:
    """The options of one line as Request fields (``size`` split, ``n_iter`` kept for :func:`apply`)."""
    try:
        words = shlex.split(text)
    except ValueError as err:
        raise AdapterhubError(f"{where}: {err}") from None
    out: dict[str, Any] = {}
    pos = 0
    while pos < len(words):
        word = words[pos]
        if not word.startswith("--"):
            raise AdapterhubError(f"{where}: {word!r} should be an option starting with --")
        name = word[2:].replace("-", "_").lower()
        if name not in OPTIONS:
            raise AdapterhubError(f"{where}: unknown option {word} (known: --{', --'.join(OPTIONS)})")
        if pos + 1 >= len(words):
            raise AdapterhubError(f"{where}: {word} needs a value")
        target, convert = OPTIONS[name]
        if name in TEXT_OPTIONS:
            end = pos + 2
            while end < len(words) and not words[end].startswith("--"):
                end += 1
            value, pos = " ".join(words[pos + 1:end]), end
        else:
            value, pos = words[pos + 1], pos + 2
        _put(out, target, convert, value, f"{where}: {word} {value!r}")
    return out


def _put(out: dict[str, Any], target: str, convert, value, what: str) -> None:
    """``out[target] = convert(value)`` (a size fills width and height); ``what`` names the value in the error."""
    try:
        converted = convert(value)
    except (TypeError, ValueError):
        raise AdapterhubError(f"{what} is not a valid value") from None
    if target == "size":
        out["width"], out["height"] = converted
    else:
        out[target] = converted


def parse_json(text: str, where: str = "line") -> dict[str, Any]:
    """A JSON-object line (``{"prompt": "a cat", "seed": 5, "steps": 20}``): the same option names as
    the ``--`` lines, values as JSON types or strings."""
    import json

    try:
        data = json.loads(text)
    except ValueError as err:
        raise AdapterhubError(f"{where}: not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise AdapterhubError(f"{where}: a JSON line must be an object")
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_").lower()
        if name not in OPTIONS:
            raise AdapterhubError(f"{where}: unknown key {key!r} (known: {', '.join(OPTIONS)})")
        target, convert = OPTIONS[name]
        _put(out, target, convert, value if isinstance(value, str) or convert is not _size else str(value),
             f"{where}: {key} {value!r}")
    return out


def apply(base: Request, options: dict[str, Any]) -> Request:
    """``base`` with a line's options; ``n_iter`` becomes ``images = batch * n_iter``."""
    options = dict(options)
    n_iter = options.pop("n_iter", None)
    req = replace(base, **options)
    if n_iter is not None:
        req = replace(req, images=int(req.batch) * int(n_iter))
    return req


def parse_lines(lines: Sequence[str], base: Request, source: str = "prompts") -> list[Job]:
    """Jobs from the lines of a prompt file (see the module docstring)."""
    jobs = []
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            options = parse_json(line, f"{source}:{number}")
        elif line.startswith("--"):
            options = parse_options(line, f"{source}:{number}")
        else:
            options = {"prompt": line}
        jobs.append(Job(len(jobs), number, apply(base, options)))
    return jobs


def read_prompts(path: str | Path, base: Request) -> list[Job]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise AdapterhubError(f"{path}: cannot read the prompt file ({err.__class__.__name__})") from None
    jobs = parse_lines(text.splitlines(), base, str(path))
    if not jobs:
        raise AdapterhubError(f"{path}: no prompts in this file (blank lines and # comments are skipped)")
    return jobs


def shard(items: Sequence[T], rank: int, world: int) -> list[T]:
    """Items ``i`` with ``i % world == rank`` (every item in exactly one process)."""
    if world < 1 or not 0 <= rank < world:
        raise AdapterhubError(f"process rank {rank} of {world}: the rank must be in 0..{world - 1}")
    return [item for i, item in enumerate(items) if i % world == rank]


def process() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the variables ``accelerate launch`` and torchrun set."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    return (int(env.get("RANK", "0")) if world > 1 else 0), world, int(env.get("LOCAL_RANK", "0"))


def first_indices(jobs: Sequence[Job], slots: Callable[[Job], int]) -> list[int]:
    """The first output index of each job when job ``j`` writes ``slots(j)`` files: the same in every
    process, so names never collide."""
    out, at = [], 0
    for job in jobs:
        out.append(at)
        at += slots(job)
    return out
