"""Opacus, imported in one place without its side effect on logging.

``opacus.utils.module_utils`` calls ``logging.basicConfig`` when imported, which gives the root
logger a stderr handler: every line of Flower's own logger (which propagates to the root) then
appears twice in every node, ClientApp, ServerApp and site-worker log. Importing Opacus here,
and removing any root handler the import added, keeps the logs as Flower writes them.
Everything that needs Opacus imports it from this module (docs/privacy.md).
"""

from __future__ import annotations

import logging

_ROOT_HANDLERS = list(logging.getLogger().handlers)

from opacus import GradSampleModule  # noqa: E402
from opacus.accountants import RDPAccountant  # noqa: E402
from opacus.accountants.utils import get_noise_multiplier  # noqa: E402
from opacus.data_loader import DPDataLoader  # noqa: E402
from opacus.optimizers import DPOptimizer  # noqa: E402
from opacus.validators import ModuleValidator  # noqa: E402

for _handler in logging.getLogger().handlers:
    if _handler not in _ROOT_HANDLERS:
        logging.getLogger().removeHandler(_handler)

__all__ = [
    "DPDataLoader",
    "DPOptimizer",
    "GradSampleModule",
    "ModuleValidator",
    "RDPAccountant",
    "get_noise_multiplier",
]
