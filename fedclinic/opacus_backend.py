"""Opacus, imported in one place, on first use, without its side effect on logging.

``opacus.utils.module_utils`` calls ``logging.basicConfig`` when imported, which gives the root
logger a stderr handler: every line of Flower's own logger (which propagates to the root) then
appears twice in every node, ClientApp, ServerApp and site-worker log. Importing Opacus here,
and removing any root handler the import added, keeps the logs as Flower writes them.
Everything that needs Opacus takes it from this module (docs/privacy.md) as
``opacus_backend.<name>`` at call time: Opacus is imported when a run first uses DP (about
0.8 s of CPU and 50 MB that every site worker, ServerApp and CLI process paid before,
with or without DP), through the module ``__getattr__`` of PEP 562.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names as mypy sees them; at run time __getattr__ imports them
    from opacus import GradSampleModule
    from opacus.accountants import RDPAccountant
    from opacus.accountants.utils import get_noise_multiplier
    from opacus.data_loader import DPDataLoader
    from opacus.optimizers import DPOptimizer
    from opacus.validators import ModuleValidator

#: name -> the Opacus module that defines it
_WHERE = {
    "GradSampleModule": "opacus",
    "RDPAccountant": "opacus.accountants",
    "get_noise_multiplier": "opacus.accountants.utils",
    "DPDataLoader": "opacus.data_loader",
    "DPOptimizer": "opacus.optimizers",
    "ModuleValidator": "opacus.validators",
}


def _import_quietly(module: str) -> Any:
    """``importlib.import_module`` with the root logger's handlers as they were before."""
    root = logging.getLogger()
    before = list(root.handlers)
    try:
        return importlib.import_module(module)
    finally:
        for handler in list(root.handlers):
            if handler not in before:
                root.removeHandler(handler)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_import_quietly(_WHERE[name]), name)
    globals()[name] = value  # imported once
    return value


__all__ = [
    "DPDataLoader",
    "DPOptimizer",
    "GradSampleModule",
    "ModuleValidator",
    "RDPAccountant",
    "get_noise_multiplier",
]
