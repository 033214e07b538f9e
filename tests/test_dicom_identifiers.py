"""Issue 21.2: patient identifiers stay at the hospital.

Two hospitals train on DICOM exports full of identifying headers (names, MRNs, birth dates,
accession numbers, institution, UIDs) through the real round engine and ClientApp handler
(in process, :func:`fedclinic.bench.grid.run_federation`); a third one's label sheet names a
study it did not export, so its error goes to the coordinator too. Then every byte the
coordinator stored (metrics, audit, summary, config, models and their metadata, checkpoint)
is searched for every identifying value and for the sites' paths: none may be there; so is
every reply the hospitals sent, serialised as Flower sends it and the SuperLink stores it
(the transport adds nothing of the hospital's: TLS and node authentication are checked on real
processes in the tests/test_e2e_*.py files). Decoded images stay in each site's cache.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from dicom_files import chest_export, identifying_values, write_sheet
from flwr.common.serde import message_to_proto
from harness import ScriptedGrid, rows_of, run

from fedclinic.bench.grid import quiet_flower
from fedclinic.data.cache import CACHE_DIR


def hospital(tmp_path: Path, name: str, first: int, patients: int) -> tuple[dict, Path, list]:
    root = tmp_path / name / "pacs-export"
    studies, rows = chest_export(root, patients, first=first, seed=first)
    write_sheet(root / "labels.csv", rows)
    node = {
        "hospital": name,
        "data-source": "dicom",
        "data-path": str(root),
        "dicom-modality": "CR",
        "device": "cpu",
        "state-dir": str(tmp_path / name / "state"),
    }
    return node, root, studies


@pytest.mark.usefixtures("task_identity")
def test_nothing_identifying_reaches_the_coordinator(tmp_path: Path) -> None:
    a, _, studies_a = hospital(tmp_path, "st-mary", 0, 30)
    b, _, studies_b = hospital(tmp_path, "county", 100, 30)
    c, root_c, studies_c = hospital(tmp_path, "general", 200, 12)
    # general's sheet row 2 names a study that is not in its export
    (root_c / "P200").rename(root_c.parent / "P200-not-exported")
    flat = {
        "algorithm": "fedavg",
        "model": "cnn",
        "image-size": 16,
        "rounds": 2,
        "local-steps": 2,
        "batch-size": 8,
        "min-hospitals": 2,
        "seed": 1,
    }
    out = tmp_path / "coordinator"
    grid = ScriptedGrid({100: a, 101: b, 102: c}, flat)
    with quiet_flower():
        run(flat, grid, out)

    metrics = rows_of(out)
    trained = {r["hospital"] for r in metrics if r["kind"] == "train"}
    assert trained == {"st-mary", "county"}, metrics
    errors = [r for r in metrics if r["kind"] == "error" and r.get("hospital") == "general"]
    assert errors and "label sheet row 2: no DICOM file" in errors[0]["reason"], errors

    secrets = identifying_values(studies_a + studies_b + studies_c, tmp_path)
    assert any(s.startswith("MRN") for s in secrets) and any("^" in s for s in secrets)
    secrets += [str(tmp_path), "pacs-export", "labels.csv", "IM0001", "P200"]
    stored = [f for f in out.rglob("*") if f.is_file()]
    names = {f.name for f in stored}
    assert {"metrics.jsonl", "audit.jsonl", "summary.json", "config.json"} <= names, names
    assert any(f.suffix == ".pt" for f in stored), names
    for file in stored:
        blob = file.read_bytes()
        for secret in secrets:
            assert secret.encode() not in blob, (file.name, secret)
    replies = [message_to_proto(m).SerializeToString() for m in grid.answers.values()]
    assert len(replies) >= 8  # 2 rounds x (train + evaluate) x 2 hospitals, and more
    for blob in replies:
        for secret in secrets:
            assert secret.encode() not in blob, secret
    # decoded once, at the site (the cache lives in the hospital's state dir)
    for name in ("st-mary", "county"):
        assert (tmp_path / name / "state" / CACHE_DIR).is_dir(), name
    assert trained_sources(metrics) == {"dicom"}


def trained_sources(metrics: list[dict]) -> set[str]:
    """Every training row names its data source (and a fingerprint of the site's data)."""
    trained = [r for r in metrics if r["kind"] == "train"]
    assert all(r["data_fingerprint"] for r in trained), trained
    return {r["data_source"] for r in trained}
