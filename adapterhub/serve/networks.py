"""The extra networks a server offers: LoRAs (every weight-space type), textual inversions and hypernetworks,
found in the adapter folders (by file stem, top level: where ``<lora:NAME>`` tags are looked up) and in the
catalog, as the webui lists its ``models/Lora``, ``embeddings`` and ``models/hypernetworks`` folders; and the
conditioning networks (every type fed with a control image, its UNet runtime ``UNET_RESIDUALS``: ControlNets,
T2I-Adapters; files or diffusers folders) that ControlNet units name, as the extension lists ``models/ControlNet``.

A scan reads headers only (:func:`adapterhub.api.identify`); embeddings are parsed (small files) for their
token, vector count and width. Results are cached by (path, mtime, size): ``refresh`` re-reads only what
changed. An unreadable file is left out and remembered in ``skipped`` (the webui logs and skips it too).
"""
from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from adapterhub.errors import AdapterhubError

KINDS = ("lora", "embedding", "hypernetwork")  # the webui's extra-network pages, each type declaring its own
CONTROL = "control"  # the ControlNet extension's model list


@dataclass
class Network:
    """One network as the server lists it: ``name`` is what a tag or a prompt word calls it."""

    name: str
    kind: str  # one of KINDS
    path: Path
    metadata: dict = field(default_factory=dict)
    token: str | None = None  # embeddings: the word that triggers it
    vectors: int | None = None
    width: int | None = None

    @property
    def alias(self) -> str:
        """The webui's alias: the training run's output name when the file records one."""
        return str(self.metadata.get("ss_output_name") or self.name)


def _kind(adapter_type) -> str | None:
    """The page ``adapter_type`` is listed on: the first of KINDS for a weight delta, CONTROL for a network fed
    with a control image, else its declared ``extra_network`` (None, or a page the server has not: not listed)."""
    from adapterhub.types import UNET_RESIDUALS

    if adapter_type.runtime_kind == UNET_RESIDUALS:
        return CONTROL
    kind = KINDS[0] if adapter_type.weight_space else adapter_type.extra_network
    return kind if kind in KINDS else None


def _read(path: Path) -> Network | None:
    """The network in ``path``, or None when it is none of KINDS nor CONTROL (a full model ...)."""
    from adapterhub.api import identify, load

    file, adapter_type, _ = identify(path)
    kind = _kind(adapter_type)
    if kind is None:
        return None
    if kind != "embedding":
        return Network(path.stem if path.is_file() else path.name, kind, path, dict(file.metadata))
    adapter = load(path)
    widths = sorted({p.width for p in adapter.patches.values()})
    return Network(path.stem, kind, path, dict(adapter.metadata), token=str(adapter.extra.get("token") or path.stem),
                   vectors=adapter.extra.get("vectors"), width=widths[-1] if widths else None)


class Networks:
    """The networks of ``dirs`` and of the catalog (``catalog``: a URL, ``None`` for ``$ADAPTERHUB_CATALOG`` or
    ./catalog.db when it exists, ``False`` for none). Thread-safe: the API lists while the worker samples."""

    def __init__(self, dirs: Sequence[str | Path] = (), catalog: str | bool | None = None):
        from adapterhub.stack import SUFFIXES

        self.dirs = [Path(d) for d in dirs]
        self.catalog = catalog
        self._suffixes = SUFFIXES
        self._cache: dict[tuple, Network | None] = {}
        self._lock = threading.Lock()
        self.items: list[Network] = []
        self.skipped: dict[str, str] = {}  # path -> why it was left out
        self.refresh()

    def refresh(self) -> None:
        """Re-scan the folders and the catalog (files unchanged since the last scan are not re-read)."""
        found: dict[str, Network] = {}
        skipped: dict[str, str] = {}
        cache: dict[tuple, Network | None] = {}
        # the folders first: a name in both is the folder's, as a tag finds it
        sources = [(p.stem if p.is_file() else p.name, p) for p in self._files()] + self._catalog_files()
        for name, path in sources:
            network = self._identified(path, cache, skipped)
            if network is not None:
                network = replace(network, name=name)
                found.setdefault(f"{network.kind}:{network.name}", network)
        with self._lock:
            self._cache = cache
            self.items = sorted(found.values(), key=lambda n: (n.kind, n.name.lower()))
            self.skipped = skipped

    def _identified(self, path: Path, cache: dict, skipped: dict) -> Network | None:
        """The network in ``path`` through the cache, by (path, mtime, size); None when it is none or unreadable."""
        try:
            key = _fingerprint(path)
        except OSError:
            return None
        if key not in self._cache:
            try:
                self._cache[key] = _read(path)
            except AdapterhubError as err:
                skipped[str(path)] = str(err)
                return None
        cache[key] = self._cache[key]
        return cache[key]

    def _files(self) -> list[Path]:
        """The adapter files of the folders, and their subfolders that hold a diffusers ``config.json`` (a
        ControlNet saved by diffusers): what a name finds there (:func:`adapterhub.stack.find_adapter`)."""
        files = []
        for folder in self.dirs:
            if folder.is_dir():
                files += sorted(p for p in folder.iterdir() if not p.name.startswith(".") and (
                    p.suffix.lower() in self._suffixes and p.is_file() or (p / "config.json").is_file()))
        return files

    def _catalog_files(self) -> list[tuple[str, Path]]:
        """(name, path) of the catalog's present entries (none when there is no catalog). Each file is identified
        here as the folders' are, so both sources list by one rule."""
        if self.catalog is False:
            return []
        from adapterhub.catalog import list_entries, open_catalog, sqlite_path
        from adapterhub.catalog.db import catalog_url

        db_file = sqlite_path(catalog_url(self.catalog or None))
        if db_file is not None and not db_file.exists():
            return []
        with open_catalog(self.catalog or None) as catalog:
            entries = list_entries(catalog)
        return [(e["name"] or Path(e["path"]).stem, Path(e["path"])) for e in entries if e["path"]]

    def of_kind(self, kind: str) -> list[Network]:
        with self._lock:
            return [n for n in self.items if n.kind == kind]

    def embeddings_in(self, *texts: str) -> list[Network]:
        """The embeddings whose token is a word of ``texts`` (case-insensitive: CLIP's tokenizer lowercases),
        which the webui would apply: they go into the request's stack."""
        joined = "\n".join(texts)
        return [n for n in self.of_kind("embedding")
                if re.search(rf"(?<![\w-]){re.escape(n.token or n.name)}(?![\w-])", joined, re.IGNORECASE)]


def _fingerprint(path: Path) -> tuple:
    """(path, mtime, size) of a file; of a folder, the newest mtime and the total size of its files."""
    if path.is_dir():
        stats = [p.stat() for p in path.rglob("*") if p.is_file()]
        return (str(path.resolve()), max((s.st_mtime_ns for s in stats), default=0), sum(s.st_size for s in stats))
    st = path.stat()
    return (str(path.resolve()), st.st_mtime_ns, st.st_size)


def drop_missing_networks(prompt: str, dirs: Sequence[str | Path]) -> tuple[str, list[tuple[str, str]]]:
    """``prompt`` without the extra-network tags (``<lora:…>``, ``<lyco:…>``, ``<hypernet:…>``: those the
    registered types declare) whose network cannot be found in ``dirs`` or the catalog, and those networks as
    (label, name), label the declaring tag's (``Lora``, ``Hypernetwork``). The webui reports a missing network and
    samples without it."""
    from adapterhub.stack import TAG, find_adapter, tag_kind

    missing: list[tuple[str, str]] = []

    def keep(match: re.Match) -> str:
        kind = tag_kind(match.group(1))
        if kind is None:
            return match.group(0)
        name = match.group(2).split(":")[0].strip().strip("\"'")
        try:
            find_adapter(name, dirs)
        except AdapterhubError:
            missing.append((kind.label, name))
            return ""
        return match.group(0)

    cleaned = TAG.sub(keep, prompt)
    if not missing:
        return prompt, []
    return re.sub(r"[ \t]{2,}", " ", cleaned).strip(), missing


def missing_notes(missing: Sequence[tuple[str, str]]) -> list[str]:
    """The notes for ``info``: one line per label (in order of first appearance), names joined, in the webui's
    wording (``Lora not found: a, b``)."""
    names: dict[str, list[str]] = {}
    for label, name in missing:
        if name not in names.setdefault(label, []):
            names[label].append(name)
    return [f"{label} not found: {', '.join(found)}" for label, found in names.items()]
