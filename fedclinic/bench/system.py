"""``fedclinic bench system``: what the federation runtime costs, side by side in one run.

Everything runs on the real deployment runtime (a SuperLink and one SuperNode per hospital,
separate processes, gRPC with TLS and node authentication, one ClientApp process per
message), through :class:`fedclinic.local.federation.LocalFederation`:

- **scale and overhead**: for 2, 4, 8 hospitals, fedclinic FedAvg (``fedclinic bench load``'s
  run settings, :data:`~fedclinic.bench.load.LOAD_RUN`) with each hospital's site worker
  answering its messages, in full mode also without it (``fedclinic-fedavg-no-worker``: every
  message answered in its own ClientApp process, as ``--no-worker``), and a *plain Flower app*
  (``plain_flower/``: Flower's own ``FedAvg.start``, one TRAIN then one EVALUATE message per
  hospital and round) on the same model, hospitals, local steps and batch size; the modes
  name these apps (:attr:`Mode.scale_apps`). Each row also shows its round overhead over the
  plain app's at the same hospital count (issue #20's target: at most 1/4 with the worker).
  Round overhead = round wall time minus the slowest hospital's compute. fedclinic sends one
  TRAIN message that evaluates the received model and then trains, so its critical path is
  ``max_h(eval_h + train_h)``; the plain app waits for every TRAIN reply before it sends
  EVALUATE, so its critical path is ``max_h(train_h) + max_h(eval_h)``. Round 1 (ServerApp
  start-up) is left out for both.
  Peak RSS per process kind comes from :class:`~fedclinic.bench.load.MemorySampler`, bytes on
  the wire as in the transfer part.
- **transfer**: 2 hospitals, models of about 0.15 MB (``cnn``), 45 MB (``resnet18``) and
  170 MB (``resnet101``), all from fedclinic's model registry (the plain app builds the same
  models), each with the plain app, fedclinic FedAvg, and pFedNet without and with STC
  compression (``cnn``: pFedNet only), and FedAvg (pFedNet at 170 MB) at each narrow
  ``wire-dtype`` (float16, bfloat16: the weights and updates travel in 16 bits both ways).
  ``--transfer`` picks cases by name (``resnet101-pfednet-stc``,
  ``resnet101-fedavg-none-float16``, ...; no suffix: float32).
  Bytes per round: the payload (model bytes times messages; pFedNet's own ``communication``
  rows; pFedNet's one-time sketch, sent before round 1, in a column of its own) and the
  bytes on the wire, read from the kernel's per-socket TCP counters
  (``ss -ti``, TLS and gRPC framing included) of the SuperLink's Fleet API port. Seconds per
  round: the round overhead at that model size; effective MB/s: the float32 model bytes the
  round moved (payload down + up, counted at float32) per second of round overhead.
- **data load**: an image folder and a segmentation folder of generated PNGs loaded cold, with
  the site's cache (first and warm) and per round with and without the site worker
  (:mod:`fedclinic.bench.dataload`; a few hundred files in quick mode).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import re
import statistics
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedclinic.audit import AuditLog
from fedclinic.bench.dataload import data_load_lines, run_data_load
from fedclinic.bench.load import (
    LOAD_RUN,
    MemorySampler,
    bench_options,
    lost,
    round_overheads,
)
from fedclinic.local.configs import HospitalSpec, app_defaults, find_app_dir, synthetic_hospitals
from fedclinic.local.federation import LocalFederation
from fedclinic.supernode import PACING_ENVIRONMENT

PLAIN_APP_DIR = Path(__file__).resolve().parent / "plain_flower"
#: keys of the plain app's [tool.flwr.app.config]; the shared run settings are LOAD_RUN's
PLAIN_KEYS = ("model", "num-classes", "in-channels", "image-size", "data-source", "rounds",
              "local-steps", "batch-size", "optimizer", "learning-rate", "seed",
              "min-hospitals", "round-timeout", "output-dir")  # fmt: skip
#: hospital size for the transfer runs: small, so ResNet evaluation does not swamp a 2-core box
TRANSFER_SAMPLES = 200
#: seconds a transfer round waits for replies: one ResNet-101 message (evaluate + train) on a
#: busy 2-core machine can take longer than the scale runs' 240 s; only a lost reply waits it out
TRANSFER_ROUND_TIMEOUT = 900.0
#: the plain Flower app's name in the results
PLAIN_APP = "plain-flower"
#: the scale part's apps, by the name their rows carry: whether fedclinic's site worker
#: answers the hospital's messages (None: the plain Flower app, which has no worker)
SCALE_APPS: dict[str, bool | None] = {
    "fedclinic-fedavg": True,
    "fedclinic-fedavg-no-worker": False,
    PLAIN_APP: None,
}


@dataclass(frozen=True)
class Mode:
    """How much a mode runs: hospital counts and the scale apps run at each, rounds,
    transfer cases."""

    sizes: tuple[int, ...]
    #: names of SCALE_APPS, run in this order at every hospital count
    scale_apps: tuple[str, ...]
    rounds: int
    #: (model, app, compression), or (model, app, compression, wire dtype) for a narrow one
    transfer: tuple[tuple[str, ...], ...]


MODES: dict[str, Mode] = {
    "quick": Mode(
        sizes=(2,),
        scale_apps=("fedclinic-fedavg", PLAIN_APP),
        rounds=2,
        transfer=(("cnn", "pfednet", "stc"),),
    ),
    "full": Mode(
        sizes=(2, 4, 8),
        scale_apps=("fedclinic-fedavg", "fedclinic-fedavg-no-worker", PLAIN_APP),
        rounds=3,
        transfer=(
            ("cnn", "pfednet", "none"),
            ("cnn", "pfednet", "stc"),
            ("resnet18", "plain", "none"),
            ("resnet18", "fedavg", "none"),
            ("resnet18", "pfednet", "none"),
            ("resnet18", "pfednet", "stc"),
            ("resnet101", "plain", "none"),
            ("resnet101", "fedavg", "none"),
            ("resnet101", "pfednet", "none"),
            ("resnet101", "pfednet", "stc"),
            ("resnet18", "fedavg", "none", "float16"),
            ("resnet18", "fedavg", "none", "bfloat16"),
            ("resnet101", "fedavg", "none", "float16"),
            ("resnet101", "fedavg", "none", "bfloat16"),
            ("resnet101", "pfednet", "none", "float16"),
        ),
    ),
}
#: what a transfer case may name: the app, and pFedNet's upload compression
TRANSFER_APPS = ("plain", "fedavg", "pfednet")
COMPRESSIONS = ("none", "stc", "fused-stc")
#: narrow wire precisions a transfer case may name (float32, the default, has no suffix)
NARROW = ("float16", "bfloat16")


def scale_plan(mode: Mode, sizes: Sequence[int] | None = None) -> list[tuple[int, str]]:
    """The scale part's federations in the order they run: ``(hospitals, app)``, each of the
    mode's apps at each hospital count (``sizes``: instead of the mode's, ``--sizes``)."""
    return [(count, app) for count in (mode.sizes if sizes is None else sizes)
            for app in mode.scale_apps]  # fmt: skip


def case_name(case: tuple[str, ...]) -> str:
    """``("resnet101", "pfednet", "stc")`` -> ``"resnet101-pfednet-stc"``."""
    return "-".join(case)


def wire_of(case: tuple[str, ...]) -> str:
    """A case's ``wire-dtype``: its fourth element, float32 without one."""
    return case[3] if len(case) > 3 else "float32"


def parse_transfer(text: str) -> tuple[tuple[str, ...], ...]:
    """``--transfer`` (comma-separated ``MODEL-APP-COMPRESSION[-WIRE]`` names) -> the cases."""
    from fedclinic.models import MODELS

    models = sorted(n for n, s in MODELS.items() if s.task == "classification" and not s.tabular)
    pattern = re.compile(
        rf"^(?P<model>.+)-(?P<app>{'|'.join(TRANSFER_APPS)})-(?P<compression>"
        rf"{'|'.join(sorted(COMPRESSIONS, key=len, reverse=True))})"
        rf"(?:-(?P<wire>float32|{'|'.join(NARROW)}))?$"
    )
    cases = []
    for name in (v.strip() for v in text.split(",")):
        if not name:
            continue
        match = pattern.match(name)
        if match is None or match["model"] not in models:
            raise argparse.ArgumentTypeError(
                f"transfer case {name!r} is not allowed: expected MODEL-APP-COMPRESSION[-WIRE] "
                f"with MODEL one of {', '.join(models)}, APP one of {', '.join(TRANSFER_APPS)}, "
                f"COMPRESSION one of {', '.join(COMPRESSIONS)}, WIRE one of {', '.join(NARROW)} "
                "(none: float32)"
            )
        if match["app"] != "pfednet" and match["compression"] != "none":
            raise argparse.ArgumentTypeError(
                f"transfer case {name!r} is not allowed: only pfednet compresses "
                f"(use {match['model']}-{match['app']}-none)"
            )
        wire = match["wire"] or "float32"
        if match["app"] == "plain" and wire != "float32":
            raise argparse.ArgumentTypeError(
                f"transfer case {name!r} is not allowed: the plain Flower app sends float32 "
                f"(use {match['model']}-plain-none)"
            )
        case = (match["model"], match["app"], match["compression"])
        cases.append(case if wire == "float32" else (*case, wire))
    return tuple(cases)


# ---------------------------------------------------------------------------- arithmetic


def median_or_none(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def plain_round_overheads(record: Mapping[str, Any], first: int = 2) -> list[float]:
    """Plain app: round wall time minus ``max_h(train) + max_h(eval)``, rounds ``first``..R.

    The two exchanges run one after the other, each waiting for its slowest hospital.
    """
    ends = {0: record.get("round_0_end")} | {r["round"]: r["end"] for r in record["rounds"]}
    overheads = []
    for r in record["rounds"]:
        n = r["round"]
        if n < first or ends.get(n - 1) is None or not r["train_seconds"] or not r["eval_seconds"]:
            continue
        compute = max(r["train_seconds"].values()) + max(r["eval_seconds"].values())
        overheads.append(r["end"] - float(ends[n - 1]) - compute)
    return overheads


def plain_round_ends(record: Mapping[str, Any]) -> dict[int, float]:
    ends = {r["round"]: float(r["end"]) for r in record["rounds"]}
    if record.get("round_0_end") is not None:
        ends[0] = float(record["round_0_end"])
    return ends


def fedclinic_round_ends(audit: Sequence[Mapping[str, Any]]) -> dict[int, float]:
    return {int(e["round"]): float(e["time"]) for e in audit if e.get("event") == "round"}


SOCKET_LINE = re.compile(r"^\S+\s+\S+\s+(\S+)\s+(\S+)")
COUNTER = re.compile(r"\b(bytes_sent|bytes_received):(\d+)")


def parse_ss(text: str) -> dict[str, tuple[int, int]]:
    """``ss -tinH`` output -> ``{"local peer": (bytes_sent, bytes_received)}`` per socket."""
    sockets: dict[str, tuple[int, int]] = {}
    key = None
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():
            match = SOCKET_LINE.match(line)
            key = f"{match.group(1)} {match.group(2)}" if match else None
            continue
        if key is None:
            continue
        counters = dict(COUNTER.findall(line))
        sockets[key] = (int(counters.get("bytes_sent", 0)), int(counters.get("bytes_received", 0)))
        key = None
    return sockets


def value_at(series: Sequence[tuple[float, int, int]], t: float) -> tuple[float, float]:
    """(sent, received) at time ``t``, linearly between the samples around it."""
    if not series:
        return 0.0, 0.0
    if t <= series[0][0]:
        return float(series[0][1]), float(series[0][2])
    for (t0, s0, r0), (t1, s1, r1) in itertools.pairwise(series):
        if t0 <= t <= t1:
            f = (t - t0) / (t1 - t0) if t1 > t0 else 1.0
            return s0 + f * (s1 - s0), r0 + f * (r1 - r0)
    return float(series[-1][1]), float(series[-1][2])


def wire_per_round(
    series: Sequence[tuple[float, int, int]], ends: Mapping[int, float], first: int = 2
) -> list[dict[str, float]]:
    """Bytes the coordinator sent (down) and received (up) on the Fleet API per round."""
    rows = []
    for n in sorted(ends):
        if n < first or n - 1 not in ends:
            continue
        s0, r0 = value_at(series, ends[n - 1])
        s1, r1 = value_at(series, ends[n])
        rows.append({"round": n, "down_bytes": s1 - s0, "up_bytes": r1 - r0})
    return rows


def payload_per_round(rows: Sequence[Mapping[str, Any]], rounds: int) -> dict[str, float] | None:
    """pFedNet's ``communication`` rows: mean upload and download bytes per training round."""
    up: dict[int, int] = {}
    down: dict[int, int] = {}
    for row in rows:
        if row.get("kind") == "communication" and 1 <= int(row["round"]) <= rounds:
            up[row["round"]] = up.get(row["round"], 0) + int(row.get("upload_bytes", 0))
            down[row["round"]] = down.get(row["round"], 0) + int(row.get("download_bytes", 0))
    if not up and not down:
        return None
    counted = sorted(set(up) | set(down))
    return {
        "up_bytes": sum(up.values()) / len(counted),
        "down_bytes": sum(down.values()) / len(counted),
    }


def sketch_upload(rows: Sequence[Mapping[str, Any]]) -> int | None:
    """pFedNet's one-time sketch, all hospitals together (the round-0 ``communication``
    rows); None for a run that sends none."""
    sizes = [int(r.get("sketch_upload_bytes", 0)) for r in rows
             if r.get("kind") == "communication" and int(r["round"]) == 0]  # fmt: skip
    return sum(sizes) if sizes else None


def mean_wire(per_round: Sequence[Mapping[str, float]]) -> dict[str, float] | None:
    if not per_round:
        return None
    return {key: statistics.fmean(r[key] for r in per_round) for key in ("down_bytes", "up_bytes")}


# ---------------------------------------------------------------------------- measuring


@dataclass(eq=False)  # a thread: hashable by identity
class WireSampler(threading.Thread):
    """Cumulative TCP bytes of the sockets on one local port, sampled with ``ss``.

    Each socket's counters only grow, so the total is the sum of every socket's last value
    (closed sockets keep theirs).
    """

    port: int
    interval: float = 0.5
    series: list[tuple[float, int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__(daemon=True)
        self.stopped = threading.Event()
        self.last: dict[str, tuple[int, int]] = {}

    def run(self) -> None:
        while not self.stopped.is_set():
            self.sample()
            self.stopped.wait(self.interval)
        self.sample()

    def sample(self) -> None:
        try:
            text = subprocess.run(
                ["ss", "-tinH", "state", "established", f"( sport = :{self.port} )"],
                capture_output=True, text=True, timeout=10, check=False,
            ).stdout  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            return
        self.last.update(parse_ss(text))
        sent = sum(s for s, _ in self.last.values())
        received = sum(r for _, r in self.last.values())
        self.series.append((time.time(), sent, received))


def run_federation(
    app_dir: Path,
    run_config: dict[str, Any],
    hospitals: list[HospitalSpec],
    out: Path,
    plain: bool,
    site_workers: bool = True,
) -> dict[str, Any]:
    """One federation on real processes; its status, memory peaks and wire-byte series.
    ``site_workers`` False: fedclinic's hospitals answer each message in its own ClientApp
    process (``--no-worker``); the plain app never has the worker, and its SuperNodes keep
    Flower's own waits (``fedclinic.supernode``'s pacing is fedclinic's)."""
    if plain:
        hospitals = [replace(h, env={**h.env, PACING_ENVIRONMENT: "flower"}) for h in hospitals]
    federation = LocalFederation(
        bench_options(app_dir, out, run_config, hospitals, site_workers=site_workers and not plain),
        Console(quiet=True),
    )
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    with federation.supervisor:
        sampler = MemorySampler(federation.supervisor.token)
        sampler.start()
        wire: WireSampler | None = None
        try:
            federation.prepare()
            federation.start_superlink()
            wire = WireSampler(federation.fleet_port)
            wire.start()
            federation.start_hospitals()
            status = federation.follow(federation.submit())
            ended, details = status.status, status.details
            if plain:
                completed = status.completed
            else:
                outcome = federation.report(status)
                completed, ended, details = outcome.exit_code == 0, outcome.status, outcome.details
        finally:
            sampler.stopped.set()
            if wire is not None:
                wire.stopped.set()
                wire.join(timeout=15)
    reason = (details.splitlines() or [""])[0][:300]
    problems = [] if completed else [f"run ended {ended}: {reason}"]
    return {
        "completed": completed,
        "problems": problems,
        "peak_rss_mib": {k: round(v, 1) for k, v in sorted(sampler.peaks.items())},
        "wire_series": wire.series if wire else [],
        "wall_seconds": round(time.monotonic() - started, 1),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def plain_config(
    model: str, count: int, rounds: int, out: Path, round_timeout: float | None = None
) -> dict[str, Any]:
    """The plain app's run config: the same settings as fedclinic's load run."""
    merged = {**app_defaults(find_app_dir()), **LOAD_RUN, "model": model, "rounds": rounds,
              "min-hospitals": count, "output-dir": str(out)}  # fmt: skip
    if round_timeout is not None:
        merged["round-timeout"] = round_timeout
    return {key: merged[key] for key in PLAIN_KEYS}


def run_plain(
    model: str,
    hospitals: list[HospitalSpec],
    rounds: int,
    out: Path,
    round_timeout: float | None = None,
) -> dict[str, Any]:
    """The plain Flower app on real processes; overheads, memory, bytes per round."""
    config = plain_config(model, len(hospitals), rounds, out, round_timeout)
    outcome = run_federation(PLAIN_APP_DIR, config, hospitals, out, plain=True)
    record_path = out / "plain.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else None
    overheads = plain_round_overheads(record) if record else []
    wire = wire_per_round(outcome.pop("wire_series"), plain_round_ends(record)) if record else []
    problems = outcome.pop("problems")
    done = len(record["rounds"]) if record else 0
    if done != rounds:
        problems.append(f"{record_path.name}: {done} of {rounds} rounds recorded")
    return {
        "app": PLAIN_APP,
        "hospitals": len(hospitals),
        "model": model,
        "rounds": rounds,
        "completed": bool(outcome.pop("completed")) and not problems,
        "problems": problems,
        "round_overhead_seconds": overheads,
        "median_round_overhead_seconds": median_or_none(overheads),
        "model_bytes": record["model_bytes"] if record else None,
        "payload_bytes_per_round": (
            {
                "down_bytes": 2 * len(hospitals) * record["model_bytes"],
                "up_bytes": len(hospitals) * record["model_bytes"],
            }
            if record
            else None
        ),
        "wire_bytes_per_round": mean_wire(wire),
        "wire_rounds": wire,
        **outcome,
    }


def run_fedclinic(
    model: str,
    algorithm: str,
    compression: str,
    hospitals: list[HospitalSpec],
    rounds: int,
    out: Path,
    round_timeout: float | None = None,
    wire_dtype: str = "float32",
    site_workers: bool = True,
) -> dict[str, Any]:
    """fedclinic (FedAvg or pFedNet) on real processes; overheads, memory, bytes per round.
    ``site_workers`` False: without the hospitals' site workers (``--no-worker``)."""
    app_dir = find_app_dir()
    config = {
        **app_defaults(app_dir),
        **LOAD_RUN,
        "algorithm": algorithm,
        "model": model,
        "rounds": rounds,
        "min-hospitals": len(hospitals),
        "output-dir": str(out),
        "wire-dtype": wire_dtype,
    }
    if round_timeout is not None:
        config["round-timeout"] = round_timeout
    if algorithm == "pfednet":
        config["pfednet.compression"] = compression
        config["pfednet.allow-rank-deficient-sketch"] = True  # synthetic images: no patient
    outcome = run_federation(
        app_dir, config, hospitals, out, plain=False, site_workers=site_workers
    )
    metrics = out / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    rows = [json.loads(x) for x in lines if x]
    audit = AuditLog(out).read() if (out / "audit.jsonl").exists() else []
    overheads = round_overheads(audit, rows)
    wire = wire_per_round(outcome.pop("wire_series"), fedclinic_round_ends(audit))
    problems = outcome.pop("problems") + lost(rows, [h.name for h in hospitals], rounds)
    model_bytes = model_size_bytes(config)
    sent_bytes = model_size_bytes(config, wire_dtype)  # one full model as it travels
    payload = payload_per_round(rows, rounds)
    if payload is None and sent_bytes:  # FedAvg: one TRAIN down and its reply up
        payload = {"down_bytes": len(hospitals) * sent_bytes,
                   "up_bytes": len(hospitals) * sent_bytes}  # fmt: skip
    return {
        "app": f"fedclinic-{algorithm}",
        "compression": compression if algorithm == "pfednet" else "none",
        "wire_dtype": wire_dtype,
        "site_worker": site_workers,
        "wire_model_bytes": sent_bytes,
        "hospitals": len(hospitals),
        "model": model,
        "rounds": rounds,
        "completed": bool(outcome.pop("completed")) and not problems,
        "problems": problems,
        "round_overhead_seconds": overheads,
        "median_round_overhead_seconds": median_or_none(overheads),
        "model_bytes": model_bytes,
        "payload_bytes_per_round": payload,
        "sketch_up_bytes": sketch_upload(rows),
        "wire_bytes_per_round": mean_wire(wire),
        "wire_rounds": wire,
        **outcome,
    }


def run_scale(app: str, count: int, rounds: int, out: Path) -> dict[str, Any]:
    """One federation of the scale part: ``app`` (a name of SCALE_APPS) with ``count``
    synthetic hospitals and LOAD_RUN's settings, in ``out/<app>-<count>``."""
    where = out / f"{app}-{count}"
    hospitals = synthetic_hospitals(count, where / "state")
    site_workers = SCALE_APPS[app]
    if site_workers is None:
        return run_plain(LOAD_RUN["model"], hospitals, rounds, where)
    entry = run_fedclinic(
        LOAD_RUN["model"], LOAD_RUN["algorithm"], "none", hospitals, rounds, where,
        site_workers=site_workers,
    )  # fmt: skip
    entry["app"] = app
    return entry


def model_size_bytes(config: Mapping[str, Any], wire_dtype: str = "float32") -> int | None:
    """Float bytes of the run's model (what one full-model message carries); with a narrow
    ``wire_dtype``, its float32 entries at 2 bytes each (integers as they are)."""
    from fedclinic.config import RunConfig, validate_schema
    from fedclinic.models import build_model

    core = {k: v for k, v in config.items() if "." not in k}
    try:
        run = validate_schema(RunConfig, core, "run config")
        state = build_model(run).state_dict()
    except Exception:  # a schema change elsewhere must not lose the measured run
        return None
    narrow = wire_dtype != "float32"

    def size(t: Any) -> int:  # float32 entries travel in 2 bytes when narrow
        single = t.is_floating_point() and t.element_size() == 4
        return int(t.numel()) * (2 if narrow and single else int(t.element_size()))

    return sum(size(t) for t in state.values())


def effective_mb_per_s(entry: Mapping[str, Any]) -> float | None:
    """Float32 model megabytes a round moved (payload down + up, a narrow payload scaled
    back to float32) per second of round overhead: the rate the round's own cost buys."""
    payload = entry.get("payload_bytes_per_round") or {}
    overhead = entry.get("median_round_overhead_seconds")
    full, sent = entry.get("model_bytes"), entry.get("wire_model_bytes") or entry.get("model_bytes")
    if not payload or not overhead or overhead <= 0 or not full or not sent:
        return None
    moved = (payload["down_bytes"] + payload["up_bytes"]) * full / sent
    return moved / 1e6 / overhead


def resized(hospitals: list[HospitalSpec], samples: int) -> list[HospitalSpec]:
    """The same hospitals with ``num-samples`` capped (keeps ResNet evaluation short)."""
    from fedclinic.config import parse_hospital_config

    specs = []
    for spec in hospitals:
        flat = {**spec.flat, "num-samples": min(samples, int(spec.flat["num-samples"]))}
        specs.append(HospitalSpec(parse_hospital_config(flat), flat))
    return specs


# ---------------------------------------------------------------------------- command


def system_command(args: argparse.Namespace) -> int:
    """Run the mode's federations one after another; write system.json/CSV after each."""
    console = Console()
    mode = MODES[args.mode]
    sizes = mode.sizes
    if getattr(args, "sizes", None) is not None:
        sizes = tuple(int(v) for v in args.sizes.split(",") if v.strip())
    transfer = mode.transfer
    if getattr(args, "transfer", None) is not None:
        transfer = args.transfer
    if getattr(args, "no_transfer", False):
        transfer = ()
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results: dict[str, Any] = {
        "mode": args.mode,
        "rounds": mode.rounds,
        "settings": {k: LOAD_RUN[k] for k in ("model", "local-steps", "batch-size")},
        "cpu_count": os.cpu_count(),
        "scale": [],
        "transfer": [],
        "data_load": None,
    }

    def save() -> None:
        results["wall_seconds"] = round(time.monotonic() - started, 1)
        (out / "system.json").write_text(json.dumps(results, indent=2) + "\n")
        write_csv(out / "system.csv", results)

    if not getattr(args, "no_data_load", False):
        console.print(
            "[bold]data load[/]: image and segmentation folders, with and without the cache ..."
        )
        results["data_load"] = run_data_load(args.mode, out / "data-load")
        save()
    for count, app in scale_plan(mode, sizes):
        console.print(f"[bold]scale[/]: {app}, {count} hospitals, {mode.rounds} rounds ...")
        entry = run_scale(app, count, mode.rounds, out / "scale")
        for problem in entry.get("problems", []):
            console.print(f"[red]{app}, {count} hospitals[/]: {escape(problem)}")
        results["scale"].append(entry)
        save()
    for case in transfer:
        model, app, compression = case[:3]
        name = case_name(case)
        console.print(f"[bold]transfer[/]: {name}, 2 hospitals ...")
        where = out / "transfer" / name
        hospitals = resized(synthetic_hospitals(2, where / "state"), TRANSFER_SAMPLES)
        timeout = TRANSFER_ROUND_TIMEOUT
        if app == "plain":
            entry = run_plain(model, hospitals, mode.rounds, where, timeout)
        else:
            entry = run_fedclinic(
                model, app, compression, hospitals, mode.rounds, where, timeout, wire_of(case)
            )
        entry["effective_mb_per_s"] = effective_mb_per_s(entry)
        for problem in entry.get("problems", []):
            console.print(f"[red]{name}[/]: {escape(problem)}")
        results["transfer"].append(entry)
        save()
    save()
    command = f"fedclinic bench system --mode {args.mode}"
    if getattr(args, "sizes", None) is not None:
        command += f" --sizes '{args.sizes}'"
    if getattr(args, "no_data_load", False):
        command += " --no-data-load"
    if getattr(args, "no_transfer", False):
        command += " --no-transfer"
    elif getattr(args, "transfer", None) is not None:
        command += f" --transfer '{','.join(case_name(c) for c in transfer)}'"
    (out / "system.md").write_text(system_section(results, command), encoding="utf-8")
    console.print(scale_table(results["scale"]))
    console.print(transfer_table(results["transfer"]))
    if results["data_load"]:
        console.print(data_load_table(results["data_load"]))
    every = results["scale"] + results["transfer"]
    return 0 if all(r["completed"] for r in every) else 1


CSV_FIELDS = ("section", "app", "model", "compression", "wire_dtype", "hospitals", "rounds",
              "completed", "median_round_overhead_seconds", "effective_mb_per_s",
              "model_bytes", "wire_model_bytes", "payload_down_bytes",
              "payload_up_bytes", "sketch_up_bytes", "wire_down_bytes", "wire_up_bytes",
              "peak_rss_clientapp_mib",
              "peak_rss_supernode_mib", "peak_rss_superlink_mib", "peak_rss_serverapp_mib",
              "wall_seconds", "site_worker")  # fmt: skip


def flat_row(section: str, r: Mapping[str, Any]) -> dict[str, Any]:
    """One CSV row of a scale or transfer entry."""
    payload = r.get("payload_bytes_per_round") or {}
    wire = r.get("wire_bytes_per_round") or {}
    peaks = r.get("peak_rss_mib") or {}
    return {
        "section": section,
        "app": r.get("app"),
        "model": r.get("model"),
        "compression": r.get("compression", "none"),
        "wire_dtype": r.get("wire_dtype", "float32"),
        "hospitals": r.get("hospitals"),
        "rounds": r.get("rounds"),
        "completed": r.get("completed"),
        "median_round_overhead_seconds": r.get("median_round_overhead_seconds"),
        "effective_mb_per_s": r.get("effective_mb_per_s"),
        "model_bytes": r.get("model_bytes"),
        "wire_model_bytes": r.get("wire_model_bytes", r.get("model_bytes")),
        "payload_down_bytes": payload.get("down_bytes"),
        "payload_up_bytes": payload.get("up_bytes"),
        "sketch_up_bytes": r.get("sketch_up_bytes"),
        "wire_down_bytes": wire.get("down_bytes"),
        "wire_up_bytes": wire.get("up_bytes"),
        "peak_rss_clientapp_mib": peaks.get("flwr-clientapp"),
        "peak_rss_supernode_mib": peaks.get("flower-supernode"),
        "peak_rss_superlink_mib": peaks.get("flower-superlink"),
        "peak_rss_serverapp_mib": peaks.get("flwr-serverapp"),
        "wall_seconds": r.get("wall_seconds"),
        "site_worker": r.get("site_worker"),
    }


def write_csv(path: Path, results: Mapping[str, Any]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for section in ("scale", "transfer"):
            for entry in results[section]:
                writer.writerow(flat_row(section, entry))


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e6:.2f}"


def plain_ratios(entries: Sequence[Mapping[str, Any]]) -> list[float | None]:
    """Each scale row's median round overhead over the plain Flower app's at the same
    hospital count (issue #20's target: at most 1/4 with the site worker); None for the plain
    app's own rows and where either median is missing."""
    plain = {e["hospitals"]: e.get("median_round_overhead_seconds")
             for e in entries if e.get("app") == PLAIN_APP}  # fmt: skip
    ratios: list[float | None] = []
    for e in entries:
        base, own = plain.get(e["hospitals"]), e.get("median_round_overhead_seconds")
        if e.get("app") == PLAIN_APP or own is None or base is None or base <= 0:
            ratios.append(None)
        else:
            ratios.append(own / base)
    return ratios


def scale_table(entries: Sequence[Mapping[str, Any]]) -> Table:
    table = Table(title="round overhead and peak memory, fedclinic vs plain Flower (cnn)")
    for column in ("hospitals", "app", "complete", "round overhead s (median)",
                   "÷ plain Flower's",
                   "peak RSS MiB: ClientApp / SuperNode / SuperLink / ServerApp"):  # fmt: skip
        table.add_column(column, justify="right")
    for r, ratio in zip(entries, plain_ratios(entries), strict=True):
        peaks = r.get("peak_rss_mib") or {}
        table.add_row(
            str(r["hospitals"]),
            str(r.get("app")),
            "yes" if r["completed"] else "NO",
            _num(r.get("median_round_overhead_seconds")),
            _num(ratio, 2),
            " / ".join(
                f"{peaks.get(k, 0):.0f}"
                for k in (
                    "flwr-clientapp",
                    "flower-supernode",
                    "flower-superlink",
                    "flwr-serverapp",
                )
            ),
        )
    return table


def transfer_table(entries: Sequence[Mapping[str, Any]]) -> Table:
    table = Table(title="transfer per round, 2 hospitals")
    for column in ("model", "MB", "app", "compression", "wire dtype", "round overhead s",
                   "effective MB/s", "payload MB down / up", "sketch MB up, once",
                   "wire MB down / up"):  # fmt: skip
        table.add_column(column, justify="right")
    for r in entries:
        payload = r.get("payload_bytes_per_round") or {}
        wire = r.get("wire_bytes_per_round") or {}
        table.add_row(
            str(r["model"]),
            _mb(r.get("model_bytes")),
            str(r["app"]),
            str(r.get("compression", "none")),
            str(r.get("wire_dtype", "float32")),
            _num(r.get("median_round_overhead_seconds")),
            _num(r.get("effective_mb_per_s")),
            f"{_mb(payload.get('down_bytes'))} / {_mb(payload.get('up_bytes'))}",
            _mb(r.get("sketch_up_bytes")),
            f"{_mb(wire.get('down_bytes'))} / {_mb(wire.get('up_bytes'))}",
        )
    return table


def data_load_table(results: Mapping[str, Any]) -> Table:
    table = Table(title=f"data load per hospital, resized to {results['image_size']}")
    for column in ("source", "PNG files", "cold s", "first s", "warm s", "warm, hash s",
                   "per round s: worker / no worker"):  # fmt: skip
        table.add_column(column, justify="right")
    for e in results["entries"]:
        s = e["seconds"]
        table.add_row(
            e["source"], str(e["files"]), f"{s['cold']:.2f}", f"{s['first']:.2f}",
            f"{s['warm']:.3f}", f"{s['warm_hash']:.3f}",
            f"{s['round_worker']:.4f} / {s['round_no_worker']:.3f}",
        )  # fmt: skip
    return table


def add_system_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``fedclinic bench system``."""
    system = commands.add_parser(
        "system",
        help="runtime cost on real processes: round overhead vs plain Flower, transfer, scale",
    )
    system.add_argument("--out", type=Path, required=True, help="results directory")
    system.add_argument(
        "--mode",
        choices=tuple(MODES),
        default="quick",
        help="quick: 2 hospitals, 2 rounds, cnn (about 4 min on 2 CPU cores); full: 2/4/8 "
        "hospitals (fedclinic with and without the site worker, plain Flower) and 3 model "
        "sizes up to resnet101 (over an hour on 2 CPU cores)",
    )
    system.add_argument(
        "--sizes",
        default=None,
        metavar="N,N,...",
        help="hospital counts of the scale part instead of the mode's ('' skips it)",
    )
    system.add_argument(
        "--transfer",
        type=parse_transfer,
        default=None,
        metavar="CASE,CASE,...",
        help="transfer cases instead of the mode's, each MODEL-APP-COMPRESSION "
        "(e.g. resnet101-fedavg-none,resnet101-pfednet-stc; '' skips them)",
    )
    system.add_argument(
        "--no-transfer", action="store_true", help="skip the transfer part (model sizes)"
    )
    system.add_argument(
        "--no-data-load",
        action="store_true",
        help="skip the data-load part (image and segmentation folders, with and without the "
        "site's cache)",
    )
    system.set_defaults(handler=system_command)


# ---------------------------------------------------------------------------- report section

SCALE_KINDS = ("flwr-clientapp", "flower-supernode", "flower-superlink", "flwr-serverapp",
               "flower-superexec", "site-worker")  # fmt: skip


def _md_mb(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1e6:.3f}" if value < 1e6 else f"{value / 1e6:.1f}"


def system_section(results: Mapping[str, Any], command: str) -> str:
    """The BENCHMARKS.md section (``fedclinic bench report`` includes it)."""
    settings = results["settings"]
    minutes = results.get("wall_seconds", 0) / 60
    lines = []
    if results.get("mode") != "full":
        lines += [
            f"**{str(results.get('mode', '?')).capitalize()} mode: a smoke test, not a "
            "benchmark; run `--mode full` for the numbers.**",
            "",
        ]
    lines += [
        f"Command: `{command} --out DIR` ({minutes:.0f} min here). Every federation is real: "
        "one SuperLink and one SuperNode per hospital as separate processes, gRPC with TLS and "
        "node authentication; where a hospital has a site worker, it takes its node's messages "
        "itself, else Flower starts one `flwr-clientapp` process per message "
        f"({results.get('cpu_count')} CPU cores, no GPU). {results['rounds']} rounds each; round "
        "1 (ServerApp start-up) is left out; numbers are medians over rounds 2..R. Same "
        f"settings on both sides: model `{settings['model']}`, {settings['local-steps']} local "
        f"step(s) of batch {settings['batch-size']}, Adam, the same synthetic hospitals.",
        "",
        "**Round overhead and peak memory.** Overhead = round wall time minus the slowest "
        "hospital's own compute. fedclinic sends one message per hospital that evaluates then "
        "trains (critical path max(eval + train)); the plain Flower app runs Flower's "
        "`FedAvg.start`, TRAIN then EVALUATE (critical path max(train) + max(eval)). "
        "fedclinic's SuperNodes start through `python -m fedclinic.supernode` (shorter waits "
        "while a run exchanges messages, docs/architecture.md#the-supernodes-waits), the plain "
        "app's keep Flower's own waits. "
        "`fedclinic-fedavg`: each hospital's site worker answers its messages; "
        "`fedclinic-fedavg-no-worker` (full mode): each message is answered in its own ClientApp "
        "process (`--no-worker`). ÷ plain Flower's = the row's median round overhead over the "
        "plain app's at the same hospital count (issue #20's target: at most 0.25 with the "
        "worker).",
        "",
        "| hospitals | app | all rounds complete | round overhead s (median) "
        "| ÷ plain Flower's | per round s "
        "| peak RSS MiB ClientApp / SuperNode / SuperLink / ServerApp / SuperExec / site worker "
        "| load avg before → after |",
        "|---:|---|---|---:|---:|---|---|---|",
    ]
    for r, ratio in zip(results["scale"], plain_ratios(results["scale"]), strict=True):
        peaks = r.get("peak_rss_mib", {})
        per_round = ", ".join(f"{x:.1f}" for x in r.get("round_overhead_seconds", []))
        load = r.get("load_average_1min")
        lines.append(
            f"| {r['hospitals']} | {r['app']} | {'yes' if r['completed'] else 'NO'} | "
            f"{_num(r.get('median_round_overhead_seconds'))} | {_num(ratio, 2)} | {per_round} | "
            + " / ".join(f"{peaks.get(k, 0):.0f}" for k in SCALE_KINDS)
            + f" | {' → '.join(str(x) for x in load) if load else '-'} |"
        )
    lines += [
        "",
        "**Transfer per round, 2 hospitals** (hospitals capped at "
        f"{TRANSFER_SAMPLES} samples so ResNet compute stays small; payload = model bytes "
        "times messages, or pFedNet's own `communication` rows; sketch = pFedNet's one-time "
        "data sketch, all hospitals, sent once before round 1 and not in the per-round "
        "payload: FedAvg's saving over R rounds is R x its payload minus R x pFedNet's minus "
        "the sketch; wire = the kernel's TCP byte counters of the SuperLink's Fleet API "
        "sockets, TLS and gRPC framing included, round 1 and the setup left out; down = "
        "coordinator to hospitals; wire dtype = the run's `wire-dtype`, the precision of the "
        "weights and updates in transit; effective MB/s = the float32 model bytes the round "
        "moved, down + up, per second of round overhead).",
        "",
        "| model | model MB | app | compression | wire dtype | complete "
        "| round overhead s (median) | effective MB/s | payload MB down / up "
        "| sketch MB up, once | wire MB down / up |",
        "|---|---:|---|---|---|---|---:|---:|---|---:|---|",
    ]
    for r in results["transfer"]:
        payload = r.get("payload_bytes_per_round") or {}
        wire = r.get("wire_bytes_per_round") or {}
        lines.append(
            f"| {r['model']} | {_md_mb(r.get('model_bytes'))} | {r['app']} | "
            f"{r.get('compression', 'none')} | {r.get('wire_dtype', 'float32')} | "
            f"{'yes' if r['completed'] else 'NO'} | "
            f"{_num(r.get('median_round_overhead_seconds'))} | "
            f"{_num(r.get('effective_mb_per_s'))} | "
            f"{_md_mb(payload.get('down_bytes'))} / {_md_mb(payload.get('up_bytes'))} | "
            f"{_md_mb(r.get('sketch_up_bytes'))} | "
            f"{_md_mb(wire.get('down_bytes'))} / {_md_mb(wire.get('up_bytes'))} |"
        )
    if not results["transfer"]:
        lines.append("| (not run: `--no-transfer`) | | | | | | | | | | |")
    lines += [
        "",
        "Every model is from fedclinic's registry (`resnet101`: ResNet-101 with the registry's "
        "small-image stem) and both apps build the same one. The scale rows' wire bytes are in "
        "system.json and system.csv, not in the scale table. One repetition per setting, so no "
        "interval. For the small models most of what remains is Flower 1.39's own pacing: a "
        "SuperNode with nothing to do asks for messages every 3 s and polls for the reply "
        "every 0.5 s; without the site worker SuperExec also looks for tasks every 1 s and "
        "starts a `flwr-clientapp` process per message, which imports PyTorch and loads the "
        "data again (the worker takes the node's tasks itself, polling every 0.25 s). For 45 "
        "and 170 MB the bytes dominate: fedclinic sends each model "
        "packed in 20 MB parts (docs/architecture.md#packed-models), which Flower cuts into "
        "5 MB chunks, hashes on both sides and moves one Fleet API call per chunk through "
        "TLS; the plain Flower app sends Flower's usual record of one array per tensor (each "
        "array and each of its chunks one call).",
        "",
        *data_load_lines(results.get("data_load")),
    ]
    return "\n".join(lines) + "\n"
