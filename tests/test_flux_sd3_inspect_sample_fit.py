"""``adapterhub sample`` refuses a stack or ``<lora:>`` tag that cannot fit its base before the base loads (#21).

As ``merge`` does (tests/test_flux_sd3_fit.py): the adapter's family and hidden width against the base's files;
one line naming the file, exit 2, nothing written, and ``load_base`` is a tripwire. A fitting adapter passes
the check (the tripwire then fires: the check let it through to the loading).
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from flux_helpers import cli as _cli


class BaseLoaded(Exception):
    pass


@pytest.fixture
def no_base_loading(monkeypatch):
    import adapterhub.base
    import adapterhub.transformer_bases

    def tripwire(*args, **kwargs):
        raise BaseLoaded(str(args))

    monkeypatch.setattr(adapterhub.base, "load_base", tripwire)
    monkeypatch.setattr(adapterhub.transformer_bases, "build_transformer_base", tripwire)


def _lora(path, modules):
    sd = {}
    for name, (out_f, in_f) in modules.items():
        sd[name + ".lora_A.weight"], sd[name + ".lora_B.weight"] = torch.zeros(1, in_f), torch.zeros(out_f, 1)
    save_file(sd, str(path))
    return path


TINY_SD3 = {"transformer.transformer_blocks.0.attn.to_q": (48, 48)}
TINY_FLUX = {"transformer.single_transformer_blocks.0.attn.to_q": (32, 32)}
FLUX_DEV = {"transformer.time_text_embed.guidance_embedder.linear_1": (3072, 256)}

# (modules, base, how the adapter is given, words the line must hold)
REFUSED = [
    (TINY_SD3, "tiny-flux", "tag", ["sd3 adapter", "tiny-flux is a flux model"]),
    (TINY_SD3, "tiny-flux", "stack", ["sd3 adapter", "tiny-flux is a flux model"]),
    (FLUX_DEV, "tiny-flux", "tag", ["hidden width 3072", "hidden width 32"]),
    (TINY_FLUX, "tiny-sd1", "stack", ["flux adapter", "tiny-sd1 is a Stable Diffusion model"]),
    (TINY_FLUX, "tiny-sd3", "prompts", ["flux adapter", "tiny-sd3 is an sd3 model"]),
]


def _argv(tmp_path, base, given):
    lib = tmp_path / "lib"
    argv = ["sample", "--base", base, "--adapter-dir", str(lib), "--steps", "1", "--seed", "1",
            "--size", "64x64", "--out", str(tmp_path / "out")]
    if given == "tag":
        return argv + ["--prompt", "a castle <lora:style:0.8>"]
    if given == "stack":
        return argv + ["--prompt", "a castle", "--stack", "style:0.8"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a castle\na tower <lora:style:0.5>\n")
    return argv + ["--prompts", str(prompts)]


@pytest.mark.parametrize("modules,base,given,words", REFUSED)
def test_sample_refuses_a_misfit_before_loading_the_base(tmp_path, capsys, no_base_loading, modules, base, given,
                                                          words):
    (tmp_path / "lib").mkdir()
    path = _lora(tmp_path / "lib" / "style.safetensors", modules)
    rc, _, err = _cli(capsys, *_argv(tmp_path, base, given))
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert str(path) in errors[0] and all(w in errors[0] for w in words), errors[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("modules,base", [(TINY_FLUX, "tiny-flux"), (TINY_SD3, "tiny-sd3")])
def test_a_fitting_adapter_passes_the_check(tmp_path, no_base_loading, modules, base):
    from adapterhub.sample.jobs import SampleOptions, SampleRun, plan_run

    (tmp_path / "lib").mkdir()
    _lora(tmp_path / "lib" / "style.safetensors", modules)
    plan = plan_run(SampleOptions(base=base, out=str(tmp_path / "out"), prompt="a castle <lora:style:1>",
                                  adapter_dirs=(str(tmp_path / "lib"),), steps=1))
    with pytest.raises(BaseLoaded):
        SampleRun(plan).load()
