"""Test helper: run the server in a background thread on 127.0.0.1 (the tests and the serving benchmark start and stop it)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

from cbam_deploy.serve.app import bind_socket, make_server, socket_address


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(app, host: str = "127.0.0.1", port: int | None = None, timeout: float = 30.0) -> Iterator[str]:
    """Start uvicorn with ``app`` (from create_app) in a thread; yield 'host:port'; stop it on exit.
    Without a port it binds a free one itself (no race with another process picking the same)."""
    sock = bind_socket(host, port or 0)
    server = make_server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="cbam-deploy-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    try:
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {socket_address(sock)}")
            time.sleep(0.02)
        yield socket_address(sock)
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
    if thread.is_alive():  # not raised while the block's own error (if any) propagates
        raise RuntimeError(f"the server did not stop within {timeout:g} s of being asked to")
