"""Delivery status notifications (RFC 3464): what a sender gets back when a message cannot be delivered.

A ``multipart/report; report-type=delivery-status`` with three parts: words for
a person (French first: the counters read French), the machine-readable
``message/delivery-status``, and the original's header (``text/rfc822-headers``),
so that a mail client shows which message bounced and why. Sent with the null
reverse-path (``MAIL FROM:<>``), so that a report never bounces in turn.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, make_msgid


@dataclass(frozen=True)
class Failure:
    """One recipient that will not get the message: ``status`` is an RFC 3463 code (``5.1.1``), ``diagnostic``
    the remote server's answer or the gateway's reason."""

    recipient: str
    status: str
    diagnostic: str
    remote_mta: str | None = None


def report(*, original_head: bytes, original_message_id: str | None, sender: str, reporting_mta: str,
           failures: Sequence[Failure], arrival: datetime, postmaster: str | None = None,
           now: datetime | None = None) -> tuple[bytes, str]:
    """The report as bytes (CRLF line endings) and its Message-ID."""
    now = now or datetime.now(UTC)
    message_id = make_msgid(domain=reporting_mta)
    boundary = "=_report_" + secrets.token_hex(12)
    head = EmailMessage(policy=SMTP)
    head["From"] = f"Passerelle de messagerie <{postmaster or 'mailer-daemon@' + reporting_mta}>"
    head["To"] = sender
    head["Subject"] = "Non remis : " + (_subject(original_head) or "votre message") + " (Undelivered Mail)"
    head["Date"] = format_datetime(now)
    head["Message-ID"] = message_id
    head["Auto-Submitted"] = "auto-replied"
    if original_message_id:
        head["In-Reply-To"] = original_message_id
        head["References"] = original_message_id
    head["MIME-Version"] = "1.0"
    head["Content-Type"] = f'multipart/report; report-type=delivery-status; boundary="{boundary}"'
    words = EmailMessage(policy=SMTP)
    words.set_content(_words(failures, original_message_id), charset="utf-8", cte="quoted-printable")
    del words["MIME-Version"]
    fields = [f"Reporting-MTA: dns; {reporting_mta}", f"Arrival-Date: {format_datetime(arrival)}"]
    per_recipient = []
    for f in failures:
        block = [f"Final-Recipient: rfc822; {f.recipient}", "Action: failed", f"Status: {f.status}"]
        if f.remote_mta:
            block.append(f"Remote-MTA: dns; {f.remote_mta}")
        block.append(f"Diagnostic-Code: smtp; {_one_line(f.diagnostic)[:900]}")
        block.append(f"Last-Attempt-Date: {format_datetime(now)}")
        per_recipient.append("\r\n".join(block))
    status = "\r\n".join(fields) + "\r\n\r\n" + "\r\n\r\n".join(per_recipient) + "\r\n"
    original = original_head.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n").rstrip(b"\r\n") + b"\r\n"
    cte = "7bit" if original.isascii() else "8bit"
    delim = f"--{boundary}\r\n".encode()
    body = b"".join([
        b"This is a delivery status notification (RFC 3464).\r\n\r\n",
        delim, words.as_bytes(),
        b"\r\n", delim, b"Content-Type: message/delivery-status\r\n\r\n", status.encode(),
        b"\r\n", delim, f"Content-Type: text/rfc822-headers\r\nContent-Transfer-Encoding: {cte}\r\n\r\n".encode(),
        original, b"\r\n", f"--{boundary}--\r\n".encode(),
    ])
    header = b"".join(SMTP.fold_binary(name, value) for name, value in head.items()) + b"\r\n"
    return header + body, message_id


def _words(failures: Sequence[Failure], message_id: str | None) -> str:
    lines = ["Votre message n'a pas pu être remis aux destinataires suivants :", ""]
    lines += [f"  {f.recipient} : {f.diagnostic}" for f in failures]
    lines += ["", "Le message n'a pas été envoyé à ces destinataires. Vérifiez l'adresse, ou demandez à "
              "l'administrateur de la passerelle (tokenbridge mail show) ce qui s'est passé.", ""]
    if message_id:
        lines += [f"Message-ID : {message_id}", ""]
    lines += ["--", "Your message could not be delivered to the recipients above; the reasons are given next "
              "to each address."]
    return "\n".join(lines) + "\n"


def _subject(head: bytes) -> str | None:
    import email

    parsed = email.message_from_bytes(head + b"\r\n", policy=SMTP)
    subject = parsed.get("Subject")
    return _one_line(str(subject))[:200] if subject else None


def _one_line(text: str) -> str:
    return " ".join(text.split())
