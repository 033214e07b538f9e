"""The selected round's model stays at the site (fedclinic/site.py; docs/reliability.md).

Sites keep the newest versions of each entry; a model selected on validation data many rounds
ago would be gone, and ``summary.json``'s selected scores would describe a model nobody has.
The coordinator sends the selected model round in every round's config and the site keeps
the versions that round deployed. Here round 2's evaluation (model round 1) is made the best
on validation data, and 6 rounds follow; the site must still hold that model, whose SHA-256
``summary.json`` names, and scoring that file again must give the selected test scores.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Message
from harness import ScriptedGrid, key_of, run
from test_resume import setting

from fedclinic import messages as keys
from fedclinic.config import parse_hospital_config
from fedclinic.data import DataRequest, load_hospital_data
from fedclinic.knowledge import build_network
from fedclinic.models import build_model
from fedclinic.serialization import file_sha256, load_checkpoint
from fedclinic.site import KEPT_VERSIONS, SiteState
from fedclinic.training import evaluate
from strategies import load_run_config
from strategies.fedhelp import input_shape

ROUNDS, BEST = 6, 2  # server round 2 evaluates model round 1


class Favour(ScriptedGrid):
    """Every hospital's validation score is 0.99 in server round ``BEST`` and 0.1 otherwise
    (the test scores stay as the hospital computed them)."""

    def deliver(self, message: Message) -> Message | None:
        reply = super().deliver(message)
        if reply is not None and keys.METRICS in reply.content.metric_records:
            metrics = reply.content.metric_records[keys.METRICS]
            if "val_balanced_accuracy" in metrics:
                best = key_of(message)[0] == BEST
                metrics["val_balanced_accuracy"] = 0.99 if best else 0.1
        return reply


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("algorithm", ["local-only", "pfednet", "fedhelp"])
def test_the_selected_rounds_site_model_is_kept_and_named(tmp_path: Path, algorithm: str) -> None:
    flat, nodes = setting(algorithm, tmp_path)
    flat = {**flat, "rounds": ROUNDS, "run-name": "selected"}
    run(flat, Favour(nodes, flat), tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["selected_round"] == BEST - 1

    run_config = load_run_config(flat)
    checked = 0
    for node in nodes.values():
        name = node["hospital"]
        entry = summary["hospitals"][name]
        if entry["model"] == "global":
            continue  # FedHelp's small hospital deploys the coordinator's model_selected.pt
        digest = entry["selected"]["deployed_sha256"]
        site = Path(node["state-dir"]) / "selected"
        files = {file_sha256(f): f for f in site.glob("*.round-*.pt")}
        assert digest in files, f"{name}: the selected model {digest[:12]} is not at the site"
        kept = SiteState(site).versions(files[digest].name.split(".round-")[0])
        assert len(kept) > KEPT_VERSIONS  # the newest ones and the selected round's
        # the file is the model that was scored: its test loss is the summary's
        hospital = parse_hospital_config(node)
        data = load_hospital_data(DataRequest(run_config, hospital))
        if algorithm == "fedhelp":
            model = build_network("wide-cnn", 2, input_shape(run_config))
        else:
            model = build_model(run_config)
        model.load_state_dict(load_checkpoint(files[digest]))
        scores = evaluate(model, data.test, torch.device("cpu"), 2, "test_")
        assert scores["test_loss"] == pytest.approx(entry["selected"]["test_loss"], abs=1e-6)
        final_digest = entry["final"]["deployed_sha256"]
        assert final_digest in files and final_digest != digest
        checked += 1
    assert checked == (1 if algorithm == "fedhelp" else 2)


def test_a_site_keeps_what_the_selected_round_deployed(tmp_path: Path) -> None:
    """By hand: versions 1..8 saved, model round 3 selected: the newest three (6, 7, 8), the
    newest version up to 3 (what a message of round 4 read) and version 4 (what a message of
    round 4 wrote before evaluating, pFedNet's deployed model)."""
    for server_round in range(1, 9):
        site = SiteState(tmp_path, server_round)
        site.keep_selected(3)
        site.save("model", {"w": torch.tensor([float(server_round)])})
    assert sorted(SiteState(tmp_path).versions("model")) == [3, 4, 6, 7, 8]
    site = SiteState(tmp_path, 10)  # nothing selected: the newest three only
    site.save("model", {"w": torch.tensor([10.0])})
    assert sorted(SiteState(tmp_path).versions("model")) == [7, 8, 10]
    # no version of rounds 3 and 4: the newest up to 3 is kept (what round 4 read)
    other = tmp_path / "other"
    for server_round in (1, 2, 5, 6, 7, 8):
        site = SiteState(other, server_round)
        site.keep_selected(3)
        site.save("model", {"w": torch.tensor([float(server_round)])})
    assert sorted(SiteState(other).versions("model")) == [2, 6, 7, 8]


def test_hospitals_are_told_the_selected_round(tmp_path: Path) -> None:
    """Each round's config carries the model round selected so far (none in round 1)."""
    flat, nodes = setting("local-only", tmp_path)
    flat = {**flat, "rounds": 3}
    seen: dict[int, Any] = {}

    class Recording(Favour):
        def deliver(self, message: Message) -> Message | None:
            config = message.content.config_records[keys.CONFIG]
            seen[key_of(message)[0]] = config.get(keys.SELECTED_ROUND)
            return super().deliver(message)

    from fedclinic.bench.grid import task_identity

    with task_identity():
        run(flat, Recording(nodes, flat), tmp_path / "out")
    assert seen == {1: None, 2: 0, 3: 1, 4: 1}  # round 1's model (r0) first, then r1


def test_a_round_written_again_by_another_message_is_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two messages of one round saving different content under the same name (a hospital
    asked twice, say): the second overwrites the first, whose hash may already have gone to
    the coordinator, so it is said in the log. One message saving twice is not."""
    first = SiteState(tmp_path, server_round=2)
    first.save("model", {"w": torch.zeros(3)})
    first.save("model", {"w": torch.ones(3)})  # the same message: nothing said
    assert "written again" not in caplog.text
    SiteState(tmp_path, server_round=2).save("model", {"w": torch.full((3,), 2.0)})
    assert "model.round-2.pt of round 2 written again by another message" in caplog.text
