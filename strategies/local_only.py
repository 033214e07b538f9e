"""Local-only baseline: every hospital trains alone; the bar every federated result must beat.

Each hospital keeps its own model in its site state (``local_model.pt``) across rounds and
restarts, starting from the common initial model the coordinator sends in round 1 (so all
hospitals start from identical weights). Nothing is aggregated; hospitals upload nothing but
metrics and the hash of their model. One "round" is one more ``local-epochs`` of training,
so local-only and the federated algorithms get the same local compute budget.
"""

from __future__ import annotations

from flwr.app import ArrayRecord
from torch import nn

from fedclinic.engine import TRAIN, Exchange, Reply, ServerAlgorithm
from fedclinic.serialization import State
from strategies.balanced_loss import BalancedLossObjective, LocalLossOptions
from strategies.base import Algorithm, ClientObjective, LocalUpdate

LOCAL_MODEL = "local_model"


class LocalOnlyStrategy(ServerAlgorithm):
    """Keeps the initial model: there is no global model to aggregate or save."""

    has_global_model = False
    secure_aggregation_refusal = "local-only uploads no model: there is nothing to aggregate"
    #: hospitals upload no weights (their models stay at the site): nothing to compare
    checks_update_layout = False
    checks_update_norms = False

    def aggregate(
        self, server_round: int, replies: list[Reply], exchange: Exchange = TRAIN
    ) -> ArrayRecord | None:
        return None


class LocalOnlyObjective(BalancedLossObjective, ClientObjective):
    """Trains and evaluates the hospital's own persistent model."""

    deployed_kind = "local"

    def starting_state(self, received: State) -> State:
        site = self.context.site
        return site.load(LOCAL_MODEL) if site.has(LOCAL_MODEL) else received

    def deployed_model(self, received: State) -> nn.Module:
        self.deploy_from_site(LOCAL_MODEL)
        return self.build(self.starting_state(received))

    def fit(self, received: State) -> LocalUpdate:
        update = super().fit(self.starting_state(received))
        saved = self.context.site.save(LOCAL_MODEL, update.state)
        update.info["model_sha256"] = saved["sha256"]
        update.state = {}  # the model never leaves the site
        return update


ALGORITHM = Algorithm(
    name="local-only",
    strategy=LocalOnlyStrategy,
    objective=LocalOnlyObjective,
    options=LocalLossOptions,
    description="Local-only: each hospital trains alone on its own data",
    tasks=("classification", "segmentation"),
)
