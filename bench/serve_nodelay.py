"""``tokenbridge serve`` with TCP_NODELAY set on its listening socket (accepted sockets inherit it).

tokenbridge/server.py binds with ``socket.create_server``, whose sockets have ``proto == 0``; asyncio
only turns Nagle off for sockets whose ``proto`` is IPPROTO_TCP, so every response written in two
pieces (headers, then body) waits for the client's delayed ACK: ~40 ms per request on Linux. This
wrapper measures the service as it would be with that fixed (docs/performance.md), without editing it.
"""

from __future__ import annotations

import socket
import sys

_create_server = socket.create_server


def create_server(*args, **kwargs):  # type: ignore[no-untyped-def]
    sock = _create_server(*args, **kwargs)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


socket.create_server = create_server

if __name__ == "__main__":
    from tokenbridge.cli import main

    sys.argv = ["tokenbridge", *sys.argv[1:]]
    main()
