"""Run the service: bind the API port and the operator's admin socket, then hand both to uvicorn."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
from pathlib import Path

import uvicorn

from tokenbridge.api.app import create_app
from tokenbridge.config import Settings
from tokenbridge.services.bridge import Bridge, read_pin


class ServeError(Exception):
    pass


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_address(host: str, settings: Settings) -> None:
    """Secrets and plaintexts cross the socket: only loopback until TLS serving lands."""
    if not is_loopback(host):
        raise ServeError(
            f"refusing to serve on {host}: a non-loopback address needs TLS, and TLS serving is not "
            "available yet in this version; bind 127.0.0.1 (the default) and reach it from other machines "
            "through an SSH tunnel or a TLS reverse proxy"
        )


def _admin_socket(path: Path) -> socket.socket:
    """A Unix socket only this user can open: whoever connects acts as the operator."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.exists():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale, from a service that died
        else:
            probe.close()
            raise ServeError(f"another tokenbridge is already running (admin socket {path} answers)")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    path.chmod(0o600)
    return sock


def serve(settings: Settings, *, host: str | None = None, port: int | None = None,
          prompted_pin: str | None = None, log_level: str = "info") -> None:
    host = host or settings.server.host
    port = port if port is not None else settings.server.port
    check_address(host, settings)
    bridge = Bridge(settings, pin=read_pin(settings.token, prompted_pin))
    app = create_app(bridge)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        tcp = socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    assert settings.server.admin_socket is not None
    admin = _admin_socket(settings.server.admin_socket)
    logging.getLogger("tokenbridge").setLevel(log_level.upper())
    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on",
                            timeout_keep_alive=30, limit_concurrency=4096)
    _Server(config, settings.server.admin_socket).run(sockets=[tcp, admin])


class _Server(uvicorn.Server):
    """Removes the admin socket at shutdown (uvicorn re-raises SIGTERM afterwards, so no finally runs)."""

    def __init__(self, config: uvicorn.Config, admin_socket: Path) -> None:
        super().__init__(config)
        self.admin_socket = admin_socket

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().shutdown(sockets)
        finally:
            with contextlib.suppress(OSError):
                self.admin_socket.unlink()
