"""The site worker: one long-lived process per hospital that answers every Flower message.

Why: Flower 1.39's SuperNode starts a fresh ``flwr-clientapp`` process for every message,
and ours would import torch, torchvision and MONAI, re-read the hospital's data and create
a CUDA context each time. The worker does that once, and takes the messages straight from
its node's Runtime API (:mod:`fedclinic.worker.executor`; the node runs with ``--isolation
process``); a run whose code is not the worker's is answered by the run's own ClientApp in a
child process (:mod:`fedclinic.worker.fab_app`). On a node started with Flower's own
executor (``flwr-clientapp`` per message, without fedclinic's launcher) the worker serves a
Unix socket in the hospital's state dir instead, and the thin forwarder ClientApp
(:mod:`fedclinic.worker.forwarder`, no torch) hands it each message or answers in process.

Modules: :mod:`~fedclinic.worker.protocol` (the socket protocol, torch-free),
:mod:`~fedclinic.worker.forwarder` (the ClientApp), :mod:`~fedclinic.worker.executor` (the
node's tasks), :mod:`~fedclinic.worker.fab_app` (a run's own code),
:mod:`~fedclinic.worker.server` (the worker process: ``python -m fedclinic.worker --config
hospital.toml --runtime-api-address 127.0.0.1:9094``).
"""
