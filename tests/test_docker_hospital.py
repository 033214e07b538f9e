"""``fedclinic hospital`` (the hospital image's entrypoint): inputs checked before anything
starts, Flower's multi-line failures read as one line, and, on real processes against a
TLS + node-auth SuperLink, an unregistered hospital refused (with bounded retries) and a
hospital trusting the wrong CA stopped, each with one clear ``error:`` line.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from fedclinic.cli import main
from fedclinic.local.configs import synthetic_hospitals, write_flat_toml
from fedclinic.local.federation import FederationOptions, LocalFederation
from fedclinic.local.ports import pick_free_ports
from fedclinic.local.supernode import diagnose, grpc_detail
from fedclinic.pki import provision

ROOT = Path(__file__).resolve().parents[1]

# Log tails of flwr 1.39.0's flower-supernode, as they were observed (ANSI colours kept).
NOT_REGISTERED = """\x1b[91mERROR \x1b[0m:     Exit Code: 305
Failed to initialize the connection to the SuperLink.
[code: 2004] Failed to activate SuperNode.
The SuperNode could not establish a connection to the SuperLink."""
WRONG_CA = """I1122 ssl_transport_security.cc:2563] Handshake failed with error SSL_ERROR_SSL: \
error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: unable to get local \
issuer certificate
ERROR :     SSL/TLS handshake error detected.
ERROR :     Exit Code: 305
Failed to initialize the connection to the SuperLink.
failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:58037: Tls handshake \
failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:\
CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate: OK"""
NAME_MISMATCH = """WARNING :   Giving up reconnection after 10.00 seconds and 6 tries.
ERROR :     Exit Code: 305
Failed to initialize the connection to the SuperLink.
failed to connect to all addresses; last error: UNKNOWN: ipv4:10.231.0.1:9092: Custom \
verification check failed with error: UNAUTHENTICATED: Hostname Verification Check failed."""
CONTROL_PORT = """ERROR :     Exit Code: 305
failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:8000: Cannot check \
peer: missing selected ALPN property."""
REFUSED = """WARNING :   Giving up reconnection after 5.00 seconds and 5 tries.
ERROR :     Exit Code: 305
Failed to initialize the connection to the SuperLink.
failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:58038: Failed to \
connect to remote host: Connection refused"""


@pytest.mark.parametrize(
    ("log", "reason", "words", "retry"),
    [
        (NOT_REGISTERED, "not-registered", ["Flower 2004", "not registered"], True),
        (WRONG_CA, "untrusted-certificate", ["not signed by the CA in '/certs/ca.crt'"], False),
        (NAME_MISMATCH, "name-mismatch", ["not name 'coordinator'", "--san coordinator"], False),
        (CONTROL_PORT, "not-fleet-api", ["not Flower's Fleet API", "9092"], False),
        (REFUSED, "unreachable", ["could not reach", "Connection refused"], False),
    ],
)
def test_diagnose_reads_flower_logs(log: str, reason: str, words: list[str], retry: bool) -> None:
    found = diagnose(log, "coordinator:9092", Path("/certs/ca.crt"))
    assert found is not None and found.reason == reason and found.retry == bool(retry)
    assert "\n" not in found.message
    for word in words:
        assert word in found.message


def test_diagnose_unknown_and_grpc_detail() -> None:
    assert diagnose("INFO : Starting Flower SuperNode", "c:9092", None) is None
    assert grpc_detail(REFUSED) == "Failed to connect to remote host: Connection refused"


@pytest.fixture
def site(tmp_path: Path) -> dict[str, Path]:
    """A hospital's files as a site holds them: its config, the CA, its key pair."""
    pki = provision(tmp_path / "pki", ["st-mary"])
    config = write_flat_toml(
        tmp_path / "st-mary.toml", {"hospital": "st-mary", "data-source": "synthetic"}
    )
    keys = pki.hospitals["st-mary"]
    return {"config": config, "ca": pki.ca_cert, "key": keys.private_key, "pub": keys.public_key}


def hospital_args(site: dict[str, Path], **changes: str) -> list[str]:
    values = {
        "superlink": "coordinator:9092",
        "ca": str(site["ca"]),
        "key": str(site["key"]),
        "config": str(site["config"]),
        **changes,
    }
    return ["hospital", *(f"--{key}={value}" for key, value in values.items())]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"superlink": "coordinator"}, "expected HOST:PORT"),
        ({"key": "<pub>"}, "is a public key: pass the private key"),
        ({"key": "<ca>"}, "not an unencrypted OpenSSH ECDSA private key"),
        ({"ca": "<key>"}, "is not a PEM certificate"),
        ({"ca": "/nowhere/ca.crt"}, "cannot be read: No such file or directory"),
        ({"config": "/nowhere/h.toml"}, "hospital config file '/nowhere/h.toml' does not exist"),
        ({"config": "<bad-config>"}, "unknown key 'data-pth'"),
        ({"config": "<no-data>"}, "key 'data-path' = '/nowhere/data': no such file or folder"),
    ],
)
def test_bad_input_is_one_line_and_starts_nothing(
    site: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    change: dict[str, str],
    expected: str,
) -> None:
    bad_config = write_flat_toml(tmp_path / "bad.toml", {"hospital": "x", "data-pth": "/d"})
    no_data = write_flat_toml(
        tmp_path / "nodata.toml",
        {"hospital": "x", "data-source": "image-folder", "data-path": "/nowhere/data"},
    )
    files = {"<pub>": site["pub"], "<ca>": site["ca"], "<key>": site["key"]}
    files |= {"<bad-config>": bad_config, "<no-data>": no_data}
    resolved = {k: str(files.get(v, v)) for k, v in change.items()}
    assert main(hospital_args(site, **resolved)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and expected in err, err


def run_hospital(args: list[str], home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FLWR_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "fedclinic.cli", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)


@pytest.mark.e2e
def test_unregistered_and_untrusted_hospitals_are_refused_with_one_line(tmp_path: Path) -> None:
    hospitals = synthetic_hospitals(1, tmp_path / "state")
    options = FederationOptions(
        app_dir=ROOT, output_dir=tmp_path / "out", run_config={}, hospitals=hospitals,
        work_dir=tmp_path / "w",
    )  # fmt: skip
    federation = LocalFederation(options, Console(quiet=True))
    with federation.supervisor:
        federation.prepare()  # CA, coordinator certificate, hospital key (never registered)
        federation.start_superlink()
        pki = federation.pki
        assert pki is not None
        rogue = provision(tmp_path / "rogue", ["rogue"])  # another consortium's CA
        superlink = f"127.0.0.1:{federation.fleet_port}"
        runtime, health = pick_free_ports(2)
        common = [
            f"--superlink={superlink}",
            f"--config={federation.paths()['hospital_configs'] / 'hospital-a.toml'}",
            f"--runtime-port={runtime}",
            f"--health-server-address=127.0.0.1:{health}",
        ]

        # 1. a key the coordinator never registered: refused, retried (bounded), one line
        args = ["hospital", *common, f"--ca={pki.ca_cert}"]
        key = f"--key={pki.hospitals['hospital-a'].private_key}"
        done = run_hospital([*args, key, "--attempts=2", "--retry-wait=1"], tmp_path / "h1")
        assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("error: hospital hospital-a: the coordinator at"), last
        assert "refused this hospital's key (Flower 2004" in last and "not registered" in last
        assert "attempt 2/2" in done.stderr and "trying again in 1 s" in done.stderr
        assert "Failed to activate SuperNode" in done.stdout  # Flower's own log, streamed

        # 2. the wrong CA: the TLS handshake fails, no retries, one line naming the CA file
        args = ["hospital", *common, f"--ca={rogue.ca_cert}", key, "--attempts=3"]
        done = run_hospital(args, tmp_path / "h2")
        assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
        last = done.stderr.strip().splitlines()[-1]
        assert f"not signed by the CA in '{rogue.ca_cert}'" in last, last
        assert "attempt 2/" not in done.stderr
    assert federation.supervisor.remaining() == []


@pytest.mark.e2e
def test_unreachable_coordinator_gives_up_after_bounded_retries(
    site: dict[str, Path], tmp_path: Path
) -> None:
    """A real SuperNode dialling a port nobody listens on: Flower retries for
    ``--connect-timeout`` seconds (the bound), then the launcher stops with one line (another
    attempt would only wait as long again; the container's restart policy takes over).

    The port is held bound, never listening, for the whole test: connections are refused,
    and no other test's SuperLink can take it (a merely free port once did, under xdist, and
    the hospital met that SuperLink's certificate instead of a closed port)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        closed = holder.getsockname()[1]
        runtime, health = pick_free_ports(2)
        args = hospital_args(site, superlink=f"127.0.0.1:{closed}")
        args += [f"--runtime-port={runtime}", f"--health-server-address=127.0.0.1:{health}"]
        args += ["--connect-timeout=3", "--attempts=2", "--retry-wait=1"]
        done = run_hospital(args, tmp_path / "home")
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: hospital st-mary:"), last
    assert f"could not reach the coordinator at 127.0.0.1:{closed}" in last, last
    assert "Giving up reconnection after" in done.stdout  # Flower's bounded retry, streamed
    assert "attempt 2/" not in done.stderr
