"""What every command shares: the consoles, the --config option, failing with a message, the admin socket,
and the service's HTTP API (``smime``) with its TLS trust."""

from __future__ import annotations

import contextlib
import difflib
import os
import ssl
import typing
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.text import Text

from tokenbridge.client import Client, TokenbridgeError
from tokenbridge.config import Settings, is_loopback, load_settings, resolve_config_path
from tokenbridge.formats.text import printable

console = Console()
err = Console(stderr=True, soft_wrap=True)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML file (default: $TOKENBRIDGE_CONFIG, then the demo directory's: "
                                        "$TOKENBRIDGE_DEMO_DIR or ~/.local/share/tokenbridge/demo).",
                 show_default=False),
]

# Exit code of a configuration naming a setting that does not exist (as for an unknown option).
UNKNOWN_SETTING = 2


def load(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except FileNotFoundError as exc:
        fail(str(exc))
    except ValidationError as exc:
        lines, unknown = settings_errors(exc, resolve_config_path(config))
        for line in lines[:-1]:
            err.print(Text.assemble(("error:", "red"), " ", line))
        fail(lines[-1], code=UNKNOWN_SETTING if unknown else 1)
    except ValueError as exc:  # TOML syntax (tomllib.TOMLDecodeError), or a value no validator could place
        where = resolve_config_path(config)
        fail(f"invalid configuration{f' in {where}' if where else ''}: {exc}")


def _fields_at(path: tuple[str | int, ...]) -> list[str]:
    """The setting names allowed where ``path`` points (for "did you mean")."""
    model: Any = Settings
    rest = list(path)
    while rest:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return []
        field = model.model_fields.get(str(rest.pop(0)))
        if field is None:
            return []
        model = field.annotation
        if typing.get_origin(model) is dict:  # [keys.NAME], [upstreams.NAME]: skip the name
            model = typing.get_args(model)[1]
            if rest:
                rest.pop(0)
            else:
                return []
    if isinstance(model, type) and issubclass(model, BaseModel):
        return [name for name in model.model_fields if name != "config_file"]
    return []


def settings_errors(exc: ValidationError, file: Path | None) -> tuple[list[str], bool]:
    """One sentence per error, naming the setting and where it was read (file and table, or variable);
    and whether one of them is an unknown setting."""
    lines, unknown = [], False
    for error in exc.errors():
        loc = tuple(error["loc"])
        variable = "TOKENBRIDGE_" + "__".join(str(p) for p in loc).upper()
        if loc and variable in os.environ:
            source = f"the environment variable {variable}"
        elif file is not None:
            table = ".".join(str(p) for p in loc[:-1])
            source = f"{file}" + (f" [{table}]" if table else "")
        else:
            source = "the settings"
        name = str(loc[-1]) if loc else ""
        if error["type"] == "extra_forbidden":
            unknown = True
            close = difflib.get_close_matches(name, _fields_at(loc[:-1]), n=1)
            lines.append(f"unknown setting `{name}` in {source}"
                         + (f"; did you mean `{close[0]}`?" if close else ""))
        elif name:
            lines.append(f"invalid configuration: `{name}` in {source}: {error['msg']} "
                         f"(found {error.get('input')!r})")
        else:
            lines.append(f"invalid configuration in {source}: {error['msg']}")
    return lines or ["invalid configuration"], unknown


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(Text.assemble(("error:", "red"), " ", message))  # the message is not markup: [server] stays
    raise typer.Exit(code)


class CliClient(Client):
    """A client that knows where it goes, to say so when it cannot get there."""

    def __init__(self, where: str, *args: Any, hint: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.where = where
        self.hint = hint

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError, httpx.HTTPError):
            self.close()


def admin(settings: Settings) -> CliClient:
    path = settings.server.admin_socket
    assert path is not None
    if not path.exists():
        fail(f"the service is not running (no admin socket at {path}); start it with "
             f"`tokenbridge serve{_config_arg(settings)}`")
    return CliClient(f"admin socket {path}", uds=str(path))


def _config_arg(settings: Settings) -> str:
    return f" --config {settings.config_file}" if settings.config_file else ""


BRIDGE_CA_HELP = ("CA certificate (PEM) that verifies an https:// service: the bridge's own CA is "
                  "DATA_DIR/tls/ca.pem, written by `tokenbridge tls init` (default: that file when the "
                  "configuration's data directory has one, and the system's CAs).")
URL_HELP = ("Service URL, e.g. https://hub.example:8155 (default: $TOKENBRIDGE_SERVICE_URL, the configuration's "
            "service_url, then its [server] host and port, https when the service uses TLS).")


def service_url(settings: Settings) -> str:
    """The URL of the service this configuration runs: https when it serves TLS (as ``tokenbridge serve``)."""
    s = settings.server
    tls = s.tls == "on" or not is_loopback(s.host)
    host = "127.0.0.1" if s.host in ("", "0.0.0.0") else "::1" if s.host == "::" else s.host
    if ":" in host:
        host = f"[{host}]"
    return f"{'https' if tls else 'http'}://{host}:{s.port}"


def remote(config: Path | None, url: str | None, secret: str | None, cacert: Path | None) -> CliClient:
    """A client for the service's HTTP API: URL from --url, $TOKENBRIDGE_SERVICE_URL (or the older
    $TOKENBRIDGE_URL), the configuration's service_url or its [server] address."""
    url = url or os.environ.get("TOKENBRIDGE_SERVICE_URL") or os.environ.get("TOKENBRIDGE_URL")
    settings: Settings | None = None
    if url is None:
        settings = load(config)
        url = settings.service_url or service_url(settings)
    if not url.startswith(("http://", "https://")):
        fail(f"the service URL {url!r} must start with http:// or https://")
    verify: bool | ssl.SSLContext = True
    ca = cacert
    if url.startswith("https://"):
        if ca is None:
            if settings is None:
                try:
                    settings = load_settings(config)
                except (OSError, ValueError):
                    settings = None  # --url was given: the configuration is only a hint for the CA
            bridge_ca = settings.data_dir / "tls" / "ca.pem" if settings is not None else None
            ca = bridge_ca if bridge_ca is not None and bridge_ca.exists() else None
        verify = ssl.create_default_context()
        if ca is not None:
            try:
                verify.load_verify_locations(cafile=str(ca))
            except FileNotFoundError:
                fail(f"the CA file {ca} does not exist (--cacert)")
            except (OSError, ssl.SSLError) as exc:
                fail(f"cannot read the CA file {ca} as PEM certificates: {exc}")
    hint = (f"trusting {ca}" if ca is not None else
            "trust the bridge CA with --cacert DATA_DIR/tls/ca.pem (written by `tokenbridge tls init`)")
    return CliClient(url, url, secret, verify=verify, hint=hint)


def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` on a ``CliClient``; any failure becomes one sentence and exit 1."""
    client = getattr(fn, "__self__", None)
    where = getattr(client, "where", "the service")
    hint = getattr(client, "hint", "")
    try:
        return fn(*args, **kwargs)
    except TokenbridgeError as exc:
        fail(f"the service refused: {exc.detail} ({exc.code})")
    except httpx.TimeoutException:
        fail(f"the service at {where} did not answer in time; it may be busy or stuck: check its log")
    except httpx.HTTPError as exc:
        fail(_transport_sentence(where, hint, exc))
    except OSError as exc:
        fail(f"cannot reach the service at {where}: {exc.strerror or exc}; is `tokenbridge serve` running?")
    except ValueError:  # an answer that is not the service's JSON
        fail(f"{where} answered something that is not tokenbridge's API: check the URL")


def _transport_sentence(where: str, hint: str, exc: httpx.HTTPError) -> str:
    reason = str(exc) or type(exc).__name__
    if where.startswith("admin socket"):
        return (f"cannot reach the service on its {where} ({reason}): it is probably not running (the socket "
                "was left by a service that stopped); start it with `tokenbridge serve`")
    if "CERTIFICATE_VERIFY_FAILED" in reason:
        return f"the certificate of {where} cannot be verified ({reason}); {hint}"
    if "WRONG_VERSION_NUMBER" in reason or "record layer failure" in reason:
        return f"{where} does not answer in TLS: it serves plain HTTP; use an http:// URL"
    if isinstance(exc, httpx.ConnectError):
        return (f"cannot connect to the service at {where} ({reason}): check that `tokenbridge serve` runs "
                "there and the URL (--url, TOKENBRIDGE_SERVICE_URL or service_url)")
    if isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError)) and where.startswith("http://"):
        return (f"{where} closed the connection without an HTTP answer: the service probably serves HTTPS "
                f"only; use --url {where.replace('http://', 'https://', 1)} and --cacert DATA_DIR/tls/ca.pem")
    return f"the connection to {where} failed ({reason}); check the URL and that the service runs there"


def read_secret_file(path: Path, what: str) -> str:
    """A file holding a secret, PIN or password, or a sentence and exit 1."""
    try:
        return path.read_text(encoding="utf-8-sig").strip()
    except FileNotFoundError:
        fail(f"the {what} file {path} does not exist")
    except OSError as exc:
        fail(f"cannot read the {what} file {path}: {exc.strerror}")
    except UnicodeDecodeError:
        fail(f"the {what} file {path} is not text")


def shown(value: str) -> Text:
    """Text from the state database (written by clients) as a table cell: control characters shown as
    ``\\xNN`` and no rich markup interpreted, so that it cannot rewrite the operator's terminal."""
    return Text(printable(value))
