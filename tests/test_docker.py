"""Deployment files checked without a Docker engine: lint, schemas, and what operators rely on."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedclinic.cli import build_parser
from fedclinic.healthcheck import probe
from fedclinic.hospital import DEFAULT_HEALTH_ADDRESS

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    found = BIN / name if (BIN / name).exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed (pip install -e '.[dev]')")
    return str(found)


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    done = subprocess.run([tool("hadolint"), str(dockerfile)], capture_output=True, text=True)
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


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_are_non_root_pinned_and_health_checked(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    assert re.search(r"^USER 10001:10001$", text, re.M)
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    # exact tag and digest; the comment above it says the digest was not checked here
    pinned = r"python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}"
    assert base and re.fullmatch(pinned, base.group(1)), base
    assert "could not be checked" in text
    assert "HEALTHCHECK" in text and "fedclinic.healthcheck" in text
    assert "pip install" in text and " . " in text  # the project's own pins (pyproject)


def test_hospital_image_has_cpu_and_cuda_builds() -> None:
    text = (ROOT / "docker" / "hospital.Dockerfile").read_text()
    assert "ARG TORCH_VARIANT=cpu" in text and '"cuda"' in text
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert '--extra-index-url "${TORCH_INDEX_URL}"' in text
    assert not re.search(r"^EXPOSE", text, re.M)  # it dials out; nothing listens


def dockerfile_list(dockerfile: str, instruction: str) -> list[str]:
    text = re.sub(r"\\\n", " ", (ROOT / "docker" / dockerfile).read_text())
    found = re.search(rf"^{instruction} (\[.*\])$", text, re.M)
    assert found, instruction
    return list(json.loads(found.group(1)))


def test_hospital_commands_parse_and_match_the_health_check() -> None:
    """The image's CMD and every compose hospital's command are valid `fedclinic hospital`
    arguments, and its HEALTHCHECK asks the health service the launcher starts."""
    assert dockerfile_list("hospital.Dockerfile", "ENTRYPOINT") == ["fedclinic", "hospital"]
    commands = [dockerfile_list("hospital.Dockerfile", "CMD")]
    commands += [s["command"] for n, s in compose()["services"].items() if n.startswith("hosp")]
    for command in commands:
        args = build_parser().parse_args(["hospital", *command])
        assert args.health_server_address == DEFAULT_HEALTH_ADDRESS
        assert args.superlink == "coordinator:9092"
    text = (ROOT / "docker" / "hospital.Dockerfile").read_text()
    assert f'"fedclinic.healthcheck", "{DEFAULT_HEALTH_ADDRESS}"' in text


def test_compose_federation_is_secure_by_default() -> None:
    services = compose()["services"]
    assert {"certs", "coordinator", "register", "submit"} <= set(services)
    hospitals = [name for name in services if name.startswith("hospital-")]
    assert len(hospitals) == 3
    coordinator = " ".join(services["coordinator"]["command"])
    for flag in ("--ssl-certfile", "--ssl-keyfile", "--ssl-ca-certfile", "--enable-supernode-auth"):
        assert flag in coordinator
    assert "--insecure" not in coordinator
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
