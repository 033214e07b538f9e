"""The ClientApp a ``flwr-clientapp`` process runs (pyproject's ``clientapp``).

Where a hospital's site worker takes the node's tasks itself (the default), Flower starts
this only for the first message of a FAB the worker has not seen, for a FAB with other code,
and without a worker (``--no-worker``: one process per message). It is
:mod:`fedclinic.worker.forwarder`: no torch, it hands the message to the site worker over
``<state-dir>/worker.sock`` and returns the reply; without a worker (or one running other
code) it answers in this process with the full handler, :mod:`client.app` (the worker runs
that same handler). docs/architecture.md has the process table.
"""

from fedclinic.worker.forwarder import app

__all__ = ["app"]
