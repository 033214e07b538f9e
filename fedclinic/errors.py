"""Errors that reach an operator: one line that names the thing and what is expected."""

from __future__ import annotations

import signal
import time

#: what numpy and torch suggest when a file holds pickled objects: never advice for a
#: hospital (unpickling an untrusted file runs arbitrary code)
_UNPICKLE_HINTS = ("allow_pickle", "weights_only", "Weights only load failed")
NO_PICKLE = (
    "it holds pickled Python objects, which are never loaded (unpickling a file can run "
    "arbitrary code); expected plain arrays or tensors: rebuild it with fedclinic"
)


def file_problem(err: BaseException) -> str:
    """The first line of a numpy/torch load error, without advice to unpickle the file."""
    text = str(err).strip()
    if any(hint in text for hint in _UNPICKLE_HINTS):
        return NO_PICKLE
    return text.splitlines()[0] if text else type(err).__name__


class FedClinicError(Exception):
    """Base class: the message is shown to the operator as it is, on one line."""


class ConfigError(FedClinicError):
    """A run or hospital config key or value is wrong."""


class DataError(FedClinicError):
    """A hospital's data is missing, unreadable or does not match the run's task.

    The message names the file (for the site's log). ``shared``, when given, is the same
    problem told with a site-local reference instead (``image 1841 of class 'pneumonia'``):
    what the hospital sends to the coordinator (:mod:`fedclinic.redact`).
    """

    def __init__(self, message: str, shared: str | None = None) -> None:
        super().__init__(message)
        self.shared = shared


class IntegrityError(FedClinicError):
    """A shared artefact (logits file, prior, checkpoint) does not match its recorded hash."""


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM arrived; processes are being stopped. ``signum`` says which.

    A BaseException: it must unwind through every ``except Exception`` to the cleanup.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.at = time.monotonic()  # when it arrived: what is left of a stop's time budget
