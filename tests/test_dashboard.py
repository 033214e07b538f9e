"""``fedclinic dashboard`` without a browser: what it reads from a run directory (against hand
computations on a run written here), and its guards (paths, token, hosts, headers, the
command's checks). The pages in a real browser: tests/test_dashboard_browser.py.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import re
import socket
import ssl
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from starlette.testclient import TestClient

from fedclinic.cli import build_parser, main
from fedclinic.dashboard.app import (
    CONTENT_SECURITY_POLICY,
    COOKIE,
    STATIC,
    TEMPLATES,
    Settings,
    create_app,
    host_of,
)
from fedclinic.dashboard.command import TOKEN_VARIABLE, Dashboard, Tls
from fedclinic.dashboard.nodes import SuperLinkNodes
from fedclinic.dashboard.runs import RunsRoot, RunView
from fedclinic.errors import ConfigError
from fedclinic.pki import Provisioned, provision

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "s3cret-token-0123456789abcdef"
T0 = 1_700_000_000.0
CONFIG = {"algorithm": "fedavg", "task": "classification", "rounds": 2, "round-timeout": 60.0,
          "selection-metric": "auto", "seed": 1, "output-dir": "/runs/a",
          "fedprox.proximal-mu": 0.01}  # fmt: skip
EVIL = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=1">'


def write_run(
    directory: Path,
    config: dict[str, Any],
    rows: list[dict[str, Any]],
    audit: list[dict[str, Any]],
    summary: dict[str, Any] | None = None,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / "audit.jsonl").write_text("".join(json.dumps(e) + "\n" for e in audit))
    if summary is not None:
        (directory / "summary.json").write_text(json.dumps(summary))
    return directory


def evaluate(hospital: str, server_round: int, t: float, node: int, **metrics: Any) -> dict:
    return {"kind": "evaluate", "hospital": hospital, "node_id": node, "round": server_round,
            "model_round": server_round - 1, "model": "global", "time": t, **metrics}  # fmt: skip


def scored(hospital: str, server_round: int, t: float, node: int, val: float, test: float,
           seconds: float) -> dict:  # fmt: skip
    return evaluate(hospital, server_round, t, node, val_balanced_accuracy=val,
                    test_balanced_accuracy=test, eval_seconds=seconds)  # fmt: skip


def train(hospital: str, server_round: int, t: float, node: int, num_train: int, seconds: float,
          fingerprint: str = "fp") -> dict:  # fmt: skip
    return {"kind": "train", "hospital": hospital, "node_id": node, "round": server_round,
            "num_train": num_train, "seconds": seconds, "device": "cpu", "train_loss": 0.5,
            "num_examples": 8, "steps": 1, "data_source": "synthetic",
            "data_fingerprint": f"{hospital}-{fingerprint}", "time": t}  # fmt: skip


def round_event(server_round: int, t: float, accepted: list[str], **extra: Any) -> dict:
    asked = sorted({*accepted, *extra.get("rejected", {}), *extra.get("failed", {})})
    return {"time": t, "event": "final_evaluation" if server_round == 3 else "round",
            "round": server_round, "asked": asked, "answered": asked, "accepted": accepted,
            "rejected": {}, "failed": {}, "resent": {}, "duplicates": {}, **extra}  # fmt: skip


def summary_of(scores: dict[str, float]) -> dict[str, Any]:
    return {
        "status": "completed", "rounds": 2, "selected_round": 1,
        "selection_metric": "val_balanced_accuracy", "selection_note": "chosen on validation data",
        "hospitals": {h: {"selected": {"test_balanced_accuracy": v, "test_loss": 1 - v},
                          "final": {}, "site_models": {}} for h, v in scores.items()},
        "model": {"path": "model_final.pt", "sha256": "", "content_sha256": "c1"},
        "selected_model": {"path": "/elsewhere/../model_selected.pt", "sha256": "",
                           "content_sha256": "c2"},
    }  # fmt: skip


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """Two runs of one study (FedAvg and its local-only baseline) with hand-chosen numbers.

    FedAvg: hospitals a (90 train samples), b (80), c (10: under 10 % of 180, "small");
    round 1 runs 100 s -> 130 s, round 2 130 -> 170 (b refused), the final evaluation 170 ->
    175 (c failed); summary scores a 0.8, b 0.7, c 0.6. Local-only: a 0.75, b 0.72, c 0.40.
    """
    root = tmp_path / "runs"
    rows = [
        scored("a", 1, T0 + 110, 1, 0.5, 0.5, 1.0),
        scored("b", 1, T0 + 110, 2, 0.4, 0.45, 2.0),
        scored("c", 1, T0 + 112, 3, 0.3, 0.35, 0.5),
        train("a", 1, T0 + 120, 1, 90, 4.0), train("b", 1, T0 + 121, 2, 80, 6.0),
        train("c", 1, T0 + 122, 3, 10, 1.5),
        scored("a", 2, T0 + 140, 1, 0.7, 0.72, 1.0),
        scored("c", 2, T0 + 141, 3, 0.6, 0.62, 0.5),
        train("a", 2, T0 + 150, 1, 90, 3.0), train("c", 2, T0 + 151, 3, 10, 1.0),
        {"kind": "rejected", "hospital": "b", "node_id": 2, "round": 2, "time": T0 + 152,
         "reason": "update norm 99 is 12x the median"},
        scored("a", 3, T0 + 172, 1, 0.8, 0.8, 1.0),
        scored("b", 3, T0 + 173, 2, 0.7, 0.7, 2.0),
        {"kind": "error", "hospital": "c", "node_id": 3, "round": 3, "time": T0 + 174,
         "reason": "no reply within round-timeout = 60 s"},
    ]  # fmt: skip
    audit = [
        {"time": T0 + 100, "event": "run_start", "from_round": 1, "config": CONFIG,
         "config_sha256": "abc", "code": {"fedclinic": "0.1.0", "git_commit": "f" * 40}},
        round_event(1, T0 + 130, ["a", "b", "c"]),
        round_event(2, T0 + 170, ["a", "c"], rejected={"b": "update norm 99 is 12x the median"},
                    resent={"c": 1}),
        round_event(3, T0 + 175, ["a", "b"], failed={"c": "no reply within round-timeout = 60 s"}),
        {"time": T0 + 176, "event": "run_end", "status": "completed", "rounds": 2},
    ]  # fmt: skip
    fedavg = write_run(root / "study-fedavg", CONFIG, rows, audit,
                       summary_of({"a": 0.8, "b": 0.7, "c": 0.6}))  # fmt: skip
    (fedavg / "model_final.pt").write_bytes(b"final weights")
    (fedavg / "model_selected.pt").write_bytes(b"selected weights")
    summary = json.loads((fedavg / "summary.json").read_text())
    summary["model"]["sha256"] = hashlib.sha256(b"final weights").hexdigest()
    summary["selected_model"]["sha256"] = "0" * 64  # does not match its file
    (fedavg / "summary.json").write_text(json.dumps(summary))
    (fedavg / "checkpoint.pkl").write_bytes(b"not served")
    local = {**CONFIG, "algorithm": "local-only", "output-dir": "/runs/b", "fedprox.proximal-mu": 1}
    local_rows = [
        train(h, 1, T0, n, s, 1.0) for h, n, s in (("a", 1, 90), ("b", 2, 80), ("c", 3, 10))
    ]
    write_run(
        root / "study-local", local, local_rows, [], summary_of({"a": 0.75, "b": 0.72, "c": 0.40})
    )
    other = {**CONFIG, "algorithm": "local-only", "seed": 2}  # another seed: not a baseline
    write_run(root / "other-seed-local", other, [], [], summary_of({"a": 1.0, "b": 1.0, "c": 1.0}))
    return root  # fmt: skip


# ---------------------------------------------------------------------------- what a run says


def test_run_view_against_hand_computations(runs: Path) -> None:
    view = RunsRoot(runs).view("study-fedavg", now=T0 + 200)
    assert view is not None
    assert view["status"] == "completed" and view["completed_rounds"] == 2 and view["rounds"] == 2

    hospitals = {h["name"]: h for h in view["hospitals"]}
    # last seen: its latest answer (evaluate/train/refused row); a failure is not an answer
    assert hospitals["a"]["last_seen"] == T0 + 172
    assert hospitals["b"]["last_seen"] == T0 + 173
    assert hospitals["c"]["last_seen"] == T0 + 151
    assert hospitals["c"]["share"] == pytest.approx(10 / 180)
    assert (hospitals["b"]["refusals"], hospitals["c"]["failures"]) == (1, 1)
    assert hospitals["c"]["last_outcome"] == "failed" and hospitals["c"]["outcome_round"] == 3
    assert hospitals["a"]["node_id"] == 1

    timeline = {t["round"]: t for t in view["timeline"]}
    assert [timeline[r]["seconds"] for r in (1, 2, 3)] == [30.0, 40.0, 5.0]
    assert timeline[3]["final"] and not timeline[2]["final"]
    # a hospital's own seconds: training + evaluation of that round
    assert timeline[1]["hospitals"]["b"] == {"train_seconds": 6.0, "eval_seconds": 2.0,
                                             "outcome": "accepted"}  # fmt: skip
    assert timeline[2]["hospitals"]["b"]["outcome"] == "refused"
    assert timeline[3]["hospitals"]["c"]["outcome"] == "failed"

    curves = view["curves"]
    assert curves["x"] == [0, 1, 2] and curves["hospitals"] == ["a", "b", "c"]
    assert curves["values"]["test_balanced_accuracy"]["b"] == [0.45, None, 0.7]
    assert "eval_seconds" not in curves["metrics"]

    events = {(e["round"], e["hospital"], e["what"]): e["reason"] for e in view["events"]}
    assert events == {
        (2, "b", "refused"): "update norm 99 is 12x the median",
        (2, "c", "asked again"): "1 message(s) sent again",
        (3, "c", "failed"): "no reply within round-timeout = 60 s",
    }


def test_equity_uses_the_local_only_run_of_the_same_config(runs: Path) -> None:
    equity = RunsRoot(runs).view("study-fedavg", now=T0 + 200)["equity"]
    assert equity["metric"] == "test_balanced_accuracy"  # val_ selection metric's test twin
    assert equity["baseline"] == "study-local"  # not the local-only run of another seed
    assert equity["worst"] == {"hospital": "c", "value": 0.6}
    table = {e["hospital"]: e for e in equity["hospitals"]}
    assert table["a"]["gain"] == pytest.approx(0.8 - 0.75)
    assert table["b"]["gain"] == pytest.approx(0.7 - 0.72)
    assert [h for h, e in table.items() if e["small"]] == ["c"]
    assert equity["small_gain"] == pytest.approx(0.6 - 0.40)


def test_equity_leaves_out_hospitals_whose_data_differs(runs: Path) -> None:
    local = runs / "study-local" / "metrics.jsonl"
    rows = [json.loads(line) for line in local.read_text().splitlines()]
    rows[2]["data_fingerprint"] = "c-other"
    local.write_text("".join(json.dumps(r) + "\n" for r in rows))
    equity = RunsRoot(runs).view("study-fedavg", now=T0 + 200)["equity"]
    table = {e["hospital"]: e for e in equity["hospitals"]}
    assert table["c"]["local_only"] is None and table["c"]["gain"] is None
    assert table["a"]["gain"] == pytest.approx(0.05)
    assert equity["small_gain"] is None and "c" in equity["note"]


def test_worst_hospital_on_a_loss_is_the_highest(runs: Path) -> None:
    view = RunsRoot(runs).view("study-fedavg", now=T0 + 200)
    files = RunsRoot(runs).files("study-fedavg")
    equity = RunView(files, None, None, RunsRoot(runs).hashes, T0).equity("test_loss")
    assert equity["worst"]["hospital"] == "c" and equity["worst"]["value"] == pytest.approx(0.4)
    assert view["models"]["global"][0]["verified"] is True
    assert view["models"]["global"][1]["verified"] is False  # recorded hash does not match


def test_status_of_a_run_in_progress(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    rows = [train("a", 1, T0 + 10, 1, 50, 2.0), evaluate("a", 1, T0 + 9, 1, test_auc=0.6)]
    audit = [{"time": T0, "event": "run_start", "from_round": 1, "config": CONFIG},
             round_event(1, T0 + 20, ["a"])]  # fmt: skip
    directory = write_run(root / "live", CONFIG, rows, audit)
    with (directory / "metrics.jsonl").open("a") as handle:
        handle.write('{"kind": "train", "hospital": "a", "rou')  # being written right now
    updated = max((directory / n).stat().st_mtime for n in ("metrics.jsonl", "audit.jsonl"))
    view = RunsRoot(root).view("live", now=updated + 5)
    assert view["status"] == "running" and view["completed_rounds"] == 1
    running = [t for t in view["timeline"] if t["state"] == "running"]
    assert [(t["round"], t["started"]) for t in running] == [(2, T0 + 20)]
    assert len(RunsRoot(root).files("live").rows) == 2  # the half line is not a row

    stalled = RunsRoot(root).view("live", now=updated + 60 + 121)
    assert stalled["status"] == "stalled"
    assert "coordinator may have stopped" in stalled["status_detail"]

    with (directory / "audit.jsonl").open("a") as handle:
        end = {"time": T0 + 30, "event": "run_end", "status": "failed",
               "reason": "FedClinicError: round 2: 0 of 1 hospitals"}  # fmt: skip
        handle.write(json.dumps(end) + "\n")
    failed = RunsRoot(root).view("live", now=updated + 5)
    assert failed["status"] == "failed" and "0 of 1" in failed["status_detail"]
    assert failed["events"][0]["what"] == "run failed"
    (root / "empty").mkdir()
    assert RunsRoot(root).view("empty")["status"] == "waiting"
    assert [r["id"] for r in RunsRoot(root).listing()] == ["live"]  # no files: not listed


def test_superlink_nodes_named_by_the_run(runs: Path) -> None:
    class FakeCli:  # what `flwr supernode list --format json` returns in 1.39
        def supernodes(self) -> list[dict[str, Any]]:
            return [{"node-id": "1", "status": "online", "online-at": "2026-01-01 10:00:00Z"},
                    {"node-id": "3", "status": "offline", "offline-at": "2026-01-01 10:05:00Z"},
                    {"node-id": "9", "status": "registered"}]  # fmt: skip

    nodes = SuperLinkNodes(FakeCli(), every=60.0)  # type: ignore[arg-type]
    nodes.snapshot()  # starts the first ask in the background
    for _ in range(100):
        if nodes.snapshot()["checked"] is not None:
            break
        time.sleep(0.02)
    view = RunsRoot(runs, nodes.snapshot).view("study-fedavg")
    hospitals = {h["name"]: h for h in view["hospitals"]}
    assert hospitals["a"]["superlink_status"] == "online"
    assert hospitals["c"]["superlink_status"] == "offline"
    assert hospitals["b"]["superlink_status"] is None  # node 2 is not listed
    listed = {n["node_id"]: n["hospital"] for n in view["superlink"]["nodes"]}
    assert listed == {1: "a", 3: "c", 9: None}


# ---------------------------------------------------------------------------- the guards


def client(runs: Path, token: str | None = None) -> TestClient:
    settings = Settings(runs=RunsRoot(runs), token=token)
    return TestClient(create_app(settings), base_url="http://127.0.0.1:8080")


@pytest.mark.parametrize(
    "path",
    [
        "/api/runs/..", "/api/runs/%2e%2e", "/api/runs/..%2F..%2Fetc", "/api/runs/.hidden",
        "/runs/..%2F..", "/runs/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/api/runs/outside",
        "/runs/study-fedavg/models/checkpoint.pkl", "/runs/study-fedavg/models/config.json",
        "/runs/study-fedavg/models/..%2F..%2Fsecret.pt", "/runs/study-fedavg/models/%2e%2e",
        "/runs/outside/models/model_final.pt", "/static/..%2Fapp.py", "/static/%2e%2e/app.py",
        "/static/../runs.py", "/runs/study-fedavg/models/model_final.pt/..%2F..%2F..%2Fsecret.pt",
    ],
)  # fmt: skip
def test_nothing_outside_the_runs_dir_is_read(runs: Path, path: str) -> None:
    (runs.parent / "secret.pt").write_bytes(b"SECRET")
    outside = runs.parent / "elsewhere"
    write_run(outside, CONFIG, [], [], summary_of({"a": 1.0}))
    (outside / "model_final.pt").write_bytes(b"SECRET")
    (runs / "outside").symlink_to(outside)  # a link leading out of the runs dir
    response = client(runs).get(path)
    assert response.status_code in (400, 404), (path, response.status_code)
    assert b"SECRET" not in response.content and b"import" not in response.content


def test_only_the_models_a_summary_names_are_served(runs: Path) -> None:
    http = client(runs)
    response = http.get("/runs/study-fedavg/models/model_final.pt")
    assert response.status_code == 200 and response.content == b"final weights"
    # the summary's path is reduced to its name inside the run directory
    assert http.get("/runs/study-fedavg/models/model_selected.pt").content == b"selected weights"


def test_token_is_required_and_compared(runs: Path) -> None:
    http = client(runs, token=TOKEN)
    assert http.get("/").status_code == 401
    assert http.get("/api/runs").status_code == 401
    assert http.get("/runs/study-fedavg/models/model_final.pt").status_code == 401
    assert http.get("/?token=wrong").status_code == 403
    for wrong in ("Bearer wrong", "Bearer é".encode("latin-1"), f"Bearer {TOKEN}x"):
        assert http.get("/api/runs", headers={"Authorization": wrong}).status_code == 403
    assert http.get("/api/runs", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert http.get("/healthz").status_code == 200  # the container health check

    http.cookies.set(COOKIE, "forged")
    assert http.get("/api/runs").status_code == 403
    http.cookies.clear()
    opened = http.get(f"/runs/study-fedavg?token={TOKEN}", follow_redirects=False)
    assert opened.status_code == 303 and opened.headers["location"] == "/runs/study-fedavg"
    cookie = opened.headers["set-cookie"]
    assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
    assert TOKEN not in cookie
    assert http.get("/api/runs").status_code == 200  # the session cookie now


def test_host_names_and_headers(runs: Path) -> None:
    http = client(runs)
    assert http.get("/", headers={"Host": "evil.example:8080"}).status_code == 400
    for host in ("localhost:8080", "127.0.0.1", "[::1]:8080"):
        assert http.get("/api/runs", headers={"Host": host}).status_code == 200, host
    assert host_of("[::1]:8080") == "::1" and host_of("Example.org") == "example.org"
    response = http.get("/runs/study-fedavg")
    assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "script-src 'self'" in CONTENT_SECURITY_POLICY
    assert "unsafe" not in CONTENT_SECURITY_POLICY
    assert response.headers["x-frame-options"] == "DENY"
    assert http.post("/api/runs").status_code == 405  # read-only: GET routes only
    first = http.get("/api/runs/study-fedavg")
    again = http.get("/api/runs/study-fedavg", headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304


def test_pages_have_no_inline_script_and_set_only_text(runs: Path) -> None:
    http = client(runs)
    (runs / "a&lt;b").mkdir()
    for path in ("/", "/runs/study-fedavg"):
        html = http.get(path).text
        for tag in re.findall(r"<script[^>]*>", html):
            assert re.search(r'src="/static/[^"]+"', tag), tag
        assert not re.search(r"\son\w+\s*=", html) and "javascript:" not in html
        assert not re.search(r"https?://", html)  # nothing from elsewhere (no CDN)
    script = (STATIC / "dashboard.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script, sink
    for template in TEMPLATES.glob("*.html"):
        text = template.read_text()
        assert "|safe" not in text and "autoescape false" not in text


def test_vendored_chart_library_is_pinned_and_licensed() -> None:
    vendor = STATIC / "vendor" / "uplot"
    pinned = json.loads((vendor / "VENDORED.json").read_text())
    assert pinned["version"] == "1.6.32" and pinned["license"] == "MIT"
    for name, digest in pinned["files"].items():
        assert hashlib.sha256((vendor / name).read_bytes()).hexdigest() == digest, name
    assert "MIT License" in (vendor / "LICENSE").read_text()


def test_the_wheel_carries_pages_script_and_chart_library(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
               "--quiet", "-w", str(tmp_path), str(ROOT)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = tmp_path.glob("fedclinic-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    vendor = "static/vendor/uplot/"
    for path in ("templates/run.html", "templates/runs.html", "templates/base.html",
                 "static/dashboard.js", "static/dashboard.css", vendor + "LICENSE",
                 vendor + "uPlot.iife.min.js", vendor + "uPlot.min.css"):  # fmt: skip
        assert f"fedclinic/dashboard/{path}" in names, path


# ---------------------------------------------------------------------------- the command


def test_command_refuses_what_is_not_safe(
    runs: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv(TOKEN_VARIABLE, raising=False)
    base = ["dashboard", "--runs", str(runs)]
    assert main([*base, "--host", "0.0.0.0"]) == 2
    assert "needs a token" in capsys.readouterr().err
    short = tmp_path / "short"
    short.write_text("abc\n")
    assert main([*base, "--host", "0.0.0.0", "--token-file", str(short)]) == 2
    assert "shorter than 16" in capsys.readouterr().err
    assert main([*base, "--token-file", str(tmp_path / "none")]) == 2
    assert "unreadable" in capsys.readouterr().err
    assert main(["dashboard", "--runs", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main([*base, "--superlink", "127.0.0.1:1", "--ca", str(tmp_path / "no.crt")]) == 2
    assert "--ca" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        assert main([*base, "--port", str(taken.getsockname()[1])]) == 2
        err = capsys.readouterr().err
        assert "cannot listen" in err and err.count("\n") == 1


def test_served_by_uvicorn_without_logging_the_token(
    runs: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG, logger="fedclinic")
    dashboard = Dashboard.bind(Settings(runs=RunsRoot(runs), token=TOKEN), "127.0.0.1", 0)
    with dashboard.in_background(), httpx.Client(base_url=dashboard.url) as http:
        for _ in range(50):
            try:
                if http.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        assert http.get("/api/runs").status_code == 401
        opened = http.get(f"/?token={TOKEN}", follow_redirects=True)
        assert opened.status_code == 200 and "study-fedavg" in http.get("/api/runs").text
    out, err = capfd.readouterr()
    assert TOKEN not in caplog.text + out + err  # uvicorn logs to stderr (its own handler)


def test_compose_dashboard_service_is_read_only_and_guarded() -> None:
    """The compose file's dashboard: only with its profile, the runs volume read-only,
    published on the host's loopback, and (bound to 0.0.0.0 in its container) a token."""
    service = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["dashboard"]
    assert service["profiles"] == ["dashboard"] and service["attach"] is False
    assert set(service["volumes"]) == {"runs:/runs:ro", "certs:/certs:ro"}
    assert service["ports"] == ["127.0.0.1:8080:8080"]
    args = build_parser().parse_args(service["command"])
    assert (args.host, args.port, str(args.runs)) == ("0.0.0.0", 8080, "/runs")
    assert args.superlink == "coordinator:8000" and str(args.ca) == "/certs/ca.crt"
    assert TOKEN_VARIABLE in service["environment"]
    assert "/healthz" in " ".join(service["healthcheck"]["test"])


def client_certificate(authority: Provisioned, folder: Path) -> tuple[str, str]:
    """An operator's client certificate signed by ``authority``'s CA, as ``openssl x509 -req
    -extfile <(echo extendedKeyUsage=clientAuth)`` makes one (docs/operators.md)."""
    ca_key = serialization.load_pem_private_key(authority.ca_key.read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(authority.ca_cert.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "operator")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    folder.mkdir(parents=True)
    (folder / "operator.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    (folder / "operator.key").write_bytes(key.private_bytes(*pem, serialization.NoEncryption()))
    return str(folder / "operator.crt"), str(folder / "operator.key")


def test_https_with_client_certificates_of_the_consortium_ca(runs: Path, tmp_path: Path) -> None:
    consortium, other = provision(tmp_path / "consortium"), provision(tmp_path / "other")
    operator = client_certificate(consortium, tmp_path / "operator")
    stranger = client_certificate(other, tmp_path / "stranger")
    tls = Tls(consortium.server_cert, consortium.server_key, consortium.ca_cert)
    dashboard = Dashboard.bind(Settings(runs=RunsRoot(runs)), "127.0.0.1", 0, tls)
    assert dashboard.url.startswith("https://127.0.0.1:")

    def get(certificate: tuple[str, str] | None) -> httpx.Response:
        context = ssl.create_default_context(cafile=str(consortium.ca_cert))
        if certificate:
            context.load_cert_chain(*certificate)
        with httpx.Client(verify=context, timeout=10) as http:
            return http.get(dashboard.url + "/api/runs")

    with dashboard.in_background():
        for _ in range(50):
            try:
                response = get(operator)
                break
            except httpx.ConnectError:
                time.sleep(0.1)
        assert response.status_code == 200 and "study-fedavg" in response.text
        for certificate in (None, stranger):  # no certificate, or one another CA signed
            with pytest.raises(httpx.TransportError):
                get(certificate)


def test_command_checks_its_tls_options(runs: Path, tmp_path: Path) -> None:
    base = ["dashboard", "--runs", str(runs), "--port", "1"]
    pem = tmp_path / "x.pem"
    pem.write_text("not a certificate")
    assert main([*base, "--client-ca", str(pem)]) == 2  # client certificates need HTTPS
    assert main([*base, "--tls-cert", str(pem)]) == 2  # no key
    assert main([*base, "--tls-cert", str(pem), "--tls-key", str(tmp_path / "none")]) == 2
    settings = Settings(runs=RunsRoot(runs))
    with pytest.raises(ConfigError, match="TLS certificate or key is unusable"):
        Dashboard.bind(settings, "127.0.0.1", 0, Tls(pem, pem))
