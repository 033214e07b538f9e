"""The site worker: one long-lived process per hospital that answers every Flower message.

Why: Flower 1.39's SuperNode starts a fresh ``flwr-clientapp`` process for every message,
and ours would import torch, torchvision and MONAI, re-read the hospital's data and create
a CUDA context each time. The worker does that once, and takes the messages straight from
its node's Runtime API (:mod:`fedclinic.worker.executor`; the node runs with ``--isolation
process``). Where it does not answer a message itself (a FAB it has not seen yet, a FAB with
other code), Flower's ``flwr-clientapp`` runs the thin forwarder ClientApp
(:mod:`fedclinic.worker.forwarder`, no torch), which hands the message to the worker over a
Unix socket in the hospital's state dir or answers it in process.

Modules: :mod:`~fedclinic.worker.protocol` (the socket protocol, torch-free),
:mod:`~fedclinic.worker.forwarder` (the ClientApp), :mod:`~fedclinic.worker.executor` (the
node's tasks), :mod:`~fedclinic.worker.server` (the worker process: ``python -m
fedclinic.worker --config hospital.toml --runtime-api-address 127.0.0.1:9094``).
"""
