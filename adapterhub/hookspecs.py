"""The adapterhub plugin contract.

Every feature that varies by adapter type, captioner, sampler backend or catalog enrichment is
provided through these hooks. The built-in plugins (the package ``adapterhub_plugins``) are registered
through the entry-point group ``adapterhub`` exactly like a third-party distribution's plugins.

Docstring template: a one-line summary; when the hook is called; ``:param:`` lines; what the result
means. Registration hooks return lists and are collected from every plugin (never ``firstresult``);
selection among the registered objects is done by the core (for adapter types: the highest
``sniff`` score wins).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover - types only
    from adapterhub.types import AdapterFile, AdapterType

PROJECT = "adapterhub"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --------------------------------------------------------------------------------------------
# Adapter types
# --------------------------------------------------------------------------------------------
@hookspec
def adapterhub_adapter_types() -> list[AdapterType]:
    """Return the adapter types this plugin provides.

    Called once when the plugin manager is built. Each object subclasses
    :class:`adapterhub.types.AdapterType` (a name, its capabilities, ``sniff``, ``parse``, ``save``
    and, for types that are not weight deltas, ``attach``). Names must be unique across all plugins.
    A type that is no weight delta declares how it reaches the UNet (``unet_runtime``: untouched, residuals
    or attention contexts; :mod:`adapterhub.types`) if a compiling backend is to run it; backends read only
    that declaration, never the type's name. The services likewise read the type's other declarations
    (``convert_targets``, ``reads_back_as``, ``infotext_fields``, ``prompt_tokens``, ``extra_network``): a
    third-party type is converted, written into infotexts and listed by the server as a built-in one is.
    """


# --------------------------------------------------------------------------------------------
# Dataset preparation
# --------------------------------------------------------------------------------------------
@hookspec
def adapterhub_captioners() -> list[Any]:
    """Return the captioners this plugin provides.

    Called when a dataset command needs a captioner. Each object has a unique ``name`` and a
    ``caption(images, options) -> list[str | list[str]]`` method; see ``adapterhub.dataset``.
    """


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------
@hookspec
def adapterhub_sampler_backends() -> list[Any]:
    """Return the sampling backends this plugin provides (eager, compiled, a vendor's compiler).

    Called when a generator is built. Each is an ``adapterhub.backends.SamplerBackend`` with a unique ``name``.
    """


# --------------------------------------------------------------------------------------------
# Catalog
# --------------------------------------------------------------------------------------------
@hookspec
def adapterhub_enrich_catalog_entry(entry: dict, file: AdapterFile) -> None:
    """Add fields to a catalog entry (trigger words, previews, sidecar facts) in place.

    Called for every file the catalog identifies, after the adapter type filled the standard
    fields. Implementations must only read ``file`` (its header, metadata and sidecars).

    :param entry: the dict that becomes the catalog row; add or update keys. It also carries
        ``sidecars`` (the files beside the adapter that the scan found), ``warnings`` (append
        messages) and ``skip``.
    :param file: the opened adapter file.
    """
