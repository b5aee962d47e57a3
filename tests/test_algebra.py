"""LoRA algebra (``adapterhub.algebra``, ``adapterhub lora``) against exact math.

* concat is the exact weighted sum: merged into a base it equals merging the sources;
* svd's error is the optimal rank-R error (Eckart-Young) of the exact summed delta;
* resize's dynamic rules pick the ranks kohya's formulas give (worked out by hand below);
* extract recovers a planted low-rank difference and merges back onto the tuned model;
* TIES / DARE equal an element-by-element reference (and PEFT's merge_utils) and are seeded;
* outputs carry their provenance and kohya's hashes; bad input writes nothing;
* the CLI end to end.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adapterhub import algebra
from adapterhub.algebra import linalg
from adapterhub.api import load
from adapterhub.errors import AdapterhubError
from adapterhub.io import save_safetensors
from adapterhub.keymaps import kohya_name
from adapterhub.plugins import adapter_type
from adapterhub.weights import bind, merge

CLI = [sys.executable, "-m", "adapterhub", "lora"]
Q_PROJ = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"  # (64, 64) in tiny-sd1
TO_Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"  # (32, 32)
CONV = "unet.down_blocks.1.resnets.0.conv1"  # (64, 32, 3, 3)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_sd1):
    """Example adapters for tiny-sd1: LoRA rank 4 and 2, LoCon rank 3 (3x3 convs), LoHa rank 2."""
    folder = tmp_path_factory.mktemp("algebra")
    return {name: adapter_type(kind).example(tiny_sd1, folder / f"{name}.safetensors", seed=seed, rank=rank)
            for name, kind, seed, rank in (("A", "lora", 1, 4), ("B", "lora", 2, 2), ("C", "locon", 3, 3),
                                           ("H", "loha", 4, 2))}


def exact_deltas(model, entries) -> dict[str, torch.Tensor]:
    """sum_i w_i * delta_i per target, float64, from each patch's own delta on the model's shapes."""
    out: dict[str, torch.Tensor] = {}
    for adapter, weight in entries:
        for b in bind(model, adapter):
            d = b.patch.delta(torch.empty(b.param.shape)).double() * weight
            out[b.patch.target] = out.get(b.patch.target, 0) + d
    return out


def output_deltas(model, adapter) -> dict[str, torch.Tensor]:
    return {b.patch.target: b.patch.delta(torch.empty(b.param.shape)).double() for b in bind(model, adapter)}


def state(model) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v for c in ("unet", "text_encoder") for k, v in getattr(model, c).state_dict().items()}


# ---------------------------------------------------------------------------------------------
# combine
# ---------------------------------------------------------------------------------------------
def test_concat_merged_equals_merging_the_sources(files, tiny_sd1, fresh_sd1, tmp_path):
    a, b = load(files["A"]), load(files["B"])
    result = algebra.combine_files([(files["A"], 0.7), (files["B"], -0.3)], tmp_path / "cat.safetensors")
    combined = load(tmp_path / "cat.safetensors")
    assert combined.type == "lora" and result.modules[0].old_rank == "4+2"
    assert {p.rank for p in combined.patches.values()} == {6}
    assert combined.metadata["ss_network_dim"] == combined.metadata["ss_network_alpha"].removesuffix(".0") == "6"

    other = copy.deepcopy(tiny_sd1)
    merge(fresh_sd1, [(combined, 1.0)])
    merge(other, [(a, 0.7), (b, -0.3)])
    ours, theirs, original = state(fresh_sd1), state(other), state(tiny_sd1)
    for key, value in ours.items():
        torch.testing.assert_close(value, theirs[key], atol=1e-5, rtol=0)
    assert sum(not torch.equal(v, original[k]) for k, v in ours.items()) >= len(combined.patches)


def test_concat_is_exact_for_locon_and_tucker_cores(files, tiny_sd1, tmp_path):
    """LoCon 3x3 factors keep their kernel; a CP/Tucker ``lora_mid`` core is folded into ``down``."""
    gen = torch.Generator().manual_seed(9)
    name = kohya_name(CONV)
    tucker = save_safetensors({f"{name}.lora_down.weight": torch.randn(2, 32, 1, 1, generator=gen),
                               f"{name}.lora_mid.weight": torch.randn(2, 2, 3, 3, generator=gen),
                               f"{name}.lora_up.weight": torch.randn(64, 2, 1, 1, generator=gen),
                               f"{name}.alpha": torch.tensor(1.0)}, tmp_path / "cp.safetensors")
    entries = [(load(files["C"]), 0.5), (load(tucker), -1.5), (load(files["A"]), 0.25)]
    result = algebra.combine(entries, method="concat")
    assert result.adapter.type == "locon"
    up, down = (result.adapter.patches[CONV].tensors[k] for k in ("up", "down"))
    assert tuple(down.shape) == (5, 32, 3, 3) and tuple(up.shape) == (64, 5, 1, 1)
    expected, ours = exact_deltas(tiny_sd1, entries), output_deltas(tiny_sd1, result.adapter)
    assert set(ours) == set(expected)
    for target, delta in expected.items():
        torch.testing.assert_close(ours[target], delta, atol=1e-5, rtol=0)


@pytest.mark.parametrize("names", [("A", "B"), ("A", "B", "H")])
def test_svd_error_is_the_optimal_rank_r_error(files, tiny_sd1, tmp_path, names):
    """Eckart-Young: ||exact - out||_F == sqrt(sum of the discarded S^2) of the exact summed delta, for
    LoRAs (factored fast path) and with a LoHa (its delta rebuilt, combined, re-extracted)."""
    entries = [(load(files[n]), w) for n, w in zip(names, (0.7, -0.3, 0.5))]
    result = algebra.combine(entries, method="svd", rank=3)
    result.save(tmp_path / "svd.safetensors")
    written = load(tmp_path / "svd.safetensors")
    reports = {m.module: m for m in result.modules}
    expected, ours = exact_deltas(tiny_sd1, entries), output_deltas(tiny_sd1, written)
    assert set(ours) == set(expected) and len(ours) > 100
    assert written.type == ("locon" if "H" in names else "lora")
    for target, exact in expected.items():
        flat = exact.reshape(exact.shape[0], -1)
        s = torch.linalg.svdvals(flat)
        optimal = float(s[3:].pow(2).sum().sqrt())
        error = float(torch.linalg.matrix_norm(flat - ours[target].reshape(flat.shape)))
        assert abs(error - optimal) <= 1e-4, target
        assert abs(reports[target].error - optimal) <= 1e-4
        assert written.patches[target].rank == 3 and written.patches[target].scale == 1.0


def test_ties_and_dare_equal_a_reference_and_peft():
    gen = torch.Generator().manual_seed(0)
    tasks = [torch.randn(6, 5, generator=gen) for _ in range(3)]
    weights, density = [0.7, -0.3, 0.5], 0.4

    def elementwise(pruned, mask_sign=True, method="total"):
        out = torch.zeros(6, 5)
        for i in range(6):
            for j in range(5):
                vals = [float(p[i, j]) for p in pruned]
                if not mask_sign:
                    out[i, j] = sum(w * v for w, v in zip(weights, vals))
                    continue
                votes = sum(vals) if method == "total" else sum((v > 0) - (v < 0) for v in vals)
                elected = 1 if votes >= 0 else -1
                agree = [w * v for w, v in zip(weights, vals) if (v > 0) - (v < 0) == elected]
                out[i, j] = sum(agree) / max(1, len(agree))
        return out

    def top(t):
        keep = t.abs().flatten().argsort(descending=True)[: int(density * t.numel())]
        mask = torch.zeros(t.numel())
        mask[keep] = 1
        return t * mask.view_as(t)

    def dropped(seed):
        g = torch.Generator().manual_seed(seed)  # the documented convention: one CPU mask per task, in order
        return [t * torch.bernoulli(torch.full(t.shape, density), generator=g) / density for t in tasks]

    torch.testing.assert_close(linalg.ties(tasks, weights, density), elementwise([top(t) for t in tasks]))
    torch.testing.assert_close(linalg.ties(tasks, weights, density, "frequency"),
                               elementwise([top(t) for t in tasks], method="frequency"))
    torch.testing.assert_close(linalg.magnitude_prune(tasks, weights, density),
                               elementwise([top(t) for t in tasks], mask_sign=False))
    seeded = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    torch.testing.assert_close(linalg.dare_linear(tasks, weights, density, seeded(5)),
                               elementwise(dropped(5), mask_sign=False))
    torch.testing.assert_close(linalg.dare_ties(tasks, weights, density, seeded(5)), elementwise(dropped(5)))
    assert torch.equal(linalg.dare_ties(tasks, weights, density, seeded(5)),
                       linalg.dare_ties(tasks, weights, density, seeded(5)))
    assert not torch.equal(linalg.dare_linear(tasks, weights, density, seeded(5)),
                           linalg.dare_linear(tasks, weights, density, seeded(6)))

    merge_utils = pytest.importorskip("peft.utils.merge_utils")
    w = torch.tensor(weights)
    assert torch.equal(linalg.ties(tasks, weights, density), merge_utils.ties(tasks, w, density))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        theirs = merge_utils.dare_ties(tasks, w, density)
    assert torch.equal(linalg.dare_ties(tasks, weights, density, seeded(5)), theirs)


@pytest.mark.parametrize("method", ["ties", "dare", "dare_ties", "magnitude_prune"])
def test_task_merges_are_deterministic_and_match_the_math(files, tiny_sd1, method):
    entries = [(load(files["A"]), 0.7), (load(files["B"]), -0.3)]
    first = algebra.combine(entries, method=method, density=0.5, seed=3, rank=64)
    again = algebra.combine(entries, method=method, density=0.5, seed=3, rank=64)
    for target, patch in first.adapter.patches.items():
        assert torch.equal(patch.tensors["down"], again.adapter.patches[target].tensors["down"])
    # at full rank the SVD loses nothing: the output is the method's merged delta itself
    a, b = (output_deltas(tiny_sd1, e[0]) for e in entries)
    ours = output_deltas(tiny_sd1, first.adapter)
    target = TO_Q
    tasks = [a[target].float(), b[target].float()]
    gen = torch.Generator().manual_seed(algebra.ops.module_seed(3, target))
    reference = {"ties": lambda: linalg.ties(tasks, [0.7, -0.3], 0.5),
                 "magnitude_prune": lambda: linalg.magnitude_prune(tasks, [0.7, -0.3], 0.5),
                 "dare": lambda: linalg.dare_linear(tasks, [0.7, -0.3], 0.5, gen),
                 "dare_ties": lambda: linalg.dare_ties(tasks, [0.7, -0.3], 0.5, gen)}[method]()
    torch.testing.assert_close(ours[target].float(), reference, atol=1e-5, rtol=0)
    if method.startswith("dare"):
        other = algebra.combine(entries, method=method, density=0.5, seed=4, rank=64)
        assert not torch.equal(other.adapter.patches[target].tensors["up"],
                               first.adapter.patches[target].tensors["up"])


# ---------------------------------------------------------------------------------------------
# resize
# ---------------------------------------------------------------------------------------------
SINGULAR = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25])


@pytest.fixture(scope="module")
def planted_lora(tmp_path_factory):
    """A LoRA whose q_proj delta has singular values 8, 4, 2, 1, .5, .25 (rank 6, alpha 3: scale .5)
    and whose to_q delta is zero."""
    gen = torch.Generator().manual_seed(11)
    u, _ = torch.linalg.qr(torch.randn(64, 6, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(64, 6, generator=gen))
    factors = {Q_PROJ: (u * SINGULAR * 2, v.T.contiguous(), 3.0),  # x2: the scale .5 brings it back
               TO_Q: (torch.zeros(32, 2), torch.randn(2, 32, generator=gen), 2.0)}
    adapter = adapter_type("lora").from_factors(factors, {"ss_training_comment": "trained", "ss_network_dim": "6"},
                                                base="tiny-sd1")
    return adapter.save(tmp_path_factory.mktemp("planted") / "planted.safetensors", "kohya")


# S = 8 4 2 1 .5 .25 (and 58 zeros); kohya: rank = clamp(index, 1, len(S) - 1) + 1
#   sv_ratio:3        count(S > 8/3) = 2                                   -> 3
#   sv_ratio:10       count(S > 0.8) = 4                                   -> 5
#   sv_fro:0.9        cumsum(S^2)/sum = .750 .938 ...; searchsorted(.81) = 1, +1 = 2 -> 3
#   sv_cumulative:0.8 cumsum(S)/sum = .508 .762 .889 ...; searchsorted(.8) = 2, +1 = 3 -> 4
#   sv_cumulative:0.99 searchsorted = 5, +1 = 6 -> 7, capped at the LoRA's own rank 6 (and at --rank 5 -> 5)
@pytest.mark.parametrize("dynamic, cap, expected", [
    ("sv_ratio:3", None, 3), ("sv_ratio:10", None, 5), ("sv_fro:0.9", None, 3), ("sv_cumulative:0.8", None, 4),
    ("sv_cumulative:0.99", None, 6), ("sv_cumulative:0.99", 5, 5), (None, 2, 2)])
def test_resize_picks_the_ranks_kohyas_formulas_give(planted_lora, dynamic, cap, expected):
    result = algebra.resize(load(planted_lora), rank=cap, dynamic=algebra.parse_dynamic(dynamic))
    report = {m.module: m for m in result.modules}
    q = report[Q_PROJ]
    assert (q.old_rank, q.new_rank) == ("6", expected)
    kept = SINGULAR[:expected].double().pow(2).sum() / SINGULAR.double().pow(2).sum()
    assert q.fro_retained == pytest.approx(float(kept.sqrt()), abs=1e-6)
    assert q.error == pytest.approx(float(SINGULAR[expected:].double().pow(2).sum().sqrt()), abs=1e-5)
    assert report[TO_Q].new_rank == 1  # a zero matrix keeps rank 1 (kohya MIN_SV)
    patch = result.adapter.patches[Q_PROJ]
    assert patch.rank == expected and patch.alpha == pytest.approx(0.5 * expected)  # scale kept
    meta = result.metadata
    if dynamic:
        assert meta["ss_network_dim"] == meta["ss_network_alpha"] == "Dynamic"
        assert meta["ss_training_comment"] == f"Dynamic resize with {dynamic.replace(':', ': ')} from 6; trained"
    else:
        assert meta["ss_training_comment"] == "dimension is resized from 6 to 2; trained"


@pytest.mark.parametrize("out, r, inner, rank", [(40, 6, 30, 3), (40, 6, 30, 8), (12, 20, 9, 5), (50, 4, 70, None)])
def test_factorising_a_product_equals_factorising_the_matrix(out, r, inner, rank):
    """The fast path (QR of the factors, SVD of the core) gives the full SVD's answer, rank padding too."""
    gen = torch.Generator().manual_seed(out + r)
    up, down = torch.randn(out, r, generator=gen), torch.randn(r, inner, generator=gen)
    fast, full = linalg.factorise_product(up, down, rank), linalg.factorise(up @ down, rank)
    assert fast.rank == full.rank == min(rank or 10 ** 9, out, inner)
    torch.testing.assert_close(fast.singular, full.singular, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(fast.up @ fast.down, full.up @ full.down, atol=1e-4, rtol=1e-5)
    assert fast.error == pytest.approx(full.error, abs=1e-4)
    for dynamic in (("sv_fro", 0.9), ("sv_ratio", 4.0), ("sv_cumulative", 0.7)):
        assert linalg.factorise_product(up, down, rank, dynamic=dynamic).rank == \
            linalg.factorise(up @ down, rank, dynamic=dynamic).rank


def test_resize_of_a_loha_is_the_optimal_lora_of_its_delta(files, tiny_sd1):
    loha = load(files["H"])
    result = algebra.resize(loha, rank=2)
    assert result.adapter.type == "locon"  # its 3x3 convs come back as LoCon modules, kernels from the base
    ours, exact = output_deltas(tiny_sd1, result.adapter), exact_deltas(tiny_sd1, [(loha, 1.0)])
    for target, delta in exact.items():
        flat = delta.reshape(delta.shape[0], -1)
        optimal = float(torch.linalg.svdvals(flat)[2:].pow(2).sum().sqrt())
        error = float(torch.linalg.matrix_norm(flat - ours[target].reshape(flat.shape)))
        assert error == pytest.approx(optimal, abs=1e-4), target


def test_clamping_is_kohyas_and_reported(files):
    entries = [(load(files["A"]), 0.7), (load(files["B"]), -0.3)]
    plain = algebra.combine(entries, method="svd", rank=2)
    clamped = algebra.combine(entries, method="svd", rank=2, clamp_quantile=0.9)
    patch = clamped.adapter.patches[TO_Q]
    values = torch.cat([plain.adapter.patches[TO_Q].tensors[k].flatten() for k in ("up", "down")])
    high = float(torch.quantile(values, 0.9))
    assert max(float(patch.tensors[k].abs().max()) for k in ("up", "down")) <= high + 1e-6
    errors = {m.module: m.error for m in clamped.modules}, {m.module: m.error for m in plain.modules}
    assert errors[0][TO_Q] > errors[1][TO_Q]  # no longer the optimum, and the report says so
    assert json.loads(clamped.metadata["adapterhub.params"])["clamp_quantile"] == 0.9


def test_dynamic_rank_rules_directly():
    s = torch.cat([SINGULAR, torch.zeros(10)])
    assert linalg.dynamic_rank(s, "sv_fro", 0.9, cap=100) == 3
    assert linalg.dynamic_rank(torch.zeros(5), "sv_ratio", 2, cap=4) == 1
    assert linalg.dynamic_rank(torch.tensor([1.0, 1.0]), "sv_ratio", 2, cap=8) == 2  # [1, len-1] then + 1


# ---------------------------------------------------------------------------------------------
# extract
# ---------------------------------------------------------------------------------------------
def plant(model, rank: int = 2, seed: int = 5, text: bool = True) -> dict[str, torch.Tensor]:
    """Add a rank-``rank`` difference to a few modules of ``model`` (a conv 3x3 among them)."""
    gen = torch.Generator().manual_seed(seed)
    targets = [TO_Q, "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.2", CONV] + ([Q_PROJ] if text else [])
    planted = {}
    modules = adapter_type("locon").target_modules(model)
    with torch.no_grad():
        for target in targets:
            w = modules[target].weight
            delta = (torch.randn(w.shape[0], rank, generator=gen) @ torch.randn(rank, w[0].numel(), generator=gen))
            delta = (0.05 * delta).reshape(w.shape)
            w.add_(delta)
            planted[target] = delta
    return planted


def test_extract_recovers_a_planted_low_rank_difference(tiny_sd1, fresh_sd1, tmp_path):
    planted = plant(fresh_sd1)
    result = algebra.extract(tiny_sd1, fresh_sd1, rank=4, conv_rank=4, names=("tiny-sd1", "tuned"))
    assert {m.module for m in result.modules} == set(planted)
    assert all(m.error < 1e-4 and m.fro_retained == pytest.approx(1.0, abs=1e-6) for m in result.modules)
    assert result.adapter.type == "locon"
    result.save(tmp_path / "extracted.safetensors")
    extracted = load(tmp_path / "extracted.safetensors")
    assert extracted.base == "tiny-sd1"
    for target, delta in output_deltas(tiny_sd1, extracted).items():
        torch.testing.assert_close(delta.float(), planted[target], atol=1e-5, rtol=0)
    rebuilt = copy.deepcopy(tiny_sd1)
    extracted.merge_into(rebuilt)
    for key, value in state(rebuilt).items():
        torch.testing.assert_close(value, state(fresh_sd1)[key], atol=1e-5, rtol=0)
    sources = json.loads(extracted.metadata["adapterhub.sources"])
    assert [s["role"] for s in sources] == ["base", "tuned"] and extracted.metadata["adapterhub.method"] == "extract"


def test_extract_leaves_text_encoders_out_below_min_diff(tiny_sd1, fresh_sd1):
    plant(fresh_sd1, text=False)
    result = algebra.extract(tiny_sd1, fresh_sd1, rank=2)
    assert {m.module for m in result.modules} == {TO_Q, "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.2"}
    assert "text encoders are the same" in result.notes[0]


# ---------------------------------------------------------------------------------------------
# metadata and hashes
# ---------------------------------------------------------------------------------------------
def test_outputs_keep_and_extend_provenance_and_kohya_hashes(files, tmp_path):
    from safetensors.torch import load_file, save

    first = tmp_path / "svd.safetensors"
    algebra.combine_files([(files["A"], 0.7), (files["B"], -0.3)], first, method="svd", rank=3)
    meta = load(first).metadata
    sources = json.loads(meta["adapterhub.sources"])
    assert [(s["file"], s["weight"]) for s in sources] == [(str(files["A"]), 0.7), (str(files["B"]), -0.3)]
    assert sources[0]["sha256"] == hashlib.sha256(Path(files["A"]).read_bytes()).hexdigest()
    assert meta["adapterhub.method"] == "combine:svd" and json.loads(meta["adapterhub.params"])["rank"] == 3
    assert meta["adapterhub.example"] == "lora"  # agreed by both sources: kept
    assert "ss_output_name" not in meta  # differs between the sources: dropped
    network = (meta["ss_network_module"], meta["ss_network_dim"], meta["ss_network_alpha"])
    assert network == ("networks.lora", "3", "3.0")
    assert meta["ss_training_comment"].startswith("combined with svd from A:0.7, B:-0.3")

    data = Path(first).read_bytes()
    header = int.from_bytes(data[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + header:]).hexdigest()
    serialised = save(load_file(str(first)), {k: v for k, v in meta.items() if k.startswith("ss_")})
    assert meta["sshs_legacy_hash"] == hashlib.sha256(serialised[0x100000:0x110000]).hexdigest()[:8]

    second = tmp_path / "resized.safetensors"
    algebra.resize_file(first, second, rank=2)
    chain = json.loads(load(second).metadata["adapterhub.sources"])
    assert chain[0]["method"] == "combine:svd" and len(chain[0]["sources"]) == 2
    assert chain[0]["sshs_model_hash"] == meta["sshs_model_hash"]


# ---------------------------------------------------------------------------------------------
# refusals: one line, nothing written
# ---------------------------------------------------------------------------------------------
def _odd_lora(path: Path, metadata=None) -> Path:
    name = kohya_name(TO_Q)
    tensors = {f"{name}.lora_down.weight": torch.ones(2, 48), f"{name}.lora_up.weight": torch.ones(32, 2)}
    return save_safetensors(tensors, path, metadata or {})


@pytest.mark.parametrize("case, message", [
    ("shape", "shape mismatch at unet.down_blocks.0"),
    ("base", "is for tiny-sd1 but"),
    ("method", "unknown method 'average'"),
    ("loha-concat", "has no low-rank factors"),
    ("density", "needs --density"),
    ("suffix", "must be a .safetensors file"),
])
def test_bad_input_is_refused_and_nothing_written(files, tmp_path, case, message):
    out = tmp_path / "out.safetensors"
    specs, options = [(files["A"], 1.0)], {}
    if case == "shape":
        specs.append((_odd_lora(tmp_path / "odd.safetensors"), 1.0))
    elif case == "base":
        specs.append((_odd_lora(tmp_path / "xl.safetensors", {"ss_base_model_version": "sdxl_base_v1-0"}), 1.0))
    elif case == "method":
        options["method"] = "average"
    elif case == "loha-concat":
        specs.append((files["H"], 1.0))
    elif case == "density":
        options["method"] = "ties"
    elif case == "suffix":
        out = tmp_path / "out.ckpt"
    with pytest.raises(AdapterhubError, match=message) as info:
        algebra.combine_files(specs, out, **options)
    assert "\n" not in str(info.value)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------
def cli(*args, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, env=env, cwd=cwd)


def test_cli_combine_resize_extract(files, tiny_sd1, fresh_sd1, tmp_path):
    combined = tmp_path / "combined.safetensors"
    run = cli("combine", f"{files['A']}:0.7", f"{files['C']}:-0.3", "--method", "svd", "--rank", "2",
              "--out", combined, "--json")
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout)
    assert (data["method"], data["type"], data["ranks"]) == ("svd", "locon", [2])
    assert data["per_module"][0].keys() >= {"module", "old_rank", "new_rank", "fro_retained_pct", "error"}
    assert load(combined).type == "locon"

    resized = tmp_path / "resized.safetensors"
    run = cli("resize", files["A"], "--dynamic", "sv_fro:0.9", "--rank", "3", "--out", resized)
    assert run.returncode == 0, run.stderr
    assert "fro %" in run.stdout and "resize" in run.stdout
    assert load(resized).metadata["ss_network_dim"] == "Dynamic"

    plant(fresh_sd1)
    tuned = tmp_path / "tuned"
    fresh_sd1.save_pretrained(tuned)
    extracted = tmp_path / "extracted.safetensors"
    run = cli("extract", "--base", "tiny-sd1", "--tuned", tuned, "--rank", "4", "--out", extracted, "--json")
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout)
    assert data["modules"] == 3 and all(m["error"] < 1e-4 for m in data["per_module"])  # the conv needs --conv-rank
    assert load(extracted).type == "lora"

    bad = tmp_path / "bad.safetensors"
    run = cli("combine", files["A"], "--method", "average", "--out", bad)
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0
    assert "unknown method" in run.stderr and not bad.exists()


def test_cli_resize_prints_a_summary_not_a_wall_of_modules(files, tmp_path):
    """#17 item 12: the summary comes last and the per-module rows only on --verbose (the worst few else)."""
    out = tmp_path / "resized.safetensors"
    run = cli("resize", files["A"], "--rank", "2", "--out", out)
    assert run.returncode == 0, run.stderr
    modules = json.loads(cli("resize", files["A"], "--rank", "2", "--out", tmp_path / "again.safetensors",
                             "--json").stdout)["modules"]
    assert modules > 5
    rows = [line for line in run.stdout.splitlines() if "->2" in line]
    assert len(rows) == 5, run.stdout
    tail = run.stdout.rstrip().splitlines()[-12:]
    assert any("fro retained" in line for line in tail) and any("modules" in line for line in tail), run.stdout
    verbose = cli("resize", files["A"], "--rank", "2", "--out", tmp_path / "v.safetensors", "--verbose")
    assert verbose.returncode == 0, verbose.stderr
    assert len([line for line in verbose.stdout.splitlines() if "->2" in line]) == modules
