"""A web page open on a counter cannot make the card sign through the service on 127.0.0.1.

Any page in a browser can send requests to a loopback port; with DNS rebinding it can also read the
answers. The service answers only requests addressed to its own loopback name and port, refuses a foreign
``Origin``, and refuses the bodies a page can send without a CORS preflight (text, forms) — even when the
request carries a valid secret (a page could have found one in local storage). The relay and the TLS
proxy's listener have their own tests in test_lan.py and test_tls_proxy.py.
"""

from __future__ import annotations

import base64
import itertools
import json

import httpx
import pytest

from tests.conftest import Service

SIGN = {"algorithm": "ecdsa-sha256", "data": base64.b64encode(b"demande 2026-000123").decode()}


def audit_count(service: Service) -> int:
    return len(service.cli("audit", "tail", "-n", "1000000", "--json").stdout.splitlines())


def refused(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json" and r.json()["code"] == code, r.text


_names = itertools.count()


@pytest.fixture
def counter(service: Service) -> httpx.Client:
    """Software on the counter with a secret that may sign keys and CMS."""
    return service.http(service.add_client(f"page-target-{next(_names)}", "sign,cms-sign"))


def test_a_page_from_another_site_is_refused_even_with_a_valid_secret(service: Service,
                                                                       counter: httpx.Client) -> None:
    before = audit_count(service)
    page = {"Origin": "https://evil.example"}
    refused(counter.post("/v1/keys/auth-ec/sign", json=SIGN, headers=page), 403, "origin_refused")
    refused(counter.post("/v1/cms/sign", content=b"x", headers=page), 403, "origin_refused")
    refused(counter.get("/v1/keys", headers={"Origin": "null"}), 403, "origin_refused")  # a sandboxed frame
    assert audit_count(service) == before  # nothing ran: no card operation, no refusal worth an entry
    # The service's own pages (the admin page, /docs) are same-origin: accepted.
    own = {"Origin": f"http://127.0.0.1:{service.port}"}
    assert counter.post("/v1/keys/auth-ec/sign", json=SIGN, headers=own).status_code == 200


def test_dns_rebinding_cannot_read_answers(service: Service, counter: httpx.Client) -> None:
    # A page whose own name now resolves to 127.0.0.1 sends its own name as Host.
    for host in ("evil.example", f"evil.example:{service.port}", "127.0.0.1:1", f"127.0.0.2:{service.port}"):
        refused(counter.get("/v1/health", headers={"Host": host}), 403, "host_refused")
        refused(counter.post("/v1/keys/auth-ec/sign", json=SIGN, headers={"Host": host}), 403, "host_refused")
    for host in (f"127.0.0.1:{service.port}", f"localhost:{service.port}", f"LOCALHOST:{service.port}"):
        assert counter.get("/v1/health", headers={"Host": host}).status_code == 200, host


@pytest.mark.parametrize("media", ["text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                                   "multipart/form-data; boundary=x"])
def test_bodies_a_page_can_send_without_asking_are_refused(service: Service, counter: httpx.Client,
                                                           media: str) -> None:
    before = audit_count(service)
    refused(counter.post("/v1/cms/sign", content=b"demande", headers={"Content-Type": media}), 415,
            "unsupported_media_type")
    refused(counter.post("/v1/keys/auth-ec/sign", content=json.dumps(SIGN), headers={"Content-Type": media}), 415,
            "unsupported_media_type")
    assert audit_count(service) == before
    # The documented media types work.
    assert counter.post("/v1/cms/sign", content=b"demande",
                        headers={"Content-Type": "application/octet-stream"}).status_code == 200
    assert counter.post("/v1/keys/auth-ec/sign", json=SIGN).status_code == 200
