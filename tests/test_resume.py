"""Resume after a coordinator crash, in process, for every algorithm.

The reference run goes through all rounds. The crashed run dies in the middle of round
``k + 1`` (here round 2): the hospitals have already trained (and saved their site state for
round k + 1), but the replies never reach the coordinator, as when its machine loses power. A new
coordinator started with ``resume = true`` on the same output directory goes on from the
round-k checkpoint. Its final model, the hospitals' site state and the final evaluations must
equal the reference run's bit for bit (CPU, fixed seeds). The real-process version (SIGKILL
of the SuperLink) is tests/test_e2e_resume.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from harness import CoordinatorCrash, ScriptedGrid, run, synthetic_nodes

from fedclinic import checkpoint
from fedclinic.errors import ConfigError, IntegrityError
from fedclinic.serialization import record_to_numpy
from strategies import load_run_config
from strategies.fedavg import FedAvgStrategy

ROUNDS, CRASH_IN_ROUND = 2, 2  # checkpoint of round 1, crash during round 2


def fedhelp_files(folder: Path) -> dict[str, Any]:
    from fedclinic.knowledge import build_knowledge, write_synthetic_public

    public = write_synthetic_public(folder / "public.npz", 16, 2, seed=1000)
    np.save(folder / "api.npy", np.random.default_rng(0).normal(scale=2.0, size=(16, 2)))
    digest, _ = build_knowledge(public, folder / "knowledge.npz", logits_file=folder / "api.npy")
    return {"public": str(public), "knowledge": str(folder / "knowledge.npz"), "sha": digest}


def setting(algorithm: str, folder: Path) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
    """Run config and hospitals; every algorithm keeps some state between rounds."""
    flat: dict[str, Any] = {
        "algorithm": algorithm,
        "model": "cnn",
        "rounds": ROUNDS,
        "local-steps": 2,
        "batch-size": 16,
        "seed": 5,
        "min-hospitals": 2,
        "output-dir": str(folder / "out"),
    }
    nodes = synthetic_nodes(folder, 2)
    if algorithm == "pfednet":
        flat.update(
            {
                "pfednet.compression": "stc",
                "pfednet.admm-iterations": 10,
                "pfednet.allow-rank-deficient-sketch": True,  # 28 images of 784 pixels
            }
        )
    if algorithm == "fedmas":
        flat.update({"fedmas.prior-source": "random", "fedmas.prior-arch": "cnn"})
    if algorithm == "fedhelp":
        files = fedhelp_files(folder)
        flat.update({"fedhelp.large-model": "wide-cnn", "fedhelp.knowledge-sha256": files["sha"]})
        for node, role in zip(nodes.values(), ("large", "small"), strict=True):
            node.update(
                {
                    "role": role,
                    "public-data-path": files["public"],
                    "knowledge-path": files["knowledge"],
                }
            )
    return flat, nodes


def exchanges_before_round(algorithm: str, server_round: int) -> int:
    """Exchanges (pushes to the grid) before round ``server_round`` starts (setup query +
    rounds)."""
    setup = 1 if algorithm in ("fedhelp", "pfednet") else 0
    per_round = 2 if algorithm == "pfednet" else 1  # pFedNet: shared + personal phase (cnn)
    return setup + per_round * (server_round - 1)


def start(flat: dict[str, Any], grid: ScriptedGrid) -> Any:
    flat = {"run-name": "resume-test", **flat}  # the site key hospitals file state under
    _, result = run(flat, grid, Path(load_run_config(flat).output_dir))
    return result


def site_files(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every hospital's newest site-state version of each entry, by relative path."""
    newest: dict[str, Path] = {}
    for file in sorted((folder / "state").rglob("*.round-*.pt")):
        entry = str(file.relative_to(folder)).rsplit(".round-", 1)[0]
        current = newest.get(entry)
        if current is None or _round_of(file) > _round_of(current):
            newest[entry] = file
    return {k: torch.load(v, weights_only=True) for k, v in newest.items()}


def _round_of(file: Path) -> int:
    return int(file.name.rsplit(".round-", 1)[1].removesuffix(".pt"))


def evaluations(folder: Path) -> list[tuple[Any, ...]]:
    rows = [json.loads(x) for x in (folder / "out" / "metrics.jsonl").read_text().splitlines()]
    return sorted(
        (r["round"], r["hospital"], r.get("test_loss"), r.get("val_accuracy"))
        for r in rows
        if r["kind"] == "evaluate"
    )


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("algorithm", ["fedavg", "fedprox", "local-only", "pfednet", "fedhelp",
                                       "fedmas"])  # fmt: skip
def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path: Path, algorithm: str) -> None:
    reference_dir, crashed_dir = tmp_path / "reference", tmp_path / "crashed"
    flat, nodes = setting(algorithm, reference_dir)
    reference = start(flat, ScriptedGrid(nodes, flat))

    flat, nodes = setting(algorithm, crashed_dir)
    crash_at = exchanges_before_round(algorithm, CRASH_IN_ROUND) + 1
    with pytest.raises(CoordinatorCrash):
        start(flat, ScriptedGrid(nodes, flat, crash_at=crash_at))
    saved = checkpoint.load(crashed_dir / "out")
    assert saved.round == CRASH_IN_ROUND - 1
    resumed = start({**flat, "resume": True}, ScriptedGrid(nodes, {**flat, "resume": True}))

    ours, theirs = record_to_numpy(resumed.arrays), record_to_numpy(reference.arrays)
    assert ours.keys() == theirs.keys()
    for key in ours:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
    ours_site, theirs_site = site_files(crashed_dir), site_files(reference_dir)
    assert ours_site.keys() == theirs_site.keys()
    for entry in ours_site:
        for key in ours_site[entry]:
            assert torch.equal(ours_site[entry][key], theirs_site[entry][key]), (entry, key)
    assert evaluations(crashed_dir) == evaluations(reference_dir)

    out = crashed_dir / "out"
    events = [json.loads(x)["event"] for x in (out / "audit.jsonl").read_text().splitlines()]
    assert events.count("run_start") == 1 and events.count("run_resumed") == 1
    assert events[-1] == "run_end"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    reference_summary = json.loads((reference_dir / "out" / "summary.json").read_text())
    assert summary["selected_round"] == reference_summary["selected_round"]


@pytest.mark.usefixtures("task_identity")
def test_rows_of_the_unfinished_round_are_set_aside_not_duplicated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flat, nodes = setting("fedavg", tmp_path)

    def die_after_round_2(self: Any, server_round: int, arrays: Any) -> None:
        if server_round == 2:  # round 2's rows are written, its checkpoint is not
            raise CoordinatorCrash

    flat = {**flat, "rounds": 3}
    with monkeypatch.context() as patch:
        patch.setattr(FedAvgStrategy, "after_round", die_after_round_2)
        with pytest.raises(CoordinatorCrash):
            start(flat, ScriptedGrid(nodes, flat))
    out = tmp_path / "out"
    written = (out / "metrics.jsonl").read_text().splitlines()
    assert any(json.loads(x)["round"] == 2 for x in written)
    start({**flat, "resume": True}, ScriptedGrid(nodes, {**flat, "resume": True}))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [(r["round"], r["hospital"]) for r in rows if r["kind"] == "train"]
    assert sorted(trained) == sorted((r, f"hospital-{h}") for r in (1, 2, 3) for h in "ab")
    aside = [json.loads(x) for x in (out / "metrics.discarded.jsonl").read_text().splitlines()]
    assert aside and {r["round"] for r in aside} == {2}
    assert len(rows) + len(aside) > len(written)  # round 2 written twice, once set aside
    assert "metrics.discarded.jsonl" not in (out / "metrics.csv").read_text()


def test_resume_refuses_a_changed_config_naming_the_key(tmp_path: Path) -> None:
    checkpoint.check_same_run({"rounds": 3, "seed": 1}, {"rounds": 5, "seed": 1})  # more rounds
    with pytest.raises(ConfigError, match=r"key 'learning-rate' is 0\.1, but .* used 0\.01"):
        checkpoint.check_same_run({"learning-rate": 0.01}, {"learning-rate": 0.1})


def test_resume_without_a_checkpoint_or_output_dir_says_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="resume = true needs output-dir"):
        load_run_config({"resume": True})
    with pytest.raises(ConfigError, match=r"checkpoint\.pkl' does not exist"):
        checkpoint.load(tmp_path)
    (tmp_path / checkpoint.CHECKPOINT_FILE).write_bytes(b"not a pickle")
    with pytest.raises(IntegrityError, match="unreadable or corrupt"):
        checkpoint.load(tmp_path)
    older = checkpoint.Checkpoint(round=1, arrays={}, config={}, site_key="s", rows=0, format=1)
    checkpoint.save(tmp_path, older)
    with pytest.raises(IntegrityError, match="has format 1; this coordinator resumes format 2"):
        checkpoint.load(tmp_path)


@pytest.mark.usefixtures("task_identity")
def test_hospitals_back_under_new_node_ids_keep_their_fedhelp_roles(tmp_path: Path) -> None:
    """A coordinator restarted with a fresh database knows the hospitals under new node IDs:
    one name query re-keys the roles, and the run still equals the uninterrupted one."""
    flat, nodes = setting("fedhelp", tmp_path / "reference")
    reference = start(flat, ScriptedGrid(nodes, flat))
    flat, nodes = setting("fedhelp", tmp_path / "crashed")
    with pytest.raises(CoordinatorCrash):
        crash_at = exchanges_before_round("fedhelp", CRASH_IN_ROUND) + 1
        start(flat, ScriptedGrid(nodes, flat, crash_at=crash_at))
    renumbered = {node + 5000: config for node, config in nodes.items()}
    flat = {**flat, "resume": True}
    resumed = start(flat, ScriptedGrid(renumbered, flat))
    ours, theirs = record_to_numpy(resumed.arrays), record_to_numpy(reference.arrays)
    for key in theirs:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
    lines = (tmp_path / "crashed" / "out" / "metrics.jsonl").read_text().splitlines()
    roles = [json.loads(x) for x in lines if '"fedhelp-role"' in x]
    assert roles and all(r["role_source"] != "late-join" for r in roles)
