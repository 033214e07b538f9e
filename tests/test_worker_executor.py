"""The site worker's task executor (fedclinic.worker.executor) against Flower's own node.

The node here is Flower 1.39's real SuperNode state and Runtime API (``NodeState``,
``ObjectStore``, ``flwr.supernode.main.create_app`` under uvicorn on loopback), filled the
way ``flower-supernode`` fills it when a message arrives (run, FAB, context, task, message,
objects): the executor talks HTTP to it exactly as in a federation, without a SuperLink.
What the node holds afterwards (the reply, the task's status, the stored context) is read
from Flower's state, not from the executor.

The real SuperNode + SuperLink runs (every message answered by the worker, a worker
SIGKILLed mid-task) are in test_e2e_local.py and test_e2e_worker.py.
"""

from __future__ import annotations

import hashlib
import io
import os
import socket
import stat
import textwrap
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import uvicorn
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.app.message.message import make_message, remove_content_from_message
from flwr.app.metadata import Metadata
from flwr.cli.build import build_fab_from_disk
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import PushTaskOutputRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.inflatable.inflatable_utils import (
    inflate_object_from_contents,
    iterate_object_tree,
)
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run, RunStatus
from flwr.supernode.main import create_app
from flwr.supernode.nodestate import NodeStateFactory

from fedclinic.errors import Interrupted
from fedclinic.flower import LauncherError
from fedclinic.worker import executor as executor_module
from fedclinic.worker.executor import (
    JOURNAL_NAME,
    TaskExecutor,
    _beat,
    check_flower,
    frame,
    unframe,
)
from fedclinic.worker.protocol import code_identity_of_fab

NODE_ID, RUN_ID = 7, 11


def zipped(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as fab:
        for name, text in files.items():
            fab.writestr(name, text)
    return buffer.getvalue()


#: a FAB whose packages are the (fake) site worker's code
OURS = zipped({"pyproject.toml": "", "client/__init__.py": "", "client/app.py": "# ours\n"})
#: a real, installable FAB of another app: its ClientApp triples the weights
OTHER_APP = {
    "pyproject.toml": textwrap.dedent(
        """\
        [build-system]
        requires = ["hatchling"]
        build-backend = "hatchling.build"

        [project]
        name = "otherapp"
        version = "2.0.0"

        [tool.flwr.app]
        publisher = "elsewhere"

        [tool.flwr.app.components]
        serverapp = "client.app:app"
        clientapp = "client.app:app"
        """
    ),
    "client/__init__.py": "",
    "client/app.py": textwrap.dedent(
        """\
        import os
        from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
        from flwr.clientapp import ClientApp

        app = ClientApp()


        @app.train()
        def train(message, context):
            if context.run_config.get("fail"):
                raise RuntimeError("the other code failed")
            weights = message.content.array_records["model"].to_numpy_ndarrays()[0]
            mode = os.environ.get("FEDCLINIC_WORKER", "")
            context.state["other"] = ConfigRecord({"worker-mode": mode})
            print("the other code answers", flush=True)  # to stderr, not into the frames
            return Message(RecordDict({"model": ArrayRecord([weights * 3])}), reply_to=message)
        """
    ),
}


class FlowerNode:
    """Flower's SuperNode state and Runtime API, without the Fleet side."""

    def __init__(self) -> None:
        stores = ObjectStoreFactory()
        factory = NodeStateFactory(stores)
        self.state = factory.state()
        self.store = stores.store()
        self.state.set_node_id(NODE_ID)
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{probe.getsockname()[1]}"
        probe.close()
        host, port = self.address.split(":")
        config = uvicorn.Config(
            create_app(state_factory=factory),
            host=host,
            port=int(port),
            log_level="warning",
            ws="none",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        self.runs: dict[str, int] = {}
        self.executors: list[TaskExecutor] = []  # closed with the node

    def stop(self) -> None:
        for executor in self.executors:
            executor.close()
        self.server.should_exit = True
        self.thread.join(10)

    def run_of(self, fab: bytes) -> tuple[int, str]:
        """A run of ``fab`` (created once), as the node stores it when its first message
        arrives: run, FAB, the run series' context."""
        digest = hashlib.sha256(fab).hexdigest()
        if digest not in self.runs:
            run_id = RUN_ID + len(self.runs)
            run = Run.create_empty(run_id)
            run.fab_hash, run.primary_task_type = digest, TaskType.CLIENT_APP
            run.fab_id, run.fab_version = "elsewhere/otherapp", "2.0.0"  # THEIRS's
            run.status = RunStatus("running", "", "")
            run.series_id = run_id
            self.state.store_run(run)
            self.state.store_fab(Fab(digest, fab, {}))
            context = Context(
                run_id=run_id, node_id=NODE_ID, node_config={"hospital": "st-mary"},
                state=RecordDict({"kept": ConfigRecord({"rounds": 1})}),
                run_config={"round-timeout": 60.0},
            )  # fmt: skip
            self.state.set_run_series_context(run_id, context)
            self.runs[digest] = run_id
        return self.runs[digest], digest

    def deliver(self, fab: bytes = OURS, *, message_after: float = 0.0) -> tuple[Message, int]:
        """A training message for this node: the task first, then (``message_after`` s
        later, as when the node is still receiving it) the message and its objects."""
        run_id, digest = self.run_of(fab)
        content = RecordDict(
            {
                "model": ArrayRecord([np.arange(6, dtype=np.float32)]),
                "config": ConfigRecord({"lr": 0.5}),
            }
        )
        metadata = Metadata(
            run_id=run_id, message_id="", src_node_id=1, dst_node_id=NODE_ID,
            reply_to_message_id="", group_id="2", created_at=time.time(), ttl=3600.0,
            message_type="train",
        )  # fmt: skip
        message = make_message(metadata=metadata, content=content)
        message.metadata.__dict__["_message_id"] = message.object_id
        task_id = self.state.create_task(
            task_type=TaskType.CLIENT_APP, run_id=run_id, fab_hash=digest
        )
        assert task_id is not None

        def store() -> None:
            self.store.preregister(run_id, get_object_tree(message))
            self.state.store_message(remove_content_from_message(message))
            for object_id, inflatable in get_all_nested_objects(message).items():
                self.store.put(object_id, inflatable.deflate())

        if message_after:
            threading.Timer(message_after, store).start()
        else:
            store()
        return message, task_id

    def replies(self) -> list[Message]:
        """The replies waiting to go to the coordinator, as the node's loop takes them."""
        replies = list(self.state.get_messages(is_reply=True))
        return [self.inflated(reply) for reply in replies]

    def inflated(self, reply: Message) -> Message:
        message_id = reply.metadata.message_id
        tree = self.store.get_object_tree(message_id)
        contents = {t.object_id: self.store.get(t.object_id) for t in iterate_object_tree(tree)}
        inflated = inflate_object_from_contents(message_id, contents, keep_object_contents=True)
        assert isinstance(inflated, Message)
        inflated.metadata.__dict__.update(reply.metadata.__dict__)
        return inflated

    def task(self, task_id: int) -> tuple[str, str, str]:
        found = self.state.get_tasks(task_ids=[task_id])[0]
        return found.status.status, found.status.sub_status, found.status.details

    def context_state(self, fab: bytes = OURS) -> RecordDict:
        context = self.state.get_run_series_context(self.run_of(fab)[0])
        assert context is not None
        return context.state


@dataclass
class FakeSite:
    """The worker's side the executor calls: its handler and its forwarder socket."""

    root: Path
    name: str = "st-mary"
    code: str = code_identity_of_fab(OURS)
    raise_: BaseException | None = None
    seen: list[tuple[Message, Context, str]] = field(default_factory=list)

    def respond(self, message: Message, context: Context, sender: str) -> Message:
        self.seen.append((message, context, sender))
        if self.raise_ is not None:
            raise self.raise_
        weights = message.content.array_records["model"].to_numpy_ndarrays()[0]
        context.state["kept"] = ConfigRecord({"rounds": 2})
        content = RecordDict({"model": ArrayRecord([weights * 2])})
        return Message(content, reply_to=message)


@pytest.fixture
def node(task_identity: None) -> Iterator[FlowerNode]:
    flower = FlowerNode()
    yield flower
    flower.stop()


@pytest.fixture
def site(tmp_path: Path) -> FakeSite:
    return FakeSite(tmp_path / "state")


def executor(site: FakeSite, node: FlowerNode) -> TaskExecutor:
    site.root.mkdir(parents=True, exist_ok=True)
    node.executors.append(TaskExecutor(site, node.address, poll_seconds=0.05))
    return node.executors[-1]


def test_a_task_is_answered_here_and_the_node_holds_reply_and_context(
    node: FlowerNode, site: FakeSite
) -> None:
    message, task_id = node.deliver()
    tasks = executor(site, node)
    assert tasks.step() is True
    [(received, context, sender)] = site.seen
    assert received.metadata.message_id == message.metadata.message_id
    assert received.content.config_records["config"]["lr"] == 0.5
    np.testing.assert_array_equal(
        received.content.array_records["model"].to_numpy_ndarrays()[0], np.arange(6)
    )
    assert context.node_config["hospital"] == "st-mary" and context.run_config["round-timeout"]
    assert sender == f"the node's task {task_id}"
    [reply] = node.replies()
    assert reply.metadata.reply_to_message_id == message.metadata.message_id
    np.testing.assert_array_equal(
        reply.content.array_records["model"].to_numpy_ndarrays()[0], np.arange(6) * 2
    )
    assert node.task(task_id)[:2] == ("finished", SubStatus.COMPLETED)
    assert node.context_state()["kept"]["rounds"] == 2  # the handler's state, stored
    assert not (site.root / JOURNAL_NAME).exists()
    assert tasks.step() is False  # nothing left


def test_a_task_acquired_before_its_message_is_stored_waits_for_it(
    node: FlowerNode, site: FakeSite
) -> None:
    """The node creates the task, then stores the message: a quick executor asks first."""
    message, task_id = node.deliver(message_after=0.6)
    assert executor(site, node).step() is True
    [reply] = node.replies()
    assert reply.metadata.reply_to_message_id == message.metadata.message_id
    assert node.task(task_id)[:2] == ("finished", SubStatus.COMPLETED)


def test_an_exception_becomes_flowers_error_reply_before_the_tasks_output(
    node: FlowerNode, site: FakeSite
) -> None:
    message, task_id = node.deliver()
    site.raise_ = RuntimeError("disk on fire")
    executor(site, node).step()
    [reply] = node.replies()  # the node must never wait for a reply that does not come
    assert reply.metadata.reply_to_message_id == message.metadata.message_id
    assert reply.has_error() and reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert reply.error.reason == "<class 'RuntimeError'>:<'disk on fire'>"
    status, sub_status, details = node.task(task_id)
    assert (status, sub_status) == ("finished", SubStatus.FAILED) and "disk on fire" in details
    assert node.context_state()["kept"]["rounds"] == 1  # nothing half-done stored


def test_a_signal_mid_task_still_replies_then_stops_the_worker(
    node: FlowerNode, site: FakeSite
) -> None:
    message, task_id = node.deliver()
    site.raise_ = Interrupted(15)
    with pytest.raises(Interrupted):
        executor(site, node).step()
    [reply] = node.replies()
    assert reply.metadata.reply_to_message_id == message.metadata.message_id
    assert reply.has_error()
    assert node.task(task_id)[:2] == ("finished", SubStatus.FAILED)


@pytest.fixture
def theirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> bytes:
    """THEIRS: OTHER_APP built the way ``flwr run`` builds a FAB; installed under a fresh
    FLWR_HOME by the child that answers with it."""
    app = tmp_path / "other-app"
    for name, text in OTHER_APP.items():
        (app / name).parent.mkdir(parents=True, exist_ok=True)
        (app / name).write_text(text)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    return build_fab_from_disk(app)


def test_a_run_of_other_code_is_answered_by_its_own_clientapp_in_a_child(
    node: FlowerNode, site: FakeSite, theirs: bytes, tmp_path: Path
) -> None:
    """The FAB's code is not the worker's: the run's own ClientApp answers, loaded by
    Flower's loader from the installed FAB, in a child with FEDCLINIC_WORKER=off (so a
    fedclinic forwarder there answers in process); the worker's handler is not called."""
    assert code_identity_of_fab(theirs) != site.code
    message, task_id = node.deliver(theirs)
    tasks = executor(site, node)
    tasks.step()
    assert site.seen == [] and tasks.answered_by_run_code == 1
    [reply] = node.replies()
    assert reply.metadata.reply_to_message_id == message.metadata.message_id
    np.testing.assert_array_equal(
        reply.content.array_records["model"].to_numpy_ndarrays()[0], np.arange(6) * 3
    )
    assert node.task(task_id)[:2] == ("finished", SubStatus.COMPLETED)
    state = node.context_state(theirs)  # the child's context went back to the node
    assert state["other"]["worker-mode"] == "off" and state["kept"]["rounds"] == 1
    [installed] = (tmp_path / "flwr-home" / "apps").iterdir()
    assert installed.name.startswith("elsewhere.otherapp.2.0.0.")
    node.deliver(OURS)  # and the worker's own code is still answered here
    tasks.step()
    assert len(site.seen) == 1 and tasks.answered_by_run_code == 1


def test_the_run_codes_failure_is_flowers_error_reply(
    node: FlowerNode, site: FakeSite, theirs: bytes
) -> None:
    run_id, _ = node.run_of(theirs)
    context = node.state.get_run_series_context(run_id)
    assert context is not None
    context.run_config["fail"] = True
    node.state.set_run_series_context(run_id, context)
    message, task_id = node.deliver(theirs)
    executor(site, node).step()
    [reply] = node.replies()
    assert reply.metadata.reply_to_message_id == message.metadata.message_id
    assert reply.has_error() and "the other code failed" in reply.error.reason
    assert node.task(task_id)[:2] == ("finished", SubStatus.COMPLETED)


def test_frames_cut_short_are_refused() -> None:
    assert unframe(frame(b"abc") + b"rest") == (b"abc", b"rest")
    for broken in (b"", b"\0\0\0", frame(b"abcdef")[:-1]):
        with pytest.raises(ValueError):
            unframe(broken)


def test_the_task_a_killed_worker_left_is_answered_by_the_next_with_one_line(
    node: FlowerNode, site: FakeSite
) -> None:
    """The dead worker pulled the message and wrote its journal, then died (SIGKILL: no
    reply, no output). The next worker answers it at once with the forwarder's wording,
    instead of the node waiting up to 60 s for the heartbeats to lapse."""
    message, task_id = node.deliver()
    dead = executor(site, node)
    acquired = dead._poller.AcquireTask(
        executor_module.AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    )
    client = dead._client(acquired.token)
    pulled, context, _ = dead.pull_input(client)
    dead.journal.write(acquired.token, pulled, context)
    client.close()  # and the worker dies: no reply, no output
    journal = site.root / JOURNAL_NAME
    assert stat.S_IMODE(journal.stat().st_mode) == 0o600  # it holds a live token
    assert node.replies() == [] and node.task(task_id)[0] == "running"

    executor(site, node).recover()
    [reply] = node.replies()
    assert reply.metadata.reply_to_message_id == message.metadata.message_id
    assert reply.content.config_records["info"]["error"] == (
        f"hospital st-mary: this message failed: the site worker (pid {os.getpid()}) "
        "stopped before replying"
    )
    assert node.task(task_id)[:2] == ("finished", SubStatus.FAILED)
    assert node.context_state()["kept"]["rounds"] == 1  # the run's context left alone
    assert not journal.exists()
    executor(site, node).recover()  # nothing left: nothing happens
    assert node.replies() == []


def test_a_journal_whose_task_is_gone_is_dropped(node: FlowerNode, site: FakeSite) -> None:
    message, _ = node.deliver()
    tasks = executor(site, node)
    tasks.step()  # answered and finished: its token is revoked
    node.replies()
    tasks.journal.write("0" * 256, message, Context(RUN_ID, NODE_ID, {}, RecordDict(), {}))
    executor(site, node).recover()
    assert node.replies() == [] and not (site.root / JOURNAL_NAME).exists()


def test_a_revoked_token_marks_the_task_lost_without_signalling_the_worker(
    node: FlowerNode, site: FakeSite
) -> None:
    """Flower's own heartbeat function sends its process SIGINT here; ours must not."""
    node.deliver()
    tasks = executor(site, node)
    acquired = tasks._poller.AcquireTask(
        executor_module.AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    )
    client = tasks._client(acquired.token)
    lost = threading.Event()
    assert _beat(client, lost) is True and not lost.is_set()  # a live task
    client.PushTaskOutput(PushTaskOutputRequest(sub_status=SubStatus.FAILED, details="x"))
    assert _beat(client, lost) is True and lost.is_set()  # revoked: lost, no retry storm
    client.close()


def test_an_unreachable_node_is_waited_for(
    site: FakeSite, caplog: pytest.LogCaptureFixture
) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))  # bound, never listening: refused
    try:
        address = f"127.0.0.1:{probe.getsockname()[1]}"
        site.root.mkdir(parents=True)
        tasks = TaskExecutor(site, address)
        assert tasks.step() is False and tasks.step() is False
        tasks.close()
    finally:
        probe.close()
    assert caplog.text.count("does not answer") == 1  # said once, not at every try


def test_another_flower_is_refused_in_one_line() -> None:
    check_flower()  # this one
    with pytest.raises(
        LauncherError, match=r"written against flwr==1\.39\.0, found flwr==1\.40\.0.*--no-worker"
    ):
        check_flower("1.40.0")


def test_a_bad_answer_from_the_node_does_not_end_the_worker(
    node: FlowerNode, site: FakeSite, caplog: pytest.LogCaptureFixture
) -> None:
    tasks = executor(site, node)
    calls: list[int] = []

    def step() -> bool:
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("Invalid protobuf response payload")
        return False

    tasks.step = step  # type: ignore[method-assign]
    tasks.serve(stop=lambda: len(calls) >= 3)
    assert len(calls) == 3 and "taking a task failed" in caplog.text
