"""Algorithm registry: one module per algorithm, one line here."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedclinic.config import RunConfig, parse_run_config
from fedclinic.errors import ConfigError
from fedclinic.privacy import check_model
from strategies import fedavg, fedhelp, fedmas, fedprox, local_only, pfednet
from strategies.base import Algorithm

REGISTRY: dict[str, Algorithm] = {
    algorithm.name: algorithm
    for algorithm in (
        fedavg.ALGORITHM,
        fedprox.ALGORITHM,
        local_only.ALGORITHM,
        fedmas.ALGORITHM,
        fedhelp.ALGORITHM,
        pfednet.ALGORITHM,
    )
}


def get_algorithm(name: str) -> Algorithm:
    if name not in REGISTRY:
        raise ConfigError(
            f"run config: key 'algorithm' = {name!r} is not allowed: "
            f"expected one of {', '.join(sorted(REGISTRY))}"
        )
    return REGISTRY[name]


def load_run_config(flat: Mapping[str, Any]) -> RunConfig:
    """Validate a flat run config, with every registered algorithm's options section and
    the selected algorithm's own checks (``Algorithm.check``)."""
    run = parse_run_config(flat, {name: a.options for name, a in REGISTRY.items()})
    algorithm = get_algorithm(run.algorithm)
    if run.task not in algorithm.tasks:
        raise ConfigError(
            f"run config: key 'task' = {run.task!r} is not allowed with algorithm = "
            f"{run.algorithm!r}: expected {' or '.join(algorithm.tasks)}"
        )
    refusal = algorithm.strategy.secure_aggregation_refusal
    if run.secure_aggregation and refusal is not None:
        raise ConfigError(
            f"run config: secure-aggregation = true is not allowed with algorithm = "
            f"{run.algorithm!r}: {refusal}"
        )
    algorithm.check(run)
    check_model(run)
    return run


__all__ = ["REGISTRY", "Algorithm", "get_algorithm", "load_run_config"]
