"""The read-only admin page: its data endpoint over HTTP, then the page itself in headless Chromium.

The browser is Debian's ``chromium`` driven by Playwright's Python package
(never a browser downloaded by ``playwright install``). Set
``TOKENBRIDGE_UI_SCREENSHOT=docs/admin-ui.png`` to refresh the screenshot in
the documentation.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.conftest import Service
from tokenbridge.tools.demo import TOKEN_LABEL

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
KEY_ENCIPHERMENT = "key encipherment (decrypt the national system's replies)"


def _sign(client: httpx.Client, key: str = "sign-rsa", data: bytes = b"bordereau") -> None:
    response = client.post(f"/v1/keys/{key}/sign",
                           json={"algorithm": "rsa-pkcs1v15-sha256", "data": base64.b64encode(data).decode()})
    assert response.status_code == 200, response.text


def _decrypt(client: httpx.Client) -> None:
    """Decrypt a reply encrypted, as the national system would, to the encryption certificate."""
    pem = client.get("/v1/keys/encrypt-rsa/certificate")
    assert pem.status_code == 200, pem.text
    public_key = x509.load_pem_x509_certificate(pem.content).public_key()
    assert isinstance(public_key, rsa.RSAPublicKey)
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    ciphertext = public_key.encrypt(b"accuse de reception", oaep)
    response = client.post("/v1/keys/encrypt-rsa/decrypt",
                           json={"algorithm": "rsa-oaep-sha256", "ciphertext": base64.b64encode(ciphertext).decode()})
    assert response.status_code == 200, response.text


@pytest.fixture
def ui_service(fresh_service: Callable[..., Service]) -> Service:
    """A service of its own, so that the page shows only this story's clients and entries."""
    return fresh_service()


# ---------------------------------------------------------------------------------------------- the API


def test_overview_needs_an_admin_secret(ui_service: Service) -> None:
    signer = ui_service.add_client("accueil-1", "sign")
    with ui_service.http() as anonymous:
        response = anonymous.get("/v1/admin/overview")
        assert response.status_code == 401
        assert response.json()["code"] == "unauthorized"
    with ui_service.http(signer) as client:
        response = client.get("/v1/admin/overview")
        assert response.status_code == 403
        assert response.json()["code"] == "grant_missing"


def test_overview_content(ui_service: Service) -> None:
    admin = ui_service.add_client("ui-admin", "admin")
    signer = ui_service.add_client("accueil-1", "sign")
    ui_service.add_client("ancien-poste", "sign")
    ui_service.cli("clients", "revoke", "ancien-poste")
    with ui_service.http(signer) as client:
        _sign(client)
        _sign(client, data=b"second")
    with ui_service.http(admin) as client:
        response = client.get("/v1/admin/overview")
    assert response.status_code == 200, response.text
    view: dict[str, Any] = response.json()

    token = view["token"]
    assert token["label"] == TOKEN_LABEL
    assert token["state"] == "ready" and token["present"] and token["logged_in"]
    assert token["state_text"].startswith("Ready")
    assert set(token["pin"]) == {"count_low", "final_try", "locked", "to_be_changed"}

    certs = {c["label"]: c for c in view["certificates"]}
    assert set(certs) == {"sign-rsa", "encrypt-rsa", "auth-ec"}
    assert certs["sign-rsa"]["usages"] == ["signature", "non-repudiation"]
    assert certs["encrypt-rsa"]["usages"] == [KEY_ENCIPHERMENT]
    assert "TLS client authentication" in certs["auth-ec"]["extended_usages"]
    for cert in certs.values():
        assert cert["days_left"] > 30 and cert["warning"] is False and cert["expired"] is False
        assert cert["not_after"] and cert["subject"].startswith("CN=")

    clients = {c["name"]: c for c in view["clients"]}
    assert clients["accueil-1"]["operations_today"] == 2
    assert clients["accueil-1"]["grants"] == ["sign"]
    assert clients["accueil-1"]["last_seen"] is not None
    assert clients["ui-admin"]["operations_today"] == 0  # reading the overview is not an operation
    assert clients["ancien-poste"]["revoked"] is not None
    assert all("client_id" not in c and "secret_hash" not in c for c in view["clients"])

    queue = view["queue"]
    assert queue["depth"] == 0 and queue["by_client"] == [] and queue["service_time_ms"] > 0

    audit = view["audit"]
    assert 0 < len(audit) <= 20
    assert [e["seq"] for e in audit] == sorted((e["seq"] for e in audit), reverse=True)  # newest first
    latest = audit[0]
    assert latest["actor"] == "client:accueil-1" and latest["event"] == "sign" and latest["outcome"] == "ok"
    assert latest["key_label"] == "sign-rsa"

    # Counting is incremental: a later operation is added to the same day's counts.
    with ui_service.http(signer) as client:
        _sign(client, data=b"third")
    with ui_service.http(admin) as client:
        again = {c["name"]: c for c in client.get("/v1/admin/overview").json()["clients"]}
    assert again["accueil-1"]["operations_today"] == 3


def test_static_page_is_served_with_a_strict_policy(service: Service) -> None:
    with service.http() as client:
        for path in ("/ui", "/ui/"):
            page = client.get(path)
            assert page.status_code == 200
            assert page.headers["content-type"].startswith("text/html")
            assert "default-src 'none'" in page.headers["content-security-policy"]
            assert "<h1>" in page.text and "/ui/app.js" in page.text
            assert "http://" not in page.text and "https://" not in page.text  # no CDN
        assert client.get("/ui/app.js").headers["content-type"].startswith("text/javascript")
        assert client.get("/ui/style.css").headers["content-type"].startswith("text/css")
        for missing in ("/ui/nope.js", "/ui/..%2Fapi%2Fadmin.py", "/ui/__init__.py"):
            assert client.get(missing).status_code == 404, missing


def test_certificate_expiry_warning_and_usage_words() -> None:
    from datetime import UTC, datetime, timedelta

    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from tokenbridge.api.admin import certificate_overview
    from tokenbridge.token.model import KeyInfo

    now = datetime.now(UTC)
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Bientot expire")])
    usage = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                          encipher_only=False, decipher_only=False)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(private.public_key())
            .serial_number(1).not_valid_before(now - timedelta(days=700)).not_valid_after(now + timedelta(days=12))
            .add_extension(usage, critical=True).sign(private, hashes.SHA256()))
    key = KeyInfo(id="k", label="auth-ec", ckaid="03", key_type="ec", size=256, curve="secp256r1",
                  public_key=private.public_key(), certificate=cert)
    view = certificate_overview(key, now)
    assert view is not None
    assert view["common_name"] == "Bientot expire" and view["usages"] == ["signature"]
    assert view["days_left"] in (11, 12) and view["warning"] is True and view["expired"] is False
    later = certificate_overview(key, now + timedelta(days=13))
    assert later is not None and later["expired"] is True and later["warning"] is True
    assert certificate_overview(KeyInfo(id="n", label="bare", ckaid="04", key_type="ec", size=256,
                                        curve="secp256r1", public_key=private.public_key()), now) is None


def test_actors_and_operations_today(tmp_path: Path) -> None:
    from tokenbridge.api.admin import _DayCounts, _first_seq_at_or_after, who
    from tokenbridge.state.audit import AuditLog
    from tokenbridge.state.store import Store

    assert who("client:accueil-1") == {"kind": "client", "name": "accueil-1", "via": None}
    assert who("workstation:guichet-2") == {"kind": "workstation", "name": "guichet-2", "via": None}
    assert who("client:compta@workstation:guichet-2") == {"kind": "client", "name": "compta", "via": "guichet-2"}
    assert who("operator") == {"kind": None, "name": "operator", "via": None}

    store = Store(tmp_path / "state.db")
    audit = AuditLog(store)
    assert _first_seq_at_or_after(audit, "2026-01-02T00:00:00.000000+00:00") == 1

    def add(seq: int, ts: str, actor: str) -> None:
        with store.transaction(immediate=True) as db:
            db.execute("INSERT INTO audit (seq, ts, actor, event, outcome, prev_hash, hash) VALUES (?,?,?,?,?,?,?)",
                       (seq, ts, actor, "sign", "ok", "", ""))

    for seq in range(1, 40):  # yesterday
        add(seq, f"2026-01-01T23:{seq:02d}:00.000000+00:00", "client:a")
    since = "2026-01-02T00:00:00.000000+00:00"
    counts = _DayCounts()
    assert counts.update(audit, since)["client:a"] == 0
    add(40, "2026-01-02T08:00:00.000000+00:00", "client:a")
    add(41, "2026-01-02T08:00:01.000000+00:00", "client:b@workstation:w")
    add(42, "2026-01-02T08:00:02.000000+00:00", "workstation:w")
    assert _first_seq_at_or_after(audit, since) == 40
    first = dict(counts.update(audit, since))
    assert first == {"client:a": 1, "client:b": 1, "workstation:w": 2}
    add(43, "2026-01-02T09:00:00.000000+00:00", "client:a")
    assert counts.update(audit, since)["client:a"] == 2  # only the new row was read
    assert counts.update(audit, "2026-01-03T00:00:00.000000+00:00") == {}  # a new day starts from zero
    store.close()


# ---------------------------------------------------------------------------------------------- the browser


@pytest.fixture
def browser_page() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.fail("Debian's chromium is not installed: run `bash scripts/bootstrap.sh test` (it runs apt-get)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright is not installed: pip install -e '.[test]' (never `playwright install`)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900}, locale="en-GB")
            page = context.new_page()
            page.set_default_timeout(10_000)
            yield page
        finally:
            browser.close()


def test_admin_page_story(ui_service: Service, browser_page: Any, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    page = browser_page
    admin = ui_service.add_client("ui-admin", "admin")
    signer = ui_service.add_client("accueil-1", "sign")
    other = ui_service.add_client("accueil-2", "sign,decrypt")
    ui_service.add_client("ancien-poste", "sign")
    ui_service.cli("clients", "revoke", "ancien-poste")
    with ui_service.http(other) as client:
        _sign(client, data=b"avant")
        _decrypt(client)

    page.goto(f"{ui_service.url}/ui")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()

    # A wrong secret, then a valid secret without the admin grant: clear errors, no dashboard.
    page.get_by_label("API secret").fill("tb_000000000000_not-a-real-secret")
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#login-error")).to_contain_text("not accepted")
    expect(page.locator("#dashboard")).to_be_hidden()
    page.get_by_label("API secret").fill(signer)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#login-error")).to_contain_text("no admin grant")
    assert page.evaluate("sessionStorage.length") == 0

    # The admin secret: the dashboard with the token, its three certificates, the clients.
    page.get_by_label("API secret").fill(admin)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#dashboard")).to_be_visible()
    expect(page.locator("#token-label")).to_have_text(TOKEN_LABEL)
    expect(page.locator("#token-state")).to_have_text("Ready")
    expect(page.locator("#token-logged-in")).to_have_text("Yes")
    certificates = page.locator("#certificates tbody tr")
    expect(certificates).to_have_count(3)
    expect(page.locator('#certificates tr[data-key="sign-rsa"] td.usages')).to_contain_text("non-repudiation")
    expect(page.locator('#certificates tr[data-key="sign-rsa"] td.usages')).to_contain_text("signature")
    expect(page.locator('#certificates tr[data-key="encrypt-rsa"] td.usages')).to_contain_text(KEY_ENCIPHERMENT)
    expect(page.locator('#certificates tr[data-key="auth-ec"] td.usages')).to_contain_text("TLS client")
    ops = page.locator('#clients tr[data-client="accueil-1"] td.ops-today')
    expect(ops).to_have_text("0")
    expect(page.locator('#clients tr[data-client="ancien-poste"]')).to_contain_text("revoked")
    for caption in ("Certificates on the token", "Who may use the token", "latest entries of the audit log"):
        expect(page.locator("caption", has_text=caption)).to_be_visible()

    # A workstation signs: the page shows it by itself, without a reload.
    page.evaluate("window.__sameDocument = true")
    with ui_service.http(signer) as client:
        _sign(client)
        _sign(client, data=b"deuxieme")
    expect(ops).to_have_text("2", timeout=8_000)
    entry = page.locator('#audit tbody tr[data-actor="client:accueil-1"][data-event="sign"]')
    expect(entry.first).to_be_visible()
    expect(entry.first.locator("td.outcome")).to_have_text("ok")
    expect(entry.first).to_contain_text("sign-rsa")
    assert page.evaluate("window.__sameDocument") is True

    for_docs = os.environ.get("TOKENBRIDGE_UI_SCREENSHOT")
    if for_docs:
        page.wait_for_timeout(2_600)  # the highlight of new rows fades out
    shot = Path(for_docs or tmp_path / "admin-ui.png")
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000

    # A revoked admin secret ends the session with a clear message.
    ui_service.cli("clients", "revoke", "ui-admin")
    expect(page.locator("#login-error")).to_contain_text("signed out", timeout=8_000)
    expect(page.locator("#dashboard")).to_be_hidden()
    assert page.evaluate("sessionStorage.length") == 0


def test_api_documentation_works_without_internet_under_a_strict_policy(service: Service,
                                                                          browser_page: Any) -> None:
    """/docs loads everything from the hub itself (a hub often has no internet access), under a
    content security policy: the page where operators paste secrets runs no script from elsewhere."""
    from playwright.sync_api import expect

    page = browser_page
    requested: list[str] = []
    violations: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    page.on("console", lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None)
    response = page.goto(f"{service.url}/docs")
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline'" not in policy.split("script-src")[1].split(";")[0]
    expect(page.get_by_text("/v1/keys/{key}/sign").first).to_be_visible()  # Swagger UI rendered the spec
    expect(page.get_by_text("Keys on the tokens that the caller may use").first).to_be_visible()
    outside = [url for url in requested if not url.startswith((service.url, "data:", "blob:"))]
    assert requested and outside == [], outside
    assert violations == [], violations
    html = httpx.get(f"{service.url}/docs").text
    assert "cdn.jsdelivr.net" not in html and "googleapis" not in html
