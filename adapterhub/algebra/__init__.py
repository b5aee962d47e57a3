"""LoRA algebra with kohya sd-scripts semantics: combine, resize, extract (the service behind
``adapterhub lora``).

Works on deltas, generically: any weight-space patch (LoRA, LoCon, LoHa, LoKr, full diffs) gives its
float32 delta, so inputs of every type can be combined or resized; the output is a low-rank adapter in the
kohya layout, built through the registry by the type that declares the modules it holds
(:func:`factor_type`: ``AdapterType.factor_modules``, ``from_factors``), never by importing a plugin.

* ``linalg``: the pure math (truncated SVD, kohya's dynamic ranks, PEFT's TIES / DARE);
* ``deltas``: reading patches: target shapes, full deltas, low-rank factors;
* ``provenance``: output metadata and the kohya hashes; atomic writes;
* ``ops``: :func:`combine`, :func:`resize`, :func:`extract` in memory, and the ``*_files`` wrappers.
"""
from __future__ import annotations

from .linalg import DYNAMIC_METHODS, MAJORITY_SIGN_METHODS
from .ops import (METHODS, AlgebraResult, ModuleReport, combine, combine_files, extract, extract_files,
                  factor_type, parse_dynamic, resize, resize_file)

__all__ = ["METHODS", "DYNAMIC_METHODS", "MAJORITY_SIGN_METHODS", "AlgebraResult", "ModuleReport", "combine",
           "combine_files", "resize", "resize_file", "extract", "extract_files", "factor_type", "parse_dynamic"]
