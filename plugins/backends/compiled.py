"""``compiled``: ``torch.compile`` of the UNet, with adapter stacks switched without recompiling.

The UNet is compiled once. Weight-delta adapters (LoRA, LoCon, LoHa, LoKr ...) reach it only through
the weight engine, which rewrites the parameters it already holds in place (``copy_``): a compiled
graph takes the parameters as inputs, so a switch is a memory write, never a recompile. Textual
inversions change only the text encoder, which is not compiled. Adapters that change the UNet's code
(hypernetworks, ControlNet, T2I) are refused: use the eager backend for those.

On CUDA, ``ADAPTERHUB_COMPILE_MODE=reduce-overhead`` adds CUDA graphs (the parameters keep their
addresses, so the graphs stay valid across switches as well).
"""
from __future__ import annotations

import os
from typing import Any

import torch

from adapterhub.errors import AdapterhubError
from adapterhub.sample.backend import Runner, SamplerBackend

UNET_UNTOUCHED = ("textual_inversion",)  # non-weight types that leave the UNet alone


class CompiledRunner(Runner):
    def __init__(self, pipe, mode: str | None = None, backend: str = "inductor"):
        super().__init__(pipe)
        self.mode = mode
        self.compiled = torch.compile(pipe.unet, mode=mode, backend=backend, dynamic=False)
        self.backend = backend
        self.calls = 0

    def __call__(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None):
        self.calls += 1
        if not isinstance(timestep, torch.Tensor):
            timestep = torch.tensor(timestep, device=sample.device)
        return self.compiled(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                             added_cond_kwargs=added_cond_kwargs, return_dict=False)[0]

    def check_stack(self, stack) -> None:
        for entry in stack.entries:
            adapter = entry.adapter
            if adapter is None or adapter.plugin.weight_space or adapter.type in UNET_UNTOUCHED:
                continue
            raise AdapterhubError(f"{entry.label}: a {adapter.type} changes the UNet's code, not its weights; the "
                                  "compiled backend cannot switch it in place (use --backend eager)")

    def stats(self) -> dict[str, Any]:
        from torch._dynamo.utils import counters

        return {"calls": self.calls, "frames_compiled": int(counters["stats"].get("unique_graphs", 0)),
                "recompiles": sum(counters["recompiles"].values()) if "recompiles" in counters else 0}


class CompiledBackend(SamplerBackend):
    name = "compiled"
    description = "torch.compile of the UNet; stacks of weight deltas switched in place, no recompiles"

    def prepare(self, pipe) -> Runner:
        return CompiledRunner(pipe, mode=os.environ.get("ADAPTERHUB_COMPILE_MODE") or None,
                              backend=os.environ.get("ADAPTERHUB_COMPILE_BACKEND") or "inductor")
