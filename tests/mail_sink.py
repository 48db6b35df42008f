"""An SMTP peer the gateway tests control (aiosmtpd), and the configuration that points the gateway at it."""

from __future__ import annotations

import smtplib
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenbridge.tools.demo import DemoInfo


@dataclass
class Delivery:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes


@dataclass
class Smarthost:
    """The organisation's mail server, as far as the gateway sees it: records what it is given, answers as
    told (``answers``: one reply per DATA, then 250), and forwards mail for national.example onwards."""

    forward_to: int | None = None
    received: list[Delivery] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    rcpt_answers: dict[str, str] = field(default_factory=dict)
    data_attempts: int = 0

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: list[str]) -> str:
        if address in self.rcpt_answers:
            return self.rcpt_answers[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.data_attempts += 1
        if self.answers:
            return self.answers.pop(0)
        self.received.append(Delivery(envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        national = [r for r in envelope.rcpt_tos if r.endswith("@national.example")]
        if national and self.forward_to:
            threading.Thread(target=_forward, args=(self.forward_to, envelope.mail_from, national,
                                                    envelope.original_content), daemon=True).start()
        return "250 OK"

    def wait(self, predicate: Callable[[Delivery], bool], timeout: float = 30) -> Delivery:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for d in self.received:
                if predicate(d):
                    return d
            time.sleep(0.1)
        seen = [(d.mail_from, d.rcpt_tos) for d in self.received]
        raise AssertionError(f"nothing matching arrived; received: {seen}")


def _forward(port: int, mail_from: str, rcpts: list[str], data: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        c.sendmail(mail_from, rcpts, data)


def gateway_settings(smarthost_port: int, *, submission: int | None = None, inbound: int | None = None) -> str:
    """The TOML that turns the gateway on: the smarthost, quick retries, and the listeners asked for."""
    text = f"""
[smime.smtp]
host = "127.0.0.1"
port = {smarthost_port}
security = "none"

[mail]
hostname = "passerelle.org.example"

[mail.policy]
retry_first = 0.5
retry_max = 1
"""
    if submission:
        text += f'\n[mail.submission]\nlisten = "127.0.0.1:{submission}"\n'
    if inbound:
        text += f'\n[mail.inbound]\nlisten = "127.0.0.1:{inbound}"\n'
    return text


def gateway_config(demo: DemoInfo, name: str, smarthost_port: int, *, submission: int | None = None,
                   inbound: int | None = None, extra: str = "") -> Path:
    """The demo configuration plus a gateway: beside it, so that its relative paths hold."""
    config = demo.config_file.parent / name
    text = demo.config_file.read_text() + gateway_settings(smarthost_port, submission=submission, inbound=inbound)
    config.write_text(text + "\n" + extra)
    return config


@dataclass
class RunningGateway:
    """A service running the gateway, its smarthost (which forwards national mail to the simulator), the
    simulator (which answers to the gateway's inbound listener), and the ports."""

    service: Any
    smarthost: Smarthost
    submission: int
    inbound: int
    simulator: Any


@contextmanager
def running_gateway(demo: DemoInfo, name: str, state: Path) -> Iterator[RunningGateway]:
    from aiosmtpd.controller import Controller

    from tests.conftest import free_port, start_service
    from tokenbridge.tools.registry_sim import RegistrySimulator

    submission, inbound, relay_port, sim_port = free_port(), free_port(), free_port(), free_port()
    smarthost = Smarthost(forward_to=sim_port)
    relay = Controller(smarthost, hostname="127.0.0.1", port=relay_port)
    relay.start()
    simulator = RegistrySimulator(demo.pki_dir, reply_host="127.0.0.1", reply_port=inbound, port=sim_port)
    simulator.start()
    config = gateway_config(demo, name, relay_port, submission=submission, inbound=inbound,
                            extra='[mail.tracking]\nreference_pattern = "Dossier ([0-9]+)"\n')
    service = start_service(config, state)
    try:
        yield RunningGateway(service, smarthost, submission, inbound, simulator)
    finally:
        service.stop()
        simulator.stop()
        relay.stop()
