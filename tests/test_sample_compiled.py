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


def _fresh_merge(tiny_sd1, loras, spec):
    """The UNet weights of a fresh copy of the base with ``spec`` merged (the engine's one merge)."""
    from adapterhub.stack import Stack

    pipe = copy.deepcopy(tiny_sd1)
    if spec:
        Stack.parse(spec, dirs=[loras]).load().apply(pipe, mode="merge")
    return dict(pipe.unet.named_parameters())


def _switching(compile_backend, tiny_sd1, loras, tol, env=(), check=None):
    import torch._dynamo
    from torch._dynamo.utils import counters

    from adapterhub.sample.generator import Generator

    torch._dynamo.reset()
    counters.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADAPTERHUB_COMPILE_BACKEND", compile_backend)
        for key, value in env:
            mp.setenv(key, value)
        compiled = Generator(copy.deepcopy(tiny_sd1), backend="compiled", adapter_dirs=[loras])
    eager = Generator(copy.deepcopy(tiny_sd1), backend="eager", adapter_dirs=[loras])
    before = {id(p) for p in compiled.pipe.unet.parameters()}
    first = compiled.generate(_request("a house", STACKS[0]), output="latent")  # compiles once
    params = {id(p) for p in compiled.pipe.unet.parameters()}
    assert before <= params  # fused projections add tensors at the first step; none is replaced
    outputs = [first.latents]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for spec in STACKS[1:]:
            outputs.append(compiled.generate(_request("a house", spec), output="latent").latents)
            if check is not None:
                check(compiled, spec)
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


def test_fused_qkv_holds_every_merge(tiny_sd1, loras):
    """Fused projections (on by default): after every switch, each layer's fused ``to_qkv`` / ``to_kv`` equals
    the concatenation of a fresh merge's q, k, v bit for bit; ``close`` gives back diffusers' plain processors."""
    import torch
    from diffusers.models.attention_processor import AttnProcessor2_0, FusedAttnProcessor2_0

    from adapterhub_plugins.backends.compiled import fused_in_place

    def check(gen, spec):
        want = _fresh_merge(tiny_sd1, loras, spec)
        assert gen.runner.fused
        for module in gen.runner.fused:
            assert isinstance(module.processor, FusedAttnProcessor2_0) and fused_in_place(module)
        for name, module in gen.pipe.unet.named_modules():
            fused = getattr(module, "to_qkv", None) if not getattr(module, "is_cross_attention", True) else \
                getattr(module, "to_kv", None)
            if fused is None:
                continue
            parts = ("to_k", "to_v") if module.is_cross_attention else ("to_q", "to_k", "to_v")
            expected = torch.cat([want[f"{name}.{p}.weight"] for p in parts])
            assert torch.equal(fused.weight, expected), name
        for name, param in gen.pipe.unet.named_parameters():
            if name in want:
                assert torch.equal(param, want[name]), name

    compiled = _switching("aot_eager", tiny_sd1, loras, 1e-4, check=check)
    layers = list(compiled.runner.fused)
    compiled.close()
    assert all(type(m.processor) is AttnProcessor2_0 for m in layers)


def test_fused_qkv_off_and_channels_last(tiny_sd1, loras):
    """``ADAPTERHUB_COMPILE_FUSE_QKV=0`` leaves the processors alone; ``ADAPTERHUB_COMPILE_CHANNELS_LAST=1``
    puts the convolutions in NHWC: still eager's latents within tolerance, still no recompile."""
    import torch

    env = (("ADAPTERHUB_COMPILE_FUSE_QKV", "0"), ("ADAPTERHUB_COMPILE_CHANNELS_LAST", "1"))
    compiled = _switching("aot_eager", tiny_sd1, loras, 5e-4, env=env)  # NHWC convolutions round differently
    assert compiled.runner.fused == [] and not hasattr(compiled.pipe.unet.mid_block.attentions[0].transformer_blocks[0]
                                                       .attn1, "to_qkv")
    conv = compiled.pipe.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    compiled.close()
    assert compiled.pipe.unet.conv_in.weight.is_contiguous()


def test_a_cast_unet_is_fused_again(tiny_sd1, loras):
    """A UNet cast after the fusion has projections of its own; the next step fuses them again, so the graph
    never runs stale weights."""
    import torch

    from adapterhub.sample.generator import Generator
    from adapterhub_plugins.backends.compiled import fused_in_place

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADAPTERHUB_COMPILE_BACKEND", "aot_eager")
        gen = Generator(copy.deepcopy(tiny_sd1), backend="compiled", adapter_dirs=[loras])
    gen.generate(_request("a house", "a:0.8"), output="latent")
    gen.pipe.unet.to(torch.float64).to(torch.float32)  # new storage for every parameter
    assert not fused_in_place(gen.runner.fused[0])
    got = gen.generate(_request("a house", "b:1.0"), output="latent").latents
    assert all(fused_in_place(m) for m in gen.runner.fused)
    eager = Generator(copy.deepcopy(tiny_sd1), backend="eager", adapter_dirs=[loras])
    want = eager.generate(_request("a house", "b:1.0"), output="latent").latents
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_bad_fuse_flag_is_one_line(tiny_sd1, monkeypatch):
    from adapterhub.errors import AdapterhubError
    from adapterhub.sample.backend import backend

    monkeypatch.setenv("ADAPTERHUB_COMPILE_FUSE_QKV", "maybe")
    with pytest.raises(AdapterhubError, match="ADAPTERHUB_COMPILE_FUSE_QKV='maybe': use 0 or 1"):
        backend("compiled").prepare(copy.copy(tiny_sd1))


@pytest.mark.slow
def test_switching_stacks_never_recompiles_inductor(tiny_sd1, loras):
    """Real code generation on CPU (about a minute cold): within 2e-3 of eager, no recompiles."""
    _switching("inductor", tiny_sd1, loras, 2e-3)


def test_compiled_accepts_hypernetworks(tiny_sd1, tmp_path, monkeypatch):
    """The hypernetwork runs by its declaration (attention contexts, its processor class found through the
    registry, no plugin import); the same type declaring nothing is refused with one line."""
    from adapterhub.errors import AdapterhubError
    from adapterhub.plugins import adapter_types
    from adapterhub.sample.backend import backend
    from adapterhub.stack import Stack
    from adapterhub.types import ATTENTION_CONTEXT

    hypernetwork = adapter_types()["hypernetwork"]
    path = hypernetwork.example(tiny_sd1, tmp_path / "hn.pt", seed=0)
    runner = backend("compiled").prepare(copy.copy(tiny_sd1))  # torch.compile is lazy: nothing compiles here
    stack = Stack([(path, 1.0)]).load()
    assert runner.plan(stack) == [(stack.entries[0].label, ATTENTION_CONTEXT)]
    assert runner._context_types == {hypernetwork.attention_processor: hypernetwork}
    runner.check_stack(stack)
    monkeypatch.setattr(type(hypernetwork), "attention_processor", None)  # the kind, but no processor to fix
    with pytest.raises(AdapterhubError, match=r"^hn: a hypernetwork changes the UNet's code.*use --backend eager\)$"):
        runner.check_stack(stack)
    monkeypatch.undo()
    monkeypatch.setattr(type(hypernetwork), "unet_runtime", None)  # undeclared: refused whatever its name
    with pytest.raises(AdapterhubError, match=r"^hn: a hypernetwork changes the UNet's code"):
        runner.check_stack(stack)


def test_a_step_does_not_walk_the_unet(tiny_sd1, monkeypatch):
    """The runner's per-step Python stays small: the attention layers are found once per UNet, not by walking
    every module at every step (that walk cost about a millisecond a step on the tiny base, more on SD1)."""
    import torch

    from adapterhub_plugins.backends.compiled import ENTRIES, CompiledRunner

    pipe = copy.deepcopy(tiny_sd1)
    runner = CompiledRunner(pipe, backend="aot_eager", fuse_qkv=False)
    runner.compiled = {entry: (lambda module, sample, *inputs: sample) for entry in ENTRIES}  # no graph: the overhead
    sample, timestep, context = torch.rand(2, 4, 8, 8), torch.tensor(999.0), torch.rand(2, 77, 32)
    with torch.inference_mode():
        runner(sample, timestep, context)

        def walked(*args, **kwargs):
            raise AssertionError("a step walked every module of the UNet")

        monkeypatch.setattr(type(pipe.unet), "modules", walked)
        monkeypatch.setattr(type(pipe.unet), "named_modules", walked)
        for _ in range(3):
            runner(sample, timestep, context)
