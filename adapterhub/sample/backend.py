"""The sampler-backend contract as the sampling service names it: :mod:`adapterhub.backends` (core, below the
plugins that register backends) holds :class:`SamplerBackend`, :class:`Runner` and :func:`backend`."""
from __future__ import annotations

from adapterhub.backends import Runner, SamplerBackend, backend

__all__ = ["Runner", "SamplerBackend", "backend"]
