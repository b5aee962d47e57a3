"""adapterhub: inspect, merge, attach, stack, train and sample Stable Diffusion adapters.

The public Python API::

    import adapterhub
    adapter = adapterhub.load("style.safetensors")
    facts = adapterhub.inspect("style.safetensors")
    adapter.merge_into(pipe, 0.8)                  # for good
    handle = adapter.attach(pipe, 0.8)             # reversible
    handle.set_weight(0.5); handle.detach()        # detach restores every tensor bit for bit

Names are imported on first use, so ``import adapterhub`` (and ``adapterhub --help``) stays fast.
"""
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "identify": "adapterhub.api", "inspect": "adapterhub.api", "load": "adapterhub.api",
    "Adapter": "adapterhub.types", "AdapterType": "adapterhub.types", "Handle": "adapterhub.types",
    "Patch": "adapterhub.types", "Sniff": "adapterhub.types",
    "AdapterError": "adapterhub.errors", "AdapterhubError": "adapterhub.errors",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'adapterhub' has no attribute {name!r}")
