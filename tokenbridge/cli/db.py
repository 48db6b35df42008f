"""``tokenbridge db``: the state store's schema version, and its upgrade (state/migrations/)."""

from __future__ import annotations

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
