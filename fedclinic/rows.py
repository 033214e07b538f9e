"""Every kind of row a run writes to ``metrics.jsonl`` (and ``metrics.csv``), one schema each.

Rows are flat JSON objects; ``kind`` says which schema a row follows. The coordinator's engine
writes ``evaluate``, ``train``, ``error`` and ``rejected`` rows; algorithms add their own
(``fedhelp-role``, ``fedhelp-aggregate``, ``aggregation`` for Fed-MAS, ``pfednet-graph``,
``pfednet-admm``, ``communication`` for pFedNet's byte counts). Readers (``fedclinic local``'s
progress view, ``fedclinic bench report``) read the JSON and need not import these classes.

Evaluate and train rows carry the hospital's metrics under their own names besides the fixed
fields (``val_*``/``test_*`` metrics; ``train_*`` losses of the algorithm, ``*sha256`` hashes of
models kept at the site): those schemas allow extra keys, the others do not.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict


class Row(BaseModel):
    """One ``metrics.jsonl`` row. ``dump`` drops the :attr:`omitted_when_none` fields that are
    unset, so that a column appears only where it means something."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    omitted_when_none: ClassVar[frozenset[str]] = frozenset()

    round: int
    kind: str

    def dump(self) -> dict[str, Any]:
        data = self.model_dump()
        for key in self.omitted_when_none:
            if data.get(key) is None:
                data.pop(key, None)
        return data


class HospitalRow(Row):
    omitted_when_none = frozenset({"node_id"})
    hospital: str
    #: the hospital's Flower node (none for the pooled baseline of ``fedclinic bench``)
    node_id: int | None = None


class EvaluateRow(HospitalRow):
    """The model the hospital received (``model_round``) scored on its validation and test
    splits; the metrics (``val_*``, ``test_*``, ``num_val``, ``num_test``, ``eval_seconds``)
    are extra keys."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())
    omitted_when_none = frozenset({"node_id", "flags", "deployed_sha256"})
    kind: Literal["evaluate"] = "evaluate"
    model_round: int
    #: which model the hospital evaluated: "global", "local", "personal", "large"
    model: str
    #: why these scores mean little: "predicts-one-class-on-val" / "-on-test" (the model
    #: predicts one class for every sample of a split holding several), "val-split-one-class"
    #: / "test-split-one-class" (the split holds one class); fedclinic.engine.records.
    #: Absent when nothing is flagged.
    flags: list[str] | None = None
    #: SHA-256 of the site file of the model evaluated (local-only, pFedNet's personal,
    #: FedHelp's large models); absent for the coordinator's model
    deployed_sha256: str | None = None


class TrainRow(HospitalRow):
    """A hospital's local update; the algorithm's ``train_*`` metrics and the ``*sha256`` of
    models kept at the site are extra keys."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())
    omitted_when_none = frozenset({"node_id", "phase"})
    kind: Literal["train"] = "train"
    train_loss: float | None
    num_examples: int
    num_train: int | None
    seconds: float | None
    steps: int | None
    device: str | None
    #: where the hospital's data came from and its fingerprint (as the hospital reports them)
    data_source: str | None
    data_fingerprint: str | None
    #: the exchange of a round with several (pFedNet: "shared" or "personal")
    phase: str | None = None


class ErrorRow(HospitalRow):
    """A hospital whose reply failed (``error``) or whose update was refused (``rejected``)."""

    kind: Literal["error", "rejected"]
    reason: str


class FedHelpRoleRow(HospitalRow):
    omitted_when_none = frozenset({"node_id", "num_train"})
    kind: Literal["fedhelp-role"] = "fedhelp-role"
    role: str
    #: "config" (the hospital config's role), "size-rank" or "late-join"
    role_source: str
    num_train: int | None = None


class FedHelpAggregateRow(HospitalRow):
    kind: Literal["fedhelp-aggregate"] = "fedhelp-aggregate"
    role: str
    uploaded: str
    weight: float


class FedMASAggregationRow(HospitalRow):
    kind: Literal["aggregation"] = "aggregation"
    method: str
    rule: str
    rf: float
    weight: float
    fedavg_weight: float
    num_train: int
    w: list[float]
    w_hat: list[float]


class PFedNetGraphRow(Row):
    kind: Literal["pfednet-graph"] = "pfednet-graph"
    sketch: str
    knn_k: int
    hospitals: list[str]
    edges: list[list[str]]
    sketch_bytes: list[int]
    personal_entries: int
    shared_entries: int


class PFedNetAdmmRow(Row):
    kind: Literal["pfednet-admm"] = "pfednet-admm"
    eta: float
    fusion_lambda: float
    objective: float
    fused_edges: int
    edges: int
    hospitals_updated: list[str]
    seconds: float


class CommunicationRow(Row):
    """pFedNet's bytes per hospital and round, beside what FedAvg would have sent; round 0 is
    the setup, whose upload is the one-time data sketch (``sketch_upload_bytes``)."""

    kind: Literal["communication"] = "communication"
    hospital: str
    compression: str
    upload_bytes: int
    upload_deflate_bytes: int
    sketch_upload_bytes: int = 0
    shared_upload_bytes: int
    personal_upload_bytes: int
    download_bytes: int
    fedavg_upload_bytes: int
    fedavg_upload_deflate_bytes: int
    fedavg_download_bytes: int


#: the schema of each ``kind``
SCHEMAS: dict[str, type[Row]] = {
    "evaluate": EvaluateRow,
    "train": TrainRow,
    "error": ErrorRow,
    "rejected": ErrorRow,
    "fedhelp-role": FedHelpRoleRow,
    "fedhelp-aggregate": FedHelpAggregateRow,
    "aggregation": FedMASAggregationRow,
    "pfednet-graph": PFedNetGraphRow,
    "pfednet-admm": PFedNetAdmmRow,
    "communication": CommunicationRow,
}


def as_row(row: Row | Mapping[str, Any]) -> Row:
    """A row as its schema; a plain mapping is validated against the schema of its kind."""
    if isinstance(row, Row):
        return row
    kind = row.get("kind")
    schema = SCHEMAS.get(str(kind))
    if schema is None:
        raise ValueError(
            f"metrics row kind {kind!r} has no schema: expected one of {', '.join(SCHEMAS)}"
        )
    return schema.model_validate(dict(row))
