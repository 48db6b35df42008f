"""Settings: one TOML file plus ``TOKENBRIDGE_*`` environment variables.

Environment variables override the file; nested settings use ``__``
(``TOKENBRIDGE_SERVER__PORT=8200``). Relative paths in the file are taken
relative to the file's own directory, so a data directory can be moved whole.
Every setting is documented in ``docs/configuration.md``.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

DEFAULT_PORT = 8155
SINGLE_TOKEN = "main"  # the name of the token a plain [token] table configures
TOKEN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")


def default_data_dir() -> Path:
    """Where the demo token and its configuration live when nothing else is said: ``$TOKENBRIDGE_DEMO_DIR``
    (as ``scripts/bootstrap.sh serve``), else ``$XDG_DATA_HOME/tokenbridge/demo``."""
    demo = os.environ.get("TOKENBRIDGE_DEMO_DIR")
    if demo:
        return Path(demo).expanduser().resolve()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "tokenbridge" / "demo"


class TokenSettings(BaseModel):
    """Which PKCS#11 module and token to use, and where the PIN comes from."""

    model_config = ConfigDict(extra="forbid")

    module: str = Field("softhsm2", description="Path of the PKCS#11 module, or a drivers/ profile name.")
    label: str | None = Field(None, description="Select the token by label.")
    serial: str | None = Field(None, description="Select the token by serial number.")
    slot: int | None = Field(None, description="Select the token by slot id.")
    pin_source: Literal["file", "env", "prompt", "pinpad"] = "file"
    pin_file: Path | None = Field(None, description="File holding the user PIN (pin_source = file).")
    pin_env: str = Field("TOKENBRIDGE_PIN", description="Variable holding the PIN (pin_source = env).")
    environment: dict[str, str] = Field(
        default_factory=dict, description="Variables set before the module loads (e.g. SOFTHSM2_CONF)."
    )
    queue_size: int = Field(256, ge=1, description="Requests waiting for the token; beyond it: 503.")
    client_rate: float | None = Field(
        None, gt=0, description="Private-key operations per second one client may start (default: no limit)."
    )
    client_burst: int = Field(10, ge=1, description="Operations a client may start at once above its rate.")
    client_queue_size: int | None = Field(
        None, ge=1, description="Requests one client may have waiting (default: queue_size); beyond it: 503."
    )
    operation_timeout: float = Field(30.0, gt=0, description="Seconds a request may wait in all.")
    presence_interval: float = Field(1.0, gt=0, description="Seconds between checks while absent.")
    required: bool = Field(True, description="/v1/ready waits for this token (false: the hub is ready without "
                                             "it, e.g. a card only plugged in for renewal).")
    retiring: bool = Field(False, description="Renewal: this token's keys only decrypt (replies still on their "
                                              "way to the old certificate); docs/renewal.md.")
    retiring_until: datetime.date | None = Field(
        None, description="With retiring: after this day the keys are not used at all (default: no end).")
    replaces: str | None = Field(
        None, description="Renewal in one line: the token (by name) this one replaces. That token becomes "
                          "retiring, and the settings that name its keys move to the matching keys here.")


def is_loopback(host: str) -> bool:
    """Whether a listen address is this machine only (plain HTTP is allowed there, and nowhere else)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ServerSettings(BaseModel):

    model_config = ConfigDict(extra="forbid")
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="Largest JSON request body.")
    max_message_bytes: int = Field(
        64 * 1024 * 1024, ge=1024,
        description="Largest raw body on /v1/cms, /v1/smime and /v1/proxy (mail with attachments, uploads).",
    )
    admin_socket: Path | None = Field(
        None, description="Unix socket for local operator commands (default: DATA_DIR/tokenbridge.sock)."
    )
    tls_cert: Path | None = Field(
        None, description="Server certificate (PEM; default: DATA_DIR/tls/server.pem once `tokenbridge tls init` ran)."
    )
    tls_key: Path | None = Field(None, description="Its private key (default: DATA_DIR/tls/server.key).")
    tls_client_ca: Path | None = Field(
        None, description="CA that issues workstation certificates (default: the bridge CA, DATA_DIR/tls/ca.pem)."
    )
    client_auth: Literal["secret", "certificate", "either", "both"] = Field(
        "either", description="How workstations on the TLS listener authenticate."
    )
    first_request_timeout: float = Field(
        10.0, gt=0, description="Seconds a new connection has to send a complete request (slowloris guard)."
    )
    body_timeout: float = Field(
        300.0, gt=0, description="Seconds a request has to send its whole body after its headers (a slowly sent "
                                "body holds a connection; 64 MiB at 2 Mbit/s takes about 270 s). A request "
                                "answered before its body was read (401, 403, 413) gets first_request_timeout."
    )
    workers: int = Field(1, ge=1, le=64, description="Service processes; keep 1 for a smart card.")
    parse_threads: int = Field(
        0, ge=0, le=32, description="Threads that parse, hash and serialise large messages off the event loop "
                                    "(0: as many as CPU cores, at most 4)."
    )
    expiry_warning_days: int = Field(
        30, ge=0, le=3650, description="Warn (in /metrics, /ui and doctor) this many days before a key's "
                                       "certificate expires."
    )
    tls: Literal["auto", "on"] = Field(
        "auto", description="auto: TLS on any non-loopback address; on: TLS on loopback too."
    )


class KeyPolicy(BaseModel):
    """Per-key options, in ``[keys.<id or label>]`` tables."""

    model_config = ConfigDict(extra="forbid")

    allow_rsa_pkcs1v15_decrypt: bool = Field(
        False, description="Raw PKCS#1 v1.5 decryption is a padding oracle: off unless you need it."
    )
    allow_expired_certificate: bool = Field(
        False, description="Sign CMS/S-MIME and authenticate TLS with this key although its certificate is "
                           "expired or not yet valid (off: refused with certificate_expired)."
    )
    retiring: bool = Field(False, description="Renewal: this key only decrypts; docs/renewal.md.")
    retiring_until: datetime.date | None = Field(
        None, description="With retiring: after this day the key is not used at all (default: no end).")


class SmtpSettings(BaseModel):
    """Outgoing mail for ``/v1/smime/send``."""

    host: str | None = Field(None, description="SMTP server; unset: sending is disabled.")
    port: int = 587
    security: Literal["none", "starttls", "tls"] = "starttls"
    username: str | None = None
    password_file: Path | None = Field(None, description="File holding the SMTP password.")
    password_env: str = Field("TOKENBRIDGE_SMTP_PASSWORD", description="Or a variable holding it.")
    timeout: float = Field(30.0, gt=0)
    ca: Path | None = Field(None, description="CA bundle that verifies the server's certificate (default: the "
                                              "system's).")


class SmimeSettings(BaseModel):
    """CMS / S/MIME (``[smime]``): trust anchors, the organisation's keys and address, SMTP."""

    trust_anchors: list[Path] = Field(
        default_factory=list, description="Root certificates signatures must chain to (default: ca_files)."
    )
    sign_key: str | None = Field(None, description="Default signing key (default: the first e-mail key).")
    encryption_key: str | None = Field(
        None, description="The organisation's encryption key: copy recipient and encryption-key preference."
    )
    from_address: str | None = Field(None, description="Default From (default: the signing certificate's).")
    smtp: SmtpSettings = Field(default_factory=SmtpSettings)


class SubmissionSettings(BaseModel):
    """The gateway's SMTP listener for outgoing mail (``[mail.submission]``): Outlook, the registration
    software, or the organisation's mail server send through it."""

    model_config = ConfigDict(extra="forbid")

    listen: str | None = Field(None, description="host:port, e.g. 127.0.0.1:2525; unset: no listener. On a "
                                                 "non-loopback address STARTTLS and AUTH (or a trusted relay) "
                                                 "are required.")
    trusted_relays: list[str] = Field(
        default_factory=list, description="Addresses or networks (CIDR) of mail servers that may submit "
                                          "without AUTH (an Exchange send connector, a Postfix relay).")
    relay_workstations: list[str] = Field(
        default_factory=list, description="Enrolled workstations whose certificate, shown in STARTTLS, "
                                          "lets a mail server submit without AUTH.")
    max_message_bytes: int = Field(50 * 1024 * 1024, ge=1024, description="SIZE announced and enforced.")


class MailPolicySettings(BaseModel):
    """Which outgoing mail is signed and encrypted (``[mail.policy]``)."""

    model_config = ConfigDict(extra="forbid")

    domains: dict[str, str] = Field(
        default_factory=dict, description="Recipient domain -> address-book name, for addresses that the "
                                          "certificate itself does not name.")
    others: Literal["refuse", "sign"] = Field(
        "refuse", description="Recipients outside the address book: refused (550), or sent signed only.")
    sign_key: str | None = Field(None, description="Signing key (default: [smime] sign_key, then the first "
                                                   "e-mail key).")
    claim_seconds: float = Field(
        120.0, gt=0, description="With several hubs on one database: how long a hub holds a message it works on; "
                                 "if it dies, another hub takes the message over after this.")
    lifetime: float = Field(5 * 86400, gt=0, description="Seconds a message is retried before it bounces.")
    retry_first: float = Field(60, gt=0, description="Seconds before the first retry; doubled each time.")
    retry_max: float = Field(3600, gt=0, description="Longest wait between two retries.")


class ImapSettings(BaseModel):
    """The organisation's mailbox, where the replies land (``[mail.imap]``)."""

    model_config = ConfigDict(extra="forbid")

    host: str | None = Field(None, description="IMAP server; unset: no IMAP pull.")
    port: int = 993
    security: Literal["tls", "starttls", "none"] = "tls"
    ca: Path | None = Field(None, description="CA bundle that verifies the server (default: the system's).")
    username: str = ""
    password_file: Path | None = Field(None, description="File holding the password.")
    oauth2_token_file: Path | None = Field(None, description="File holding an OAuth2 bearer (XOAUTH2, "
                                                             "Microsoft 365), re-read at each login.")
    oauth2_token_command: str | None = Field(None, description="Command printing an OAuth2 bearer.")
    folder: str = Field("INBOX", description="Where the replies arrive.")
    deliver_folder: str = Field("Tokenbridge/Decrypted", description="Where the decrypted replies are put.")
    quarantine_folder: str = Field("Tokenbridge/Quarantine", description="Where messages that cannot be "
                                                                         "opened are copied, with the reason.")
    poll_interval: float = Field(60, gt=0, description="Seconds between polls when the server has no IDLE.")


class InboundSmtpSettings(BaseModel):
    """Replies routed to the gateway by the organisation's mail server (``[mail.inbound]``)."""

    model_config = ConfigDict(extra="forbid")

    listen: str | None = Field(None, description="host:port of the inbound SMTP listener; unset: none.")
    trusted_relays: list[str] = Field(default_factory=list, description="Mail servers allowed to deliver "
                                                                        "(loopback always is).")
    deliver_to: str | None = Field(None, description="Where decrypted replies go (an address reached "
                                                     "through [smime.smtp]); default: the original recipients.")


class TrackingSettings(BaseModel):
    """Applications and their replies (``[mail.tracking]``)."""

    model_config = ConfigDict(extra="forbid")

    reply_due: float = Field(12 * 3600, gt=0, description="Seconds after sending without a reply: overdue.")
    reference_pattern: str | None = Field(
        None, description="Regular expression with one group, read in the subject of outgoing mail and of "
                          "replies: matches a reply to its application when In-Reply-To/References do not.")
    number_pattern: str = Field(
        r"(?:num[ée]ro d'enregistrement|registration number)\s*:?\s*([A-Z0-9][A-Z0-9-]{5,40})",
        description="Regular expression with one group: the registration number in a reply.")
    notify: str | None = Field(None, description="Address told of overdue replies and permanent failures.")


class MailSettings(BaseModel):
    """The S/MIME mail gateway (``[mail]``); see docs/mail.md."""

    model_config = ConfigDict(extra="forbid")

    hostname: str = Field("tokenbridge.localdomain", description="Name in SMTP greetings and in the "
                                                                 "delivery reports it writes.")
    submission: SubmissionSettings = Field(default_factory=SubmissionSettings)
    policy: MailPolicySettings = Field(default_factory=MailPolicySettings)
    imap: ImapSettings = Field(default_factory=ImapSettings)
    inbound: InboundSmtpSettings = Field(default_factory=InboundSmtpSettings)
    tracking: TrackingSettings = Field(default_factory=TrackingSettings)


class UpstreamSettings(BaseModel):
    """A web service called with mutual TLS (``[upstreams.NAME]``); see docs/tls-proxy.md."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(description="Base URL, https://host[:port][/path]; requests are appended to it.")
    key: str = Field(description="Token key (label or id) whose certificate authenticates the client.")
    ca: Path = Field(description="CA bundle that verifies the server (verification is never off).")
    client_chain: Path | None = Field(None, description="Intermediate certificates to send after ours.")
    min_tls: Literal["1.2", "1.3"] = "1.2"
    max_tls: Literal["1.2", "1.3"] = "1.3"
    server_name: str | None = Field(None, description="Name checked in the server's certificate (default: "
                                    "the URL's host).")
    connect_timeout: float = Field(10.0, gt=0, description="Seconds for the TCP connection.")
    handshake_timeout: float = Field(30.0, gt=0, description="Seconds per TLS handshake read/write (the "
                                     "token's own deadline is token.operation_timeout).")
    read_timeout: float = Field(120.0, gt=0, description="Seconds to wait for each piece of the response.")
    pool_size: int = Field(8, ge=1, le=256, description="Connections kept to this upstream.")
    keepalive: float = Field(300.0, ge=0, description="Seconds an idle connection is kept.")
    session_resumption: bool = Field(True, description="Resume TLS sessions: no token signature when the "
                                     "server agrees.")
    clients: list[str] = Field(default_factory=list, description="Clients allowed (empty: any client with "
                               "the proxy grant whose key list allows the key).")
    listen: str | None = Field(None, description="Plain-HTTP loopback listener, e.g. 127.0.0.1:8201.")
    listen_client: str | None = Field(None, description="Client identity (name) the listener acts as.")


def default_hub_name(hostname: str) -> str:
    """The host name's first label, made a valid hub name (letters, digits, '-', '_'; at most 32)."""
    name = re.sub(r"[^A-Za-z0-9_-]", "-", hostname.split(".")[0]).lstrip("-_")[:32]
    return name or "hub"


class StateSettings(BaseModel):
    """Where the state lives (``[state]``): SQLite in data_dir (one hub), or PostgreSQL (several hubs)."""

    model_config = ConfigDict(extra="forbid")

    database_url: str | None = Field(
        None, description="postgresql://user@host:port/dbname (password from ~/.pgpass or PGPASSWORD): clients, "
                          "audit, mail queue and IMAP checkpoints shared by several hubs. Unset: SQLite files "
                          "in data_dir.")
    hub: str = Field(default_factory=lambda: default_hub_name(socket.gethostname()),
                     description="This hub's name among those sharing the database (its audit chain's name).")
    url: str | None = Field(None, description="How the other hubs reach this one, e.g. https://hub-a.lan:8155 "
                                              "(default: from server.host and server.port).")
    heartbeat_interval: float = Field(2.0, gt=0, le=60, description="Seconds between this hub's heartbeats.")
    down_after: float = Field(10.0, gt=0, description="A hub silent this long is down: its keys answer 503 "
                                                      "hub_down at once.")

    @model_validator(mode="after")
    def _check(self) -> StateSettings:
        if self.database_url is not None and not self.database_url.startswith(("postgresql://", "postgres://")):
            raise ValueError("state.database_url must be a postgresql:// URL (unset: SQLite in data_dir)")
        if not TOKEN_NAME.fullmatch(self.hub):
            raise ValueError(f"state.hub {self.hub!r}: 1 to 32 letters, digits, '-' and '_', starting with a letter "
                             "or digit")
        return self


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TOKENBRIDGE_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    data_dir: Path = Field(default_factory=default_data_dir, description="State, audit and sockets.")
    token: TokenSettings = Field(default_factory=TokenSettings, description="The one token (see tokens).")
    tokens: dict[str, TokenSettings] = Field(
        default_factory=dict, description="Several tokens, by name ([tokens.NAME] tables); replaces [token].")
    server: ServerSettings = Field(default_factory=ServerSettings)
    keys: dict[str, KeyPolicy] = Field(default_factory=dict)
    ca_files: list[Path] = Field(default_factory=list, description="CA certificates for /chain.")
    recipients: dict[str, Path] = Field(
        default_factory=dict, description="Address book: name -> recipient certificate file."
    )
    service_url: str | None = Field(None, description="URL the CLI uses for a running service.")
    smime: SmimeSettings = Field(default_factory=SmimeSettings)
    upstreams: dict[str, UpstreamSettings] = Field(default_factory=dict, description="mTLS proxy targets.")
    mail: MailSettings = Field(default_factory=MailSettings)
    state: StateSettings = Field(default_factory=StateSettings)

    config_file: Path | None = Field(None, exclude=True)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
        toml_file = _CURRENT_FILE.get("path")
        if toml_file is not None:
            sources = (*sources, TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return sources

    @model_validator(mode="after")
    def _resolve_paths(self) -> Settings:
        base = self.config_file.parent if self.config_file else Path.cwd()

        def fix(p: Path | None) -> Path | None:
            if p is None:
                return None
            p = p.expanduser()
            return (p if p.is_absolute() else (base / p)).resolve()

        self.data_dir = fix(self.data_dir) or self.data_dir
        if self.tokens and "token" in self.model_fields_set:
            raise ValueError("give either [token] (one token; or TOKENBRIDGE_TOKEN__* variables) or [tokens.NAME] "
                             "tables (several; their variables are TOKENBRIDGE_TOKENS__NAME__*), not both")
        for name in self.tokens:
            if not TOKEN_NAME.fullmatch(name):
                raise ValueError(f"token name {name!r}: use letters, digits, '-' and '_' (it is written "
                                 "before a key's label, as in NAME/label)")
        selections: dict[tuple[object, ...], str] = {}
        for name, t in self.tokens.items():
            if len(self.tokens) > 1 and t.label is None and t.serial is None and t.slot is None:
                raise ValueError(f"tokens.{name}: with several tokens, each says which it is: give its serial "
                                 "(two cards of one vendor often share a label), label or slot")
            selection = (t.module, t.label, t.serial, t.slot, tuple(sorted(t.environment.items())))
            if selection in selections:
                raise ValueError(f"tokens.{selections[selection]} and tokens.{name} select the same token: give "
                                 "each its serial (`pkcs11-tool -L` lists each card's)")
            selections[selection] = name
            if t.replaces is not None and (t.replaces not in self.tokens or t.replaces == name):
                raise ValueError(f"tokens.{name}.replaces = {t.replaces!r}: name another [tokens.NAME] table "
                                 f"({', '.join(n for n in self.tokens if n != name) or 'there is none'})")
        replaced = [t.replaces for t in self.tokens.values() if t.replaces]
        if len(replaced) != len(set(replaced)):
            raise ValueError("two tokens replace the same one: one card takes over from another")
        for name in self.tokens:  # 2024 -> 2025 -> 2026 is a chain; a loop leaves no card in service
            seen, current = {name}, self.tokens[name].replaces
            while current is not None:
                if current in seen:
                    raise ValueError(f"tokens.{name}: the replaces settings form a loop; one card must be in service")
                seen.add(current)
                current = self.tokens[current].replaces
        if self.token.replaces is not None:
            raise ValueError("token.replaces needs [tokens.NAME] tables: the old and the new card, each named")
        if self.state.database_url is not None and self.server.workers > 1:
            # One heartbeat and one hub secret per hub: another worker's forwards would carry none.
            raise ValueError("server.workers must be 1 on a hub that shares state.database_url with others (each "
                             "hub is one process; run more hubs behind the front instead)")
        self.token.pin_file = fix(self.token.pin_file)
        for t in self.tokens.values():
            t.pin_file = fix(t.pin_file)
        tls_dir = self.data_dir / "tls"
        self.server.tls_cert = fix(self.server.tls_cert) or _existing(tls_dir / "server.pem")
        self.server.tls_key = fix(self.server.tls_key) or _existing(tls_dir / "server.key")
        self.server.tls_client_ca = fix(self.server.tls_client_ca) or _existing(tls_dir / "ca.pem")
        self.server.admin_socket = fix(self.server.admin_socket) or self.data_dir / "tokenbridge.sock"
        self.ca_files = [p for p in (fix(p) for p in self.ca_files) if p is not None]
        self.recipients = {k: fix(v) or v for k, v in self.recipients.items()}
        self.smime.smtp.ca = fix(self.smime.smtp.ca)
        self.smime.smtp.password_file = fix(self.smime.smtp.password_file)
        imap = self.mail.imap
        imap.ca, imap.password_file, imap.oauth2_token_file = fix(imap.ca), fix(imap.password_file), \
            fix(imap.oauth2_token_file)
        for upstream in self.upstreams.values():
            upstream.ca = fix(upstream.ca) or upstream.ca
            upstream.client_chain = fix(upstream.client_chain)
        return self

    @property
    def token_tables(self) -> dict[str, TokenSettings]:
        """Every token by name: the ``[tokens.NAME]`` tables, or ``[token]`` alone as ``main``."""
        return dict(self.tokens) if self.tokens else {SINGLE_TOKEN: self.token}

    @property
    def store_path(self) -> Path:
        return self.data_dir / "state.db"

    def key_policy(self, key_id: str, label: str, token: str = "") -> KeyPolicy:
        """``[keys.X]`` where X is the key's id, ``TOKEN/label`` or its label, in that order."""
        return self.keys.get(key_id) or self.keys.get(f"{token}/{label}") or self.keys.get(label) or KeyPolicy()


_CURRENT_FILE: dict[str, Path | None] = {"path": None}


def _existing(path: Path) -> Path | None:
    return path if path.exists() else None


def resolve_config_path(path: Path | str | None) -> Path | None:
    """``--config``, else ``TOKENBRIDGE_CONFIG``, else the demo directory's file if present."""
    if path:
        return Path(path).expanduser().resolve()
    env = os.environ.get("TOKENBRIDGE_CONFIG")
    if env:
        return Path(env).expanduser().resolve()
    demo = default_data_dir() / "tokenbridge.toml"
    return demo if demo.exists() else None


def load_settings(path: Path | str | None = None, **overrides: Any) -> Settings:
    """Load settings from a TOML file (optional) and the environment."""
    file = resolve_config_path(path)
    if file is not None and not file.exists():
        raise FileNotFoundError(f"configuration file not found: {file}")
    _CURRENT_FILE["path"] = file
    try:
        return Settings(config_file=file, **overrides)
    finally:
        _CURRENT_FILE["path"] = None
