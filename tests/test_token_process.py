"""The token in its own process: what crosses the socket, and what the service does when that process ends.

The module-crash stories (an ``abort()`` inside ``C_Sign`` or ``C_Login``) are in
test_token_faults.py, with the fault module. Here: the messages themselves, a token
process killed from outside, and a service that leaves no token process behind.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import pickle
import signal
import socket
import struct
import time
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from tests.conftest import Service
from tokenbridge.token import model, wire
from tokenbridge.token.model import KeyInfo, TokenState, TokenStatus
from tokenbridge.token.owner import TokenSelector
from tokenbridge.token.process import TokenProcess, _Pending
from tokenbridge.tools.demo import DemoInfo

SIGN_URL = "/v1/keys/auth-ec/sign"


# ---------------------------------------------------------------------- the messages


def test_messages_cut_anywhere_come_out_whole_and_in_order() -> None:
    messages = [("sign", 1, 12.5, "client:a", "k" * 16, "ecdsa", "sha256", b"\x00" * 32),
                ("cancel", 1), ("done", 7, b"signature", None, True, 0.001, 0.0004), ("stop",)]
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
        return (os.system, ("touch /tmp/tokenbridge-pwned",))


def framed(body: bytes) -> bytearray:
    return bytearray(struct.pack(">I", len(body)) + body)


def test_a_message_cannot_make_the_service_run_code() -> None:
    # The token process runs vendor code; a corrupted process must not be able to reach the service's.
    with pytest.raises(wire.ProtocolError, match="unreadable"):
        wire.unframe(framed(pickle.dumps(("done", 1, _RunsCode(), None, True, 0.0, 0.0))))
    assert not Path("/tmp/tokenbridge-pwned").exists()
    # MessagePack's extension types are how a decoder could be asked to build objects: refused.
    with pytest.raises(wire.ProtocolError, match="extension type 7"):
        wire.unframe(framed(msgpack.packb(("done", 1, msgpack.ExtType(7, b"x"), None, True, 0.0, 0.0))))


@pytest.mark.parametrize(("message", "error"), [
    (("sing", 1), "unknown message kind 'sing'"),
    (("cancel",), "'cancel' has 0 fields, expected 1"),
    (("cancel", 1, 2), "'cancel' has 2 fields, expected 1"),
    (("cancel", "1"), "'cancel': field 'id' is string, expected int"),
    (("done", 1, b"sig", None, 1, 0.0, 0.0), "field 'ran' is int, expected bool"),
    (("login", 1, 2.0, None, None, 1, False), "field 'accept_new_token' is int, expected bool"),
    (("sign", 1, 2.0, "c", "k", "ecdsa", "sha256", "not bytes"), "field 'digest' is string, expected binary"),
    ({"kind": "stop"}, "must be an array"),
    ((), "must be an array"),
])
def test_unknown_kinds_fields_and_types_are_refused_with_what_is_wrong(message: Any, error: str) -> None:
    with pytest.raises(wire.ProtocolError) as refused:
        wire.unframe(framed(msgpack.packb(message)))
    assert error in str(refused.value)


def test_states_cross_by_value() -> None:
    sent = TokenStatus(state=TokenState.LOCKED, module="/m.so", label="ORG", serial="42", slot=3, logged_in=False,
                       pin=model.PinFlags(final_try=True, locked=True), mechanisms=frozenset({"ECDSA", "RSA_PKCS"}),
                       message="locked")
    (message,) = wire.unframe(bytearray(wire.frame(("status", wire.encode_status(sent),
                                                     wire.encode_identity(("42", frozenset({"ab", "cd"}))),
                                                     1, 2, None))))
    assert wire.decode_status(message[1]) == sent
    assert wire.decode_identity(message[2]) == ("42", frozenset({"ab", "cd"}))
    bad = list(wire.encode_status(sent))
    bad[0] = "exploded"
    with pytest.raises(wire.ProtocolError, match="unknown token state 'exploded'"):
        wire.decode_status(tuple(bad))


def test_a_token_process_of_another_version_refuses_to_serve() -> None:
    config = {"module_path": "/m.so", "selector": {}, "pin": None, "pin_number": None, "seen": -1,
              "login_failed": None, "identity": None, "presence_interval": 1.0, "environment": {},
              "log_level": "INFO"}
    (message,) = wire.unframe(bytearray(wire.frame(wire.encode_config(config))))
    assert wire.decode_config(message) == config
    with pytest.raises(wire.ProtocolError, match="version 99"):
        wire.decode_config(("config", 99, message[2]))
    with pytest.raises(wire.ProtocolError, match="pin_count"):
        wire.decode_config(("config", wire.VERSION, {**message[2], "pin_count": 1}))


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
    with pytest.raises(wire.ProtocolError, match="unknown error 'SystemExit'"):
        wire.decode_error(("SystemExit", "x"))


# ---------------------------------------------------------------------- the service's bookkeeping


def bookkeeping(pin: str | None = "1234") -> TokenProcess:
    """A TokenProcess fed messages by hand, no process started: what it would pass to the next one."""
    return TokenProcess("/nonexistent/module.so", TokenSelector(), pin)


def status(state: TokenState = TokenState.READY) -> TokenStatus:
    return TokenStatus(state=state, module="/nonexistent/module.so")


def reported(state: TokenState = TokenState.READY) -> tuple[Any, ...]:
    """A status as the token process sends it."""
    return wire.encode_status(status(state))


def dies(tp: TokenProcess) -> None:
    ours, theirs = socket.socketpair()
    theirs.close()
    tp._stopping = True  # no restart: only what the next process would be given is checked
    tp._sock = ours
    tp._gone(ours)


def test_a_pin_is_passed_on_only_while_it_has_not_failed() -> None:
    tp = bookkeeping()
    assert tp._config()["pin"] == "1234"
    # C_Login refused it: the process says so (held: none) before anything else, then dies.
    tp._handle(("attempt",))
    tp._handle(("status", reported(TokenState.NEEDS_PIN), None, None, 0, "the last PIN failed"))
    tp._handle(("event", "login", {"outcome": "pin_refused"}))
    dies(tp)
    assert tp._config()["pin"] is None and tp._config()["login_failed"] == "the last PIN failed"
    # Only a status ends an attempt: an event alone (the process died before its status) does not.
    tp = bookkeeping()
    tp._handle(("attempt",))
    tp._handle(("event", "login", {"outcome": "ok"}))
    dies(tp)
    assert tp._config()["pin"] is None


def test_a_pin_whose_login_never_came_back_is_not_passed_on() -> None:
    tp = bookkeeping()
    tp._handle(("status", reported(TokenState.STARTING), None, 0, 0, None))
    tp._handle(("attempt",))
    dies(tp)  # inside C_Login
    config = tp._config()
    assert config["pin"] is None and "died during a login" in config["login_failed"]


def test_a_pin_that_worked_is_passed_on_after_a_crash() -> None:
    tp = bookkeeping()
    tp._handle(("attempt",))
    tp._handle(("status", reported(TokenState.STARTING), None, 0, 0, None))  # C_Login returned, PIN kept
    dies(tp)  # e.g. during key discovery
    assert tp._config()["pin"] == "1234" and tp._config()["login_failed"] is None


def test_an_operators_pin_is_kept_until_the_process_takes_it_up() -> None:
    tp = bookkeeping(pin=None)
    tp._pins[1] = "5678"  # what login() records before sending its job
    tp._handle(("status", reported(TokenState.NEEDS_PIN), None, None, 0, None))  # an answer before the login ran
    assert tp._pins == {1: "5678"}
    tp._handle(("attempt",))
    tp._handle(("status", reported(), None, 1, 1, None))
    dies(tp)
    assert tp._config()["pin"] == "5678" and tp._config()["pin_number"] == 1


def test_a_bad_answer_ends_the_process_and_still_answers_its_caller() -> None:
    tp = bookkeeping()
    ours, theirs = socket.socketpair()
    tp._sock = ours
    future: concurrent.futures.Future[Any] = concurrent.futures.Future()
    tp._pending[7] = _Pending(future, None, "client:a", "sign")
    theirs.sendall(wire.frame(("done", 7, b"x", ("only one field",), True, 0.0, 0.0)))
    tp._on_readable(ours)  # refused (and the process, had there been one, killed) ...
    assert not future.done() and 7 in tp._pending
    theirs.close()
    tp._stopping = True
    tp._on_readable(ours)  # ... whose end then answers every job it held
    with pytest.raises(model.TokenUnavailable):
        future.result(0)


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
    client = svc.http(svc.add_client("counter", "sign"))
    verify(client, sign(client, b"x"), b"x")  # and the connection kept alive
    svc.stop()
    output = svc.output()
    assert "Application shutdown complete" in output  # SIGTERM: a graceful stop
    assert "ERROR" not in output and "graceful shutdown exceeded" not in output, output
    for line in ("Started server process", "Shutting down", "Finished server process"):
        assert output.count(line) == 1, output  # the admin socket's server does not print them again
    assert not _is_token_process(child), "the token process outlived the service"
    assert "ended unexpectedly" not in svc.output()  # told to stop, not found dead
