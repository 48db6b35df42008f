"""Bad input gets a clear problem+json with a stable code, changes nothing, and is never a 5xx."""

from __future__ import annotations

import base64
import json
import socket

import httpx
import pytest
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from tests.conftest import Service
from tokenbridge.api.auth import Caller
from tokenbridge.api.fast_route import FastRoute
from tokenbridge.api.v1 import Operator

GOOD = base64.b64encode(b"ok").decode()


def audit_count(service: Service) -> int:
    return len(service.cli("audit", "tail", "-n", "1000000", "--json").stdout.splitlines())


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("/v1/keys/sign-rsa/sign", b"{not json", 400, "invalid_json"),
        ("/v1/keys/sign-rsa/sign", {"algorithm": "rsa-pkcs1v15-sha256", "data": "%%%"}, 400, "invalid_base64"),
        ("/v1/keys/sign-rsa/sign", {"algorithm": "rsa-md5", "data": GOOD}, 422, "unknown_algorithm"),
        ("/v1/keys/sign-rsa/sign", {"data": GOOD}, 422, "invalid_request"),
        ("/v1/keys/sign-rsa/sign", {"algorithm": "ecdsa-sha256", "data": GOOD}, 422, "algorithm_key_mismatch"),
        ("/v1/keys/auth-ec/sign", {"algorithm": "rsa-pss-sha256", "data": GOOD}, 422, "algorithm_key_mismatch"),
        ("/v1/keys/sign-rsa/sign", {"algorithm": "rsa-pkcs1v15-sha256"}, 422, "invalid_request"),
        ("/v1/keys/sign-rsa/sign", {"algorithm": "rsa-pkcs1v15-sha256", "data": GOOD, "digest": GOOD}, 422,
         "invalid_request"),
        ("/v1/keys/sign-rsa/sign", {"algorithm": "rsa-pkcs1v15-sha256", "digest": GOOD}, 422, "invalid_digest"),
        ("/v1/keys/sign-rsa/sign", {"algorithm": "rsa-pkcs1v15-sha256", "data": GOOD, "pin": "1234"}, 422,
         "invalid_request"),
        ("/v1/keys/sign-rsa/sign", [1, 2], 422, "invalid_request"),
        ("/v1/keys/nope/sign", {"algorithm": "rsa-pkcs1v15-sha256", "data": GOOD}, 404, "key_not_found"),
        ("/v1/keys/encrypt-rsa/decrypt", {"algorithm": "rsa-oaep-md5", "ciphertext": GOOD}, 422,
         "unknown_algorithm"),
        ("/v1/keys/encrypt-rsa/decrypt", {"algorithm": "rsa-oaep-sha256", "ciphertext": GOOD}, 422,
         "decryption_failed"),
        ("/v1/keys/encrypt-rsa/decrypt", {"algorithm": "rsa-oaep-sha256", "ciphertext": "A"}, 400,
         "invalid_base64"),
    ],
)
def test_bad_requests_are_problems(workstation: httpx.Client, service: Service, path: str, body: object,
                                   status: int, code: str) -> None:
    before = audit_count(service)
    if isinstance(body, bytes):
        r = workstation.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = workstation.post(path, json=body)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    problem = r.json()
    assert problem["code"] == code
    assert problem["status"] == status
    assert problem["type"] == f"urn:tokenbridge:problem:{code}"
    assert problem["title"] and problem["detail"]
    # Nothing reached the token, except the decryption attempt, which is audited as failed.
    expected = 1 if code == "decryption_failed" else 0
    assert audit_count(service) == before + expected


def test_key_operations_check_the_caller_before_the_body(workstation: httpx.Client, service: Service) -> None:
    anonymous = service.http()
    r = anonymous.post("/v1/keys/sign-rsa/sign", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 401 and r.json()["code"] == "unauthorized"  # nothing about the body is revealed
    r = workstation.post("/v1/keys/sign-rsa/sign", content=json.dumps({"algorithm": "rsa-pkcs1v15-sha256",
                                                                       "data": GOOD}),
                         headers={"content-type": "text/plain"})  # what a web page can send unasked
    assert r.status_code == 415 and r.json()["code"] == "unsupported_media_type"
    assert "application/json" in r.json()["detail"]
    r = workstation.post("/v1/keys/sign-rsa/sign", content=json.dumps({"algorithm": "rsa-pkcs1v15-sha256",
                                                                       "data": GOOD}),
                         headers={"content-type": "application/xml"})
    assert r.status_code == 422 and r.json()["code"] == "invalid_request"
    assert "application/json" in r.json()["detail"]
    r = workstation.post("/v1/keys/sign-rsa/sign", content=json.dumps({"algorithm": "rsa-pkcs1v15-sha256",
                                                                       "data": GOOD}),
                         headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200, r.text


def test_unknown_routes_and_methods(workstation: httpx.Client) -> None:
    r = workstation.get("/v1/nothing-here")
    assert r.status_code == 404 and r.json()["code"] == "not_found"
    r = workstation.delete("/v1/keys/sign-rsa/sign")
    assert r.status_code == 405 and r.json()["code"] == "method_not_allowed"
    r = workstation.get("/v1/keys/sign-rsa/certificate", params={"format": "p12"})
    assert r.status_code == 422 and r.json()["code"] == "invalid_request"


def test_oversized_body_is_413(fresh_service) -> None:
    svc: Service = fresh_service({"TOKENBRIDGE_SERVER__MAX_BODY_BYTES": "65536"})
    client = svc.http(svc.add_client("big", "sign"))
    data = base64.b64encode(b"x" * 100_000).decode()
    r = client.post("/v1/keys/sign-rsa/sign", json={"algorithm": "rsa-pkcs1v15-sha256", "data": data})
    assert r.status_code == 413 and r.json()["code"] == "payload_too_large"

    def chunks():  # no Content-Length: the limit applies while reading
        body = json.dumps({"algorithm": "rsa-pkcs1v15-sha256", "data": data}).encode()
        for i in range(0, len(body), 8192):
            yield body[i:i + 8192]

    r = client.post("/v1/keys/sign-rsa/sign", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["code"] == "payload_too_large"
    small = base64.b64encode(b"x" * 1000).decode()
    r = client.post("/v1/keys/sign-rsa/sign", json={"algorithm": "rsa-pkcs1v15-sha256", "data": small})
    assert r.status_code == 200


def test_queue_full_is_503_with_retry_after(fresh_service) -> None:
    import asyncio

    from tokenbridge.client import AsyncClient, TokenbridgeError

    svc: Service = fresh_service({"TOKENBRIDGE_TOKEN__QUEUE_SIZE": "1"})
    secret = svc.add_client("flood", "sign")

    async def flood() -> list[object]:
        async with AsyncClient(svc.url, secret, limits=httpx.Limits(max_connections=64)) as c:
            return await asyncio.gather(*(c.sign("sign-rsa", b"x" * 10, "rsa-pkcs1v15-sha256")
                                          for _ in range(64)), return_exceptions=True)

    results = asyncio.run(flood())
    errors = [r for r in results if isinstance(r, Exception)]
    assert errors, "64 concurrent requests on a queue of 1: none was refused"
    assert all(isinstance(e, TokenbridgeError) and e.status == 503 and e.code == "queue_full"
               and e.retry_after is not None and e.retry_after >= 1 for e in errors), errors[:3]
    assert any(isinstance(r, bytes) for r in results)
    assert svc.http().get("/v1/health").json()["status"] == "ok"

    async def flood_fr() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=svc.url, timeout=30, limits=httpx.Limits(max_connections=64),
                                     headers={"Authorization": f"Bearer {secret}", "Accept-Language": "fr"}) as c:
            return await asyncio.gather(*(c.post("/v1/keys/sign-rsa/sign", json={
                "algorithm": "rsa-pkcs1v15-sha256", "data": "eA=="}) for _ in range(64)))

    refused = [r for r in asyncio.run(flood_fr()) if r.status_code == 503]
    assert refused and all(r.json()["code"] == "queue_full" and "très sollicitée" in r.json()["detail"]
                           for r in refused), refused[0].text


def test_non_loopback_address_is_refused(demo) -> None:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "tokenbridge", "serve", "--config", str(demo.config_file),
                        "--host", "0.0.0.0"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "non-loopback" in r.stderr and "TLS" in r.stderr


def test_slowloris_connections_are_closed_and_others_served(fresh_service) -> None:
    import socket
    import time

    svc: Service = fresh_service({"TOKENBRIDGE_SERVER__FIRST_REQUEST_TIMEOUT": "1"})
    client = svc.http(svc.add_client("patient", "sign"))
    slow = []
    for _ in range(50):
        s = socket.create_connection(("127.0.0.1", svc.port))
        s.sendall(b"POST /v1/keys/sign-rsa/sign HTTP/1.1\r\nHost: x\r\n")  # and never finish
        slow.append(s)
    r = client.post("/v1/keys/sign-rsa/sign", json={"algorithm": "rsa-pkcs1v15-sha256", "data": GOOD})
    assert r.status_code == 200  # the others are served meanwhile
    time.sleep(1.5)
    closed = 0
    for s in slow:
        s.settimeout(2)
        try:
            closed += s.recv(1) == b""
        except TimeoutError:
            pass  # still open
        except OSError:
            closed += 1  # reset by the server
        s.close()
    assert closed == 50


def test_slow_second_request_is_closed_too(fresh_service) -> None:
    import socket
    import time

    svc: Service = fresh_service({"TOKENBRIDGE_SERVER__FIRST_REQUEST_TIMEOUT": "1"})
    s = socket.create_connection(("127.0.0.1", svc.port))
    s.sendall(f"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1:{svc.port}\r\n\r\n".encode())
    s.settimeout(5)
    assert b"200 OK" in s.recv(4096)
    s.sendall(b"GET /v1/health HTTP/1.1\r\n")  # a second request that never completes
    time.sleep(2.5)
    closed = False
    try:
        while chunk := s.recv(4096):  # the rest of the first response, then the end of the stream
            assert b"HTTP/1.1" not in chunk
        closed = True
    except TimeoutError:
        closed = False  # still open: the guard did not work
    except OSError:
        closed = True  # reset by the server
    s.close()
    assert closed


class _Body(BaseModel):
    x: int


def test_fast_route_refuses_endpoints_it_cannot_call() -> None:
    """The lean route calls endpoints with (request, body, caller, path parameters) only: anything else is a
    programming error, caught when the route is declared rather than on a request."""
    router = APIRouter(route_class=FastRoute)

    async def fine(request: Request, key: str, body: _Body, caller: Caller) -> None: ...
    async def extra_query(request: Request, key: str, body: _Body, caller: Caller, page: int = 1) -> None: ...
    async def no_body(request: Request, key: str, caller: Caller) -> None: ...
    async def operator_only(request: Request, key: str, body: _Body, caller: Operator) -> None: ...

    router.add_api_route("/k/{key}", fine, methods=["POST"])
    for endpoint in (extra_query, no_body, operator_only):
        with pytest.raises(TypeError, match="FastRoute endpoint"):
            router.add_api_route("/k/{key}", endpoint, methods=["POST"])
    with pytest.raises(TypeError, match="only dependency"):  # it would not run: refused
        router.add_api_route("/k/{key}", fine, methods=["POST"], dependencies=[Depends(lambda: None)])


def test_a_bug_in_a_key_operation_is_a_500_problem_and_the_service_goes_on(tmp_path, monkeypatch) -> None:
    """The key operations skip FastAPI's middleware (api/fast_route.py, ``DirectRoutes``): an error nobody
    handles still gets the 500 problem document and then goes on up to the server (which logs it and closes
    the connection), a refused request gets its own code, and the next request works.
    The real application in process; the token is software keys whose signing is made to fail."""
    import asyncio
    import sqlite3
    import sys
    from pathlib import Path
    from typing import Any

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fuzz"))
    import _common

    app = _common.App()
    headers = [(b"host", b"127.0.0.1:8155"), (b"authorization", b"Bearer " + app.secret.encode()),
               (b"content-type", b"application/json")]
    body = json.dumps({"algorithm": "ecdsa-sha256", "data": GOOD}).encode()

    def call(data: bytes = body, with_headers: bool = True) -> tuple[int, dict[str, Any], BaseException | None]:
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/keys/auth-ec/sign", "raw_path": b"/v1/keys/auth-ec/sign",
                 "query_string": b"", "root_path": "", "headers": headers if with_headers else headers[:1],
                 "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8155)}
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": data, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        async def run() -> BaseException | None:
            try:
                await app.app(scope, receive, send)
            except Exception as exc:
                return exc
            return None

        escaped = asyncio.run(run())
        start, answer = sent[0], b"".join(m.get("body", b"") for m in sent[1:])
        assert dict(start["headers"])[b"content-type"].startswith(b"application/problem+json") or start["status"] == 200
        return start["status"], json.loads(answer), escaped

    assert call()[0] == 200
    for bug in (RuntimeError("a bug"), sqlite3.OperationalError("no such table: x")):  # the second: re-raised
        async def broken(*args: object, _bug: Exception = bug, **kwargs: object) -> bytes:  # by its own handler
            raise _bug

        monkeypatch.setattr(app.owner, "sign", broken)
        status, problem, escaped = call()
        assert status == 500 and problem["code"] == "internal_error"
        assert escaped is bug
        monkeypatch.undo()
    status, problem, escaped = call(b"{")
    assert (status, problem["code"], escaped) == (400, "invalid_json", None)
    status, problem, escaped = call(with_headers=False)
    assert (status, problem["code"], escaped) == (401, "unauthorized", None)
    assert call()[0] == 200


def test_request_heads_are_limited_to_64_kib(service: Service) -> None:
    """httptools keeps a header until it ends: without our count an 8 MB header was buffered and answered."""
    import contextlib
    import socket

    def send(head_padding: int) -> bytes:
        with socket.create_connection(("127.0.0.1", service.port), timeout=30) as s:
            s.sendall(f"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1:{service.port}\r\nX-Pad: ".encode())
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # refused before all was sent
                s.sendall(b"a" * head_padding + b"\r\nConnection: close\r\n\r\n")
            answer = b""
            try:
                while chunk := s.recv(65536):
                    answer += chunk
            except ConnectionResetError:
                pass
            return answer

    assert send(60 * 1024).startswith(b"HTTP/1.1 200")  # a large but allowed head
    refused = send(8 * 1024 * 1024)
    assert refused.startswith(b"HTTP/1.1 431"), refused[:200]
    assert json.loads(refused.partition(b"\r\n\r\n")[2])["code"] == "headers_too_large"
    assert service.http().get("/v1/health").status_code == 200


def test_compose_and_send_check_the_caller_before_the_body(service: Service) -> None:
    """FastAPI reads a JSON body model before any dependency: these routes check the caller first anyway."""
    bad = {"content": b"{bad", "headers": {"content-type": "application/json"}}
    r = service.http().post("/v1/smime/compose", **bad)
    assert r.status_code == 401 and r.json()["code"] == "unauthorized", r.text  # was 400: body read first
    r = service.http().post("/v1/smime/send", **bad)
    assert r.status_code == 401 and r.json()["code"] == "unauthorized", r.text
    signer_only = service.http(service.add_client("signs-keys-only", "sign"))
    r = signer_only.post("/v1/smime/compose", **bad)
    assert r.status_code == 403 and r.json()["code"] == "grant_missing", r.text
    mail = service.http(service.add_client("writes-mail", "cms-sign"))
    r = mail.post("/v1/smime/compose", **bad)
    assert r.status_code == 400 and r.json()["code"] == "invalid_json", r.text  # now the body is read
    r = mail.post("/v1/smime/send", **bad)
    assert r.status_code == 403 and r.json()["code"] == "grant_missing", r.text


def _closed_within(s: socket.socket, seconds: float) -> bool:
    """Whether the server ends the connection within ``seconds`` (reading and dropping what it sends)."""
    import time

    deadline = time.monotonic() + seconds
    s.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            if s.recv(65536) == b"":
                return True
        except TimeoutError:
            continue
        except OSError:
            return True  # reset by the server
    return False


def test_a_body_sent_slowly_is_cut_off(fresh_service) -> None:
    """Headers on time, then a body that trickles: the connection is closed once server.body_timeout has
    passed, for a client that authenticated and one that did not (answered 401 without its body read)."""
    svc: Service = fresh_service({"TOKENBRIDGE_SERVER__FIRST_REQUEST_TIMEOUT": "1",
                                  "TOKENBRIDGE_SERVER__BODY_TIMEOUT": "4"})
    secret = svc.add_client("trickle", "cms-verify")
    head = (f"POST /v1/cms/verify HTTP/1.1\r\nHost: 127.0.0.1:{svc.port}\r\n"
            "Content-Type: application/octet-stream\r\nContent-Length: 100000\r\n")
    authenticated = socket.create_connection(("127.0.0.1", svc.port))
    authenticated.sendall(f"{head}Authorization: Bearer {secret}\r\n\r\n".encode() + b"0" * 100)
    anonymous = socket.create_connection(("127.0.0.1", svc.port))
    anonymous.sendall(f"{head}\r\n".encode() + b"0" * 100)
    anonymous.settimeout(5)
    assert b" 401 " in anonymous.recv(65536).split(b"\r\n", 1)[0]
    assert not _closed_within(authenticated, 1.5)  # still within body_timeout
    assert _closed_within(anonymous, 2)  # first_request_timeout after its answer
    assert _closed_within(authenticated, 5)
    # A body that does arrive in time is served as before, on the same service.
    r = svc.http(secret).post("/v1/cms/verify", content=b"\xff" * 100000,
                              headers={"content-type": "application/octet-stream"})
    assert r.status_code == 400 and r.json()["code"] == "cms_malformed"
