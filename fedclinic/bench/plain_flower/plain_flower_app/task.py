"""Model and run settings shared by the plain ServerApp and ClientApp.

The models are fedclinic's (``fedclinic.models.build_model``, ``resnet101`` included: about
170 MB of float32 weights, the 100+ MB transfer point), so both apps move and train the same
bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from fedclinic.config import RunConfig, validate_schema

#: run-config keys handed to fedclinic's RunConfig (the rest stay with this app)
RUN_KEYS = ("model", "num-classes", "in-channels", "image-size", "data-source", "local-steps",
            "batch-size", "optimizer", "learning-rate", "seed")  # fmt: skip


def run_config(flat: Mapping[str, Any]) -> RunConfig:
    """fedclinic's RunConfig for the model, data loading and training."""
    core = {key: flat[key] for key in RUN_KEYS if key in flat}
    run: RunConfig = validate_schema(RunConfig, core, "plain app run config")
    return run


def build(flat: Mapping[str, Any], seed: int | None = None) -> nn.Module:
    """The run's model, from fedclinic's registry."""
    from fedclinic.models import build_model

    return build_model(run_config(flat), seed=seed)
