"""How the forwarder and the site worker talk: Flower messages over a local Unix socket.

Torch-free on purpose: the forwarder imports this module in every ``flwr-clientapp``.

Where: ``<state-dir>/worker.sock`` (mode 0600, so only the hospital's user can connect),
guarded by ``<state-dir>/worker.lock`` (an ``flock`` held by the live worker: a socket file
whose lock is free is stale). The state dir is the hospital config's ``state-dir``, by
default ``~/.fedclinic/state/<hospital>``.

What (one connection per message, frames are an 8-byte big-endian length and the bytes):

1. forwarder -> worker: a JSON *hello* (protocol version, the forwarder's code identity,
   hospital name, state dir); the worker answers ``accepted`` or ``refused`` + reason
   (another protocol or code version, another hospital), and the forwarder then answers
   in process instead;
2. forwarder -> worker: the Flower ``Context`` (``flwr.common.serde.context_to_proto``),
   then the ``Message``;
3. worker -> forwarder: a JSON status (``answered`` with seconds and how the data came),
   the reply ``Message``, and the context's ``state`` after the handler ran.

A message travels as a JSON layout of its records, the message shell (metadata, error and
every non-array record, ``message_to_proto``) and then one frame per ``Array``
(``array_to_proto``): Flower's own serialisation, streamed array by array so neither side
holds a second copy of a large model.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import socket
import struct
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from copy import copy
from pathlib import Path, PurePosixPath
from typing import Any

from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.common.serde import (
    array_from_proto,
    array_to_proto,
    context_from_proto,
    context_to_proto,
    message_from_proto,
    message_to_proto,
    recorddict_from_proto,
    recorddict_to_proto,
)
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.proto.recorddict_pb2 import Array as ProtoArray
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from google.protobuf.message import DecodeError

PROTOCOL = 1
SOCKET_NAME = "worker.sock"
LOCK_NAME = "worker.lock"
#: the packages whose source decides how a hospital answers (what the FAB ships for it)
CODE_PACKAGES = ("client", "fedclinic", "strategies")
#: longest socket path bound directly (the kernel's limit is 107 bytes); longer ones go
#: through ``/proc/self/fd`` (Linux)
MAX_DIRECT_PATH = 100

_LENGTH = struct.Struct(">Q")
MAX_FRAME = 2**31 - 1  # protobuf's own limit for one message
MAX_JSON = 1 << 20
#: frames up to this size go out with their header in one write (no copy of larger ones)
SMALL_FRAME = 1 << 16


class ProtocolError(Exception):
    """The peer broke the protocol or went away mid-exchange."""


class PeerClosed(ProtocolError):
    """The connection ended before a whole frame arrived (the peer died or hung up)."""


#: what reading from a broken, dead or confused peer can raise
RECEIVE_ERRORS = (ProtocolError, OSError, DecodeError, KeyError, TypeError, ValueError)


# ---------------------------------------------------------------------------- where


def state_root(node_config: Mapping[str, Any]) -> Path:
    """The hospital's state dir from its (flat) node config, without validating it.

    Mirrors ``fedclinic.site.default_state_dir`` without importing torch.
    """
    configured = str(node_config.get("state-dir", "") or "")
    if configured:
        return Path(configured).expanduser().absolute()
    return Path.home() / ".fedclinic" / "state" / str(node_config.get("hospital", ""))


def socket_path(node_config: Mapping[str, Any]) -> Path:
    return state_root(node_config) / SOCKET_NAME


def remove_stale_socket(root: Path) -> bool:
    """Remove ``<root>/worker.sock`` when no live worker holds ``worker.lock``; whether it did.

    A worker killed hard (SIGKILL) cannot remove its socket; its lock went with it, so a
    free lock proves the socket file is stale. A live worker's socket is left alone.
    """
    path = root / SOCKET_NAME
    if not (path.exists() or path.is_symlink()):
        return False
    try:
        lock = (root / LOCK_NAME).open("a+", encoding="utf-8")
    except OSError:
        return False
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a live worker serves it
        try:
            with suppress(FileNotFoundError):
                path.unlink()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return True


@contextmanager
def socket_address(path: Path) -> Iterator[str]:
    """An address ``bind``/``connect`` accept for ``path``, however long it is.

    Unix socket names are limited to 107 bytes; a longer path is reached through an open
    descriptor of its directory (``/proc/self/fd/N/worker.sock``, Linux only).
    """
    if len(os.fsencode(path)) <= MAX_DIRECT_PATH:
        yield str(path)
        return
    if not Path("/proc/self/fd").is_dir():
        raise OSError(
            f"socket path '{path}' is longer than {MAX_DIRECT_PATH} bytes; use a shorter "
            "hospital state-dir"
        )
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{directory}/{path.name}"
    finally:
        os.close(directory)


def connect(path: Path, timeout: float) -> socket.socket:
    """A connected client socket (``FileNotFoundError`` / ``ConnectionRefusedError`` when no
    worker listens there)."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.settimeout(timeout)
        with socket_address(path) as address:
            client.connect(address)
    except BaseException:
        client.close()
        raise
    return client


# ---------------------------------------------------------------------------- which code


def code_identity(root: Path | None = None) -> str:
    """SHA-256 over the modules of :data:`CODE_PACKAGES` under ``root`` (default: the tree
    this module was imported from: the FAB's in a ``flwr-clientapp``, the site's
    installation in the worker). Equal identities mean both run the same handler.

    Only files of regular packages count (every folder from the package down holds an
    ``__init__.py``): what ``pip install`` puts in site-packages, while the FAB also carries
    stray ``.py`` files outside packages.
    """
    base = root or Path(__file__).resolve().parents[2]
    files = {
        file.relative_to(base).as_posix(): file
        for package in CODE_PACKAGES
        for file in (base / package).rglob("*")
        if file.is_file()
    }
    return _identity(files.keys(), lambda name: files[name].read_bytes())


def code_identity_of_fab(content: bytes) -> str:
    """:func:`code_identity` of the tree a FAB (Flower's zip of the run's app) unpacks to,
    read from the zip itself: the site worker decides from it, before answering, whether a
    run's code is its own."""
    with zipfile.ZipFile(io.BytesIO(content)) as fab:
        names = [info.filename for info in fab.infolist() if not info.is_dir()]
        return _identity(names, fab.read)


def _identity(names: Iterable[str], read: Callable[[str], bytes]) -> str:
    """The digest over the ``.py`` files of regular packages among ``names`` (POSIX paths
    relative to the tree's root), in the order :func:`code_identity` always used (paths
    compared part by part)."""
    present = set(names)
    digest = hashlib.sha256()
    for package in CODE_PACKAGES:
        inside = (PurePosixPath(n) for n in present if n.startswith(f"{package}/"))
        for file in sorted(p for p in inside if p.suffix == ".py"):
            folders = file.parents[:-1]
            if all(f"{folder}/__init__.py" in present for folder in folders):
                digest.update(file.as_posix().encode() + b"\0")
                digest.update(hashlib.sha256(read(file.as_posix())).digest())
    return digest.hexdigest()


# ---------------------------------------------------------------------------- frames


class Channel:
    """Length-prefixed frames, JSON objects, contexts and messages over one socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    # -- raw frames
    def send_frame(self, data: bytes) -> None:
        if len(data) > MAX_FRAME:
            raise ProtocolError(f"frame of {len(data)} bytes exceeds {MAX_FRAME}")
        header = _LENGTH.pack(len(data))
        if len(data) <= SMALL_FRAME:
            # one write: an empty frame's second sendall(b"") would fail with EPIPE once
            # the peer read the header and hung up (an empty context state, the last frame)
            self.sock.sendall(header + bytes(data))
            return
        self.sock.sendall(header)
        self.sock.sendall(data)

    def recv_frame(self, limit: int = MAX_FRAME) -> bytearray:
        (size,) = _LENGTH.unpack(self._recv_exactly(_LENGTH.size))
        if size > limit:
            raise ProtocolError(f"frame of {size} bytes exceeds {limit}")
        return self._recv_exactly(size)

    def _recv_exactly(self, size: int) -> bytearray:
        """Exactly ``size`` bytes, read into one buffer (no second copy)."""
        buffer = bytearray(size)
        view = memoryview(buffer)
        received = 0
        while received < size:
            count = self.sock.recv_into(view[received:], size - received)
            if count == 0:
                raise PeerClosed(f"connection closed after {received} of {size} bytes")
            received += count
        return buffer

    # -- JSON
    def send_json(self, value: Mapping[str, Any]) -> None:
        self.send_frame(json.dumps(value, sort_keys=True).encode())

    def recv_json(self) -> dict[str, Any]:
        try:
            value = json.loads(self.recv_frame(MAX_JSON))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ProtocolError(f"not a JSON frame: {err}") from None
        if not isinstance(value, dict):
            raise ProtocolError("expected a JSON object")
        return value

    # -- Flower objects
    def send_context(self, context: Context) -> None:
        self.send_frame(context_to_proto(context).SerializeToString())

    def recv_context(self) -> Context:
        # protobuf parses any buffer; its stubs name only bytes (a bytes() copy would double
        # the frame in memory)
        return context_from_proto(ProtoContext.FromString(self.recv_frame()))  # type: ignore[arg-type]

    def send_records(self, records: RecordDict) -> None:
        self.send_frame(recorddict_to_proto(records).SerializeToString())

    def recv_records(self) -> RecordDict:
        return recorddict_from_proto(ProtoRecordDict.FromString(self.recv_frame()))  # type: ignore[arg-type]

    def send_message(self, message: Message) -> None:
        """Layout, shell (metadata, error, small records), then one frame per array."""
        layout: list[dict[str, Any]] = []
        small = RecordDict()
        arrays: list[ArrayRecord] = []
        if message.has_content():
            for key, record in message.content.items():
                if isinstance(record, ArrayRecord):
                    layout.append({"key": key, "arrays": list(record.keys())})
                    arrays.append(record)
                else:
                    layout.append({"key": key})
                    small[key] = record
        metadata = copy(message.metadata)
        # Flower's own (internal) metadata= keyword, which its public overloads leave out
        if message.has_error():
            shell = Message(metadata=metadata, error=message.error)  # type: ignore[call-overload]
        else:
            shell = Message(metadata=metadata, content=small)  # type: ignore[call-overload]
        self.send_json({"records": layout})
        self.send_frame(message_to_proto(shell).SerializeToString())
        for record in arrays:
            for array in record.values():
                self.send_frame(array_to_proto(array).SerializeToString())

    def recv_message(self) -> Message:
        layout = self.recv_json().get("records")
        if not isinstance(layout, list):
            raise ProtocolError("message layout without 'records'")
        message = message_from_proto(ProtoMessage.FromString(self.recv_frame()))  # type: ignore[arg-type]
        if message.has_error():
            return message
        small, content = message.content, RecordDict()
        for entry in layout:
            key = str(entry["key"])
            if "arrays" in entry:
                content[key] = ArrayRecord(
                    array_dict={
                        str(name): array_from_proto(
                            ProtoArray.FromString(self.recv_frame())  # type: ignore[arg-type]
                        )
                        for name in entry["arrays"]
                    },
                    keep_input=False,
                )
            elif key in small:
                content[key] = small[key]
            else:
                raise ProtocolError(f"record '{key}' is in the layout but not in the message")
        message.content = content
        return message
