"""The plugin manager: hook specs, then every distribution's entry points in the group ``adapterhub``.

The built-in plugins are found through the same entry points (declared in our own
``pyproject.toml``); there is no second registration path.
"""
from __future__ import annotations

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


def registered(hook_name: str) -> dict[str, tuple[object, PluginSource]]:
    """name -> (object, where it came from) for a registration hook, over every plugin.

    Names must be unique: a second plugin registering a taken name is an error, not a silent override.
    """
    caller = getattr(manager().hook, hook_name)
    found: dict[str, tuple[object, PluginSource]] = {}
    for impl in reversed(caller.get_hookimpls()):  # registration order
        for obj in impl.function() or []:
            if obj.name in found:
                raise AdapterhubError(f"plugin {impl.plugin_name}: {hook_name} name {obj.name!r} is already registered")
            found[obj.name] = (obj, plugin_source(impl.plugin))
    return found


@lru_cache(maxsize=1)
def adapter_types() -> dict:
    """name -> AdapterType, over every registered plugin, in registration order."""
    types = {}
    for name, (adapter_type, source) in registered("adapterhub_adapter_types").items():
        adapter_type.source = source
        types[name] = adapter_type
    return types


@lru_cache(maxsize=1)
def prompt_tags() -> dict:
    """tag (lower case) -> (:class:`~adapterhub.types.PromptTag`, the AdapterType declaring it), over every
    registered type. A tag declared by two types, or not a word, is an error naming both plugins."""
    import re

    tags: dict = {}
    for adapter_type in adapter_types().values():
        for tag in adapter_type.prompt_tags:
            key = str(tag.tag).lower()
            where = f"plugin {adapter_type.source.distribution if adapter_type.source else '?'}"
            if not re.fullmatch(r"\w+", key):
                raise AdapterhubError(f"{where}: type {adapter_type.name!r} declares prompt tag {tag.tag!r}, "
                                      "which is not a word (letters, digits, _)")
            if key in tags:
                raise AdapterhubError(f"{where}: type {adapter_type.name!r} declares prompt tag <{key}:…>, already "
                                      f"declared by type {tags[key][1].name!r}")
            tags[key] = (tag, adapter_type)
    return tags


def adapter_type(name: str):
    types = adapter_types()
    if name not in types:
        raise AdapterhubError(f"unknown adapter type {name!r}; registered: {', '.join(types)}")
    return types[name]


def captioners() -> dict:
    return {name: obj for name, (obj, _) in registered("adapterhub_captioners").items()}


def sampler_backends() -> dict:
    return {name: obj for name, (obj, _) in registered("adapterhub_sampler_backends").items()}


def reset() -> None:
    """Forget the cached manager (tests that install a plugin distribution call this)."""
    manager.cache_clear()
    adapter_types.cache_clear()
    prompt_tags.cache_clear()
