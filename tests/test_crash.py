"""``kill -9`` of the service under load: after a restart on the same state, the audit chain verifies
and every operation that was answered is in the audit.

What the client can check: operations.py audits SHA-256 of the request's ``data`` when data is sent
(for sha256 algorithms that is the digest it signs), SHA-256 of ``digest`` when a digest is sent, and
SHA-256 of the ciphertext for a decryption. The load keeps those hashes for every 200 it received.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import time

import httpx
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from tests.conftest import Service, start_service

CLIENTS = 12
KILLS = 2


def _load(svc: Service, secret: str, answered: list[tuple[str, str]], stop: threading.Event,
          errors: list[str], encrypt_pub: object) -> None:
    with httpx.Client(base_url=svc.url, headers={"Authorization": f"Bearer {secret}"}, timeout=10) as c:
        n = 0
        while not stop.is_set():
            n += 1
            data = os.urandom(24)
            try:
                if n % 5 == 0:
                    ct = encrypt_pub.encrypt(data, padding.OAEP(padding.MGF1(hashes.SHA256()),  # type: ignore[attr-defined]
                                                                hashes.SHA256(), None))
                    r = c.post("/v1/keys/encrypt-rsa/decrypt", json={"algorithm": "rsa-oaep-sha256",
                                                                      "ciphertext": base64.b64encode(ct).decode()})
                    if r.status_code == 200:
                        # Not an assert: an AssertionError in this thread would only end the thread.
                        if base64.b64decode(r.json()["plaintext"]) != data:
                            errors.append(f"wrong plaintext for ciphertext {hashlib.sha256(ct).hexdigest()}")
                        answered.append(("decrypt", hashlib.sha256(ct).hexdigest()))
                elif n % 5 == 1:
                    digest = hashlib.sha384(data).digest()
                    r = c.post("/v1/keys/sign-rsa/sign", json={"algorithm": "rsa-pss-sha384",
                                                                "digest": base64.b64encode(digest).decode()})
                    if r.status_code == 200:
                        answered.append(("sign", hashlib.sha256(digest).hexdigest()))
                else:
                    key, alg = ("auth-ec", "ecdsa-sha256") if n % 2 else ("sign-rsa", "rsa-pkcs1v15-sha256")
                    r = c.post(f"/v1/keys/{key}/sign", json={"algorithm": alg,
                                                              "data": base64.b64encode(data).decode()})
                    if r.status_code == 200:
                        answered.append(("sign", hashlib.sha256(data).hexdigest()))
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:200]}")
            except httpx.HTTPError:
                if not stop.is_set():
                    time.sleep(0.05)  # the service is gone (killed): stop soon


def test_kill_9_under_load_loses_no_answered_operation(fresh_service) -> None:
    svc: Service = fresh_service()
    secret = svc.add_client("crash-load", "sign,decrypt")
    from cryptography import x509

    pem = svc.http(secret).get("/v1/keys/encrypt-rsa/certificate").content
    pub = x509.load_pem_x509_certificate(pem).public_key()
    answered: list[tuple[str, str]] = []
    errors: list[str] = []
    started: list[Service] = []
    for round_ in range(KILLS):
        stop = threading.Event()
        threads = [threading.Thread(target=_load, args=(svc, secret, answered, stop, errors, pub))
                   for _ in range(CLIENTS)]
        before = len(answered)
        for t in threads:
            t.start()
        time.sleep(1.5 + 0.37 * round_)  # not a round number: the kill lands mid-operation
        svc.process.kill()  # SIGKILL, no shutdown
        svc.process.wait()
        time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join(15)
        assert len(answered) - before > 20, f"round {round_}: the load did not get going ({errors[:3]})"
        # Restart on the same state directory and configuration.
        svc = start_service(svc.config, svc.data_dir)
        started.append(svc)
    try:
        verify = svc.cli("audit", "verify")
        assert "intact" in verify.stdout, verify.stdout
        lines = svc.cli("audit", "tail", "-n", "1000000", "--json").stdout.splitlines()
        entries = [json.loads(x) for x in lines if x.strip()]
        audited = {(e["event"], e["input_sha256"]) for e in entries if e["outcome"] == "ok"}
        missing = [a for a in answered if a not in audited]
        assert not missing, f"{len(missing)} of {len(answered)} answered operations are not in the audit"
        assert not [e for e in errors if not e.startswith("503")], errors[:5]
        print(f"kill -9 x{KILLS}: {len(answered)} answered operations, all audited; "
              f"{len(entries)} audit entries; chain intact")
    finally:
        for s in started:
            s.stop()
