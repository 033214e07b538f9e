"""The local federation's parts, without starting Flower: ports, process cleanup, the flwr
CLI wrapper, progress display, work-dir layout and daemon command lines."""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from flwr.cli.supernode.register import try_load_public_key
from rich.console import Console

from fedclinic.errors import ConfigError
from fedclinic.local.configs import app_defaults, find_app_dir, synthetic_hospitals
from fedclinic.local.federation import (
    FederationError,
    FederationOptions,
    Interrupted,
    LocalFederation,
    flower_environment,
    health_check,
    log_name,
    signals_as_exceptions,
)
from fedclinic.local.flwr_cli import (
    CONNECTION,
    FlowerCli,
    FlowerCliError,
    RunStatus,
    connection_toml,
    parse_json_output,
    public_key_bytes,
    start_run_request,
)
from fedclinic.local.follow import RunError
from fedclinic.local.ports import is_port_free, pick_free_ports
from fedclinic.local.progress import MetricsTail, format_row, rounds_completed, summary_table
from fedclinic.local.supervisor import (
    MARKER_VARIABLE,
    ProcessSupervisor,
    pids_with_cmdline,
    pids_with_marker,
    tail_file,
)
from fedclinic.pki import Provisioned, create_hospital_keys, provision

SUMMARY = {
    "status": "completed",
    "algorithm": "fedavg",
    "rounds": 2,
    "selection_metric": "val_balanced_accuracy",
    "selected_round": 2,
    "hospitals": {
        "hospital-a": {
            "final": {"test_accuracy": 0.8125, "test_auc": None},
            "selected": {"test_accuracy": 0.8},
            "num_train": 630,
        }
    },
    "model": {"path": "model_final.pt", "sha256": "ab" * 32},
}


def wait_until(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


# ---------------------------------------------------------------------------- ports


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = pick_free_ports(6)
    assert len(set(ports)) == 6
    assert all(1024 <= p <= 65535 and is_port_free(p) for p in ports)
    with pytest.raises(ValueError):
        pick_free_ports(0)


def test_a_port_is_busy_while_listened_on_and_free_in_time_wait() -> None:
    """A node restarted on its --runtime-port: the worker's connections to the stopped node
    linger in TIME_WAIT on that port, which does not stop a server from listening there."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    assert not is_port_free(port)  # listened on
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    accepted.close()  # the server side closes first: its end waits in TIME_WAIT
    server.close()
    client.close()
    assert is_port_free(port)


# ---------------------------------------------------------------------------- processes

TREE = textwrap.dedent(
    """
    import os, signal, subprocess, sys, time
    from pathlib import Path
    role = sys.argv[1]
    if role == "root":
        # like a SuperLink: a helper in its own group, and one in a new session that
        # ignores SIGTERM (Flower starts its SuperExec with start_new_session=True)
        subprocess.Popen([sys.executable, __file__, "child"])
        subprocess.Popen([sys.executable, __file__, "stubborn"], start_new_session=True)
    if role in ("stubborn", "stubborn-root"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    (Path(__file__).parent / f"ready-{role}-{os.getpid()}").touch()
    time.sleep(300)
    """
)


@pytest.fixture
def tree_script(tmp_path: Path) -> Path:
    path = tmp_path / "tree.py"
    path.write_text(TREE)
    return path


def test_stop_all_kills_the_whole_tree(tmp_path: Path, tree_script: Path) -> None:
    supervisor = ProcessSupervisor(grace_seconds=1.0)
    supervisor.start("link", [sys.executable, str(tree_script), "root"], tmp_path / "a.log")
    supervisor.start(
        "node", [sys.executable, str(tree_script), "stubborn-root"], tmp_path / "b.log", tier=1
    )
    wait_until(lambda: len(list(tmp_path.glob("ready-*"))) == 4)  # signal handlers set
    assert len(pids_with_cmdline(str(tree_script))) == 4
    assert len(pids_with_marker(supervisor.token)) == 4

    supervisor.stop_all()

    assert pids_with_marker(supervisor.token) == []
    assert pids_with_cmdline(str(tree_script)) == []
    assert pids_with_cmdline(supervisor.token, environ=True) == []
    assert all(p.exit_code() is not None for p in supervisor.processes)
    node = supervisor.processes[1]
    assert node.forced  # ignored SIGTERM: needed SIGKILL
    assert any("stubborn" in cmd for cmd in supervisor.swept.values())  # new-session helper


def test_context_manager_stops_on_exception(tmp_path: Path, tree_script: Path) -> None:
    with pytest.raises(RuntimeError), ProcessSupervisor(grace_seconds=1.0) as supervisor:
        supervisor.start("link", [sys.executable, str(tree_script), "root"], tmp_path / "a.log")
        wait_until(lambda: len(list(tmp_path.glob("ready-*"))) == 3)
        raise RuntimeError("boom")
    assert supervisor.remaining() == []
    assert pids_with_cmdline(str(tree_script)) == []


def test_daemons_die_with_a_killed_runner(tmp_path: Path) -> None:
    """``kill -9`` of the runner leaves no daemon behind (PR_SET_PDEATHSIG)."""
    runner = tmp_path / "runner.py"
    runner.write_text(
        textwrap.dedent(
            f"""
            import sys, time
            from pathlib import Path
            from fedclinic.local.supervisor import ProcessSupervisor
            sup = ProcessSupervisor()
            p = sup.start("d", [sys.executable, "-c", "import time; time.sleep(300)"],
                          Path({str(tmp_path / "d.log")!r}))
            print(sup.token, flush=True)
            time.sleep(300)
            """
        )
    )
    proc = subprocess.Popen([sys.executable, str(runner)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    token = proc.stdout.readline().strip()
    wait_until(lambda: len(pids_with_marker(token)) == 1)
    proc.kill()
    proc.wait(10)
    wait_until(lambda: pids_with_marker(token) == [])


def test_children_carry_the_marker_and_log(tmp_path: Path) -> None:
    supervisor = ProcessSupervisor()
    done = supervisor.run(
        [sys.executable, "-c", f"import os; print(os.environ['{MARKER_VARIABLE}'])"]
    )
    assert done.stdout.strip() == supervisor.token
    process = supervisor.start(
        "echo", [sys.executable, "-c", "print('\\x1b[92mINFO\\x1b[0m hello'); raise SystemExit(3)"],
        tmp_path / "echo.log",
    )  # fmt: skip
    assert process.popen.wait(10) == 3
    assert process.log_tail() == "INFO hello"  # colour codes stripped
    supervisor.stop_all()


def test_tail_file(tmp_path: Path) -> None:
    path = tmp_path / "x.log"
    path.write_text("".join(f"line {i}\n" for i in range(100)))
    assert tail_file(path, 2) == "line 98\nline 99"
    assert tail_file(tmp_path / "missing.log") == ""


def test_signals_become_interrupted() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as caught, signals_as_exceptions():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
    assert caught.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before


# ---------------------------------------------------------------------------- flwr CLI


def test_connection_toml_is_what_flower_parses(tmp_path: Path) -> None:
    from flwr.cli.flower_config import parse_superlink_connection

    ca = tmp_path / "ca.crt"
    data = tomllib.loads(connection_toml("127.0.0.1:1234", ca))
    assert data["superlink"]["default"] == "fedclinic"
    conn = parse_superlink_connection(data["superlink"]["fedclinic"], "fedclinic")
    assert conn.address == "127.0.0.1:1234"
    assert conn.root_certificates == str(ca.resolve())
    plain = tomllib.loads(connection_toml("127.0.0.1:1234", None))["superlink"]["fedclinic"]
    assert plain["insecure"] is True and "root-certificates" not in plain


def test_parse_json_output() -> None:
    text = 'Using SuperLink: x\n{\n  "success": false,\n  "error-message": "no {way}"\n}\n'
    assert parse_json_output(text) == {"success": False, "error-message": "no {way}"}
    with pytest.raises(FlowerCliError):
        parse_json_output("Traceback: boom")


FAKE_FLWR = textwrap.dedent(
    """
    import json, sys, time
    args = sys.argv[1:]
    if args[:2] == ["supernode", "register"]:
        out = {"success": True, "node-id": 42}
    elif args[0] == "run":
        out = {"success": False, "error-message": "Connection to the SuperLink is unavailable"}
    elif args[0] == "ls":
        out = {"success": True, "runs": [{"run-id": args[3], "status": "finished:failed",
               "status-details": "ServerApp failed with exception: x", "elapsed": 3.5}]}
    elif args[0] == "stop":
        time.sleep(30)
        out = {}
    elif args[0] == "log":
        print("\\x1b[91mERROR\\x1b[0m : boom")
        raise SystemExit(0)
    else:
        print("Traceback: crashed")
        raise SystemExit(1)
    print("Using SuperLink: fedclinic")
    print(json.dumps(out, indent=2))
    """
)


@pytest.fixture
def fake_cli(tmp_path: Path) -> FlowerCli:
    script = tmp_path / "flwr"
    script.write_text(f"#!{sys.executable}\n{FAKE_FLWR}")
    script.chmod(0o755)
    return FlowerCli(script, tmp_path / "home", ProcessSupervisor(), dict(os.environ), timeout=10)


def test_flower_cli_wrapper(fake_cli: FlowerCli, tmp_path: Path) -> None:
    assert fake_cli.register_supernode(tmp_path / "a.pub", "a") == 42
    status = fake_cli.status(7)
    assert status == RunStatus(7, "finished:failed", "ServerApp failed with exception: x", 3.5)
    assert status.finished and not status.completed
    with pytest.raises(FlowerCliError, match="SuperLink is unavailable"):
        fake_cli.submit(tmp_path, tmp_path / "run.toml")
    with pytest.raises(FlowerCliError, match="exit 1"):
        fake_cli.call("supernode", "list")
    assert fake_cli.logs(7) == "ERROR : boom"
    fake_cli.timeout = 1
    with pytest.raises(FlowerCliError, match="did not answer"):
        fake_cli.stop(7)
    assert fake_cli.supervisor.remaining() == []


def test_a_public_key_is_sent_as_flowers_cli_sends_it_and_a_bad_one_is_one_line(
    tmp_path: Path,
) -> None:
    """In-process registration: the bytes Flower's own ``flwr supernode register`` would send
    (its ``try_load_public_key``), and its checks as one FlowerCliError, not its exit."""
    keys = create_hospital_keys(tmp_path, "st-mary")
    assert public_key_bytes(keys.public_key) == try_load_public_key(keys.public_key)

    def ssh(key: object, name: str) -> Path:
        path = tmp_path / name
        path.write_bytes(
            key.public_key().public_bytes(  # type: ignore[attr-defined]
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
            )
        )
        return path

    garbage = tmp_path / "garbage.pub"
    garbage.write_text("not a key\n")
    for path, reason in (
        (tmp_path / "missing.pub", "does not exist"),
        (garbage, "garbage.pub"),
        (ssh(ed25519.Ed25519PrivateKey.generate(), "ed.pub"), "not an EC public key"),
        (ssh(rsa.generate_private_key(65537, 2048), "rsa.pub"), "not an EC public key"),
    ):
        with pytest.raises(FlowerCliError, match="'flwr supernode register' failed") as caught:
            public_key_bytes(path)
        assert reason in str(caught.value) and "\n" not in str(caught.value)


# ---------------------------------------------------------------------------- progress


def test_metrics_tail_reads_complete_lines_only(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    tail = MetricsTail(path)
    assert tail.read_new() == []  # not there yet
    path.write_text('{"round": 1, "hospital": "a", "kind": "train"}\n{"round": 1, "hosp')
    assert [r["hospital"] for r in tail.read_new()] == ["a"]
    with path.open("a") as handle:
        handle.write('ital": "b", "kind": "train"}\nnot json\n')
    rows = tail.read_new()
    assert rows[0]["hospital"] == "b" and rows[1]["kind"] == "unreadable"
    assert tail.read_new() == []
    assert len(tail.rows) == 3


def test_rounds_completed_and_rows() -> None:
    rows = [
        {"round": 1, "hospital": "a", "kind": "evaluate", "model_round": 0, "val_auc": None},
        {"round": 1, "hospital": "a", "kind": "train", "train_loss": 0.5, "num_examples": 9},
        {"round": 2, "hospital": "a", "kind": "error", "reason": "data missing"},
    ]
    assert rounds_completed(rows) == 1
    assert "eval model r0" in format_row(rows[0]) and "AUC -" in format_row(rows[0])
    assert "loss 0.5000" in format_row(rows[1])
    assert "data missing" in format_row(rows[2])
    other = format_row({"round": 1, "hospital": "a", "kind": "aggregation", "weight": 0.25})
    assert "aggregation" in other and "weight=0.250" in other


def test_summary_table_renders() -> None:
    console = Console(record=True, width=200)
    console.print(summary_table(SUMMARY))
    text = console.export_text()
    assert "hospital-a" in text and "0.812" in text and "630" in text and "selected" in text


# ---------------------------------------------------------------------------- federation


@pytest.fixture
def options(tmp_path: Path) -> FederationOptions:
    app_dir = find_app_dir()
    out = tmp_path / "out"
    config = {**app_defaults(app_dir), "rounds": 2, "output-dir": str(out)}
    return FederationOptions(
        app_dir=app_dir,
        output_dir=out,
        run_config=config,
        hospitals=synthetic_hospitals(2, out / "federation" / "hospital-state"),
        poll_interval=0.1,
    )


def test_prepare_lays_out_the_work_dir(options: FederationOptions) -> None:
    federation = LocalFederation(options, Console(quiet=True))
    federation.prepare()
    work = options.output_dir / "federation"
    assert federation.work == work.resolve()
    assert (work / ".fedclinic-federation").is_file()
    assert tomllib.loads((work / "run.toml").read_text())["rounds"] == 2
    node = tomllib.loads((work / "hospitals" / "hospital-b.toml").read_text())
    assert node["hospital"] == "hospital-b"
    assert federation.pki is not None
    assert set(federation.pki.hospitals) == {"hospital-a", "hospital-b"}
    # a second prepare (a retried run in the same output dir) starts from scratch
    LocalFederation(options, Console(quiet=True)).prepare()


def test_prepare_refuses_a_foreign_work_dir(options: FederationOptions) -> None:
    work = options.output_dir / "federation"
    work.mkdir(parents=True)
    (work / "precious.txt").write_text("mine")
    with pytest.raises(FederationError, match="not made by fedclinic"):
        LocalFederation(options, Console(quiet=True)).prepare()
    assert (work / "precious.txt").exists()


def test_daemon_command_lines(options: FederationOptions) -> None:
    federation = LocalFederation(options, Console(quiet=True))
    federation.prepare()
    federation.fleet_port, federation.control_port = 40001, 40002
    # Flower's SuperLink through fedclinic's launcher (SQLite busy timeout: reliability.md)
    assert federation.superlink_command()[:3] == [sys.executable, "-m", "fedclinic.superlink"]
    link = " ".join(federation.superlink_command())
    assert "--fleet-api-address 127.0.0.1:40001" in link
    assert "--host 127.0.0.1 --port 40002" in link
    assert "--enable-supernode-auth" in link and "--ssl-certfile" in link
    assert "--disable-runtime-dependency-installation" in link
    assert f"--database {federation.work / 'state.db'}" in link
    node = " ".join(federation.supernode_command(options.hospitals[0], 40003))
    assert "--superlink 127.0.0.1:40001" in node and "--port 40003" in node
    assert "--auth-supernode-private-key" in node and "hospital-a.key" in node
    assert "--root-certificates" in node and "--max-retries" in node
    assert str(federation.work / "hospitals" / "hospital-a.toml") in node


def test_insecure_command_lines(options: FederationOptions) -> None:
    plain = FederationOptions(**{**options.__dict__, "tls": False, "node_auth": False})
    federation = LocalFederation(plain, Console(quiet=True))
    federation.prepare()
    assert federation.pki is None
    assert "--insecure" in federation.superlink_command()
    assert "--enable-supernode-auth" not in federation.superlink_command()
    node = federation.supernode_command(plain.hospitals[0], 40003)
    assert "--insecure" in node and "--auth-supernode-private-key" not in node


def test_a_node_without_a_site_worker_keeps_flowers_own_executor(
    options: FederationOptions,
) -> None:
    """--no-worker: the SuperNode starts Flower's SuperExec (default isolation); with a
    worker it must not (SuperExec would race the worker for every task)."""
    with_worker = LocalFederation(options, Console(quiet=True))
    with_worker.prepare()
    node = with_worker.supernode_command(options.hospitals[0], 40003)
    assert node[node.index("--isolation") + 1] == "process"
    plain = FederationOptions(**{**options.__dict__, "site_workers": False})
    without = LocalFederation(plain, Console(quiet=True))
    without.prepare()
    assert "--isolation" not in without.supernode_command(plain.hospitals[0], 40003)


def test_environment(tmp_path: Path) -> None:
    env = flower_environment(tmp_path, {"PATH": "/usr/bin"})
    assert env["PATH"].split(os.pathsep) == [str(tmp_path), "/usr/bin"]
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1"


def test_each_hospital_gets_its_own_environment(
    options: FederationOptions, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``HospitalSpec.env`` reaches that hospital's SuperNode only (and so its SuperExec and
    ClientApps, which inherit it) and its site worker, on top of ours; FLWR_HOME stays the
    federation's. The worker gets the node's own config file and takes the tasks of its own
    node's Runtime API, a node that starts no executor of its own."""
    first, second = options.hospitals
    pinned = replace(first, env={"CUDA_VISIBLE_DEVICES": "1", "PATH": "/opt/site/bin"})
    plain = FederationOptions(
        **{**options.__dict__, "tls": False, "node_auth": False, "hospitals": [pinned, second]}
    )
    federation = LocalFederation(plain, Console(quiet=True))
    federation.prepare()
    started: dict[str, dict[str, str]] = {}
    commands: dict[str, list[str]] = {}

    def start(name: str, command: list[str], log_path: Path, env: dict[str, str], tier: int):
        started[name] = env  # instead of starting flower-supernode or the worker
        commands[name] = command

    monkeypatch.setattr(federation.supervisor, "start", start)
    monkeypatch.setattr(federation, "_wait_online", lambda: None)
    monkeypatch.setattr(federation, "_wait_workers", lambda: None)
    federation.start_hospitals()
    homes = federation.paths()["homes"]
    for name in ("hospital-a", "hospital-b"):
        assert started[f"worker-{name}"] == started[name]
        node, worker = commands[name], commands[f"worker-{name}"]
        config = worker[worker.index("--config") + 1]
        assert node[node.index("--node-config") + 1] == config
        runtime = f"127.0.0.1:{node[node.index('--port') + 1]}"
        assert worker[-5:] == ["fedclinic.worker", "--config", config, "--runtime-api-address",
                               runtime]  # fmt: skip
        assert node[node.index("--isolation") + 1] == "process"
    assert started["hospital-a"]["CUDA_VISIBLE_DEVICES"] == "1"
    assert started["hospital-a"]["PATH"] == "/opt/site/bin"  # the hospital's own wins
    assert started["hospital-a"]["FLWR_HOME"] == str(homes / "hospital-a")
    other = started["hospital-b"]  # the runner's environment, nothing of hospital-a's
    assert other.get("CUDA_VISIBLE_DEVICES") == os.environ.get("CUDA_VISIBLE_DEVICES")
    assert other["PATH"] == federation.env["PATH"]
    assert other["FLWR_HOME"] == str(homes / "hospital-b")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FLWR_HOME": "/elsewhere"}, "set by the local federation itself"),
        ({MARKER_VARIABLE: "x"}, "set by the local federation itself"),
        ({"1BAD": "x"}, "name '1BAD' is not allowed"),
        ({"A=B": "x"}, "name 'A=B' is not allowed"),
        ({"OK": 1}, "must be a string"),
    ],
)
def test_a_hospital_environment_is_checked(env: dict[str, object], message: str) -> None:
    spec = synthetic_hospitals(1, Path("state"))[0]
    with pytest.raises(ConfigError, match=message):
        replace(spec, env=env)


def test_log_names() -> None:
    assert log_name("hospital-a") == "hospital-a.log"
    assert log_name("st-mary") == "hospital-st-mary.log"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Provisioned:
    return provision(tmp_path_factory.mktemp("pki"), [])


@pytest.fixture
def https_health(pki: Provisioned) -> Iterator[int]:
    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Health)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_health_check_verifies_with_the_ca(
    https_health: int, pki: Provisioned, tmp_path: Path
) -> None:
    assert health_check(f"https://127.0.0.1:{https_health}/health", pki.ca_cert)
    other = provision(tmp_path / "other", [])
    assert not health_check(f"https://127.0.0.1:{https_health}/health", other.ca_cert)
    assert not health_check(f"https://127.0.0.1:{pick_free_ports(1)[0]}/health", pki.ca_cert)


def test_dead_supernode_is_reported_with_its_log(options: FederationOptions) -> None:
    federation = LocalFederation(options, Console(quiet=True))
    federation.work.mkdir(parents=True)
    process = federation.supervisor.start(
        "hospital-a",
        [sys.executable, "-c", "print('[code: 2004] Failed to activate'); raise SystemExit(1)"],
        federation.work / "hospital-a.log",
    )
    federation.supernodes["hospital-a"] = process
    process.popen.wait(10)
    with pytest.raises(FederationError, match="2004") as caught:
        federation._check_processes()
    assert "hospital-a exited with status 1" in str(caught.value)
    federation.supervisor.stop_all()


class ScriptedCli:
    """Stands in for :class:`FlowerCli` in :meth:`LocalFederation.follow` / ``report``."""

    def __init__(self, statuses: list[str], metrics: Path, rows: list[dict[str, object]]) -> None:
        self.statuses, self.metrics, self.rows = statuses, metrics, rows

    def status(self, run_id: int) -> RunStatus:
        if self.rows:  # the ServerApp writes a row between two polls
            with self.metrics.open("a") as handle:
                handle.write(json.dumps(self.rows.pop(0)) + "\n")
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return RunStatus(run_id, status, "reason here" if "failed" in status else "", 1.0)

    def logs(self, run_id: int) -> str:
        return "ERROR : ServerApp raised an exception"

    def stop(self, run_id: int) -> None:
        pass


def test_follow_and_report_success(options: FederationOptions) -> None:
    console = Console(record=True, width=200)
    federation = LocalFederation(options, console)
    options.output_dir.mkdir(parents=True)
    rows = [
        {"round": 1, "hospital": "hospital-a", "kind": "train", "train_loss": 0.4},
        {"round": 2, "hospital": "hospital-a", "kind": "train", "train_loss": 0.3},
    ]
    federation.cli = ScriptedCli(  # type: ignore[assignment]
        ["pending", "running", "running", "finished:completed"],
        options.output_dir / "metrics.jsonl",
        rows,
    )
    status = federation.follow(5)
    assert status.completed
    (options.output_dir / "summary.json").write_text(json.dumps(SUMMARY))
    outcome = federation.report(status)
    assert outcome.exit_code == 0 and outcome.summary == SUMMARY
    text = console.export_text()
    assert "loss 0.4000" in text and "hospital-a" in text and "completed" in text


def test_report_failure_shows_reason_and_log(options: FederationOptions) -> None:
    console = Console(record=True, width=200)
    federation = LocalFederation(options, console)
    federation.cli = ScriptedCli(["finished:failed"], options.output_dir / "m.jsonl", [])  # type: ignore[assignment]
    outcome = federation.report(RunStatus(5, "finished:failed", "reason here", 1.0))
    assert outcome.exit_code == 1
    text = console.export_text()
    assert "reason here" in text and "ServerApp raised an exception" in text
    # completed but no summary.json: still a failure, with the log
    outcome = federation.report(RunStatus(5, "finished:completed", "", 1.0))
    assert outcome.exit_code == 1 and "summary.json" in console.export_text()


def test_follow_times_out(options: FederationOptions) -> None:
    quick = FederationOptions(**{**options.__dict__, "timeout": 0.5})
    federation = LocalFederation(quick, Console(quiet=True))
    quick.output_dir.mkdir(parents=True)
    federation.cli = ScriptedCli(["running"], quick.output_dir / "metrics.jsonl", [])  # type: ignore[assignment]
    with pytest.raises(RunError, match="did not finish within"):
        federation.follow(5)


def test_final_evaluation_is_not_shown_as_another_round() -> None:
    """The evaluate-only exchange after round R is numbered R + 1 by the ServerApp."""
    final = {"round": 3, "hospital": "a", "kind": "evaluate", "model_round": 2}
    assert format_row(final, rounds=2).startswith("final ")
    assert "round  3" not in format_row(final, rounds=2)
    assert format_row({**final, "round": 2}, rounds=2).startswith("round  2")


def test_train_n_is_the_training_set_size_everywhere() -> None:
    row = {"round": 1, "hospital": "a", "kind": "train", "train_loss": 0.5, "num_examples": 96,
           "num_train": 420, "steps": 3}  # fmt: skip
    line = format_row(row, rounds=2)
    assert "n=420" in line and "3 steps" in line and "96" not in line
    console = Console(record=True, width=200)
    console.print(summary_table({"hospitals": {"a": {"num_train": 420}}}))
    text = console.export_text()
    assert "420" in text and "train n = the hospital's training-set size" in text


def test_status_and_node_list_are_asked_in_process_with_one_line_errors(tmp_path: Path) -> None:
    """Once configured, the status and node-list polls are Control API requests made here, not
    ``flwr`` processes (the executable below does not exist: a process start would raise
    FileNotFoundError); Flower's coded error and an unreachable SuperLink are one line each."""
    asked: list[tuple[str, dict[str, str]]] = []

    class Refuses(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # every Control API call is a POST of a protobuf
            asked.append((self.path, dict(self.headers)))
            body = json.dumps({"code": 3001, "detail": "Run ID 9 not found"}).encode()
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Refuses)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    supervisor = ProcessSupervisor()
    cli = FlowerCli(tmp_path / "no-flwr-here", tmp_path / "home", supervisor, {})
    try:
        cli.configure(f"127.0.0.1:{server.server_address[1]}", None)
        with pytest.raises(FlowerCliError) as refused:
            cli.status(9)
        assert str(refused.value) == "'flwr ls' failed: [code: 3001] Run ID 9 not found"
        with pytest.raises(FlowerCliError, match=r"^'flwr supernode list' failed: \[code: 3001\]"):
            cli.supernodes()
    finally:
        server.shutdown()
        server.server_close()
    # the CLI's own requests: its paths and its client identifier header
    assert [path for path, _ in asked] == ["/v1/control/list-runs", "/v1/control/list-nodes"]
    assert all(headers.get("x-flwr-client") == "cli" for _, headers in asked), asked
    (port,) = pick_free_ports(1)  # nobody listens there
    cli.configure(f"127.0.0.1:{port}", None)
    with pytest.raises(FlowerCliError, match=rf"Control API at 127\.0\.0\.1:{port} did not answer"):
        cli.status(9)
    assert supervisor.remaining() == []


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Flower's CLI imports (typer)
def test_a_run_is_started_with_the_request_flowers_cli_sends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-process ``flwr run``: the StartRun request equals the one Flower's own command
    builds for the same app and run config (its code, with the client captured), FAB bytes
    included; a broken app is one FlowerCliError line and nothing is sent."""
    from flwr.cli.typing import SuperLinkConnection
    from flwr.proto.control_pb2 import StartRunRequest, StartRunResponse

    flower_run = importlib.import_module("flwr.cli.run.run")  # the module, not its function
    run_toml = tmp_path / "run.toml"
    run_toml.write_text('rounds = 2\nalgorithm = "fedavg"\n')
    app = find_app_dir()
    sent = []

    class Capture:
        def StartRun(self, request: StartRunRequest) -> StartRunResponse:  # Flower's name
            sent.append(request)
            return StartRunResponse(run_id=7)

        def close(self) -> None:
            pass

    monkeypatch.setattr(flower_run, "init_http_client_from_connection", lambda _: Capture())
    config, _ = flower_run.load_and_validate(app / "pyproject.toml")
    connection = SuperLinkConnection(name=CONNECTION, address="127.0.0.1:1", insecure=True)
    flower_run._run_with_control_api(
        app, config, None, connection, [str(run_toml)], None, False, True, None
    )
    assert sent and sent[0].fab.hash_str and len(sent[0].fab.content) > 1000
    assert start_run_request(app, run_toml) == sent[0]

    broken = tmp_path / "app"
    broken.mkdir()
    (broken / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    with pytest.raises(FlowerCliError, match=r"^'flwr run' failed: Invalid Flower App") as caught:
        start_run_request(broken, run_toml)
    assert "\n" not in str(caught.value) and "pyproject.toml" in str(caught.value)
