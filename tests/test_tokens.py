"""Several cards in one hub: a group of housing organisations shares one service, one card each.

Real SoftHSM tokens, each in its own store; the faulty module in front of one of them shows a card that
is slow, pulled out or crashing while the other serves. Every check is made as a counter would, over HTTP,
and the signatures are verified with each card's certificate.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.conftest import TB, Service, start_service
from tests.faulty import FaultControl, build_module, real_module
from tests.several_tokens import another_organisation, write_config
from tests.test_ui import browser_page  # noqa: F401  (the fixture: Debian's chromium under Playwright)
from tokenbridge.tools.demo import DemoInfo, init_demo

DATA = b"dossier de demande de logement social"
SIGN = {"algorithm": "rsa-pkcs1v15-sha256", "data": base64.b64encode(DATA).decode()}


@pytest.fixture(scope="session")
def demos(demo: DemoInfo, tmp_path_factory: pytest.TempPathFactory) -> list[DemoInfo]:
    """Three tokens with the same labels, in three SoftHSM stores: the shared demo, a second card of the same
    organisation (its renewal), and a third organisation's card."""
    cards = [demo] + [init_demo(tmp_path_factory.mktemp(f"card{i}") / "tokenbridge") for i in (2, 3)]
    another_organisation(cards[2], "HLM Autre Toit", "987654321")
    return cards


def wait_tokens(service: Service, states: dict[str, str], timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    health: dict[str, Any] = {}
    while time.monotonic() < deadline:
        health = httpx.get(f"{service.url}/v1/health", timeout=5).json()
        if all(health["tokens"].get(n, {}).get("state") == s for n, s in states.items()):
            return health
        time.sleep(0.1)
    raise AssertionError(f"tokens not in {states}: {health}\n{service.output()}")


@pytest.fixture
def hub(demos: list[DemoInfo], tmp_path: Path) -> Iterator[Service]:
    """Two organisations' cards: ``hlm-a`` and ``hlm-b``."""
    config = write_config(tmp_path / "hub" / "tokenbridge.toml", {"hlm-a": (demos[0], {}), "hlm-b": (demos[2], {})})
    service = start_service(config, tmp_path / "state")
    wait_tokens(service, {"hlm-a": "ready", "hlm-b": "ready"})
    yield service
    service.stop()


def certificate(client: httpx.Client, ref: str) -> x509.Certificate:
    r = client.get(f"/v1/keys/{ref}/certificate", params={"format": "der"})
    assert r.status_code == 200, r.text
    return x509.load_der_x509_certificate(r.content)


def verify(cert: x509.Certificate, signature_b64: str) -> None:
    key = cert.public_key()
    assert isinstance(key, rsa.RSAPublicKey)
    key.verify(base64.b64decode(signature_b64), DATA, padding.PKCS1v15(), hashes.SHA256())


def test_two_cards_are_listed_addressed_and_never_confused(hub: Service, demos: list[DemoInfo]) -> None:
    admin = hub.http(hub.add_client("admin", "sign,decrypt,admin,metrics"))
    tokens = admin.get("/v1/tokens").json()
    assert [(t["name"], t["state"], t["required"], t["retiring"]) for t in tokens] == \
        [("hlm-a", "ready", True, False), ("hlm-b", "ready", True, False)]
    keys = admin.get("/v1/keys").json()
    assert sorted((k["token"], k["label"]) for k in keys) == sorted(
        (t, label) for t in ("hlm-a", "hlm-b") for label in ("sign-rsa", "encrypt-rsa", "auth-ec"))
    assert len({k["id"] for k in keys}) == 6, "each key has its own id"

    # A bare label on both cards is refused, with the candidates listed.
    r = admin.post("/v1/keys/sign-rsa/sign", json=SIGN)
    assert r.status_code == 409 and r.json()["code"] == "key_ambiguous", r.text
    assert sorted(c.split(" ")[0] for c in r.json()["candidates"]) == ["hlm-a/sign-rsa", "hlm-b/sign-rsa"]
    assert "hlm-a/sign-rsa" in r.json()["detail"]

    # TOKEN/label and ids name one key; each signature verifies with its own card's certificate only.
    cert_a, cert_b = certificate(admin, "hlm-a/sign-rsa"), certificate(admin, "hlm-b/sign-rsa")
    assert cert_a != cert_b
    a = admin.post("/v1/keys/hlm-a/sign-rsa/sign", json=SIGN)
    assert a.status_code == 200, a.text
    verify(cert_a, a.json()["signature"])
    b_id = next(k["id"] for k in keys if k["token"] == "hlm-b" and k["label"] == "sign-rsa")
    b = admin.post(f"/v1/keys/{b_id}/sign", json=SIGN)
    assert b.status_code == 200 and b.json()["key"] == b_id
    verify(cert_b, b.json()["signature"])
    with pytest.raises(Exception):  # noqa: B017 (any InvalidSignature)
        verify(cert_a, b.json()["signature"])
    assert admin.post("/v1/keys/hlm-c/sign-rsa/sign", json=SIGN).json()["code"] == "key_not_found"

    health = httpx.get(f"{hub.url}/v1/health").json()
    assert health["status"] == "ok" and set(health["tokens"]) == {"hlm-a", "hlm-b"}
    assert httpx.get(f"{hub.url}/v1/ready").status_code == 200
    metrics = admin.get("/metrics").text
    for name in ("hlm-a", "hlm-b"):
        assert f'tokenbridge_token_logged_in{{token="{name}"}} 1.0' in metrics
    assert 'label="sign-rsa",token="hlm-b"' in metrics

    # The operator's commands show both cards.
    listed = hub.cli("tokens").stdout
    assert "token hlm-a: tokenbridge-demo" in listed and "token hlm-b: tokenbridge-demo" in listed
    assert "hlm-b/encrypt-rsa" in hub.cli("keys").stdout
    doctor = hub.cli("doctor")
    assert "token hlm-a: token 'tokenbridge-demo'" in doctor.stdout and "0 error(s)" in doctor.stdout


def test_key_lists_and_grants_across_cards(hub: Service) -> None:
    """Organisation A's counter may use A's card only; a bare label on both cards allows nothing, even
    through a workstation whose own list would allow it (the combination, not only each part)."""
    a_counter = hub.http(hub.add_client("guichet-a", "sign,decrypt", keys="hlm-a/sign-rsa,hlm-a/encrypt-rsa"))
    assert sorted((k["token"], k["label"]) for k in a_counter.get("/v1/keys").json()) == \
        [("hlm-a", "encrypt-rsa"), ("hlm-a", "sign-rsa")]
    assert a_counter.post("/v1/keys/hlm-a/sign-rsa/sign", json=SIGN).status_code == 200
    r = a_counter.post("/v1/keys/hlm-b/sign-rsa/sign", json=SIGN)
    assert r.status_code == 403 and r.json()["code"] == "key_not_granted"

    # `clients add` refuses a bare label that names keys on both cards...
    refused = hub.cli("clients", "add", "vague", "--grant", "sign", "--keys", "sign-rsa", check=False)
    assert refused.returncode != 0 and "hlm-a/sign-rsa" in refused.stderr + refused.stdout
    # ...and one stored anyway allows nothing (a second card with the same label never widens a list).
    forced = hub.cli("clients", "add", "vague", "--grant", "sign", "--keys", "sign-rsa", "--force", "--json")
    vague = hub.http(json.loads(forced.stdout)["secret"])
    assert vague.get("/v1/keys").json() == []
    assert vague.post("/v1/keys/hlm-a/sign-rsa/sign", json=SIGN).json()["code"] == "key_not_granted"
    # The operator fixes its list in place; the change applies at its next request.
    hub.cli("clients", "keys", "vague", "hlm-b/sign-rsa")
    assert [(k["token"], k["label"]) for k in vague.get("/v1/keys").json()] == [("hlm-b", "sign-rsa")]
    assert vague.post("/v1/keys/hlm-b/sign-rsa/sign", json=SIGN).status_code == 200
    assert hub.cli("clients", "keys", "nobody", "*", check=False).returncode != 0


def test_a_message_opens_on_whichever_card_it_is_addressed_to(hub: Service, demos: list[DemoInfo],
                                                               tmp_path: Path) -> None:
    """CMS encrypted by OpenSSL to either card's encryption certificate, by issuer and serial or by subject
    key identifier, decrypts without the caller naming a key; a counter limited to card A cannot open B's."""
    both = hub.http(hub.add_client("both", "cms-decrypt"))
    only_a = hub.http(hub.add_client("only-a", "cms-decrypt", keys="hlm-a/encrypt-rsa"))
    plain = tmp_path / "plain.bin"
    plain.write_bytes(DATA)
    for demo, name in ((demos[0], "hlm-a"), (demos[2], "hlm-b")):
        for how in ([], ["-keyid"]):
            out = tmp_path / f"{name}{''.join(how)}.der"
            subprocess.run(["openssl", "cms", "-encrypt", "-binary", "-aes256", "-in", str(plain), "-outform", "DER",
                            "-out", str(out), *how, "-recip", str(demo.pki_dir / "encrypt-rsa.pem")], check=True)
            r = both.post("/v1/cms/decrypt", content=out.read_bytes())
            assert r.status_code == 200 and base64.b64decode(r.json()["content"]) == DATA, (name, how, r.text)
            r = only_a.post("/v1/cms/decrypt", content=out.read_bytes())
            if name == "hlm-a":
                assert r.status_code == 200, r.text
            else:
                assert r.status_code == 422 and r.json()["code"] == "cms_not_addressed", r.text


async def _sign_loop(url: str, secret: str, ref: str, stop: asyncio.Event, results: list[tuple[int, float]]) -> None:
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {secret}"}, timeout=60) as c:
        while not stop.is_set():
            start = time.monotonic()
            r = await c.post(f"/v1/keys/{ref}/sign", json=SIGN)
            results.append((r.status_code, time.monotonic() - start))


async def test_a_slow_removed_or_crashing_card_never_fails_or_holds_up_the_other(
        demos: list[DemoInfo], tmp_path: Path) -> None:
    """Card A (behind the fault module) becomes slow (700 ms per signature), is pulled out, comes back and
    crashes its module, while counters sign on card B: none of B's requests fails, and none waits for A."""
    faults = FaultControl(tmp_path / "faulty", present=1)
    env = {k: v for k, v in faults.env().items() if k.startswith("FAULTY_")}
    config = write_config(tmp_path / "hub" / "tokenbridge.toml", {
        "a": (demos[0], {"module": str(build_module()), "environment": env, "presence_interval": 0.2}),
        "b": (demos[1], {}),
    })
    assert env["FAULTY_P11_REAL"] == str(real_module())
    service = start_service(config, tmp_path / "state")
    try:
        wait_tokens(service, {"a": "ready", "b": "ready"})
        secret = service.add_client("guichets", "sign")
        on_a: list[tuple[int, float]] = []
        on_b: list[tuple[int, float]] = []
        stop = asyncio.Event()
        loops = [asyncio.create_task(_sign_loop(service.url, secret, "b/sign-rsa", stop, on_b)) for _ in range(4)]
        loops += [asyncio.create_task(_sign_loop(service.url, secret, "a/sign-rsa", stop, on_a)) for _ in range(4)]
        await asyncio.sleep(1.0)
        faults.set(latency_ms=700)
        await asyncio.sleep(3.0)
        faults.set(latency_ms=0, present=0)
        await asyncio.sleep(2.0)
        faults.set(present=1)
        await asyncio.to_thread(wait_tokens, service, {"a": "ready"})
        faults.set(crash_once=str(tmp_path / "crashed"))
        await asyncio.sleep(3.0)
        stop.set()
        await asyncio.gather(*loops)
    finally:
        service.stop()
    assert (tmp_path / "crashed").exists(), "card A's module crashed once"
    assert on_b and all(status == 200 for status, _ in on_b), {s for s, _ in on_b}
    slowest_b = max(t for _, t in on_b)
    # Four requests in a row on A take 2.8 s while it is slow; B's slowest is its own token's time.
    assert slowest_b < 0.7, f"a request on B waited {slowest_b:.2f} s: card A held it up"
    a_statuses = {s for s, _ in on_a}
    assert a_statuses == {200, 503}, "A answered while present, 503 while out or restarting"


def test_each_card_has_its_own_pin_guard_and_readiness(demos: list[DemoInfo], tmp_path: Path) -> None:
    """A wrong PIN for card A stops A only: B serves, A is not tried again until the operator gives its PIN
    (`tokenbridge login --token a`); /v1/ready waits for required cards only."""
    wrong = tmp_path / "wrong-pin"
    wrong.write_text("000000")
    faults = FaultControl(tmp_path / "faulty", present=1, pin_retries=3)
    env = {k: v for k, v in faults.env().items() if k.startswith("FAULTY_")}
    config = write_config(tmp_path / "hub" / "tokenbridge.toml", {
        "a": (demos[0], {"module": str(build_module()), "environment": env}),
        "b": (demos[1], {}),
    })
    config.write_text(config.read_text().replace(f'pin_file = "{demos[0].pin_file}"', f'pin_file = "{wrong}"', 1))
    service = start_service(config, tmp_path / "state", wait_state=("needs_pin",))
    try:
        health = wait_tokens(service, {"a": "needs_pin", "b": "ready"})
        assert health["status"] == "degraded"
        r = httpx.get(f"{service.url}/v1/ready")
        assert r.status_code == 503 and r.json()["tokens"] == {"a": "needs_pin"}
        counter = service.http(service.add_client("guichet", "sign"))
        assert counter.post("/v1/keys/b/sign-rsa/sign", json=SIGN).status_code == 200
        refused = counter.post("/v1/keys/a/sign-rsa/sign", json=SIGN)
        assert refused.status_code == 503 and refused.json()["code"] == "token_unavailable"
        assert refused.json()["token"] == "a" and refused.json()["state"] == "needs_pin"
        french = counter.post("/v1/keys/a/sign-rsa/sign", json=SIGN, headers={"Accept-Language": "fr"}).json()
        assert french["code"] == "token_unavailable" and french["detail"].startswith("Carte « a » : la carte")
        assert "code PIN" in french["detail"] and french["detail_en"] == refused.json()["detail"]
        assert faults.count("C_Login", rv="CKR_PIN_INCORRECT") == 1, "the wrong PIN was tried once"
        time.sleep(1.0)
        assert faults.count("C_Login", rv="CKR_PIN_INCORRECT") == 1, "and never again"

        ambiguous = service.cli("login", input=demos[0].pin_file.read_text(), check=False)
        assert ambiguous.returncode != 0 and "--token" in ambiguous.stderr + ambiguous.stdout
        service.cli("login", "--token", "a", input=demos[0].pin_file.read_text())
        wait_tokens(service, {"a": "ready", "b": "ready"})
        assert counter.post("/v1/keys/a/sign-rsa/sign", json=SIGN).status_code == 200
        assert httpx.get(f"{service.url}/v1/ready").status_code == 200
    finally:
        service.stop()

    # Card A not required (plugged in for a renewal, say): the hub is ready without it.
    config.write_text(config.read_text().replace("[tokens.a.environment]", "required = false\n[tokens.a.environment]"))
    faults.set(present=0)
    service = start_service(config, tmp_path / "state2", wait_state=("absent", "needs_pin", "starting"))
    try:
        wait_tokens(service, {"b": "ready"})
        assert httpx.get(f"{service.url}/v1/ready").status_code == 200
    finally:
        service.stop()


def test_three_cards_and_a_plain_token_table_still_mean_one(demos: list[DemoInfo], tmp_path: Path) -> None:
    config = write_config(tmp_path / "hub" / "tokenbridge.toml",
                          {name: (d, {}) for name, d in zip(("un", "deux", "trois"), demos, strict=True)})
    service = start_service(config, tmp_path / "state")
    try:
        wait_tokens(service, {"un": "ready", "deux": "ready", "trois": "ready"})
        counter = service.http(service.add_client("guichet", "sign"))
        for name in ("un", "deux", "trois"):
            r = counter.post(f"/v1/keys/{name}/sign-rsa/sign", json=SIGN)
            assert r.status_code == 200
    finally:
        service.stop()
    # [token] and [tokens.X] together are refused in one sentence.
    both = config.read_text() + '\n[token]\nlabel = "x"\n'
    config.write_text(both)
    result = subprocess.run([*TB, "doctor", "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "not both" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def test_the_admin_page_shows_every_card_and_which_one_is_retiring(demos: list[DemoInfo], tmp_path: Path,
                                                                    browser_page: Any) -> None:  # noqa: F811
    from playwright.sync_api import expect

    config = write_config(tmp_path / "hub" / "tokenbridge.toml",
                          {"ancienne": (demos[0], {"retiring": True}), "nouvelle": (demos[1], {})})
    service = start_service(config, tmp_path / "state")
    try:
        wait_tokens(service, {"ancienne": "ready", "nouvelle": "ready"})
        admin = service.add_client("chef", "admin")
        page = browser_page
        page.goto(f"{service.url}/ui")
        page.get_by_label("API secret").fill(admin)
        page.get_by_role("button", name="Sign in").click()
        expect(page.locator("#tokens-section")).to_be_visible()
        expect(page.locator("#tokens tbody tr")).to_have_count(2)
        expect(page.locator('#tokens tr[data-token="ancienne"]')).to_contain_text("retiring: decrypts only")
        expect(page.locator('#tokens tr[data-token="nouvelle"]')).to_contain_text("in service")
        old = page.locator('#certificates tr[data-token="ancienne"][data-key="sign-rsa"]')
        expect(old).to_contain_text("ancienne/sign-rsa")
        expect(old).to_contain_text("retiring: decrypts only")
        expect(page.locator('#certificates tr[data-token="nouvelle"][data-key="sign-rsa"]')).to_contain_text(
            "nouvelle/sign-rsa")
    finally:
        service.stop()
