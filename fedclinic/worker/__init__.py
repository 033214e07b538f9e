"""The site worker: one long-lived process per hospital that answers every Flower message.

Why: Flower 1.39's SuperNode starts a fresh ``flwr-clientapp`` process for every message,
and ours would import torch, torchvision and MONAI, re-read the hospital's data and create
a CUDA context each time. The worker does that once; the ClientApp becomes a thin
forwarder (:mod:`fedclinic.worker.forwarder`, no torch) that hands each message to the
worker over a Unix socket in the hospital's state dir and returns its reply.

Modules: :mod:`~fedclinic.worker.protocol` (the socket protocol, torch-free),
:mod:`~fedclinic.worker.forwarder` (the ClientApp), :mod:`~fedclinic.worker.server` (the
worker process: ``python -m fedclinic.worker --config hospital.toml``).
"""
