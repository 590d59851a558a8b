"""Run the service with uvicorn, with a drain that really happens before connections close.

uvicorn's own SIGTERM handling stops listening at once (new clients get "connection refused"
rather than a 503 they can act on) and re-raises the signal on exit (exit status 143 instead of 0).
We take the signal ourselves: /ready and new work turn 503, in-flight requests finish (up to
``shutdown_timeout_s``), and only then uvicorn is told to close; the scheduler then shuts down and
the process exits 0. A second signal forces the exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
import threading
from collections.abc import Generator
from types import FrameType
from typing import Any

import uvicorn

from encapure.errors import RequestTimeoutError
from encapure.server.app import create_app
from encapure.server.loading import preflight
from encapure.server.logs import setup_logging
from encapure.server.memory import cap_arenas
from encapure.server.protocol import guarded_protocol
from encapure.server.state import ServerState
from encapure.settings import Settings

log = logging.getLogger("encapure.server")

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self.exit_code = 0

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in _SIGNALS}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_task is not None or self._loop is None or self.should_exit:
            log.warning("second signal: exiting now without waiting for in-flight requests")
            self.should_exit = True
            self.force_exit = True
            return
        self._loop.call_soon_threadsafe(self._start_drain, signal.Signals(sig).name)

    def _start_drain(self, signame: str) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.get_running_loop().create_task(self.drain(signame))

    async def drain(self, reason: str = "request") -> None:
        timeout = self.state.settings.shutdown_timeout_s
        log.info(
            "%s received: draining for up to %.1f s",
            reason,
            timeout,
            extra={"in_flight": self.state.inflight},
        )
        self.state.begin_drain()
        if await self.state.wait_idle(timeout):
            log.info("drained: no request in flight")
            # From here a request uvicorn cancels at close (a body still trickling in) is answered
            # 503 shutting_down too.
            self.state.cutting_off = True
        else:
            cut = await self.state.cut_off()
            log.warning("shutdown timeout: %d request(s) still in flight were answered 503 shutting_down", cut)
            self.config.timeout_graceful_shutdown = 1  # the budget is spent: do not wait for them again
        self.should_exit = True

    def fatal(self) -> None:
        self.exit_code = 1
        self.should_exit = True


def uvicorn_config(app: Any, state: ServerState, **kwargs: Any) -> uvicorn.Config:
    """uvicorn's configuration for our app (the server and the test harness share it): our logging,
    our HTTP protocol (header read timeout, JSON errors), ``--keep-alive-timeout``."""
    errors = state.http_metrics.errors

    def header_timeout() -> None:
        errors.labels(RequestTimeoutError.kind).inc()

    options: dict[str, Any] = {
        "log_config": None,
        "access_log": False,
        "lifespan": "on",
        "http": guarded_protocol(state.settings.header_timeout_s, header_timeout),
        # Longer than the longest Retry-After (see the setting); a keep-alive connection idle
        # through a drain is closed at shutdown, not mid-request.
        "timeout_keep_alive": state.settings.keep_alive_timeout_s,
        **kwargs,
    }
    return uvicorn.Config(app, **options)


def serve(settings: Settings) -> int:
    """Start the server (blocking). Returns the process exit status."""
    setup_logging(settings.log_format, settings.log_level)
    cap_arenas(settings.malloc_arena_max)  # before the first worker or runtime thread exists
    problem = preflight(settings)
    if problem is not None:  # say so before listening, not as a traceback after "Uvicorn running"
        print(problem, file=sys.stderr)
        return 2
    state = ServerState(settings)
    app = create_app(settings, state)
    config = uvicorn_config(
        app,
        state,
        host=settings.host,
        port=settings.port,
        timeout_graceful_shutdown=max(1, int(settings.shutdown_timeout_s) + 1),
    )
    server = DrainingServer(config, state)
    state.on_fatal = server.fatal
    log.info(
        "starting", extra={"host": settings.host, "port": settings.port, "models": ",".join(settings.model)}
    )
    server.run()
    if state.phase == "failed" or not server.started:
        return 1
    log.info("stopped")
    return server.exit_code
