"""The sampler-backend contract (hook ``adapterhub_sampler_backends``): core, below the plugins that register
backends; the sampling service (:mod:`adapterhub.sample`) calls them.

A backend turns a pipeline's UNet into the function the sampling loop calls at every step. The
generator owns everything else (prompt encoding, schedulers, noise, adapter stacks, decoding), so a
backend is small::

    class MyBackend(SamplerBackend):
        name = "mine"
        description = "..."

        def prepare(self, pipe) -> Runner:      # once per generator
            return MyRunner(pipe)

A :class:`Runner` predicts noise (``__call__``), may refuse a stack it cannot run (``check_stack``,
before anything changes), reports counters (``stats``) and undoes its changes to the pipeline
(``close``). Adapter stacks are applied by the
generator through :mod:`adapterhub.stack`, which for weight deltas rewrites the UNet's parameters in
place through the one weight engine: a runner that keeps references to those parameters (a compiled
graph, CUDA graphs) sees every switch without rebuilding anything.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from adapterhub.errors import AdapterhubError

if TYPE_CHECKING:  # annotations only: registering and listing backends (``adapterhub plugins``) needs no torch
    import torch


class Runner:
    """Noise prediction for one pipeline. The default runs the UNet as it is (eager)."""

    def __init__(self, pipe):
        self.pipe = pipe

    def __call__(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                 added_cond_kwargs: dict | None = None) -> torch.Tensor:
        return self.pipe.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                              added_cond_kwargs=added_cond_kwargs, return_dict=False)[0]

    def check_stack(self, stack) -> None:
        """Raise :class:`AdapterhubError` if this runner cannot sample with ``stack`` applied."""

    def stats(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        """Undo what ``prepare`` changed on the pipeline (processors, memory format); weights are the stack's."""


class SamplerBackend:
    """Base class of a registered backend: a unique ``name`` and ``prepare(pipe) -> Runner``."""

    name: str = ""
    description: str = ""

    def prepare(self, pipe) -> Runner:
        return Runner(pipe)


def backend(name: str) -> SamplerBackend:
    """The registered backend called ``name``; one line listing the registered ones otherwise."""
    from adapterhub.plugins import sampler_backends

    found = sampler_backends()
    if name not in found:
        known = ", ".join(found) or "none (is adapterhub installed with its entry points?)"
        raise AdapterhubError(f"unknown sampler backend {name!r}; registered: {known}")
    return found[name]
