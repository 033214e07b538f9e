"""The site worker as its SuperNode's task executor: messages taken straight from the node.

Why: with Flower 1.39's default ``subprocess`` isolation the SuperNode starts Flower's
SuperExec, which polls the node for a task every second and starts one ``flwr-clientapp``
process per message; ours is the thin forwarder (:mod:`fedclinic.worker.forwarder`), which
imports Flower (about 1 CPU-second), reinstalls the run's FAB and hands the message to this
worker over its socket. Started with ``--isolation process`` the SuperNode starts no
SuperExec and leaves the tasks to an outside executor: this module, inside the worker, takes
each task from the node's Runtime API (loopback HTTP) and answers it with the handler it
already holds, with no process started per message.

What it does per task, in Flower's own order (``flwr/supernode/runtime/run_clientapp.py``):

1. ``AcquireTask`` (a task of type ``flwr-clientapp``; the node hands out a token for it,
   valid 30 s until the task starts), polled every :data:`POLL_SECONDS` while idle;
2. a heartbeat thread (Flower's ``HeartbeatSender``: every 17.5 to 22.5 s; each beat keeps
   the task alive for 60 s; a task whose beats stop is failed by the node, which answers the
   coordinator ``ClientApp stopped responding``);
3. ``PullTaskInput`` (the run's context; a token starts its task once), ``PullMessages``
   and the message's objects (the node creates the task just before it stores the message,
   so an empty answer is asked again for up to :data:`MESSAGE_WAIT_SECONDS`);
4. the handler's reply, or an error reply: a reply always goes back before the task's output
   (the node waits for a reply, and after ``PushTaskOutput`` the token is gone);
5. ``PushMessages`` and the reply's objects, then ``PushTaskOutput`` with the context.

Code identity: the run's code comes in its FAB, which ``PullTaskInput`` hands over. The worker
answers the message itself only when that code is its own
(:func:`~fedclinic.worker.protocol.code_identity_of_fab`, the identity the forwarder and the
worker compare); a run with other code (a coordinator on another fedclinic version) is
answered the way ``flwr-clientapp`` answers it, by the FAB's own ClientApp, in a child process
(:mod:`fedclinic.worker.fab_app`).

A worker killed mid-task: the task's token and the message's header are in ``worker.task``
in the state dir (mode 0600) while it answers; the next worker (restarted by
:class:`~fedclinic.worker.keeper.WorkerKeeper`) answers that message with one error line
naming the dead worker, as the forwarder did, instead of leaving the hospital to Flower's
60 s heartbeat expiry.

Flower's client helpers are not used as they are: ``run_clientapp`` ends with ``sys.exit``,
its retry invoker sends its own process SIGINT on an HTTP 401 (an expired token), and its
heartbeat function does so when a beat is refused; one stale token must not stop a worker.
The names below are Flower 1.39.0's, some private (:func:`check_flower` at start).
"""

from __future__ import annotations

import base64
import json
import os
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any, Protocol

import httpx
from flwr.app import Context, Error, Message, RecordDict
from flwr.app.message.message import remove_content_from_message
from flwr.common import log
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    message_from_proto,
    message_to_proto,
)
from flwr.proto.fab_pb2 import Fab as ProtoFab
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.proto.node_pb2 import Node
from flwr.proto.runtime_pb2 import (
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullTaskInputRequest,
    PullTaskInputResponse,
    PushTaskOutputRequest,
    SendTaskHeartbeatRequest,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message
from google.protobuf.message import DecodeError

from fedclinic.flower import LauncherError, require_flower
from fedclinic.worker.forwarder import MODE_VARIABLE, answer_timeout, failure_reply
from fedclinic.worker.protocol import code_identity_of_fab

#: seconds between two ``AcquireTask`` calls while no task waits (SuperExec: 1 s)
POLL_SECONDS = 0.25
#: seconds between tries while the node's Runtime API does not answer (it starts, restarts)
UNREACHABLE_SECONDS = 1.0
#: how long an acquired task's message may take to appear at the node
MESSAGE_WAIT_SECONDS = 30.0
#: the in-flight task's token and message header, for the next worker after a crash
JOURNAL_NAME = "worker.task"
#: how the Runtime API knows a ClientApp (the task type, the version header's component)
COMPONENT = "flwr-clientapp"
#: the script that answers a message with a run's own ClientApp (other code than the worker's)
FAB_APP = Path(__file__).with_name("fab_app.py")
_LENGTH = struct.Struct(">Q")


def frame(data: bytes) -> bytes:
    """One frame of :mod:`fedclinic.worker.fab_app`'s pipes: 8-byte length, then the bytes."""
    return _LENGTH.pack(len(data)) + data


def unframe(data: bytes) -> tuple[bytes, bytes]:
    """The first frame of ``data`` and what follows it (ValueError when it is cut short)."""
    if len(data) < _LENGTH.size:
        raise ValueError("no frame")
    (size,) = _LENGTH.unpack_from(data)
    end = _LENGTH.size + size
    if len(data) < end:
        raise ValueError("a frame cut short")
    return data[_LENGTH.size : end], data[end:]


def check_flower(installed: str | None = None) -> None:
    """Refuse to run on a Flower whose private Runtime API names may differ (one line)."""
    require_flower(
        "the site worker's task executor",
        "start the hospital with --no-worker, or install that flwr",
        installed,
    )
    if TaskType.CLIENT_APP != COMPONENT or not hasattr(RuntimeHttpClient, "AcquireTask"):
        raise LauncherError("flwr's Runtime API is not the one the site worker knows")


def flower_reason(err: BaseException) -> str:
    """An exception as ``flwr-clientapp`` reports it to the coordinator."""
    return str(type(err)) + ":<'" + str(err) + "'>"


class Journal:
    """``<state-dir>/worker.task``: the task being answered (its token and the message
    without content), so that a worker started after a crash can answer it."""

    def __init__(self, root: Path) -> None:
        self.path = root / JOURNAL_NAME

    def write(self, token: str, message: Message, context: Context) -> None:
        proto = message_to_proto(remove_content_from_message(message))
        record = {
            "token": token,
            "pid": os.getpid(),
            "run-id": context.run_id,
            "node-id": context.node_id,
            "message": base64.b64encode(proto.SerializeToString()).decode("ascii"),
        }
        temporary = self.path.with_suffix(".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            json.dump(record, file)
        os.replace(temporary, self.path)

    def read(self) -> dict[str, Any] | None:
        try:
            record = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            log(WARNING, "fedclinic worker: ignoring an unreadable %s: %s", self.path, err)
            self.clear()
            return None
        return record if isinstance(record, dict) else None

    def clear(self) -> None:
        with suppress(FileNotFoundError):
            self.path.unlink()


class Site(Protocol):
    """What the executor needs of the site worker (:class:`fedclinic.worker.server.SiteWorker`)."""

    name: str
    root: Path
    code: str

    def respond(self, message: Message, context: Context, sender: str) -> Message:
        """The handler's reply (its exceptions already turned into error replies)."""
        ...


def _beat(client: RuntimeHttpClient, lost: threading.Event) -> bool:
    """One heartbeat, as Flower's ``make_task_heartbeat_fn_http`` sends it, without its
    SIGINT: a refused beat (the token expired or was revoked) only sets ``lost``."""
    try:
        accepted = client.SendTaskHeartbeat(SendTaskHeartbeatRequest()).success
    except httpx.TransportError:
        return False  # retried by the sender, with backoff
    except httpx.HTTPStatusError as err:
        if err.response.status_code in (503, 504):
            return False
        accepted = False
    if not accepted:
        lost.set()
    return True


class TaskExecutor:
    """Acquire the node's ClientApp tasks and answer them, one at a time."""

    def __init__(
        self,
        site: Site,
        runtime_address: str,
        *,
        poll_seconds: float = POLL_SECONDS,
        message_wait: float = MESSAGE_WAIT_SECONDS,
    ) -> None:
        check_flower()
        self.site = site
        self.address = runtime_address
        self.poll_seconds = poll_seconds
        self.message_wait = message_wait
        self.journal = Journal(site.root)
        #: FAB hash -> the code identity of the FAB's packages
        self.fab_codes: dict[str, str] = {}
        self.answered = 0
        self.answered_by_run_code = 0
        self._poller = self._client(None)
        self._reachable: bool | None = None

    def _client(self, token: str | None) -> RuntimeHttpClient:
        interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name=COMPONENT)]
        if token:
            interceptors.append(RuntimeTokenHttpInterceptor(token))
        return RuntimeHttpClient.from_server_address(self.address, True, None, interceptors)

    def close(self) -> None:
        self._poller.close()

    # ------------------------------------------------------------------ loop

    def serve(self, stop: Callable[[], bool] = lambda: False) -> None:
        """Take and answer tasks until ``stop()`` (a signal ends it sooner)."""
        self.recover()
        while not stop():
            try:
                took = self.step()
            except Exception as err:  # one bad answer from the node must not end the worker
                log(ERROR, "fedclinic worker %s: taking a task failed", self.site.name,
                    exc_info=err)  # fmt: skip
                took = False
            if not took:
                time.sleep(self.poll_seconds if self._reachable else UNREACHABLE_SECONDS)

    def step(self) -> bool:
        """Acquire one task and see it through; whether there was one."""
        try:
            acquired = self._poller.AcquireTask(
                AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
            )
        except httpx.HTTPError as err:
            if self._reachable is not False:
                log(WARNING, "fedclinic worker %s: the node's Runtime API at %s does not "
                    "answer (%s); trying again every %g s", self.site.name, self.address,
                    err, UNREACHABLE_SECONDS)  # fmt: skip
            self._reachable = False
            return False
        if not self._reachable:
            log(INFO, "fedclinic worker %s: taking the node's tasks from %s", self.site.name,
                self.address)  # fmt: skip
            self._reachable = True
        if not (acquired.HasField("task") and acquired.token):
            return False
        self.run_task(acquired.token)
        return True

    # ------------------------------------------------------------------ one task here

    def pull_input(
        self, client: RuntimeHttpClient
    ) -> tuple[Message, Context, PullTaskInputResponse]:
        """``run_clientapp.pull_task_input``, waiting for a message the node has not stored
        yet; the task input (run, FAB) comes back as Flower sent it."""
        task_input = client.PullTaskInput(PullTaskInputRequest())
        TaskIdentity.task_id = task_input.task_id
        TaskIdentity.run_id = task_input.run.run_id
        TaskIdentity.node_id = task_input.context.node_id
        context = context_from_proto(task_input.context)
        deadline = time.monotonic() + self.message_wait
        while True:
            pulled = client.PullMessages(PullAppMessagesRequest())
            if pulled.messages_list:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("No messages received from Runtime API")
            time.sleep(0.05)
        tree = pulled.message_object_trees[0]
        node = Node(node_id=context.node_id)
        message = pull_and_inflate_object_from_tree(
            tree,
            make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
            make_confirm_message_received_fn_protobuf(
                client.ConfirmMessageReceived, node, context.run_id
            ),
            return_type=Message,
        )
        message.metadata.__dict__["_message_id"] = tree.object_id
        return message, context, task_input

    def run_task(self, token: str) -> None:
        """Pull, answer, push reply then output; every path pushes a reply once a message
        was pulled (an error reply for an exception, also a signal's)."""
        client = self._client(token)
        lost = threading.Event()
        heartbeat = HeartbeatSender(lambda: _beat(client, lost))
        heartbeat.start()
        message: Message | None = None
        context: Context | None = None
        reply: Message | None = None
        status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        try:
            message, context, task_input = self.pull_input(client)
            self.journal.write(token, message, context)
            if self.code_of(task_input.fab) == self.site.code:
                sender = f"the node's task {TaskIdentity.task_id}"
                reply = self.site.respond(message, context, sender)
            else:
                reply = self.answer_with_run_code(task_input, message, context)
            status, details = SubStatus.COMPLETED, ""
            self.answered += 1
        except BaseException as err:  # a signal too: the node must not wait for a reply
            details = flower_reason(err)
            if isinstance(err, Exception):
                log(ERROR, "fedclinic worker %s: a task failed", self.site.name, exc_info=err)
            if message is not None:
                reply = Message(
                    Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details),
                    reply_to=message,
                )
            if not isinstance(err, Exception):
                raise
        finally:
            self._finish(client, context, reply, status, details, lost)
            with suppress(RuntimeError):  # its thread ended on its own (an unexpected error)
                heartbeat.stop()
            client.close()
            self.journal.clear()

    def _finish(
        self,
        client: RuntimeHttpClient,
        context: Context | None,
        reply: Message | None,
        status: str,
        details: str,
        lost: threading.Event,
    ) -> None:
        """Reply first, then the task's output (the token dies with the output)."""
        if lost.is_set():
            log(WARNING, "fedclinic worker %s: the node gave up on this task (no heartbeat "
                "accepted); its reply is not sent", self.site.name)  # fmt: skip
        elif reply is not None and context is not None:
            try:
                push_message(client, reply, context)
            except Exception as err:
                log(ERROR, "fedclinic worker %s: could not push the reply: %s",
                    self.site.name, err)  # fmt: skip
                status, details = SubStatus.FAILED, flower_reason(err)
        try:
            client.PushTaskOutput(
                PushTaskOutputRequest(
                    context=context_to_proto(context) if context is not None else None,
                    sub_status=status,
                    details=details,
                )
            )
        except httpx.HTTPError as err:
            log(ERROR, "fedclinic worker %s: could not push the task's output: %s",
                self.site.name, err)  # fmt: skip

    # ------------------------------------------------------------------ other code

    def code_of(self, fab: ProtoFab) -> str:
        """The code identity of a FAB's packages (read from the zip once per FAB)."""
        if fab.hash_str not in self.fab_codes:
            self.fab_codes[fab.hash_str] = code_identity_of_fab(fab.content)
            same = self.fab_codes[fab.hash_str] == self.site.code
            log(INFO, "fedclinic worker %s: FAB %s runs %s", self.site.name, fab.hash_str[:12],
                "this worker's code: answered here" if same else
                "other code than this worker's: answered by the run's own ClientApp in a "
                "child process")  # fmt: skip
        return self.fab_codes[fab.hash_str]

    def answer_with_run_code(
        self, task_input: PullTaskInputResponse, message: Message, context: Context
    ) -> Message:
        """The reply of the FAB's own ClientApp (:mod:`fedclinic.worker.fab_app`, a child
        process with ``FEDCLINIC_WORKER=off``); ``context.state`` becomes the child's."""
        name, kind = self.site.name, message.metadata.message_type
        log(INFO, "fedclinic worker %s: answering %s (group %s) with the run's own code",
            name, kind, message.metadata.group_id or "-")  # fmt: skip
        frames = b"".join(
            frame(proto.SerializeToString())
            for proto in (
                task_input.fab,
                task_input.run,
                context_to_proto(context),
                message_to_proto(message),
            )
        )
        child = subprocess.Popen(
            [sys.executable, "-P", str(FAB_APP)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env={**os.environ, MODE_VARIABLE: "off"},
        )  # fmt: skip
        seconds = answer_timeout(context)
        try:
            out, _ = child.communicate(frames, timeout=seconds)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
            raise RuntimeError(
                f"hospital {name}: the run's own ClientApp sent no reply within {seconds:g} s"
            ) from None
        finally:
            if child.poll() is None:  # a signal stopped us
                child.kill()
        try:
            reply_bytes, rest = unframe(out)
            context_bytes, _ = unframe(rest)
            reply_proto, context_proto = ProtoMessage(), ProtoContext()
            reply_proto.ParseFromString(reply_bytes)
            context_proto.ParseFromString(context_bytes)
        except (ValueError, DecodeError):
            raise RuntimeError(
                f"hospital {name}: the run's own ClientApp (a child process) exited with "
                f"status {child.returncode} without a reply; its log is above"
            ) from None
        context.state = context_from_proto(context_proto).state
        self.answered_by_run_code += 1
        return message_from_proto(reply_proto)

    # ------------------------------------------------------------------ after a crash

    def recover(self) -> None:
        """Answer the task a killed worker left in ``worker.task`` with one error line."""
        record = self.journal.read()
        if record is None:
            return
        self.journal.clear()
        client = self._client(str(record.get("token", "")) or None)
        try:
            proto = ProtoMessage()
            proto.ParseFromString(base64.b64decode(str(record["message"])))
            message = message_from_proto(proto)
            context = Context(
                run_id=int(record["run-id"]), node_id=int(record["node-id"]), node_config={},
                state=RecordDict(), run_config={},
            )  # fmt: skip
            why = f"the site worker (pid {record.get('pid')}) stopped before replying"
            push_message(client, failure_reply(message, self.site.name, why), context)
            client.PushTaskOutput(PushTaskOutputRequest(sub_status=SubStatus.FAILED, details=why))
            log(WARNING, "fedclinic worker %s: answered the message a stopped worker left: "
                "%s", self.site.name, why)  # fmt: skip
        except Exception as err:  # the token expired: the node already answered it
            log(WARNING, "fedclinic worker %s: the task a stopped worker left is gone "
                "(%s)", self.site.name, err)  # fmt: skip
        finally:
            client.close()
