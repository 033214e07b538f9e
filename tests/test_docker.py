"""Deployment files checked without a Docker engine: lint, schemas, and what operators rely on."""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import yaml
from dockerfiles import image, stages
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedclinic.cli import build_parser
from fedclinic.healthcheck import probe
from fedclinic.hospital import DEFAULT_HEALTH_ADDRESS

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    found = BIN / name if (BIN / name).exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed (pip install -e '.[dev]')")
    return str(found)


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_hadolint_passes() -> None:
    done = subprocess.run([tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("schema", "files"),
    [
        ("vendor.compose-spec", ["docker-compose.yml", "docker-compose.gpu.yml"]),
        ("vendor.github-workflows", [".github/workflows/compose.yml"]),
    ],
)
def test_files_validate_against_their_schema(schema: str, files: list[str]) -> None:
    command = [tool("check-jsonschema"), "--builtin-schema", schema, *files]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("target", ["coordinator", "hospital"])
def test_images_are_non_root_pinned_and_health_checked(target: str) -> None:
    text = DOCKERFILE.read_text()
    built = image(target)
    assert built["user"] == "10001:10001"
    assert built["stages"][:3] == ["base", "deps", "app"]  # the big layers are shared
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    # exact tag and digest; the comment above it says the digest was not checked here
    pinned = r"python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}"
    assert base and re.fullmatch(pinned, base.group(1)), base
    assert "could not be checked" in text
    assert built["healthcheck"][:3] == ["python", "-m", "fedclinic.healthcheck"]
    # everything runs from the venv, first on PATH: no base image's Python is touched
    assert built["env"]["PATH"].startswith("/opt/fedclinic/bin:")
    assert built["env"]["VIRTUAL_ENV"] == "/opt/fedclinic"


def test_dependencies_install_into_a_venv_offline_from_the_wheelhouse() -> None:
    """The pins (docker/deps.py) go into /opt/fedclinic, from the wheelhouse bind-mounted for
    that step only (never a layer); fedclinic itself is a normal, non-editable install."""
    deps = dict(stages())["deps"][1]
    install = next(line for line in deps if line.startswith("RUN "))
    assert "--mount=type=bind,source=wheelhouse,target=/wheels" in install
    assert "deps.py install --venv /opt/fedclinic" in install and "--wheels /wheels" in install
    assert not any(line.startswith(("COPY", "ADD")) for line in deps)
    app = " ".join(dict(stages())["app"][1])
    assert "pip install --no-deps --no-index --no-build-isolation /src" in app
    assert "-e " not in app and "--editable" not in app
    assert "python " not in " ".join(dict(stages())["base"][1])  # only python3 before the venv


def test_the_build_context_is_an_allowlist_holding_what_the_dockerfile_uses() -> None:
    """.dockerignore ignores everything (the venv, runs: gigabytes) but what the Dockerfile
    copies or mounts from the context, and the wheelhouse."""
    rules = [r for r in (ROOT / ".dockerignore").read_text().splitlines() if r and r[0] != "#"]
    assert rules[0] == "*"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    used = set(re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M))
    sources = {part for group in used for part in group.split()}
    sources |= set(re.findall(r"--mount=type=bind,source=([^,\s]+)", text))
    assert {s.split("/")[0] for s in sources} <= allowed, sources - allowed
    assert "wheelhouse" in allowed
    assert (ROOT / "wheelhouse" / "README.md").is_file()  # the mount's source always exists
    ignored = (ROOT / ".gitignore").read_text()
    assert "wheelhouse/*" in ignored and "!wheelhouse/README.md" in ignored


def test_hospital_image_has_cpu_and_cuda_builds() -> None:
    deps = " ".join(dict(stages())["deps"][1])
    assert "ARG TORCH_VARIANT=cpu" in deps
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in deps
    assert '--torch "${TORCH_VARIANT}" --torch-index "${TORCH_INDEX_URL}"' in deps
    hospital = dict(stages())["hospital"][1]
    assert not [line for line in hospital if line.startswith("EXPOSE")]  # it dials out


def test_hospital_commands_parse_and_match_the_health_check() -> None:
    """The image's CMD and every compose hospital's command are valid `fedclinic hospital`
    arguments, and its HEALTHCHECK asks the health service the launcher starts."""
    hospital = image("hospital")
    assert hospital["entrypoint"] == ["fedclinic", "hospital"]
    # each with the container's stop timeout (docker stop's default: 10 s)
    commands = [(hospital["cmd"], "10s")]
    commands += [(s["command"], s["stop_grace_period"])
                 for n, s in compose()["services"].items() if n.startswith("hosp")]  # fmt: skip
    for command, grace in commands:
        args = build_parser().parse_args(["hospital", *command])
        assert args.health_server_address == DEFAULT_HEALTH_ADDRESS
        assert args.superlink == "coordinator:9092"
        # the SuperNode gets its time to leave before the container is killed
        assert args.stop_timeout < int(grace.rstrip("s")), (command, grace)
    assert hospital["healthcheck"][-1] == DEFAULT_HEALTH_ADDRESS


def test_coordinator_commands_parse_and_match_the_health_check() -> None:
    """The image runs `fedclinic coordinator` (TLS and node authentication have no off
    switch there); its CMD and compose's command parse, on the ports compose publishes."""
    coordinator = image("coordinator")
    assert coordinator["entrypoint"] == ["fedclinic", "coordinator"]
    service = compose()["services"]["coordinator"]
    assert "entrypoint" not in service  # the image's
    for command in (coordinator["cmd"], service["command"]):
        args = build_parser().parse_args(["coordinator", *command])
        assert (args.certs, args.state_dir) == (Path("/certs"), Path("/state"))
        assert args.fleet_address == "0.0.0.0:9092" and args.control_address == "0.0.0.0:8000"
        assert args.health_address == coordinator["healthcheck"][-1]
    published = {port.rsplit(":", 1)[-1] for port in service["ports"]}
    assert published == {"9092", "8000"}
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    options = {o for a in commands.choices["coordinator"]._actions for o in a.option_strings}
    assert options == {"-h", "--help", "--certs", "--state-dir", "--fleet-address",
                       "--control-address", "--health-address"}  # fmt: skip


def test_compose_federation_is_secure_by_default() -> None:
    services = compose()["services"]
    assert {"certs", "coordinator", "register", "submit"} <= set(services)
    hospitals = [name for name in services if name.startswith("hospital-")]
    assert len(hospitals) == 3
    assert services["coordinator"]["command"][0] == "--certs=/certs"  # TLS + node auth
    assert any(v.startswith("coordinator-state:/state") for v in services["coordinator"]["volumes"])
    # the Control API is published on the host's loopback only
    assert "127.0.0.1:8000:8000" in services["coordinator"]["ports"]
    for name in hospitals:
        service = services[name]
        command = " ".join(service["command"])
        assert "--ca=/certs/ca.crt" in command
        assert f"--key=/certs/hospitals/{name}.key" in command
        assert f"{name}-data:/data:ro" in service["volumes"]  # data read-only
        assert any(v.endswith(":/state") for v in service["volumes"])  # state on a volume
        assert "ports" not in service  # hospitals dial out; nothing listens
        assert service["restart"] == "unless-stopped" and service["init"] is True
        assert service["depends_on"]["register"]["condition"] == "service_completed_successfully"
        assert (ROOT / "docker" / "hospitals" / f"{name}.toml").is_file()
    submit = services["submit"]
    assert submit["entrypoint"] == ["fedclinic"] and submit["command"][0] == "submit"
    assert services["register"]["depends_on"]["coordinator"]["condition"] == "service_healthy"
    assert services["coordinator"]["depends_on"]["certs"]["condition"] == (
        "service_completed_successfully"
    )


def test_only_submit_ends_the_ci_run() -> None:
    """`--exit-code-from submit` stops everything at the first exit of an attached
    container: the one-shot steps and restarting services must not be attached."""
    services = compose()["services"]
    attached = [name for name, spec in services.items() if spec.get("attach", True)]
    assert attached == ["submit"]
    one_shots = {name for name, spec in services.items() if spec.get("restart") == "no"}
    assert one_shots == {"certs", "register", "submit"}


def test_certificate_names_what_the_services_dial() -> None:
    """Hospitals dial the Fleet API and the operator steps the Control API by the service
    name: the certs step must put that name in the server certificate (TLS checks SANs)."""
    services = compose()["services"]
    certs = " ".join(services["certs"]["command"])
    sans = set(re.findall(r"--san (\S+)", certs))
    dialled = set()
    for spec in services.values():
        for arg in spec.get("command", []):
            if arg.startswith("--superlink="):
                dialled.add(arg.split("=", 1)[1].rsplit(":", 1)[0])
    assert dialled == {"coordinator"} and dialled <= sans
    names = [n for n in services if n.startswith("hospital-")]
    assert sorted(re.findall(r"--hospital (\S+)", certs)) == names


def test_gpu_override_reserves_a_gpu_per_hospital() -> None:
    override = yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())["services"]
    for name in ("hospital-a", "hospital-b", "hospital-c"):
        devices = override[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
        assert override[name]["build"]["args"]["TORCH_VARIANT"] == "cuda"


def test_health_probe_against_a_real_grpc_health_service() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert probe(f"127.0.0.1:{port}")[0] is True
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        healthy, reason = probe(f"127.0.0.1:{port}")
        assert healthy is False and "NOT_SERVING" in reason
    finally:
        server.stop(None)
    healthy, reason = probe(f"127.0.0.1:{port}", timeout=1.0)
    assert healthy is False and "unreachable" in reason


def test_the_ci_guide_runs_what_make_compose_test_runs() -> None:
    """docs/operators.md's CI commands are the ones `make compose-test` runs, in that order
    (the test may add flags and variables, never other commands)."""
    guide = (ROOT / "docs" / "operators.md").read_text().split("\n## CI\n", 1)[1]
    block = guide.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [shlex.split(line.split("#")[0]) for line in block.splitlines() if line.strip()]
    assert [c[:2] for c in commands] == [["make", "wheelhouse"], ["make", "images"],
                                         ["docker", "compose"], ["docker", "compose"]]  # fmt: skip
    script = (ROOT / ".ci" / "compose-test").read_text().replace("$DOCKER", "docker")
    lines = [line.split() for line in re.sub(r"\\\n", " ", script).splitlines()]
    position = 0
    for command in commands:
        for index, words in enumerate(lines[position:], position):
            remaining = iter(words)
            if all(word in remaining for word in command):  # an ordered subsequence
                position = index + 1
                break
        else:
            pytest.fail(f"`{' '.join(command)}` is not run by .ci/compose-test (line {position}+)")
