"""Running ``fusioner serve``: the run loaded once, a socket bound (loopback by default), uvicorn until Ctrl+C."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import Callable

from pipeline.errors import UserError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


def web_app_module():
    """:mod:`pipeline.serve.app`, or a one-line error naming the extra that brings its packages."""
    try:
        import uvicorn  # noqa: F401 - checked here so the message names both packages' extra

        from pipeline.serve import app
    except ImportError as err:
        raise UserError(f"fusioner serve needs the serve extra ({err.name} is missing): "
                        f"pip install 'fusioner[serve]'") from err
    return app


def bind(*, host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host``:``port`` (port 0: a free one), or a one-line error."""
    if not 0 <= port <= 65535:
        raise UserError(f"`port` is 0 (any free port) to 65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                            flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as err:
        raise UserError(f"`host` {host} is not an address of this machine: {err.strerror}") from err
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {err.strerror} (`port` 0 picks a free port)") from err
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def is_loopback(sock: socket.socket) -> bool:
    return ipaddress.ip_address(sock.getsockname()[0]).is_loopback


def make_server(*, app, quiet: bool = False):
    """A uvicorn server for ``app``; ``server.run(sockets=[bind(...)])`` serves until ``should_exit``."""
    import uvicorn

    config = uvicorn.Config(app, log_level="warning" if quiet else "info", lifespan="off", ws="none",
                            timeout_graceful_shutdown=5, server_header=False)
    return uvicorn.Server(config)


def serve(*, run: str | Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, device: str = "auto",
          max_upload_mb: float = 20.0, quiet: bool = False, announce: Callable[[str], None] = print) -> None:
    """``fusioner serve``: load ``run`` once, then answer the page's requests until interrupted.

    ``announce`` receives the address to open (the real port when ``port`` is 0) and the notes a user
    must see before the first request: random-init features, an address reachable beyond this machine.
    """
    from pipeline.eval.predict import Predictor, prediction_notes
    from pipeline.runtime import resolve_device

    web = web_app_module()
    if max_upload_mb <= 0:
        raise UserError(f"`max_upload_mb` must be positive, got {max_upload_mb}")
    sock = bind(host=host, port=port)  # before loading: a taken port is said at once
    try:
        predictor = Predictor(checkpoint=run, device=str(resolve_device(device)))
    except BaseException:
        sock.close()
        raise
    app = web.build_app(predictor=predictor, limits=web.ServeLimits(max_upload_mb=max_upload_mb),
                        title=Path(run).resolve().name)
    announce(f"serving {run} at {url_of(sock)}  (Ctrl+C stops)")
    for note in prediction_notes(pretrained=predictor.pretrained):
        announce(note)
    if not is_loopback(sock):
        announce(f"note: listening on {sock.getsockname()[0]}, not only this machine: anyone who reaches it can "
                 f"use the page")
    try:
        # uvicorn finishes the requests under way, then hands Ctrl+C back as KeyboardInterrupt; where the
        # process started with SIGINT ignored (a background job of a script), it just returns
        make_server(app=app, quiet=quiet).run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    announce("stopped")
