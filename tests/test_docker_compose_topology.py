"""The compose federation without a Docker engine: ``docker-compose.yml`` played as processes.

Each service runs what its container would run: the compose ``entrypoint``/``command``, or
else its image's ``ENTRYPOINT``/``CMD``, with the image's ``ENV`` and working directory,
read from the service's Dockerfile target (tests/dockerfiles.py). Container paths become
folders of this test: named volumes and bind mounts (from the service's ``volumes``) and the
image's working directory (this checkout). Every service gets its own network namespace with
one address on a private bridge (10.231.0.0/24, no address in the root namespace, so traffic
stays between these namespaces), and services dial each other by IP where compose would use
the service name: the certificate step adds that IP as a SAN, and the test checks that the
certificate also carries the ``coordinator`` DNS name hospitals dial inside compose.

Services start in ``depends_on`` order and wait for the condition compose would wait for
(completed successfully / healthy via the image's HEALTHCHECK / started). The federation is
cut to 2 hospitals and a 2-round synthetic run. TLS and node authentication stay on.

Network faults ride along: hospital-a's link is slowed for the whole run (tc netem delay, or
a tbf token bucket on kernels without netem, like this CI machine's), and hospital-b's link
goes down for 20 s once round 1 is in (a partition), then comes back. The run must complete
with every hospital in every round and no error rows.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import tomllib
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from dockerfiles import image

from fedclinic.local.configs import write_flat_toml
from fedclinic.local.supervisor import ManagedProcess, ProcessSupervisor
from fedclinic.pki import fingerprint

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SUBNET = "10.231.0"
DROPPED = "hospital-c"  # 2 hospitals keep the run short
RUN = {"rounds": 2, "min-hospitals": 2, "local-epochs": 1, "optimizer": "adam",
       "learning-rate": 0.003, "round-timeout": 300.0}  # fmt: skip
NUM_SAMPLES = 200
RUN_METRICS = "volumes/runs/compose/metrics.jsonl"
PARTITION_SECONDS = 20.0  # under Flower's heartbeat patience (2 x 30 s): the node stays


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


def netns_unavailable() -> str | None:
    """Why namespaces, a bridge and veth pairs cannot be made here (``None``: they can)."""
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    if not shutil.which("ip"):
        return "iproute2 (ip) is not installed"
    tag = uuid.uuid4().hex[:6]
    steps = [
        ["ip", "netns", "add", f"fcprobe{tag}"],
        ["ip", "link", "add", f"fcpb{tag}", "type", "bridge"],
        ["ip", "link", "add", f"fcpv{tag}", "type", "veth", "peer", "name", f"fcpp{tag}"],
    ]
    try:
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True)
            if done.returncode != 0:
                return f"'{' '.join(step[:4])}' failed: {done.stderr.strip()}"
        return None
    finally:
        subprocess.run(["ip", "netns", "del", f"fcprobe{tag}"], capture_output=True)
        subprocess.run(["ip", "link", "del", f"fcpb{tag}"], capture_output=True)
        subprocess.run(["ip", "link", "del", f"fcpv{tag}"], capture_output=True)


class Topology:
    """A bridge without an address and one namespace per service, each with its own IP."""

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:5]
        self.bridge = f"fcbr{self.tag}"
        self.namespaces: dict[str, str] = {}
        self.addresses: dict[str, str] = {}
        self.interfaces: dict[str, str] = {}  # service -> its interface inside its namespace
        self.veths: list[str] = []

    def __enter__(self) -> Topology:
        try:
            sh("ip", "link", "add", self.bridge, "type", "bridge")
            sh("ip", "link", "set", self.bridge, "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def add(self, service: str) -> None:
        index = len(self.namespaces)
        namespace, veth, peer = (f"fc{self.tag}n{index}", f"fcv{self.tag}{index}",
                                 f"fcp{self.tag}{index}")  # fmt: skip
        sh("ip", "netns", "add", namespace)
        self.namespaces[service] = namespace
        self.interfaces[service] = peer
        self.addresses[service] = f"{SUBNET}.{10 + index}"
        self.veths.append(veth)
        sh("ip", "link", "add", veth, "type", "veth", "peer", "name", peer)
        sh("ip", "link", "set", veth, "master", self.bridge, "up")
        sh("ip", "link", "set", peer, "netns", namespace)
        inside = ["ip", "netns", "exec", namespace, "ip"]
        sh(*inside, "addr", "add", f"{self.addresses[service]}/24", "dev", peer)
        sh(*inside, "link", "set", peer, "up")
        sh(*inside, "link", "set", "lo", "up")

    def exec(self, service: str, command: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[service], *command]

    def slow_link(self, service: str) -> str:
        """Added latency on the service's link: netem where the kernel has it, else a token
        bucket (tbf), which delays every packet beyond a small burst (this machine's kernel
        has no sch_netem). Returns the qdisc used."""
        device = self.interfaces[service]
        for qdisc in (["netem", "delay", "80ms", "20ms"],
                      ["tbf", "rate", "2mbit", "burst", "16kb", "latency", "500ms"]):  # fmt: skip
            command = self.exec(service, ["tc", "qdisc", "add", "dev", device, "root", *qdisc])
            if subprocess.run(command, capture_output=True).returncode == 0:
                return " ".join(qdisc)
        raise AssertionError("neither netem nor tbf is available for the latency fault")

    def link(self, service: str, up: bool) -> None:
        """Cut or restore the service's only link: a network partition."""
        device = self.interfaces[service]
        sh(*self.exec(service, ["ip", "link", "set", device, "up" if up else "down"]))

    def __exit__(self, *_: object) -> None:
        """Remove everything made, also after a failure half-way (errors are ignored)."""
        try:
            for namespace in self.namespaces.values():  # takes its veth ends along
                subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
        finally:
            for veth in self.veths:  # only left when moving its peer failed
                subprocess.run(["ip", "link", "del", veth], capture_output=True)
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


# ---------------------------------------------------------------------------- images


def translate(text: str, paths: dict[str, Path]) -> str:
    """Container paths -> this test's folders (longest first, whole path components)."""
    for container in sorted(paths, key=len, reverse=True):
        pattern = rf"(?<![\w.-]){re.escape(container)}(?=/|$|[^\w.-])"
        text = re.sub(pattern, str(paths[container]), text)
    return text


class Service:
    """One compose service as a local process: its command, environment and mounts."""

    def __init__(self, name: str, spec: dict[str, Any], tmp: Path, run_config: Path) -> None:
        self.name, self.spec = name, spec
        self.image = image(spec["build"]["target"], ROOT / spec["build"]["dockerfile"])
        self.paths: dict[str, Path] = {self.image["workdir"]: ROOT}
        for volume in spec.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):  # a bind-mounted file: a copy with paths translated
                self.paths[target] = tmp / "binds" / name / Path(target).name
            else:
                self.paths[target] = tmp / "volumes" / source
                self.paths[target].mkdir(parents=True, exist_ok=True)
        self.paths[f"{self.image['workdir']}/examples/compose.toml"] = run_config
        for volume in spec.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                self.bind(ROOT / source, self.paths[target])

    def bind(self, source: Path, copy: Path) -> None:
        flat = tomllib.loads(translate(source.read_text(), self.paths))
        if "num-samples" in flat:
            flat["num-samples"] = NUM_SAMPLES
        write_flat_toml(copy, flat)

    def command(self, addresses: dict[str, str]) -> list[str]:
        entry = self.spec.get("entrypoint") or self.image["entrypoint"]
        args = self.spec.get("command") or self.image["cmd"]
        command = [translate(a, self.paths) for a in [*entry, *args]]
        for service, address in addresses.items():  # compose DNS -> the service's IP
            command = [re.sub(rf"(?<=[=\s]){service}:(?=\d)", f"{address}:", a) for a in command]
        return executable(command)

    def environment(self) -> dict[str, str]:
        env = {k: translate(v, self.paths) for k, v in self.image["env"].items()}
        extra = self.spec.get("environment", {})
        env |= {k: translate(str(v), self.paths) for k, v in extra.items()}
        return {**os.environ, **env, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


def executable(command: list[str]) -> list[str]:
    """``fedclinic``/``flower-*``/``python`` of the image -> this environment's."""
    if command[0] == "fedclinic":
        return [sys.executable, "-m", "fedclinic.cli", *command[1:]]
    if command[0] == "python":
        return [sys.executable, *command[1:]]
    if command[0].startswith("flower-"):
        return [str(BIN / command[0]), *command[1:]]
    if command[:2] == ["sh", "-c"]:
        script = command[2].replace("fedclinic ", f"{sys.executable} -m fedclinic.cli ", 1)
        return ["sh", "-c", script]
    return command


def start_order(services: dict[str, Any]) -> list[str]:
    """Services in ``depends_on`` order (what compose starts first)."""
    order: list[str] = []

    def visit(name: str) -> None:
        if name not in order:
            for dependency in services[name].get("depends_on", {}):
                visit(dependency)
            order.append(name)

    for name in services:
        visit(name)
    return order


class Partition(threading.Thread):
    """Once round 1's replies are in, cut one hospital off for ``seconds``, then restore it."""

    def __init__(self, topology: Topology, service: str, metrics: Path, seconds: float) -> None:
        super().__init__(daemon=True)
        self.topology, self.service, self.metrics, self.seconds = (
            topology, service, metrics, seconds)  # fmt: skip
        self.cut_at: float | None = None
        self.restored_at: float | None = None

    def run(self) -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.metrics.exists() and '"kind": "train"' in self.metrics.read_text():
                break
            time.sleep(0.2)
        else:
            return
        self.topology.link(self.service, up=False)
        self.cut_at = time.time()
        time.sleep(self.seconds)
        self.topology.link(self.service, up=True)
        self.restored_at = time.time()


def wait_for(what: str, check: Any, process: ManagedProcess | None, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if process is not None and process.exit_code() is not None:
            pytest.fail(f"{what}: exited with {process.exit_code()}:\n{process.log_tail(40)}")
        if time.monotonic() > deadline:
            tail = process.log_tail(40) if process else ""
            pytest.fail(f"{what}: not reached within {seconds:.0f} s\n{tail}")
        time.sleep(0.5)


@pytest.mark.e2e
def test_compose_services_as_processes_across_namespaces(tmp_path: Path) -> None:
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    # services behind a profile (the dashboard) are not started by `docker compose up`
    services = {
        name: spec for name, spec in compose.items() if name != DROPPED and not spec.get("profiles")
    }
    services["register"]["command"] = [a for a in services["register"]["command"]
                                       if DROPPED not in a]  # fmt: skip
    services["submit"]["depends_on"].pop(DROPPED)
    run_config = tomllib.loads((ROOT / "examples" / "compose.toml").read_text()) | RUN
    run_path = tmp_path / "compose.toml"
    started: dict[str, ManagedProcess] = {}

    with Topology() as topology, ProcessSupervisor() as supervisor:
        for name in services:
            topology.add(name)
        coordinator_ip = topology.addresses["coordinator"]
        for name in start_order(services):
            spec = services[name]
            service = Service(name, spec, tmp_path, run_path)
            if name == "submit":  # the run's output dir is on the shared runs volume
                write_flat_toml(run_path, json.loads(translate(json.dumps(run_config),
                                                               service.paths)))  # fmt: skip
                # network faults: a slow link to hospital-a all run long, and hospital-b cut
                # off for a while once round 1 is in
                qdisc = topology.slow_link("hospital-a")
                partition = Partition(topology, "hospital-b", tmp_path / RUN_METRICS,
                                      PARTITION_SECONDS)  # fmt: skip
                partition.start()
            for dependency, condition in spec.get("depends_on", {}).items():
                if condition["condition"] == "service_healthy":
                    probe = Service(dependency, services[dependency], tmp_path, run_path)
                    health = topology.exec(dependency, executable(probe.image["healthcheck"]))

                    def healthy(health: list[str] = health) -> bool:
                        done = subprocess.run(health, capture_output=True, cwd=ROOT)
                        return done.returncode == 0

                    wait_for(f"{dependency} healthy", healthy, started.get(dependency), 90)
            command = service.command(topology.addresses)
            if name == "certs":  # we dial the coordinator by IP: that IP must be a SAN too
                command[-1] += f" --san {coordinator_ip}"
            process = supervisor.start(
                name, topology.exec(name, command), tmp_path / f"{name}.log",
                env=service.environment(), cwd=ROOT,
            )  # fmt: skip
            started[name] = process
            if spec.get("restart") == "no":  # one-shot: compose waits for it to complete
                wait_for(f"{name} completed", lambda p=process: p.exit_code() is not None,
                         None, 480 if name == "submit" else 120)  # fmt: skip
                assert process.exit_code() == 0, f"{name}:\n{process.log_tail(60)}"

        # every long-running service is still up, and each hospital passes its image's check
        for name in ("coordinator", "hospital-a", "hospital-b"):
            assert started[name].exit_code() is None, started[name].log_tail(30)
        for hospital in ("hospital-a", "hospital-b"):
            image = Service(hospital, services[hospital], tmp_path, run_path).image
            check = topology.exec(hospital, executable(image["healthcheck"]))
            assert subprocess.run(check, capture_output=True, cwd=ROOT).returncode == 0

    # compose's coordinator publishes exactly the ports its command listens on
    coordinator = " ".join(services["coordinator"]["command"])
    published = {port.rsplit(":", 1)[-1] for port in services["coordinator"]["ports"]}
    assert published == {re.search(r"--fleet-address=[\d.]+:(\d+)", coordinator)[1],
                         re.search(r"--control-address=[\d.]+:(\d+)", coordinator)[1]}  # fmt: skip
    # the certificate names what hospitals dial in compose (coordinator) and here (its IP)
    cert = x509.load_pem_x509_certificate((tmp_path / "volumes/certs/server.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "coordinator" in sans.get_values_for_type(x509.DNSName)
    assert coordinator_ip in {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    # the run completed with both hospitals, authenticated over TLS, on non-loopback addresses
    summary = json.loads((tmp_path / "volumes/runs/compose/summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 2
    assert {"hospital-a", "hospital-b"} <= set(summary["hospitals"])
    # ... in spite of the faults: the partition fell inside the run, and nothing was lost
    assert qdisc
    assert partition.cut_at is not None and partition.restored_at is not None
    rows = [json.loads(x) for x in (tmp_path / RUN_METRICS).read_text().splitlines()]
    assert partition.restored_at < max(r["time"] for r in rows)
    assert not [r for r in rows if r["kind"] in ("error", "rejected")]
    trained = {(r["round"], r["hospital"]) for r in rows if r["kind"] == "train"}
    assert trained == {(n, h) for n in (1, 2) for h in ("hospital-a", "hospital-b")}
    # the audit log names the certificates the coordinator served (`fedclinic coordinator`
    # derives them from --certs)
    start = json.loads((tmp_path / "volumes/runs/compose/audit.jsonl").read_text().splitlines()[0])
    served = {Path(f).name: v for f, v in start["certificates"].items()}
    assert served == {name: fingerprint(tmp_path / "volumes/certs" / name)
                      for name in ("ca.crt", "server.pem")}  # fmt: skip
    link_log = (tmp_path / "coordinator.log").read_text()
    assert "SuperNode authentication is disabled" not in link_log
    for hospital in ("hospital-a", "hospital-b"):
        assert f"joining {coordinator_ip}:9092" in (tmp_path / f"{hospital}.log").read_text()
