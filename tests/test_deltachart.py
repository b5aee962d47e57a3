"""``inspect --plot``'s block norms come from each patch's own ``squared_norm`` (the contract's, no type's formula
in the chart): for every weight-space type's example they equal the norms of what attaching it changes."""
from __future__ import annotations

import pytest
import torch

from adapterhub.plugins import adapter_types

WEIGHT_TYPES = [name for name, t in adapter_types().items()
                if t.weight_space and "example" in t.capabilities and t.source.builtin]


def _weights(pipe) -> dict[str, torch.Tensor]:
    return {f"{part}.{k}": v.detach().double().clone() for part in ("unet", "text_encoder")
            for k, v in getattr(pipe, part).state_dict().items()}


@pytest.mark.parametrize("name", WEIGHT_TYPES)
def test_block_norms_equal_the_norms_of_the_attached_change(name, fresh_sd1, tmp_path):
    import adapterhub
    from adapterhub.blocks import block_of
    from adapterhub.deltachart import block_norms

    kind = adapter_types()[name]
    adapter = adapterhub.load(kind.example(fresh_sd1, tmp_path / f"{name}{kind.example_suffix}", seed=3))
    before = _weights(fresh_sd1)
    with adapter.attach(fresh_sd1, 1.0):
        after = _weights(fresh_sd1)
    squares: dict[str, float] = {}
    for key in before:
        module = key.rsplit(".", 1)[0]
        slot = "BASE" if key.startswith("text_encoder") else block_of(module) or "other"
        squares[slot] = squares.get(slot, 0.0) + float(((after[key] - before[key]) ** 2).sum())
    theirs = {slot: s ** 0.5 for slot, s in squares.items() if s > 0}
    ours = block_norms(adapter)
    assert ours.keys() == theirs.keys()
    for slot in theirs:
        assert ours[slot] == pytest.approx(theirs[slot], rel=1e-4), slot


def test_a_patch_without_a_norm_of_its_own_uses_the_contract_default():
    """A third-party patch that implements only ``delta`` and ``expected_shape`` gets ``squared_norm`` from the
    base class; one whose shape the file leaves open has none (left out of the chart)."""
    from adapterhub.types import Patch

    class Diff(Patch):
        def expected_shape(self):
            return tuple(self.tensors["diff"].shape)

        def delta(self, weight):
            return self.tensors["diff"].float()

    diff = torch.arange(6.0).reshape(2, 3)
    assert Diff("unet.conv_in", "x", {"diff": diff}).squared_norm() == float((diff ** 2).sum())

    class Open(Diff):
        def expected_shape(self):
            return None

    assert Open("unet.conv_in", "x", {"diff": diff}).squared_norm() is None


def test_lokr_block_norms_equal_the_norms_of_the_attached_change(fresh_sd1, tmp_path):
    """LoKr (no example of its own): a Linear with a factorised ``w2`` and a 3x3 conv with whole factors."""
    import adapterhub
    from adapterhub.deltachart import block_norms
    from adapterhub.io import save_safetensors

    g = torch.Generator().manual_seed(5)
    q = fresh_sd1.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight
    conv = fresh_sd1.unet.down_blocks[0].resnets[0].conv1.weight
    lin, cv = ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
               "lora_unet_down_blocks_0_resnets_0_conv1")
    tensors = {f"{lin}.lokr_w1": torch.randn(2, 2, generator=g),
               f"{lin}.lokr_w2_a": torch.randn(q.shape[0] // 2, 2, generator=g),
               f"{lin}.lokr_w2_b": torch.randn(2, q.shape[1] // 2, generator=g), f"{lin}.alpha": torch.tensor(1.0),
               f"{cv}.lokr_w1": torch.randn(2, 2, generator=g),
               f"{cv}.lokr_w2": torch.randn(conv.shape[0] // 2, conv.shape[1] // 2, 3, 3, generator=g)}
    path = save_safetensors(tensors, tmp_path / "lokr.safetensors", {})
    adapter = adapterhub.load(path)
    assert adapter.type == "lokr"
    before = _weights(fresh_sd1)
    with adapter.attach(fresh_sd1, 1.0):
        after = _weights(fresh_sd1)
    change = sum(float(((after[k] - before[k]) ** 2).sum()) for k in before) ** 0.5
    ours = block_norms(adapter)
    assert list(ours) == ["IN01"] and ours["IN01"] == pytest.approx(change, rel=1e-4)


@pytest.mark.parametrize("base, first", [("tiny_flux", "D"), ("tiny_sd3", "J")])
def test_transformer_block_norms_are_per_block(base, first, request, tmp_path, capsys):
    """A Flux / SD3 LoRA's chart has a bar per transformer block (Flux: ``D00``.. double then ``S00``.. single
    blocks; SD3: ``J00``.. joint blocks), each the norm of what attaching the file changes in that block."""
    import copy
    import json
    import re

    from flux_helpers import peft_file

    import adapterhub
    from adapterhub.cli import main
    from adapterhub.deltachart import block_norms

    pipe = copy.deepcopy(request.getfixturevalue(base))
    transformer = pipe.transformer
    paths = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    path = peft_file(tmp_path / "t.safetensors", transformer, paths)
    before = {k: v.detach().double().clone() for k, v in transformer.state_dict().items()}
    adapter = adapterhub.load(path)
    with adapter.attach(pipe, 1.0):
        after = {k: v.detach().double().clone() for k, v in transformer.state_dict().items()}
    squares: dict[str, float] = {}
    for key in before:  # written out here: the block of each parameter from its diffusers path
        m = re.match(r"(single_transformer_blocks|transformer_blocks)\.(\d+)\.", key)
        slot = "other" if m is None else f"{'S' if m[1].startswith('single') else first}{int(m[2]):02d}"
        squares[slot] = squares.get(slot, 0.0) + float(((after[key] - before[key]) ** 2).sum())
    theirs = {slot: s ** 0.5 for slot, s in squares.items() if s > 0}
    ours = block_norms(adapter)
    assert ours.keys() == theirs.keys() and len(ours) >= 3
    assert list(ours) == sorted(ours, key=lambda s: (s == "other", s[0] == "S", s))  # model order
    for slot in theirs:
        assert ours[slot] == pytest.approx(theirs[slot], rel=1e-4), slot
    plot = tmp_path / "chart.png"
    assert main(["inspect", str(path), "--json", "--no-hash", "--plot", str(plot)]) == 0
    assert json.loads(capsys.readouterr().out)["block_norms"].keys() == ours.keys() and plot.stat().st_size > 0


def test_a_dora_file_says_why_it_has_no_bars(tmp_path, capsys):
    """A DoRA module's change depends on the base weights: no bar, and the chart and the JSON say so."""
    import json

    from safetensors.torch import save_file

    from adapterhub.cli import main

    g = torch.Generator().manual_seed(0)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{name}.lora_down.weight": torch.randn(2, 32, generator=g),
               f"{name}.lora_up.weight": torch.randn(32, 2, generator=g), f"{name}.alpha": torch.tensor(2.0),
               f"{name}.dora_scale": torch.rand(32, 1, generator=g) + 0.5}, str(tmp_path / "dora.safetensors"))
    plot = tmp_path / "chart.png"
    assert main(["inspect", str(tmp_path / "dora.safetensors"), "--json", "--no-hash", "--plot", str(plot)]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["block_norms"] == {} and facts["not_drawn"] == 1 and plot.is_file()
