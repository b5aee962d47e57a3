"""The built-in sampler backends: ``eager`` and ``compiled`` (registered like any third-party backend).

Each backend is declared here (name, description); ``compiled``'s runner, which imports torch, lives in
``compiled`` and is imported when a generator prepares it, so that listing backends stays light.
"""
from __future__ import annotations

import os

from adapterhub.hookspecs import hookimpl
from adapterhub.backends import Runner, SamplerBackend


class CompiledBackend(SamplerBackend):
    name = "compiled"
    description = ("torch.compile of the UNet (and diffusers control models); stacks, control images and weights "
                   "switched without recompiling; runs the types that declare how they reach the UNet")

    def prepare(self, pipe) -> Runner:
        from .compiled import CompiledRunner

        return CompiledRunner(pipe, mode=os.environ.get("ADAPTERHUB_COMPILE_MODE") or None,
                              backend=os.environ.get("ADAPTERHUB_COMPILE_BACKEND") or "inductor")


@hookimpl
def adapterhub_sampler_backends():
    from .eager import EagerBackend

    return [EagerBackend(), CompiledBackend()]
