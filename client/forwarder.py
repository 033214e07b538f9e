"""The ClientApp Flower starts for every message (pyproject's ``clientapp``).

It is :mod:`fedclinic.worker.forwarder`: no torch, it hands the message to the hospital's
site worker over ``<state-dir>/worker.sock`` and returns the reply; without a worker it
answers in this process with the full handler, :mod:`client.app` (the worker runs that
same handler). docs/architecture.md has the process table.
"""

from fedclinic.worker.forwarder import app

__all__ = ["app"]
