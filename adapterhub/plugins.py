"""The plugin manager: hook specs, then every distribution's entry points in the group ``adapterhub``.

The built-in plugins are found through the same entry points (declared in our own
``pyproject.toml``); there is no second registration path.
"""
from __future__ import annotations

import importlib.metadata as md
from dataclasses import dataclass
from functools import lru_cache

import pluggy

from adapterhub import hookspecs
from adapterhub.errors import AdapterhubError


@dataclass(frozen=True)
class PluginSource:
    module: str
    distribution: str
    builtin: bool


@lru_cache(maxsize=1)
def manager() -> pluggy.PluginManager:
    """The process-wide plugin manager (the only global state adapterhub keeps)."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.load_setuptools_entrypoints(hookspecs.PROJECT)
    pm.check_pending()
    return pm


def plugin_source(plugin: object) -> PluginSource:
    """Which installed distribution registered ``plugin``."""
    module = getattr(plugin, "__name__", type(plugin).__module__)
    for plug, dist in manager().list_plugin_distinfo():
        if plug is plugin:
            name = dist.metadata["Name"]
            return PluginSource(module, name, builtin=name == "adapterhub")
    return PluginSource(module, "(registered in code)", builtin=False)


def _collect(hook_results: list[list]) -> list:
    return [obj for result in hook_results for obj in (result or [])]


@lru_cache(maxsize=1)
def adapter_types() -> dict:
    """name -> AdapterType, over every registered plugin, in registration order."""
    pm = manager()
    found: dict = {}
    for impl in reversed(pm.hook.adapterhub_adapter_types.get_hookimpls()):
        for adapter_type in impl.function() or []:
            if adapter_type.name in found:
                raise AdapterhubError(
                    f"plugin {impl.plugin_name}: adapter type {adapter_type.name!r} is already registered")
            adapter_type.source = plugin_source(impl.plugin)
            found[adapter_type.name] = adapter_type
    return found


def adapter_type(name: str):
    types = adapter_types()
    if name not in types:
        raise AdapterhubError(f"unknown adapter type {name!r}; registered: {', '.join(types)}")
    return types[name]


def captioners() -> dict:
    return {c.name: c for c in _collect(manager().hook.adapterhub_captioners())}


def sampler_backends() -> dict:
    return {b.name: b for b in _collect(manager().hook.adapterhub_sampler_backends())}


def reset() -> None:
    """Forget the cached manager (tests that install a plugin distribution call this)."""
    manager.cache_clear()
    adapter_types.cache_clear()
    md.distributions.cache_clear() if hasattr(md.distributions, "cache_clear") else None
