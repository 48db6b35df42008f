"""Backup and restore of a hub: the state store, the bridge CA and TLS files, the configuration.

A backup is one ``.tar.gz`` (mode 0600) with a ``manifest.json`` first: versions,
date, host name, and the SHA-256 of every member. The SQLite databases are copied
with SQLite's online backup API, so a backup taken while the service runs is a
consistent snapshot (no torn page, no half-written audit entry). Secrets that
unlock something by themselves (the PIN, SMTP and IMAP passwords) are never
read: the manifest lists what was left out and why.

A restore checks everything before it replaces anything: the archive's hashes,
the database's integrity and its audit chain, that no service answers on the
target data directory, and that no file would be overwritten unless asked.
Each file is written beside its destination and renamed over it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import platform
import shutil
import socket
import sqlite3
import tarfile
import tempfile
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from tokenbridge import __version__
from tokenbridge.config import Settings
from tokenbridge.state.audit import AuditLog, AuditUnavailable, iter_entries, verify_chain
from tokenbridge.state.store import Store

FORMAT = "tokenbridge-backup"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DATABASES = ("state.db", "mail.db")  # in DATA_DIR; state.db is required, mail.db only once the gateway ran
RESTORED_CONFIG = "restored-config"  # under DATA_DIR: where the configuration is extracted without --config-to
_CHUNK = 1 << 20


class BackupError(Exception):
    """A backup or a restore was refused; the message says why, for the operator."""


@dataclass(frozen=True)
class Member:
    """One file in the archive, as the manifest describes it."""

    name: str  # path inside the archive
    kind: str  # database | tls | config | setup
    target: str  # database, tls: relative to DATA_DIR; config: file name; setup: relative to the config's folder
    source: str  # where it was read on the backed-up hub
    role: str  # what it is, in words
    mode: int
    size: int
    sha256: str
    sensitive: bool = False


@dataclass
class BackupReport:
    archive: Path
    members: list[Member]
    left_out: list[tuple[str, str]]  # (path or setting, why)
    missing: list[tuple[str, str]]  # (path, role): named by the configuration but absent
    audit_entries: int
    audit_ok: bool
    audit_problem: str | None


@dataclass
class RestoreReport:
    data_dir: Path
    written: list[tuple[Member, Path]]
    manifest: dict[str, Any]
    audit_entries: int
    config_path: Path | None  # where the configuration went
    notes: list[str] = field(default_factory=list)


# --- what goes in ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    kind: str
    target: str
    path: Path
    role: str
    sensitive: bool = False


def _left_out(settings: Settings) -> list[tuple[str, str]]:
    """Secrets that are never backed up: each one alone unlocks the card or a mailbox."""
    several = len(settings.token_tables) > 1
    named = [
        (table.pin_file, (f"the user PIN of token {name}" if several else "the token's user PIN")
         + ": never backed up; write it again after a restore")
        for name, table in settings.token_tables.items()
    ] + [
        (settings.smime.smtp.password_file, "the SMTP password: never backed up"),
        (settings.mail.imap.password_file, "the IMAP password: never backed up"),
        (settings.mail.imap.oauth2_token_file, "the IMAP OAuth2 token: never backed up"),
    ]
    out = [(str(path), why) for path, why in named if path is not None]
    out.append((str(settings.data_dir / "workstations"),
                "workstation credentials (.p12) already handed out; their passwords are not stored: re-enrol"))
    out.append((str(settings.server.admin_socket), "the admin socket: made by `tokenbridge serve`"))
    return out


def _setup_files(settings: Settings) -> Iterator[tuple[Path, str]]:
    """Files the configuration points to that are part of the set-up (certificates, CA bundles)."""
    for name, path in settings.recipients.items():
        yield path, f"address book [recipients] {name}"
    for path in settings.ca_files:
        yield path, "ca_files"
    for path in settings.smime.trust_anchors:
        yield path, "smime trust anchor"
    optional: list[tuple[Path | None, str]] = [(settings.smime.smtp.ca, "smime.smtp.ca"),
                                               (settings.mail.imap.ca, "mail.imap.ca")]
    for name, upstream in settings.upstreams.items():
        yield upstream.ca, f"upstreams.{name}.ca"
        if upstream.client_chain is not None:
            yield upstream.client_chain, f"upstreams.{name}.client_chain"
    tls = settings.data_dir / "tls"
    server = settings.server
    optional += [(p, role) for p, role in ((server.tls_cert, "server.tls_cert"), (server.tls_key, "server.tls_key"),
                                           (server.tls_client_ca, "server.tls_client_ca"))
                 if p is not None and p.parent != tls]  # the default ones are in the TLS set already
    for maybe, role in optional:
        if maybe is not None:
            yield maybe, role


def _config_relative(path: Path, settings: Settings) -> str:
    """Where a set-up file lies relative to the configuration's folder ('' when outside it)."""
    if settings.config_file is None:
        return ""
    try:
        return path.resolve().relative_to(settings.config_file.parent.resolve()).as_posix()
    except ValueError:
        return ""


def _sources(settings: Settings) -> tuple[list[_Source], list[tuple[str, str]]]:
    """Every file to back up (but the databases), and those the configuration names that are absent."""
    never = {Path(p).resolve() for p, _ in _left_out(settings)}
    out: list[_Source] = []
    missing: list[tuple[str, str]] = []
    tls = settings.data_dir / "tls"
    if tls.is_dir():
        for path in sorted(tls.iterdir()):
            if path.is_file() and not path.is_symlink():
                role = {"ca.key": "bridge CA private key: it can issue workstation certificates",
                        "server.key": "TLS server private key",
                        "hub.key": "this hub's key for mutual TLS with the other hubs (made again at each start)"
                        }.get(path.name, "bridge TLS file")
                out.append(_Source("tls", f"tls/{path.name}", path, role, path.suffix == ".key"))
    if settings.config_file is not None:
        out.append(_Source("config", settings.config_file.name, settings.config_file, "configuration file"))
    seen: set[Path] = set()
    for path, role in _setup_files(settings):
        real = path.resolve()
        if real in seen or real in never:
            continue
        seen.add(real)
        if not path.is_file():
            missing.append((str(path), role))
            continue
        out.append(_Source("setup", _config_relative(path, settings), path, role,
                           role.endswith("tls_key")))
    return out, missing


# --- snapshot and archive --------------------------------------------------------------------------------


def snapshot_database(source: Path, target: Path) -> None:
    """Copy a live SQLite database with the online backup API: consistent even while the service writes.

    The copy is turned into a single file (journal_mode=DELETE): nothing of it lives in a -wal file."""
    src = sqlite3.connect(f"{source.resolve().as_uri()}?mode=rw", uri=True, timeout=10.0)
    try:
        old = os.umask(0o077)
        try:
            dst = sqlite3.connect(target)
        finally:
            os.umask(old)
        try:
            src.backup(dst, pages=256, sleep=0.01)  # in steps: the service's writers are not held up for long
            dst.execute("PRAGMA journal_mode=DELETE")
        finally:
            dst.close()
    finally:
        src.close()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _open_readonly(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro&immutable=1", uri=True)
    db.row_factory = sqlite3.Row
    return db


def check_database(path: Path) -> tuple[bool, int, str | None]:
    """A database file's integrity and, for the state store, its audit chain: (ok, entries, problem)."""
    try:
        db = _open_readonly(path)
        try:
            result = db.execute("PRAGMA quick_check").fetchone()[0]
            if result != "ok":
                return False, 0, f"the database is damaged ({result})"
            if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'audit'").fetchone():
                return True, 0, None
            return verify_chain(iter_entries(lambda sql, params: db.execute(sql, params).fetchall()))
        finally:
            db.close()
    except sqlite3.Error as exc:
        return False, 0, f"not a readable SQLite database ({exc})"


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o600, int(time.time())
    return info


def _member(name: str, src: _Source, data_sha: str, size: int) -> Member:
    mode = 0o600 if src.sensitive or src.kind == "database" else src.path.stat().st_mode & 0o777
    return Member(name, src.kind, src.target, str(src.path), src.role, mode, size, data_sha, src.sensitive)


def _manifest(settings: Settings, members: list[Member], left_out: list[tuple[str, str]],
              audit: tuple[bool, int, str | None]) -> dict[str, Any]:
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "tokenbridge": __version__,
        "python": platform.python_version(), "sqlite": sqlite3.sqlite_version,
        "created": datetime.now(UTC).isoformat(timespec="seconds"), "hostname": socket.gethostname(),
        "data_dir": str(settings.data_dir),
        "config_file": str(settings.config_file) if settings.config_file else None,
        "audit": {"entries": audit[1], "chain_ok": audit[0], "problem": audit[2]},
        "members": [asdict(m) for m in members],
        "left_out": [{"path": p, "why": w} for p, w in left_out],
    }


def _open_new(path: Path, force: bool) -> Path:
    """A private temporary file beside ``path``, renamed over it once complete."""
    if path.exists() and not force:
        raise BackupError(f"{path} already exists (use --force to replace it)")
    if not path.parent.is_dir():
        raise BackupError(f"no such directory: {path.parent}")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o600)
    return Path(tmp)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        _fsync_file(path)


def backup(settings: Settings, archive: Path, *, force: bool = False) -> BackupReport:
    """Write a backup archive of this hub's data directory and set-up; return what went in and what not."""
    if settings.state.database_url:
        raise BackupError("the state (clients, audit, mail queue) is in PostgreSQL (state.database_url): back "
                          "it up with pg_dump, and each hub's data directory and configuration with your usual "
                          "tools (docs/deployment.md); `tokenbridge backup` is for a hub on SQLite")
    state = settings.data_dir / "state.db"
    if not state.is_file():
        raise BackupError(f"no state store at {state}: nothing to back up (is data_dir right?)")
    sources, missing = _sources(settings)
    left_out = _left_out(settings)
    tmp = _open_new(archive, force)
    try:
        with tempfile.TemporaryDirectory(prefix=".tokenbridge-backup-", dir=archive.parent) as staging:
            members, blobs, audit = _stage(settings, sources, Path(staging))
            with tarfile.open(tmp, "w:gz") as tar:
                data = json.dumps(_manifest(settings, members, left_out, audit), indent=2).encode()
                tar.addfile(_tarinfo(MANIFEST, len(data)), io.BytesIO(data))
                for member in members:
                    blob = blobs[member.name]
                    if isinstance(blob, Path):
                        with blob.open("rb") as f:
                            tar.addfile(_tarinfo(member.name, member.size), f)
                    else:
                        tar.addfile(_tarinfo(member.name, member.size), io.BytesIO(blob))
        _fsync_file(tmp)
        os.replace(tmp, archive)
        _fsync_dir(archive.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return BackupReport(archive, members, left_out, missing, audit[1], audit[0], audit[2])


def _stage(settings: Settings, sources: list[_Source],
           staging: Path) -> tuple[list[Member], dict[str, Path | bytes], tuple[bool, int, str | None]]:
    """Snapshot the databases into ``staging`` and read the other files once: hashed as archived."""
    members: list[Member] = []
    blobs: dict[str, Path | bytes] = {}
    audit: tuple[bool, int, str | None] = (True, 0, None)
    for name in DATABASES:
        live = settings.data_dir / name
        if not live.is_file():
            continue
        copy = staging / name
        try:
            snapshot_database(live, copy)
        except sqlite3.Error as exc:
            raise BackupError(f"cannot snapshot {live}: {exc}") from exc
        if name == "state.db":
            audit = check_database(copy)
        src = _Source("database", name, live, "state store (clients, audit, workstations)" if name == "state.db"
                      else "mail gateway queue and tracking")
        members.append(_member(f"data/{name}", src, _sha256_file(copy), copy.stat().st_size))
        blobs[f"data/{name}"] = copy
    for index, src in enumerate(sources):
        try:
            data = src.path.read_bytes()
        except OSError as exc:
            raise BackupError(f"cannot read {src.path} ({src.role}): {exc.strerror}") from exc
        name = {"tls": f"data/{src.target}", "config": f"config/{src.target}"}.get(
            src.kind, f"setup/{index}-{src.path.name}")
        members.append(_member(name, src, hashlib.sha256(data).hexdigest(), len(data)))
        blobs[name] = data
    return members, blobs, audit


# --- restore ---------------------------------------------------------------------------------------------


def service_answers(socket_path: Path) -> bool:
    """Whether a service listens on this admin socket (how `serve` itself tells a live one from a stale one)."""
    if not socket_path.exists() or not hasattr(socket, "AF_UNIX"):
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(2.0)
        probe.connect(str(socket_path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def _refuse_if_running(sockets: Iterable[Path], data_dir: Path) -> None:
    for path in sockets:
        if service_answers(path):
            raise BackupError(f"a tokenbridge service is running on {data_dir} (admin socket {path} answers): "
                              "stop it first (systemctl stop tokenbridge), then restore")


def _safe_relative(value: str, what: str) -> PurePosixPath:
    rel = PurePosixPath(value)
    if not value or rel.is_absolute() or ".." in rel.parts or value.startswith("~"):
        raise BackupError(f"the manifest names an unsafe path for {what}: {value!r}; refusing this archive")
    return rel


def _read_manifest(tar: tarfile.TarFile) -> tuple[dict[str, Any], list[Member]]:
    try:
        f = tar.extractfile(MANIFEST)
        manifest = json.loads(f.read()) if f is not None else None
    except KeyError:
        manifest = None
    except ValueError as exc:
        raise BackupError(f"the archive's manifest is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BackupError("not a tokenbridge backup (no manifest.json of the right format)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BackupError(f"backup format {manifest.get('format_version')} is not supported by this version "
                          f"(it reads format {FORMAT_VERSION})")
    try:
        members = [Member(**m) for m in manifest["members"]]
    except (KeyError, TypeError) as exc:
        raise BackupError(f"the archive's manifest is incomplete: {exc}") from exc
    return manifest, members


def _extract_checked(tar: tarfile.TarFile, members: list[Member], staging: Path) -> dict[str, Path]:
    """Every member into ``staging``, hashed on the way; refuses on any difference from the manifest."""
    listed = {m.name for m in members} | {MANIFEST}
    names = tar.getnames()
    extra = sorted(set(names) - listed)
    if extra or len(names) != len(set(names)):
        raise BackupError(f"the archive holds files its manifest does not list ({', '.join(extra) or 'twice'}):"
                          " refusing it")
    staged: dict[str, Path] = {}
    for index, member in enumerate(members):
        info = tar.getmember(member.name) if member.name in names else None
        if info is None or not info.isfile():
            raise BackupError(f"the archive lacks {member.name}, which its manifest lists: refusing it")
        src = tar.extractfile(info)
        assert src is not None
        path = staging / str(index)
        digest = hashlib.sha256()
        with src, path.open("wb") as out:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != member.sha256:
            raise BackupError(f"{member.name} in the archive does not match its SHA-256 in the manifest: the "
                              "archive was damaged or altered; nothing was restored")
        staged[member.name] = path
    return staged


def _destination(member: Member, data_dir: Path, config_to: Path | None) -> Path:
    """Where a member goes. The configuration never goes to its old path by itself: to --config-to, or
    extracted under DATA_DIR/restored-config (set-up files keep their place relative to it)."""
    if member.kind in ("database", "tls"):
        rel = _safe_relative(member.target, member.name)
        expected = str(rel) in DATABASES if member.kind == "database" else len(rel.parts) == 2 and rel.parts[0] == "tls"
        if not expected:
            raise BackupError(f"the manifest sends {member.name} to an unexpected place: refusing this archive")
        return data_dir / rel
    base = config_to.parent if config_to is not None else data_dir / RESTORED_CONFIG
    if member.kind == "config":
        _safe_relative(member.target, member.name)
        return config_to if config_to is not None else base / PurePosixPath(member.target).name
    if member.kind == "setup":
        if member.target:
            return base / _safe_relative(member.target, member.name)
        outside = PurePosixPath(member.source.lstrip("/"))
        return data_dir / RESTORED_CONFIG / "outside" / _safe_relative(str(outside), member.name)
    raise BackupError(f"the manifest lists {member.name} of an unknown kind {member.kind!r}: refusing it")


def _mode(member: Member) -> int:
    if member.sensitive or member.kind == "database" or member.target.endswith(".key"):
        return 0o600
    return member.mode & 0o644


def _place(staged: Path, dest: Path, mode: int) -> None:
    """Put one file in place atomically: renamed when on the same file system, else copied beside first."""
    dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(staged, mode)
    _fsync_file(staged)
    try:
        os.replace(staged, dest)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as out, staged.open("rb") as src:
                shutil.copyfileobj(src, out, _CHUNK)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, mode)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    _fsync_dir(dest.parent)


def _open_archive(archive: Path) -> tarfile.TarFile:
    if not archive.is_file():
        raise BackupError(f"no such backup: {archive}")
    try:
        return tarfile.open(archive, "r:gz")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise BackupError(f"{archive} is not a readable .tar.gz backup: {exc}") from exc


def restore(archive: Path, data_dir: Path, *, sockets: Iterable[Path], force: bool = False,
            config_to: Path | None = None) -> RestoreReport:
    """Check the whole archive, then put its files in place; refuse before touching anything on any doubt."""
    sockets = list(sockets)
    _refuse_if_running(sockets, data_dir)
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with _open_archive(archive) as tar, \
            tempfile.TemporaryDirectory(prefix=".tokenbridge-restore-", dir=data_dir) as tmp:
        try:
            manifest, members = _read_manifest(tar)
            staged = _extract_checked(tar, members, Path(tmp))
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EACCES, errno.EROFS):
                raise BackupError(f"cannot stage the restore in {data_dir}: {exc.strerror}") from exc
            raise BackupError(f"the archive is damaged: {exc}") from exc
        entries = _check_staged_databases(members, staged)
        plan = [(m, _destination(m, data_dir, config_to)) for m in members]
        taken = [str(dest) for _, dest in plan if dest.exists()]
        if taken and not force:
            raise BackupError("these files exist and would be replaced (use --force to replace them): "
                              + ", ".join(taken))
        _refuse_if_running(sockets, data_dir)  # again, just before the first file is replaced
        for member, dest in plan:
            if member.kind == "database":
                for side in ("-wal", "-shm", "-journal"):  # an old WAL must not be replayed into the new file
                    dest.with_name(dest.name + side).unlink(missing_ok=True)
            _place(staged[member.name], dest, _mode(member))
    config_path = next((dest for m, dest in plan if m.kind == "config"), None)
    report = RestoreReport(data_dir, plan, manifest, entries, config_path)
    _record_restore(data_dir, archive, manifest, report)
    return report


def _check_staged_databases(members: list[Member], staged: dict[str, Path]) -> int:
    """Integrity of every database and the audit chain of the state store, before anything is replaced."""
    entries = 0
    if not any(m.kind == "database" and m.target == "state.db" for m in members):
        raise BackupError("the archive holds no state.db: refusing it")
    for member in members:
        if member.kind != "database":
            continue
        ok, count, problem = check_database(staged[member.name])
        if not ok:
            what = "audit chain" if member.target == "state.db" and "damaged" not in (problem or "") else "database"
            raise BackupError(f"the backed-up {member.target} fails its {what} check: {problem}; nothing was "
                              "restored")
        if member.target == "state.db":
            entries = count
    return entries


def _record_restore(data_dir: Path, archive: Path, manifest: dict[str, Any], report: RestoreReport) -> None:
    """The restore itself goes into the restored audit log, after the backed-up entries."""
    try:
        store = Store(data_dir / "state.db")
    except sqlite3.Error as exc:
        report.notes.append(f"the restore could not be recorded in the audit log: {exc}")
        return
    try:
        AuditLog(store).record("operator", "restore", "done",
                               detail=f"from {archive.name} (created {manifest.get('created')} on "
                                      f"{manifest.get('hostname')}, {report.audit_entries} audit entries)")
    except AuditUnavailable as exc:
        report.notes.append(f"the restore could not be recorded in the audit log: {exc}")
    finally:
        store.close()
