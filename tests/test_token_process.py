"""The token in its own process: what crosses the socket, and what the service does when that process ends.

The module-crash stories (an ``abort()`` inside ``C_Sign`` or ``C_Login``) are in
test_token_faults.py, with the fault module. Here: the messages themselves, a token
process killed from outside, and a service that leaves no token process behind.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import signal
import struct
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from tests.conftest import Service
from tokenbridge.demo import DemoInfo
from tokenbridge.token import model, wire
from tokenbridge.token.model import KeyInfo

SIGN_URL = "/v1/keys/auth-ec/sign"


# ---------------------------------------------------------------------- the messages


def test_messages_cut_anywhere_come_out_whole_and_in_order() -> None:
    messages = [("sign", 1, 12.5, "client:a", "k" * 16, "ecdsa", "sha256", b"\x00" * 32),
                ("cancel", 1), ("done", 7, b"signature", None, 0.001, 0.0004), ("stop",)]
    stream = b"".join(wire.frame(m) for m in messages)
    for cut in range(1, len(stream)):  # every way TCP-like reads may split the stream in two
        inbox = bytearray(stream[:cut])
        got = wire.unframe(inbox)
        inbox += stream[cut:]
        got += wire.unframe(inbox)
        assert got == messages and not inbox


def test_a_broken_stream_is_refused_not_allocated() -> None:
    with pytest.raises(wire.ProtocolError):
        wire.unframe(bytearray(b"\xff\xff\xff\xff" + b"x" * 10))


class _RunsCode:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("true",))


def test_a_message_cannot_make_the_service_run_code() -> None:
    # The token process runs vendor code; a corrupted process must not be able to reach the service's.
    body = pickle.dumps(("done", 1, _RunsCode(), None, True, 0.0, 0.0))
    with pytest.raises(wire.ProtocolError, match="system"):
        wire.unframe(bytearray(struct.pack(">I", len(body)) + body))


def test_keys_and_errors_cross_as_the_same_objects(demo: DemoInfo) -> None:
    cert = x509.load_pem_x509_certificate((demo.pki_dir / "auth-ec.pem").read_bytes())
    public_key = cert.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    key = KeyInfo(id="0123456789abcdef", label="auth-ec", ckaid="01", key_type="ec", size=256,
                  curve="secp256r1", public_key=public_key, certificate=cert, can_decrypt=False)
    (message,) = wire.unframe(bytearray(wire.frame(("keys", [wire.encode_key(key)]))))
    assert wire.decode_key(message[1][0]) == key

    for error in (model.TokenUnavailable("gone"), model.DecryptionFailed("decryption failed"),
                  model.MechanismUnsupported("no PSS"), model.LoginFailed("refused")):
        encoded = wire.encode_error(error)
        assert encoded is not None
        again = wire.decode_error(encoded)
        assert type(again) is type(error) and again.detail == error.detail and again.code == error.code
    # Anything else is an operation failure, and never leaks its text.
    assert wire.decode_error(wire.encode_error(ValueError("secret detail")) or ("", "")).code == \
        "token_operation_failed"
    assert "secret" not in (wire.encode_error(ValueError("secret detail")) or ("", ""))[1]


# ---------------------------------------------------------------------- the process, from outside


def token_process(svc: Service) -> int:
    """The pid of the service's token process (a child of one of its threads)."""
    deadline = time.monotonic() + 5
    while True:
        found = [pid for pid in _children(svc.process.pid) if _is_token_process(pid)]
        if len(found) == 1:
            return found[0]
        assert time.monotonic() < deadline, found
        time.sleep(0.05)


def _children(pid: int) -> list[int]:
    pids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:  # a thread may end while we read
            pids += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
    return pids


def _is_token_process(pid: int) -> bool:
    try:
        return b"tokenbridge.token.child" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False


def sign(client: httpx.Client, data: bytes) -> httpx.Response:
    return client.post(SIGN_URL, json={"algorithm": "ecdsa-sha256", "data": base64.b64encode(data).decode()})


def verify(client: httpx.Client, response: httpx.Response, data: bytes) -> None:
    cert = x509.load_der_x509_certificate(client.get("/v1/keys/auth-ec/certificate",
                                                     params={"format": "der"}).content)
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    key.verify(base64.b64decode(response.json()["signature"]), data, ec.ECDSA(hashes.SHA256()))


def test_a_killed_token_process_is_replaced_and_logs_in_again(fresh_service: Any) -> None:
    svc: Service = fresh_service()
    client = svc.http(svc.add_client("counter", "sign"))
    assert sign(client, b"before").status_code == 200
    first = token_process(svc)

    os.kill(first, signal.SIGKILL)
    statuses = []
    deadline = time.monotonic() + 10
    while True:
        response = sign(client, b"after")
        statuses.append(response.status_code)
        if response.status_code == 200:
            break
        assert response.status_code == 503 and response.json()["code"] == "token_unavailable", response.text
        assert time.monotonic() < deadline, statuses
        time.sleep(0.05)
    verify(client, response, b"after")
    assert token_process(svc) != first and svc.process.poll() is None
    restarts = [json.loads(line) for line in svc.cli("audit", "tail", "-n", "1000", "--json").stdout.splitlines()
                if json.loads(line)["event"] == "token_process"]
    assert len(restarts) == 1 and "SIGKILL" in restarts[0]["detail"], restarts
    logins = [json.loads(line) for line in svc.cli("audit", "tail", "-n", "1000", "--json").stdout.splitlines()
              if json.loads(line)["event"] == "login"]
    assert [e["outcome"] for e in logins] == ["ok", "ok"]  # the PIN that worked, once per process


def test_stopping_the_service_ends_its_token_process(fresh_service: Any) -> None:
    svc: Service = fresh_service()
    child = token_process(svc)
    svc.stop()
    assert "Application shutdown complete" in svc.output()  # SIGTERM: a graceful stop
    assert not _is_token_process(child), "the token process outlived the service"
    assert "ended unexpectedly" not in svc.output()  # told to stop, not found dead
