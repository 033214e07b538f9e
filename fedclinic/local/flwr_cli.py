"""The ``flwr`` CLI as typed calls: connection config, node registration, runs, status, logs.

We drive Flower through its own CLI, or, for the calls below, through the CLI's own code
(the functions and request classes its commands use), not through other internal APIs. Two
1.39 quirks shape the subprocess calls:

- with ``--format json`` the CLI exits 0 even when it failed (``"success": false`` and an
  ``"error-message"`` in the JSON), so every call checks ``success``;
- errors are pretty-printed JSON after other output, so we decode from the first ``{``.

The calls made over and over while a run is followed or a dashboard is open, the run's
status (``flwr ls --run-id``) and the node list (``flwr supernode list``), the one made
for every hospital of a federation (``flwr supernode register``) and the one made for every
run (``flwr run``: the app checked and built into a FAB, then ``StartRun``) are made in
this process instead, once :meth:`FlowerCli.configure` named the connection: the same
Control API request with the same client class, request headers and row formatting as the
CLI (Flower 1.39's ``ControlHttpClient``, ``load_and_validate``, ``build_fab_from_disk``,
``format_runs``, the node list's formatter), without starting a Python process that imports
Flower's CLI (about 1.5 CPU-seconds each, measured on the suite's federations).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click
import httpx
import tomli_w
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.cli.build import build_fab_from_disk
from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
from flwr.cli.config_utils import load_and_validate
from flwr.cli.run_utils import format_runs
from flwr.cli.supernode.ls import _format_nodes, _to_json
from flwr.common.config import parse_config_args
from flwr.common.constant import FAB_CONFIG_FILE
from flwr.common.serde import fab_to_proto, run_from_proto, user_config_to_proto
from flwr.proto.control_pb2 import (
    ListNodesRequest,
    ListRunsRequest,
    RegisterNodeRequest,
    StartRunRequest,
)
from flwr.supercore.control import ControlHttpClient
from flwr.supercore.error import FlowerError
from flwr.supercore.fab import Fab
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
from flwr.supercore.primitives.asymmetric import public_key_to_bytes, uses_nist_ec_curve

from fedclinic.errors import FedClinicError
from fedclinic.local.supervisor import ANSI_ESCAPE, ProcessSupervisor

CONNECTION = "fedclinic"
T = TypeVar("T")


class FlowerCliError(FedClinicError):
    """A ``flwr`` command failed; the message carries Flower's own reason."""


@dataclass(frozen=True)
class RunStatus:
    """One row of ``flwr ls --run-id``: ``pending``, ``starting``, ``running`` or ``finished:*``."""

    run_id: int
    status: str
    details: str
    elapsed: float | None

    @property
    def finished(self) -> bool:
        return self.status.startswith("finished")

    @property
    def completed(self) -> bool:
        return self.status == "finished:completed"


def parse_json_output(text: str) -> dict[str, Any]:
    """The JSON object the CLI printed (possibly after other lines), or an error."""
    start = text.find("{")
    while start != -1:
        try:
            value, _ = json.JSONDecoder().raw_decode(text[start:])
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
            continue
        if isinstance(value, dict):
            return value
        start = text.find("{", start + 1)
    raise FlowerCliError(f"no JSON in flwr output: {text.strip()[-500:]!r}")


def public_key_bytes(path: Path) -> bytes:
    """A hospital's public key as ``flwr supernode register`` sends it, after its checks
    (an OpenSSH EC key on a NIST curve); a bad file is one :class:`FlowerCliError`."""
    command = "'flwr supernode register' failed"
    try:
        key = serialization.load_ssh_public_key(path.expanduser().read_bytes())
    except FileNotFoundError:
        raise FlowerCliError(f"{command}: public key file '{path}' does not exist") from None
    except (OSError, ValueError, UnsupportedAlgorithm) as err:
        raise FlowerCliError(f"{command}: {path}: {err}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise FlowerCliError(f"{command}: {path}: not an EC public key, got {type(key).__name__}")
    if not uses_nist_ec_curve(key):
        raise FlowerCliError(f"{command}: {path}: EC curve {key.curve.name} is not a NIST curve")
    return bytes(public_key_to_bytes(key))


def start_run_request(app_dir: Path, run_config: Path) -> StartRunRequest:
    """The request ``flwr run APP CONNECTION --run-config FILE`` sends for a local app."""
    app = app_dir.expanduser().resolve()
    try:
        load_and_validate(app / FAB_CONFIG_FILE)
        fab_bytes = build_fab_from_disk(app)
    except (ValueError, OSError, click.ClickException) as err:
        detail = err.format_message() if isinstance(err, click.ClickException) else str(err)
        lines = [line.strip().removeprefix("- ") for line in detail.splitlines() if line.strip()]
        detail = " ".join([*lines[:1], "; ".join(lines[1:])]).strip()  # "...:" then its items
        raise FlowerCliError(f"'flwr run' failed: {detail}") from None
    fab = Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})
    return StartRunRequest(
        fab=fab_to_proto(fab),
        override_config=user_config_to_proto(parse_config_args([str(run_config)])),
        federation="",
        app_spec="",
    )


def connection_toml(address: str, root_certificates: Path | None) -> str:
    """``config.toml`` for the CLI's ``FLWR_HOME`` with one connection named ``fedclinic``.

    ``address`` is the SuperLink's Control API (HTTP), not the Fleet port. Without a CA the
    connection is plaintext (``insecure = true``).
    """
    connection: dict[str, str | bool] = {"address": address}
    if root_certificates is None:
        connection["insecure"] = True
    else:
        connection["root-certificates"] = str(root_certificates.resolve())
    return tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: connection}})


class FlowerCli:
    """Runs ``flwr`` with its own ``FLWR_HOME`` against the local SuperLink."""

    def __init__(
        self,
        executable: Path,
        home: Path,
        supervisor: ProcessSupervisor,
        env: Mapping[str, str],
        timeout: float = 60.0,
    ) -> None:
        self.executable = executable
        self.home = home
        self.supervisor = supervisor
        self.env = {**env, "FLWR_HOME": str(home)}
        self.timeout = timeout
        #: (Control API address, CA file or None for plaintext) once configured
        self.connection: tuple[str, Path | None] | None = None

    def configure(self, address: str, root_certificates: Path | None) -> Path:
        """Write ``$FLWR_HOME/config.toml`` (the CLI creates a default one otherwise)."""
        self.home.mkdir(parents=True, exist_ok=True)
        path = self.home / "config.toml"
        path.write_text(connection_toml(address, root_certificates), encoding="utf-8")
        self.connection = (address, root_certificates)
        return path

    def control_client(self) -> ControlHttpClient:
        """The CLI's Control API client, in this process (the connection must be configured)."""
        assert self.connection is not None
        address, ca = self.connection
        return ControlHttpClient.from_server_address(
            server_address=address,
            insecure=ca is None,
            root_certificates=None if ca is None else ca.read_bytes(),
            interceptors=[
                CliClientHttpInterceptor(),
                RuntimeVersionHttpInterceptor(component_name="flwr CLI"),
            ],
        )

    def in_process(self, command: str, request: Callable[[ControlHttpClient], T]) -> T:
        """``request`` (one Control API call) made the way ``flwr <command>`` makes it;
        Flower's reason, or the transport's, as one FlowerCliError."""
        try:
            client = self.control_client()
        except OSError as err:  # the CA file went away, or is not a certificate
            raise FlowerCliError(f"'flwr {command}' failed: {err}") from None
        try:
            return request(client)
        except httpx.HTTPStatusError as err:
            error = FlowerError.from_json(err.response.text)  # as the CLI words it
            if error is None:
                reason = f"HTTP {err.response.status_code}: {err.response.text.strip()[-500:]}"
            else:
                parts = (f"[code: {error.code}]", error.message, error.public_details)
                reason = " ".join(x for x in parts if x)
            raise FlowerCliError(f"'flwr {command}' failed: {reason}") from None
        except httpx.HTTPError as err:
            raise FlowerCliError(
                f"'flwr {command}' failed: the SuperLink's Control API at "
                f"{self.connection[0] if self.connection else '?'} did not answer ({err})"
            ) from None
        finally:
            client.close()

    def call(self, *args: str, timeout: float | None = None) -> dict[str, Any]:
        """``flwr <args> --format json``; the decoded JSON when it says ``success``."""
        command = [str(self.executable), *args, "--format", "json"]
        try:
            done = self.supervisor.run(command, env=self.env, timeout=timeout or self.timeout)
        except subprocess.TimeoutExpired:
            raise FlowerCliError(
                f"'flwr {' '.join(args)}' did not answer within {timeout or self.timeout:.0f} s"
            ) from None
        try:
            data = parse_json_output(done.stdout)
        except FlowerCliError:
            output = (done.stdout + done.stderr).strip()[-800:]
            raise FlowerCliError(
                f"'flwr {' '.join(args)}' failed (exit {done.returncode}): {output}"
            ) from None
        if not data.get("success", False):
            message = str(data.get("error-message", data)).strip()
            raise FlowerCliError(f"'flwr {args[0]}' failed: {message}")
        return data

    def register_supernode(self, public_key: Path, name: str) -> int:
        """Register a hospital's public key; returns the node ID it will have. In this
        process once the connection is configured: the CLI's key checks and request."""
        if self.connection is None:
            data = self.call("supernode", "register", str(public_key), CONNECTION, "--name", name)
            return int(data["node-id"])
        key = public_key_bytes(public_key)
        request = RegisterNodeRequest(public_key=key, name=name)
        found = self.in_process("supernode register", lambda c: c.RegisterNode(request))
        if not found.node_id:
            raise FlowerCliError(
                "'flwr supernode register' failed: SuperNode couldn't be registered"
            )
        return int(found.node_id)

    def supernodes(self) -> list[dict[str, Any]]:
        """``flwr supernode list``: node-id, name, status (registered/online/offline)."""
        if self.connection is not None:  # in this process: the CLI's request and rows
            found = self.in_process("supernode list", lambda c: c.ListNodes(ListNodesRequest()))
            rows = _format_nodes(list(found.nodes_info), found.now)
            return list(json.loads(_to_json(rows, verbose=False))["nodes"])
        data = self.call("supernode", "list", CONNECTION)
        nodes = data.get("nodes", data.get("supernodes", []))
        return list(nodes) if isinstance(nodes, list) else []

    def submit(self, app_dir: Path, run_config: Path) -> int:
        """``flwr run``: build the FAB from ``app_dir``, start the run, return its ID. In this
        process once the connection is configured: the CLI's app check, FAB and request (no
        federation and no federation options: the connection names neither)."""
        if self.connection is None:
            data = self.call(
                "run", str(app_dir), CONNECTION, "--run-config", str(run_config), timeout=120
            )
            return int(data["run-id"])
        request = start_run_request(app_dir, run_config)
        found = self.in_process("run", lambda c: c.StartRun(request))
        if not found.HasField("run_id"):
            raise FlowerCliError("'flwr run' failed: Failed to start run")
        return int(found.run_id)

    def status(self, run_id: int) -> RunStatus:
        """The run's current status from ``flwr ls --run-id``."""
        if self.connection is not None:  # in this process: the CLI's request and row
            found = self.in_process("ls", lambda c: c.ListRuns(ListRunsRequest(run_id=run_id)))
            known = [run_from_proto(proto) for proto in found.run_dict.values()]
            if not known:
                raise FlowerCliError(f"run {run_id} is not known to the SuperLink")
            first = format_runs(known, found.now)[0]
            return RunStatus(run_id=first.run_id, status=first.status_text,
                             details=first.details, elapsed=float(first.elapsed))  # fmt: skip
        data = self.call("ls", CONNECTION, "--run-id", str(run_id))
        runs = data.get("runs") or []
        if not runs:
            raise FlowerCliError(f"run {run_id} is not known to the SuperLink")
        row = runs[0]
        elapsed = row.get("elapsed")
        return RunStatus(
            run_id=int(row.get("run-id", run_id)),
            status=str(row.get("status", "unknown")),
            details=str(row.get("status-details", "")),
            elapsed=float(elapsed) if isinstance(elapsed, int | float) else None,
        )

    def stop(self, run_id: int) -> None:
        """Ask the SuperLink to stop the run (status becomes ``finished:stopped``)."""
        self.call("stop", str(run_id), CONNECTION)

    def logs(self, run_id: int, timeout: float = 120.0) -> str:
        """The ServerApp's stored log (``flwr log --show``; this command has no JSON mode)."""
        command = [str(self.executable), "log", str(run_id), CONNECTION, "--show"]
        try:
            done = self.supervisor.run(command, env=self.env, timeout=timeout)
        except subprocess.TimeoutExpired:
            return f"(flwr log did not answer within {timeout:.0f} s)"
        return ANSI_ESCAPE.sub("", done.stdout + done.stderr).strip()
