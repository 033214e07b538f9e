"""Free TCP ports on loopback, so parallel local federations (and tests) never collide.

Flower's defaults (9092 Fleet, 8000 Control/Runtime, 9094 per SuperNode) are fixed numbers:
two runs on one machine would fight over them. The OS hands out an unused ephemeral port
when we bind port 0; we hold every socket until all ports of one federation are chosen, so
the ports of one call are distinct. Between closing the sockets and the daemons binding
them another process could take one; the runner detects "address in use" and retries.
"""

from __future__ import annotations

import contextlib
import socket

LOOPBACK = "127.0.0.1"


def pick_free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """Return ``count`` distinct TCP ports that are free on ``host`` right now."""
    if count < 1:
        raise ValueError("count must be at least 1")
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(sock.getsockname()[1])
        return ports


def is_port_free(port: int, host: str = LOOPBACK) -> bool:
    """Whether a server can listen on ``port`` on ``host`` (IPv4 or IPv6) at this moment.

    With ``SO_REUSEADDR``, as Flower's servers (gRPC, uvicorn) bind: a port whose last
    connections linger in ``TIME_WAIT`` (the site worker's to a node that just stopped) is
    free for them; one that something listens on is not.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True
