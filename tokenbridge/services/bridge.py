"""The running bridge: settings, state store, audit, clients, the token owner and the operations over it.

Front ends (HTTP, CLI) build one ``Bridge`` and call its services; nothing
below this module knows about HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

from tokenbridge.config import Settings, TokenSettings
from tokenbridge.drivers import resolve_module
from tokenbridge.services.keys import load_ca_pool
from tokenbridge.services.metrics import Metrics
from tokenbridge.services.operations import Operations
from tokenbridge.services.tokens import TokenSet
from tokenbridge.services.workers import Workers
from tokenbridge.state.audit import AuditLog, AuditUnavailable
from tokenbridge.state.clients import ClientRegistry
from tokenbridge.state.store import Store, open_store
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
    """The store (SQLite in data_dir, or the PostgreSQL database hubs share), the audit log and clients.
    On PostgreSQL each hub appends to its own audit chain (``state.hub``)."""
    url = settings.state.database_url
    store = open_store(settings.store_path, url)
    return store, AuditLog(store, hub=settings.state.hub if url else None), ClientRegistry(store)


def read_pins(settings: Settings, prompted: dict[str, str] | None = None) -> dict[str, str | None]:
    """Every token's PIN, by token name; PinUnavailable names the token when there are several."""
    pins: dict[str, str | None] = {}
    tables = settings.token_tables
    for name, table in tables.items():
        try:
            pins[name] = read_pin(table, (prompted or {}).get(name))
        except PinUnavailable as exc:
            if len(tables) == 1:
                raise
            raise PinUnavailable(f"token {name!r}: {exc}".replace("token.pin_file", f"tokens.{name}.pin_file")) \
                from exc
    return pins


class Bridge:
    def __init__(self, settings: Settings, pins: dict[str, str | None] | None = None) -> None:
        """``pins``: by token name (``read_pins``); a token without one waits for `tokenbridge login`."""
        self.settings = settings
        self.store, self.audit, self.clients = open_state(settings)
        self.metrics = Metrics(settings.server.expiry_warning_days)
        processes: dict[str, TokenProcess] = {}
        for name, t in settings.token_tables.items():
            module_path, _profile = resolve_module(t.module)
            processes[name] = TokenProcess(
                str(module_path),
                TokenSelector(label=t.label, serial=t.serial, slot=t.slot),
                (pins or {}).get(name),
                queue_size=t.queue_size,
                per_client_queue=t.client_queue_size,
                client_rate=t.client_rate,
                client_burst=t.client_burst,
                operation_timeout=t.operation_timeout,
                presence_interval=t.presence_interval,
                environment=t.environment,
                on_event=self._token_event_of(name, len(settings.token_tables) > 1),
                observer=self.metrics.observe_job,
                log_level=logging.getLevelName(log.getEffectiveLevel()),
                name=name,
            )
        self.tokens = TokenSet(settings, processes)
        self.metrics.watch(self.tokens)
        self.operations = Operations(self.tokens, self.audit, settings, self.metrics)
        self.ca_pool = load_ca_pool(settings.ca_files)
        self.workers = Workers(settings.server.parse_threads)

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """``loop``: the service's event loop, which then reads the tokens' answers itself."""
        for name, status in self.tokens.start(loop=loop).items():
            log.info("token %s (%s): %s%s", name, status.label or "?", status.state,
                     f" ({status.message})" if status.message else "")

    def stop(self) -> None:
        self.tokens.stop()
        self.workers.close()
        self.store.close()

    def _token_event_of(self, name: str, several: bool) -> Callable[[str, dict[str, object]], None]:
        def on_event(event: str, data: dict[str, object]) -> None:
            self._token_event(event, {"token": name, **data} if several else data)
        return on_event

    def _token_event(self, event: str, data: dict[str, object]) -> None:
        """Login attempts and state changes go to the audit log."""
        outcome = str(data.get("outcome") or data.get("to") or "ok")
        detail = ", ".join(f"{k}={v}" for k, v in data.items() if k != "outcome" and v is not None) or None
        try:
            self.audit.record("service", event, outcome, detail=detail)
        except AuditUnavailable:
            log.error("could not audit token event %s (%s)", event, outcome)
