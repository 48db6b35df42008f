"""A PostgreSQL server of the tests' own (issue 18): Debian's package, a cluster made with ``initdb`` in a
temporary directory, started with ``pg_ctl`` on a free loopback port, never the system's cluster.

PostgreSQL refuses to run as root, and the tests run as root in CI: the cluster then belongs to the
``postgres`` account the package creates, and its commands run as that account.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import free_port


class PostgresMissing(RuntimeError):
    pass


def pg_bin() -> Path:
    """The newest installed server's programs (/usr/lib/postgresql/NN/bin)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise PostgresMissing("PostgreSQL is not installed: run `bash scripts/bootstrap.sh test` (it runs apt-get)")
    return Path(found[-1]).parent


@dataclass
class Postgres:
    port: int
    directory: Path
    user: str = "tokenbridge"
    database: str = "tokenbridge"

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{self.database}"

    def psql(self, sql: str) -> str:
        return _run([str(pg_bin() / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user,
                     "-d", self.database, "-XAtq", "-c", sql]).stdout


def _as_server_user() -> list[str]:
    """Commands run as ``postgres`` when we are root (initdb and the server refuse root)."""
    if os.geteuid() != 0:
        return []
    pwd.getpwnam("postgres")  # KeyError: the package's account is missing
    return ["runuser", "-u", "postgres", "--"]


def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)  # type: ignore[call-overload]
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@contextmanager
def running_postgres() -> Iterator[Postgres]:
    """A fresh cluster with a ``tokenbridge`` role (trust on loopback) and database; removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="tokenbridge-pg-"))  # not under pytest's 0700 root-only tree
    os.chmod(base, 0o755)
    data = base / "data"
    as_user = _as_server_user()
    if as_user:
        shutil.chown(base, "postgres", "postgres")
    bindir = pg_bin()
    _run([*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
          "--locale=C.UTF-8", "--no-sync"])
    port = free_port()
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {base} -c fsync=on -c max_connections=100"
    _run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(base / "server.log"), "-o", options,
          "-w", "-t", "60", "start"])
    server = Postgres(port, base)
    try:
        for sql in ("CREATE ROLE tokenbridge LOGIN CREATEDB", "CREATE DATABASE tokenbridge OWNER tokenbridge"):
            _run([str(bindir / "psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-XAtq", "-c", sql])
        yield server
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)
