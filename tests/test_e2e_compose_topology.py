"""The compose federation without a Docker engine: every service of ``docker-compose.yml``
runs its own command, environment and ports as a local process, each in its own network
namespace on a private bridge, so hospitals reach the coordinator at ``coordinator``
(10.231.0.1 through the namespace's hosts file), not at 127.0.0.1.

Container paths (/certs, /state, /runs, /config, /data, /app) map to temporary folders;
the run is shortened to 2 hospitals and 2 rounds. TLS and node authentication stay on, as
in the compose file. Only namespaces this test creates carry traffic; all are removed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from fedclinic.local.supervisor import ProcessSupervisor

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SUBNET = "10.231.0"
HOSPITALS = ("hospital-a", "hospital-b")


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


def netns_available() -> str | None:
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    if not shutil.which("ip"):
        return "iproute2 (ip) is not installed"
    probe = f"fcprobe{uuid.uuid4().hex[:6]}"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if done.returncode != 0:
        return f"ip netns unavailable: {done.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class Topology:
    """A bridge and one namespace per host, each with ``coordinator`` in its hosts file."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:5]
        self.bridge = f"fcbr{tag}"
        self.tag = tag
        self.namespaces: dict[str, str] = {}

    def __enter__(self) -> Topology:
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "link", "set", self.bridge, "up")
        return self

    def add(self, host: str, last_octet: int) -> str:
        namespace = f"fc{self.tag}{host[-1] if host.startswith('hospital') else host[:4]}"
        veth, peer = f"v{namespace}"[:15], f"p{namespace}"[:15]
        sh("ip", "netns", "add", namespace)
        self.namespaces[host] = namespace
        hosts = Path("/etc/netns") / namespace
        hosts.mkdir(parents=True, exist_ok=True)
        (hosts / "hosts").write_text(f"127.0.0.1 localhost\n{SUBNET}.1 coordinator\n")
        sh("ip", "link", "add", veth, "type", "veth", "peer", "name", peer)
        sh("ip", "link", "set", veth, "master", self.bridge, "up")
        sh("ip", "link", "set", peer, "netns", namespace)
        run = ["ip", "netns", "exec", namespace, "ip"]
        sh(*run, "addr", "add", f"{SUBNET}.{last_octet}/24", "dev", peer)
        sh(*run, "link", "set", peer, "up")
        sh(*run, "link", "set", "lo", "up")
        return namespace

    def __exit__(self, *_: object) -> None:
        for namespace in self.namespaces.values():
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / namespace, ignore_errors=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


def translate(argument: str, paths: dict[str, Path]) -> str:
    """Container paths of the compose file -> this test's folders."""
    for container, local in paths.items():
        argument = argument.replace(container, str(local))
    return argument


@pytest.mark.e2e
def test_compose_services_as_processes_across_namespaces(tmp_path: Path) -> None:
    reason = netns_available()
    if reason:
        pytest.skip(reason)
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    paths = {
        "/certs": tmp_path / "certs",
        "/runs": tmp_path / "runs",
        "/app/examples/compose.toml": tmp_path / "compose.toml",
        "/app": ROOT,
    }
    run_config = (ROOT / "examples" / "compose.toml").read_text()
    run_config = run_config.replace("rounds = 3", "rounds = 2")
    run_config = run_config.replace("min-hospitals = 3", "min-hospitals = 2")
    run_config = run_config.replace("local-epochs = 2", "local-epochs = 1")
    run_config = run_config.replace('"/runs/compose"', f'"{tmp_path / "runs" / "compose"}"')
    (tmp_path / "compose.toml").write_text(run_config)
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PYTHONUNBUFFERED": "1",
    }

    def command_of(name: str, service_paths: dict[str, Path]) -> list[str]:
        service = services[name]
        entry = service.get("entrypoint") or (
            ["flower-superlink"] if name == "coordinator" else ["flower-supernode"]
        )
        args = [translate(a, service_paths) for a in [*entry, *service["command"]]]
        if args[0] == "fedclinic":
            args = [sys.executable, "-m", "fedclinic.cli", *args[1:]]
        elif args[0].startswith("flower-"):
            args[0] = str(BIN / args[0])
        return args

    # certs: the one-shot step, as written (sh -c "test -f ... || fedclinic certs ...")
    certs = command_of("certs", paths)
    script = certs[-1].replace("fedclinic certs", f"{sys.executable} -m fedclinic.cli certs")
    subprocess.run(["sh", "-c", script], check=True, env=env, timeout=120)
    assert (tmp_path / "certs" / "ca.crt").is_file()

    with Topology() as topology, ProcessSupervisor() as supervisor:
        def start(name: str, host: str, args: list[str], home: Path) -> object:
            namespace = topology.namespaces[host]
            return supervisor.start(
                name, ["ip", "netns", "exec", namespace, *args], tmp_path / f"{name}.log",
                env={**env, "FLWR_HOME": str(home)},
            )  # fmt: skip

        topology.add("coordinator", 1)
        for index, hospital in enumerate(HOSPITALS):
            topology.add(hospital, 11 + index)
        topology.add("operator", 20)

        coordinator_paths = {**paths, "/state": tmp_path / "coordinator-state"}
        (tmp_path / "coordinator-state").mkdir()
        coordinator = start(
            "coordinator", "coordinator", command_of("coordinator", coordinator_paths),
            tmp_path / "coordinator-state" / "flwr",
        )  # fmt: skip
        deadline = time.monotonic() + 60
        health = [sys.executable, "-m", "fedclinic.healthcheck", "127.0.0.1:9098"]
        namespace = topology.namespaces["coordinator"]
        while subprocess.run(
            ["ip", "netns", "exec", namespace, *health], capture_output=True, env=env
        ).returncode:
            assert coordinator.exit_code() is None, coordinator.log_tail(30)  # type: ignore[attr-defined]
            assert time.monotonic() < deadline, coordinator.log_tail(30)  # type: ignore[attr-defined]
            time.sleep(0.5)

        register = [a for a in command_of("register", paths) if "hospital-c" not in a]
        done = subprocess.run(
            ["ip", "netns", "exec", topology.namespaces["operator"], *register],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr

        for hospital in HOSPITALS:
            state = tmp_path / f"{hospital}-state"
            state.mkdir()
            config = (ROOT / "docker" / "hospitals" / f"{hospital}.toml").read_text()
            (tmp_path / f"{hospital}.toml").write_text(
                config.replace('state-dir = "/state"', f'state-dir = "{state}"')
            )
            hospital_paths = {**paths, "/config/hospital.toml": tmp_path / f"{hospital}.toml"}
            start(hospital, hospital, command_of(hospital, hospital_paths), state / "flwr")

        submit = [*command_of("submit", paths), "--timeout", "600"]
        done = subprocess.run(
            ["ip", "netns", "exec", topology.namespaces["operator"], *submit],
            env=env, capture_output=True, text=True, timeout=700,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    summary = json.loads((tmp_path / "runs" / "compose" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 2
    assert set(HOSPITALS) <= set(summary["hospitals"])
    log = (tmp_path / "coordinator.log").read_text()
    assert "SuperNode authentication is disabled" not in log
