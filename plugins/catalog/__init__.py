"""Built-in catalog enrichers: trigger words, training facts and a preview image for each entry.

Registered through the entry-point group ``adapterhub`` (``catalog = "adapterhub_plugins.catalog"``)
like any third-party plugin; it only reads the file's header metadata and the sidecars beside it.

Trigger words, in order of trust, without duplicates:
  1. sidecars: A1111 ``<stem>.json`` ``activation text``; Civitai Helper ``<stem>.civitai.info`` and
     Lora Manager ``<stem>.metadata.json`` ``trainedWords``;
  2. ModelSpec ``modelspec.trigger_phrase``;
  3. kohya: the class tokens of DreamBooth-style folders (``10_ohwx woman`` -> ``ohwx woman``,
     from ``ss_tag_frequency`` / ``ss_dataset_dirs`` keys and ``ss_datasets`` subsets), then the most
     frequent caption tags in ``ss_tag_frequency`` (summed over every folder, not just the first).
Training facts: steps, epochs, resolution and friends from ``ss_*`` (kohya), ``training_info``
(ai-toolkit), ``modelspec.*`` and an A1111 embedding's ``step``.
Preview: ``<stem>.png`` (a user's own, which A1111 prefers), then ``.preview.png`` and other kinds.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from adapterhub.hookspecs import hookimpl

MAX_TAG_TRIGGERS = 10
MAX_TRIGGERS = 24
PREVIEW_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".preview.png", ".preview.jpg", ".preview.jpeg",
                    ".preview.webp", ".gif")
SIDECAR_LIMIT = 4 << 20
_FOLDER_REPEATS = re.compile(r"^\d+_(.+)$")
TRAINING_KEYS = {  # our name: metadata keys that give it, first found wins
    "steps": ("ss_steps", "ss_max_train_steps"), "epochs": ("ss_epoch", "ss_num_epochs"),
    "resolution": ("ss_resolution",), "images": ("ss_num_train_images",), "batch_size": ("ss_batch_size_per_device",),
    "learning_rate": ("ss_learning_rate",), "unet_lr": ("ss_unet_lr",), "text_encoder_lr": ("ss_text_encoder_lr",),
    "optimizer": ("ss_optimizer",), "scheduler": ("ss_lr_scheduler",), "network_module": ("ss_network_module",),
    "network_dim": ("ss_network_dim",), "network_alpha": ("ss_network_alpha",), "clip_skip": ("ss_clip_skip",),
    "mixed_precision": ("ss_mixed_precision",), "base_model": ("ss_sd_model_name",),
    "base_model_version": ("ss_base_model_version",), "started_at": ("ss_training_started_at",),
    "finished_at": ("ss_training_finished_at",), "seed": ("ss_seed",), "output_name": ("ss_output_name",),
    "date": ("modelspec.date",), "title": ("modelspec.title",), "author": ("modelspec.author",),
}


def _json(value) -> object:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except (json.JSONDecodeError, ValueError):
        return None


def _number(value):
    """'1200' -> 1200, '1e-4' -> 0.0001, other strings unchanged, 'None' -> None."""
    if not isinstance(value, str):
        return value
    if value.strip() in ("", "None", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _exists(path: Path, beside: set[str] | None) -> bool:
    """Whether a sidecar exists: from the scan's listing when it gave one, else by asking the disk."""
    return path.name in beside if beside is not None else path.is_file()


def _read_sidecar(path: Path, beside: set[str] | None = None) -> dict:
    try:
        if not _exists(path, beside) or path.stat().st_size > SIDECAR_LIMIT:
            return {}
        data = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except (OSError, json.JSONDecodeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _split(value) -> list[str]:
    items = value if isinstance(value, list) else [value] if isinstance(value, str) else []
    return [w.strip() for item in items if isinstance(item, str) for w in item.split(",") if w.strip()]


def sidecar_triggers(stem: Path, beside: set[str] | None = None) -> list[str]:
    a1111 = _read_sidecar(stem.with_name(stem.name + ".json"), beside)
    civitai = _read_sidecar(stem.with_name(stem.name + ".civitai.info"), beside)
    manager = _read_sidecar(stem.with_name(stem.name + ".metadata.json"), beside).get("civitai") or {}
    return (_split(a1111.get("activation text")) + _split(civitai.get("trainedWords"))
            + _split(manager.get("trainedWords") if isinstance(manager, dict) else None))


def _class_tokens(metadata: dict) -> list[str]:
    tokens = []
    for key in ("ss_tag_frequency", "ss_dataset_dirs"):
        folders = _json(metadata.get(key))
        for name in folders if isinstance(folders, dict) else {}:
            match = _FOLDER_REPEATS.match(str(name))
            tokens += [match.group(1).strip()] if match else []
    datasets = _json(metadata.get("ss_datasets"))
    for dataset in datasets if isinstance(datasets, list) else []:
        for subset in (dataset.get("subsets") or []) if isinstance(dataset, dict) else []:
            if isinstance(subset, dict) and isinstance(subset.get("class_tokens"), str):
                tokens.append(subset["class_tokens"].strip())
    return [t for t in tokens if t]


def frequent_tags(metadata: dict, limit: int = MAX_TAG_TRIGGERS) -> list[str]:
    """The most frequent caption tags of ``ss_tag_frequency``, summed over all dataset folders."""
    folders = _json(metadata.get("ss_tag_frequency"))
    counts: Counter = Counter()
    for tags in folders.values() if isinstance(folders, dict) else []:
        for tag, n in tags.items() if isinstance(tags, dict) else []:
            if isinstance(n, (int, float)) and str(tag).strip():
                counts[str(tag).strip()] += n
    return [tag for tag, _ in counts.most_common(limit)]


def trigger_words(metadata: dict, stem: Path, beside: set[str] | None = None) -> list[str]:
    found = sidecar_triggers(stem, beside) + _split(metadata.get("modelspec.trigger_phrase"))
    found += _class_tokens(metadata) + frequent_tags(metadata)
    seen, out = set(), []
    for word in found:
        if word.lower() not in seen:
            seen.add(word.lower())
            out.append(word)
    return out[:MAX_TRIGGERS]


def training_facts(metadata: dict, extra: dict) -> dict:
    facts = {}
    for name, keys in TRAINING_KEYS.items():
        value = next((_number(metadata[k]) for k in keys if k in metadata), None)
        if value is not None:
            facts[name] = value
    if isinstance(facts.get("resolution"), str):
        numbers = [int(n) for n in re.findall(r"\d+", facts["resolution"])]
        facts["resolution"] = numbers or facts["resolution"]
    info = _json(metadata.get("training_info"))
    if isinstance(info, dict):
        facts.setdefault("steps", info.get("step"))
        facts.setdefault("epochs", info.get("epoch"))
    if isinstance(extra.get("step"), int):
        facts.setdefault("steps", extra["step"])
    return {k: v for k, v in facts.items() if v is not None}


def preview_for(path: Path, beside: set[str] | None = None) -> str | None:
    stem = path if path.is_dir() else path.with_suffix("")
    for suffix in PREVIEW_SUFFIXES:
        candidate = stem.with_name(stem.name + suffix)
        if _exists(candidate, beside):
            return str(candidate)
    return None


@hookimpl
def adapterhub_enrich_catalog_entry(entry: dict, file) -> None:
    path = Path(entry["path"])
    metadata = file.metadata or {}
    stem = path if path.is_dir() else path.with_suffix("")
    beside = set(entry["sidecars"]) if entry.get("sidecars") is not None else None  # the scan's listing
    words = trigger_words(metadata, stem, beside)
    entry["trigger_words"] = list(dict.fromkeys([*entry.get("trigger_words", []), *words]))
    entry["training"] = {**training_facts(metadata, file.extra or {}), **entry.get("training", {})}
    entry["preview"] = entry.get("preview") or preview_for(path, beside)
