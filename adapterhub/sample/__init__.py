"""Sampling: the generator, A1111 prompt syntax and weighting, sampler names, infotext, grids.

    from adapterhub.sample import Generator
    gen = Generator("tiny-sd1")                      # built once (base, backend)
    result = gen("a (castle:1.2) <lora:style:0.8>", seed=1, steps=20, sampler="DPM++ 2M")

A run of ``adapterhub sample`` (prompt files, X/Y/Z plots, ``--from-png``, the files written) is
:mod:`adapterhub.sample.jobs`: ``plan_run(SampleOptions(...))``, then ``SampleRun(plan)``.

Names are imported on first use (``import adapterhub.sample`` loads no model code).
"""
from importlib import import_module

_EXPORTS = {
    "Generator": "adapterhub.sample.generator", "Request": "adapterhub.sample.request",
    "Result": "adapterhub.sample.request", "parse_prompt_attention": "adapterhub.sample.prompt",
    "PromptEncoder": "adapterhub.sample.conditioning", "resolve_sampler": "adapterhub.sample.samplers",
    "make_scheduler": "adapterhub.sample.samplers", "sampler_names": "adapterhub.sample.samplers",
    "SamplerBackend": "adapterhub.sample.backend", "Runner": "adapterhub.sample.backend",
    "make_grid": "adapterhub.sample.grid",
    "SampleOptions": "adapterhub.sample.jobs", "plan_run": "adapterhub.sample.jobs",
    "SampleRun": "adapterhub.sample.jobs",
    "FlowGenerator": "adapterhub.sample.flow", "FlowRequest": "adapterhub.sample.flow",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'adapterhub.sample' has no attribute {name!r}")
