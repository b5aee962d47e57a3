"""Make a service module callable as its main function.

``adapterhub.convert`` and ``adapterhub.train`` are public functions and also submodules: once a submodule is
imported, Python sets the package attribute to the module, hiding the function. Such a module calls its
function instead, so ``adapterhub.convert(...)`` works either way.
"""
from __future__ import annotations

import sys
import types


def make_callable(module_name: str, function_name: str) -> None:
    """Calling the module ``module_name`` calls its attribute ``function_name`` (looked up at each call)."""
    module = sys.modules[module_name]
    module.__class__ = type("CallableModule", (types.ModuleType,),
                            {"__call__": lambda self, *args, **kwargs: getattr(self, function_name)(*args, **kwargs),
                             "__doc__": f"{module_name}: calling it calls {module_name}.{function_name}."})
