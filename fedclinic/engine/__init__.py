"""The round engine (servers) apart from the algorithms (strategies).

- :mod:`~fedclinic.engine.algorithm`: what an algorithm's server half declares
  (:class:`ServerAlgorithm`, :class:`Exchange`) and what it is handed (:class:`Reply`,
  :class:`Hospital`);
- :mod:`~fedclinic.engine.exchange`: sending, polling, retries, deadlines, asking again;
- :mod:`~fedclinic.engine.acceptance`: which replies count, and why the others do not;
- :mod:`~fedclinic.engine.records`: evaluate/train rows, model selection, the summary;
- :mod:`~fedclinic.engine.rounds`: :class:`RoundEngine`, one run from setup to summary;
- :mod:`~fedclinic.engine.secagg`: secure aggregation (SecAgg+) around a FedAvg-like
  algorithm, as four exchanges per round.

docs/architecture.md shows how the pieces fit.
"""

from fedclinic.engine.acceptance import Acceptance
from fedclinic.engine.algorithm import (
    FINAL_EVALUATION,
    QUERY,
    TRAIN,
    Exchange,
    Hospital,
    Reply,
    ServerAlgorithm,
    replies_to_numpy,
)
from fedclinic.engine.exchange import Clock, GridLike, ResendPolicy
from fedclinic.engine.rounds import RoundEngine, RunResult

__all__ = [
    "FINAL_EVALUATION",
    "QUERY",
    "TRAIN",
    "Acceptance",
    "Clock",
    "Exchange",
    "GridLike",
    "Hospital",
    "Reply",
    "ResendPolicy",
    "RoundEngine",
    "RunResult",
    "ServerAlgorithm",
    "replies_to_numpy",
]
