"""Errors that reach an operator: one line that names the thing and what is expected."""

from __future__ import annotations


class FedClinicError(Exception):
    """Base class: the message is shown to the operator as it is, on one line."""


class ConfigError(FedClinicError):
    """A run or hospital config key or value is wrong."""


class DataError(FedClinicError):
    """A hospital's data is missing, unreadable or does not match the run's task."""


class IntegrityError(FedClinicError):
    """A shared artefact (logits file, prior, checkpoint) does not match its recorded hash."""
