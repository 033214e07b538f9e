"""The thin ClientApp: hand each message to the hospital's site worker, return its reply.

It imports no torch (a ``flwr-clientapp`` process with it stays near 80 MB and starts in
half a second). The worker is found at ``<state-dir>/worker.sock`` from the node config.
Without a worker there (no socket, or a stale one), with ``FEDCLINIC_WORKER=off``, or when
the worker refuses (it runs other code than this run's app), the message is answered in
this process by the full handler, exactly as before; the log says which path answered.

A worker that dies mid-request ends the connection: the reply is then one ``info.error``
line naming the hospital, never a hang. A worker that stops answering is given the run's
``round-timeout`` (plus a margin), after which the coordinator has moved on anyway.
"""

from __future__ import annotations

import os
import time
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import log

from fedclinic.worker.protocol import (
    PROTOCOL,
    RECEIVE_ERRORS,
    Channel,
    code_identity,
    connect,
    socket_path,
    state_root,
)

#: ``off`` answers every message in process, whatever runs at the site
MODE_VARIABLE = "FEDCLINIC_WORKER"
CONNECT_TIMEOUT = 10.0
#: added to the run's round-timeout: the worker may still be finishing the previous message
TIMEOUT_MARGIN = 60.0
DEFAULT_ROUND_TIMEOUT = 600.0

app = ClientApp()


class WorkerUnavailable(Exception):
    """No worker will answer this message (the reason is logged); answer in process."""


class WorkerFailed(Exception):
    """The worker accepted the message but no reply came back."""


def _hospital(context: Context) -> str:
    return str(context.node_config.get("hospital", f"node-{context.node_id}"))


def answer_timeout(context: Context) -> float:
    """How long an answer may take: the run's round-timeout and a margin."""
    try:
        round_timeout = float(context.run_config.get("round-timeout", DEFAULT_ROUND_TIMEOUT))
    except (TypeError, ValueError):
        round_timeout = DEFAULT_ROUND_TIMEOUT
    return max(round_timeout, 1.0) + TIMEOUT_MARGIN


def via_worker(message: Message, context: Context, path: Path) -> tuple[Message, str]:
    """Send to the worker at ``path``; its reply and a note on how it was answered.

    Raises :class:`WorkerUnavailable` before the message was handed over, and
    :class:`WorkerFailed` after.
    """
    try:
        sock = connect(path, CONNECT_TIMEOUT)
    except FileNotFoundError:
        raise WorkerUnavailable(f"no site worker at {path}") from None
    except OSError as err:  # refused: a stale socket of a killed worker
        raise WorkerUnavailable(f"no site worker listening at {path} ({err.strerror})") from None
    with sock:
        sock.settimeout(answer_timeout(context))
        channel = Channel(sock)
        try:
            channel.send_json(
                {
                    "protocol": PROTOCOL,
                    "code": code_identity(),
                    "hospital": _hospital(context),
                    "state-dir": str(state_root(context.node_config)),
                    "pid": os.getpid(),
                }
            )
            answer = channel.recv_json()
        except RECEIVE_ERRORS as err:
            raise WorkerUnavailable(f"the site worker at {path} did not take it ({err})") from None
        if answer.get("status") != "accepted":
            raise WorkerUnavailable(f"the site worker refused: {answer.get('reason')}")
        try:
            channel.send_context(context)
            channel.send_message(message)
            # The worker has it now: let go of this copy of the model before the reply
            # arrives (in a flwr-clientapp nothing else holds it; content shared with other
            # messages stays with them)
            message.content = RecordDict()
            status = channel.recv_json()
            reply = channel.recv_message()
            context.state = channel.recv_records()
        except TimeoutError:
            raise WorkerFailed(
                f"the site worker (pid {answer.get('pid')}) sent no reply within "
                f"{sock.gettimeout():g} s"
            ) from None
        except RECEIVE_ERRORS as err:
            raise WorkerFailed(
                f"the site worker (pid {answer.get('pid')}) stopped before replying ({err})"
            ) from None
    note = f"by the site worker in {float(status.get('seconds', 0.0)):.2f} s"
    return reply, f"{note}, data {status.get('data') or '-'}"


def failure_reply(message: Message, hospital: str, why: str) -> Message:
    """The one-line error the engine records for a message that failed at the site
    (``hospital X: this message failed: ...``), from the forwarder or the site worker."""
    error = f"hospital {hospital}: this message failed: {why}"
    content = RecordDict({"info": ConfigRecord({"hospital": hospital, "error": error})})
    return Message(content=content, reply_to=message)


def in_process(message: Message, context: Context) -> Message:
    """Today's path: the full handler in this process (torch and the data load included)."""
    from client.app import app as handler  # the only heavy import, and only when needed

    return handler(message, context)


def forward(message: Message, context: Context) -> Message:
    """Answer through the worker when one serves this hospital, else in process."""
    name, kind = _hospital(context), message.metadata.message_type
    started = time.monotonic()
    if os.environ.get(MODE_VARIABLE, "").lower() == "off":
        reply = in_process(message, context)
        log(INFO, "fedclinic hospital %s: %s answered in process (%s=off)", name, kind,
            MODE_VARIABLE)  # fmt: skip
        return reply
    path = socket_path(context.node_config)
    try:
        reply, note = via_worker(message, context, path)
    except WorkerUnavailable as why:
        reply = in_process(message, context)
        log(INFO, "fedclinic hospital %s: %s answered in process in %.2f s: %s", name, kind,
            time.monotonic() - started, why)  # fmt: skip
        return reply
    except WorkerFailed as why:
        log(WARNING, "fedclinic hospital %s: %s failed: %s", name, kind, why)
        return failure_reply(message, name, str(why))
    log(INFO, "fedclinic hospital %s: %s answered %s", name, kind, note)
    return reply


@app.train()
def train(message: Message, context: Context) -> Message:
    return forward(message, context)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    return forward(message, context)


@app.query()
def query(message: Message, context: Context) -> Message:
    return forward(message, context)
