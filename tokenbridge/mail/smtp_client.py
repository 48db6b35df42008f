"""One delivery to the smarthost (``[smime.smtp]``), with each recipient's outcome.

Blocking (smtplib): called in a thread. Nothing here retries: the queue decides
what a temporary failure becomes. A recipient is ``delivered`` only when the
server accepted the DATA for it, ``permanent`` on a 5xx answer (RFC 5321), and
``temporary`` on a 4xx answer or when the connection, TLS or authentication
failed (a configuration mistake is fixed and retried, not bounced at once).
"""

from __future__ import annotations

import re
import smtplib
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

from tokenbridge.config import SmtpSettings

_ENHANCED = re.compile(r"\b([245]\.\d{1,3}\.\d{1,3})\b")


@dataclass
class Outcome:
    delivered: list[str] = field(default_factory=list)
    temporary: dict[str, str] = field(default_factory=dict)  # recipient -> the server's answer, or why
    permanent: dict[str, tuple[str, str]] = field(default_factory=dict)  # recipient -> (status, answer)
    remote: str | None = None


def tls_context(ca: object | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca)) if ca else ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def status_of(code: int, text: str) -> str:
    """The RFC 3463 status: the one the server wrote, else its class from the reply code."""
    m = _ENHANCED.search(text)
    if m and m.group(1)[0] == str(code)[0]:
        return m.group(1)
    return f"{str(code)[0]}.0.0"


def deliver(smtp: SmtpSettings, password: Callable[[], str], hostname: str, mail_from: str,
            recipients: list[str], message: bytes) -> Outcome:
    out = Outcome(remote=smtp.host)
    if smtp.host is None:
        out.temporary = {r: "no smarthost is configured ([smime.smtp] host)" for r in recipients}
        return out
    try:
        client: smtplib.SMTP = (
            smtplib.SMTP_SSL(smtp.host, smtp.port, local_hostname=hostname, timeout=smtp.timeout,
                             context=tls_context(smtp.ca))
            if smtp.security == "tls" else
            smtplib.SMTP(smtp.host, smtp.port, local_hostname=hostname, timeout=smtp.timeout))
    except (OSError, smtplib.SMTPException) as exc:
        out.temporary = {r: f"cannot connect to {smtp.host}:{smtp.port}: {_why(exc)}" for r in recipients}
        return out
    try:
        with client:
            client.ehlo()
            if smtp.security == "starttls":
                client.starttls(context=tls_context(smtp.ca))
                client.ehlo()
            if smtp.username:
                client.login(smtp.username, password())
            _transaction(client, mail_from, recipients, message, out)
    except smtplib.SMTPAuthenticationError as exc:
        out.temporary = {r: f"the smarthost refused the login: {exc.smtp_code} {_text(exc.smtp_error)}"
                         for r in recipients if r not in out.delivered}
    except (OSError, smtplib.SMTPException, ssl.SSLError) as exc:
        for r in recipients:
            if r not in out.delivered and r not in out.permanent:
                out.temporary[r] = f"{smtp.host}: {_why(exc)}"
    return out


def _transaction(client: smtplib.SMTP, mail_from: str, recipients: list[str], message: bytes, out: Outcome) -> None:
    options = [f"SIZE={len(message)}"] if client.has_extn("size") else []
    code, text = client.mail(mail_from, options)
    if code >= 400:
        _all(out, recipients, code, _text(text))
        client.rset()
        return
    accepted = []
    for r in recipients:
        code, text = client.rcpt(r)
        if code < 300:
            accepted.append(r)
        elif code < 500:
            out.temporary[r] = f"{code} {_text(text)}"
        else:
            out.permanent[r] = (status_of(code, _text(text)), f"{code} {_text(text)}")
    if not accepted:
        client.rset()
        return
    code, text = client.data(message)
    if code < 300:
        out.delivered.extend(accepted)
    else:
        _all(out, accepted, code, _text(text))


def _all(out: Outcome, recipients: list[str], code: int, text: str) -> None:
    for r in recipients:
        if code >= 500:
            out.permanent[r] = (status_of(code, text), f"{code} {text}")
        else:
            out.temporary[r] = f"{code} {text}"


def _text(raw: bytes | str) -> str:
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)


def _why(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"its TLS certificate is not trusted ({exc.verify_message}); set [smime.smtp] ca"
    if isinstance(exc, socket.timeout | TimeoutError):
        return "no answer in time"
    if isinstance(exc, smtplib.SMTPResponseException):
        return f"{exc.smtp_code} {_text(exc.smtp_error)}"
    return str(exc) or type(exc).__name__
