"""Hostile and mistaken files at the reading edge, met where the user meets them (``adapterhub inspect``):
exactly one line on stderr, ``error: <file>: <what the file is>``, exit code 2, no traceback, bounded work.

* pickles that expand (shared references, "billion laughs"), nest thousands deep or refer to themselves;
* torch zips whose records inflate far beyond the storage they claim (zip bombs);
* safetensors headers with fields of the wrong JSON type (a seeded fuzz over every field);
* files that are neither format (text, random bytes, a Git LFS pointer, an HTML page) and foreign
  layouts (cloneofsimo's lora_diffusion), named as what they are;
* small things: output modes follow the umask, ``atomic_dir`` leaves nothing behind, non-UTF-8 names.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import random
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import adapterhub
from adapterhub.cli import main
from adapterhub.errors import AdapterError
from adapterhub.io import atomic_dir, atomic_path, open_adapter_file, save_safetensors

KOHYA = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def _kohya_tensors() -> dict[str, torch.Tensor]:
    """The smallest file ``inspect`` identifies: one kohya LoRA module of an SD1 UNet (no base needed)."""
    g = torch.Generator().manual_seed(0)
    return {f"{KOHYA}.lora_down.weight": torch.randn(4, 320, generator=g),
            f"{KOHYA}.lora_up.weight": torch.randn(320, 4, generator=g),
            f"{KOHYA}.alpha": torch.tensor(4.0)}


def _cli(capsys, path) -> tuple[int, list[str], str]:
    """``adapterhub inspect --no-hash PATH`` through the console entry point: (rc, stderr lines, stdout)."""
    capsys.readouterr()
    rc = main(["inspect", "--no-hash", os.fsdecode(path)])
    out = capsys.readouterr()
    return rc, out.err.splitlines(), out.out


def _refused(capsys, path, *words) -> str:
    """Assert the one-line refusal of ``path`` and that it says each of ``words``; return the line."""
    rc, err, _ = _cli(capsys, path)
    assert rc == 2, err
    assert len(err) == 1, err
    assert err[0].startswith(f"error: {os.fsdecode(path)}: "), err
    for word in words:
        assert word in err[0], err[0]
    return err[0]


# ---------------------------------------------------------------------------------------------
# pickles that expand, nest or loop
# ---------------------------------------------------------------------------------------------
def _laughs(path: Path, levels: int = 40) -> Path:
    """A ~2 KB torch pickle whose dicts share references ``levels`` deep: 2**levels paths to one tensor."""
    node = {"w": torch.zeros(2)}
    for _ in range(levels):
        node = {"a": node, "b": node}
    torch.save(node, path)
    return path


def _deep(path: Path, levels: int = 5000) -> Path:
    node = {"w": torch.zeros(2)}
    for _ in range(levels):
        node = {"a": node}
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 4 * levels))  # the writer (pickle) recurses; the reader must not
    try:
        torch.save(node, path)
    finally:
        sys.setrecursionlimit(limit)
    return path


def _lying_zip(path: Path, declared: int = 3 << 30) -> Path:
    """A torch zip whose storage record ``data/0`` declares ``declared`` inflated bytes (in both the
    local header and the central directory) while its tensor claims 16 bytes: the shape of a zip bomb,
    built in milliseconds (benchmarks/hostile.py builds a real one)."""
    plain = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, plain)
    src = zipfile.ZipFile(plain)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/data/0"):
                info = zipfile.ZipInfo(info.filename)
                info.compress_type = zipfile.ZIP_DEFLATED
                data = bytes(1 << 16)
            dst.writestr(info, data)
    blob = bytearray(out.getvalue())
    info = next(i for i in zipfile.ZipFile(io.BytesIO(bytes(blob))).infolist() if i.filename.endswith("/data/0"))
    struct.pack_into("<I", blob, info.header_offset + 22, declared)  # local header: uncompressed size
    central = blob.rfind(info.filename.encode()) - 46  # the last copy of the name is the central entry's
    assert blob[central:central + 4] == b"PK\x01\x02"
    struct.pack_into("<I", blob, central + 24, declared)  # central directory: uncompressed size
    path.write_bytes(bytes(blob))
    assert zipfile.ZipFile(path).getinfo(info.filename).file_size == declared
    return path


_CHILD = textwrap.dedent("""
    import os, resource, sys, traceback
    import adapterhub.api, adapterhub.cli, adapterhub.plugins, torch
    adapterhub.plugins.adapter_types()  # plugins imported before the limit: the limit is for the work
    torch.set_num_threads(1)  # a thread pool started later reserves address space per core
    vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + int(sys.argv[1]) * 2**20,) * 2)
    soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
    used = int(resource.getrusage(resource.RUSAGE_SELF).ru_utime)
    resource.setrlimit(resource.RLIMIT_CPU, (used + int(sys.argv[2]), hard))
    for path in sys.argv[3:]:
        print("=== " + path, file=sys.stderr, flush=True)
        try:
            rc = adapterhub.cli.main(["inspect", "--no-hash", path])
        except BaseException:
            traceback.print_exc()
            rc = "traceback"
        print(f"=== rc {rc}", file=sys.stderr, flush=True)
""")


def _inspect_limited(paths, extra_mb=500, cpu_s=30) -> dict[str, tuple[str, list[str]]]:
    """Run ``inspect`` on each path in one child process whose address space may grow only ``extra_mb``
    past what the imports took, and whose CPU time is capped (so a regression fails, not hangs)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}  # address space per thread
    done = subprocess.run([sys.executable, "-c", _CHILD, str(extra_mb), str(cpu_s), *map(str, paths)],
                          capture_output=True, text=True, timeout=300, env=env)
    results, current, lines = {}, None, []
    for line in done.stderr.splitlines():
        if line.startswith("=== rc "):
            results[current] = (line.removeprefix("=== rc "), lines)
        elif line.startswith("=== "):
            current, lines = line.removeprefix("=== "), []
        elif current is not None:
            lines.append(line)
    assert set(results) == {str(p) for p in paths}, done.stderr[-3000:]
    return results


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS and /proc are Linux")
def test_expanding_nested_and_bombed_pickles_are_refused_within_500_mb(tmp_path):
    laughs = _laughs(tmp_path / "laughs.pt")
    deep = _deep(tmp_path / "deep.pt")
    bomb = _lying_zip(tmp_path / "bomb.pt")
    protocol4 = tmp_path / "protocol4.pt"  # torch warns about the protocol before refusing it
    protocol4.write_bytes(pickle.dumps({"a": [1, 2]}, protocol=4))
    assert laughs.stat().st_size < 4096 and bomb.stat().st_size < 4096
    results = _inspect_limited([laughs, deep, bomb, protocol4])
    words = {laughs: ("shared",), deep: ("deep",), bomb: ("data/0", "3221225472", "16")}
    for path, (rc, err) in results.items():
        assert rc == "2", (path, err)
        assert len(err) == 1 and err[0].startswith(f"error: {path}: "), err
        for word in words.get(Path(path), ()):
            assert word in err[0], err[0]


def test_a_small_shared_structure_is_read_with_every_path(tmp_path):
    shared = {"up": torch.ones(2, 1), "down": torch.ones(1, 2)}
    path = tmp_path / "shared.pt"
    torch.save({"first": shared, "second": shared, "step": 7}, path)
    file = open_adapter_file(path)
    assert sorted(file.keys) == ["first.down", "first.up", "second.down", "second.up"]
    assert file.extra == {"step": 7}


def test_the_caps_are_where_they_say(tmp_path, monkeypatch, capsys):
    """Nesting up to the depth cap reads; past the entry cap, a pickle that holds that much reads (a long
    training history) while one that shares its way there is refused."""
    path = _deep(tmp_path / "ninety.pt", levels=90)
    assert len(open_adapter_file(path).keys) == 1
    monkeypatch.setattr("adapterhub.pickle_bounds.MAX_PICKLE_ENTRIES", 100)
    flat = tmp_path / "flat.pt"
    torch.save({"w": torch.zeros(2), "history": [{"step": i, "loss": 0.5} for i in range(50)]}, flat)
    assert len(open_adapter_file(flat).extra) == 100
    _refused(capsys, _laughs(tmp_path / "small_laughs.pt", levels=7), "over 100 entries", "billion laughs")


def test_a_pickle_that_contains_itself_is_refused(tmp_path, capsys):
    loop = {"w": torch.zeros(2)}
    loop["self"] = loop
    path = tmp_path / "loop.pt"
    torch.save(loop, path)
    _refused(capsys, path, "itself")


def test_deep_pickle_in_process(tmp_path):
    path = _deep(tmp_path / "deep.pt")
    with pytest.raises(AdapterError) as err:
        adapterhub.load(path)
    assert "\n" not in str(err.value) and "deep" in str(err.value)


def test_bomb_refused_in_process_before_inflating(tmp_path):
    path = _lying_zip(tmp_path / "bomb.pt", declared=4_000_000_000)
    with pytest.raises(AdapterError) as err:
        open_adapter_file(path)
    assert "data/0" in str(err.value) and "inflate" in str(err.value)


def _rezipped(src: Path, dst: Path) -> Path:
    """``src`` (a torch zip) with every record deflated, as a user's zip tool would write it."""
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as new:
        for info in old.infolist():
            new.writestr(info.filename, old.read(info))
    return dst


def test_compressed_records_are_read_within_the_total_cap(tmp_path, monkeypatch, capsys):
    plain = tmp_path / "plain.pt"
    torch.save(_kohya_tensors(), plain)
    packed = _rezipped(plain, tmp_path / "packed.pt")
    assert torch.equal(open_adapter_file(packed).tensor(f"{KOHYA}.lora_up.weight"),
                       _kohya_tensors()[f"{KOHYA}.lora_up.weight"])
    monkeypatch.setattr("adapterhub.pickle_bounds.MAX_INFLATED_BYTES", 1024)
    _refused(capsys, packed, "inflate to", "1024-byte cap")


def test_a_zip_header_over_garbage_is_a_broken_zip(tmp_path, capsys):
    """torch.load opens anything starting ``PK\\x03\\x04`` as a zip: the checks must see it too."""
    path = tmp_path / "broken.pt"
    path.write_bytes(b"PK\x03\x04" + random.Random(3).randbytes(200))
    _refused(capsys, path, "a broken zip")


def test_a_real_torch_file_still_loads(tmp_path):
    path = tmp_path / "lora.pt"
    torch.save(_kohya_tensors(), path)
    file = open_adapter_file(path)
    assert sorted(file.keys) == sorted(_kohya_tensors())
    assert torch.equal(file.tensor(f"{KOHYA}.lora_up.weight"), _kohya_tensors()[f"{KOHYA}.lora_up.weight"])


# ---------------------------------------------------------------------------------------------
# safetensors headers of the wrong shape
# ---------------------------------------------------------------------------------------------
def _safetensors_with_header(path: Path, header, data: bytes = bytes(64)) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


GOOD_ENTRY = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}


@pytest.mark.parametrize("field, value", [
    ("shape", None), ("shape", 4), ("shape", ["2", "2"]), ("shape", [2.0, 2.0]), ("shape", [-2, -2]),
    ("shape", [True, 4]), ("data_offsets", "0,16"), ("data_offsets", "ab"), ("data_offsets", [16, 0]),
    ("data_offsets", [-16, 0]), ("data_offsets", [0.0, 16.0]), ("dtype", ["F32"]), ("dtype", None),
])
def test_header_fields_of_the_wrong_type(field, value, tmp_path, capsys):
    path = _safetensors_with_header(tmp_path / "bad.safetensors", {"t": {**GOOD_ENTRY, field: value}})
    _refused(capsys, path, "t")


def _random_value(rng: random.Random, depth: int = 0):
    kind = rng.choice("nbifsld" if depth < 2 else "nbifs")
    if kind == "n":
        return None
    if kind == "b":
        return rng.random() < 0.5
    if kind == "i":
        return rng.choice([0, 1, 2, 4, 16, -1, 2 ** 31, 2 ** 64, -(2 ** 70)])
    if kind == "f":
        return rng.choice([0.5, 2.0, -1.0, 1e300])
    if kind == "s":
        return rng.choice(["", "F32", "F16", "BF16", "I64", "U8", "XYZ", "0", "[0,16]"])
    if kind == "l":
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(["dtype", "shape", "data_offsets", "x"]): _random_value(rng, depth + 1)}


def _random_header(rng: random.Random) -> dict:
    """1-3 entries laid out back to back (16 bytes each); in three cases of four, some fields of some
    entries get a random JSON value or go missing, and sometimes ``__metadata__`` is random."""
    entries = {}
    for i in range(rng.randint(1, 3)):
        entry = dict(GOOD_ENTRY, data_offsets=[16 * i, 16 * i + 16])
        if rng.random() < 0.75:
            for name in rng.sample(["dtype", "shape", "data_offsets"], rng.randint(1, 3)):
                if rng.random() < 0.2:
                    entry.pop(name)
                else:
                    entry[name] = _random_value(rng)
        name = f"t{i}" if i else f"{KOHYA}.{rng.choice(['lora_down.weight', 'lora_up.weight', 'alpha'])}"
        entries[name] = entry if rng.random() < 0.9 else _random_value(rng)
    if rng.random() < 0.3:
        entries["__metadata__"] = _random_value(rng)
    return entries


def _safetensors_reads(path: Path) -> dict | None:
    """The oracle: the safetensors library's own reading of the file (every tensor), or ``None``."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_tensor(k).shape) for k in f.keys()}
    except Exception:  # noqa: BLE001 - any refusal by the oracle
        return None


def test_fuzzed_safetensors_headers_give_one_line_or_a_read(tmp_path, capsys):
    """A few hundred seeded headers with random types and values in every field: each is read, or
    refused in one line with exit 2, never a traceback; and what the safetensors library reads, we read
    with the same keys and shapes (the oracle)."""
    rng = random.Random(1234)
    path = tmp_path / "fuzz.safetensors"
    outcomes = {"refused": 0, "oracle_reads": 0}
    for case in range(300):
        header = _random_header(rng)
        tensors = sum(1 for k in header if k != "__metadata__")
        _safetensors_with_header(path, header, bytes(16 * tensors))
        try:
            rc, err, _ = _cli(capsys, path)
        except Exception as exc:  # noqa: BLE001 - the point: nothing escapes as a traceback
            pytest.fail(f"case {case}: {exc.__class__.__name__}: {exc}\nheader: {json.dumps(header)}")
        if rc != 0:
            assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: {path}: "), (case, header, err)
            outcomes["refused"] += 1
        oracle = _safetensors_reads(path)
        if oracle is not None:
            outcomes["oracle_reads"] += 1
            ours = open_adapter_file(path)
            assert {k: info.shape for k, info in ours.keys.items()} == oracle, (case, header)
    assert outcomes["refused"] > 150 and outcomes["oracle_reads"] > 15, outcomes


def test_a_nested_json_header_is_refused(tmp_path, capsys):
    path = tmp_path / "nested.safetensors"
    raw = b"[" * 100_000 + b"]" * 100_000
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    _refused(capsys, path, "safetensors header")


def test_header_length_ending_in_0x80_is_a_corrupt_safetensors_not_a_pickle(tmp_path, capsys):
    raw = b"\x80\x02 not json at all" + b" " * (0x280 - 18)
    assert len(raw) == 0x280
    path = tmp_path / "lora.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(32))
    line = _refused(capsys, path, "safetensors header")
    assert "pickle" not in line


# ---------------------------------------------------------------------------------------------
# files that are neither format, and foreign layouts
# ---------------------------------------------------------------------------------------------
def test_text_named_safetensors_says_it_is_text(tmp_path, capsys):
    path = tmp_path / "lora.safetensors"
    path.write_text("hello world, this is not a model\n")
    line = _refused(capsys, path, "not a safetensors file", "starts with text 'hello world")
    assert "cap" not in line


def test_html_page_saved_as_weights(tmp_path, capsys):
    path = tmp_path / "lora.safetensors"
    path.write_text("<!DOCTYPE html>\n<html><head><title>Sign in</title></head></html>\n")
    _refused(capsys, path, "HTML page")


def test_random_bytes_named_pt_are_not_a_pickle(tmp_path, capsys):
    path = tmp_path / "lora.pt"
    path.write_bytes(random.Random(7).randbytes(100))
    line = _refused(capsys, path, "not a torch pickle")
    assert "needs code" not in line


@pytest.mark.parametrize("module, name", [("os", "system"), ("torch.nn.modules.linear", "Linear")])
def test_a_pickle_that_imports_code_is_refused_without_allow_list_advice(module, name, tmp_path, capsys):
    """torch words the second (a module it does not block) as advice to allow-list the global."""
    path = tmp_path / "evil.pt"
    path.write_bytes(b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"q\x00)Rq\x01.")
    line = _refused(capsys, path, f"{module}.{name}", "needs code")
    for advice in ("add_safe_globals", "safe_globals", "weights_only=False", "allow"):
        assert advice not in line


def test_git_lfs_pointer(tmp_path, capsys):
    path = tmp_path / "style.safetensors"
    path.write_text("version https://git-lfs.github.com/spec/v1\n"
                    "oid sha256:4d7a214614ab2935c943f9e0ff69f22eadbb8f32b1258daaa5e2ca24d17e2393\n"
                    "size 151108831\n")
    line = _refused(capsys, path, "a Git LFS pointer, not the weights: fetch the file with git lfs")
    assert "2336927755350992246" not in line


def test_cloneofsimo_safetensors_is_named(tmp_path, capsys):
    """lora_diffusion's ``save_safeloras_with_embeds`` layout: ``<model>:<i>:up|down`` keys, the targets
    as JSON metadata under the model name, ``<model>:<i>:rank``, and tokens flagged ``<embed>``."""
    g = torch.Generator().manual_seed(0)
    tensors = {"unet:0:up": torch.randn(320, 4, generator=g), "unet:0:down": torch.randn(4, 320, generator=g),
               "<s1>": torch.randn(768, generator=g)}
    metadata = {"unet": json.dumps(["CrossAttention", "Attention", "GEGLU"]), "unet:0:rank": "4", "<s1>": "<embed>"}
    path = tmp_path / "pti.safetensors"
    save_file(tensors, str(path), metadata)
    _refused(capsys, path, "cloneofsimo lora_diffusion")


def test_cloneofsimo_pt_list_is_named(tmp_path, capsys):
    """lora_diffusion's ``save_lora_weight``: a bare list [up, down, up, down, ...] with no names."""
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "lora.pt"
    torch.save([torch.randn(320, 4, generator=g), torch.randn(4, 320, generator=g)] * 2, path)
    _refused(capsys, path, "cloneofsimo lora_diffusion")


def test_unreadable_file(tmp_path, capsys, monkeypatch):
    path = tmp_path / "locked.safetensors"
    save_file(_kohya_tensors(), str(path))
    real_open = open

    def denied(file, *args, **kwargs):
        if os.fspath(file) == str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", denied)
    _refused(capsys, path, "Permission denied")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_for_real(tmp_path, capsys):
    path = tmp_path / "locked.safetensors"
    save_file(_kohya_tensors(), str(path))
    path.chmod(0)
    _refused(capsys, path, "Permission denied")


# ---------------------------------------------------------------------------------------------
# small things: modes, leftovers, names
# ---------------------------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_saved_files_get_the_umask_mode(tmp_path):
    saved = save_safetensors(_kohya_tensors(), tmp_path / "a.safetensors")
    assert saved.stat().st_mode & 0o777 == 0o666 & ~_umask()
    with atomic_path(tmp_path / "b.txt") as tmp:
        tmp.write_text("x")
    assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o666 & ~_umask()


def test_atomic_dir_replacing_a_file_leaves_nothing_behind(tmp_path):
    target = tmp_path / "out"
    target.write_text("an older single-file output")
    with atomic_dir(target) as tmp:
        (tmp / "weights.safetensors").write_text("x")
    assert target.is_dir() and (target / "weights.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with atomic_dir(target) as tmp:  # and a folder over a folder
        (tmp / "other").write_text("y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in target.iterdir()] == ["other"]


@pytest.mark.skipif(sys.platform != "linux", reason="file names are bytes on Linux only")
def test_a_valid_adapter_with_a_non_utf8_name(tmp_path, capsys):
    path = Path(os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9.safetensors"))
    save_file(_kohya_tensors(), str(tmp_path / "plain.safetensors"))  # safetensors writes UTF-8 names only
    os.rename(tmp_path / "plain.safetensors", path)
    rc, err, out = _cli(capsys, path)
    assert rc == 0, err
    assert "lora" in out
    assert adapterhub.load(path).type == "lora"
    assert main(["inspect", "--json", "--no-hash", os.fsdecode(path)]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["type"] == "lora" and facts["path"].endswith("caf\ufffd.safetensors")


def test_catalog_scan_records_hostile_files_with_one_line_reasons(tmp_path):
    from adapterhub import catalog as cat_api
    from adapterhub.catalog import open_catalog

    lib = tmp_path / "lib"
    lib.mkdir()
    _laughs(lib / "laughs.pt")
    _deep(lib / "deep.pt")
    _lying_zip(lib / "bomb.pt")
    (lib / "lfs.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 9\n")
    with open_catalog(str(tmp_path / "db" / "catalog.db"), create=True) as cat:
        report = cat_api.scan(cat, [str(lib)], jobs=1)
    reasons = {Path(u["path"]).name: u["error"] for u in report.unreadable}
    assert sorted(reasons) == ["bomb.pt", "deep.pt", "laughs.pt", "lfs.safetensors"], reasons
    assert all("\n" not in r for r in reasons.values()), reasons
    assert "billion laughs" in reasons["laughs.pt"] and "deep" in reasons["deep.pt"]
    assert "data/0" in reasons["bomb.pt"] and "Git LFS pointer" in reasons["lfs.safetensors"]
