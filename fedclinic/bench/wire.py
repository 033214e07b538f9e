"""What ``wire-dtype`` costs and saves, measured in one process (issue 20, item 3).

``python -m fedclinic.bench.wire --out DIR`` writes ``wire.json`` with two parts:

- **codec**: per model (``resnet18``, about 45 MB; ``resnet101``, about 170 MB) and wire
  dtype, the bytes of one full-model message (Flower's ``ArrayRecord`` protobuf, as
  :func:`strategies.pfednet_math.record_bytes` counts it) and the seconds to narrow and
  serialise it at the sender and to parse and widen it at the receiver, best of
  ``--repeat``; and the largest relative rounding error of a weight.
- **quality**: FedAvg on the six PneumoniaMNIST hospitals of ``fedclinic bench quality``'s
  ``pneumonia`` suite (``fedclinic.bench.quality.pneumonia_plan``), in process through the
  real round engine and ClientApp handler (``fedclinic.bench.grid``), once per wire dtype
  with the same seed: the mean over hospitals of the final test accuracy, balanced accuracy
  and AUC, and how far the final float32 model is from the float32 run's.

The bytes on a real socket and the seconds per round on real processes are
``fedclinic bench system``'s transfer cases (``resnet18-fedavg-none-float16``, ...).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common.serde import array_record_from_proto, array_record_to_proto
from flwr.proto.recorddict_pb2 import ArrayRecord as ProtoArrayRecord

from fedclinic.bench.grid import run_federation
from fedclinic.bench.quality import pneumonia_plan
from fedclinic.config import WIRE_DTYPES
from fedclinic.models import build_model
from fedclinic.serialization import (
    from_wire,
    load_checkpoint,
    record_to_numpy,
    state_to_record,
    to_wire,
)
from strategies import load_run_config


def codec(model: str, dtype: str, repeat: int) -> dict[str, Any]:
    """One full-model message of ``model`` at ``dtype``: bytes, seconds each way, error."""
    run = load_run_config({"model": model})
    record = state_to_record(build_model(run, seed=0).state_dict())
    original = record_to_numpy(record)
    send, receive = [], []
    size = 0
    back: dict[str, np.ndarray] = {}
    for _ in range(repeat):
        started = time.perf_counter()
        payload = array_record_to_proto(to_wire(record, dtype)).SerializeToString()
        sent = time.perf_counter()
        parsed = array_record_from_proto(ProtoArrayRecord.FromString(payload))
        back = record_to_numpy(from_wire(parsed, dtype))
        send.append(sent - started)
        receive.append(time.perf_counter() - sent)
        size = len(payload)
    floats = {k: v for k, v in original.items() if v.dtype == np.float32 and np.any(v != 0)}
    # error against each array's own scale (entries below float16's 6e-8 flush to zero)
    errors = [float(np.max(np.abs(back[k] - v)) / np.max(np.abs(v))) for k, v in floats.items()]
    nonzero = sum(int(np.count_nonzero(v)) for v in floats.values())
    flushed = sum(int(np.count_nonzero((back[k] == 0) & (v != 0))) for k, v in floats.items())
    return {
        "model": model,
        "wire_dtype": dtype,
        "message_bytes": size,
        "send_seconds": min(send),
        "receive_seconds": min(receive),
        "max_error_relative_to_array_max": max(errors, default=0.0),
        "share_of_nonzero_weights_flushed_to_zero": flushed / max(nonzero, 1),
    }


def quality(work: Path, rounds: int, steps: int, seed: int) -> list[dict[str, Any]]:
    """FedAvg on the pneumonia suite's hospitals at every wire dtype."""
    plan = pneumonia_plan("quick", work / "plan")
    results = []
    finals: dict[str, dict[str, Any]] = {}
    for dtype in WIRE_DTYPES:
        flat = {**plan.base, "algorithm": "fedavg", "rounds": rounds, "local-steps": steps,
                "seed": seed, "wire-dtype": dtype}  # fmt: skip
        out = work / f"fedavg-{dtype}"
        started = time.monotonic()
        run_federation(flat, plan.hospitals, out)
        seconds = time.monotonic() - started
        summary = json.loads((out / "summary.json").read_text())
        finals[dtype] = load_checkpoint(out / "model_final.pt")
        scores = {
            metric: statistics.fmean(
                float(h["final"][f"test_{metric}"])
                for h in summary["hospitals"].values()
                if h["final"].get(f"test_{metric}") is not None
            )
            for metric in ("accuracy", "balanced_accuracy", "auc")
        }
        reference = finals["float32"]
        distance = max(
            float((finals[dtype][k].float() - reference[k].float()).abs().max()) for k in reference
        )
        results.append({"wire_dtype": dtype, "seconds": round(seconds, 1),
                        "max_weight_difference_to_float32": distance,
                        **{f"mean_test_{k}": v for k, v in scores.items()}})  # fmt: skip
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--models", default="resnet18,resnet101")
    parser.add_argument("--rounds", type=int, default=5, help="quality: FedAvg rounds")
    parser.add_argument("--local-steps", type=int, default=10, help="quality: steps per round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-quality", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"codec": [], "quality": []}
    for model in (m.strip() for m in args.models.split(",") if m.strip()):
        for dtype in WIRE_DTYPES:
            results["codec"].append(codec(model, dtype, args.repeat))
            print(json.dumps(results["codec"][-1]), flush=True)
    if not args.skip_quality:
        results["quality"] = quality(args.out, args.rounds, args.local_steps, args.seed)
        for row in results["quality"]:
            print(json.dumps(row), flush=True)
    (args.out / "wire.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
