"""Token pulled out mid-run (clear 503, recovery without restart) and the RSA mechanism fallback.

The fallback cannot be produced with SoftHSM (it lists raw RSA), so it is tested on the key
source itself, in this process, with a software signer standing in for a PSS-less card.
"""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.faulty import FaultControl, build_module
from tests.test_tls_proxy import other_ca, s_server, upstream
from tests.test_token_faults import wait_state
from tests.tls_wire import RSA_PKCS1, RSA_PSS, Relay, certificate_request_schemes, certificate_verify_scheme
from tokenbridge.tls.keysource import ClientIdentity, ContextOptions, Mechanism
from tokenbridge.tls.openssl_keymethod import OpenSSLKeyMethodSource
from tokenbridge.tools.demo import DemoInfo


def test_token_absent_gives_503_then_recovers_without_restart(fresh_service: Any, demo: DemoInfo,
                                                               tmp_path: Path) -> None:
    faults = FaultControl(tmp_path / "faulty", present=1)
    build_module()
    pki = demo.dir / "pki"
    # No tickets, no session cache: every connection needs a fresh token signature.
    server = s_server(tmp_path, pki / "national-tls.pem", pki / "national-tls.key", pki / "ca-chain.pem", "1.2",
                      "-no_ticket", "-no_cache")
    try:
        text = demo.config_file.read_text().replace('"pki/', f'"{pki}/').replace(
            'pin_file = "pin"', f'pin_file = "{demo.dir}/pin"')
        config = tmp_path / "tokenbridge.toml"
        config.write_text(text + "\n" + upstream("nat", server.port, "auth-ec", pki / "ca-chain.pem"))
        svc = fresh_service(faults.env(), config=config)
        with svc.http(svc.add_client("app", "proxy")) as http:
            assert http.get("/v1/proxy/nat/").status_code == 200
            faults.set(present=0)  # noticed at the next token call (the handshake's signature)
            response = http.get("/v1/proxy/nat/")
            assert response.status_code == 503, response.text
            body = response.json()
            assert body["code"] == "token_unavailable" and "'nat'" in body["detail"], body
            faults.set(present=1)
            wait_state(svc, ("ready",), 15)
            deadline = time.monotonic() + 10
            while (response := http.get("/v1/proxy/nat/")).status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert response.status_code == 200, response.text
    finally:
        server.process.kill()
        server.process.wait()


def _software_rsa_signer(key: rsa.RSAPrivateKey, used: list[str]) -> Any:
    numbers = key.private_numbers()
    n, d = numbers.public_numbers.n, numbers.d
    k = (n.bit_length() + 7) // 8

    def sign(mechanism: Mechanism, data: bytes) -> bytes:
        used.append(mechanism)
        if mechanism != "rsa-pkcs1":
            raise AssertionError(f"a PSS-less token was asked for {mechanism}")
        block = b"\x00\x01" + b"\xff" * (k - 3 - len(data)) + b"\x00" + data
        return pow(int.from_bytes(block, "big"), d, n).to_bytes(k, "big")

    return sign


@pytest.mark.parametrize("server_version", ["1.2", "1.3"])
def test_rsa_key_without_raw_rsa_is_limited_to_tls12_pkcs1(tmp_path: Path, server_version: str) -> None:
    ca, cert_path, key_path = other_ca(tmp_path / "ca")
    ca_key = serialization.load_pem_private_key((tmp_path / "ca" / "ca.key").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(ca.read_bytes())
    client_key = rsa.generate_private_key(65537, 2048)
    now = ca_cert.not_valid_before_utc
    client_cert = (x509.CertificateBuilder().subject_name(x509.Name.from_rfc4514_string("O=Org,CN=client"))
                   .issuer_name(ca_cert.subject).public_key(client_key.public_key()).serial_number(7)
                   .not_valid_before(now).not_valid_after(ca_cert.not_valid_after_utc)
                   .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    # The server certificate was issued by "Some Other CA" (ca); it also trusts client certs from it.
    server = s_server(tmp_path, cert_path, key_path, ca, server_version)
    relay = Relay(server.port)  # records the handshake as the server received it
    used: list[str] = []
    try:
        source = OpenSSLKeyMethodSource()
        source.check()
        context, info = source.make_context(
            ClientIdentity(client_cert, client_key.public_key(), rsa_raw=False),
            ContextOptions(cafile=str(ca)), _software_rsa_signer(client_key, used))
        assert info.maximum_version is ssl.TLSVersion.TLSv1_2 and info.limited_reason
        with socket.create_connection(("127.0.0.1", relay.port)) as raw:
            if server_version == "1.3":
                with pytest.raises(ssl.SSLError):
                    context.wrap_socket(raw, server_hostname="localhost")
                assert used == []  # refused on the version, before the key was asked for anything
                return
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                assert tls.version() == "TLSv1.2"
                tls.sendall(b"GET / HTTP/1.0\r\n\r\n")
                page = b""
                while chunk := tls.recv(65536):
                    page += chunk
        relay.wait()
        # The server accepted the handshake and saw this client certificate (s_server -www prints it as PEM).
        assert page.split(b"\r\n", 1)[0].split()[1] == b"200", page[:200]
        assert x509.load_pem_x509_certificates(page) == [client_cert], page[-2000:]
        # The server offered RSA-PSS, yet the CertificateVerify it received is RSA PKCS#1 v1.5.
        conversation, = relay.conversations
        offered = certificate_request_schemes(bytes(conversation.server))
        assert set(offered) & set(RSA_PSS), [hex(s) for s in offered]
        scheme = certificate_verify_scheme(bytes(conversation.client))
        assert scheme in RSA_PKCS1, hex(scheme)
        assert used == ["rsa-pkcs1"]
    finally:
        relay.close()
        server.process.kill()
        server.process.wait()
