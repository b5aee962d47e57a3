"""``eager``: the UNet as it is, one Python call per step; every adapter type works."""
from __future__ import annotations

from adapterhub.backends import Runner, SamplerBackend


class EagerBackend(SamplerBackend):
    name = "eager"
    description = "the UNet as loaded, called step by step (every adapter type)"

    def prepare(self, pipe) -> Runner:
        return Runner(pipe)
