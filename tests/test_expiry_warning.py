"""A certificate about to expire is announced ahead, by `server.expiry_warning_days`.

The organisation's signing certificate on the card is replaced (same key) by one that expires in 10 days,
with OpenSC's pkcs11-tool, as in tests/test_certificate_validity.py. With the window at 30 days, /metrics,
the admin page's data and `tokenbridge doctor` warn, with the dates; with the window at 5 days they do not.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Service, start_service
from tests.test_ui import browser_page  # noqa: F401  (the fixture: Debian's chromium under Playwright)
from tokenbridge.config import Settings
from tokenbridge.services.keys import Validity, certificate_validity, validity
from tokenbridge.services.metrics import Metrics
from tokenbridge.services.tokens import TokenSet
from tokenbridge.token.model import KeyInfo, TokenState, TokenStatus
from tokenbridge.tools.demo import TOKEN_LABEL, DemoInfo, find_softhsm_module, init_demo

SOON = dt.timedelta(days=10)


def replace_certificate(demo: DemoInfo, label: str, key_id: str, not_before: dt.datetime,
                        not_after: dt.datetime) -> x509.Certificate:
    """The key's certificate on the token replaced by one with these dates (same subject, key, extensions)."""
    current = x509.load_pem_x509_certificate((demo.pki_dir / f"{label}.pem").read_bytes())
    issuer = x509.load_pem_x509_certificate((demo.pki_dir / "intermediate-ca.pem").read_bytes())
    issuer_key = serialization.load_pem_private_key((demo.pki_dir / "intermediate-ca.key").read_bytes(), None)
    builder = (x509.CertificateBuilder().subject_name(current.subject).issuer_name(issuer.subject)
               .public_key(current.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(not_before).not_valid_after(not_after))
    for ext in current.extensions:
        builder = builder.add_extension(ext.value, ext.critical)
    cert = builder.sign(issuer_key, hashes.SHA256())  # type: ignore[arg-type]
    der = demo.dir / f"{label}-replaced.der"
    der.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    tool = ["pkcs11-tool", "--module", str(find_softhsm_module()), "--token-label", TOKEN_LABEL, "--login",
            "--pin", demo.pin_file.read_text().strip()]
    env = {**os.environ, "SOFTHSM2_CONF": str(demo.softhsm_conf)}
    subprocess.run([*tool, "--delete-object", "--type", "cert", "--id", key_id], env=env, check=True,
                   capture_output=True)
    subprocess.run([*tool, "--write-object", str(der), "--type", "cert", "--id", key_id, "--label", label],
                   env=env, check=True, capture_output=True)
    return cert


@pytest.fixture(scope="module")
def renewal_due(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoInfo, x509.Certificate]:
    """A token whose signing certificate expires in 10 days (the other two have years left)."""
    demo = init_demo(tmp_path_factory.mktemp("renewal") / "tokenbridge")
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    return demo, replace_certificate(demo, "sign-rsa", "01", now - dt.timedelta(days=355), now + SOON)


def _service(demo: DemoInfo, tmp: Path, warning_days: int) -> Iterator[Service]:
    """The service with `[server] expiry_warning_days` set in its configuration file, as an operator would."""
    config = demo.dir / f"window-{warning_days}.toml"  # beside the demo's file: its relative paths still hold
    text = demo.config_file.read_text()
    assert "\n[server]\n" in text
    config.write_text(text.replace("\n[server]\n", f"\n[server]\nexpiry_warning_days = {warning_days}\n"))
    svc = start_service(config, tmp)
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def window_30(renewal_due: tuple[DemoInfo, x509.Certificate],
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    yield from _service(renewal_due[0], tmp_path_factory.mktemp("state30"), 30)


@pytest.fixture(scope="module")
def window_5(renewal_due: tuple[DemoInfo, x509.Certificate],
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    yield from _service(renewal_due[0], tmp_path_factory.mktemp("state5"), 5)


def _metrics(svc: Service) -> dict[str, dict[str, float]]:
    """``{metric name: {key label: value}}`` for the certificate gauges, as Prometheus would parse them."""
    with svc.http(svc.add_client(f"prometheus-{svc.port}", "metrics")) as scraper:
        response = scraper.get("/metrics")
    assert response.status_code == 200, response.text
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(response.text):
        if family.name.startswith("tokenbridge_certificate_"):
            out[family.name] = {s.labels["label"]: s.value for s in family.samples}
    return out


def _overview(svc: Service) -> dict[str, dict[str, Any]]:
    with svc.http(svc.add_client(f"supervision-{svc.port}", "admin")) as admin:
        response = admin.get("/v1/admin/overview")
    assert response.status_code == 200, response.text
    return {c["label"]: c for c in response.json()["certificates"]}


def _doctor(svc: Service) -> str:
    result = svc.cli("doctor", check=False)
    assert result.returncode == 0, result.stdout + result.stderr  # a warning is not an error
    assert "service is running" in result.stdout
    return " ".join(result.stdout.split())  # rich wraps long lines at 80 columns without a terminal


# ---------------------------------------------------------------------------------------------- window 30


def test_metrics_give_the_dates_and_flag_the_certificate(window_30: Service,
                                                         renewal_due: tuple[DemoInfo, x509.Certificate]) -> None:
    cert = renewal_due[1]
    metrics = _metrics(window_30)
    assert metrics["tokenbridge_certificate_not_after_seconds"]["sign-rsa"] == cert.not_valid_after_utc.timestamp()
    assert metrics["tokenbridge_certificate_not_before_seconds"]["sign-rsa"] == cert.not_valid_before_utc.timestamp()
    assert metrics["tokenbridge_certificate_expiring"] == {"sign-rsa": 1.0, "encrypt-rsa": 0.0, "auth-ec": 0.0}
    assert metrics["tokenbridge_certificate_days_left"]["sign-rsa"] in (9.0, 10.0)
    others = metrics["tokenbridge_certificate_not_after_seconds"]
    assert others["encrypt-rsa"] > cert.not_valid_after_utc.timestamp() + 300 * 86400


def test_admin_data_marks_the_certificate(window_30: Service, renewal_due: tuple[DemoInfo, x509.Certificate]) -> None:
    certs = _overview(window_30)
    soon = certs["sign-rsa"]
    assert soon["status"] == "expiring" and soon["warning"] is True and soon["expired"] is False
    assert soon["days_left"] in (9, 10) and soon["warning_days"] == 30
    assert soon["not_after"] == renewal_due[1].not_valid_after_utc.isoformat()
    assert [c["status"] for label, c in certs.items() if label != "sign-rsa"] == ["valid", "valid"]
    assert not any(c["warning"] for label, c in certs.items() if label != "sign-rsa")


def test_doctor_warns_with_the_date_and_what_to_do(window_30: Service,
                                                   renewal_due: tuple[DemoInfo, x509.Certificate]) -> None:
    out = _doctor(window_30)
    end = renewal_due[1].not_valid_after_utc.date().isoformat()
    line = re.search(r"warn key 'sign-rsa' \(rsa-\d+\): certificate expires on (\S+), in (\d+) days \(warning "
                     r"from 30 days ahead, server.expiry_warning_days\): renew the certificate", out)
    assert line is not None, out
    assert line.group(1) == end and line.group(2) in ("9", "10")
    assert "ok key 'encrypt-rsa'" in out and "ok key 'auth-ec'" in out and "1 warning(s)" in out


def test_admin_page_shows_the_warning(window_30: Service, browser_page: Any,  # noqa: F811
                                      renewal_due: tuple[DemoInfo, x509.Certificate]) -> None:
    from playwright.sync_api import expect

    page = browser_page
    page.goto(f"{window_30.url}/ui")
    page.get_by_label("API secret").fill(window_30.add_client("ui-admin", "admin"))
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#dashboard")).to_be_visible()
    end = page.evaluate("(iso) => new Intl.DateTimeFormat('en-GB', {day: '2-digit', month: 'short', "
                        "year: 'numeric'}).format(new Date(iso))", renewal_due[1].not_valid_after_utc.isoformat())
    banner = page.locator("#certificates-warning")
    expect(banner).to_be_visible()
    expect(banner).to_have_class(re.compile(r"\bwarning\b"))  # amber: nothing has failed yet
    expect(page.locator("#certificates-failing")).to_be_hidden()  # the red banner is for what no longer works
    expect(banner).to_contain_text(re.compile(rf"sign-rsa: the certificate expires on {end}, in (9|10) days"))
    expect(banner.locator(".line")).to_have_count(1)
    days = page.locator('#certificates tr[data-key="sign-rsa"] td.days-left .badge')
    expect(days).to_have_text(re.compile(r"^(9|10) days left — renew soon$"))
    expect(days).to_have_class(re.compile(r"\bwarn\b"))
    for fine in ("encrypt-rsa", "auth-ec"):
        cell = page.locator(f'#certificates tr[data-key="{fine}"] td.days-left')
        expect(cell).to_have_text(re.compile(r"^\d+$"))  # plain figure: neither amber nor red
        expect(cell.locator(".badge")).to_have_count(0)


# ---------------------------------------------------------------------------------------------- window 5


def test_a_shorter_window_does_not_warn(window_5: Service, renewal_due: tuple[DemoInfo, x509.Certificate]) -> None:
    cert = renewal_due[1]
    metrics = _metrics(window_5)
    assert metrics["tokenbridge_certificate_expiring"] == {"sign-rsa": 0.0, "encrypt-rsa": 0.0, "auth-ec": 0.0}
    assert metrics["tokenbridge_certificate_not_after_seconds"]["sign-rsa"] == cert.not_valid_after_utc.timestamp()

    soon = _overview(window_5)["sign-rsa"]
    assert soon["status"] == "valid" and soon["warning"] is False and soon["warning_days"] == 5

    out = _doctor(window_5)
    assert "ok key 'sign-rsa'" in out and "expires on" not in out and "0 warning(s)" in out, out


# ---------------------------------------------------------------------------------------------- pure parts


def _key(label: str, not_before: dt.datetime, not_after: dt.datetime) -> KeyInfo:
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, label)])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(private.public_key())
            .serial_number(1).not_valid_before(not_before).not_valid_after(not_after)
            .sign(private, hashes.SHA256()))
    return KeyInfo(id="00ff", label=label, ckaid="01", key_type="ec", size=256, curve="secp256r1",
                   public_key=private.public_key(), certificate=cert)


def test_the_rule_at_its_edges() -> None:
    now = dt.datetime(2026, 3, 1, 12, tzinfo=dt.UTC)
    start = now - dt.timedelta(days=300)
    day = dt.timedelta(days=1)
    assert validity(start, now + 30 * day, 30, now).state is Validity.EXPIRING  # exactly 30 days ahead
    assert validity(start, now + 30 * day + dt.timedelta(seconds=1), 30, now).state is Validity.VALID
    assert validity(start, now + 10 * day, 0, now).state is Validity.VALID  # 0: no warning ahead
    expired = validity(start, now - day, 0, now)
    assert expired.state is Validity.EXPIRED and expired.warn and expired.days_left == -1
    assert validity(now + day, now + 400 * day, 30, now).state is Validity.NOT_YET_VALID
    hours = validity(start, now + dt.timedelta(hours=5), 30, now)
    assert hours.days_left == 0 and hours.describe() == "certificate expires on 2026-03-01, in less than a day"
    assert validity(start, now + day, 30, now).describe() == "certificate expires on 2026-03-02, in 1 day"
    assert "EXPIRED on 2026-02-28" in expired.describe()
    assert certificate_validity(KeyInfo(id="1", label="bare", ckaid="02", key_type="ec", size=256,
                                        curve="secp256r1", public_key=_key("x", start, now).public_key), 30) is None


class _Owner:
    """What the metrics collector reads of a token process, without a token."""

    service_time = 0.0
    name = "main"

    def __init__(self, keys: list[KeyInfo]) -> None:
        self.keys = keys

    def status(self) -> TokenStatus:
        return TokenStatus(state=TokenState.READY, module="none", logged_in=True)

    def queued_by_client(self) -> dict[str, int]:
        return {}

    def list_keys(self) -> list[KeyInfo]:
        return self.keys


def test_metric_labels_are_escaped_and_values_exact() -> None:
    """A key label is whatever was written on the card: quotes, backslashes and newlines must not break
    the exposition format (a broken scrape would silence every alert)."""
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    odd = 'so"on\\ly\nnext{x="1"}'
    key = _key(odd, now - dt.timedelta(days=1), now + dt.timedelta(days=3))
    metrics = Metrics(expiry_warning_days=7)
    metrics.watch(TokenSet(Settings(), {"main": _Owner([dataclasses.replace(key, token="main")])}))  # type: ignore[dict-item]
    text = generate_latest(metrics.registry).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    (sample,) = families["tokenbridge_certificate_not_after_seconds"].samples
    assert sample.labels == {"key": "00ff", "label": odd, "token": "main"}
    assert key.certificate is not None and sample.value == key.certificate.not_valid_after_utc.timestamp()
    (flag,) = families["tokenbridge_certificate_expiring"].samples
    assert flag.labels["label"] == odd and flag.value == 1.0
