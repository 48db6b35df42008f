"""``tokenbridge smime send|open``: S/MIME mail through a running service, as a counter's software would.

The service URL comes from ``--url``, ``$TOKENBRIDGE_SERVICE_URL`` (or the older ``$TOKENBRIDGE_URL``),
the configuration's ``service_url`` or its ``[server]`` address (https when the service serves TLS); an
https service is verified with ``--cacert``, else the bridge CA (DATA_DIR/tls/ca.pem) and the system's CAs.
The client secret comes from ``--secret``, ``$TOKENBRIDGE_SECRET`` or ``--secret-file``.
"""

from __future__ import annotations

import base64
import json
import mimetypes
import re
from pathlib import Path
from typing import Annotated, Any

import typer

from tokenbridge.cli.common import (
    BRIDGE_CA_HELP,
    URL_HELP,
    CliClient,
    call,
    console,
    fail,
    read_secret_file,
    remote,
)

app = typer.Typer(help="S/MIME mail through the running service: send (sign, encrypt and send a message) and "
                       "open (decrypt and verify one). The service is reached over HTTP(S) with a client "
                       "secret; for a service on TLS, --cacert DATA_DIR/tls/ca.pem trusts the bridge CA.",
                  no_args_is_help=True)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML file (for the service's address "
                                                                       "and the bridge CA).", show_default=False)]
UrlOpt = Annotated[str | None, typer.Option("--url", help=URL_HELP, show_default=False)]
CacertOpt = Annotated[Path | None, typer.Option("--cacert", help=BRIDGE_CA_HELP, show_default=False)]
SecretOpt = Annotated[str | None, typer.Option("--secret", envvar="TOKENBRIDGE_SECRET", show_envvar=True,
                                               help="Client secret.")]
SecretFileOpt = Annotated[Path | None, typer.Option("--secret-file", help="File holding the client secret.")]


def _client(config: Path | None, url: str | None, secret: str | None, secret_file: Path | None,
            cacert: Path | None) -> CliClient:
    if secret is None and secret_file is not None:
        secret = read_secret_file(secret_file, "secret")
    if not secret:
        fail("no client secret: --secret, $TOKENBRIDGE_SECRET or --secret-file")
    return remote(config, url, secret, cacert)


@app.command("send")
def send(to: Annotated[list[str], typer.Option("--to", help="E-mail address (repeatable).")],
         recipient: Annotated[list[str], typer.Option("--recipient", "-r",
                                                      help="Encrypt to this address-book name (repeatable).")],
         attach: Annotated[list[Path] | None, typer.Option("--attach", "-a", help="File to attach.")] = None,
         subject: Annotated[str, typer.Option(help="Subject.")] = "",
         text: Annotated[str, typer.Option(help="Message text.")] = "",
         sender: Annotated[str | None, typer.Option("--from", help="From (default: the certificate's).")] = None,
         sign_key: Annotated[str | None, typer.Option(help="Signing key (default: the e-mail key).")] = None,
         save: Annotated[Path | None, typer.Option(help="Only compose, and write the .eml here.")] = None,
         as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
         config: ConfigOpt = None, url: UrlOpt = None, secret: SecretOpt = None,
         secret_file: SecretFileOpt = None, cacert: CacertOpt = None) -> None:
    """Compose a signed message encrypted to RECIPIENT (and the organisation), and send it."""
    attachments = []
    for path in attach or []:
        try:
            data = path.read_bytes()
        except OSError as exc:
            fail(f"cannot read {path}: {exc.strerror}")
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        attachments.append({"filename": path.name, "content_type": content_type,
                            "data": base64.b64encode(data).decode()})
    message: dict[str, Any] = {"to": to, "subject": subject, "text": text, "attachments": attachments,
                               "sign_key": sign_key, "encrypt_to": recipient}
    if sender:
        message["from"] = sender
    with _client(config, url, secret, secret_file, cacert) as client:
        if save is not None:
            composed = call(client.smime_compose, message)
            try:
                save.write_bytes(composed)
            except OSError as exc:
                fail(f"cannot write {save}: {exc.strerror}")
            console.print(f"written {save}")
            return
        result = call(client.smime_send, message)
    if as_json:
        print(json.dumps(result))
    else:
        console.print(f"sent {result['message_id']} to {', '.join(result['recipients'])}")


_SAFE = re.compile(r"[^A-Za-z0-9._ -]")


@app.command("open")
def open_(message: Annotated[Path, typer.Argument(help="The .eml to open.")],
          output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the attachments here.")] = None,
          as_json: Annotated[bool, typer.Option("--json", help="Print the service's JSON.")] = False,
          config: ConfigOpt = None, url: UrlOpt = None, secret: SecretOpt = None,
          secret_file: SecretFileOpt = None, cacert: CacertOpt = None) -> None:
    """Decrypt and verify a message; print who signed it; write its attachments to --output DIR."""
    try:
        raw = message.read_bytes()
    except OSError as exc:
        fail(f"cannot read {message}: {exc.strerror}")
    with _client(config, url, secret, secret_file, cacert) as client:
        result = call(client.smime_open, raw)
    written = []
    if output is not None:
        import email
        import email.policy

        try:
            output.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            fail(f"cannot create the directory {output}: {exc.strerror}")
        inner = email.message_from_bytes(base64.b64decode(result["message"]), policy=email.policy.default)
        for i, part in enumerate(p for p in inner.walk() if not p.is_multipart()):
            name = part.get_filename()
            if name is None and part.get_content_disposition() != "attachment":
                continue
            safe = _SAFE.sub("_", Path(name or f"attachment-{i}").name).lstrip(".") or f"attachment-{i}"
            payload = part.get_payload(decode=True)
            try:
                (output / safe).write_bytes(payload if isinstance(payload, bytes) else b"")
            except OSError as exc:
                fail(f"cannot write {output / safe}: {exc.strerror}")
            written.append(str(output / safe))
    if as_json:
        print(json.dumps({**result, "written": written}))
        raise typer.Exit(0 if result["valid"] else 2)
    signer = (result.get("signer") or {}).get("subject", "-")
    state = "[green]valid[/green]" if result["valid"] else f"[red]NOT valid[/red]: {result['reason']}"
    console.print(f"from: {result.get('from')}\nsubject: {result.get('subject')}\n"
                  f"encrypted: {result['encrypted']}  signed: {result['signed']}  signature: {state}\n"
                  f"signer: {signer}")
    if result.get("text"):
        console.print(result["text"], markup=False, highlight=False)
    for a in result["attachments"]:
        console.print(f"  {a['filename']}  {a['content_type']}  {a['size']} bytes  sha256 {a['sha256']}")
    for path in written:
        console.print(f"written {path}")
    raise typer.Exit(0 if result["valid"] else 2)
