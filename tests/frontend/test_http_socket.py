"""The frontend's accepted HTTP connections send small writes at once (TCP_NODELAY).

Without it, the first SSE chunk after the response headers waited for the client's
delayed ACK (~40 ms per request on a keep-alive connection). The option is read from the
server's own socket: the frontend runs in this process (on a real nats-server), and the
accepted socket is found among this process's descriptors by its peer address.
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from actors.frontend.server import FrontendServer
from supervisor.config import loads
from tests.node.harness import NatsServer, free_ports


@pytest.fixture
def frontend(tmp_path: Path) -> Iterator[FrontendServer]:
    nats_server = NatsServer(tmp_path)
    config = loads(
        "[node]\ntree = 'frontend'\n"
        f"[nats]\nembedded = false\nurl = ['{nats_server.url}']\n"
        f"[frontend]\nenabled = true\nport = {free_ports()}\n"
        "[system]\nenabled = false\n"
    )
    failures: list[str] = []
    server = FrontendServer(config, structlog.get_logger(), failures.append)
    try:
        server.start(timeout=30)
        yield server
        assert failures == []
    finally:
        server.stop(10)
        nats_server.stop()


def sockets_of_this_process() -> Iterator[socket.socket]:
    """A duplicate of each socket this process holds (the caller closes them)."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            yield socket.socket(fileno=os.dup(fd))
        except OSError:  # closed meanwhile, or not an inet socket
            continue


def accepted_socket_nodelay(client_address: tuple[str, int]) -> int:
    """TCP_NODELAY of the server-side socket whose peer is `client_address`."""
    found: list[int] = []
    for sock in sockets_of_this_process():
        with sock:
            try:
                peer = sock.getpeername()
            except OSError:
                continue
            if sock.family == socket.AF_INET and peer == client_address:
                found.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
    assert len(found) == 1, f"accepted sockets for {client_address}: {found}"
    return found[0]


def test_accepted_http_connections_have_tcp_nodelay(frontend: FrontendServer) -> None:
    with socket.create_connection(("127.0.0.1", frontend.port), timeout=10) as client:
        client.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert client.recv(65536).startswith(b"HTTP/1.1 ")  # accepted and served
        assert accepted_socket_nodelay(client.getsockname()) != 0
