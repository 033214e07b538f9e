"""One message answered by a run's own ClientApp, from its FAB, in a child of the site worker.

The worker answers a run itself only when the run's code (in its FAB) is the worker's own
(:func:`fedclinic.worker.protocol.code_identity_of_fab`). A run with other code (a coordinator
on another fedclinic version) is answered the way ``flwr-clientapp`` answers it: the FAB
installed under ``$FLWR_HOME/apps`` (Flower's ``install_from_fab``), its ClientApp loaded by
Flower's own loader, called once. The worker cannot hand the task to ``flwr-clientapp``
itself: it has already taken the message from the node (a task's input is pulled once), so
it starts this script instead and passes the FAB, the context and the message on stdin.

Run by path (``python -P .../fab_app.py``), not as ``-m fedclinic.worker.fab_app``: nothing
of the site's ``fedclinic`` may be imported before the FAB's, or the run's code would reuse
the site's modules. It imports only the standard library and Flower. With
``FEDCLINIC_WORKER=off`` in its environment the FAB's forwarder answers in this process.

Frames (stdin, then stdout): an 8-byte big-endian length and a serialised protobuf each. In:
``Fab``, ``Run``, ``Context``, ``Message``; out: the reply ``Message`` and the ``Context`` after the
call. Anything the app prints goes to stderr (the worker's log).
"""

from __future__ import annotations

import os
import struct
import sys
from typing import BinaryIO

from flwr.app import Error, Message
from flwr.cli.install import install_from_fab
from flwr.clientapp.client_app import LoadClientAppError
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.constant import ErrorCode
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    fab_from_proto,
    message_from_proto,
    message_to_proto,
    run_from_proto,
)
from flwr.proto.fab_pb2 import Fab as ProtoFab
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.proto.run_pb2 import Run as ProtoRun

LENGTH = struct.Struct(">Q")


def read_frame(stream: BinaryIO) -> bytes:
    header = stream.read(LENGTH.size)
    if len(header) != LENGTH.size:
        raise EOFError("the site worker closed the input early")
    (size,) = LENGTH.unpack(header)
    data = stream.read(size)
    if len(data) != size:
        raise EOFError("the site worker closed the input early")
    return data


def write_frame(stream: BinaryIO, data: bytes) -> None:
    stream.write(LENGTH.pack(len(data)))
    stream.write(data)


def main() -> int:
    out = os.fdopen(os.dup(1), "wb")  # the frames; the app's own prints go to stderr
    os.dup2(2, 1)
    protos = ProtoFab(), ProtoRun(), ProtoContext(), ProtoMessage()
    for proto in protos:
        proto.ParseFromString(read_frame(sys.stdin.buffer))
    fab_proto, run_proto, context_proto, message_proto = protos
    fab, run = fab_from_proto(fab_proto), run_from_proto(run_proto)
    context = context_from_proto(context_proto)
    message = message_from_proto(message_proto)
    message.metadata.__dict__["_message_id"] = message_proto.metadata.message_id
    try:  # as flwr/supernode/runtime/run_clientapp.py does it
        install_from_fab(fab.content, skip_prompt=True)
        load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
        client_app = load(run.fab_id, run.fab_version, fab.hash_str)
        reply = client_app(message=message, context=context)
    except Exception as err:
        code = (
            ErrorCode.LOAD_CLIENT_APP_EXCEPTION
            if isinstance(err, LoadClientAppError)
            else ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        )
        print(f"the run's own ClientApp failed: {err!r}", file=sys.stderr, flush=True)
        reply = Message(Error(code=code, reason=str(type(err)) + ":<'" + str(err) + "'>"),
                        reply_to=message)  # fmt: skip
    write_frame(out, message_to_proto(reply).SerializeToString())
    write_frame(out, context_to_proto(context).SerializeToString())
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
