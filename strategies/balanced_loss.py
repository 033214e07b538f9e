"""Balanced softmax: the local loss for hospitals whose label mixes differ (``<algo>.local-loss``).

Why: trained with plain cross-entropy, a model learns its hospital's label prior in its
biases. Under label skew that prior differs from hospital to hospital (95 % pneumonia at one,
88 % normal at another), so the global model of an average, or a model distilled from another
hospital's, carries a prior that fits no hospital, and its operating point lands on one class
at the hospitals whose mix differs most (balanced accuracy 0.5 with a high AUC: the ranking is
fine, the threshold is not). Balanced softmax (Ren et al., arXiv 2007.10740; the logit
adjustment of Menon et al., arXiv 2007.07314, section 4, with tau = 1) trains on
``CE(z + log pi, y)`` with ``pi`` the hospital's own training class frequencies. The raw logits
``z`` then estimate class scores free of the local prior (for an ideal model ``z_c = log
p(x | c)`` up to a constant), so

- the argmax of ``z`` is the decision that minimises the balanced error, the metric models are
  selected and reported on;
- hospitals with different label mixes fit the same target, so averaging their models or
  distilling between them no longer mixes label priors (FedLC's calibration, Zhang et al.,
  arXiv 2209.00189, section 4).

Fed-MAS uses it as its local loss (``fedmas.local-loss = "bsm"``, the same
:func:`~strategies.fedmas_math.class_log_prior`). Classification only: a segmentation run
keeps its task loss (Dice + CE). The prior is the hospital's own training split; nothing
leaves the site. Under DP the counts are released once per run through the Gaussian mechanism
and charged to the hospital's ledger (``fedclinic.privacy.release_class_counts``), so that the
loss stays inside the DP guarantee (docs/privacy.md, section 6).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from fedclinic.config import RunConfig, Schema
from fedclinic.tasks import task_of
from strategies.fedmas_math import class_log_prior

LocalLoss = Literal["bsm", "ce"]
#: (logits, labels) -> scalar loss
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def shift_logits(logits: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
    """``z + log pi`` per class; a single binary logit ``z`` (the classes ``[0, z]``) gets
    ``log pi_1 - log pi_0``."""
    log_prior = log_prior.to(logits.device, torch.float32)
    if logits.shape[1] == 1:
        return logits.float() + (log_prior[1] - log_prior[0])
    return logits.float() + log_prior


def uses_prior(run: RunConfig, kind: LocalLoss) -> bool:
    """Whether the ``kind`` loss reads the class counts in this run (bsm, classification)."""
    return kind == "bsm" and run.task == "classification"


def local_loss(run: RunConfig, kind: LocalLoss, class_counts: Sequence[float]) -> Loss:
    """The supervised loss of a hospital's local steps: balanced softmax (``bsm``) with this
    hospital's class counts (under DP its DP release: ``ClientContext.prior_counts``), or the
    task loss as it is (``ce``, and every segmentation run)."""
    task_loss = task_of(run).loss
    if not uses_prior(run, kind):
        return task_loss
    log_prior = class_log_prior(torch.tensor(list(class_counts)))
    return lambda logits, labels: task_loss(shift_logits(logits, log_prior), labels)


class LocalLossOptions(Schema):
    """The options of the baselines that offer the balanced loss as a control (FedAvg,
    local-only): plain cross-entropy by default, as the baselines are usually run."""

    local_loss: LocalLoss = Field(
        "ce", description="supervised local loss: cross-entropy (ce) or balanced softmax (bsm)"
    )


class BalancedLossObjective:
    """Mixin for objectives that train through :meth:`ClientObjective.loss`: the task term uses
    the algorithm's ``local-loss`` option (its options model's default when the run config
    carries no options section)."""

    #: the options model holding ``local_loss`` (its default applies to a bare RunConfig)
    local_loss_options: ClassVar[type[Schema]] = LocalLossOptions
    _local_loss: Loss | None = None

    @property
    def local_loss_kind(self) -> LocalLoss:
        run: RunConfig = self.run  # type: ignore[attr-defined]
        # the algorithm's options model: any with a local_loss field (LocalLossOptions,
        # PFedNetOptions)
        options: Any = run.options.get(run.algorithm) or self.local_loss_options()
        kind: LocalLoss = options.local_loss
        return kind

    @property
    def uses_class_prior(self) -> bool:
        return uses_prior(self.run, self.local_loss_kind)  # type: ignore[attr-defined]

    def loss(
        self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor
    ) -> torch.Tensor:
        if self._local_loss is None:
            run: RunConfig = self.run  # type: ignore[attr-defined]
            kind = self.local_loss_kind
            counts = self.context.prior_counts() if uses_prior(run, kind) else []  # type: ignore[attr-defined]
            self._local_loss = local_loss(run, kind, counts)
        return self._local_loss(logits, labels)
