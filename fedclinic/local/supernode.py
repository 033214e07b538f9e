"""Flower's ``flower-supernode``: its command line, and what its exit means.

Shared by ``fedclinic local`` (one SuperNode per hospital on loopback) and ``fedclinic
hospital`` (a hospital's node in its container). flower-supernode exits with status 1 for
every failure and explains it in several log lines (Flower's ``Exit Code: 305``, a gRPC
status, an OpenSSL reason); :func:`diagnose` turns that log into one line an operator can
act on. The signatures below were read from flwr 1.39.0 logs (docs/operators.md lists them).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

from fedclinic.local.ports import LOOPBACK
from fedclinic.local.supervisor import ANSI_ESCAPE

#: Flower's gRPC health service of a hospital node (the container health check asks it)
DEFAULT_HEALTH_ADDRESS = f"{LOOPBACK}:9099"
#: the SuperNode's own Runtime API port on loopback (Flower's default)
DEFAULT_RUNTIME_PORT = 9094
#: SIGTERM -> SIGKILL for a hospital's SuperNode, under Docker's default stop timeout of 10 s
STOP_GRACE_SECONDS = 7.0


def supernode_command(
    superlink: str,
    node_config: Path,
    port: int,
    *,
    root_certificates: Path | None,
    private_key: Path | None,
    max_retries: int | None = None,
    max_wait_time: float | None = None,
    health_address: str | None = None,
    isolation: str | None = None,
) -> list[str]:
    """Flower's SuperNode, through fedclinic's launcher (``python -m fedclinic.supernode``:
    ``flower-supernode`` with shorter waits while a run exchanges messages; its environment's
    ``FEDCLINIC_SUPERNODE_PACING=flower`` keeps Flower's), dialling ``superlink`` (the Fleet
    API, port 9092 by default).

    Without ``root_certificates`` the connection is plaintext (``--insecure``, local tests
    only); ``private_key`` turns on node authentication. ``port`` is this node's own Runtime
    API on loopback: every SuperNode on one host needs its own. ``isolation="process"``:
    the node starts no executor of its own; the site worker takes its tasks
    (:mod:`fedclinic.worker.executor`).
    """
    command = [
        sys.executable, "-m", "fedclinic.supernode",
        "--superlink", superlink,
        "--host", LOOPBACK,
        "--port", str(port),
        "--node-config", str(node_config),
    ]  # fmt: skip
    if max_retries is not None:
        command += ["--max-retries", str(max_retries)]
    if max_wait_time is not None:
        command += ["--max-wait-time", f"{max_wait_time:g}"]
    if root_certificates is None:
        command.append("--insecure")
    else:
        command += ["--root-certificates", str(root_certificates)]
        if private_key is not None:
            command += ["--auth-supernode-private-key", str(private_key)]
    if health_address:
        command += ["--health-server-address", health_address]
    if isolation:
        command += ["--isolation", isolation]
    return command


@dataclass(frozen=True)
class Diagnosis:
    """Why a SuperNode stopped, as one line; ``retry`` when trying again later can help."""

    reason: str
    message: str
    retry: bool = False


_LAST_ERROR = re.compile(r"last error: (?:\w+: )?(?:ipv[46]:\S+: )?(.+?)(?:: OK)?$", re.M)


def grpc_detail(log: str) -> str:
    """gRPC's ``last error`` of the final connection attempt, else the last ERROR line."""
    text = ANSI_ESCAPE.sub("", log)
    found = _LAST_ERROR.findall(text)
    if found:
        return str(found[-1]).strip()
    errors = [line.strip() for line in text.splitlines() if "ERROR" in line or "Error" in line]
    return errors[-1] if errors else ""


def diagnose(log: str, superlink: str, root_certificates: Path | None) -> Diagnosis | None:
    """What the log of an exited SuperNode says went wrong; ``None`` when nothing known.

    Checked in order: the first matching signature wins (an activation refusal also
    mentions the failed connection, so it comes first).
    """
    text = ANSI_ESCAPE.sub("", log)
    host = superlink.rpartition(":")[0].strip("[]") or superlink
    ca = f"'{root_certificates}'" if root_certificates else "the CA certificate"
    if "[code: 2004]" in text or "Failed to activate SuperNode" in text:
        return Diagnosis(
            "not-registered",
            f"the coordinator at {superlink} refused this hospital's key (Flower 2004, "
            "'Failed to activate SuperNode'): its public key is not registered there (send "
            "the .pub file to the coordinator operator: fedclinic register), or this node was "
            "stopped hard less than a minute ago and is still marked online",
            retry=True,
        )
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return Diagnosis(
            "untrusted-certificate",
            f"TLS handshake with {superlink} failed: the coordinator's certificate is not "
            f"signed by the CA in {ca} (CERTIFICATE_VERIFY_FAILED); use the consortium's "
            "ca.crt from the coordinator operator",
        )
    if "Hostname Verification Check failed" in text or "Peer name" in text:
        return Diagnosis(
            "name-mismatch",
            f"TLS handshake with {superlink} failed: the coordinator's certificate does not "
            f"name '{host}'; dial a name or IP in its SANs, or ask the coordinator operator "
            f"to re-issue it with 'fedclinic certs --san {host}'",
        )
    if "missing selected ALPN property" in text:
        return Diagnosis(
            "not-fleet-api",
            f"{superlink} answers HTTPS, not Flower's Fleet API: hospitals dial the Fleet "
            "port (9092 by default), not the Control API (8000)",
        )
    if "WRONG_VERSION_NUMBER" in text:
        return Diagnosis(
            "not-tls",
            f"TLS handshake with {superlink} failed: the coordinator does not speak TLS on "
            f"that port ({grpc_detail(text) or 'wrong version number'})",
        )
    if "Failed to initialize the connection" in text or "Giving up reconnection" in text:
        return Diagnosis(
            "unreachable",
            f"could not reach the coordinator at {superlink}: {grpc_detail(text) or 'no answer'}",
        )
    if "Unable to parse the private key" in text:
        return Diagnosis(
            "bad-key",
            "Flower could not read the private key: expected an OpenSSH ECDSA key on a NIST "
            "curve (fedclinic certs writes one)",
        )
    return None
