"""The compiled backend with ControlNet and T2I-Adapter: residuals from the eager hooks fed to a compiled
UNet, control models compiled too, and never a recompile when stacks, control images or weights change.

The oracle is the eager backend on the same tiny base, the same adapter files and the same requests: the
UNet, ControlNet and T2I-Adapter as diffusers runs them. Graphs are built with dynamo's ``aot_eager``
backend (``ADAPTERHUB_COMPILE_BACKEND``; the same capture and guards as inductor, without code
generation), which runs the captured aten ops one by one: compiled latents equal the eager ones bit for
bit (tolerance 0). ``ADAPTERHUB_TEST_INDUCTOR=1`` adds the on-disk compile cache check with inductor
(two processes; about a minute on one CPU thread for the first, seconds for the second).
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SIZE = 64
ENTRIES = {"unet_plain", "unet_controlnet", "unet_t2i", "unet_both", "controlnet", "controlnet_guess", "t2i_adapter"}


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_sd1):
    from adapterhub.conditioning import example_condition_image
    from adapterhub.plugins import adapter_type

    folder = tmp_path_factory.mktemp("compiled_controls")
    made = {name: adapter_type("lora").example(tiny_sd1, folder / f"{name}.safetensors", seed=seed)
            for name, seed in (("lora_a", 1), ("lora_b", 2))}
    made["cn"] = adapter_type("controlnet").example(tiny_sd1, folder / "cn", seed=1)
    made["cn2"] = adapter_type("controlnet").example(tiny_sd1, folder / "cn2", seed=2)  # same architecture
    made["t2i"] = adapter_type("t2i_adapter").example(tiny_sd1, folder / "t2i", seed=3)
    edges = example_condition_image(tiny_sd1).resize((SIZE, SIZE))
    return {**{k: str(v) for k, v in made.items()}, "edges": edges, "turned": edges.rotate(90)}


def _entry(path, weight, **options):
    from adapterhub.stack import Entry

    return Entry(path, te=weight, options=options)


def _request(entries, seed=4):
    from adapterhub.sample.generator import Request
    from adapterhub.stack import Stack

    return Request("a house", stack=Stack(entries), seed=seed, steps=2, sampler="Euler", width=SIZE, height=SIZE)


def _both(generators, make_entries) -> tuple[torch.Tensor, torch.Tensor]:
    """The same request (fresh entries, the same files and images) through the compiled and the eager backend."""
    compiled, eager = generators
    return (compiled.generate(_request(make_entries()), output="latent").latents,
            eager.generate(_request(make_entries()), output="latent").latents)


def test_controls_compiled_equal_eager(generators, files):
    import torch._dynamo

    f = files
    cases = {
        "plain": list,
        "controlnet": lambda: [_entry(f["cn"], 0.9, image=f["edges"])],
        "t2i": lambda: [_entry(f["t2i"], 0.7, image=f["edges"])],
        "both": lambda: [_entry(f["cn"], 0.9, image=f["edges"]), _entry(f["t2i"], 0.7, image=f["turned"])],
        # step 0 of 2 has no control (the plain entry), step 1 the ControlNet
        "gated": lambda: [_entry(f["cn"], 0.9, image=f["edges"], start=0.5, end=1.0)],
        # ControlNet for step 0 only, T2I for step 1 only
        "crossed": lambda: [_entry(f["cn"], 0.9, image=f["edges"], end=0.5),
                            _entry(f["t2i"], 0.7, image=f["turned"], start=0.5)],
        "guess mode": lambda: [_entry(f["cn"], 0.9, image=f["edges"], guess_mode=True)],
        "second controlnet": lambda: [_entry(f["cn2"], 0.9, image=f["edges"])],
    }
    got = {}
    with torch._dynamo.config.patch(error_on_recompile=True):
        for name, make in cases.items():
            got[name], want = _both(generators, make)
            assert torch.equal(got[name], want), name  # aot_eager runs the same aten ops: bit for bit
    for name in cases:  # every control acts, and each case differs from the others
        same = [other for other in cases if other != name and torch.equal(got[name], got[other])]
        assert not same, (name, same)
    stats = generators[0].runner.stats()
    assert stats["recompiles"] == 0
    # one graph per entry: a second ControlNet of the same architecture reuses the first one's graph
    # (dynamo inlines nn.Module calls and lifts the parameters as graph inputs)
    assert set(stats["graphs"]) <= ENTRIES and all(n == 1 for n in stats["graphs"].values())
    assert {"unet_plain", "unet_controlnet", "unet_t2i", "unet_both", "controlnet", "t2i_adapter"} <= \
        set(stats["graphs"])


def _switching(generators, files, tol: float) -> None:
    import torch._dynamo

    f = files
    compiled, _ = generators
    _both(generators, list)  # the first step fuses the projections (new tensors, once); none is replaced after
    params = {id(p) for p in compiled.pipe.unet.parameters()}
    sequence = [  # three stacks, two control images, every weight changed, then back
        lambda: [_entry(f["lora_a"], 0.8)],
        lambda: [_entry(f["lora_b"], 0.5), _entry(f["cn"], 0.9, image=f["edges"])],
        lambda: [_entry(f["t2i"], 0.7, image=f["edges"]), _entry(f["lora_a"], 0.8)],
        lambda: [_entry(f["lora_b"], 0.5), _entry(f["cn"], 0.9, image=f["turned"])],
        lambda: [_entry(f["t2i"], 0.7, image=f["turned"]), _entry(f["lora_a"], 0.8)],
        lambda: [_entry(f["lora_a"], 0.3)],
        lambda: [_entry(f["lora_b"], 1.0), _entry(f["cn"], 0.4, image=f["edges"])],
        lambda: [_entry(f["t2i"], 0.3, image=f["turned"]), _entry(f["lora_a"], 0.6)],
        lambda: [_entry(f["lora_b"], 0.5), _entry(f["cn"], 0.9, image=f["edges"])],  # the second again
    ]
    outputs = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for make in sequence:
            got, want = _both(generators, make)
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)
            outputs.append(got)
    assert compiled.runner.stats()["recompiles"] == 0
    assert {id(p) for p in compiled.pipe.unet.parameters()} == params  # weights rewritten in place
    assert torch.equal(outputs[1], outputs[8])  # switching back restores exactly
    for a, b in ((1, 3), (2, 4), (0, 5), (1, 6), (4, 7)):  # the image, then each weight, changes the result
        assert not torch.equal(outputs[a], outputs[b]), (a, b)


def test_switching_stacks_images_and_weights_never_recompiles(generators, files):
    _switching(generators, files, 0.0)  # aot_eager: bit for bit


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("ADAPTERHUB_TEST_INDUCTOR"), reason="inductor compiles for minutes on CPU; "
                    "set ADAPTERHUB_TEST_INDUCTOR=1")
def test_switching_never_recompiles_inductor(tiny_sd1, files):
    import torch._dynamo

    from adapterhub.sample.generator import Generator

    torch._dynamo.reset()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADAPTERHUB_COMPILE_BACKEND", "inductor")
        compiled = Generator(copy.deepcopy(tiny_sd1), backend="compiled", hash_model=False)
    try:
        _switching((compiled, Generator(copy.deepcopy(tiny_sd1), hash_model=False)), files, 2e-3)
    finally:
        torch._dynamo.reset()


def test_recompiles_are_counted(generators):
    """The counter the tests above read is not blind: a graph built again for inputs of a signature the runner
    already compiled is a recompile; a new input size is a graph of its own, expected, not a recompile."""
    import torch._dynamo
    from adapterhub_plugins.backends.compiled import _t2i_adapter

    runner = generators[0].runner
    small, wide = torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(3, 4, 5)  # any module's forward(x) will do
    with torch.inference_mode():
        runner._call(_t2i_adapter, small, torch.rand(1, 3, SIZE, SIZE))
        before = runner.stats()["recompiles"]
        runner._call(_t2i_adapter, small, torch.rand(1, 3, SIZE, SIZE))
        runner._call(_t2i_adapter, small, torch.rand(1, 3, 2 * SIZE, 2 * SIZE))  # a new size: its own graph
        assert runner.stats()["recompiles"] == before
        runner._call(_t2i_adapter, wide, torch.rand(1, 3, SIZE, SIZE))  # same inputs, other code: built again
    assert runner.stats()["recompiles"] == before + 1
    torch._dynamo.reset()  # leave no recompiled entry behind


def test_compiled_accepts_controls_and_hypernetworks(tiny_sd1, files, tmp_path, monkeypatch):
    """The runner plans each entry by its type's declared kind; a type that declares none is refused with one
    line naming the entry, before anything changes."""
    from adapterhub.errors import AdapterhubError
    from adapterhub.plugins import adapter_types
    from adapterhub.sample.backend import backend
    from adapterhub.stack import Stack
    from adapterhub.types import ATTENTION_CONTEXT, UNET_RESIDUALS, UNET_UNTOUCHED, UNET_WEIGHTS

    runner = backend("compiled").prepare(copy.copy(tiny_sd1))  # torch.compile is lazy: nothing compiles here
    types = adapter_types()
    ti = types["textual_inversion"].example(tiny_sd1, tmp_path / "ti.safetensors", seed=0)
    hn = types["hypernetwork"].example(tiny_sd1, tmp_path / "hn.pt", seed=0)
    stack = Stack([(files["lora_a"], 1.0), (ti, 1.0), _entry(files["cn"], 1.0, image=files["edges"]),
                   _entry(files["t2i"], 1.0, image=files["edges"]), (hn, 1.0)]).load()
    assert runner.plan(stack) == [("lora_a", UNET_WEIGHTS), ("ti", UNET_UNTOUCHED), ("cn", UNET_RESIDUALS),
                                  ("t2i", UNET_RESIDUALS), ("hn", ATTENTION_CONTEXT)]
    runner.check_stack(stack)
    monkeypatch.setattr(type(types["t2i_adapter"]), "unet_runtime", None)
    with pytest.raises(AdapterhubError) as refused:
        runner.check_stack(stack)
    assert str(refused.value) == ("t2i: a t2i_adapter changes the UNet's code, not its weights or inputs; the compiled "
                                  "backend would recompile at every switch (use --backend eager)")


def test_compile_caches_in_the_project_cache(tiny_sd1, tmp_path, monkeypatch):
    import torch._functorch.config
    import torch._inductor.config
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from adapterhub.sample.backend import backend

    monkeypatch.setenv("ADAPTERHUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)
    monkeypatch.setattr(torch._functorch.config, "enable_autograd_cache", False)
    for unset in (None, default_cache_dir()):  # torch writes its default into the environment: not a user's choice
        if unset is None:
            monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
        else:
            monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", unset)
        monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
        runner = backend("compiled").prepare(copy.copy(tiny_sd1))
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "hub" / "compile" / "inductor")
        assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "hub" / "compile" / "triton")
        assert torch._inductor.config.fx_graph_cache and torch._functorch.config.enable_autograd_cache
        assert runner.stats()["cache_dir"] == os.environ["TORCHINDUCTOR_CACHE_DIR"]
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "my_triton"))
    backend("compiled").prepare(copy.copy(tiny_sd1))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "my_triton")


COMPILE_ONCE = """
import json, time, torch
from torch._dynamo.utils import counters
from adapterhub.sample.generator import Generator, Request
torch.set_num_threads(1)
gen = Generator("tiny-sd1", backend="compiled", hash_model=False)
start = time.perf_counter()
gen.generate(Request("a house", seed=1, steps=1, sampler="Euler", width=64, height=64), output="latent")
print(json.dumps({"seconds": time.perf_counter() - start, "hits": counters["inductor"]["fxgraph_cache_hit"],
                  "misses": counters["inductor"]["fxgraph_cache_miss"],
                  "aot_hits": counters["aot_autograd"]["autograd_cache_hit"]}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("ADAPTERHUB_TEST_INDUCTOR"), reason="inductor compiles for about a minute on "
                    "CPU; set ADAPTERHUB_TEST_INDUCTOR=1")
def test_second_process_finds_the_compile_cache(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    env.update(ADAPTERHUB_CACHE=str(tmp_path / "hub"), ADAPTERHUB_COMPILE_BACKEND="inductor", OMP_NUM_THREADS="1")
    runs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", COMPILE_ONCE], check=False, env=env, capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1], timeout=900)
        assert done.returncode == 0, done.stderr[-2000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"first process: {runs[0]}\nsecond process: {runs[1]}")
    assert runs[0]["misses"] >= 1
    assert runs[1]["hits"] >= 1 and runs[1]["misses"] == 0 and runs[1]["aot_hits"] >= 1
    assert any((tmp_path / "hub" / "compile" / "inductor").iterdir())


@pytest.mark.parametrize("sampler", ["DPM++ 2M", "Heun"])
def test_guidance_window_counts_the_generators_steps(tiny_sd1, files, sampler):
    """``START:END`` gates by the step of the schedule the generator runs (not by the pipeline's idle scheduler):
    our latents equal diffusers' ControlNet pipeline with ``control_guidance_start/end`` and the same scheduler,
    bit for bit (eager), over 6 steps of a first- and a second-order sampler."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    from adapterhub.sample.generator import Generator, Request
    from adapterhub.sample.samplers import make_scheduler, resolve_sampler
    from adapterhub.stack import Stack

    gen = Generator(copy.deepcopy(tiny_sd1), hash_model=False)
    window = {"start": 0.2, "end": 0.6}
    request = Request("a house", negative="blurry", stack=Stack([_entry(files["cn"], 0.9, image=files["edges"],
                                                                       **window)]),
                      seed=5, steps=6, sampler=sampler, width=SIZE, height=SIZE)
    ours = gen.generate(request, output="latent").latents
    gen.close()
    cond, uncond = gen.encode("a house", "blurry")
    pipe = StableDiffusionControlNetPipeline(**{**gen.pipe.components, "safety_checker": None,
                                                "feature_extractor": None, "requires_safety_checker": False,
                                                "scheduler": make_scheduler(*resolve_sampler(sampler),
                                                                            gen.pipe.scheduler.config),
                                                "controlnet": ControlNetModel.from_pretrained(files["cn"]).eval()})
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        want = pipe(prompt_embeds=cond.embeds, negative_prompt_embeds=uncond.embeds, image=files["edges"],
                    controlnet_conditioning_scale=0.9, control_guidance_start=window["start"],
                    control_guidance_end=window["end"], num_inference_steps=6, guidance_scale=7.0, width=SIZE,
                    height=SIZE, generator=[torch.Generator().manual_seed(5)], output_type="latent").images
    assert torch.equal(ours, want)
