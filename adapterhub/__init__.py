"""adapterhub: inspect, merge, attach, stack, train and sample Stable Diffusion adapters.

The public Python API::

    import adapterhub
    adapter = adapterhub.load("style.safetensors")
    facts = adapterhub.inspect("style.safetensors")
    adapter.merge_into(pipe, 0.8)                  # for good
    handle = adapter.attach(pipe, 0.8)             # reversible
    handle.set_weight(0.5); handle.detach()        # detach restores every tensor bit for bit
"""
from adapterhub.api import identify, inspect, load
from adapterhub.errors import AdapterError, AdapterhubError
from adapterhub.types import Adapter, AdapterType, Handle, Patch, Sniff

__version__ = "0.1.0"
__all__ = ["identify", "inspect", "load", "Adapter", "AdapterType", "Handle", "Patch", "Sniff",
           "AdapterError", "AdapterhubError", "__version__"]
