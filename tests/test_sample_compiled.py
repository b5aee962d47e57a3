"""The compiled backend: stacks switched by rewriting the UNet's weights in place, never recompiling.

By default the UNet is compiled with dynamo's ``aot_eager`` backend (the same graph capture and
guards as inductor, without C++ code generation, which takes minutes on one CPU thread); set
``ADAPTERHUB_TEST_INDUCTOR=1`` to run the inductor variant too."""
from __future__ import annotations

import copy

import pytest

SIZE = 64


@pytest.fixture(scope="module")
def loras(tmp_path_factory, tiny_sd1):
    from adapterhub.plugins import adapter_type

    folder = tmp_path_factory.mktemp("compiled_loras")
    for name, seed in (("a", 1), ("b", 2)):
        adapter_type("lora").example(tiny_sd1, folder / f"{name}.safetensors", seed=seed)
    return folder


def _request(prompt, stack=None):
    from adapterhub.sample.generator import Request

    return Request(prompt, stack=stack, seed=4, steps=2, sampler="Euler", width=SIZE, height=SIZE)


STACKS = [None, "a:0.8", "a:0.8, b:0.5", "b:1.0", "a:0.3", None, "a:0.8"]


def _switching(compile_backend, tiny_sd1, loras, tol):
    import torch._dynamo
    from torch._dynamo.utils import counters

    from adapterhub.sample.generator import Generator

    torch._dynamo.reset()
    counters.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADAPTERHUB_COMPILE_BACKEND", compile_backend)
        compiled = Generator(copy.deepcopy(tiny_sd1), backend="compiled", adapter_dirs=[loras])
    eager = Generator(copy.deepcopy(tiny_sd1), backend="eager", adapter_dirs=[loras])
    params = {id(p) for p in compiled.pipe.unet.parameters()}
    first = compiled.generate(_request("a house", STACKS[0]), output="latent")  # compiles once
    outputs = [first.latents]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for spec in STACKS[1:]:
            outputs.append(compiled.generate(_request("a house", spec), output="latent").latents)
    assert counters["stats"]["unique_graphs"] == 1
    assert {id(p) for p in compiled.pipe.unet.parameters()} == params  # weights rewritten in place, never replaced
    for spec, got in zip(STACKS, outputs):
        want = eager.generate(_request("a house", spec), output="latent").latents
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)  # fused kernels round differently
    assert not torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[1], outputs[2])
    assert torch.equal(outputs[0], outputs[5]) and torch.equal(outputs[1], outputs[6])  # exact restores
    return compiled


def test_switching_stacks_never_recompiles(tiny_sd1, loras):
    compiled = _switching("aot_eager", tiny_sd1, loras, 1e-4)
    assert compiled.runner.calls == 2 * len(STACKS)


@pytest.mark.slow
def test_switching_stacks_never_recompiles_inductor(tiny_sd1, loras):
    """Real code generation on CPU (about a minute cold): within 2e-3 of eager, no recompiles."""
    _switching("inductor", tiny_sd1, loras, 2e-3)


def test_compiled_accepts_hypernetworks(tiny_sd1, tmp_path):
    from adapterhub.plugins import adapter_types
    from adapterhub.sample.backend import backend
    from adapterhub.stack import Stack

    if "hypernetwork" not in adapter_types():
        pytest.skip("hypernetwork plugin not registered")
    path = adapter_types()["hypernetwork"].example(tiny_sd1, tmp_path / "hn.pt", seed=0)
    runner = backend("compiled").prepare(copy.copy(tiny_sd1))  # torch.compile is lazy: nothing compiles here
    stack = Stack([(path, 1.0)]).load()
    runner.check_stack(stack)  # fed to the graph as inputs (tests/test_sample_compiled_hypernetwork.py)
