"""The admin page in French, its FR / EN switch, and the panels an administrator's day needs: refusals and
errors, the TLS certificates' expiry, the upstreams' status. In Debian's headless Chromium (tests/test_ui.py).

One hub for the module: TLS on (``tokenbridge tls init``, as tests/test_lan.py), two enrolled workstations
(one as if enrolled before the hub recorded expiry dates), three upstreams (an ``openssl s_server`` that
requires the organisation's certificate, a closed port, one never called: tests/test_tls_proxy.py), and
clients that get refused (403 ``key_not_granted`` and ``grant_missing``) or ask for a key that does not
exist (404). Set ``TOKENBRIDGE_UI_FR_SCREENSHOT=docs/admin-ui-fr.png`` to refresh the French screenshot in the
documentation.
"""

from __future__ import annotations

import base64
import json
import os
import re
import sqlite3
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Service, free_port, start_service
from tests.test_lan import cli
from tests.test_tls_proxy import s_server, upstream
from tests.test_ui import CHROMIUM, CHROMIUM_ARGS
from tokenbridge.tools.demo import TOKEN_LABEL, DemoInfo

SIGN = {"algorithm": "rsa-pkcs1v15-sha256", "data": base64.b64encode(b"bordereau").decode()}


@dataclass
class Hub:
    service: Service
    admin: str
    ca: Path


@pytest.fixture(scope="module")
def hub(demo: DemoInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    d = tmp_path_factory.mktemp("hub-fr")
    pki = demo.dir / "pki"
    national = s_server(d, pki / "national-tls.pem", pki / "national-tls.key", pki / "ca-chain.pem", "1.3")
    text = demo.config_file.read_text().replace('"pki/', f'"{demo.dir}/pki/').replace(
        'pin_file = "pin"', f'pin_file = "{demo.dir}/pin"')
    text += "\n" + "".join([upstream("national", national.port, "auth-ec", pki / "ca-chain.pem"),
                            upstream("ferme", free_port(), "auth-ec", pki / "ca-chain.pem"),
                            upstream("inutilise", free_port(), "auth-ec", pki / "ca-chain.pem")])
    config = d / "tokenbridge.toml"
    config.write_text(text)
    data = d / "state"
    data.mkdir()
    cli(data, config, "tls", "init", "--hostname", "localhost")
    ca = data / "tls" / "ca.pem"
    svc = start_service(config, data, {"TOKENBRIDGE_SERVER__TLS": "on"}, scheme="https",
                        verify=ssl.create_default_context(cafile=str(ca)))
    try:
        for name in ("guichet-2", "guichet-ancien"):
            json.loads(cli(data, config, "workstations", "enroll", name, "--grant", "sign", "--json").stdout)
        with sqlite3.connect(data / "state.db") as db:  # as enrolled before the hub recorded notAfter
            db.execute("UPDATE clients SET cert_not_after = NULL WHERE name = 'guichet-ancien'")
        admin = svc.add_client("chef", "admin")
        signer = svc.add_client("accueil-1", "sign", keys="sign-rsa")
        app = svc.add_client("appli-sne", "proxy")
        with svc.http(signer) as c:
            assert c.post("/v1/keys/sign-rsa/sign", json=SIGN).status_code == 200
            refused = c.post("/v1/keys/encrypt-rsa/sign", json=SIGN)
            assert refused.status_code == 403 and refused.json()["code"] == "key_not_granted", refused.text
            no_grant = c.post("/v1/keys/encrypt-rsa/decrypt", json={"algorithm": "rsa-oaep-sha256",
                                                                    "ciphertext": base64.b64encode(b"x").decode()})
            assert no_grant.status_code == 403 and no_grant.json()["code"] == "grant_missing", no_grant.text
            # A 404 is not audited (services/operations.py audits the refusals that say something about the
            # client: 403), so it is not among the refusals the page counts.
            missing = c.post("/v1/keys/inconnue/sign", json=SIGN)
            assert missing.status_code == 404 and missing.json()["code"] == "key_not_found", missing.text
        with svc.http(app) as c:
            assert c.get("/v1/proxy/national/").status_code == 200
            closed = c.get("/v1/proxy/ferme/")
            assert closed.status_code >= 500, closed.text
        yield Hub(svc, admin, ca)
    finally:
        svc.stop()
        national.process.kill()
        national.process.wait()


def test_overview_has_refusals_certificates_and_upstreams(hub: Hub) -> None:
    with hub.service.http(hub.admin) as c:
        view = c.get("/v1/admin/overview").json()

    problems = view["problems"]
    codes = {o["outcome"]: o["count"] for o in problems["by_outcome"]}
    assert codes == {"key_not_granted": 1, "grant_missing": 1}, codes  # the 404 and the proxy error: not audited
    assert problems["today"] == sum(codes.values())
    recent = problems["recent"]
    assert all(e["outcome"] not in problems["success_outcomes"] for e in recent)
    assert [e["seq"] for e in recent] == sorted((e["seq"] for e in recent), reverse=True)
    assert {e["actor"] for e in recent if e["outcome"] in ("key_not_granted", "grant_missing")} == {
        "client:accueil-1"}

    server = view["tls"]["server"]
    assert server["serving"] is True and server["status"] == "valid" and server["warning"] is False
    assert server["path"].endswith("server.pem") and "localhost" in server["names"]
    assert 800 <= server["days_left"] <= 825  # `tls init` issues 825 days
    stations = {w["name"]: w for w in view["tls"]["workstations"]}
    assert stations["guichet-2"]["status"] == "valid" and 720 <= stations["guichet-2"]["days_left"] <= 730
    assert stations["guichet-ancien"]["status"] == "unknown" and stations["guichet-ancien"]["not_after"] is None
    clients = {c["name"]: c for c in view["clients"]}
    assert clients["guichet-2"]["cert_not_after"] == stations["guichet-2"]["not_after"]

    upstreams = {u["name"]: u for u in view["upstreams"]}
    national = upstreams["national"]
    assert national["used"] and national["connections"] >= 1 and national["last_handshake"]["version"] == "TLSv1.3"
    assert national["last_signed"]["outcome"] == "ok"
    assert upstreams["ferme"]["used"] and upstreams["ferme"]["errors"][0]["count"] >= 1
    assert upstreams["inutilise"]["used"] is False and upstreams["inutilise"]["last_handshake"] is None

    smarthost = view["mail"]["smarthost"]
    assert smarthost["last"] is None and smarthost["waiting"] is None  # nothing sent: "not used yet"


@pytest.fixture
def french_page() -> Iterator[Any]:
    """A French-speaking administrator's browser: locale fr-FR, so Accept-Language and navigator.languages."""
    if not CHROMIUM.exists():
        pytest.fail("Debian's chromium is not installed: run `bash scripts/bootstrap.sh test` (it runs apt-get)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900}, locale="fr-FR",
                                          extra_http_headers={"Accept-Language": "fr-FR,fr;q=0.9"},
                                          ignore_https_errors=True)  # the bridge CA is not in Chromium's store
            page = context.new_page()
            page.set_default_timeout(10_000)
            yield page
        finally:
            browser.close()


def test_admin_page_in_french_with_the_switch(hub: Hub, french_page: Any, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    page = french_page
    violations: list[str] = []
    page.on("console", lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None)
    assert page.evaluate("navigator.languages")[0].startswith("fr")
    page.goto(f"{hub.service.url}/ui")
    expect(page.get_by_role("heading", name="Connexion")).to_be_visible()
    expect(page.locator("html")).to_have_attribute("lang", "fr")
    expect(page.locator('#lang button[data-lang="fr"]')).to_have_attribute("aria-pressed", "true")
    page.get_by_label("Secret d'API").fill("tb_000000000000_pas-un-vrai-secret")
    page.get_by_role("button", name="Se connecter").click()
    expect(page.locator("#login-error")).to_contain_text("n'a pas été accepté")
    page.get_by_label("Secret d'API").fill(hub.admin)
    page.get_by_role("button", name="Se connecter").click()
    expect(page.locator("#dashboard")).to_be_visible()

    # The main panels in French.
    for heading in ("Carte", "File d'attente", "Certificats", "Guichets / clients", "Journal d'audit",
                    "Refus et erreurs", "Certificats TLS du pont", "Services web (TLS mutuel)"):
        expect(page.get_by_role("heading", name=heading, exact=True)).to_be_visible()
    expect(page.locator("#token-label")).to_have_text(TOKEN_LABEL)
    expect(page.locator("#token-state")).to_have_text("Prête")
    expect(page.locator("#token-state")).to_have_class("badge ok")
    expect(page.locator("#token-state-text")).to_contain_text("code PIN saisi")
    expect(page.locator("#token-logged-in")).to_have_text("Oui")
    expect(page.locator("#queue-depth")).to_have_text("0")
    expect(page.locator('#certificates tr[data-key="sign-rsa"] td.usages')).to_contain_text("non-répudiation")
    expect(page.locator('#certificates tr[data-key="encrypt-rsa"] td.usages')).to_contain_text(
        "déchiffrer les réponses du système national")
    expect(page.locator('#certificates tr[data-key="auth-ec"] td.usages')).to_contain_text(
        "authentification client TLS")
    not_after = page.evaluate("fetch('/v1/admin/overview', {headers: {Authorization: 'Bearer ' + "
                              "sessionStorage.getItem('tokenbridge.admin.secret')}}).then(r => r.json())"
                              ".then(v => v.certificates.find(c => c.label === 'sign-rsa').not_after)")
    french_date = page.evaluate("(iso) => new Intl.DateTimeFormat('fr-FR', {day: '2-digit', month: 'short', "
                                "year: 'numeric'}).format(new Date(iso))", not_after)
    expect(page.locator('#certificates tr[data-key="sign-rsa"] td.expires')).to_have_text(french_date)
    expect(page.locator('#clients tr[data-client="accueil-1"]')).to_contain_text("Client d'API")
    expect(page.locator('#clients tr[data-client="guichet-2"]')).to_contain_text("Poste (guichet)")
    expect(page.locator('#clients tr[data-client="accueil-1"] td.ops-today')).to_have_text(re.compile(r"^[1-9]"))
    ok = page.locator('#audit tbody td.outcome .badge[data-outcome="ok"]').first
    expect(ok).to_have_text("réussi")
    expect(ok).to_have_class("badge ok")  # a success is never red

    # Refusals and errors: today's count, by code, and the filters on the list.
    problems = page.locator("#problems-list tbody tr")
    expect(page.locator("#problems-today")).to_contain_text("refus et erreurs")
    expect(page.locator("#problems-today-tally")).to_have_class(re.compile(r"\bbad\b"))
    expect(page.locator('#problems-by-code li[data-outcome="key_not_granted"]')).to_have_text(
        "clé non autorisée × 1")
    expect(page.locator('#problems-by-code li[data-outcome="grant_missing"]')).to_have_text("droit manquant × 1")
    total = problems.count()
    assert total >= 2
    page.get_by_label("Code").select_option("key_not_granted")
    expect(problems).to_have_count(1)
    expect(problems.first).to_have_attribute("data-actor", "client:accueil-1")
    expect(problems.first.locator("td.outcome .badge")).to_have_text("clé non autorisée")
    expect(problems.first.locator("td.outcome .badge")).to_have_class("badge bad")
    expect(page.locator("#problems-shown")).to_contain_text(f"1 sur {total}")
    page.get_by_label("Code").select_option("")
    page.get_by_label("Qui").fill("accueil")
    expect(problems).to_have_count(page.locator('#problems-list tbody tr[data-actor="client:accueil-1"]').count())
    page.get_by_label("Qui").fill("personne")
    expect(problems).to_have_count(1)
    expect(problems.first).to_contain_text("Aucun refus ni erreur ne correspond au filtre")
    page.get_by_label("Qui").fill("")
    page.locator('#problems-by-code button[data-code="grant_missing"]').click()  # a code's chip filters too
    expect(problems).to_have_count(1)
    expect(page.get_by_label("Code")).to_have_value("grant_missing")
    page.get_by_label("Code").select_option("")
    expect(problems).to_have_count(total)

    # The TLS certificates: the hub's own, and the workstations' (one enrolled before expiry was recorded).
    server = page.locator("#tls-server")
    expect(server).to_contain_text("Le certificat TLS du pont expire le")
    expect(server).to_contain_text("utilisé par cette connexion")
    expect(server.locator(".badge")).to_have_class("badge ok")
    expect(page.locator('#tls-workstations tr[data-workstation="guichet-2"]')).to_have_attribute("data-status",
                                                                                                 "valid")
    expect(page.locator('#tls-workstations tr[data-workstation="guichet-2"] td.days-left')).to_contain_text("jours")
    old = page.locator('#tls-workstations tr[data-workstation="guichet-ancien"]')
    expect(old.locator("td.days-left")).to_have_text("inconnue")
    expect(old).to_contain_text("renouvelez-le pour la connaître")
    expect(page.locator("#tls-warning")).to_be_hidden()
    expect(page.locator("#tls-failing")).to_be_hidden()

    # The smarthost (none in the demo) and the upstreams.
    expect(page.locator("#smtp")).to_contain_text("Aucun serveur d'envoi n'est configuré")
    national = page.locator('#upstreams tr[data-upstream="national"]')
    expect(national.locator("td.handshake")).to_contain_text("TLSv1.3")
    expect(national.locator("td.handshake")).to_contain_text("dernière signature de la carte")
    expect(national.locator("td.traffic")).to_contain_text("1 requête")
    expect(page.locator('#upstreams tr[data-upstream="ferme"] td.errors li')).to_have_class("code bad")
    expect(page.locator('#upstreams tr[data-upstream="inutilise"] td.handshake')).to_have_text("pas encore utilisé")
    for_docs = os.environ.get("TOKENBRIDGE_UI_FR_SCREENSHOT")
    if for_docs:
        page.mouse.move(0, 0)
        page.evaluate("document.activeElement && document.activeElement.blur()")
        page.wait_for_timeout(2_600)  # the highlight of new rows fades out
    shot = Path(for_docs or tmp_path / "admin-ui-fr.png")
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000

    # English, remembered after a reload; then French again, remembered too. The session is kept.
    page.locator('#lang button[data-lang="en"]').click()
    expect(page.locator("html")).to_have_attribute("lang", "en")
    expect(page.get_by_role("heading", name="Token", exact=True)).to_be_visible()
    expect(page.locator("#token-state")).to_have_text("Ready")
    expect(page.locator("#problems-title")).to_have_text("Refusals and errors")
    expect(page.locator('#upstreams tr[data-upstream="inutilise"] td.handshake')).to_have_text("not used yet")
    expect(page.locator('#audit tbody td.outcome .badge[data-outcome="ok"]').first).to_have_text("ok")
    page.reload()
    expect(page.locator("#dashboard")).to_be_visible()
    expect(page.locator("html")).to_have_attribute("lang", "en")
    expect(page.locator('#lang button[data-lang="en"]')).to_have_attribute("aria-pressed", "true")
    expect(page.locator("#token-state")).to_have_text("Ready")
    expect(page.locator("#tls-server")).to_contain_text("The hub's TLS certificate expires on")
    page.locator('#lang button[data-lang="fr"]').click()
    expect(page.locator("#token-state")).to_have_text("Prête")
    page.reload()
    expect(page.locator("html")).to_have_attribute("lang", "fr")
    expect(page.locator("#token-state")).to_have_text("Prête")
    expect(page.locator("#updated")).to_contain_text("Mise à jour à")
    assert violations == [], violations


def test_static_files_include_the_strings(hub: Hub) -> None:
    with httpx.Client(base_url=hub.service.url, verify=ssl.create_default_context(cafile=str(hub.ca))) as c:
        strings = c.get("/ui/strings.js")
        assert strings.status_code == 200 and strings.headers["content-type"].startswith("text/javascript")
        assert "script-src 'self'" in strings.headers["content-security-policy"]
        assert "Guichets / clients" in strings.text
        page = c.get("/ui").text
        assert page.index("/ui/strings.js") < page.index("/ui/app.js")
