"""The plugin contract: built-ins come through the entry points; a third-party package plugs in the same way."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adapterhub.plugins import adapter_types

HERE = Path(__file__).parent
ADAPTERHUB = [sys.executable, "-m", "adapterhub"]


def test_builtin_types_come_from_the_entry_points():
    types = adapter_types()
    for name in ("lora", "locon", "loha", "lokr", "adalora"):
        assert name in types
        assert types[name].source.builtin
        assert types[name].source.distribution == "adapterhub"
        assert types[name].source.module.startswith("adapterhub_plugins.")


def test_every_builtin_plugin_is_registered_through_its_entry_point():
    from adapterhub.plugins import captioners, manager, sampler_backends

    names = {ep.name for _, dist in manager().list_plugin_distinfo()
             for ep in dist.entry_points if ep.group == "adapterhub"}
    assert {"lora", "textual_inversion", "hypernetwork", "controlnet", "t2i_adapter", "captioners",
            "catalog", "backends"} <= names
    types = adapter_types()
    assert {"textual_inversion", "hypernetwork", "controlnet", "t2i_adapter"} <= set(types)
    assert {"clip-tags", "caption"} <= set(captioners())
    assert {"eager", "compiled"} <= set(sampler_backends())
    assert manager().get_plugin("catalog") is not None


def test_plugins_cli_json_lists_capabilities_and_origin():
    out = subprocess.run(ADAPTERHUB + ["plugins", "--json"], capture_output=True, text=True, check=True)
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert rows["lora"]["builtin"] and "merge" in rows["lora"]["capabilities"]
    assert "kohya" in rows["lora"]["formats"]
    assert rows["oft"]["capabilities"] == ["inspect"]


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory):
    """pip-install the example third-party distribution into a private target folder."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(HERE / "thirdparty_plugin")], check=True,
                   capture_output=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]))
    return env


def test_third_party_type_is_listed_with_its_distribution(installed_plugin):
    out = subprocess.run(ADAPTERHUB + ["plugins", "--json"], capture_output=True, text=True, check=True,
                         env=installed_plugin)
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert rows["scale-diff"]["distribution"] == "adapterhub-example-plugin"
    assert not rows["scale-diff"]["builtin"]
    assert rows["scale-diff"]["module"] == "adapterhub_example_plugin"
    assert rows["residual-shift"]["distribution"] == "adapterhub-example-plugin"  # a non-weight type (test_contract)
    assert "attach" in rows["residual-shift"]["capabilities"]


USE = r"""
import sys, torch
from diffusers import UNet2DConditionModel
import adapterhub
from adapterhub.plugins import adapter_type
torch.manual_seed(0)
unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=32, sample_size=16)
model = {"unet": unet}
path = adapter_type("scale-diff").example(model, sys.argv[1], seed=3)
adapter = adapterhub.load(path)
before = unet.conv_in.weight.detach().clone()
handle = adapter.attach(model, 0.25)
diff = adapter.patches["unet.conv_in"].tensors["diff"]
assert torch.equal(unet.conv_in.weight, (before + 0.25 * diff).to(before.dtype))
handle.detach()
assert torch.equal(unet.conv_in.weight, before)
print("used", adapter.type)
"""


def test_third_party_type_is_used_by_inspect_and_the_weight_engine(installed_plugin, tmp_path):
    file = tmp_path / "thing.safetensors"
    out = subprocess.run([sys.executable, "-c", USE, str(file)], capture_output=True, text=True,
                         env=installed_plugin)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "used scale-diff" in out.stdout
    facts = subprocess.run(ADAPTERHUB + ["inspect", str(file), "--json"], capture_output=True, text=True,
                           check=True, env=installed_plugin)
    data = json.loads(facts.stdout)
    assert data["type"] == "scale-diff" and data["format"] == "scale-diff" and data["targets"] == 1
