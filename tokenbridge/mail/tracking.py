"""Applications and their replies: which reply answers which application, its registration number, and
who is told when a reply is late.

A reply is matched by In-Reply-To, then References (RFC 5322), to the Message-ID
of an application; mail systems on the way may drop those headers, so a
configurable pattern (``[mail.tracking] reference_pattern``) read in both
subjects is the fallback. The registration number is read in the reply's text
and subject by ``number_pattern`` (case-insensitive).
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, make_msgid

from tokenbridge.config import TrackingSettings
from tokenbridge.state.mail import MailQueue, Outbound

_MSGID = re.compile(r"<[^<>\s]+>")


def message_ids(in_reply_to: str | None, references: str | None) -> list[str]:
    """Candidate Message-IDs, the most direct first."""
    out: list[str] = []
    for mid in _MSGID.findall(in_reply_to or "") + list(reversed(_MSGID.findall(references or ""))):
        if mid not in out:
            out.append(mid)
    return out


def find_application(queue: MailQueue, settings: TrackingSettings, *, in_reply_to: str | None,
                     references: str | None, subject: str | None) -> Outbound | None:
    app = queue.by_message_id(message_ids(in_reply_to, references))
    if app is not None or not settings.reference_pattern or not subject:
        return app
    m = re.search(settings.reference_pattern, subject, re.IGNORECASE)
    return queue.by_reference(m.group(1)) if m and m.groups() else None


def registration_number(settings: TrackingSettings, *texts: str | None) -> str | None:
    pattern = re.compile(settings.number_pattern, re.IGNORECASE)
    for text in texts:
        if text and (m := pattern.search(text)) and m.groups():
            return m.group(1)
    return None


def overdue_notice(hostname: str, to: str, late: list[Outbound], reply_due: float) -> tuple[bytes, str]:
    """A plain message telling the administrator which applications have no reply yet."""
    lines = [f"Ces demandes n'ont pas reçu de réponse du système national dans les {reply_due / 3600:.0f} heures :",
             ""]
    for app in late:
        lines.append(f"  n° {app.id}  envoyée le {time.strftime('%d/%m/%Y %H:%M', time.localtime(app.sent or 0))}  "
                     f"par {app.submitter}  « {app.subject or '(sans objet)'} »  {app.message_id}")
    lines += ["", "Détail : tokenbridge mail show N° ; liste : tokenbridge mail list --state overdue", ""]
    return _notice(hostname, to, f"{len(late)} demande(s) sans réponse après {reply_due / 3600:.0f} h", lines)


def failure_notice(hostname: str, to: str, app: Outbound, failures: list[tuple[str, str]]) -> tuple[bytes, str]:
    """A plain message telling the administrator that an application bounced (its sender got the report)."""
    lines = [f"La demande n° {app.id} (« {app.subject or '(sans objet)'} », envoyée par {app.submitter}, "
             f"{app.message_id}) n'a pas pu être remise :", ""]
    lines += [f"  {recipient} : {why}" for recipient, why in failures]
    lines += ["", f"L'expéditeur ({app.envelope_from}) a reçu un avis de non-remise. Après correction : "
              f"tokenbridge mail retry {app.id}", ""]
    return _notice(hostname, to, f"Demande non remise : {app.subject or app.message_id}", lines)


def _notice(hostname: str, to: str, subject: str, lines: list[str]) -> tuple[bytes, str]:
    """A message from the gateway to the administrator (sent with the null sender), and its Message-ID."""
    msg = EmailMessage(policy=SMTP)
    msg["From"] = f"Passerelle tokenbridge <mailer-daemon@{hostname}>"
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = format_datetime(datetime.now(UTC))
    message_id = make_msgid(domain=hostname)
    msg["Message-ID"] = message_id
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content("\n".join(lines), charset="utf-8", cte="quoted-printable")
    return msg.as_bytes(), message_id
