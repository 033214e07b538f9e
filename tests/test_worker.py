"""The site worker and its forwarder: protocol, socket, data memo, crashes and stale sockets.

The worker runs as a real process (``python -m fedclinic.worker``) on a real Unix socket;
no SuperLink is needed: the forwarder ClientApp is called directly with the message and
context a ``flwr-clientapp`` would get. Same-results runs are in test_worker_results.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.serde import context_to_proto, message_to_proto
from PIL import Image

from fedclinic.bench.grid import task_identity
from fedclinic.config import HospitalConfig, RunConfig
from fedclinic.data import DataRequest, load_hospital_data
from fedclinic.local.configs import write_flat_toml
from fedclinic.models import build_model
from fedclinic.serialization import state_to_record
from fedclinic.worker import forwarder, protocol
from fedclinic.worker.server import DataMemo
from strategies import load_run_config

REPO = Path(__file__).resolve().parents[1]
READY_TIMEOUT = 180.0  # the worker imports torch: seconds on a loaded 2-core machine
#: torch threads of the worker and of the in-process answers compared with it: another
#: thread count sums in another order, and bit equality needs the same one
WORKER_THREADS = 1


# ------------------------------------------------------------------------------ harness


@contextmanager
def running_worker(config: dict[str, Any], folder: Path) -> Iterator[WorkerProcess]:
    """``python -m fedclinic.worker`` for ``config``, ready to serve; stopped afterwards."""
    worker = WorkerProcess.start(config, folder)
    try:
        worker.wait_for("serving ")
        yield worker
    finally:
        worker.stop()


class WorkerProcess:
    """A worker process, its log file, and the lines it wrote."""

    def __init__(self, process: subprocess.Popen[bytes], log: Path, config: dict[str, Any]):
        self.process = process
        self.log = log
        self.config = config

    @classmethod
    def start(cls, config: dict[str, Any], folder: Path) -> WorkerProcess:
        folder.mkdir(parents=True, exist_ok=True)
        path = write_flat_toml(folder / f"{config['hospital']}.toml", config)
        log = folder / f"{config['hospital']}-{time.monotonic_ns()}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "fedclinic.worker", "--config", str(path)],
                cwd=REPO,
                env={**os.environ, "OMP_NUM_THREADS": str(WORKER_THREADS)},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return cls(process, log, config)

    def text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait_for(self, needle: str, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            if self.process.poll() is not None:
                raise AssertionError(f"worker exited {self.process.returncode}:\n{self.text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"worker did not log {needle!r}:\n{self.text()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@pytest.fixture
def worker_threads() -> Iterator[None]:
    """This process computes with the worker's torch thread count while the test runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(WORKER_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def node(folder: Path, name: str = "hospital-a", **extra: Any) -> dict[str, Any]:
    return {
        "hospital": name,
        "data-source": "synthetic",
        "num-samples": 40,
        "device": "cpu",
        "state-dir": str(folder / "state" / name),
        **extra,
    }


FLAT = {"algorithm": "fedavg", "model": "cnn", "local-steps": 2, "batch-size": 16, "seed": 5}


def train_message(flat: dict[str, Any], server_round: int = 1) -> Message:
    run = load_run_config(flat)
    arrays = state_to_record(build_model(run, seed=run.seed).state_dict())
    config = ConfigRecord({"server-round": server_round, "site-key": "worker-test"})
    with task_identity():
        return Message(
            RecordDict({"arrays": arrays, "config": config}),
            dst_node_id=1000,
            message_type=MessageType.TRAIN,
        )


def context_for(config: dict[str, Any], flat: dict[str, Any]) -> Context:
    return Context(run_id=1, node_id=1000, node_config=config, state=RecordDict(), run_config=flat)


def same_arrays(a: Message, b: Message) -> bool:
    ours, theirs = a.content["arrays"], b.content["arrays"]
    return list(ours.keys()) == list(theirs.keys()) and all(
        ours[k].data == theirs[k].data for k in ours
    )


# ------------------------------------------------------------------------------ no torch


PEAK_RSS = (
    "def peak_mb():  # VmHWM: peak resident set of this process image (ru_maxrss survives exec)\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith('VmHWM:'):\n"
    "            return int(line.split()[1]) / 1024\n"
)


def test_forwarder_imports_no_torch_and_stays_small() -> None:
    script = PEAK_RSS + (
        "import json, sys\n"
        "import fedclinic.worker.forwarder\n"
        "heavy = sorted(m for m in ('torch', 'torchvision', 'monai', 'client.app') "
        "if m in sys.modules)\n"
        "print(json.dumps({'heavy': heavy, 'peak_mb': peak_mb()}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["heavy"] == []
    assert found["peak_mb"] < 300


# ------------------------------------------------------------------------------ protocol


def _exchange(send: Any, receive: Any) -> Any:
    """Send on one end of a socket pair (in a thread: large frames fill the buffer)."""
    left, right = socket.socketpair()
    with left, right:
        sender = threading.Thread(target=send, args=(protocol.Channel(left),))
        sender.start()
        received = receive(protocol.Channel(right))
        sender.join(30)
    return received


def test_message_and_context_cross_the_socket_unchanged() -> None:
    rng = np.random.default_rng(0)
    big = rng.normal(size=(700, 1000)).astype(np.float32)  # 2.8 MB: many socket writes
    content = RecordDict(
        {
            "config": ConfigRecord({"server-round": 3, "site-key": "k", "blob": b"\x00\xff"}),
            "arrays": ArrayRecord(
                {"w": Array(big), "b": Array(np.arange(5, dtype=np.int64)), "e": Array(np.zeros(0))}
            ),
            "metrics": MetricRecord({"loss": 0.25, "counts": [1, 2]}),
            "extra": ArrayRecord({"z": Array(np.ones((2, 2), dtype=np.float16))}),
        }
    )
    with task_identity():
        message = Message(content, dst_node_id=7, message_type=MessageType.TRAIN, group_id="4")
    message.metadata.__dict__["_message_id"] = "a" * 64  # as a pulled message has
    received = _exchange(lambda c: c.send_message(message), lambda c: c.recv_message())
    # Flower's own serialisation of the whole message is the reference
    assert message_to_proto(received) == message_to_proto(message)
    assert list(received.content.keys()) == ["config", "arrays", "metrics", "extra"]
    np.testing.assert_array_equal(received.content["arrays"]["w"].numpy(), big)

    failed = Message(Error(code=2, reason="boom"), reply_to=message)
    back = _exchange(lambda c: c.send_message(failed), lambda c: c.recv_message())
    assert back.has_error() and not back.has_content()
    assert (back.error.code, back.error.reason) == (2, "boom")
    assert back.metadata.reply_to_message_id == "a" * 64

    context = Context(
        run_id=9, node_id=3, node_config={"hospital": "h", "num-samples": 50},
        state=RecordDict({"s": MetricRecord({"x": 1.0})}), run_config={"rounds": 2, "lr": 0.1},
    )  # fmt: skip
    got = _exchange(lambda c: c.send_context(context), lambda c: c.recv_context())
    assert context_to_proto(got) == context_to_proto(context)


def test_frames_refuse_garbage_and_report_a_closed_peer() -> None:
    left, right = socket.socketpair()
    with left, right:
        left.sendall(protocol._LENGTH.pack(protocol.MAX_JSON + 1))
        with pytest.raises(protocol.ProtocolError, match="exceeds"):
            protocol.Channel(right).recv_json()
    left, right = socket.socketpair()
    with right:
        left.sendall(protocol._LENGTH.pack(100) + b"x" * 10)
        left.close()
        with pytest.raises(protocol.PeerClosed, match="after 10 of 100 bytes"):
            protocol.Channel(right).recv_frame()


def test_socket_paths_longer_than_the_kernel_limit_still_work(tmp_path: Path) -> None:
    folder = tmp_path / ("d" * 60) / ("e" * 60)
    folder.mkdir(parents=True)
    path = folder / protocol.SOCKET_NAME
    assert len(os.fsencode(path)) > 107
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with server, protocol.socket_address(path) as address:
        server.bind(address)
        server.listen(1)
        assert path.exists()
        with protocol.connect(path, 5.0) as client:
            client.sendall(b"ok")
            peer, _ = server.accept()
            with peer:
                assert peer.recv(2) == b"ok"


def test_state_root_is_the_hospitals_state_dir(tmp_path: Path) -> None:
    assert protocol.state_root({"hospital": "h", "state-dir": str(tmp_path)}) == tmp_path
    default = protocol.state_root({"hospital": "h"})
    assert default == Path.home() / ".fedclinic" / "state" / "h"
    from fedclinic.site import default_state_dir  # the torch side's own rule

    assert default == default_state_dir(HospitalConfig(hospital="h"))


def test_code_identity_covers_what_the_fab_ships_and_sees_every_change(tmp_path: Path) -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    shipped = pyproject["tool"]["flwr"]["app"]["fab-include"]
    for package in protocol.CODE_PACKAGES:
        assert f"{package}/**/*.py" in shipped
    for package in protocol.CODE_PACKAGES:
        (tmp_path / package / "sub").mkdir(parents=True)
        (tmp_path / package / "__init__.py").write_text("")
        (tmp_path / package / "sub" / "__init__.py").write_text("")
        (tmp_path / package / "sub" / "m.py").write_text("x = 1\n")
    before = protocol.code_identity(tmp_path)
    assert protocol.code_identity(tmp_path) == before
    # a .py file outside a regular package is not installed by pip: it does not count
    (tmp_path / "fedclinic" / "app_dir" / "inner").mkdir(parents=True)
    (tmp_path / "fedclinic" / "app_dir" / "inner" / "__init__.py").write_text("")
    (tmp_path / "fedclinic" / "app_dir" / "inner" / "tool.py").write_text("y = 1\n")
    assert protocol.code_identity(tmp_path) == before
    (tmp_path / "strategies" / "sub" / "m.py").write_text("x = 2\n")
    changed = protocol.code_identity(tmp_path)
    assert changed != before
    (tmp_path / "client" / "sub" / "m.py").rename(tmp_path / "client" / "sub" / "n.py")
    assert protocol.code_identity(tmp_path) not in (before, changed)
    assert protocol.code_identity() == protocol.code_identity(REPO)


# ------------------------------------------------------------------------------ data memo


def _image_folder(root: Path, per_class: int = 8) -> Path:
    for label, name in enumerate(("a", "b")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.full((12, 12), 30 + 100 * label + i, dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_data_memo_reloads_exactly_when_the_request_or_a_file_changes(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "images")
    calls: list[DataRequest] = []

    def loader(request: DataRequest) -> Any:
        calls.append(request)
        return load_hospital_data(request)

    memo = DataMemo(loader)
    run = RunConfig(data_source="image-folder", image_size=12)
    hospital = HospitalConfig(hospital="h", data_source="image-folder", data_path=str(root))
    first = memo.load(DataRequest(run, hospital))
    assert memo.load(DataRequest(run, hospital)) is first and memo.last == "reused"
    assert len(calls) == 1
    # another run (any run-config change) loads again
    memo.load(DataRequest(run.model_copy(update={"seed": 7}), hospital))
    assert len(calls) == 2 and memo.last == "loaded"
    # a file rewritten in place (same name, new pixels and time) is noticed
    memo.load(DataRequest(run, hospital))
    assert len(calls) == 3
    image = root / "a" / "0.png"
    Image.fromarray(np.full((12, 12), 250, dtype=np.uint8)).save(image)
    os.utime(image, ns=(time.time_ns(), time.time_ns() + 10**9))
    changed = memo.load(DataRequest(run, hospital))
    assert len(calls) == 4
    brightest = max(float(s.inputs.max()) for s in (changed.train, changed.val, changed.test))
    assert brightest == pytest.approx(250 / 255)
    # a new file is noticed too
    Image.fromarray(np.zeros((12, 12), dtype=np.uint8)).save(root / "b" / "new.png")
    memo.load(DataRequest(run, hospital))
    assert len(calls) == 5
    memo.load(DataRequest(run, hospital))
    assert len(calls) == 5


# ------------------------------------------------------------------------------ real worker


@pytest.fixture(scope="module")
def worker_a(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    folder = tmp_path_factory.mktemp("worker")
    with running_worker(node(folder), folder) as worker:
        yield worker


@pytest.mark.usefixtures("worker_threads")
def test_worker_socket_is_private_and_answers_like_the_handler(worker_a: WorkerProcess) -> None:
    config = worker_a.config
    path = protocol.socket_path(config)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_ISSOCK(path.stat().st_mode)
    message = train_message(FLAT)
    message.metadata.__dict__["_message_id"] = "b" * 64  # as a pulled message has
    sent = message.content
    reply = forwarder.forward(message, context_for(config, FLAT))
    assert "answered train" in worker_a.text()
    assert not reply.has_error() and "error" not in reply.content["info"]
    assert reply.metadata.reply_to_message_id == "b" * 64
    assert not message.content and sent["arrays"]  # the forwarder let go of its copy only
    direct_config = {**config, "state-dir": str(Path(config["state-dir"]).parent / "direct")}
    direct = forwarder.in_process(train_message(FLAT), context_for(direct_config, FLAT))
    assert same_arrays(reply, direct)
    assert dict(reply.content["metrics"]).keys() == dict(direct.content["metrics"]).keys()


def test_a_second_worker_on_the_same_state_dir_refuses(
    worker_a: WorkerProcess, tmp_path: Path
) -> None:
    second = WorkerProcess.start(worker_a.config, tmp_path)
    try:
        assert second.process.wait(READY_TIMEOUT) == 2
    finally:
        second.stop()
    lines = [line for line in second.text().splitlines() if line.strip()]
    assert lines == [
        f"error: hospital hospital-a: a site worker (pid {worker_a.process.pid}) already serves "
        f"{protocol.socket_path(worker_a.config)}; stop it first (one worker per state dir)"
    ]
    assert protocol.socket_path(worker_a.config).exists()  # the live one's socket is kept


def test_a_refused_request_is_answered_in_process(
    worker_a: WorkerProcess, caplog: pytest.LogCaptureFixture
) -> None:
    impostor = {**worker_a.config, "hospital": "hospital-z"}  # same state dir, other name
    with caplog.at_level("INFO", logger="flwr"):
        reply = forwarder.forward(train_message(FLAT), context_for(impostor, FLAT))
    assert not reply.has_error()
    assert "refused a request: message for hospital 'hospital-z'" in worker_a.text()
    assert "answered in process" in caplog.text and "the site worker refused" in caplog.text
    # a forwarder of other code is refused before it sends anything
    with protocol.connect(protocol.socket_path(worker_a.config), 10.0) as sock:
        channel = protocol.Channel(sock)
        hello = {"protocol": protocol.PROTOCOL, "code": "0" * 64, "hospital": "hospital-a",
                 "state-dir": str(protocol.state_root(worker_a.config))}  # fmt: skip
        channel.send_json(hello)
        answer = channel.recv_json()
    assert (
        answer["status"] == "refused"
        and "the run's code (000000000000) differs" in answer["reason"]
    )


def test_a_malformed_request_is_dropped_and_the_worker_serves_on(
    worker_a: WorkerProcess,
) -> None:
    with protocol.connect(protocol.socket_path(worker_a.config), 10.0) as sock:
        channel = protocol.Channel(sock)
        hello = {"protocol": protocol.PROTOCOL, "code": protocol.code_identity(),
                 "hospital": "hospital-a", "state-dir": str(protocol.state_root(worker_a.config)),
                 "pid": 1}  # fmt: skip
        channel.send_json(hello)
        assert channel.recv_json()["status"] == "accepted"
        channel.send_frame(b"\xff\xff not a protobuf context")
        with pytest.raises(protocol.PeerClosed):
            channel.recv_frame()  # the worker hung up
    worker_a.wait_for("dropped a request: Error parsing message", timeout=30)
    reply = forwarder.forward(train_message(FLAT), context_for(worker_a.config, FLAT))
    assert "error" not in reply.content["info"]
    assert worker_a.process.poll() is None


def test_a_bad_worker_config_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "hospital.toml"
    bad.write_text('hospital = "h"\ndevice = "gpu"\n')
    for config, expected in (
        (tmp_path / "missing.toml", f"error: hospital config file '{tmp_path / 'missing.toml'}' "
         "does not exist"),
        (bad, f"error: {bad}: hospital config: key 'device'"),
    ):  # fmt: skip
        out = subprocess.run(
            [sys.executable, "-m", "fedclinic.worker", "--config", str(config)],
            cwd=REPO, capture_output=True, text=True, timeout=READY_TIMEOUT,
        )  # fmt: skip
        assert out.returncode == 2
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(expected), out.stderr


def test_without_a_worker_the_forwarder_answers_in_process(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = node(tmp_path)
    with caplog.at_level("INFO", logger="flwr"):
        reply = forwarder.forward(train_message(FLAT), context_for(config, FLAT))
        monkeypatch.setenv(forwarder.MODE_VARIABLE, "off")
        forwarder.forward(train_message(FLAT), context_for(config, FLAT))
    assert not reply.has_error() and "error" not in reply.content["info"]
    assert "answered in process in" in caplog.text
    assert f"no site worker at {protocol.socket_path(config)}" in caplog.text
    assert "answered in process (FEDCLINIC_WORKER=off)" in caplog.text


def test_kill_mid_request_then_stale_socket_then_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """kill -9 during a message: a clear error reply at once; the socket it leaves is stale
    (messages are answered in process meanwhile) and the next worker removes it."""
    config = node(tmp_path, **{"num-samples": 2000})
    slow = {**FLAT, "local-steps": 0, "local-epochs": 2}
    worker = WorkerProcess.start(config, tmp_path / "one")
    replies: list[tuple[Message, float]] = []
    try:
        worker.wait_for("serving ")

        def ask() -> None:
            message = train_message(slow)
            replies.append((forwarder.forward(message, context_for(config, slow)), 0.0))
            replies[-1] = (replies[-1][0], time.monotonic())

        asking = threading.Thread(target=ask)
        asking.start()
        worker.wait_for("answering train")
        time.sleep(0.5)
        assert worker.process.poll() is None, "the message finished before the kill"
        killed_at = time.monotonic()
        os.kill(worker.process.pid, signal.SIGKILL)
        asking.join(60)
        assert not asking.is_alive(), "the forwarder hangs after the worker died"
    finally:
        worker.stop()
    reply, answered_at = replies[0]
    assert answered_at - killed_at < 10
    info = dict(reply.content["info"])
    assert info["hospital"] == "hospital-a"
    assert info["error"].startswith(
        f"hospital hospital-a: this message failed: the site worker (pid {worker.process.pid}) "
        "stopped before replying"
    )
    path = protocol.socket_path(config)
    assert path.exists()  # SIGKILL left it behind
    with caplog.at_level("INFO", logger="flwr"):
        stale_reply = forwarder.forward(train_message(FLAT), context_for(config, FLAT))
    assert not stale_reply.has_error() and "error" not in stale_reply.content["info"]
    assert f"no site worker listening at {path}" in caplog.text

    with running_worker(config, tmp_path / "two") as again:
        assert f"removed a stale {path}" in again.text()
        reply = forwarder.forward(train_message(FLAT), context_for(config, FLAT))
        assert "answered train" in again.text()
        assert "error" not in reply.content["info"]
    assert not path.exists()  # a stopped worker takes its socket with it
