"""The audit store becomes unwritable under a running service: private-key operations are refused
with 503 ``audit_unavailable`` (and cost no token operation), everything else keeps answering, the
problem says why, and the service recovers by itself once the store is writable again.

Two real causes, no mock:
- a read-only file: ``chattr +i`` on state.db and its WAL and SHM files (the tests run as root, for whom
  a 0444 mode means nothing; skipped where chattr is not allowed);
- a full disk: ``prlimit --fsize`` on the service process, so every write past 4 KiB fails with EFBIG
  (CPython ignores SIGXFSZ), which SQLite reports as "database or disk is full" / "disk I/O error".
"""

from __future__ import annotations

import base64
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import Service

SIGN = {"algorithm": "ecdsa-sha256", "data": base64.b64encode(b"audit me").decode()}
DECRYPT_JUNK = {"algorithm": "rsa-oaep-sha256", "ciphertext": base64.b64encode(bytes(256)).decode()}


def _state_files(svc: Service) -> list[Path]:
    """The database, its write-ahead log and its WAL index (-shm). SQLite maps the index in memory: a
    write to a mapped page of an immutable file is a SIGBUS, which the store's guard must prevent."""
    db = svc.data_dir / "state.db"
    return [p for p in (db, db.with_name("state.db-wal"), db.with_name("state.db-shm")) if p.exists()]


@contextmanager
def immutable(files: list[Path]) -> Iterator[None]:
    done: list[Path] = []
    try:
        for f in files:
            r = subprocess.run(["chattr", "+i", str(f)], capture_output=True, text=True)
            if r.returncode != 0:
                pytest.skip(f"chattr +i not permitted here: {r.stderr.strip()}")
            done.append(f)
        yield
    finally:
        for f in done:
            subprocess.run(["chattr", "-i", str(f)], check=False)


@contextmanager
def disk_full(pid: int) -> Iterator[None]:
    if shutil.which("prlimit") is None:
        pytest.skip("prlimit (util-linux) is not installed")
    subprocess.run(["prlimit", f"--pid={pid}", "--fsize=4096:unlimited"], check=True)
    try:
        yield
    finally:
        subprocess.run(["prlimit", f"--pid={pid}", "--fsize=unlimited:unlimited"], check=True)


def _check_refused_and_recovers(svc: Service, secret: str, cause: object, why: tuple[str, ...]) -> None:
    client = svc.http(secret)
    assert client.post("/v1/keys/auth-ec/sign", json=SIGN).status_code == 200
    with cause:  # type: ignore[attr-defined]
        for _ in range(3):
            r = client.post("/v1/keys/auth-ec/sign", json=SIGN)
            assert r.status_code == 503, r.text
            problem = r.json()
            assert problem["code"] == "audit_unavailable"
            assert any(w in problem["detail"] for w in why), problem["detail"]
            assert "refused" in problem["detail"]
        r = client.post("/v1/keys/encrypt-rsa/decrypt", json=DECRYPT_JUNK)
        assert r.status_code == 503 and r.json()["code"] == "audit_unavailable", r.text
        # The service stays up and keeps answering what needs no audit entry.
        assert svc.process.poll() is None
        assert svc.http().get("/v1/health").status_code == 200
        assert client.get("/v1/keys").status_code == 200
    # Writable again: the next operation works without a restart, and the chain is whole.
    r = client.post("/v1/keys/auth-ec/sign", json=SIGN)
    assert r.status_code == 200, r.text
    assert "intact" in svc.cli("audit", "verify").stdout


def test_read_only_audit_file_refuses_private_key_operations(fresh_service) -> None:
    svc: Service = fresh_service()
    secret = svc.add_client("ro", "sign,decrypt")
    svc.http(secret).post("/v1/keys/auth-ec/sign", json=SIGN)  # WAL and SHM exist from here
    _check_refused_and_recovers(svc, secret, immutable(_state_files(svc)),
                                ("readonly", "read-only", "disk I/O", "unable to open", "not permitted"))


def test_full_disk_refuses_private_key_operations(fresh_service) -> None:
    svc: Service = fresh_service()
    secret = svc.add_client("full", "sign,decrypt")
    _check_refused_and_recovers(svc, secret, disk_full(svc.process.pid),
                                ("full", "disk I/O", "too large"))


def test_read_only_store_refuses_what_needs_it_with_a_clear_problem(fresh_service) -> None:
    """A client the service has not seen yet cannot be looked up in a store it may not touch: a 503
    that says why, not a crash; one already authenticated keeps its read-only calls."""
    svc: Service = fresh_service()
    known, newcomer = svc.add_client("known", "sign"), svc.add_client("newcomer", "sign")
    assert svc.http(known).get("/v1/keys").status_code == 200
    with immutable(_state_files(svc)):
        r = svc.http(newcomer).get("/v1/keys")
        assert r.status_code == 503, r.text
        assert r.json()["code"] == "store_unavailable" and "read-only" in r.json()["detail"]
        assert svc.http(known).get("/v1/keys").status_code == 200
        assert svc.process.poll() is None
    assert svc.http(newcomer).get("/v1/keys").status_code == 200
