"""Real mail peers for the mail gateway's tests and benchmarks: Postfix, Dovecot, swaks and an SMTP sink.

Each peer runs from the Debian packages (``postfix``, ``dovecot-imapd``, ``swaks``), with a configuration
of its own in a temporary directory, on free loopback ports; the system's instances are neither configured
nor used (they need not run at all). The classes are plain (usable from ``bench/``); pytest is imported only
by :func:`skip_unless_available`.

- :class:`Dovecot`: the organisation's IMAP mailbox. Users (full addresses) and their plain passwords in a
  passwd-file, Maildirs under the directory, IMAP with STARTTLS and optionally IMAPS, an auth socket that
  Postfix uses for SMTP AUTH. Foreground ``dovecot -F``, a child of this process. Optionally OAuth2 bearers
  too (SASL XOAUTH2 and OAUTHBEARER, as Microsoft 365), checked by an :class:`OAuth2Introspection` endpoint.
- :class:`Postfix`: the organisation's mail server and smarthost. Mail for the local domains goes into the
  Dovecot Maildirs (Postfix's ``virtual`` delivery agent); mail for a routed domain (``national.example``)
  goes to a next hop set by :meth:`Postfix.set_route` (``transport_maps``). Ports: ``smtp_port`` (the
  server's port 25: local and routed domains from anyone), ``submission_port`` (port 587:
  STARTTLS and AUTH required) and ``smtps_port`` (port 465: implicit TLS and AUTH), the last two only with
  TLS. ``postfix -c DIR start`` / ``stop``.
- :class:`MailPeers`: both, sharing one test PKI (:class:`TlsFiles`), started and stopped together.
- :class:`SmtpSink`: an aiosmtpd server that records what it receives (a next hop, the national system).
- :func:`send_smtp` (smtplib) and :func:`swaks`: two independent SMTP clients.

Every wait is bounded; failures raise :class:`PeerError` (an ``AssertionError``) with the logs' last lines.
Set ``MAILPEERS_KEEP=1`` to keep the directories after a stop.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import ipaddress
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage, Message
from email.utils import make_msgid
from pathlib import Path
from typing import Any, Protocol

ORG_DOMAIN = "org.example"
NATIONAL_DOMAIN = "national.example"
LOCALHOST = "127.0.0.1"
BINARIES = ("postfix", "dovecot", "swaks")
SBIN = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")


class PeerError(AssertionError):
    """A peer did not start, stop or answer in time. The message carries the logs."""


def which(name: str) -> str | None:
    """The path of a binary, also looking in the sbin directories a non-login PATH may lack."""
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))


def missing_binaries() -> list[str]:
    """Which of postfix, dovecot and swaks are not installed (bootstrap.sh installs them)."""
    return [b for b in BINARIES if which(b) is None]


def skip_unless_available() -> None:
    """In a test: skip, with the reason, if a mail peer's binary is missing."""
    missing = missing_binaries()
    if missing:
        import pytest

        pytest.skip(f"mail peers not installed ({', '.join(missing)}): run `bash scripts/bootstrap.sh install`")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        return int(s.getsockname()[1])


def tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(text.splitlines()[-lines:])


class _HasLog(Protocol):
    def log(self, lines: int = 60) -> str: ...


def _logs(peers: Iterable[_HasLog], lines: int = 60) -> str:
    return "\n".join(p.log(lines) for p in peers)


# --- processes ----------------------------------------------------------------------------------------------------

def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, pgrp, session, ...), or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return raw[raw.rfind(")") + 2:].split()


def _alive(pid: int) -> bool:
    """Whether a process runs (a zombie does not: reap it if it is ours, e.g. when pytest is PID 1)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def _session_members(sid: int) -> list[int]:
    """The live processes of a session (a daemon's master and every child it started)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat is not None and stat[3] == str(sid) and stat[0] not in ("Z", "X"):
                pids.append(int(entry.name))
    return pids


def _wait_gone(pids: Iterable[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    pending = list(pids)
    while pending and time.monotonic() < deadline:
        pending = [p for p in pending if _alive(p)]
        if pending:
            time.sleep(0.05)
    return not pending


def _kill_session(sid: int) -> None:
    """SIGKILL what is left of a session, and wait (bounded) until it is gone."""
    for _ in range(3):
        members = _session_members(sid)
        if not members:
            return
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _wait_gone(members, 5)


def _run(cmd: Sequence[str], timeout: float = 60, env: dict[str, str] | None = None,
         input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(list(cmd), capture_output=True, timeout=timeout, env=env, input=input)
    except subprocess.TimeoutExpired as e:
        raise PeerError(f"{' '.join(cmd)}: no answer after {timeout} s") from e
    return subprocess.CompletedProcess(result.args, result.returncode, result.stdout.decode(errors="replace"),
                                       result.stderr.decode(errors="replace"))


def _wait_banner(port: int, prefix: bytes, timeout: float, alive: Callable[[], bool], tls: bool = False) -> None:
    """Wait until a server on 127.0.0.1:port greets with prefix (bounded; stops early if the server died)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if not alive():
            raise PeerError(f"the server for port {port} exited while starting")
        try:
            with socket.create_connection((LOCALHOST, port), timeout=2) as raw:
                sock: socket.socket = raw
                if tls:
                    ctx = ssl.create_default_context()
                    ctx.check_hostname = False
                    ctx.verify_mode = ssl.CERT_NONE
                    sock = ctx.wrap_socket(raw)
                data = b""
                while not data.endswith(b"\n"):
                    chunk = sock.recv(512)
                    if not chunk:
                        break
                    data += chunk
                if data.startswith(prefix):
                    return
                last = data
        except OSError as e:
            last = e
        time.sleep(0.1)
    raise PeerError(f"no {prefix!r} greeting on port {port} after {timeout} s (last: {last!r})")


_RUNNING: weakref.WeakSet[Any] = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:
    """Stop peers a crashed test left running, so that no daemon outlives the Python process."""
    for peer in list(_RUNNING):
        with contextlib.suppress(Exception):
            peer.stop()


def _make_root(root: Path | None, name: str) -> tuple[Path, bool]:
    """A directory the peers' unprivileged users can traverse (pytest's tmp_path cannot: it is 0700)."""
    own = root is None
    root = Path(tempfile.mkdtemp(prefix=f"mailpeers-{name}-", dir="/tmp") if root is None else root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    for parent in root.parents:
        if not parent.stat().st_mode & 0o001:
            raise PeerError(f"{parent} is not traversable by other users (mode {parent.stat().st_mode & 0o7777:o}, "
                            f"an installed system has 755): the postfix, dovecot and mail users cannot reach "
                            f"{root}" + ("; a Debian root unpacked from a 0700 directory needs `chmod 755` on it"
                                         if parent == Path("/") else "; pass no directory to use one under /tmp"))
    return root, own


# --- TLS ------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TlsFiles:
    """A server certificate and key (PEM) and the CA that issued it (what clients trust)."""

    cert: Path
    key: Path
    ca: Path

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts this CA and checks the name (the certificate names 127.0.0.1)."""
        return ssl.create_default_context(cafile=str(self.ca))


def make_tls(directory: Path, hostname: str = f"mail.{ORG_DOMAIN}", names: Sequence[str] = ()) -> TlsFiles:
    """A throw-away CA and a server certificate for hostname, localhost, 127.0.0.1 and names."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mailpeers test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    dns = [x509.DNSName(n) for n in dict.fromkeys([hostname, "localhost", *names])]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([*dns, x509.IPAddress(ipaddress.ip_address(LOCALHOST))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    files = TlsFiles(directory / "server.pem", directory / "server.key", directory / "ca.pem")
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    files.key.chmod(0o600)  # read by the daemons' masters, as root
    return files


# --- OAuth2 ---------------------------------------------------------------------------------------------------------

INTROSPECTION_MODES = ("post", "get", "auth")


@dataclass(frozen=True)
class Introspected:
    """One question Dovecot asked the introspection endpoint, and the answer it got."""

    token: str
    active: bool
    username: str | None
    method: str


class OAuth2Introspection:
    """An OAuth2 token introspection endpoint (RFC 7662) on 127.0.0.1: the identity provider Dovecot asks.

    It answers ``{"active": true, "username": ADDRESS}`` for a token it issued and has not revoked, and
    ``{"active": false}`` for any other. ``mode`` is how Dovecot hands it the token (Dovecot's
    ``introspection_mode``): ``post`` (a form field ``token``), ``get`` (``?token=`` in the URL) or ``auth``
    (an ``Authorization: Bearer`` header); all three are understood whatever the mode. ``introspected`` lists
    every question asked, in order. http.server in a daemon thread; :meth:`start` picks a free port.
    """

    def __init__(self, mode: str = "post") -> None:
        if mode not in INTROSPECTION_MODES:
            raise ValueError(f"mode must be one of {INTROSPECTION_MODES}")
        self.mode = mode
        self.port = 0
        self.introspected: list[Introspected] = []
        self._tokens: dict[str, str] = {}  # token -> address
        self._lock = threading.Lock()
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """What Dovecot is given as ``introspection_url`` (in ``get`` mode it appends the token to it)."""
        return f"http://{LOCALHOST}:{self.port}/introspect" + ("?token=" if self.mode == "get" else "")

    @property
    def running(self) -> bool:
        return self._server is not None

    # tokens

    def issue(self, address: str, token: str | None = None, *, length: int = 48) -> str:
        """A new token valid for address (the address's other tokens stay valid); returns it.
        ``length`` is in random bytes: Microsoft 365's tokens are JWTs of 1.5 to 2.5 KB."""
        token = token or secrets.token_urlsafe(length)
        with self._lock:
            self._tokens[token] = address
        return token

    def rotate(self, address: str, *, length: int = 48) -> str:
        """Revoke every token of address and issue a new one (what a token refresh amounts to)."""
        with self._lock:
            for token in [t for t, a in self._tokens.items() if a == address]:
                del self._tokens[token]
        return self.issue(address, length=length)

    def revoke(self, token: str) -> None:
        with self._lock:
            self._tokens.pop(token, None)

    def valid(self, token: str) -> str | None:
        """The address a token is valid for, or None."""
        with self._lock:
            return self._tokens.get(token)

    def asked(self, token: str, active: bool | None = None) -> int:
        """How many times Dovecot asked about token (and got that answer, when active is given)."""
        with self._lock:
            return sum(1 for q in self.introspected if q.token == token and active in (None, q.active))

    # life cycle

    def start(self) -> OAuth2Introspection:
        """Serve on a free loopback port (a second call while running does nothing)."""
        if self._server is not None:
            return self
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import parse_qs, urlsplit

        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, token: str | None) -> None:
                address = endpoint.valid(token) if token else None
                with endpoint._lock:
                    endpoint.introspected.append(Introspected(token or "", address is not None, address,
                                                              self.command))
                body = json.dumps({"active": True, "username": address} if address else {"active": False})
                data = body.encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _token(self, form: str) -> str | None:
                header = self.headers.get("Authorization", "")
                if header.lower().startswith("bearer "):
                    return header[7:].strip()
                values = parse_qs(form, keep_blank_values=True).get("token")
                return values[0] if values else None

            def do_GET(self) -> None:
                self._answer(self._token(urlsplit(self.path).query))

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                form = self.rfile.read(length).decode("utf-8", "replace") if length else ""
                self._answer(self._token(form))

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the questions are in `introspected`

        server = ThreadingHTTPServer((LOCALHOST, 0), Handler)
        server.daemon_threads = True
        self._server = server
        self.port = int(server.server_address[1])
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="oauth2-introspection", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> OAuth2Introspection:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self, lines: int = 20) -> str:
        with self._lock:
            last = self.introspected[-lines:]
        text = "\n".join(f"{q.method} token={q.token[:8]}... -> "
                         f"{'active, ' + str(q.username) if q.active else 'inactive'}" for q in last)
        return f"---- OAuth2 introspection ({self.url}, last {lines} questions) ----\n{text or '(none)'}"


# --- Dovecot --------------------------------------------------------------------------------------------------------

def _mail_ids() -> tuple[int, int]:
    """The uid and gid mail is stored under: Debian's `mail` user (uid 8), present on every system."""
    entry = pwd.getpwnam("mail")
    return entry.pw_uid, entry.pw_gid


def _dovecot_version() -> tuple[int, int]:
    out = _run([which("dovecot") or "dovecot", "--version"], timeout=20).stdout
    m = re.match(r"(\d+)\.(\d+)", out.strip())
    if not m:
        raise PeerError(f"cannot read Dovecot's version from {out!r}")
    return int(m.group(1)), int(m.group(2))


class Dovecot:
    """Dovecot as the organisation's IMAP server, on 127.0.0.1.

    Users log in with their full address and a plain password (``password(address)``). Mail is in
    ``maildir(address)``; folders use ``/`` as separator. ``imap_port`` speaks plain IMAP with STARTTLS
    (when TLS is set), ``imaps_port`` implicit TLS (None without TLS or with ``imaps=False``).
    ``auth_socket`` is the SASL socket Postfix authenticates its submission clients with.

    With ``oauth2`` (an introspection mode: ``"post"``, ``"get"`` or ``"auth"``), users may also log in with
    an OAuth2 bearer, by SASL XOAUTH2 or OAUTHBEARER (``imap(address, bearer=...)``): Dovecot checks it with
    ``introspection``, an :class:`OAuth2Introspection` endpoint this Dovecot starts and stops with itself
    (``introspection.issue(address)`` gives a valid token). Passwords keep working for PLAIN and LOGIN
    (Dovecot 2.3: two passdbs, passwd-file for PLAIN/LOGIN and oauth2 for the bearer mechanisms; 2.4: the
    bearer mechanisms use the global ``oauth2_*`` settings, not a passdb).
    """

    def __init__(self, root: Path | None = None, *, users: Iterable[str] = (f"alice@{ORG_DOMAIN}",),
                 tls: TlsFiles | None = None, imaps: bool = True, hostname: str = f"mail.{ORG_DOMAIN}",
                 oauth2: str | None = None) -> None:
        self.root, self._own_root = _make_root(root, "dovecot")
        self.dir = self.root / "dovecot"
        self.tls = tls
        self.hostname = hostname
        self.want_imaps = imaps and tls is not None
        self.passwd_file = self.dir / "users"
        self.config_file = self.dir / "dovecot.conf"
        self.log_file = self.dir / "dovecot.log"
        self.stderr_file = self.dir / "dovecot.stderr"
        self.mail_root = self.root / "mail"
        self.base_dir = self.dir / "run"
        self.auth_socket = self.base_dir / "auth-postfix"
        self.oauth2_file = self.dir / "oauth2.conf.ext"  # Dovecot 2.3's oauth2 passdb settings
        self.introspection = OAuth2Introspection(oauth2) if oauth2 is not None else None
        self.imap_port = 0
        self.imaps_port: int | None = None
        self.users: dict[str, str] = {}
        self.related: list[_HasLog] = []  # peers whose logs go into this one's errors (Postfix adds itself)
        self.process: subprocess.Popen[bytes] | None = None
        self.sessions: list[int] = []  # the process sessions started (see leftovers())
        self.uid, self.gid = _mail_ids()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.mail_root.mkdir(parents=True, exist_ok=True)
        os.chown(self.mail_root, self.uid, self.gid)
        for user in users:
            self.add_user(user)

    # users and files

    def add_user(self, address: str, password: str | None = None) -> str:
        """Add (or change) a user; returns the password. Dovecot rereads the file by itself; Postfix needs
        ``Postfix.reload()`` (``MailPeers.add_user`` does both)."""
        address = address if "@" in address else f"{address}@{ORG_DOMAIN}"
        password = password or secrets.token_urlsafe(12)
        if ":" in password or "\n" in password:
            raise ValueError("a passwd-file password cannot contain ':' or a newline")
        self.users[address] = password
        self._write_passwd()
        return password

    def password(self, address: str) -> str:
        return self.users[address]

    @property
    def domains(self) -> list[str]:
        return sorted({a.split("@", 1)[1] for a in self.users})

    def home(self, address: str) -> Path:
        local, domain = address.split("@", 1)
        return self.mail_root / domain / local

    def maildir(self, address: str) -> Path:
        """The user's Maildir (Postfix's virtual delivery writes into its new/)."""
        return self.home(address) / "Maildir"

    def _write_passwd(self) -> None:
        lines = [f"{a}:{{PLAIN}}{p}:{self.uid}:{self.gid}::{self.home(a)}::" for a, p in self.users.items()]
        tmp = self.passwd_file.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.chmod(0o644)  # read by Dovecot's auth process (user dovecot); test passwords only
        tmp.replace(self.passwd_file)
        for address in self.users:  # Postfix's virtual agent creates the Maildir; the home must be the user's
            home = self.home(address)
            for d in (home.parent, home):
                if not d.exists():
                    d.mkdir()
                    os.chown(d, self.uid, self.gid)

    def _config(self) -> str:
        major, minor = _dovecot_version()
        v24 = (major, minor) >= (2, 4)
        imaps = f"""  inet_listener imaps {{
    port = {self.imaps_port or 0}
    ssl = yes
  }}"""
        services = f"""service imap-login {{
  inet_listener imap {{
    port = {self.imap_port}
  }}
{imaps}
}}
service auth {{
  unix_listener auth-postfix {{
    mode = 0666
  }}
}}
namespace inbox {{
  inbox = yes
  separator = /
}}
"""
        common = f"""base_dir = {self.base_dir}
state_dir = {self.dir / "state"}
instance_name = {self.root.name}
log_path = {self.log_file}
info_log_path = {self.log_file}
listen = {LOCALHOST}
protocols = imap
hostname = {self.hostname}
first_valid_uid = {self.uid}
last_valid_uid = {self.uid}
first_valid_gid = {self.gid}
auth_mechanisms = plain login{" xoauth2 oauthbearer" if self.introspection else ""}
default_internal_user = dovecot
default_login_user = dovenull
"""
        if self.introspection:
            common += "auth_verbose = yes\n"  # a refused token: why, in the log
        oauth2 = self._oauth2_settings(v24)
        if v24:
            tls = (f"ssl = yes\nssl_server_cert_file = {self.tls.cert}\nssl_server_key_file = {self.tls.key}\n"
                   if self.tls else "ssl = no\n")
            # written in 2.4.0's syntax, which later versions read as such
            return f"""dovecot_config_version = 2.4.0
dovecot_storage_version = 2.4.0
{common}{tls}auth_allow_cleartext = yes
mail_driver = maildir
mail_path = ~/Maildir
passdb passwd-file {{
  passwd_file_path = {self.passwd_file}
}}
userdb passwd-file {{
  passwd_file_path = {self.passwd_file}
}}
{oauth2}{services}"""
        tls = (f"ssl = yes\nssl_cert = <{self.tls.cert}\nssl_key = <{self.tls.key}\n"
               if self.tls else "ssl = no\n")
        passwd_mechanisms = "  mechanisms = plain login\n" if self.introspection else ""
        return f"""{common}{tls}disable_plaintext_auth = no
mail_location = maildir:~/Maildir
passdb {{
  driver = passwd-file
  args = {self.passwd_file}
{passwd_mechanisms}}}
{oauth2}userdb {{
  driver = passwd-file
  args = {self.passwd_file}
}}
{services}"""

    def _oauth2_settings(self, v24: bool) -> str:
        """The bearer check: the introspection endpoint, the user a token is for, whether it is active."""
        intro = self.introspection
        if intro is None:
            return ""
        settings = {"introspection_mode": intro.mode, "introspection_url": intro.url,
                    "username_attribute": "username", "active_attribute": "active", "active_value": "true"}
        if v24:  # global settings, read by the XOAUTH2 and OAUTHBEARER mechanisms themselves
            return "".join(f"oauth2_{k} = {v}\n" for k, v in settings.items())
        settings["timeout_msecs"] = "10000"
        self.oauth2_file.write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        self.oauth2_file.chmod(0o644)  # read by the auth process
        return f"""passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {self.oauth2_file}
}}
"""

    # life cycle

    def start(self, timeout: float = 30) -> Dovecot:
        if self.introspection is not None:
            self.introspection.start()  # its URL goes into the configuration
        last: PeerError | None = None
        for _ in range(3):  # a port taken between free_port() and the bind: try new ports
            self.imap_port = free_port()
            self.imaps_port = free_port() if self.want_imaps else None
            self.config_file.write_text(self._config())
            try:
                self._start(timeout)
                return self
            except PeerError as e:
                self.stop(remove=False)
                last = e
                if "in use" not in str(e):
                    break
        assert last is not None
        raise last

    def _start(self, timeout: float) -> None:
        check = _run([which("doveconf") or "doveconf", "-c", str(self.config_file), "-n"], timeout=30)
        if check.returncode != 0:
            raise PeerError(f"doveconf rejects {self.config_file}:\n{check.stderr}\n{self._config()}")
        with self.stderr_file.open("ab") as err:
            self.process = subprocess.Popen([which("dovecot") or "dovecot", "-F", "-c", str(self.config_file)],
                                            stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        _RUNNING.add(self)
        self.sessions.append(self.process.pid)
        proc = self.process
        try:
            _wait_banner(self.imap_port, b"* OK", timeout, lambda: proc.poll() is None)
            if self.imaps_port:
                _wait_banner(self.imaps_port, b"* OK", timeout, lambda: proc.poll() is None, tls=True)
            deadline = time.monotonic() + timeout
            while not self.auth_socket.exists():
                if time.monotonic() > deadline:
                    raise PeerError(f"no auth socket {self.auth_socket} after {timeout} s")
                time.sleep(0.05)
        except PeerError as e:
            raise PeerError(f"Dovecot did not start: {e}\n{self.log()}") from None

    def stop(self, remove: bool = True) -> None:
        """Stop Dovecot and every process it started (bounded); remove the directory unless MAILPEERS_KEEP."""
        proc, self.process = self.process, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
            _kill_session(proc.pid)
        if self.introspection is not None:
            self.introspection.stop()
        _RUNNING.discard(self)
        if remove and self._own_root and not os.environ.get("MAILPEERS_KEEP"):
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Dovecot:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def leftovers(self) -> list[int]:
        """Processes still alive from any start (after stop(): none)."""
        return [pid for sid in self.sessions for pid in _session_members(sid)]

    def log(self, lines: int = 60) -> str:
        text = f"---- Dovecot log ({self.log_file}, last {lines} lines) ----\n{tail(self.log_file, lines)}"
        if self.stderr_file.exists() and self.stderr_file.stat().st_size:
            text += f"\n---- Dovecot stderr ----\n{tail(self.stderr_file, lines)}"
        if self.introspection is not None:
            text += "\n" + self.introspection.log()
        return text

    def _error(self, message: str) -> PeerError:
        return PeerError(f"{message}\n{_logs([*self.related, self])}")

    # IMAP

    def imap(self, address: str, *, security: str = "starttls", timeout: float = 30, bearer: str | None = None,
             mechanism: str = "XOAUTH2") -> Any:
        """A logged-in IMAPClient (use it in a ``with``). security: "starttls", "imaps" or "plain".
        With bearer: logged in with that OAuth2 token by ``mechanism`` (XOAUTH2 or OAUTHBEARER), not the password."""
        import imapclient

        ctx = self.tls.client_context() if self.tls else None
        if security == "imaps":
            if not self.imaps_port:
                raise ValueError("this Dovecot has no IMAPS port")
            client = imapclient.IMAPClient(LOCALHOST, port=self.imaps_port, ssl=True, ssl_context=ctx,
                                           timeout=timeout)
        else:
            client = imapclient.IMAPClient(LOCALHOST, port=self.imap_port, ssl=False, timeout=timeout)
            if security == "starttls":
                if ctx is None:
                    raise ValueError("this Dovecot has no TLS")
                client.starttls(ctx)
            elif security != "plain":
                raise ValueError(f"unknown security {security!r}")
        try:
            if bearer is None:
                client.login(address, self.users[address])
            elif mechanism.upper() == "OAUTHBEARER":
                client.oauthbearer_login(address, bearer)
            else:
                client.oauth2_login(address, bearer, mech=mechanism.upper())
        except BaseException:
            with contextlib.suppress(Exception):
                client.shutdown()
            raise
        return client

    def kick(self, address: str) -> None:
        """End the user's IMAP sessions (``doveadm kick``): their clients must connect and log in again."""
        result = _run([which("doveadm") or "doveadm", "-c", str(self.config_file), "kick", address], timeout=30)
        if result.returncode not in (0, 68):  # 68 (EX_NOUSER): nobody was logged in
            raise self._error(f"doveadm kick {address} failed ({result.returncode}):\n{result.stdout}{result.stderr}")

    def folders(self, address: str) -> list[str]:
        with self.imap(address) as c:
            return sorted(str(name) for _flags, _sep, name in c.list_folders())

    def create_folder(self, address: str, name: str) -> None:
        with self.imap(address) as c:
            if not c.folder_exists(name):
                c.create_folder(name)

    def append(self, address: str, message: bytes | Message, folder: str = "INBOX",
               flags: Sequence[str] = ()) -> None:
        """Put a message into a folder over IMAP (as if it had arrived there)."""
        data = message if isinstance(message, bytes) else message.as_bytes()
        with self.imap(address) as c:
            c.append(folder, data, flags=tuple(flags))

    def fetch_all(self, address: str, folder: str = "INBOX") -> list[bytes]:
        """Every message of a folder, as bytes, in UID order (BODY.PEEK: nothing is marked seen)."""
        with self.imap(address) as c:
            c.select_folder(folder, readonly=True)
            uids = sorted(c.search("ALL"))
            if not uids:
                return []
            data = c.fetch(uids, ["BODY.PEEK[]"])
            return [bytes(data[uid][b"BODY[]"]) for uid in uids]

    def wait_for_messages(self, address: str, count: int, folder: str = "INBOX",
                          timeout: float = 30) -> list[bytes]:
        """Poll (bounded) until the folder holds at least count messages; returns them all."""
        deadline = time.monotonic() + timeout
        got: list[bytes] = []
        while True:
            with contextlib.suppress(Exception):
                got = self.fetch_all(address, folder)
            if len(got) >= count:
                return got
            if time.monotonic() > deadline:
                raise self._error(f"{address}/{folder}: {len(got)} message(s) after {timeout} s, expected {count}")
            time.sleep(0.2)


# --- Postfix --------------------------------------------------------------------------------------------------------

_TRANSPORTS = {"may": "smtp", "starttls": "smtp-starttls", "implicit": "smtp-implicit"}


class Postfix:
    """Postfix as the organisation's mail server and smarthost, on 127.0.0.1.

    Mail for ``domains`` (default: Dovecot's users' domains) goes into ``dovecot``'s Maildirs; mail for a routed
    domain goes to its next hop: ``routes={"national.example": ("127.0.0.1", 2525)}``, or :meth:`set_route`
    while running; mail for any other domain is refused at RCPT ("no route"). ``smtp_port`` (port 25) takes
    mail for the local and routed domains from anyone, no AUTH. ``submission_port`` (STARTTLS then AUTH, both
    required) and ``smtps_port`` (implicit TLS, AUTH), only with ``tls``: AUTH against Dovecot's users, for the
    gateway as an authenticated smarthost client and for counters. ``mynetworks`` (default 127.0.0.0/8) relay
    without AUTH to domains that are neither local nor routed, which only a ``relayhost`` or
    ``default_transport`` in ``main_cf`` (adds or overrides main.cf parameters) makes deliverable. Deferred
    mail is retried every few seconds unless ``fast_retry=False``.
    """

    def __init__(self, root: Path | None = None, *, dovecot: Dovecot | None = None,
                 domains: Sequence[str] | None = None,
                 routes: dict[str, tuple[str, int]] | None = None, tls: TlsFiles | None = None,
                 client_tls: TlsFiles | None = None, hostname: str = f"mail.{ORG_DOMAIN}",
                 mynetworks: str = "127.0.0.0/8", message_size_limit: int = 64 * 1024 * 1024,
                 fast_retry: bool = True, main_cf: dict[str, str] | None = None) -> None:
        self.root, self._own_root = _make_root(root if root is not None else (dovecot.root if dovecot else None),
                                               "postfix")
        if dovecot is not None and self.root == dovecot.root:
            self._own_root = False  # Dovecot owns (and removes) the shared directory
        self.dir = self.root / "postfix"
        self.config_dir = self.dir / "etc"
        self.queue_dir = self.dir / "spool"
        self.data_dir = self.dir / "data"
        self.log_file = self.dir / "postfix.log"
        self.commands_file = self.dir / "commands.log"
        self.dovecot = dovecot
        self._domains = list(domains) if domains is not None else None
        self.routes: dict[str, tuple[str, int, str]] = {d: (h, p, "may") for d, (h, p) in (routes or {}).items()}
        self.tls = tls
        self.client_tls = client_tls
        self.hostname = hostname
        self.mynetworks = mynetworks
        self.message_size_limit = message_size_limit
        self.fast_retry = fast_retry
        self.main_cf = dict(main_cf or {})
        self.smtp_port = 0
        self.submission_port: int | None = None
        self.smtps_port: int | None = None
        self.running = False
        self.master_pid: int | None = None
        self.sessions: list[int] = []  # the process sessions started (see leftovers())
        self.config_dir.mkdir(parents=True, exist_ok=True)
        if dovecot is not None:
            dovecot.related.append(self)

    @property
    def domains(self) -> list[str]:
        """The local domains: as given, else those of Dovecot's users (also the ones added later)."""
        if self._domains is not None:
            return self._domains
        return self.dovecot.domains if self.dovecot else [ORG_DOMAIN]

    # configuration

    def _main_cf(self) -> str:
        p: dict[str, str] = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "myhostname": self.hostname,
            "mydomain": self.domains[0] if self.domains else ORG_DOMAIN,
            "myorigin": "$mydomain",
            "mydestination": "",
            "local_transport": "error:5.1.1 no local delivery on this test server",
            "mynetworks": self.mynetworks,
            "alias_maps": "",
            "alias_database": "",
            "virtual_mailbox_domains": " ".join(self.domains),
            "virtual_mailbox_base": str(self.dovecot.mail_root) if self.dovecot else str(self.dir / "mail"),
            "virtual_mailbox_maps": f"texthash:{self.config_dir / 'mailboxes'}",
            "virtual_alias_maps": f"texthash:{self.config_dir / 'aliases'}",
            "virtual_uid_maps": f"static:{_mail_ids()[0]}",
            "virtual_gid_maps": f"static:{_mail_ids()[1]}",
            "virtual_minimum_uid": str(_mail_ids()[0]),
            "virtual_mailbox_limit": "0",
            "message_size_limit": str(self.message_size_limit),
            "mailbox_size_limit": "0",
            "relay_domains": " ".join(self.routes),
            "transport_maps": f"texthash:{self.config_dir / 'transport'}",
            "default_transport": "error:5.4.4 no route to this domain in the test mail system",
            "smtpd_relay_restrictions": "permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination",
            "smtpd_banner": "$myhostname ESMTP mailpeers",
            "smtpd_peername_lookup": "no",
            "smtpd_error_sleep_time": "0",
            "smtp_dns_support_level": "disabled",
            "smtp_tls_security_level": "may",
            "smtp_tls_loglevel": "1",
            "smtpd_tls_loglevel": "1",
            "smtpd_tls_received_header": "yes",
            "smtpd_sasl_authenticated_header": "yes",
            "delay_warning_time": "0",
            "biff": "no",
            "append_dot_mydomain": "no",
            "maillog_file": str(self.log_file),
            "maillog_file_prefixes": str(self.root),
        }
        if self.tls:
            p |= {"smtpd_tls_cert_file": str(self.tls.cert), "smtpd_tls_key_file": str(self.tls.key),
                  "smtpd_tls_security_level": "may"}
        if self.client_tls:
            p |= {"smtp_tls_cert_file": str(self.client_tls.cert), "smtp_tls_key_file": str(self.client_tls.key),
                  "smtp_tls_CAfile": str(self.client_tls.ca)}
        if self.dovecot:
            p |= {"smtpd_sasl_type": "dovecot", "smtpd_sasl_path": str(self.dovecot.auth_socket),
                  "smtpd_sasl_auth_enable": "no"}
        if self.fast_retry:
            p |= {"queue_run_delay": "2s", "minimal_backoff_time": "2s", "maximal_backoff_time": "10s"}
        p |= self.main_cf
        return "".join(f"{k} = {v}\n" for k, v in p.items())

    def _master_cf(self) -> str:
        auth = ["-o smtpd_sasl_auth_enable=yes", "-o smtpd_client_restrictions=",
                "-o smtpd_relay_restrictions=permit_sasl_authenticated,reject",
                "-o smtpd_recipient_restrictions=permit_sasl_authenticated,reject"]
        lines = [f"{LOCALHOST}:{self.smtp_port} inet n - n - - smtpd"]
        if self.submission_port:
            lines += [f"{LOCALHOST}:{self.submission_port} inet n - n - - smtpd",
                      "  -o syslog_name=postfix/submission", "  -o smtpd_tls_security_level=encrypt",
                      "  -o smtpd_tls_auth_only=yes", *(f"  {o}" for o in auth)]
        if self.smtps_port:
            lines += [f"{LOCALHOST}:{self.smtps_port} inet n - n - - smtpd",
                      "  -o syslog_name=postfix/smtps", "  -o smtpd_tls_wrappermode=yes",
                      *(f"  {o}" for o in auth)]
        lines += [
            "pickup    unix  n - n 60 1 pickup",
            "cleanup   unix  n - n - 0 cleanup",
            "qmgr      unix  n - n 300 1 qmgr",
            "tlsmgr    unix  - - n 1000? 1 tlsmgr",
            "rewrite   unix  - - n - - trivial-rewrite",
            "bounce    unix  - - n - 0 bounce",
            "defer     unix  - - n - 0 bounce",
            "trace     unix  - - n - 0 bounce",
            "verify    unix  - - n - 1 verify",
            "flush     unix  n - n 1000? 0 flush",
            "proxymap  unix  - - n - - proxymap",
            "proxywrite unix - - n - 1 proxymap",
            "smtp      unix  - - n - - smtp",
            "relay     unix  - - n - - smtp",
            "smtp-starttls unix - - n - - smtp",
            "  -o smtp_tls_security_level=encrypt",
            "smtp-implicit unix - - n - - smtp",
            "  -o smtp_tls_wrappermode=yes",
            "  -o smtp_tls_security_level=encrypt",
            "showq     unix  n - n - - showq",
            "error     unix  - - n - - error",
            "retry     unix  - - n - - error",
            "discard   unix  - - n - - discard",
            "local     unix  - n n - - local",
            "virtual   unix  - n n - - virtual",
            "lmtp      unix  - - n - - lmtp",
            "anvil     unix  - - n - 1 anvil",
            "scache    unix  - - n - 1 scache",
            "postlog   unix-dgram n - n - 1 postlogd",
        ]
        return "\n".join(lines) + "\n"

    def _write_maps(self) -> None:
        users = list(self.dovecot.users) if self.dovecot else []
        mailboxes = [f"{a} {a.split('@', 1)[1]}/{a.split('@', 1)[0]}/Maildir/" for a in users]
        aliases = [f"postmaster@{d} {next(a for a in users if a.endswith('@' + d))}"
                   for d in self.domains if any(a.endswith("@" + d) for a in users)
                   and f"postmaster@{d}" not in users]
        transport = [f"{d} {_TRANSPORTS[mode]}:[{h}]:{p}" for d, (h, p, mode) in self.routes.items()]
        for name, lines in (("mailboxes", mailboxes), ("aliases", aliases), ("transport", transport)):
            path = self.config_dir / name
            path.write_text("".join(f"{line}\n" for line in lines))
            path.chmod(0o644)

    def _write_config(self) -> None:
        self.config_dir.chmod(0o755)
        self.queue_dir.mkdir(mode=0o755, exist_ok=True)  # `postfix check` fills it (and creates data_dir)
        (self.config_dir / "main.cf").write_text(self._main_cf())
        (self.config_dir / "master.cf").write_text(self._master_cf())
        self._write_maps()

    def _postfix(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        cmd = [which("postfix") or "postfix", "-c", str(self.config_dir), *args]
        result = _run(cmd, timeout=timeout)
        with self.commands_file.open("a") as f:
            f.write(f"$ {' '.join(cmd)}  -> {result.returncode}\n{result.stdout}{result.stderr}")
        return result

    # life cycle

    def start(self, timeout: float = 30) -> Postfix:
        last: PeerError | None = None
        for _ in range(3):  # a port taken between free_port() and the bind: try new ports
            self.smtp_port = free_port()
            self.submission_port = free_port() if self.tls else None
            self.smtps_port = free_port() if self.tls else None
            self._write_config()
            try:
                self._start(timeout)
                return self
            except PeerError as e:
                self.stop(remove=False)
                last = e
                if "in use" not in str(e):
                    break
        assert last is not None
        raise last

    def _start(self, timeout: float) -> None:
        # `check` creates the queue and data directories with the owners and modes Postfix insists on.
        for step in ("check", "start"):
            result = self._postfix(step)
            if result.returncode != 0:
                raise PeerError(f"postfix {step} failed ({result.returncode}):\n{result.stdout}{result.stderr}\n"
                                f"{self.log()}")
        self.running = True
        _RUNNING.add(self)
        self.master_pid = pid = self._read_master_pid()
        if pid:
            self.sessions.append(pid)

        def alive() -> bool:
            return pid is None or _alive(pid)

        try:
            for port, tls in ((self.smtp_port, False), (self.submission_port, False), (self.smtps_port, True)):
                if port:
                    _wait_banner(port, b"220 ", timeout, alive, tls=tls)
        except PeerError as e:
            raise PeerError(f"Postfix did not start: {e}\n{self.log()}") from None

    def _read_master_pid(self) -> int | None:
        with contextlib.suppress(FileNotFoundError, ValueError):
            return int((self.queue_dir / "pid" / "master.pid").read_text().strip())
        return None

    def stop(self, remove: bool = True) -> None:
        """``postfix stop``, then make sure the master and its children are gone (bounded)."""
        pid = self.master_pid or self._read_master_pid()
        if self.running or (pid and _alive(pid)):
            with contextlib.suppress(PeerError):
                self._postfix("stop", timeout=30)
        if pid:
            if not _wait_gone([pid], 10):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            _kill_session(pid)  # the master is a session leader: its children are in its session
        self.running = False
        self.master_pid = None
        _RUNNING.discard(self)
        if remove and self._own_root and not os.environ.get("MAILPEERS_KEEP"):
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Postfix:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reload(self, timeout: float = 15) -> None:
        """Rewrite the maps and main.cf, ``postfix reload``, and wait until the master has reloaded."""
        self._write_config()
        if not self.running:
            return
        before = tail(self.log_file, 100000).count("reload -- version")
        result = self._postfix("reload")
        if result.returncode != 0:
            raise PeerError(f"postfix reload failed:\n{result.stdout}{result.stderr}\n{self.log()}")
        deadline = time.monotonic() + timeout
        while tail(self.log_file, 100000).count("reload -- version") <= before:
            if time.monotonic() > deadline:
                raise PeerError(f"Postfix did not reload within {timeout} s\n{self.log()}")
            time.sleep(0.05)
        time.sleep(0.3)  # the daemons that read the maps restart once idle

    def set_route(self, domain: str, host: str, port: int, *, tls: str = "may") -> None:
        """Send mail for domain to host:port (transport_maps). tls: "may" (STARTTLS if offered, no check),
        "starttls" (required) or "implicit" (TLS from the first byte). Reloads a running Postfix."""
        if tls not in _TRANSPORTS:
            raise ValueError(f"tls must be one of {sorted(_TRANSPORTS)}")
        self.routes[domain] = (host, port, tls)
        self.reload()

    def leftovers(self) -> list[int]:
        """Processes still alive from any start (after stop(): none)."""
        return [pid for sid in self.sessions for pid in _session_members(sid)]

    def log(self, lines: int = 60) -> str:
        text = f"---- Postfix log ({self.log_file}, last {lines} lines) ----\n{tail(self.log_file, lines)}"
        if self.commands_file.exists():
            text += f"\n---- postfix commands ----\n{tail(self.commands_file, 20)}"
        return text

    # the queue

    def queue(self) -> list[dict[str, Any]]:
        """The messages in the queue (``postqueue -j``): queue_name, queue_id, sender, recipients, ..."""
        result = _run([which("postqueue") or "postqueue", "-c", str(self.config_dir), "-j"], timeout=30)
        if result.returncode != 0:
            raise PeerError(f"postqueue -j failed:\n{result.stderr}\n{self.log()}")
        return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]

    def flush(self) -> None:
        """Retry deferred mail now (``postqueue -f``)."""
        _run([which("postqueue") or "postqueue", "-c", str(self.config_dir), "-f"], timeout=30)

    def wait_queue_empty(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            queued = self.queue()
            if not queued:
                return
            if time.monotonic() > deadline:
                raise PeerError(f"Postfix queue not empty after {timeout} s: {queued}\n{self.log()}")
            time.sleep(0.2)


# --- both -----------------------------------------------------------------------------------------------------------

class MailPeers:
    """Dovecot and Postfix together, with one TLS certificate (``tls``, ``tls.ca`` for clients), in one directory.

    ``routes`` as for :class:`Postfix`; ``users`` are addresses (a bare name gets ``@org.example``);
    ``oauth2`` as for :class:`Dovecot` (bearer logins to the mailbox).
    """

    def __init__(self, root: Path | None = None, *, users: Iterable[str] = (f"alice@{ORG_DOMAIN}",),
                 routes: dict[str, tuple[str, int]] | None = None, imaps: bool = True,
                 hostname: str = f"mail.{ORG_DOMAIN}", oauth2: str | None = None, **postfix_options: Any) -> None:
        self.root, self._own_root = _make_root(root, "peers")
        self.tls = make_tls(self.root / "tls", hostname)
        self.dovecot = Dovecot(self.root, users=users, tls=self.tls, imaps=imaps, hostname=hostname, oauth2=oauth2)
        self.dovecot._own_root = False
        self.postfix = Postfix(self.root, dovecot=self.dovecot, routes=routes, tls=self.tls, hostname=hostname,
                               **postfix_options)

    def start(self) -> MailPeers:
        try:
            self.dovecot.start()
            self.postfix.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        try:
            self.postfix.stop()
        finally:
            self.dovecot.stop()
            if self._own_root and not os.environ.get("MAILPEERS_KEEP"):
                shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> MailPeers:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add_user(self, address: str, password: str | None = None) -> str:
        password = self.dovecot.add_user(address, password)
        self.postfix.reload()
        return password

    def password(self, address: str) -> str:
        return self.dovecot.password(address)

    def leftovers(self) -> list[int]:
        """Postfix and Dovecot processes still alive (after stop(): none)."""
        return self.postfix.leftovers() + self.dovecot.leftovers()

    def logs(self, lines: int = 60) -> str:
        """The last lines of the Postfix and Dovecot logs, for assertion messages."""
        return _logs([self.postfix, self.dovecot], lines)


# --- an SMTP server that records ------------------------------------------------------------------------------------

@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    peer: Any
    tls: bool


@dataclass
class SmtpSink:
    """An aiosmtpd server on 127.0.0.1 that keeps every message (a next hop, the national system).

    ``tls`` offers STARTTLS (``require_starttls`` makes it mandatory; ``implicit_tls`` speaks TLS at once).
    ``answers`` is a queue of replies to DATA (e.g. "451 4.3.0 try later") used before the normal "250".
    """

    tls: TlsFiles | None = None
    require_starttls: bool = False
    implicit_tls: bool = False
    port: int = 0
    data_size_limit: int = 64 * 1024 * 1024
    answers: list[str] = field(default_factory=list)
    messages: list[Received] = field(default_factory=list)
    _controller: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> SmtpSink:
        from aiosmtpd.controller import Controller

        sink = self

        class Handler:
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                with sink._lock:
                    if sink.answers:
                        return sink.answers.pop(0)
                    data = envelope.original_content or envelope.content
                    sink.messages.append(Received(str(envelope.mail_from), list(envelope.rcpt_tos),
                                                  bytes(data), session.peer,
                                                  sink.implicit_tls or session.ssl is not None))
                return "250 2.0.0 OK: queued"

        kwargs: dict[str, Any] = {"data_size_limit": self.data_size_limit}
        if self.tls:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(str(self.tls.cert), str(self.tls.key))
            if self.implicit_tls:
                kwargs["ssl_context"] = ctx
            else:
                kwargs["tls_context"] = ctx
                kwargs["require_starttls"] = self.require_starttls
        self.port = self.port or free_port()
        self._controller = Controller(Handler(), hostname=LOCALHOST, port=self.port,
                                      server_hostname=f"national-sim.{NATIONAL_DOMAIN}", ready_timeout=10,
                                      **kwargs)
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_for(self, count: int, timeout: float = 30, logs: Callable[[], str] | None = None) -> list[Received]:
        """Wait (bounded) until count messages arrived; on timeout the error carries logs() if given."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                got = list(self.messages)
            if len(got) >= count:
                return got
            if time.monotonic() > deadline:
                raise PeerError(f"SMTP sink on port {self.port}: {len(got)} message(s) after {timeout} s, "
                                f"expected {count}\n{logs() if logs else ''}")
            time.sleep(0.1)


# --- clients --------------------------------------------------------------------------------------------------------

def make_message(sender: str, to: str | Sequence[str], subject: str = "mailpeers test", body: str = "Hello.\n",
                 attachments: Iterable[tuple[str, bytes]] = ()) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to if isinstance(to, str) else ", ".join(to)
    msg["Subject"] = subject
    msg["Message-ID"] = make_msgid(domain=sender.rsplit("@", 1)[-1])
    msg.set_content(body)
    for name, data in attachments:
        msg.add_attachment(data, maintype="application", subtype="octet-stream", filename=name)
    return msg


def send_smtp(port: int, message: bytes | Message, *, host: str = LOCALHOST, sender: str | None = None,
              recipients: Sequence[str] | None = None, starttls: bool = False, implicit_tls: bool = False,
              login: tuple[str, str] | None = None, tls_context: ssl.SSLContext | None = None,
              timeout: float = 30) -> dict[str, tuple[int, bytes]]:
    """Send with smtplib (a counter's mail client). Returns the refused recipients (smtplib's sendmail)."""
    if isinstance(message, Message):
        sender = sender or str(message["From"])
        recipients = recipients or [a.strip() for a in str(message["To"]).split(",")]
        data = message.as_bytes()
    else:
        data = message
    if not sender or not recipients:
        raise ValueError("sender and recipients are needed with a message given as bytes")
    smtp: smtplib.SMTP
    if implicit_tls:
        smtp = smtplib.SMTP_SSL(host, port, timeout=timeout, context=tls_context)
    else:
        smtp = smtplib.SMTP(host, port, timeout=timeout)
    with smtp:
        smtp.ehlo("counter-1.org.example")
        if starttls:
            smtp.starttls(context=tls_context)
            smtp.ehlo("counter-1.org.example")
        if login:
            smtp.login(*login)
        return smtp.sendmail(sender, list(recipients), data)


def swaks(port: int, *, to: str | Sequence[str], sender: str, host: str = LOCALHOST, starttls: bool = False,
          implicit_tls: bool = False, auth: tuple[str, str] | None = None, headers: dict[str, str] | None = None,
          body: str | None = None, attach: Iterable[Path] = (), data: bytes | None = None,
          extra: Sequence[str] = (), timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Send with swaks (an outside SMTP client). data: a whole message (given on stdin, swaks adds nothing).
    With check, a failure raises PeerError with swaks' transcript."""
    exe = which("swaks")
    if exe is None:
        raise PeerError("swaks is not installed: run `bash scripts/bootstrap.sh install`")
    cmd = [exe, "--server", host, "--port", str(port), "--from", sender,
           "--to", to if isinstance(to, str) else ",".join(to), "--timeout", str(int(timeout)),
           "--helo", "outside.example"]
    if starttls:
        cmd.append("--tls")
    if implicit_tls:
        cmd.append("--tls-on-connect")
    if auth:
        cmd += ["--auth", "PLAIN", "--auth-user", auth[0], "--auth-password", auth[1]]
    for name, value in (headers or {}).items():
        cmd += ["--header", f"{name}: {value}"]
    if data is not None:
        cmd += ["--data", "-"]
    if body is not None:
        cmd += ["--body", body]
    for path in attach:
        cmd += ["--attach", f"@{path}"]
    cmd += list(extra)
    result = _run(cmd, timeout=timeout + 15, input=data)
    if check and result.returncode != 0:
        raise PeerError(f"swaks failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@contextlib.contextmanager
def running(*peers: Any) -> Iterator[tuple[Any, ...]]:
    """Start peers in order and stop them in reverse order, also on failure."""
    started: list[Any] = []
    try:
        for peer in peers:
            peer.start()
            started.append(peer)
        yield peers
    finally:
        for peer in reversed(started):
            with contextlib.suppress(Exception):
                peer.stop()
