"""The compiled backend with hypernetworks: cross-attention contexts computed eagerly and fed to a compiled
UNet, self-attention MLPs (and every multiplier, as a tensor) taken as graph inputs, never a recompile when
the hypernetwork file or its multiplier changes, or when it is turned off and on again.

The oracle is the eager backend on the same tiny base with the same files and requests (the hypernetwork
plugin's own attention processor). Graphs are built with dynamo's ``aot_eager`` backend, which runs the
captured aten ops one by one: compiled latents equal eager ones bit for bit (tolerance 0).
"""
from __future__ import annotations

import copy

import pytest

SIZE = 64


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_sd1):
    from adapterhub.conditioning import example_condition_image
    from adapterhub.plugins import adapter_type, adapter_types

    if "hypernetwork" not in adapter_types():
        pytest.skip("hypernetwork plugin not registered")
    folder = tmp_path_factory.mktemp("compiled_hypernetworks")
    made = {name: adapter_type("hypernetwork").example(tiny_sd1, folder / f"{name}.pt", seed=seed)
            for name, seed in (("hn_a", 1), ("hn_b", 2))}
    made["lora"] = adapter_type("lora").example(tiny_sd1, folder / "lora.safetensors", seed=3)
    made["cn"] = adapter_type("controlnet").example(tiny_sd1, folder / "cn", seed=1)
    edges = example_condition_image(tiny_sd1).resize((SIZE, SIZE))
    return {**{k: str(v) for k, v in made.items()}, "edges": edges}


def _entry(path, weight, **options):
    from adapterhub.stack import Entry

    return Entry(path, te=weight, options=options)


def _request(entries):
    from adapterhub.sample.generator import Request
    from adapterhub.stack import Stack

    return Request("a house", stack=Stack(entries), seed=4, steps=2, sampler="Euler", width=SIZE, height=SIZE)


def test_hypernetworks_compiled_equal_eager_without_recompiles(generators, files):
    import torch._dynamo

    compiled, eager = generators
    unet = compiled.pipe.unet
    compiled.generate(_request([]), output="latent")  # the first step fuses the projections
    original = dict(unet.attn_processors)
    f = files
    cases = [("plain", []), ("hn_a", [(f["hn_a"], 1.0)]), ("hn_b", [(f["hn_b"], 1.0)]),
             ("hn_a 0.4", [(f["hn_a"], 0.4)]), ("hn_a + lora", [(f["hn_a"], 0.7), (f["lora"], 0.8)]),
             ("hn_b 1.6", [(f["hn_b"], 1.6)]), ("hn_b + controlnet", [(f["hn_b"], 1.0), _entry(f["cn"], 0.9,
                                                                                               image=f["edges"])]),
             ("off", []), ("hn_a again", [(f["hn_a"], 1.0)])]
    got = {}
    for entries in ([(f["hn_a"], 1.0)], [(f["hn_a"], 1.0), _entry(f["cn"], 0.9, image=f["edges"])]):
        compiled.generate(_request(entries), output="latent")  # the first compile of each entry
    with torch._dynamo.config.patch(error_on_recompile=True):
        for name, entries in cases:
            got[name] = compiled.generate(_request(entries), output="latent").latents
            want = eager.generate(_request(entries), output="latent").latents
            assert torch.equal(got[name], want), name  # aot_eager runs the same aten ops: bit for bit
    names = [n for n, _ in cases]
    for name in names[:7]:  # every hypernetwork, multiplier and LoRA acts
        assert all(not torch.equal(got[name], got[other]) for other in names[:7] if other != name), name
    assert torch.equal(got["plain"], got["off"]) and torch.equal(got["hn_a"], got["hn_a again"])
    stats = compiled.runner.stats()
    assert stats["recompiles"] == 0
    assert stats["graphs"] == {"unet_plain": 1, "unet_context_plain": 1, "unet_context_controlnet": 1, "controlnet": 1}
    # the hypernetwork removed: the UNet runs its original processor objects again, not the fixed ones
    compiled.generate(_request([]), output="latent")
    assert all(unet.attn_processors[k] is v for k, v in original.items())
    assert len(unet.attn_processors) == len(original)


def test_check_stack_accepts_hypernetworks_and_refuses_unknown_unet_code(tiny_sd1, files):
    from types import SimpleNamespace

    from adapterhub.errors import AdapterhubError
    from adapterhub.sample.backend import backend
    from adapterhub.stack import Stack

    runner = backend("compiled").prepare(copy.copy(tiny_sd1))  # torch.compile is lazy: nothing compiles here
    stack = Stack([(files["hn_a"], 1.0), (files["lora"], 1.0)]).load()
    runner.check_stack(stack)
    # a type that is no weight delta and none the runner knows how to feed its graph is still refused
    entry = stack.entries[0]
    other = SimpleNamespace(type="some_processor", plugin=SimpleNamespace(weight_space=False))
    with pytest.raises(AdapterhubError, match="some_processor changes the UNet's code.*use --backend eager"):
        runner.check_stack(SimpleNamespace(entries=[SimpleNamespace(label=entry.label, adapter=other)]))
