"""The site worker process: the hospital's ClientApp handler, loaded once, behind a socket.

It imports torch and the handler (``client.app``) once, then answers one message per
connection, in order, with the very handler a ``flwr-clientapp`` process runs, so every
algorithm behaves the same. What stays in memory between messages: the imported code,
the CUDA context (on a GPU site) and the hospital's loaded data (:class:`DataMemo`, keyed
by the run config, the hospital config and the data files' identity). Site state stays on
disk (:class:`fedclinic.site.SiteState`), so resume and restarts behave as before.

One worker per state dir: ``worker.lock`` (``flock``) proves it is alive; a socket file
left by a killed worker is removed when the next one starts.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import IO, Any

from flwr.app import Context, Error, Message
from flwr.common import log
from flwr.common.constant import ErrorCode

import client.app as handler
from fedclinic.data import DataRequest, HospitalData, load_hospital_data
from fedclinic.data.base import DataSource
from fedclinic.data.cache import Verify, tree_identity
from fedclinic.errors import ConfigError
from fedclinic.worker.executor import TaskExecutor, flower_reason
from fedclinic.worker.protocol import (
    LOCK_NAME,
    PROTOCOL,
    RECEIVE_ERRORS,
    SOCKET_NAME,
    Channel,
    ProtocolError,
    code_identity,
    socket_address,
    state_root,
)

#: seconds one read or write of a request may stall (a live forwarder never pauses)
IO_TIMEOUT = 120.0


class DataMemo:
    """A hospital's loaded data, kept between the messages of a run.

    Reused only while the run config, the hospital config and every file under the
    hospital's ``data-path`` (names, sizes, modification times; with ``data-cache = "hash"``
    also contents, as the site's cache then checks them) are unchanged; anything else loads
    (and checks) the data again, as a fresh ClientApp process would.
    """

    def __init__(self, loader: DataSource = load_hospital_data) -> None:
        self.loader = loader
        self.key: tuple[str, str, str, str] | None = None
        self.data: HospitalData | None = None
        self.last = ""  # "loaded" or "reused": how the last request got its data

    def load(self, request: DataRequest) -> HospitalData:
        path = Path(request.hospital.data_path).expanduser() if request.hospital.data_path else None
        verify: Verify = "hash" if request.hospital.data_cache == "hash" else "stat"
        files = tree_identity(path, verify) if path is not None and path.exists() else ""
        key = (  # raw (statistics) and normalised (training) data are different data
            request.run.model_dump_json(),
            request.hospital.model_dump_json(),
            files,
            repr(request.normalisation),
        )
        if self.data is not None and key == self.key:
            self.last = "reused"
            return self.data
        self.key, self.data = None, None  # never keep the old data beside the new
        data = self.loader(request)
        self.key, self.data, self.last = key, data, "loaded"
        return data


@contextmanager
def data_from(memo: DataMemo) -> Iterator[None]:
    """Let the ClientApp handler take its data from ``memo``.

    ``client.app.answer`` calls ``load_hospital_data`` by name; inside the worker that name
    is pointed at the memo. (Phase B of issue 20 replaces this with an ``answer`` argument.)
    """
    original = handler.load_hospital_data
    handler.load_hospital_data = memo.load
    try:
        yield
    finally:
        handler.load_hospital_data = original


def _sender(hello: Mapping[str, Any]) -> str:
    return f"forwarder pid {hello.get('pid', '?')}"


class AlreadyServing(ConfigError):
    """Another live worker holds this state dir."""


class SiteWorker:
    """One hospital's worker: lock, socket, and the loop that answers messages."""

    def __init__(self, node_config: Mapping[str, Any]) -> None:
        self.node_config = dict(node_config)
        self.name = str(self.node_config["hospital"])
        self.root = state_root(self.node_config)
        self.socket_path = self.root / SOCKET_NAME
        self.code = code_identity()
        self.memo = DataMemo()
        self.answered = 0
        self._lock: IO[str] | None = None
        self._listener: socket.socket | None = None

    # -------------------------------------------------------------------- start / stop

    def open(self) -> None:
        """Take the lock, clear a stale socket, listen (socket mode 0600)."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = (self.root / LOCK_NAME).open("a+", encoding="utf-8")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            lock.close()
            raise AlreadyServing(
                f"hospital {self.name}: a site worker (pid {holder}) already serves "
                f"{self.socket_path}; stop it first (one worker per state dir)"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        self._lock = lock
        if self.socket_path.exists() or self.socket_path.is_symlink():
            self.socket_path.unlink()  # we hold the lock: whoever made it is gone
            log(WARNING, "fedclinic worker %s: removed a stale %s", self.name, self.socket_path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with socket_address(self.socket_path) as address:
                listener.bind(address)
            os.chmod(self.socket_path, 0o600)  # before listen(): nobody connects earlier
            listener.listen(16)
        except BaseException:
            listener.close()
            self.close()
            raise
        self._listener = listener

    def close(self) -> None:
        """Stop listening, remove the socket, release the lock (idempotent)."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with suppress(FileNotFoundError):
                self.socket_path.unlink()
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    def __enter__(self) -> SiteWorker:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------------- serving

    def serve(self, runtime_address: str | None = None) -> None:
        """Answer until a signal stops the process: with ``runtime_address`` (the node's
        Runtime API) the node's tasks, taken straight from it
        (:class:`~fedclinic.worker.executor.TaskExecutor`); else the forwarders' connections,
        one at a time (a node with Flower's own executor, started without fedclinic)."""
        if self._listener is None:
            raise RuntimeError("SiteWorker.serve() before open()")
        with data_from(self.memo):
            if runtime_address:
                executor = TaskExecutor(self, runtime_address)
                try:
                    executor.serve()
                finally:
                    executor.close()
                return
            while True:
                connection, _ = self._listener.accept()
                with connection:
                    self.serve_connection(Channel(connection))

    def serve_connection(self, channel: Channel) -> None:
        """One message: hello, context and message in, reply and state out."""
        channel.sock.settimeout(IO_TIMEOUT)
        try:
            hello = channel.recv_json()
            refusal = self.refusal(hello)
            if refusal:
                log(WARNING, "fedclinic worker %s: refused a request: %s", self.name, refusal)
                channel.send_json({"status": "refused", "reason": refusal})
                return
            channel.send_json({"status": "accepted", "pid": os.getpid()})
            context = channel.recv_context()
            message = channel.recv_message()
        except RECEIVE_ERRORS as err:  # a malformed request must not stop the worker
            log(WARNING, "fedclinic worker %s: dropped a request: %s", self.name, err)
            return
        started = time.monotonic()
        reply = self.respond(message, context, _sender(hello))
        seconds = time.monotonic() - started
        try:
            channel.send_json({"status": "answered", "seconds": seconds, "data": self.memo.last})
            channel.send_message(reply)
            channel.send_records(context.state)
        except (ProtocolError, OSError) as err:
            log(WARNING, "fedclinic worker %s: the forwarder went away: %s", self.name, err)

    def respond(self, message: Message, context: Context, sender: str) -> Message:
        """:meth:`answer`, with a log line before and after (``sender``: who asked)."""
        log(
            INFO, "fedclinic worker %s: answering %s (group %s, %s)", self.name,
            message.metadata.message_type, message.metadata.group_id or "-", sender,
        )  # fmt: skip
        started = time.monotonic()
        reply = self.answer(message, context)
        self.answered += 1
        log(
            INFO,
            "fedclinic worker %s: answered %s (group %s) in %.2f s, data %s",
            self.name, message.metadata.message_type, message.metadata.group_id or "-",
            time.monotonic() - started, self.memo.last or "-",
        )  # fmt: skip
        return reply

    def refusal(self, hello: Mapping[str, Any]) -> str:
        """Why this worker must not answer the request ('' when it may)."""
        if hello.get("protocol") != PROTOCOL:
            return f"protocol {hello.get('protocol')!r}, this worker speaks {PROTOCOL}"
        if hello.get("code") != self.code:
            return (
                f"the run's code ({str(hello.get('code'))[:12]}) differs from this worker's "
                f"({self.code[:12]}); update the site or restart the worker"
            )
        if hello.get("hospital") != self.name:
            return f"message for hospital {hello.get('hospital')!r}, this worker is {self.name!r}"
        if hello.get("state-dir") != str(self.root):
            return f"message for state dir {hello.get('state-dir')}, this worker has {self.root}"
        return ""

    def answer(self, message: Message, context: Context) -> Message:
        """The ClientApp's own dispatch; an exception becomes Flower's error reply, worded
        as ``flwr-clientapp`` words it."""
        self.memo.last = ""
        try:
            return handler.app(message, context)
        except Exception as err:
            log(ERROR, "fedclinic worker %s: the ClientApp raised", self.name, exc_info=err)
            return Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=flower_reason(err)),
                reply_to=message,
            )
