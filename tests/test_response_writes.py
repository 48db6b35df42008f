"""Each response leaves in one write: the workstation is woken once, for the whole answer."""

from __future__ import annotations

import asyncio
import base64
import json
import socket

from tests.conftest import Service
from tokenbridge.api.server import _OneWrite


class _Recorder:
    """The part of a transport the writer uses, recording each system-level write."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


def _writer() -> tuple[_OneWrite, _Recorder, asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    transport = _Recorder()
    return _OneWrite(transport, loop), transport, loop  # type: ignore[arg-type]


def test_head_and_body_are_one_write() -> None:
    writer, transport, loop = _writer()
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    writer.write(b"{}")
    assert transport.writes == []
    writer.flush()  # the response is complete
    assert transport.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
    loop.call_soon(loop.stop)
    loop.run_forever()  # the end-of-iteration flush finds nothing more to send
    assert len(transport.writes) == 1
    assert writer.get_extra_info("peername") == "info:peername"  # the rest is the real transport's
    loop.close()


def test_a_lone_write_leaves_at_the_end_of_the_loop_iteration() -> None:
    writer, transport, loop = _writer()
    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # no response completes after it until the body comes
    loop.call_soon(loop.stop)
    loop.run_forever()
    assert transport.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    loop.close()


def test_large_bodies_are_not_held() -> None:
    writer, transport, loop = _writer()
    writer.write(b"head")
    writer.write(b"x" * 70_000)  # a large body follows at once, not copied into the head
    assert transport.writes == [b"head", b"x" * 70_000]
    writer.write(b"y" * 40_000)
    writer.write(b"z" * 40_000)  # small writes that add up are not held either
    assert transport.writes[-1] == b"y" * 40_000 + b"z" * 40_000
    writer.write(b"tail")
    writer.close()  # what is held goes before the close
    assert transport.writes[-1] == b"tail" and transport.closed
    writer.write(b"late")
    writer.flush()  # nothing is written to a closed connection
    assert transport.writes[-1] == b"tail"
    loop.close()


class _Responses:
    """HTTP/1.1 responses read off one socket, in order (several may come in one read)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._data = b""

    def _more(self) -> None:
        chunk = self._sock.recv(65536)
        if not chunk:
            raise ConnectionError("the service closed the connection")
        self._data += chunk

    def next(self) -> tuple[bytes, bytes]:
        while b"\r\n\r\n" not in self._data:
            self._more()
        head, _, rest = self._data.partition(b"\r\n\r\n")
        if head.startswith(b"HTTP/1.1 100 "):
            self._data = rest
            return head, b""
        fields = dict(line.lower().split(b": ", 1) for line in head.split(b"\r\n")[1:])
        length = int(fields[b"content-length"])
        while len(rest) < length:
            self._more()
            head, _, rest = self._data.partition(b"\r\n\r\n")
        self._data = rest[length:]
        return head, rest[:length]


def test_expect_continue_and_pipelined_requests_are_answered(service: Service) -> None:
    """Held writes still leave: a client waiting for "100 Continue" gets it, and two requests sent
    back to back on one connection get two whole answers, in order."""
    secret = service.add_client("one-write", "sign")
    body = json.dumps({"algorithm": "ecdsa-sha256", "data": base64.b64encode(b"x").decode()}).encode()
    head = (f"POST /v1/keys/auth-ec/sign HTTP/1.1\r\nHost: 127.0.0.1:{service.port}\r\n"
            f"Authorization: Bearer {secret}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n").encode()
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as sock:
        responses = _Responses(sock)
        sock.sendall(head + b"Expect: 100-continue\r\n\r\n")
        status, _ = responses.next()
        assert status.startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(body)
        status, answer = responses.next()
        assert status.startswith(b"HTTP/1.1 200") and json.loads(answer)["algorithm"] == "ecdsa-sha256"

        sock.sendall((head + b"\r\n" + body) * 2)
        for _ in range(2):
            status, answer = responses.next()
            assert status.startswith(b"HTTP/1.1 200") and "signature" in json.loads(answer)
