"""Deployment files checked without a Docker engine: lint, schemas, and what operators rely on."""

from __future__ import annotations

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

from fedclinic.healthcheck import probe

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
    assert base and re.fullmatch(r"python:\d+\.\d+\.\d+-slim-bookworm", base.group(1))
    assert "HEALTHCHECK" in text and "fedclinic.healthcheck" in text


def test_hospital_image_has_cpu_and_cuda_builds() -> None:
    text = (ROOT / "docker" / "hospital.Dockerfile").read_text()
    assert "ARG TORCH_VARIANT=cpu" in text and '"cuda"' in text


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
        assert "--root-certificates=/certs/ca.crt" in command
        assert f"--auth-supernode-private-key=/certs/hospitals/{name}.key" in command
        assert f"{name}-data:/data:ro" in service["volumes"]  # data read-only
        assert "ports" not in service  # hospitals dial out; nothing listens
        assert (ROOT / "docker" / "hospitals" / f"{name}.toml").is_file()
    submit = services["submit"]
    assert submit["entrypoint"] == ["fedclinic"] and submit["command"][0] == "submit"


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
