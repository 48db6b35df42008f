"""``tokenbridge doctor``: what an operator checks first when something does not work.

Asks the running service when there is one (so the card sees no second user);
otherwise opens the token itself, logging in at most once.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import httpx
from rich.console import Console
from rich.text import Text

from tokenbridge.client import Client, TokenbridgeError
from tokenbridge.config import SINGLE_TOKEN, Settings, TokenSettings
from tokenbridge.drivers import DriverNotFound, resolve_module
from tokenbridge.services.keys import Validity, validity


class Report:
    def __init__(self, console: Console) -> None:
        self.console = console
        self.errors = 0
        self.warnings = 0

    def ok(self, msg: str) -> None:
        self.console.print(Text.assemble(("ok", "green"), "    ", msg))

    def warn(self, msg: str) -> None:
        self.warnings += 1
        self.console.print(Text.assemble(("warn", "yellow"), "  ", msg))

    def fail(self, msg: str) -> None:
        self.errors += 1
        self.console.print(Text.assemble(("FAIL", "red"), "  ", msg))


def _from_service(settings: Settings) -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
    path = settings.server.admin_socket
    if path is None or not path.exists():
        return None
    try:
        with Client(uds=str(path), timeout=10) as c:
            return c.tokens(), c.keys()
    except (TokenbridgeError, OSError, httpx.TransportError):
        return None


def _in_process(settings: Settings) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, str]]:
    """Every token's status and keys, opened here; and, by token, why there is no PIN to try."""
    from tokenbridge.api.v1 import key_views, named_token_view
    from tokenbridge.services.bridge import Bridge, PinUnavailable, read_pin

    pins: dict[str, str | None] = {}
    no_pin: dict[str, str] = {}
    for name, table in settings.token_tables.items():
        try:
            pins[name] = read_pin(table)
        except PinUnavailable as exc:
            pins[name], no_pin[name] = None, str(exc)
    bridge = Bridge(settings, pins)
    try:
        bridge.start()
        tokens = [named_token_view(bridge, name, status) for name, status in bridge.tokens.statuses().items()]
        return tokens, key_views(bridge), no_pin
    finally:
        bridge.stop()


def _pin_flags(pin: dict[str, bool]) -> str:
    """What the token says of its user PIN (PKCS#11 gives flags, not a number of tries left)."""
    if pin["locked"]:
        said = "LOCKED (CKF_USER_PIN_LOCKED): no try left"
    elif pin["final_try"]:
        said = "one try left (CKF_USER_PIN_FINAL_TRY)"
    elif pin["count_low"]:
        said = "fewer tries left than in full (CKF_USER_PIN_COUNT_LOW: a wrong PIN was entered since the last " \
               "right one)"
    else:
        said = "no failed try reported"
    return f"the token reports for the user PIN: {said}; the card does not say how many tries are left"


def _fix_the_pin(t: TokenSettings) -> str:
    where = {"file": f"the PIN file {t.pin_file}", "env": f"${t.pin_env}"}.get(t.pin_source)
    if where is None:
        return "give the right PIN with `tokenbridge login` while the service runs"
    return (f"fix {where} before the service next starts: it tries the configured PIN once at each start "
            "and each refusal uses one of the card's tries; while it runs, `tokenbridge login` gives it the "
            "right PIN")


def run_doctor(settings: Settings, console: Console) -> int:
    r = Report(console)
    tables = settings.token_tables
    for name, table in tables.items():
        try:
            path, profile = resolve_module(table.module)
            r.ok((f"token {name}: " if len(tables) > 1 else "") + f"module {path}"
                 + (f" (profile {profile.name})" if profile else ""))
        except DriverNotFound as exc:
            r.fail(str(exc))
            return 1
    found = _from_service(settings)
    no_pin: dict[str, str] = {}
    if found is not None:
        r.ok("service is running; asking it (no second login)")
        tokens, keys = found
    else:
        tokens, keys, no_pin = _in_process(settings)
    ready = True
    for token in tokens:
        name = token.get("name", SINGLE_TOKEN)
        table = tables.get(name, settings.token)
        prefix = f"token {name}: " if len(tables) > 1 else ""
        mine = [k for k in keys if k.get("token", name) == name]
        fatal = _check_token(r, prefix, table, token, mine, no_pin.get(name), settings.server.expiry_warning_days)
        if fatal and (len(tables) == 1 or table.required):
            return 1
        ready = ready and (token["state"] == "ready" or not table.required)
    in_service = [k for k in keys if k.get("state", "active") == "active"]
    certs = [k["certificate"] for k in in_service if k.get("certificate")]
    if ready:
        if any("keyEncipherment" in c["key_usage"] for c in certs):
            r.ok("a certificate has keyEncipherment (needed to decrypt the national system's replies)")
        else:
            r.fail("no certificate has keyEncipherment: replies from the national system cannot be decrypted")
        if any("digitalSignature" in c["key_usage"] for c in certs):
            r.ok("a certificate has digitalSignature (signing, TLS client authentication)")
        else:
            r.fail("no certificate has digitalSignature: cannot sign or authenticate")
    from tokenbridge.services.proxy import doctor_upstreams

    doctor_upstreams(settings, r, token_ready=ready)  # mTLS upstreams (docs/tls-proxy.md)
    _check_hubs(settings, r)  # several hubs on one database: the others that are down
    console.print(f"{r.errors} error(s), {r.warnings} warning(s)")
    return 1 if r.errors else 0


def _check_hubs(settings: Settings, r: Report) -> None:
    """With ``[state] database_url``: the other hubs sharing the database, from their heartbeat rows (as
    ``tokenbridge hubs``): a warning for each one that is down, else one line saying they are alive."""
    import sqlite3

    from tokenbridge.cli.hubs import age_words, read_hubs
    from tokenbridge.formats.text import printable

    if settings.state.database_url is None:
        return
    try:
        hubs = read_hubs(settings)
    except sqlite3.Error as exc:
        r.fail(f"the hubs cannot be read from the shared database ([state] database_url): "
               f"{' '.join(str(exc).split())}")
        return
    others = [h for h in hubs if not h.get("self")]
    down = [h for h in others if not h["alive"]]
    for hub in down:
        r.warn(f"hub {printable(hub['name'])} is down: its last heartbeat was {age_words(hub['heartbeat_age'])} "
               f"ago (state.down_after = {settings.state.down_after:g} s); its keys answer 503 hub_down until "
               f"it runs again ({printable(hub['url'])})")
    if not others:
        r.ok(f"hubs: no other hub shares the database with this one ({settings.state.hub})")
    elif not down:
        r.ok("hubs: the other hubs sharing the database are alive: "
             + ", ".join(printable(h["name"]) for h in others))


def _check_token(r: Report, prefix: str, table: TokenSettings, token: dict[str, Any], keys: list[dict[str, Any]],
                 no_pin: str | None, warning_days: int) -> bool:
    """One token's state, PIN and certificates; True when it cannot be used at all."""
    state = token["state"]
    if state == "error":
        r.fail(f"{prefix}module or token unusable: {token['message']}")
        return True
    if state == "absent":
        r.fail(f"{prefix}token not present: {token['message']}")
        return True
    retiring = " (retiring: decrypts only)" if token.get("retiring") else ""
    r.ok(f"{prefix}token {token['label']!r} serial {token['serial']} ({token['manufacturer']} {token['model']})"
         + retiring)
    pin = token["pin"]
    if pin["locked"]:
        r.fail(f"{prefix}user PIN is LOCKED: unblock it with the card's PUK / SO PIN tools")
    elif pin["final_try"]:
        r.fail(f"{prefix}user PIN is at its FINAL TRY: the service will not try it")
    elif pin["count_low"]:
        r.warn(f"{prefix}user PIN retry counter is low: a wrong PIN was entered recently")
    if state == "ready":
        r.ok(f"{prefix}PIN accepted, logged in")
    elif no_pin is not None:
        r.fail(f"{prefix}not logged in: {no_pin}")
    else:
        r.fail(f"{prefix}not logged in ({state}): {token['message']}")
        if state == "needs_pin" and ("refused" in token["message"] or "failed" in token["message"]):
            r.fail(f"{prefix}{_pin_flags(pin)}; {_fix_the_pin(table)}")
    if not keys and state == "ready":
        r.fail(f"{prefix}no private key found on the token")
    for k in keys:
        _check_certificate(r, prefix, k, warning_days)
    return False


def _check_certificate(r: Report, prefix: str, k: dict[str, Any], warning_days: int) -> None:
    cert = k.get("certificate")
    name = f"{prefix}key {k['label']!r} ({k['type']}-{k['curve'] or k['size']})"
    if cert is None:
        r.warn(f"{name}: no certificate on the token")
        return
    if "not_after" not in cert:
        r.fail(f"{name}: the certificate's extensions cannot be parsed")
        return
    key_state = k.get("state", "active")
    if key_state != "active":
        until = f" until {k['retiring_until']}" if k.get("retiring_until") else ""
        r.ok(f"{name}: {key_state}{until}: signs and authenticates nothing any more"
             + (", decrypts what is still sent to it" if "decrypt" in k.get("operations", []) else "")
             if key_state == "retiring" else f"{name}: retired on {k['retiring_until']}: no longer used; remove "
             "it from the configuration")
        return
    check = validity(datetime.fromisoformat(cert["not_before"]), datetime.fromisoformat(cert["not_after"]),
                     warning_days)
    if check.state is Validity.EXPIRED:
        r.fail(f"{name}: {check.describe()}: it no longer signs CMS or S/MIME nor authenticates TLS; "
               "renew the certificate and write the new one on the token")
    elif check.state is Validity.NOT_YET_VALID:
        r.fail(f"{name}: {check.describe()}: it signs nothing until then; check the computer's clock, "
               "or keep the previous certificate on the token until that date")
    elif check.state is Validity.EXPIRING:
        r.warn(f"{name}: {check.describe()} (warning from {check.warning_days} days ahead, "
               "server.expiry_warning_days): renew the certificate and write the new one on the token "
               "before then")
    else:
        r.ok(f"{name}: {cert['subject']}, {cert['days_left']} days left, "
             f"usages {', '.join(cert['key_usage']) or '(any)'}")
