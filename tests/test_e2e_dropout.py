"""Hospitals that do not answer, on real processes (TLS + node auth, site workers), in one run
of four hospitals with DP-SGD at the sites and secure aggregation (SecAgg+, min-hospitals = 2):

- dropout: a hospital whose whole process group is SIGKILLed during round 1 does not stall
  the federation. The round finishes with the hospitals that answered, the missing one is
  written as an error row and listed as failed in the audit log, and after a restart with the
  same key it rejoins a later round. Flower 1.39 declares a silent node offline only after its
  heartbeat patience (up to 60 s): that wait is most of this test's time.
- a hospital's own privacy budget (docs/privacy.md): a site whose ceiling is below one round's
  ε refuses every round with one line, the federation goes on without it, the others train
  with DP-SGD (one of them requires it) and keep their ledgers; the summary records ε per
  hospital.
- secure aggregation with dropouts (docs/privacy.md, section 7): the hospital at its ceiling
  drops every round after sharing its keys, and the coordinator rebuilds its pairwise masks
  from the others' shares; the killed one never joined round 1's key agreement, and the
  restarted one is summed again. A round is four exchanges; the hospitals keep nothing
  usable of their secrets after the unmask.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from fedclinic.audit import AuditLog
from fedclinic.config import parse_hospital_config
from fedclinic.local.configs import HospitalSpec, synthetic_hospitals
from fedclinic.local.federation import FederationOptions, LocalFederation, log_name
from fedclinic.local.supervisor import pids_with_cmdline
from fedclinic.privacy import LEDGER

ROOT = Path(__file__).resolve().parents[1]


def rows_of(out: Path) -> list[dict[str, Any]]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def local_federation(
    tmp_path: Path, hospitals: list[HospitalSpec], run_config: dict[str, Any]
) -> LocalFederation:
    """A quiet local federation (TLS, node auth) writing to ``tmp_path/out``."""
    out = tmp_path / "out"
    options = FederationOptions(
        app_dir=ROOT,
        output_dir=out,
        run_config={**run_config, "output-dir": str(out)},
        hospitals=hospitals,
        work_dir=tmp_path / "w",
        timeout=600,
    )
    return LocalFederation(options, Console(quiet=True))


def start_and_submit(federation: LocalFederation) -> int:
    """SuperLink, hospitals, the run: its Flower run id."""
    federation.prepare()
    federation.start_superlink()
    federation.start_hospitals()
    return federation.submit()


def with_settings(spec: HospitalSpec, **settings: object) -> HospitalSpec:
    flat = {**spec.flat, **settings, "device": "cpu"}
    return HospitalSpec(parse_hospital_config(flat), flat)


@pytest.mark.e2e
@pytest.mark.long
def test_a_killed_hospital_is_skipped_then_rejoins_and_one_at_its_ceiling_refuses(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    hospitals = synthetic_hospitals(4, tmp_path / "state")
    hospitals[1] = with_settings(hospitals[1], **{"privacy-required": True})
    hospitals[3] = with_settings(hospitals[3], **{"privacy-epsilon": 0.01})
    victim, thrifty = hospitals[2], hospitals[3]
    run_config = {
        "rounds": 4, "local-steps": 2, "min-hospitals": 2, "round-timeout": 200.0,
        "dp": "dp-sgd", "dp-noise-multiplier": 1.5, "secure-aggregation": True,
    }  # fmt: skip
    federation = local_federation(tmp_path, hospitals, run_config)
    with federation.supervisor:
        run_id = start_and_submit(federation)

        # The site crashes: SuperNode, SuperExec and any ClientApp, all at once.
        time.sleep(2)
        # (each in its own process group; all carry the hospital's FLWR_HOME)
        site = pids_with_cmdline(str(federation.paths()["homes"] / victim.name), environ=True)
        for pid in site:
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 240
        # Never heard from before, the hospital is named by its node ID in round 1.
        victim_node = federation.node_ids[victim.name]
        while not any(r["kind"] == "error" and r["node_id"] == victim_node for r in rows_of(out)):
            assert time.monotonic() < deadline, "round 1 never reported the missing hospital"
            time.sleep(1)

        # Restarted with the same key and state directory (and Runtime API port, where its
        # site worker, restarted by the keeper, takes the tasks): it joins a later round.
        port = federation.runtime_ports[victim.name]
        federation.supernodes[victim.name] = federation.supervisor.start(
            victim.name,
            federation.supernode_command(victim, port),
            federation.work / log_name(f"{victim.name}-restarted"),
            env={**federation.env, "FLWR_HOME": str(federation.paths()["homes"] / victim.name)},
            tier=1,
        )
        outcome = federation.report(federation.follow(run_id))
        assert outcome.exit_code == 0, outcome.details

    rows = rows_of(out)
    refused = [r for r in rows if r["kind"] == "error" and r.get("hospital") == thrifty.name]
    assert [r["round"] for r in refused] == [1, 2, 3, 4]
    assert all(r["reason"].startswith("privacy budget: ε 0.00 of 0.01 spent") for r in refused)
    errors = [r for r in rows if r["kind"] == "error" and r not in refused]
    assert [(r["round"], r["node_id"]) for r in errors] == [(1, victim_node)]
    trained = {(r["round"], r["hospital"]) for r in rows if r["kind"] == "train"}
    others = [h.name for h in hospitals[:2]]
    assert {(n, h) for n in range(1, 5) for h in others} <= trained  # never stalled
    assert any(h == victim.name and n > 1 for n, h in trained)  # rejoined
    assert not {h for _, h in trained} & {thrifty.name}
    for name in others:  # one ledger line per round trained, on the hospital's side only
        ledger = (tmp_path / "state" / name / LEDGER).read_text().splitlines()
        assert [json.loads(line)["round"] for line in ledger] == [1, 2, 3, 4]
    assert not (tmp_path / "state" / thrifty.name / LEDGER).exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["privacy"]["dp"] == "dp-sgd"
    assert all(summary["hospitals"][name]["privacy"]["epsilon"] > 0 for name in others)
    audit = AuditLog(out).read()
    first = next(e for e in audit if e["event"] == "round" and e["round"] == 1)
    label = f"node-{victim_node}"
    assert label in first["asked"] and label in first["failed"]
    assert first["accepted"] == sorted(others)
    assert thrifty.name in first["failed"]
    assert [x["exchange"] for x in first["exchanges"]] == [
        "secagg-setup", "secagg-share-keys", "train", "secagg-unmask",
    ]  # fmt: skip

    # secure aggregation: what was summed, and whose masks were rebuilt from shares
    assert summary["privacy"]["secure_aggregation"] is True
    secure = {e["round"]: e for e in summary["secure_aggregation_rounds"]}
    assert sorted(secure) == [1, 2, 3, 4]
    for entry in secure.values():
        assert set(others) <= set(entry["summed"]) and thrifty.name not in entry["summed"]
        assert thrifty.name in entry["recovered"]
    assert victim.name not in secure[1]["summed"] + secure[1]["recovered"]
    assert any(victim.name in secure[n]["summed"] for n in (2, 3, 4))  # rejoined, summed
    for name in others:  # nothing usable of the last round's secrets is kept
        (state,) = (tmp_path / "state" / name).rglob("secagg/round-4.json")
        kept = json.loads(state.read_text())
        assert kept["sk1"] == kept["sk2"] == kept["seed"] == ""
    assert audit[-1]["event"] == "run_end" and audit[-1]["status"] == "completed"
