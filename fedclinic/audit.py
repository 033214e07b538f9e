"""The coordinator's append-only audit log (``audit.jsonl`` next to the run's results).

Metrics files say how well a run did; the audit log says what the coordinator did, for the
consortium's records: which config (and its hash) and code ran, which hospitals were asked,
answered, were accepted or refused and why, and the hash of every global model. One JSON
object per line, appended and flushed at once, never rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from fedclinic.pki import fingerprint

AUDIT_FILE = "audit.jsonl"


def config_sha256(flat_config: Mapping[str, Any]) -> str:
    """SHA-256 of the config as canonical JSON (sorted keys), so equal configs hash equal."""
    text = json.dumps(dict(flat_config), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def code_version() -> dict[str, str]:
    """The installed fedclinic version and, when the code sits in a git checkout, its commit."""
    try:
        version = metadata.version("fedclinic")
    except metadata.PackageNotFoundError:
        version = "unknown"
    commit = "unknown"
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        if done.returncode == 0:
            commit = done.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {"fedclinic": version, "git_commit": commit}


#: PEM certificate files (separated by ``:``) whose SHA-256 fingerprints ``run_start`` records.
#: The SuperLink terminates TLS, so the ServerApp learns which certificates the coordinator
#: serves from this variable, set where the SuperLink is started (the coordinator image,
#: ``fedclinic local``); the SuperExec passes it on to the ServerApp.
CERTIFICATES_VARIABLE = "FEDCLINIC_CERTIFICATES"


def certificate_fingerprints() -> dict[str, str]:
    """File -> SHA-256 of the certificate's DER (what ``openssl x509 -fingerprint -sha256``
    prints); an unreadable file is recorded as such rather than failing the run."""
    found: dict[str, str] = {}
    for item in os.environ.get(CERTIFICATES_VARIABLE, "").split(os.pathsep):
        if item:
            try:
                found[item] = fingerprint(item)
            except (OSError, ValueError) as err:
                found[item] = f"unreadable: {err}"
    return found


class AuditLog:
    """Appends one event per line; each write is flushed and fsynced before it returns."""

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory) / AUDIT_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def record(self, event: str, **fields: Any) -> None:
        entry = {"time": round(time.time(), 3), "event": event, **fields}
        line = json.dumps(entry, sort_keys=False, default=str)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]
