"""The ClientApp a ``flwr-clientapp`` process runs (pyproject's ``clientapp``).

Where fedclinic starts the hospital's node, its site worker takes the node's messages itself
and no ``flwr-clientapp`` runs; this runs without a worker (``--no-worker``: one process per
message, answering in process), on a node started with Flower's own executor beside a site
worker (it hands the message over ``<state-dir>/worker.sock``), and in the child that answers
a run whose code is not the worker's. It is :mod:`fedclinic.worker.forwarder`: no torch; it
hands the message to the site worker and returns the reply, or, without a worker (or with
``FEDCLINIC_WORKER=off``, or a worker running other code), answers in this process with the
full handler, :mod:`client.app`. docs/architecture.md has the process table.
"""

from fedclinic.worker.forwarder import app

__all__ = ["app"]
