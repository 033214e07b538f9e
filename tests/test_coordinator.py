"""``fedclinic coordinator``: its options map onto flower-superlink's flags (checked against
Flower's own argument parser), bad inputs are one line, and on real processes it runs a
SuperLink that a hospital joins over TLS with node authentication, with no venv on PATH, and
both stop cleanly (exit 0) on SIGTERM, as ``docker stop`` sends it.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink

from fedclinic.cli import build_parser, main
from fedclinic.coordinator import prepare
from fedclinic.flower import flower_bin_dir
from fedclinic.local.configs import write_flat_toml
from fedclinic.local.federation import health_check
from fedclinic.local.flwr_cli import FlowerCli
from fedclinic.local.ports import pick_free_ports
from fedclinic.local.supervisor import ProcessSupervisor
from fedclinic.pki import Provisioned, provision

ROOT = Path(__file__).resolve().parents[1]
NO_VENV_PATH = "/usr/bin:/bin"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Provisioned:
    return provision(tmp_path_factory.mktemp("pki"), ["hospital-a"])


def coordinator_args(certs: Path, state: Path, *extra: str) -> list[str]:
    fleet, control = pick_free_ports(2)
    return ["coordinator", f"--certs={certs}", f"--state-dir={state}",
            f"--fleet-address=127.0.0.1:{fleet}", f"--control-address=127.0.0.1:{control}",
            *extra]  # fmt: skip


def test_options_become_the_superlinks_flags(pki: Provisioned, tmp_path: Path) -> None:
    fleet, control, health = pick_free_ports(3)
    args = build_parser().parse_args([
        "coordinator", "--certs", str(pki.directory), "--state-dir", str(tmp_path / "state"),
        "--fleet-address", f"127.0.0.1:{fleet}", "--control-address", f"127.0.0.1:{control}",
        "--health-address", f"127.0.0.1:{health}",
    ])  # fmt: skip
    command, env = prepare(args)
    certs, state = pki.directory.resolve(), (tmp_path / "state").resolve()
    assert command == [
        sys.executable, "-m", "fedclinic.superlink",
        "--ssl-ca-certfile", f"{certs}/ca.crt",
        "--ssl-certfile", f"{certs}/server.pem",
        "--ssl-keyfile", f"{certs}/server.key",
        "--enable-supernode-auth",
        "--fleet-api-address", f"127.0.0.1:{fleet}",
        "--host", "127.0.0.1",
        "--port", str(control),
        "--database", f"{state}/superlink.db",
        "--disable-runtime-dependency-installation",
        "--health-server-address", f"127.0.0.1:{health}",
    ]  # fmt: skip
    # Flower's own parser reads them as meant (no typo'd flag, no flag taken as a value)
    flower = _parse_args_run_superlink().parse_args(command[3:])
    assert (flower.ssl_ca_certfile, flower.ssl_certfile, flower.ssl_keyfile) == (
        f"{certs}/ca.crt", f"{certs}/server.pem", f"{certs}/server.key")  # fmt: skip
    assert flower.enable_supernode_auth is True and flower.insecure is False
    assert flower.fleet_api_address == f"127.0.0.1:{fleet}"
    assert (flower.host, flower.port) == ("127.0.0.1", control)
    assert flower.database == f"{state}/superlink.db"
    assert flower.health_server_address == f"127.0.0.1:{health}"
    assert env["FLWR_HOME"] == f"{state}/flwr" and (state / "flwr").is_dir()
    assert env["FEDCLINIC_CERTIFICATES"] == f"{certs}/ca.crt:{certs}/server.pem"
    assert env["PATH"].split(os.pathsep)[0] == str(flower_bin_dir())


def test_defaults_and_an_ipv6_control_address(pki: Provisioned, tmp_path: Path) -> None:
    args = build_parser().parse_args(
        ["coordinator", "--certs", str(pki.directory), "--state-dir", str(tmp_path)]
    )
    assert (args.fleet_address, args.control_address) == ("0.0.0.0:9092", "127.0.0.1:8000")
    assert args.health_address is None
    (port,) = pick_free_ports(1)
    args.control_address, args.fleet_address = f"[::1]:{port}", f"127.0.0.1:{port}"
    command, _ = prepare(args)
    assert command[command.index("--host") + 1] == "::1"
    assert "--health-server-address" not in command


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("no-key", "no server.key (make the coordinator's files with 'fedclinic certs'"),
        ("bad-cert", "server.pem' is not a PEM certificate"),
        ("bad-address", "--fleet-address 'coordinator': expected HOST:PORT"),
        ("port-in-use", "cannot be used (in use): stop what holds it or choose another with "
                        "--control-address"),
        ("state-is-a-file", "--state-dir"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_starts_nothing(
    pki: Provisioned,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    change: str,
    expected: str,
) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    for name in ("ca.crt", "server.pem", "server.key"):
        (certs / name).write_bytes((pki.directory / name).read_bytes())
    state = tmp_path / "state"
    args = coordinator_args(certs, state)
    with socket.socket() as holder:
        if change == "no-key":
            (certs / "server.key").unlink()
        elif change == "bad-cert":
            (certs / "server.pem").write_text("not a certificate\n")
        elif change == "bad-address":
            args[3] = "--fleet-address=coordinator"
        elif change == "port-in-use":
            holder.bind(("127.0.0.1", 0))
            holder.listen()
            args[4] = f"--control-address=127.0.0.1:{holder.getsockname()[1]}"
        else:
            state.write_text("a file where the state dir goes")
        assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and expected in err, err


def wait_for(what: str, check: object, seconds: float, logs: list[Path]) -> None:
    deadline = time.monotonic() + seconds
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p}:\n{p.read_text()[-3000:]}" for p in logs if p.exists())
            pytest.fail(f"{what}: not within {seconds:.0f} s\n{tails}")
        time.sleep(0.5)


def stop(process: subprocess.Popen[bytes], seconds: float) -> tuple[int, float]:
    """SIGTERM to the process alone (what `docker stop` sends PID 1); status, time taken."""
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    status = process.wait(timeout=seconds)
    return status, time.monotonic() - started


@pytest.mark.e2e
def test_a_hospital_joins_the_coordinator_with_tls_and_node_auth(
    pki: Provisioned, tmp_path: Path
) -> None:
    fleet, control, health, runtime, node_health = pick_free_ports(5)
    env = {**os.environ, "PATH": NO_VENV_PATH, "PYTHONUNBUFFERED": "1"}  # no venv on PATH
    logs = {name: tmp_path / f"{name}.log" for name in ("coordinator", "hospital")}
    hospital_config = write_flat_toml(
        tmp_path / "hospital-a.toml",
        {"hospital": "hospital-a", "data-source": "synthetic", "num-samples": 60,
         "state-dir": str(tmp_path / "site")},
    )  # fmt: skip
    cli = [sys.executable, "-m", "fedclinic.cli"]
    with ProcessSupervisor() as supervisor:  # sweeps whatever a failed test leaves behind
        coordinator = supervisor.start(
            "coordinator",
            [*cli, "coordinator", f"--certs={pki.directory}", f"--state-dir={tmp_path / 'state'}",
             f"--fleet-address=127.0.0.1:{fleet}", f"--control-address=127.0.0.1:{control}",
             f"--health-address=127.0.0.1:{health}"],
            logs["coordinator"], env=env, cwd=tmp_path,
        )  # fmt: skip
        wait_for(
            "the coordinator answers /health over TLS",
            lambda: health_check(f"https://127.0.0.1:{control}/health", pki.ca_cert),
            120, [logs["coordinator"]],
        )  # fmt: skip
        connection = ["--superlink", f"127.0.0.1:{control}", "--ca", str(pki.ca_cert)]
        keys = pki.hospitals["hospital-a"]
        registered = subprocess.run(
            [*cli, "register", *connection, "--key", f"hospital-a={keys.public_key}"],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert registered.returncode == 0, registered.stderr
        node_id = re.search(r"registered as node (\d+)", registered.stdout)[1]  # type: ignore[index]

        hospital = supervisor.start(
            "hospital",
            [*cli, "hospital", f"--superlink=127.0.0.1:{fleet}", f"--ca={pki.ca_cert}",
             f"--key={keys.private_key}", f"--config={hospital_config}",
             f"--runtime-port={runtime}", f"--health-server-address=127.0.0.1:{node_health}"],
            logs["hospital"], env={**env, "FLWR_HOME": str(tmp_path / "site-home")},
            cwd=tmp_path, tier=1,
        )  # fmt: skip
        # node authentication: the node is the one registered for this key (without it, a
        # SuperNode gets a fresh random ID)
        wait_for(
            f"hospital-a joins as node {node_id}",
            lambda: f"SuperNode ID: {node_id}" in logs["hospital"].read_text(),
            180, list(logs.values()),
        )  # fmt: skip
        flwr = FlowerCli(flower_bin_dir() / "flwr", tmp_path / "cli", supervisor, os.environ)
        flwr.configure(f"127.0.0.1:{control}", pki.ca_cert)

        def status() -> str:
            nodes = {str(n.get("node-id")): n.get("status") for n in flwr.supernodes()}
            return str(nodes.get(node_id))

        wait_for("hospital-a online", lambda: status() == "online", 60, list(logs.values()))

        # SuperLink's environment: FLWR_HOME in the state dir, the served certificates
        superlink = next(
            int(p) for p in os.listdir("/proc") if p.isdigit()
            and b"fedclinic.superlink" in Path(f"/proc/{p}/cmdline").read_bytes()
            and f"PPid:\t{coordinator.pid}\n" in Path(f"/proc/{p}/status").read_text()
        )  # fmt: skip
        environ = dict(
            v.split("=", 1) for v in Path(f"/proc/{superlink}/environ").read_text().split("\0") if v
        )
        assert environ["FLWR_HOME"] == str((tmp_path / "state" / "flwr").resolve())
        assert environ["FEDCLINIC_CERTIFICATES"].endswith(
            "/ca.crt:" + str(pki.server_cert.resolve())
        )

        # docker stop: the hospital leaves (offline at once) and exits 0 well within 10 s
        code, took = stop(hospital.popen, 10)
        assert code == 0 and took < 10, (code, took, logs["hospital"].read_text()[-2000:])
        assert "stopped (SIGTERM)" in logs["hospital"].read_text()
        assert status() == "offline"
        code, took = stop(coordinator.popen, 30)
        assert code == 0, logs["coordinator"].read_text()[-3000:]
        assert "fedclinic coordinator: stopped (SIGTERM)" in logs["coordinator"].read_text()
    assert supervisor.remaining() == []
