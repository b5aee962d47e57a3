"""One place for each formula (#18 item 6).

* The hashes adapter files are known by (sha256 / AutoV2, AutoV1, AutoV3, kohya's ``sshs_*``) are computed
  only in :mod:`adapterhub.hashes`, the safetensors header length is parsed only in :mod:`adapterhub.io`,
  and the LoRA family's tensor products only in ``plugins/lora/math.py``: an AST scan of the code fails on
  a copy anywhere else.
* The module is checked against oracles: the definitions the webui and sd-scripts publish (written out here
  from their documentation, independently of our code), the sha256 Hugging Face lists for the real files
  in ``shared/wild-adapters`` and the ``sshs_model_hash`` sd-scripts wrote into one of them.
"""
from __future__ import annotations

import ast
import csv
import hashlib
import io
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save, save_file

from conftest import WILD_ADAPTERS

ROOT = Path(__file__).resolve().parents[1]
CODE = sorted([*ROOT.joinpath("adapterhub").rglob("*.py"), *ROOT.joinpath("plugins").rglob("*.py")])
HASHES, IO, LORA_MATH = "adapterhub/hashes.py", "adapterhub/io.py", "plugins/lora/math.py"
AUTOV1_CONSTANTS = {0x100000, 0x110000}  # the webui's legacy window: 64 KiB at 1 MiB
FILE_READS = {"open", "read", "read_bytes", "readinto", "seek"}
# copies in code another change is rewriting now (file: what replaces the copy once that lands); keep it exact
PENDING: dict[str, str] = {}
PRODUCTS = {"einsum", "matmul", "mm", "bmm", "addmm", "addmm_", "kron", "tensordot", "outer", "linear"}


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _called(node: ast.Call) -> str:
    f = node.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


def _hashlib_names(tree: ast.AST) -> set[str]:
    """Names bound by ``from hashlib import ...`` in a module."""
    return {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "hashlib"
            for a in n.names}


def _hashlib_call(node: ast.Call, imported: set[str]) -> bool:
    f = node.func
    if isinstance(f, ast.Name):
        return f.id in imported
    return isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "hashlib"


def _functions(tree: ast.AST):
    """Every function, each with the nodes of its own body (nested functions are their own)."""
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            own, todo = [], list(ast.iter_child_nodes(fn))
            while todo:
                node = todo.pop()
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                    own.append(node)
                    todo.extend(ast.iter_child_nodes(node))
            yield fn, own


def formula_copies(path: Path, root: Path = ROOT) -> list[str]:
    """The places in one source file that compute a hash formula or parse a safetensors header length."""
    rel, tree = _rel(path, root), ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        where = f"{rel}:{getattr(node, 'lineno', '?')}"
        if rel != HASHES and isinstance(node, ast.Constant) and type(node.value) is int \
                and node.value in AUTOV1_CONSTANTS:
            found.append(f"{where} the AutoV1 window ({node.value:#x})")
        if rel != IO and isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and node.value.lstrip("<") == "Q" and node.value.startswith("<"):
            found.append(f"{where} a u64 header length ({node.value!r})")
        if rel != IO and isinstance(node, ast.Call) and _called(node) == "from_bytes" \
                and any(isinstance(a, ast.Constant) and a.value == "little" for a in node.args):
            found.append(f"{where} a little-endian header length (int.from_bytes)")
    if rel != HASHES:
        imported = _hashlib_names(tree)
        for fn, own in _functions(tree):
            calls = [n for n in own if isinstance(n, ast.Call)]
            if any(_hashlib_call(c, imported) for c in calls) and any(_called(c) in FILE_READS for c in calls):
                found.append(f"{rel}:{fn.lineno} a file's bytes hashed with hashlib")
    return found


def lora_products(path: Path, root: Path = ROOT) -> list[str]:
    """Tensor products (``@``, einsum, matmul ...) in a LoRA-family file other than its ``math``."""
    rel, tree = _rel(path, root), ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.BinOp, ast.AugAssign)) and isinstance(node.op, ast.MatMult):
            found.append(f"{rel}:{node.lineno} @")
        elif isinstance(node, ast.Call) and _called(node) in PRODUCTS:
            found.append(f"{rel}:{node.lineno} {_called(node)}")
    return found


def test_the_scans_find_each_kind_of_copy(tmp_path):
    """The scans themselves: every kind of copy they exist to find is found (so an empty result means something)."""
    sample = tmp_path / "adapterhub" / "sample.py"
    sample.parent.mkdir()
    sample.write_text('''
import hashlib, struct
def autov1(path):
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
def offset(blob):
    return 8 + struct.unpack("<Q", blob[:8])[0] + int.from_bytes(blob[:8], "little")
def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()
def digest2(path):
    from hashlib import sha256 as h
    with open(path, "rb") as f:
        return h(f.read()).hexdigest()
def key(text):
    return hashlib.sha256(text.encode()).hexdigest()  # an in-memory key, not a file formula
''')
    kinds = sorted(f.split(" ", 1)[1] for f in formula_copies(sample, tmp_path))
    assert kinds == ["a file's bytes hashed with hashlib"] * 3 + [
        "a little-endian header length (int.from_bytes)", "a u64 header length ('<Q')", "the AutoV1 window (0x100000)"]
    lora = tmp_path / "plugins" / "lora" / "x.py"
    lora.parent.mkdir(parents=True)
    lora.write_text("import torch\nd = up @ down\ne = torch.einsum('ij,jk->ik', a, b)\nf = a.mm(b)\n")
    assert [f.split(" ", 1)[1] for f in lora_products(lora, tmp_path)] == ["@", "einsum", "mm"]


def test_each_hash_formula_and_the_header_parse_are_written_once():
    copies = [c for path in CODE for c in formula_copies(path)]
    outside = [c for c in copies if c.split(":")[0] not in PENDING]
    assert outside == [], "use adapterhub.hashes / adapterhub.io instead:\n" + "\n".join(outside)
    stale = sorted(set(PENDING) - {c.split(":")[0] for c in copies})
    assert stale == [], f"no copy left in {stale}: remove them from PENDING"


def test_lora_products_live_in_lora_math():
    copies = [c for path in sorted(ROOT.joinpath("plugins", "lora").glob("*.py")) if _rel(path, ROOT) != LORA_MATH
              for c in lora_products(path)]
    assert copies == [], "call plugins/lora/math.py instead:\n" + "\n".join(copies)


# ------------------------------------------------------------------------------------------------
# the oracles: the published definitions, written out from their documentation
# ------------------------------------------------------------------------------------------------
def webui_sha256(data: bytes) -> str:
    """The webui's ``calculate_sha256``: the whole file (Civitai "SHA256"; AutoV2 is its first 10 digits)."""
    return hashlib.sha256(data).hexdigest()


def webui_model_hash(data: bytes) -> str:
    """The webui's old ``model_hash`` (Civitai AutoV1): seek to 1 MiB, read 64 KiB, 8 digits."""
    f = io.BytesIO(data)
    f.seek(0x100000)
    return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def addnet_hash(data: bytes) -> str:
    """``addnet_hash_safetensors`` (Civitai AutoV3): skip the u64 length and the header it names."""
    (n,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + n:]).hexdigest()


def kohya_precalculated(tensors: dict, metadata: dict) -> tuple[str, str]:
    """sd-scripts ``precalculate_safetensors_hashes``: serialise with the ``ss_*`` metadata only, then the
    addnet hash and the legacy (AutoV1) hash of those bytes."""
    data = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    return addnet_hash(data), webui_model_hash(data)


def _tensors(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"b.weight": torch.randn(n, generator=g), "a.alpha": torch.tensor(4.0),
            "c.half": torch.randn(n // 2, generator=g).half()}


@pytest.fixture
def big(tmp_path) -> Path:
    """A safetensors file past the AutoV1 window, with ss_* and other metadata."""
    path = tmp_path / "big.safetensors"
    save_file(_tensors(300_000), str(path), metadata={"ss_network_dim": "4", "title": "big"})
    assert path.stat().st_size > 0x110000
    return path


@pytest.mark.parametrize("chunk", [4099, 4 << 20])
def test_file_hashes_follow_the_webui_definitions(big, monkeypatch, chunk):
    from adapterhub import hashes

    monkeypatch.setattr(hashes, "CHUNK", chunk)  # 4099: every window crosses a read boundary
    data = big.read_bytes()
    got = hashes.hash_file(big)
    assert (got.sha256, got.autov2, got.autov1, got.autov3) == \
        (webui_sha256(data), webui_sha256(data)[:10], webui_model_hash(data), addnet_hash(data))
    assert hashes.sha256_file(big) == webui_sha256(data)
    assert hashes.autov1(big) == webui_model_hash(data)
    assert hashes.tensor_sha256(big) == addnet_hash(data)


def test_a_folder_hashes_as_one_stream_of_its_files_in_path_order(tmp_path):
    from adapterhub import hashes

    folder = tmp_path / "f"
    (folder / "sub").mkdir(parents=True)
    save_file(_tensors(1000), str(folder / "pytorch_lora_weights.safetensors"))
    (folder / "adapter_config.json").write_text("{}")
    (folder / "sub" / "z.txt").write_text("z")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    stream = b"".join(p.read_bytes() for p in files)
    weights = (folder / "pytorch_lora_weights.safetensors").read_bytes()
    got = hashes.hash_folder(folder, folder / "pytorch_lora_weights.safetensors")
    assert hashes.sha256_file(folder) == got.sha256 == webui_sha256(stream)
    assert got.autov3 == addnet_hash(weights) and got.autov1 == webui_model_hash(weights)


def test_small_files_share_one_autov1_that_identifies_nothing(tmp_path):
    """The webui hashes the (empty) bytes past the end of a file of 1 MiB or less: shown, never an identifier."""
    from adapterhub import hashes

    small, edge = tmp_path / "small.bin", tmp_path / "edge.bin"
    small.write_bytes(b"x" * 1000)
    edge.write_bytes(b"\0" * 0x100000 + b"tail")  # 4 bytes inside the window: a real (if weak) hash
    assert hashes.autov1(small) == webui_model_hash(small.read_bytes()) == hashlib.sha256(b"").hexdigest()[:8]
    assert hashes.autov1(small) == hashes.EMPTY_AUTOV1 and not hashes.autov1_identifies(hashes.EMPTY_AUTOV1)
    assert hashes.autov1(edge) == webui_model_hash(edge.read_bytes()) and hashes.autov1_identifies(hashes.autov1(edge))


def test_a_pickle_or_a_broken_header_has_no_tensor_hash(tmp_path):
    from adapterhub import hashes

    pickle = tmp_path / "x.pt"
    torch.save({"w": torch.ones(3)}, pickle)
    short = tmp_path / "short.safetensors"
    short.write_bytes(struct.pack("<Q", 1 << 30) + b'{"a": 1}')  # the header runs past the end
    assert hashes.tensor_sha256(pickle) is None and hashes.hash_file(pickle).autov3 is None
    assert hashes.tensor_sha256(short) is None and hashes.hash_file(short).sha256 == webui_sha256(short.read_bytes())


@pytest.mark.parametrize("n", [1000, 300_000])  # under and past the legacy window
def test_sshs_hashes_follow_sd_scripts(tmp_path, n):
    from adapterhub import hashes

    tensors = _tensors(n, seed=n)
    metadata = {"ss_network_dim": "8", "ss_output_name": "x", "modelspec.title": "kept out of the hash"}
    want = dict(zip(("sshs_model_hash", "sshs_legacy_hash"), kohya_precalculated(tensors, metadata)))
    assert hashes.kohya_hashes(tensors, metadata) == want
    path = tmp_path / "x.safetensors"  # the streamed way: a written file's tensors under an ss_*-only header
    save_file(tensors, str(path), metadata={**metadata, "title": "more metadata, another header length"})
    assert hashes.kohya_hashes_of_file(path) == want
    assert want["sshs_model_hash"] == hashes.tensor_sha256(path)  # the data section never depends on the header


def test_wild_files_hash_as_hugging_face_and_sd_scripts_say():
    """Real files: whole-file sha256 equals the one Hugging Face lists (MANIFEST), and the sshs_model_hash
    sd-scripts wrote at training time equals our kohya hash of the file's own tensors and metadata."""
    from adapterhub import hashes

    manifest = WILD_ADAPTERS / "MANIFEST.tsv"
    if not manifest.is_file():
        pytest.skip(f"no wild adapters at {WILD_ADAPTERS}")
    rows = list(csv.DictReader(manifest.open(encoding="utf-8"), delimiter="\t"))
    for row in rows[:12]:
        assert hashes.sha256_file(WILD_ADAPTERS / row["file"]) == row["sha256"], row["file"]
    trained = WILD_ADAPTERS / "lycoris_repo_smart_falcon_8_lokr_oldimpl.safetensors"
    from adapterhub.io import read_safetensors_header

    _, metadata, _ = read_safetensors_header(trained)
    assert hashes.kohya_hashes_of_file(trained)["sshs_model_hash"] == metadata["sshs_model_hash"]


def test_a_training_run_names_its_base_checkpoint_by_the_webui_hashes(big):
    """kohya's ``ss_sd_model_hash`` is the base file's AutoV1, ``ss_new_sd_model_hash`` its sha256."""
    from adapterhub.train.metadata import base_facts

    data = big.read_bytes()
    facts = base_facts(str(big), "sd1", v_prediction=False)
    assert (facts["ss_sd_model_hash"], facts["ss_new_sd_model_hash"]) == (webui_model_hash(data), webui_sha256(data))
    assert "ss_sd_model_hash" not in base_facts("tiny-sd1", "tiny-sd1", v_prediction=False)  # a name, not a file


def test_hashing_imports_no_torch(tmp_path):
    """The catalog's workers and ``inspect`` hash files without paying for torch's import."""
    import subprocess
    import sys

    code = "import sys, adapterhub.hashes; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.strip() == "False", out.stderr


def test_rewriting_the_metadata_in_place_keeps_the_tensors_and_their_hash(big):
    from safetensors.torch import load_file

    from adapterhub import hashes
    from adapterhub.io import read_safetensors_header, rewrite_metadata

    before, tensors = hashes.tensor_sha256(big), load_file(str(big))
    rewrite_metadata(big, big, {"title": "renamed", "ss_network_dim": "4"})
    assert read_safetensors_header(big)[1] == {"title": "renamed", "ss_network_dim": "4"}
    assert hashes.tensor_sha256(big) == before
    after = load_file(str(big))
    assert all(torch.equal(after[k], t) for k, t in tensors.items()) and after.keys() == tensors.keys()
    assert [p.name for p in big.parent.iterdir()] == [big.name]  # no temp file left behind
