"""Model and run settings shared by the plain ServerApp and ClientApp.

The models are fedclinic's (``fedclinic.models.build_model``) so both apps move and train
the same bytes; ``resnet101`` (torchvision, about 170 MB of float32 weights) is the 100+ MB
transfer point, which fedclinic's model registry has no entry for.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from fedclinic.config import RunConfig, validate_schema

#: run-config keys handed to fedclinic's RunConfig (the rest stay with this app)
RUN_KEYS = ("num-classes", "in-channels", "image-size", "data-source", "local-steps",
            "batch-size", "optimizer", "learning-rate", "seed")  # fmt: skip
EXTRA_MODELS = ("resnet101",)


def run_config(flat: Mapping[str, Any]) -> RunConfig:
    """fedclinic's RunConfig for data loading and training (model kept registry-valid)."""
    core = {key: flat[key] for key in RUN_KEYS if key in flat}
    model = str(flat.get("model", "cnn"))
    core["model"] = "resnet18" if model in EXTRA_MODELS else model
    run: RunConfig = validate_schema(RunConfig, core, "plain app run config")
    return run


def build(flat: Mapping[str, Any], seed: int | None = None) -> nn.Module:
    """The run's model: fedclinic's registry, or a torchvision ResNet-101 for 100+ MB."""
    import torch

    model = str(flat.get("model", "cnn"))
    run = run_config(flat)
    if model == "resnet101":
        from torchvision.models import resnet101

        if seed is not None:
            torch.manual_seed(seed)
        net = resnet101(weights=None, num_classes=run.num_classes)
        net.conv1 = nn.Conv2d(run.in_channels, 64, 7, stride=2, padding=3, bias=False)
        return net
    from fedclinic.models import build_model

    return build_model(run, seed=seed)
