"""A TCP port for a launcher's rendezvous (`fabric run --main-port`, MASTER_PORT) that no
other process on the machine can take while it is in use.

Binding port 0, closing the socket and handing the number on is a race: another process may
bind the number in between (two test suites on one machine did). Instead the socket stays
bound, with SO_REUSEADDR and never listening, for as long as the launched run needs the port:
the kernel gives that number to no other bind(0) and refuses plain binds of it, while the
run's TCPStore, which binds with SO_REUSEADDR and then listens, still gets it.
"""
from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator


@contextlib.contextmanager
def reserved_port(host: str = "127.0.0.1") -> Iterator[int]:
    """A port number kept from every other process until the block ends."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        yield sock.getsockname()[1]
    finally:
        sock.close()
