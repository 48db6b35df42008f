"""What a TLS peer really sent: a recording TCP relay and a reader for the plaintext TLS 1.2 handshake.

Tests use it to learn what was negotiated from the bytes on the wire instead of from a tool's
human-readable report (whose spelling changes between OpenSSL versions).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass, field

HANDSHAKE, CHANGE_CIPHER_SPEC = 22, 20
CERTIFICATE_REQUEST, CERTIFICATE_VERIFY = 13, 15

# SignatureScheme code points (RFC 8446, 4.2.3); in TLS 1.2 the high byte is the hash, the low one the signature.
RSA_PKCS1 = {0x0401: "rsa_pkcs1_sha256", 0x0501: "rsa_pkcs1_sha384", 0x0601: "rsa_pkcs1_sha512"}
RSA_PSS = {0x0804: "rsa_pss_rsae_sha256", 0x0805: "rsa_pss_rsae_sha384", 0x0806: "rsa_pss_rsae_sha512",
           0x0809: "rsa_pss_pss_sha256", 0x080A: "rsa_pss_pss_sha384", 0x080B: "rsa_pss_pss_sha512"}


@dataclass
class Conversation:
    """The bytes of one relayed connection, each direction as sent."""

    client: bytearray = field(default_factory=bytearray)  # client -> server
    server: bytearray = field(default_factory=bytearray)  # server -> client


class Relay:
    """Listens on loopback and forwards each connection to ``127.0.0.1:target``, recording both directions."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.conversations: list[Conversation] = []
        self._threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            conversation = Conversation()
            self.conversations.append(conversation)
            pumps = [threading.Thread(target=self._pump, args=(downstream, upstream, conversation.client),
                                      daemon=True),
                     threading.Thread(target=self._pump, args=(upstream, downstream, conversation.server),
                                      daemon=True)]
            for pump in pumps:
                pump.start()
            self._threads += pumps
            threading.Thread(target=self._close_after, args=(pumps, downstream, upstream), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, record: bytearray) -> None:
        with contextlib.suppress(OSError):  # a reset ends the direction like an orderly close
            while chunk := source.recv(65536):
                record += chunk
                sink.sendall(chunk)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    @staticmethod
    def _close_after(pumps: list[threading.Thread], *sockets: socket.socket) -> None:
        for pump in pumps:
            pump.join()
        for s in sockets:
            s.close()

    def wait(self, timeout: float = 10) -> None:
        """Waits until every relayed connection has ended in both directions."""
        for thread in self._threads:
            thread.join(timeout)
            assert not thread.is_alive(), "a relayed connection did not end"

    def close(self) -> None:
        self.listener.close()


def plaintext_handshake(stream: bytes) -> list[tuple[int, bytes]]:
    """The handshake messages ``(type, body)`` one side sent before its ChangeCipherSpec (TLS 1.2).

    After ChangeCipherSpec the records are encrypted, so reading stops there."""
    data = bytearray()
    offset = 0
    while offset + 5 <= len(stream):
        kind, length = stream[offset], int.from_bytes(stream[offset + 3:offset + 5], "big")
        fragment = stream[offset + 5:offset + 5 + length]
        assert len(fragment) == length, "truncated TLS record"
        offset += 5 + length
        if kind == CHANGE_CIPHER_SPEC:
            break
        if kind == HANDSHAKE:
            data += fragment
    messages = []
    offset = 0
    while offset + 4 <= len(data):
        kind, length = data[offset], int.from_bytes(data[offset + 1:offset + 4], "big")
        body = bytes(data[offset + 4:offset + 4 + length])
        assert len(body) == length, "truncated handshake message"
        messages.append((kind, body))
        offset += 4 + length
    return messages


def only(messages: list[tuple[int, bytes]], kind: int) -> bytes:
    bodies = [body for k, body in messages if k == kind]
    assert len(bodies) == 1, f"expected one handshake message of type {kind}, got {len(bodies)}"
    return bodies[0]


def certificate_verify_scheme(client_stream: bytes) -> int:
    """The SignatureScheme of the client's CertificateVerify (TLS 1.2: its first two bytes)."""
    return int.from_bytes(only(plaintext_handshake(client_stream), CERTIFICATE_VERIFY)[:2], "big")


def certificate_request_schemes(server_stream: bytes) -> list[int]:
    """The signature schemes a TLS 1.2 server's CertificateRequest accepts, in its order."""
    body = only(plaintext_handshake(server_stream), CERTIFICATE_REQUEST)
    types = body[0]
    start = 1 + types
    length = int.from_bytes(body[start:start + 2], "big")
    raw = body[start + 2:start + 2 + length]
    return [int.from_bytes(raw[i:i + 2], "big") for i in range(0, len(raw), 2)]
