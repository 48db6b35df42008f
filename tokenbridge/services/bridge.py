"""The running bridge: settings, state store, audit, clients, the token owner and the operations over it.

Front ends (HTTP, CLI) build one ``Bridge`` and call its services; nothing
below this module knows about HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from tokenbridge.config import Settings, TokenSettings
from tokenbridge.drivers import resolve_module
from tokenbridge.services.keys import load_ca_pool
from tokenbridge.services.metrics import Metrics
from tokenbridge.services.operations import Operations
from tokenbridge.services.workers import Workers
from tokenbridge.state.audit import AuditLog, AuditUnavailable
from tokenbridge.state.clients import ClientRegistry
from tokenbridge.state.store import Store
from tokenbridge.token.owner import PINPAD, TokenSelector
from tokenbridge.token.process import TokenProcess

log = logging.getLogger("tokenbridge")


class PinUnavailable(Exception):
    pass


def read_pin(token: TokenSettings, prompted: str | None = None) -> str | None:
    """The PIN from its configured source. It is kept in memory only, and never logged."""
    if token.pin_source == "pinpad":
        return PINPAD
    if token.pin_source == "prompt":
        return prompted
    if token.pin_source == "env":
        value = os.environ.get(token.pin_env)
        if not value:
            raise PinUnavailable(f"pin_source is 'env' but ${token.pin_env} is empty")
        return value
    if token.pin_file is None:
        raise PinUnavailable("pin_source is 'file' but token.pin_file is not set")
    try:
        return token.pin_file.read_text().strip()
    except FileNotFoundError as exc:
        raise PinUnavailable(f"the PIN file {token.pin_file} does not exist (token.pin_file; pin_source is "
                             "'file')") from exc
    except OSError as exc:
        raise PinUnavailable(f"cannot read the PIN file {token.pin_file}: {exc.strerror}") from exc


def open_state(settings: Settings) -> tuple[Store, AuditLog, ClientRegistry]:
    store = Store(settings.store_path)
    return store, AuditLog(store), ClientRegistry(store)


class Bridge:
    def __init__(self, settings: Settings, pin: str | None = None) -> None:
        self.settings = settings
        self.store, self.audit, self.clients = open_state(settings)
        self.metrics = Metrics(settings.server.expiry_warning_days)
        module_path, self.driver = resolve_module(settings.token.module)
        self.module_path = Path(module_path)
        t = settings.token
        self.owner = TokenProcess(
            str(module_path),
            TokenSelector(label=t.label, serial=t.serial, slot=t.slot),
            pin,
            queue_size=t.queue_size,
            per_client_queue=t.client_queue_size,
            client_rate=t.client_rate,
            client_burst=t.client_burst,
            operation_timeout=t.operation_timeout,
            presence_interval=t.presence_interval,
            environment=t.environment,
            on_event=self._token_event,
            observer=self.metrics.observe_job,
            log_level=logging.getLevelName(log.getEffectiveLevel()),
        )
        self.metrics.watch(self.owner)
        self.operations = Operations(self.owner, self.audit, settings, self.metrics)
        self.ca_pool = load_ca_pool(settings.ca_files)
        self.workers = Workers(settings.server.parse_threads)

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """``loop``: the service's event loop, which then reads the token's answers itself."""
        status = self.owner.start(loop=loop)
        log.info("token %s: %s%s", status.label or "?", status.state,
                 f" ({status.message})" if status.message else "")

    def stop(self) -> None:
        self.owner.stop()
        self.workers.close()
        self.store.close()

    def _token_event(self, event: str, data: dict[str, object]) -> None:
        """Login attempts and state changes go to the audit log."""
        outcome = str(data.get("outcome") or data.get("to") or "ok")
        detail = ", ".join(f"{k}={v}" for k, v in data.items() if k != "outcome" and v is not None) or None
        try:
            self.audit.record("service", event, outcome, detail=detail)
        except AuditUnavailable:
            log.error("could not audit token event %s (%s)", event, outcome)
