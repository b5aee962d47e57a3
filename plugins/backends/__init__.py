"""The built-in sampler backends: ``eager`` and ``compiled`` (registered like any third-party backend)."""
from __future__ import annotations

from adapterhub.hookspecs import hookimpl


@hookimpl
def adapterhub_sampler_backends():
    from .compiled import CompiledBackend
    from .eager import EagerBackend

    return [EagerBackend(), CompiledBackend()]
