"""``tokenbridge db``: the state store's schema version, its upgrade (state/migrations/), and the copy of a
SQLite hub's state into PostgreSQL (state/copy.py)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from tokenbridge.cli.common import ConfigOpt, console, fail, load

db_app = typer.Typer(help="The state store: SQLite in data_dir, or PostgreSQL shared by hubs.", no_args_is_help=True)


def _stores(config: ConfigOpt) -> list[tuple[str, str, object]]:
    """(component, engine, store) for the state and, when it exists, the mail queue; opened without
    upgrading them."""
    from tokenbridge.mail.gateway import queue_exists, queue_path, wanted
    from tokenbridge.state import migrations
    from tokenbridge.state.mail import MailQueue
    from tokenbridge.state.store import open_store

    settings = load(config)
    url = settings.state.database_url
    engine = "postgres" if url else "sqlite"
    found: list[tuple[str, str, object]] = [("state", engine, open_store(settings.store_path, url, upgrade=False))]
    location = queue_path(settings)
    if queue_exists(location):  # a shared database: its mail tables matter once a gateway runs on some hub
        mail = MailQueue(location, upgrade=False).store
        if url is None or wanted(settings) or migrations.version(mail, "mail") is not None:
            found.append(("mail", engine, mail))
        else:
            mail.close()
    return found


@db_app.command("version")
def db_version(config: ConfigOpt = None) -> None:
    """The schema version of each part of the state store, and the latest this version of tokenbridge knows.

    Exit status 1 when an upgrade is needed."""
    from tokenbridge.state import migrations

    behind = False
    for component, engine, store in _stores(config):
        current = migrations.version(store, component)  # type: ignore[arg-type]
        latest = migrations.latest(engine, component)
        behind = behind or current != latest
        said = "up to date" if current == latest else f"needs `tokenbridge db upgrade` (to {latest})"
        console.print(f"{component}: {engine} schema version {current if current is not None else 'none'}, {said}")
        store.close()  # type: ignore[attr-defined]
    if behind:
        raise typer.Exit(1)


@db_app.command("upgrade")
def db_upgrade(config: ConfigOpt = None) -> None:
    """Apply the missing migrations (the service also does it when it starts); safe to run again."""
    from tokenbridge.state import migrations

    try:
        for component, engine, store in _stores(config):
            now = migrations.upgrade(store, engine, component)  # type: ignore[arg-type]
            console.print(f"{component}: {engine} schema version {now}")
            store.close()  # type: ignore[attr-defined]
    except OSError as exc:
        fail(f"cannot open the state store: {exc}")


def _without_password(url: str) -> tuple[str, bool]:
    """The URL without its password, and whether it held one (~/.pgpass is the place for it)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url, False
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}@{host}" if parts.username else host)), True


@db_app.command("copy")
def db_copy(to: Annotated[str, typer.Option("--to", help="The PostgreSQL database the hubs will share: "
                                            "postgresql://user@host:port/dbname (password in ~/.pgpass).")],
            config: ConfigOpt = None,
            hub: Annotated[str | None, typer.Option("--hub", help="This hub's name there, its audit chain's "
                                                    "(default: [state] hub).")] = None,
            into_existing: Annotated[bool, typer.Option("--into-existing", help="The database already holds other "
                                                        "hubs' state: add this hub's to it (refused on any clash).")]
            = False) -> None:
    """Copy this hub's SQLite state (clients, workstations, the audit chain, the mail queue and tracking, the
    IMAP checkpoints) into PostgreSQL, in one transaction; the service must be stopped."""
    import socket
    import sqlite3

    from pydantic import ValidationError

    from tokenbridge.config import StateSettings
    from tokenbridge.mail.gateway import queue_exists, queue_path
    from tokenbridge.services.backup import service_answers
    from tokenbridge.state.copy import CopyRefused, copy_to_postgres
    from tokenbridge.state.mail import MailStore
    from tokenbridge.state.store import Store

    settings = load(config)
    if settings.state.database_url:
        fail("this hub's state is already in PostgreSQL ([state] database_url): `db copy` moves a SQLite hub's "
             "state; for a copy between PostgreSQL databases use pg_dump and pg_restore")
    name = hub or settings.state.hub
    try:
        StateSettings(database_url=to, hub=name)
    except ValidationError as exc:
        fail("; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
             .replace("state.database_url", "--to").replace("state.hub", "--hub"))
    sockets = sorted({settings.data_dir / "tokenbridge.sock", *filter(None, [settings.server.admin_socket])})
    for path in sockets:
        if service_answers(path):
            fail(f"a tokenbridge service is running on {settings.data_dir} (admin socket {path} answers): stop it "
                 "first (systemctl stop tokenbridge), so that nothing changes the state while it is copied")
    if not settings.store_path.exists():
        fail(f"no state to copy: {settings.store_path} does not exist (is this the hub's configuration?)")
    mail_path = queue_path(settings)
    opened: list[Any] = []
    try:
        state = Store(settings.store_path, upgrade=False)
        opened.append(state)
        mail = MailStore(mail_path, upgrade=False) if queue_exists(mail_path) else None
        if mail is not None:
            opened.append(mail)
        from tokenbridge.state.pg import PgStore

        target = PgStore(to, upgrade=False)
        opened.append(target)
        report = copy_to_postgres(state, mail, target, name, into_existing=into_existing,
                                  origin=f"{socket.gethostname()}:{settings.store_path}")
    except CopyRefused as exc:
        fail(f"{exc}")
    except (sqlite3.Error, OSError) as exc:
        fail(f"cannot copy the state (nothing was written): {exc}")
    finally:
        for store in reversed(opened):
            store.close()
    shown, had_password = _without_password(to)
    console.print(f"copied this hub's state into {shown} as hub {name}, in one transaction:", soft_wrap=True,
                  markup=False)
    for table, count in report.counts.items():
        extra = f" (numbered after the database's: ids +{report.shifted[table]})" if table in report.shifted else ""
        console.print(f"  {table}: {count}{extra}", markup=False)
    console.print(f"audit chain: {report.audit_entries} entries copied as they were, and entry {report.recorded} "
                  "records the copy", soft_wrap=True)
    if mail is None:
        console.print(f"mail: no mail queue here ({mail_path} does not exist): nothing to copy", soft_wrap=True,
                      markup=False)
    where = f" in {settings.config_file}" if settings.config_file else ""
    console.print("next steps:", markup=False)
    for line in (f"1. set{where}:", "     [state]", f'     database_url = "{shown}"', f'     hub = "{name}"',
                 *(["   and the password in the service user's ~/.pgpass, not in the configuration"]
                   if had_password else []),
                 "2. start the service (systemctl start tokenbridge)",
                 f"3. check: tokenbridge audit verify  (hub {name}: audit log intact: {report.recorded} entries "
                 "or more)",
                 f"4. keep {settings.store_path.parent} as it is: once database_url is set the service no longer "
                 "reads its state.db and mail.db, which stay as they were before the copy",
                 "5. a second hub: the same database_url, its own hub name, and this hub's bridge CA "
                 "(tokenbridge tls init --ca-from DIR, DIR a copy of this hub's tls directory)"):
        console.print(line, soft_wrap=True, markup=False)
