"""Stack switching for the generator: the adapters of a request, read once, switched in place.

A request's stack is its ``stack=`` entries, its prompt's ``<lora:…>`` tags and the embeddings its prompts name
(the webui's embeddings folder: :func:`embedding_candidates`, :func:`embedding_names_in`). :class:`StackSwitcher`
keeps the adapters it has read (same file, unchanged: the same object, so the weight engine leaves the parameters
whose contributions do not change alone) and the stack applied to the pipeline; switching to an equal stack
changes nothing.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from adapterhub.errors import AdapterhubError

EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")  # the webui's embeddings folder takes these (and images)
CACHED_ADAPTERS = 32  # adapters kept read between requests (most recently used)


class StackSwitcher:
    """The stack applied to ``pipe`` and the adapters read for earlier requests. ``notes``: the warnings of the
    request being prepared (embeddings skipped because they do not fit the base)."""

    def __init__(self, pipe, adapter_dirs: Sequence[str | Path] = ()):
        self.pipe = pipe
        self.adapter_dirs = list(adapter_dirs)
        self.stack = None  # the applied Stack
        self.notes: list[str] = []
        self._key: tuple | None = None
        self._adapters: OrderedDict = OrderedDict()  # (path, mtime, size) -> Adapter, most recent last

    def request_stack(self, stack_spec, prompt: str, negative: str):
        """The explicit stack (a Stack, a spec string or ``[(adapter or path, weight), ...]``) plus the prompt's
        tags and the embeddings the prompts name; and the prompt without its tags."""
        from adapterhub.stack import Stack

        self.notes = []
        tagged, cleaned = Stack.from_prompt(prompt, dirs=self.adapter_dirs)
        if stack_spec is None:
            explicit = Stack()
        elif isinstance(stack_spec, Stack):
            explicit = stack_spec
        elif isinstance(stack_spec, str):
            explicit = Stack.parse(stack_spec, dirs=self.adapter_dirs) if stack_spec.strip() else Stack()
        else:
            explicit = Stack(stack_spec)
        entries = [*explicit.entries, *tagged.entries]
        for entry in entries:
            self.preload(entry)
        entries += self._named_embeddings(cleaned + "\n" + negative, entries)
        return Stack(entries), cleaned

    def _named_embeddings(self, text: str, entries) -> list:
        """Entries (weight 1) for the textual inversions of ``adapter_dirs`` (then the catalog) whose name
        ``text`` spells, as the webui uses every embedding of its folder that a prompt names: a name is a file
        stem, matched as a token sequence of the prompt (:func:`embedding_names_in`), so any case and whole
        words only. Embeddings already in the stack are not added twice; one that does not fit the base is
        skipped with a warning (the webui lists those as skipped)."""
        from adapterhub.stack import Entry

        have = {str(e.path.resolve()) for e in entries if e.path is not None}
        tokens = {str(e.adapter.extra.get("token", "")).lower() for e in entries
                  if e.adapter is not None and e.adapter.plugin.prompt_tokens}
        candidates = {n: p for n, p in embedding_candidates(self.adapter_dirs).items() if n.lower() not in tokens}
        if not candidates:
            return []
        found = []
        for name in embedding_names_in(text, candidates, self.pipe.tokenizer):
            path = candidates[name]
            if str(path.resolve()) in have:
                continue
            entry = Entry(path, path=path)
            try:
                self.preload(entry)
            except AdapterhubError:
                continue  # a file of that name that is not readable is not an embedding the prompt meant
            adapter = entry.adapter
            if adapter is None or not adapter.plugin.prompt_tokens:
                continue
            problem = _embedding_misfit(adapter, self.pipe)
            if problem:
                self.notes.append(f"embedding {name!r} ({path}) does not fit this base ({problem}): skipped, its "
                                  "word is read as plain text")
                continue
            have.add(str(path.resolve()))
            found.append(entry)
        return found

    def preload(self, entry) -> None:
        """Reuse adapters read for earlier requests (same file, unchanged): the weight engine then
        sees the same patches and leaves the parameters they give equal contributions alone."""
        if entry.adapter is not None:
            return
        path = entry.resolve(self.adapter_dirs)
        try:
            st = path.stat()
        except OSError:
            return
        key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
        if key in self._adapters:
            self._adapters.move_to_end(key)
        else:
            from adapterhub.api import load

            self._adapters[key] = load(path)
            while len(self._adapters) > CACHED_ADAPTERS:
                self._adapters.popitem(last=False)
        entry.adapter = self._adapters[key]

    def applied(self, stack):
        """The applied stack when it equals ``stack`` (its entries carry what attaching gave), else ``stack``."""
        return self.stack if stack_key(stack) == self._key and self.stack is not None else stack

    def use(self, stack, runner) -> None:
        """Switch the pipeline to ``stack`` (nothing changes when it equals the applied one); ``runner`` (the
        backend's) refuses a stack it cannot run before anything is attached."""
        key = stack_key(stack)
        if key == self._key:
            return
        runner.check_stack(stack)
        if len(stack):
            stack.apply(self.pipe, mode="attach", replace=self.stack is not None)
            self.stack = stack
        elif self.stack is not None:
            self.stack.remove()
            self.stack = None
        self._key = key

    def remove(self) -> None:
        """Take the applied stack off the pipeline (every tensor restored)."""
        if self.stack is not None:
            self.stack.remove()
        self.stack, self._key = None, None


def stack_key(stack) -> tuple:
    """What makes two stacks the same switch: the adapter objects, weights, block weights and attach options."""
    # attach options (a control image) count by identity: a new image re-attaches, the same one does not
    return tuple((id(e.adapter), e.te, e.unet, e.lbw, tuple(sorted((k, id(v)) for k, v in e.options.items())))
                 for e in stack.entries)


def embedding_candidates(dirs: Sequence[str | Path]) -> dict[str, Path]:
    """Name (file stem) -> file of every file that may be an embedding: in ``dirs`` and their sub-folders (the
    webui walks its embeddings folder), then the catalog's textual inversions when a catalog is there. The
    first file of a name wins, as a name in ``--stack`` is looked up."""
    found: dict[str, Path] = {}
    for folder in dirs:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() in EMBEDDING_SUFFIXES and path.is_file():
                found.setdefault(path.stem, path)
    for name, path in _catalog_embeddings().items():
        found.setdefault(name, path)
    return found


def _catalog_embeddings() -> dict[str, Path]:
    """The textual inversions of the default catalog (``$ADAPTERHUB_CATALOG`` or ./catalog.db), when there is
    one; never creates it. A catalog that cannot be read adds nothing: the folders still count."""
    import importlib.util

    if importlib.util.find_spec("adapterhub.catalog") is None:
        return {}
    from adapterhub.catalog import catalog_url, list_entries, open_catalog, sqlite_path

    url = catalog_url(None)
    db_file = sqlite_path(url)
    if db_file is not None and not db_file.exists():
        return {}
    from adapterhub.plugins import adapter_types

    kinds = [name for name, t in adapter_types().items() if t.prompt_tokens]  # types a prompt names by a word
    try:
        with open_catalog(url) as catalog:
            rows = [row for kind in kinds for row in list_entries(catalog, type=kind)]
    except AdapterhubError:
        return {}
    return {Path(r["path"]).stem: Path(r["path"]) for r in rows if r.get("path")}


def _words(text: str, tokenizer) -> list[str]:
    """``text`` as the CLIP tokenizer's BPE pieces, without its added tokens (attached embeddings add some, and
    the pieces must not depend on what is attached): lower-cased, ``</w>`` ending each word."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.pre_tokenizer is None:
        return tokenizer.tokenize(text)
    normal = backend.normalizer.normalize_str(text) if backend.normalizer is not None else text
    return [t.value for word, _ in backend.pre_tokenizer.pre_tokenize_str(normal) for t in backend.model.tokenize(word)]


def embedding_names_in(text: str, names, tokenizer) -> list[str]:
    """The names among ``names`` that ``text`` spells, by the webui's rule (``EmbeddingDatabase``): each name is
    tokenized, and at every token of the text the longest name whose tokens follow there is used (then the scan
    goes on after it). The tokenizer lower-cases and marks word ends, so ``easynegative`` and ``(EasyNegative:1.2)``
    name ``EasyNegative``, while ``EasyNegativeV2`` and ``easy negative`` do not."""
    by_first: dict[str, list[tuple[list[str], str]]] = {}
    for name in names:
        pieces = _words(name, tokenizer)
        if pieces:
            by_first.setdefault(pieces[0], []).append((pieces, name))
    for group in by_first.values():
        group.sort(key=lambda item: -len(item[0]))
    tokens, used, i = _words(text, tokenizer), [], 0
    while i < len(tokens):
        for pieces, name in by_first.get(tokens[i], ()):
            if tokens[i:i + len(pieces)] == pieces:
                used.append(name)
                i += len(pieces) - 1
                break
        i += 1
    return list(dict.fromkeys(used))


def _embedding_misfit(adapter, pipe) -> str | None:
    """Why an embedding cannot be used on ``pipe`` (another base's vector widths or encoders), else None."""
    from adapterhub.weights import component

    encoders = {p.component for p in adapter.patches.values()}
    wanted = {name for name in ("text_encoder", "text_encoder_2") if component(pipe, name) is not None}
    if encoders != wanted:
        return f"vectors for {', '.join(sorted(encoders))}; the base has {', '.join(sorted(wanted))}"
    for patch in adapter.patches.values():
        width = component(pipe, patch.component).get_input_embeddings().weight.shape[1]
        if patch.width != width:
            return f"vectors {patch.width} wide; {patch.component} takes {width}"
    return None
