"""Plain ServerApp: Flower's FedAvg ``start(...)``, instrumented from the outside only.

Per round it records the wall-clock end (``evaluate_fn`` is called once before round 1 and
after every round's TRAIN and EVALUATE exchanges) and every hospital's own train and eval
seconds (through the metric aggregation functions), into ``<output-dir>/plain.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from plain_flower_app.task import build

app = ServerApp()


class Recorder:
    """Round boundaries and per-hospital compute, as FedAvg's callbacks report them."""

    def __init__(self) -> None:
        self.ends: dict[int, float] = {}
        self.pending: dict[str, dict[int, float]] = {"train": {}, "eval": {}}
        self.rounds: list[dict[str, Any]] = []

    def _collect(self, kind: str, records: list[RecordDict]) -> MetricRecord:
        for content in records:
            for metrics in content.metric_records.values():
                key = f"{kind}_seconds"
                if key in metrics:
                    # a MetricRecord value may also be a list; these are numbers
                    partition = int(metrics.get("partition", len(self.pending[kind])))  # type: ignore[arg-type]
                    self.pending[kind][partition] = float(metrics[key])  # type: ignore[arg-type]
        values = list(self.pending[kind].values())
        return MetricRecord({f"max_{kind}_seconds": max(values) if values else 0.0})

    def train_metrics(self, records: list[RecordDict], weighting_key: str) -> MetricRecord:
        return self._collect("train", records)

    def evaluate_metrics(self, records: list[RecordDict], weighting_key: str) -> MetricRecord:
        return self._collect("eval", records)

    def boundary(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        self.ends[server_round] = time.time()
        if server_round > 0:
            self.rounds.append(
                {
                    "round": server_round,
                    "end": self.ends[server_round],
                    "train_seconds": {str(k): v for k, v in self.pending["train"].items()},
                    "eval_seconds": {str(k): v for k, v in self.pending["eval"].items()},
                }
            )
        self.pending = {"train": {}, "eval": {}}
        return None


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    out = Path(str(config["output-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    hospitals = int(config["min-hospitals"])
    arrays = ArrayRecord(build(config, seed=int(config["seed"])).state_dict())
    model_bytes = sum(len(array.data) for array in arrays.values())
    recorder = Recorder()
    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=hospitals,
        min_evaluate_nodes=hospitals,
        min_available_nodes=hospitals,
        train_metrics_aggr_fn=recorder.train_metrics,
        evaluate_metrics_aggr_fn=recorder.evaluate_metrics,
    )
    started = time.time()
    strategy.start(
        grid=grid,
        initial_arrays=arrays,
        num_rounds=int(config["rounds"]),
        timeout=float(config["round-timeout"]),
        train_config=ConfigRecord(),
        evaluate_fn=recorder.boundary,
    )
    result = {
        "app": "plain-flower-fedavg",
        "model": config["model"],
        "model_bytes": model_bytes,
        "hospitals": hospitals,
        # per hospital and round: TRAIN down + TRAIN reply up + EVALUATE down
        "payload_bytes_per_round": 3 * hospitals * model_bytes,
        "start": started,
        "round_0_end": recorder.ends.get(0),
        "rounds": recorder.rounds,
    }
    (out / "plain.json").write_text(json.dumps(result, indent=2) + "\n")
    # the local federation's follower polls faster once it sees this line
    with (out / "audit.jsonl").open("a") as audit:
        audit.write(json.dumps({"time": time.time(), "event": "run_end"}) + "\n")
