"""The mail gateway (issue 15): throughput with a 1 MB attachment against Postfix alone, card operations per
message, and recovery from SIGKILL.

- Throughput: the same messages (a 1 MB zip attached) go (a) to Postfix, which relays them to a sink, and
  (b) to the gateway, which signs and encrypts each with the card and hands it to the same Postfix, relayed to
  the same sink. Messages per second from the first submission to the last delivery, and the ratio.
- Card operations: the audit log's ``cms-sign`` entries of the gateway during the run, per message; then a run
  where the smarthost answers 451 to every first attempt (each message is delivered on its second try): the
  retries must cost none.
- Crash: 200 small messages submitted while the service is killed (SIGKILL) after a third are accepted;
  restarted at once; the time from the kill to the last accepted message delivered, and how many were lost.
"""

from __future__ import annotations

import io
import json
import re
import signal
import smtplib
import subprocess
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import replace
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any

from tokenbridge.tools.demo import DemoInfo
from tokenbridge.tools.demo_pki import ORG_EMAIL

NATIONAL = "sne@national.example"
_MSGID = re.compile(rb"^Message-ID:\s*(<[^>]+>)", re.IGNORECASE | re.MULTILINE)


def _zip(size: int) -> bytes:
    import os

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("pieces.bin", os.urandom(size))
    return buf.getvalue()


def _message(n: int, attachment: bytes) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = ORG_EMAIL
    msg["To"] = NATIONAL
    msg["Subject"] = f"Dossier {n}"
    msg["Message-ID"] = make_msgid(idstring=f"bench{n}", domain="guichet.hlm-demo.example")
    msg.set_content("Bonjour,\nla demande est jointe.\n")
    msg.add_attachment(attachment, maintype="application", subtype="zip", filename=f"demande-{n}.zip")
    return msg


def _submit(port: int, messages: list[EmailMessage]) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=120) as c:
        for m in messages:
            c.send_message(m)


def _ids(sink: Any) -> list[bytes]:
    return [m.group(1) for r in list(sink.messages) if (m := _MSGID.search(r.data.split(b"\r\n\r\n", 1)[0]))]


def _wait(sink: Any, wanted: set[bytes], timeout: float = 600) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if wanted <= set(_ids(sink)):
            return time.monotonic()
        time.sleep(0.02)
    raise RuntimeError(f"{len(wanted - set(_ids(sink)))} messages not delivered in {timeout}s")


def _card_signatures(config: Path, env: dict[str, str], py: str) -> int:
    out = subprocess.run([py, "-m", "tokenbridge", "audit", "tail", "-n", "100000", "--json", "--config", str(config)],
                         env=env, capture_output=True, text=True, check=True, timeout=120).stdout
    return sum(1 for line in out.splitlines() if line.strip() and (e := json.loads(line))["event"] == "cms-sign"
               and e["actor"].startswith("mail:"))


def run_mail(demo: DemoInfo, work: Path, reps: int, service: Callable[..., Any], py: str,
             count: int = 20, size: int = 1_000_000) -> dict[str, Any]:
    from tests import mailpeers

    if mailpeers.missing_binaries():
        return {"skipped": f"mail peers not installed ({', '.join(mailpeers.missing_binaries())})"}
    from tests.conftest import free_port

    sink = mailpeers.SmtpSink().start()
    peers = mailpeers.MailPeers(users=[ORG_EMAIL], routes={"national.example": ("127.0.0.1", sink.port)}).start()
    out: dict[str, Any] = {"messages": count, "attachment_bytes": size}
    try:
        submission = free_port()
        config = demo.config_file.parent / "bench-mail.toml"
        config.write_text(demo.config_file.read_text() + f"""
[smime.smtp]
host = "127.0.0.1"
port = {peers.postfix.smtp_port}
security = "none"

[mail]
hostname = "passerelle.hlm-demo.example"

[mail.submission]
listen = "127.0.0.1:{submission}"

[mail.policy]
retry_first = 0.2
retry_max = 0.5
""")
        attachment = _zip(size)
        rows = []
        for rep in range(reps):
            direct = [_message(10_000 * rep + n, attachment) for n in range(count)]
            t0 = time.monotonic()
            _submit(peers.postfix.smtp_port, direct)
            t_direct = _wait(sink, {m["Message-ID"].encode() for m in direct}) - t0
            with service(replace(demo, config_file=config), work, f"mail-{rep}") as srv:
                gated = [_message(10_000 * rep + 5000 + n, attachment) for n in range(count)]
                before = _card_signatures(config, srv.env, py)
                t0 = time.monotonic()
                _submit(submission, gated)
                t_gateway = _wait(sink, {m["Message-ID"].encode() for m in gated}) - t0
                signatures = _card_signatures(config, srv.env, py) - before
            rows.append({"direct_per_s": count / t_direct, "gateway_per_s": count / t_gateway,
                         "ratio": t_direct / t_gateway, "card_signatures_per_message": signatures / count})
        out["rows"] = rows
        out["retries"] = _retries(demo, work, service, py, config, sink, submission, attachment)
        out["crash"] = _crash(demo, work, service, config, sink, submission)
    finally:
        peers.stop()
        sink.stop()
    return out


def _retries(demo: DemoInfo, work: Path, service: Callable[..., Any], py: str, config: Path, sink: Any,
             submission: int, attachment: bytes, count: int = 10) -> dict[str, Any]:
    """Every first delivery attempt answered 451 by the sink (through Postfix, which retries it itself, the
    gateway sees a success: so this run points the gateway at the sink directly)."""
    direct_config = config.with_name("bench-mail-retry.toml")
    direct_config.write_text(re.sub(r"(\[smime\.smtp\]\nhost = \"127\.0\.0\.1\"\nport = )\d+",
                                    lambda m: f"{m.group(1)}{sink.port}", config.read_text()))
    with service(replace(demo, config_file=direct_config), work, "mail-retry") as srv:
        messages = [_message(90_000 + n, attachment[:10_000]) for n in range(count)]
        sink.answers.extend(["451 4.3.0 try again"] * count)
        before = _card_signatures(direct_config, srv.env, py)
        _submit(submission, messages)
        _wait(sink, {m["Message-ID"].encode() for m in messages})
        signatures = _card_signatures(direct_config, srv.env, py) - before
    return {"messages": count, "refused_first": count, "card_signatures": signatures}


def _crash(demo: DemoInfo, work: Path, service: Callable[..., Any], config: Path, sink: Any, submission: int,
           total: int = 200) -> dict[str, Any]:
    accepted: list[bytes] = []
    small = b"PK" + b"x" * 2000
    from bench.run import Server

    with service(replace(demo, config_file=config), work, "mail-crash") as srv:
        def submit() -> None:
            for n in range(total):
                msg = _message(50_000 + n, small)
                try:
                    with smtplib.SMTP("127.0.0.1", submission, timeout=10) as c:
                        c.send_message(msg)
                    accepted.append(msg["Message-ID"].encode())
                except (OSError, smtplib.SMTPException):
                    time.sleep(0.02)

        sender = threading.Thread(target=submit)
        sender.start()
        while len(accepted) < total // 3:
            time.sleep(0.005)
        srv.proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        srv.proc.wait(10)
        at_kill = len(accepted)
        again = Server(srv.cmd, srv.env, srv.port, srv.logfile.with_name("service-after-kill.log"), "/v1/health")
        try:
            sender.join(300)
            done = _wait(sink, set(accepted), 300)
        finally:
            again.stop()
        delivered = [i for i in _ids(sink) if i in set(accepted)]
    return {"submitted": total, "accepted_at_kill": at_kill, "accepted": len(accepted),
            "seconds_kill_to_all_delivered": done - killed, "lost": len(set(accepted) - set(delivered)),
            "delivered_twice": len(delivered) - len(set(delivered))}


def report(res: dict[str, Any]) -> list[str]:
    if "skipped" in res:
        return [f"Mail gateway: skipped ({res['skipped']})"]
    lines = [f"### Mail gateway ({res['messages']} messages, {res['attachment_bytes'] / 1e6:.0f} MB attached)", "",
             "| run | Postfix alone msg/s | through the gateway msg/s | ratio | card signatures per message |",
             "|---|---|---|---|---|"]
    for i, r in enumerate(res["rows"], 1):
        lines.append(f"| {i} | {r['direct_per_s']:.2f} | {r['gateway_per_s']:.2f} | {r['ratio']:.2f}x | "
                     f"{r['card_signatures_per_message']:.2f} |")
    rt, cr = res["retries"], res["crash"]
    lines += ["", f"Retries: {rt['messages']} messages, each refused once (451): {rt['card_signatures']} card "
                  f"signatures.",
              f"SIGKILL after {cr['accepted_at_kill']} of {cr['submitted']} submissions accepted: "
              f"{cr['accepted']} accepted in all, every one delivered {cr['seconds_kill_to_all_delivered']:.1f} s "
              f"after the kill; lost {cr['lost']}, delivered twice {cr['delivered_twice']}."]
    return lines


def targets(res: dict[str, Any]) -> list[dict[str, str]]:
    if "skipped" in res:
        return []
    per = max(r["card_signatures_per_message"] for r in res["rows"])
    ratios = [r["ratio"] for r in res["rows"]]
    return [
        {"target": "card signatures per message through the gateway", "wanted": "exactly 1, none on retries",
         "measured": f"{per:.2f}; {res['retries']['card_signatures']} for {res['retries']['messages']} messages "
                     "retried once", "met": "yes" if per == 1 and res["retries"]["card_signatures"] ==
         res["retries"]["messages"] else "no"},
        {"target": "gateway throughput vs Postfix alone (1 MB attachment)", "wanted": "measured (ratio)",
         "measured": f"{min(ratios):.2f}x .. {max(ratios):.2f}x", "met": "n/a"},
        {"target": "accepted messages lost after SIGKILL (200 submitted)", "wanted": "0",
         "measured": f"{res['crash']['lost']} (all delivered {res['crash']['seconds_kill_to_all_delivered']:.1f} s "
                     "after the kill)", "met": "yes" if res["crash"]["lost"] == 0 else "no"},
    ]
