"""``tokenbridge backup`` and ``tokenbridge restore``: the hub's state, CA and set-up in one archive.

The work is in services/backup.py; this module chooses the paths, prints what
went in and what was left out, and turns every refusal into one sentence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from tokenbridge.cli.common import ConfigOpt, console, err, fail, load


def _say(text: str) -> None:
    console.print(text, soft_wrap=True)  # paths stay whole, for copying


def backup(file: Annotated[Path, typer.Argument(help="Archive to write (.tar.gz, mode 0600).")],
           config: ConfigOpt = None,
           force: Annotated[bool, typer.Option("--force", help="Replace FILE if it exists.")] = False) -> None:
    """Back up the state store (a consistent snapshot, also while the service runs), the bridge CA and TLS
    files, the configuration and the certificates it names. Never the PIN nor mail passwords."""
    from tokenbridge.services.backup import BackupError
    from tokenbridge.services.backup import backup as run

    settings = load(config)
    try:
        report = run(settings, file.expanduser().resolve(), force=force)
    except BackupError as exc:
        fail(escape(str(exc)))
    except OSError as exc:
        fail(escape(f"cannot write the backup {file}: {exc.strerror or exc}"))
    _say(f"backup written: {escape(str(report.archive))} (mode 0600)")
    for m in report.members:
        flag = "[bold red]SENSITIVE[/bold red] " if m.sensitive else ""
        _say(f"  {flag}{escape(m.name)}  {m.size} bytes  ({escape(m.role)})")
    if any(m.sensitive for m in report.members):
        _say("[bold]This archive holds private keys (the bridge CA key can issue workstation "
                      "certificates): keep it as safe as the hub itself.[/bold]")
    _say("left out:")
    for path, why in report.left_out:
        _say(f"  {escape(path)}: {escape(why)}")
    for path, role in report.missing:
        err.print(f"[yellow]warning:[/yellow] {escape(path)} ({escape(role)}) is named by the configuration but "
                  "does not exist: not backed up")
    if report.audit_ok:
        _say(f"audit log: {report.audit_entries} entries, chain intact")
    else:
        err.print(f"[yellow]warning:[/yellow] the audit chain of this snapshot is broken after "
                  f"{report.audit_entries} entries ({escape(report.audit_problem or '')}); `restore` will refuse it")


def restore(file: Annotated[Path, typer.Argument(help="Archive written by `tokenbridge backup`.")],
            config: ConfigOpt = None,
            data_dir: Annotated[Path | None, typer.Option("--data-dir", help="Restore into this data directory "
                                                          "(default: data_dir of the configuration).")] = None,
            config_to: Annotated[Path | None, typer.Option("--config-to", help="Write the backed-up configuration "
                                 "here (the files it names beside it). Without it, it is only extracted under "
                                 "DATA_DIR/restored-config.")] = None,
            force: Annotated[bool, typer.Option("--force", help="Replace files that exist.")] = False) -> None:
    """Restore a backup, after checking its hashes and its audit chain; the service must be stopped."""
    from tokenbridge.services.backup import BackupError
    from tokenbridge.services.backup import restore as run

    settings = load(config)
    if settings.state.database_url and data_dir is None:
        fail("this hub's state is in PostgreSQL (state.database_url): restore it with pg_restore; a "
             "`tokenbridge backup` archive holds a SQLite hub's state (restore it elsewhere with --data-dir)")
    target = (data_dir.expanduser() if data_dir is not None else settings.data_dir).resolve()
    sockets = {target / "tokenbridge.sock"}
    if target == settings.data_dir.resolve() and settings.server.admin_socket is not None:
        sockets.add(settings.server.admin_socket)
    try:
        report = run(file.expanduser().resolve(), target, sockets=sorted(sockets), force=force,
                     config_to=config_to.expanduser().resolve() if config_to else None)
    except BackupError as exc:
        fail(escape(str(exc)))
    except OSError as exc:
        fail(escape(f"the restore failed: {exc.strerror or exc} ({exc.filename or ''})"))
    manifest = report.manifest
    _say(f"restored the backup of {escape(str(manifest.get('hostname')))} made "
                  f"{escape(str(manifest.get('created')))} (tokenbridge {escape(str(manifest.get('tokenbridge')))})"
                  f" into {escape(str(report.data_dir))}")
    _say(f"audit chain checked: {report.audit_entries} entries")
    for member, dest in report.written:
        _say(f"  {escape(str(dest))}  ({escape(member.role)})")
    if report.config_path is not None and config_to is None:
        _say(f"the configuration was only extracted, to {escape(str(report.config_path))}: compare it "
                      "with the one in use and copy what you need (or restore again with --config-to)")
    _say("not in the backup: the PIN file, mail passwords and workstation .p12 files (write the PIN "
                  "file again before starting the service)")
    for note in report.notes:
        err.print(f"[yellow]warning:[/yellow] {escape(note)}")
