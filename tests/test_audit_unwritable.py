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
import os
import shutil
import sqlite3
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
    if shutil.which("chattr") is None:
        pytest.skip("chattr (e2fsprogs) is not installed")
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


def _locks_on(path: Path) -> int:
    st = path.stat()  # /proc/locks names a file MAJOR:MINOR:INODE, the device numbers in hex
    where = f" {os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino} "
    return sum(1 for line in Path("/proc/locks").read_text().splitlines() if where in line)


def test_two_stores_in_one_process_keep_sqlite_locks(tmp_path: Path) -> None:
    """The guard's descriptor is shared: closing one store must not drop the locks SQLite holds for
    another (closing any descriptor of a file releases all of the process's POSIX locks on it)."""
    from tokenbridge.state.store import Store

    (tmp_path / "sub").mkdir()
    first, second = Store(tmp_path / "state.db"), Store(tmp_path / "sub" / ".." / "state.db")  # one file
    shm = tmp_path / "state.db-shm"
    held = _locks_on(shm)
    assert held >= 1  # SQLite's lock that says "a connection is using this WAL index"
    second.close()
    assert _locks_on(shm) == held
    assert first.query("SELECT COUNT(*) FROM audit")[0][0] == 0
    first.close()


def test_a_store_opened_on_a_read_only_disk_can_still_be_read(tmp_path: Path) -> None:
    """Only a file SQLite mapped writable can fault; a process that opens the store once it is read-only
    (``tokenbridge audit verify`` during the incident) maps it read-only and reads as before."""
    import sys

    from tokenbridge.state.store import Store

    store = Store(tmp_path / "state.db")  # keeps the -wal and -shm files while the other process reads
    store.execute("INSERT INTO audit (seq, ts, actor, event, outcome, prev_hash, hash) "
                  "VALUES (1, 't', 'a', 'e', 'ok', 'p', 'h')")
    files = [tmp_path / "state.db", tmp_path / "state.db-wal", tmp_path / "state.db-shm"]
    code = ("import sys; from pathlib import Path; from tokenbridge.state.store import Store; "
            "print(Store(Path(sys.argv[1])).query('SELECT COUNT(*) FROM audit')[0][0])")
    with immutable(files):
        r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "state.db")], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0 and r.stdout.strip() == "1", r.stderr
        with pytest.raises(sqlite3.OperationalError, match="read-only"):
            store.query("SELECT 1")  # this process mapped it writable: refused, not a SIGBUS
    store.close()


def test_store_errors_are_503_only_when_the_store_is_unusable(tmp_path: Path) -> None:
    """A locked or unwritable store is 503 ``store_unavailable`` (without SQL or paths); a database error
    that means a bug stays a 500."""
    import asyncio

    import httpx
    from fastapi import FastAPI

    from tokenbridge.api import problems
    from tokenbridge.state.store import StoreUnwritable

    app = FastAPI()
    problems.install(app)
    db = tmp_path / "x.db"

    @app.get("/locked")
    def locked() -> None:
        holder = sqlite3.connect(db, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        try:
            sqlite3.connect(db, timeout=0).execute("CREATE TABLE secret_table_name (x)")
        finally:
            holder.execute("ROLLBACK")

    @app.get("/unwritable")
    def unwritable() -> None:
        raise StoreUnwritable("state.db-shm is read-only (immutable: chattr +i)")

    @app.get("/bug")
    def bug() -> None:
        sqlite3.connect(":memory:").execute("SELECT * FROM no_such_table")

    def get(path: str) -> httpx.Response:
        async def call() -> httpx.Response:
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://tokenbridge") as client:
                return await client.get(path)
        return asyncio.run(call())

    r = get("/locked")
    assert r.status_code == 503 and r.json()["code"] == "store_unavailable", r.text
    assert "SQLITE_BUSY" in r.json()["detail"] and "secret_table_name" not in r.text and str(tmp_path) not in r.text
    r = get("/unwritable")
    assert r.status_code == 503 and "read-only" in r.json()["detail"]
    r = get("/bug")
    assert r.status_code == 500 and r.json()["code"] == "internal_error"


def test_cached_authentications_outlive_only_an_unwritable_store(tmp_path: Path, monkeypatch) -> None:
    """The registry keeps its cache when the store cannot be written (no revocation can be committed
    then), and only then: a locked or broken store must not keep a revoked secret working."""
    from tokenbridge.state.clients import ClientRegistry
    from tokenbridge.state.store import Store, StoreUnwritable

    store = Store(tmp_path / "state.db")
    registry = ClientRegistry(store)
    _, secret = registry.add("cached", ["sign"])
    assert registry.authenticate(secret) is not None

    def fails_with(error: sqlite3.Error):  # type: ignore[no-untyped-def]
        def query(sql: str, params: tuple[object, ...] = ()) -> list[sqlite3.Row]:
            raise error
        return query

    monkeypatch.setattr(store, "query", fails_with(StoreUnwritable("state.db-shm is read-only")))
    assert registry.authenticate(secret) is not None
    monkeypatch.setattr(store, "query", fails_with(sqlite3.OperationalError("database is locked")))
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        registry.authenticate(secret)
    store.close()


def test_a_store_that_fails_to_open_leaves_no_guard_behind(tmp_path: Path, monkeypatch) -> None:
    from tokenbridge.state.store import Store, _ShmGuard

    def broken(self: Store) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    with monkeypatch.context() as m:
        m.setattr(Store, "_install_triggers", broken)
        with pytest.raises(sqlite3.OperationalError):
            Store(tmp_path / "state.db")
    assert not [k for k in _ShmGuard._files if k.startswith(os.path.realpath(tmp_path))]
    Store(tmp_path / "state.db").close()
    assert not [k for k in _ShmGuard._files if k.startswith(os.path.realpath(tmp_path))]
