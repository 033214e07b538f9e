"""FedProx (Li et al., arXiv 1812.06127): FedAvg with a proximal term in the local objective.

Local objective ``f_k(w_k) + (mu/2) * ||w_k - w||^2`` where ``w`` is the global model the
hospital received this round; the sum runs over trainable parameters (not BatchNorm
buffers). The server aggregates exactly as FedAvg. ``fedprox.proximal-mu`` sets mu
(FLamby's Heart benchmark uses 0.01; the Fed-MAS repository defaults to 0.45).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from fedclinic.config import Schema
from fedclinic.serialization import State
from strategies.base import Algorithm, ClientObjective, LocalUpdate
from strategies.fedavg import FedAvgStrategy


class FedProxOptions(Schema):
    proximal_mu: float = Field(0.01, ge=0, description="weight mu of the proximal term")


def proximal_term(model: nn.Module, anchor: dict[str, torch.Tensor], mu: float) -> torch.Tensor:
    """``(mu/2) * sum over trainable parameters of ||p - anchor_p||^2``."""
    squared = [
        (parameter - anchor[name]).pow(2).sum()
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
    ]
    return 0.5 * mu * torch.stack(squared).sum()


class FedProxObjective(ClientObjective):
    """Task loss plus the proximal pull towards the received global model."""

    anchor: dict[str, torch.Tensor]

    def fit(self, received: State) -> LocalUpdate:
        device = self.context.device
        self.anchor = {k: v.detach().to(device) for k, v in received.items()}
        return super().fit(received)

    def regularizer(self, model: nn.Module) -> torch.Tensor | None:
        """The proximal pull: it reads no data, so under DP-SGD it is added unclipped and
        noise-free (docs/privacy.md)."""
        mu = self.run.algorithm_options().proximal_mu
        return proximal_term(model, self.anchor, mu)


ALGORITHM = Algorithm(
    name="fedprox",
    strategy=FedAvgStrategy,
    objective=FedProxObjective,
    options=FedProxOptions,
    description="FedProx: FedAvg with a proximal term (mu/2)||w_k - w||^2 in the local loss",
    tasks=("classification", "segmentation"),
)
