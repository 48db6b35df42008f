"""CLI for sharing over the LAN: the TLS listener's certificate, workstation enrolment, relay mode."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from tokenbridge.cli.clients import FORCE_HELP, KEYS_HELP, check_keys
from tokenbridge.cli.common import ConfigOpt, console, fail, load
from tokenbridge.config import Settings

tls_app = typer.Typer(help="The TLS listener's certificate (from the bridge's own CA).", no_args_is_help=True)
workstations_app = typer.Typer(help="Workstations: machines that authenticate with a certificate.",
                               no_args_is_help=True)


@tls_app.command("init")
def tls_init(hostname: Annotated[list[str], typer.Option("--hostname", help="DNS name or IP the workstations "
                                                                            "use (repeatable).")],
             config: ConfigOpt = None,
             ca_from: Annotated[Path | None, typer.Option(
                 "--ca-from", help="Another hub's tls directory (ca.pem, ca.key): share its bridge CA, for hubs "
                                   "behind one front (docs/deployment.md).")] = None) -> None:
    """Create the bridge CA (once) and a server certificate; print its fingerprint for pinning."""
    from tokenbridge.services.bridge_ca import CaError, import_ca, issue_server_certificate

    settings = load(config)
    if ca_from is not None:
        try:
            ca = import_ca(settings.data_dir, ca_from.expanduser())
        except CaError as exc:
            fail(str(exc))
        console.print(f"bridge CA shared with {ca_from}: {ca.subject.rfc4514_string()}", soft_wrap=True)
    issued = issue_server_certificate(settings.data_dir, hostname)
    console.print(f"server certificate {issued.cert} for {', '.join(hostname)}")
    console.print("SHA-256 fingerprint (give it to relays as --hub-fingerprint):")
    print(issued.fingerprint)
    console.print("serve on the LAN with: tokenbridge serve --host 0.0.0.0")


@workstations_app.command("enroll")
def enroll(name: str,
           grant: Annotated[str, typer.Option(help="Comma-separated grants (sign, decrypt, ...).")],
           keys: Annotated[str | None, typer.Option("--keys", help=KEYS_HELP)] = None,
           output: Annotated[Path | None, typer.Option("-o", "--output", help="PKCS#12 file to write.")] = None,
           config: ConfigOpt = None,
           as_json: Annotated[bool, typer.Option("--json", help="Print {name, credential, password}.")] = False,
           force: Annotated[bool, typer.Option("--force", help=FORCE_HELP)] = False) -> None:
    """Issue a workstation certificate (PKCS#12 with a one-time password); it authenticates by mutual TLS."""
    from tokenbridge.services.bridge import open_state

    settings = load(config)
    key_names = [k.strip() for k in (keys or "").split(",") if k.strip()]
    check_keys(settings, key_names, force)
    _, audit, registry = open_state(settings)
    target, password, sha256 = _issue(settings, name, output, lambda sha256, not_after: registry.add(
        name, [g.strip() for g in grant.split(",") if g.strip()], key_names, kind="workstation",
        cert_sha256=sha256, cert_not_after=not_after))
    audit.record("operator", "workstation_enrolled", "ok", detail=f"name={name}, grants={grant}, "
                 f"cert_sha256={sha256}")
    _show_credential(name, target, password, as_json)


def _issue(settings: Settings, name: str, output: Path | None,
           register: Callable[[str, str], object]) -> tuple[Path, str, str]:
    """A new certificate for ``name``: recorded by ``register(fingerprint, notAfter)`` (ISO 8601, UTC: the
    admin page shows when it expires), then written as PKCS#12. Returns the file, its password and the
    certificate's SHA-256."""
    from tokenbridge.services.bridge_ca import fingerprint, issue_workstation
    from tokenbridge.state.clients import ClientError

    p12, password, cert = issue_workstation(settings.data_dir, name)
    sha256 = fingerprint(cert)
    try:
        register(sha256, cert.not_valid_after_utc.isoformat())
    except ClientError as exc:
        fail(str(exc))
    return _write_credential(output or settings.data_dir / "workstations" / f"{name}.p12", p12), password, sha256


def _write_credential(target: Path, p12: bytes) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(p12)
    return target


def _show_credential(name: str, target: Path, password: str, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"name": name, "credential": str(target), "password": password}))
    else:
        console.print(f"workstation [bold]{name}[/bold]: credential {target}")
        console.print("the file's password (give it by another channel than the file):")
        print(password)


@workstations_app.command("renew")
def renew(name: str,
          output: Annotated[Path | None, typer.Option("-o", "--output", help="PKCS#12 file to write.")] = None,
          config: ConfigOpt = None,
          as_json: Annotated[bool, typer.Option("--json", help="Print {name, credential, password}.")] = False
          ) -> None:
    """A new certificate for a workstation (same name, grants and keys). The one in use keeps working
    until the workstation first connects with the new one: for a lost or stolen credential, revoke instead."""
    from tokenbridge.services.bridge import open_state

    settings = load(config)
    _, audit, registry = open_state(settings)
    current = registry.get(name)
    if current is None or current.kind != "workstation" or current.revoked:
        fail(f"no active workstation named {name!r}")
    target, password, sha256 = _issue(settings, name, output,
                                      lambda sha256, not_after: registry.renew_certificate(name, sha256, not_after))
    audit.record("operator", "workstation_renewed", "ok", detail=f"name={name}, cert_sha256={sha256}, "
                 f"previous={current.prev_cert_sha256 or current.cert_sha256}")
    _show_credential(name, target, password, as_json)


@workstations_app.command("list")
def workstations_list(config: ConfigOpt = None,
                      as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Enrolled workstations."""
    from tokenbridge.services.bridge import open_state

    _, _, registry = open_state(load(config))
    items = [c for c in registry.list() if c.kind == "workstation"]
    if as_json:
        print(json.dumps([{"name": c.name, "grants": sorted(c.grants), "keys": sorted(c.keys),
                           "cert_sha256": c.cert_sha256, "previous_cert_sha256": c.prev_cert_sha256,
                           "created": c.created, "last_seen": c.last_seen, "revoked": c.revoked} for c in items]))
        return
    table = Table(title="workstations")
    for col in ("name", "grants", "certificate sha256", "last seen", "revoked"):
        table.add_column(col)
    for c in items:
        renewal = " (renewed: the previous one works until this one is used)" if c.prev_cert_sha256 else ""
        table.add_row(c.name, ",".join(sorted(c.grants)), (c.cert_sha256 or "")[:16] + renewal, c.last_seen or "",
                      c.revoked or "")
    console.print(table)


@workstations_app.command("revoke")
def workstations_revoke(name: str, config: ConfigOpt = None) -> None:
    """Revoke a workstation: its certificate stops working at its next request, open connections included."""
    from tokenbridge.services.bridge import open_state
    from tokenbridge.state.clients import ClientError

    _, audit, registry = open_state(load(config))
    client = registry.get(name)
    if client is None or client.kind != "workstation":
        fail(f"no workstation named {name!r}")
    try:
        registry.revoke(name)
    except ClientError as exc:
        fail(str(exc))
    audit.record("operator", "workstation_revoked", "ok", detail=f"name={name}")
    console.print(f"revoked workstation {name}")


def relay(hub: Annotated[str, typer.Option(help="The hub's URL, e.g. https://hub.example:8155.")],
          credential: Annotated[Path, typer.Option(help="This workstation's PKCS#12 file.")],
          listen: Annotated[str, typer.Option(help="Local address for the counters' software.")] = "127.0.0.1:8155",
          hub_fingerprint: Annotated[list[str] | None, typer.Option(
              help="SHA-256 of the hub's certificate (from `tokenbridge tls init`); repeat it for each hub "
                   "behind a front.")] = None,
          local_auth: Annotated[str, typer.Option(help="pass-through: local software sends its own secret; "
                                                       "none: the workstation's certificate alone.")]
          = "pass-through",
          password_file: Annotated[Path | None, typer.Option(help="File holding the credential's password "
                                                                  "(e.g. a systemd credential).")] = None) -> None:
    """Serve the /v1 API on this machine, forwarding to the hub over mutual TLS."""
    from tokenbridge.relay.app import RelayError, run_relay

    if password_file is not None:
        from tokenbridge.cli.common import read_secret_file

        password: str | None = read_secret_file(password_file, "password")
    else:
        password = os.environ.get("TOKENBRIDGE_CREDENTIAL_PASSWORD")
    if password is None:
        import getpass
        import sys

        if not sys.stdin.isatty():
            fail("give --password-file or set TOKENBRIDGE_CREDENTIAL_PASSWORD (no terminal to ask the "
                  "credential's password on)")
        password = getpass.getpass("Credential password: ")
    if local_auth not in ("pass-through", "none"):
        fail("--local-auth is pass-through or none")
    try:
        run_relay(hub, credential, password, listen, hub_fingerprint or [], local_auth)
    except RelayError as exc:
        fail(str(exc))
