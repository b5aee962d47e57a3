"""The documentation agrees with the program: docs/cli.md is the current ``--help`` of every command, every
option of every command is documented, no page shows an ``adapterhub`` command line with an option that
command does not have, and every relative link of README.md and docs/*.md resolves (anchors included).

The command tree is the real one (``adapterhub.cli.COMMANDS``, each command imported, groups walked), as
``docs/gen_cli.py`` renders it; the pages are read from the repository, never from the working directory.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


@pytest.fixture(scope="module")
def gen_cli():
    spec = importlib.util.spec_from_file_location("gen_cli", DOCS / "gen_cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tree(gen_cli):
    """``{"adapterhub sample": set of long flags, ...}`` for every command of the real click tree
    (hidden options left out: they need no documentation)."""
    return {path: gen_cli.long_flags(command) for path, command, _ in gen_cli.command_tree()}


@pytest.fixture(scope="module")
def accepted(gen_cli):
    """Every long flag each command accepts, hidden ones included (an example may use them)."""
    return {path: gen_cli.long_flags(command, hidden=True) for path, command, _ in gen_cli.command_tree()}


def _sections(text: str) -> dict[str, str]:
    """docs/cli.md's ``## `adapterhub X` `` sections by command path."""
    parts = re.split(r"^## `(adapterhub[^`]*)`\s*$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


@pytest.mark.parametrize("invoked_first", ["alone", False, True], ids=["after-a-command-ran-alone", "fresh", "after-the-cli-ran"])
def test_cli_page_is_current(gen_cli, invoked_first):
    """docs/cli.md equals what docs/gen_cli.py renders now (regenerate: python docs/gen_cli.py), also after the
    command line ran in the same process (click caches each command's help option with the first context's
    names, also when a test invoked one command by itself: the page must not depend on test order)."""
    if invoked_first:
        from click.testing import CliRunner

        from adapterhub.cli import cli

        CliRunner().invoke(cli, ["--help"])
        CliRunner().invoke(cli, ["doctor", "--help"])
    if invoked_first == "alone":  # a command invoked without the group's context caches a help option with no -h
        from click.testing import CliRunner

        from adapterhub.cli.train import train_cmd

        CliRunner().invoke(train_cmd, ["--help"])
    assert (DOCS / "cli.md").read_text(encoding="utf-8") == gen_cli.render(), \
        "docs/cli.md is stale: run .venv/bin/python docs/gen_cli.py"


def test_every_command_and_option_is_in_cli_page(tree):
    sections = _sections((DOCS / "cli.md").read_text(encoding="utf-8"))
    assert set(sections) == set(tree), "commands missing from or unknown to docs/cli.md"
    missing = {path: sorted(f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", sections[path]))
               for path, flags in tree.items()}
    assert not {p: f for p, f in missing.items() if f}, f"options not documented in docs/cli.md: {missing}"


def test_cli_page_documents_no_option_a_command_lacks(tree):
    sections = _sections((DOCS / "cli.md").read_text(encoding="utf-8"))
    # help texts may name another command's flag in prose, even at the start of a wrapped line ("--no-X
    # pair ..."): the option column (two spaces, then a flag or "-j, --jobs") must be the command's own
    listed = {path: sorted(set(re.findall(r"^  (?:-\w, )?(--[a-z][a-z0-9-]*)(?![\w])", body, flags=re.M))
                           - tree[path])
              for path, body in sections.items()}
    assert not {p: f for p, f in listed.items() if f}, f"docs/cli.md lists options that do not exist: {listed}"


def _command_lines(text: str):
    """Every shell line of a page that runs ``adapterhub ...``: lines of fenced blocks (continuations
    joined) and inline code spans, as ``(line number, text)``."""
    lines = text.splitlines()
    fenced, i = False, 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            fenced = not fenced
            i += 1
            continue
        start = i
        if fenced:
            while line.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i].strip()
            yield start + 1, line
        else:
            for span in re.findall(r"`([^`]*\badapterhub\s[^`]*)`", line):
                yield start + 1, span
        i += 1


def _invocations(line: str, tree: dict[str, set[str]]):
    """``(command path, flags)`` for each ``adapterhub CMD [SUB] ...`` in a shell line; the flags run to
    the end of that command (a pipe, ``;``, ``&&`` or a ``#`` comment ends it). Unknown words after
    ``adapterhub`` (prose, ``import adapterhub``) are not commands and are skipped, but a word after a
    group, or after ``adapterhub`` at the start of a shell line, must be a command: ``(that path, None)``
    says it is not."""
    for match in re.finditer(r"(?<![\w./-])adapterhub((?:\s+[a-z][a-z0-9-]*)+)(.*)", line):
        words, rest = match.group(1).split(), match.group(2)
        path = "adapterhub"
        for word in words:
            if f"{path} {word}" not in tree:
                rest = " ".join(words[words.index(word):]) + rest
                break
            path = f"{path} {word}"
        groups = {p.rsplit(" ", 1)[0] for p in tree if " " in p}
        starts_line = not line[:match.start()].strip(" $")  # `adapterhub foo` as a shell line, not prose
        nxt = rest.split()[0] if rest.split() else ""
        if path in groups and re.fullmatch(r"[a-z][a-z0-9-]*", nxt) and (path != "adapterhub" or starts_line):
            yield f"{path} {nxt}", None  # a group takes no arguments: an unknown command
            continue
        if path == "adapterhub":
            continue
        rest = re.split(r"\s(?:\||;|&&|#)\s|\s#", rest)[0]
        rest = re.sub(r"\"[^\"]*\"|'[^']*'", "", rest)  # quoted values (prompts) are not flags
        yield path, set(FLAG.findall(rest))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_command_lines_use_real_options(page, accepted):
    """Each ``adapterhub ...`` example in the page names options its command has."""
    bad = []
    for number, line in _command_lines(page.read_text(encoding="utf-8")):
        for path, flags in _invocations(line, accepted):
            if flags is None:
                bad.append(f"{page.name}:{number}: no such command: {path}")
                continue
            wrong = sorted(flags - accepted[path])
            if wrong:
                bad.append(f"{page.name}:{number}: {path}: {', '.join(wrong)}")
    assert not bad, "options that do not exist:\n" + "\n".join(bad)


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings (lower case, punctuation dropped, spaces to hyphens;
    repeats get -1, -2 ...)."""
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if fenced or not line.startswith("#"):
            continue
        title = line.lstrip("#").strip().lower()
        slug = "".join(c for c in title.replace(" ", "-") if c.isalnum() or c in "-_")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        resolved = (page.parent / file).resolve() if file else page
        if not resolved.exists():
            bad.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            bad.append(f"{target}: no heading #{anchor}")
    assert not bad, f"{page.name}: broken links: {bad}"


def test_readme_is_a_front_door():
    """The README starts with the two commands CI runs, stays short, and links to the reference."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```bash\n(.*?)\n```", text, flags=re.S | re.M)
    assert blocks[0].startswith("python3 -m venv .venv && .venv/bin/pip install -c constraints.txt -e . ")
    assert blocks[1].endswith(".venv/bin/python -m pytest -q -n 2")
    assert blocks[1] in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines(), \
        "CI must run the README's test command as written"
    assert len(text.splitlines()) < 250
    assert "docs/cli.md" in text


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_pages_speak_of_the_product(page):
    """User docs describe the product, not how it was developed (which machine was lent, this task)."""
    text = page.read_text(encoding="utf-8")
    for phrase in ("was lent", "lent to this task", "this task", "a lent GPU", "before the worker"):
        assert phrase not in text, f"{page.name}: development narration: {phrase!r}"


def test_api_page_covers_the_public_api():
    """Every name ``adapterhub`` exports (``adapterhub.__all__``) has its own heading in docs/api.md, and
    the page names nothing as ``adapterhub.X`` that the package does not export."""
    import adapterhub

    text = (DOCS / "api.md").read_text(encoding="utf-8")
    headings = set(re.findall(r"^### `(\w+)", text, flags=re.M))
    assert set(adapterhub.__all__) - {"__version__"} <= headings, \
        f"public names without a section: {sorted(set(adapterhub.__all__) - headings - {'__version__'})}"
    assert headings <= set(adapterhub.__all__), f"sections for names not exported: {sorted(headings - set(adapterhub.__all__))}"


def _description(section: str) -> str:
    """The text of a ``--help`` between the usage line and ``Options:`` (the command's own description)."""
    return section.split("Options:")[0]


def _normal(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("_", "-").lower())


def test_train_help_names_every_trainable_type():
    """``adapterhub train --help`` names every registered type that can train (the description and --type)."""
    from adapterhub.plugins import adapter_types

    section = _sections((DOCS / "cli.md").read_text(encoding="utf-8"))["adapterhub train"]
    trainable = sorted(n for n, t in adapter_types().items() if "train" in t.capabilities)
    description = _normal(_description(section))
    missing = [n for n in trainable if not re.search(rf"\b{re.escape(_normal(n))}\b", description)]
    assert not missing, f"train --help's description omits {missing}"


def test_sample_help_lists_every_schedule_type():
    """``adapterhub sample --help`` lists every schedule type ``--schedule`` accepts (the sampler table's)."""
    from adapterhub.sample.samplers import SCHEDULES

    section = _normal(_sections((DOCS / "cli.md").read_text(encoding="utf-8"))["adapterhub sample"])
    schedule_help = section.split("--schedule", 1)[1].split(" --cfg", 1)[0]
    missing = [label for label, _ in SCHEDULES.values() if _normal(label) not in schedule_help]
    assert not missing, f"sample --schedule's help omits {missing}"


def test_every_option_has_help(gen_cli):
    """Every visible option of every command says what it does in ``--help`` (the reference is generated
    from it, so an option without help is an undocumented option)."""
    import click

    bare = sorted(f"{path} {param.opts[-1]}" for path, command, _ in gen_cli.command_tree()
                  for param in command.params
                  if isinstance(param, click.Option) and not param.hidden and not (param.help or "").strip())
    assert not bare, f"options without a help text: {bare}"


def test_extras_named_in_the_docs_exist():
    """Every ``adapterhub[extra]`` a page tells the user to install is declared in pyproject.toml."""
    import tomllib

    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
                   ["project"]["optional-dependencies"])
    named = {(page.name, extra) for page in PAGES
             for extra in re.findall(r"adapterhub\[([\w,-]+)\]", page.read_text(encoding="utf-8"))}
    unknown = sorted((page, e) for page, extras in named for e in extras.split(",") if e not in declared)
    assert named and not unknown, f"extras that pyproject.toml does not declare: {unknown}"
