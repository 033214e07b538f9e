"""What `make compose-test` asserts after `docker compose up --exit-code-from submit` exited 0.

``python .ci/compose_check.py OUT``, where OUT holds what the test copied out of the stopped
containers: ``runs/`` (the coordinator's /runs/compose), ``certs/`` (the certs volume), each
service's log and each hospital's exit status. One line per failed check, exit 1.

- the run completed: ``run_end`` completed in the audit log, ``summary.json`` completed, every
  hospital trained in every round and was accepted, no error rows;
- TLS: the audit log records the certificates the coordinator served, and they are the
  provisioned ``ca.crt`` and ``server.pem`` (SHA-256 of the DER);
- node authentication: the coordinator did not run without it, and every hospital joined under
  the node ID ``fedclinic register`` got for its key (without authentication a SuperNode gets
  a fresh random ID);
- a clean stop: every hospital container exited 0 on compose's SIGTERM.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import re
import sys
import tomllib
from pathlib import Path

from fedclinic.pki import fingerprint

HOSPITALS = ("hospital-a", "hospital-b", "hospital-c")
ROOT = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check(out: Path) -> list[str]:
    problems: list[str] = []
    rounds = tomllib.loads((ROOT / "examples" / "compose.toml").read_text())["rounds"]
    runs, certs = out / "runs", out / "certs"

    audit = read_jsonl(runs / "audit.jsonl")
    events = [e["event"] for e in audit]
    end = audit[-1] if audit else {}
    if end.get("event") != "run_end" or end.get("status") != "completed":
        problems.append(f"audit log: the run did not end completed: {end}")
    for event in (e for e in audit if e["event"] == "round"):
        for key in ("asked", "answered", "accepted"):
            if sorted(event.get(key, [])) != list(HOSPITALS):
                problems.append(f"audit log: round {event['round']}: {key} = {event.get(key)}")
    if events.count("round") != rounds:
        problems.append(f"audit log: {events.count('round')} rounds, expected {rounds}")

    summary = json.loads((runs / "summary.json").read_text())
    if summary.get("status") != "completed" or summary.get("rounds") != rounds:
        problems.append(f"summary.json: status {summary.get('status')}, {summary.get('rounds')}")
    rows = read_jsonl(runs / "metrics.jsonl")
    trained = {(r["round"], r["hospital"]) for r in rows if r["kind"] == "train"}
    expected = {(n, h) for n in range(1, rounds + 1) for h in HOSPITALS}
    if trained != expected:
        problems.append(f"metrics: trained {sorted(trained)}, expected {sorted(expected)}")
    errors = [r for r in rows if r["kind"] in ("error", "rejected")]
    if errors:
        problems.append(f"metrics: {len(errors)} error/rejected rows, first {errors[0]}")

    start = next((e for e in audit if e["event"] == "run_start"), {})
    served = {Path(f).name: v for f, v in start.get("certificates", {}).items()}
    provisioned = {name: fingerprint(certs / name) for name in ("ca.crt", "server.pem")}
    if served != provisioned:
        problems.append(f"TLS: the coordinator served {served}, provisioned {provisioned}")

    coordinator = ANSI.sub("", (out / "coordinator.log").read_text())
    if "SuperNode authentication is disabled" in coordinator:
        problems.append("node authentication: the coordinator ran without it")
    registered = dict(
        re.findall(r"(hospital-\w+): registered as node (\d+)", (out / "register.log").read_text())
    )
    for hospital in HOSPITALS:
        log = ANSI.sub("", (out / f"{hospital}.log").read_text())
        joined = set(re.findall(r"SuperNode ID: (\d+)", log))
        if not registered.get(hospital) or joined != {registered[hospital]}:
            problems.append(
                f"node authentication: {hospital} joined as {sorted(joined)}, registered as "
                f"{registered.get(hospital)}"
            )
        status = (out / f"{hospital}.state").read_text().split()[0]
        if status != "0":
            problems.append(f"{hospital}: exited {status} when compose stopped it, expected 0")
    return problems


def stamp(text: str) -> dt.datetime:
    """An RFC 3339 timestamp from Docker (nanoseconds cut to microseconds)."""
    whole, _, fraction = text.rstrip("Z").partition(".")
    return dt.datetime.fromisoformat(f"{whole}.{(fraction + '000000')[:6]}+00:00")


def activation_times(out: Path) -> list[str]:
    """Per hospital: container start -> `fedclinic hospital` ready ("joining") -> Flower's
    SuperNode started -> activated ("SuperNode ID"), from the logs' Docker timestamps."""
    lines = []
    for hospital in HOSPITALS:
        started = stamp((out / f"{hospital}.state").read_text().split()[1])
        marks: dict[str, dt.datetime] = {}
        for line in ANSI.sub("", (out / f"{hospital}.log").read_text()).splitlines():
            parts = line.split("|", 1)[-1].split(maxsplit=1)
            if len(parts) < 2:
                continue
            for key, text in (("ready", "joining"), ("flower", "Starting Flower SuperNode"),
                              ("active", "SuperNode ID:")):  # fmt: skip
                if text in parts[1] and key not in marks:
                    marks[key] = stamp(parts[0])
        if len(marks) == 3:
            steps = [started, marks["ready"], marks["flower"], marks["active"]]
            gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(steps)]
            lines.append(
                f"{hospital}: {sum(gaps):.0f} s from container start to activation "
                f"(fedclinic hospital start {gaps[0]:.0f} s, flower-supernode start "
                f"{gaps[1]:.0f} s, activation {gaps[2]:.0f} s)"
            )
    return lines


def main() -> int:
    out = Path(sys.argv[1])
    problems = check(out)
    for line in activation_times(out):
        print(line, file=sys.stderr)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if not problems:
        print(
            "checks: run completed (audit log, summary, every hospital in every round), TLS "
            "with the provisioned certificates, hospitals under their registered node IDs, "
            "clean stops",
            file=sys.stderr,
        )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
