"""Servers for tests and benchmarks, from cheapest to most real.

- ``InProcessServer``: the app over ``httpx.ASGITransport``, lifespan started: no socket, no process.
- ``ThreadedServer``: the app under uvicorn in a thread on 127.0.0.1: real sockets and disconnects.
- ``ServerProcess``: a real ``encapure serve`` process: signals, drain, exit status, model loading.

The first two serve models you hand them (``ServerState(settings, models=...)``), e.g. stand-ins
over a fake ONNX Runtime session; the last loads what its ``--model`` flags name.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import uvicorn

from encapure.engine.types import InferenceModel
from encapure.server.app import create_app
from encapure.server.state import ServerState
from encapure.settings import Settings


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """``python -m encapure serve ARGS`` on 127.0.0.1:<free port>; waits for /ready.

    Its log goes to a temporary file (``log_text()``) so a chatty server never blocks on a pipe;
    the file is removed at ``stop()`` unless ENCAPURE_KEEP_SERVER_LOGS is set.
    """

    def __init__(
        self,
        args: list[str],
        *,
        env: dict[str, str] | None = None,
        ready_timeout: float = 180.0,
        api_key: str | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.args = [*args, "--host", "127.0.0.1", "--port", str(self.port)]
        if api_key:
            self.args += ["--api-key", api_key]
        self.env = {**os.environ, **(env or {})}
        self.ready_timeout = ready_timeout
        self._log = tempfile.NamedTemporaryFile(prefix="encapure-serve-", suffix=".log", delete=False)  # noqa: SIM115
        self.log_path = Path(self._log.name)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def start(self, wait_ready: bool = True) -> ServerProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "encapure", "serve", *self.args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        assert self.proc is not None
        end = time.monotonic() + self.ready_timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}")
            try:
                if httpx.get(self.url + "/ready", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {self.ready_timeout} s:\n{self.log_text()[-4000:]}")

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        if not os.environ.get("ENCAPURE_KEEP_SERVER_LOGS"):
            self.log_path.unlink(missing_ok=True)
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _auth(settings: Settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}


def _check_ready(state: ServerState) -> bool:
    if state.phase == "failed":
        raise RuntimeError("the server failed to load its models (see the log)")
    return state.phase == "ready"


def _app_around(
    models: Mapping[str, InferenceModel], settings: Settings | None, aliases: Mapping[str, str] | None
) -> tuple[Settings, ServerState, Any]:
    """The real app serving already-loaded models (what both in-process harnesses wrap)."""
    settings = settings or Settings()
    state = ServerState(settings, models=models, aliases=aliases)
    return settings, state, create_app(settings, state)


class InProcessServer:
    """The FastAPI app with its lifespan running, reached through ``httpx.ASGITransport``.

    ``async with InProcessServer(models, settings) as srv:`` waits until the models are warm;
    ``srv.client`` sends the API key when one is set, ``srv.new_client()`` sends what you give it.
    The app runs on the caller's event loop, so requests, the scheduler and its workers are real.
    """

    def __init__(
        self,
        models: Mapping[str, InferenceModel],
        settings: Settings | None = None,
        ready_timeout: float = 60.0,
        aliases: Mapping[str, str] | None = None,
    ) -> None:
        self.settings, self.state, self.app = _app_around(models, settings, aliases)
        self.ready_timeout = ready_timeout
        self._lifespan: AbstractAsyncContextManager[Any] | None = None
        self._clients: list[httpx.AsyncClient] = []
        self.client: httpx.AsyncClient

    @property
    def headers(self) -> dict[str, str]:
        return _auth(self.settings)

    def new_client(self, headers: dict[str, str] | None = None, timeout: float = 60.0) -> httpx.AsyncClient:
        c = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app),
            base_url="http://encapure.test",
            headers=headers,
            timeout=timeout,
        )
        self._clients.append(c)
        return c

    async def __aenter__(self) -> InProcessServer:
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        end = time.monotonic() + self.ready_timeout
        try:
            while not _check_ready(self.state):
                if time.monotonic() > end:
                    raise TimeoutError(f"not ready after {self.ready_timeout} s (phase {self.state.phase})")
                await asyncio.sleep(0.01)
        except BaseException:
            await self._lifespan.__aexit__(None, None, None)
            raise
        self.client = self.new_client(self.headers)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        for c in self._clients:
            await c.aclose()
        assert self._lifespan is not None
        await self._lifespan.__aexit__(et, e, tb)


class ThreadedServer:
    """uvicorn serving the app from a thread on 127.0.0.1 (a port bound up front, so no race).

    Real TCP connections, streamed bodies and client disconnects, with the models you hand it;
    not signals or the process's exit status (those need ``ServerProcess``).
    """

    def __init__(
        self,
        models: Mapping[str, InferenceModel],
        settings: Settings | None = None,
        ready_timeout: float = 60.0,
        aliases: Mapping[str, str] | None = None,
    ) -> None:
        self.settings, self.state, self.app = _app_around(models, settings, aliases)
        self.ready_timeout = ready_timeout
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = int(self._sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        from encapure.server.run import uvicorn_config

        self.server = uvicorn.Server(uvicorn_config(self.app, self.state, timeout_graceful_shutdown=5))
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._sock]}, name="encapure-test-server", daemon=True
        )

    @property
    def headers(self) -> dict[str, str]:
        return _auth(self.settings)

    def start(self) -> ThreadedServer:
        self._thread.start()
        end = time.monotonic() + self.ready_timeout
        while not (self.server.started and _check_ready(self.state)):
            if not self._thread.is_alive():
                raise RuntimeError("the test server's thread ended before it was ready")
            if time.monotonic() > end:
                raise TimeoutError(f"not ready after {self.ready_timeout} s (phase {self.state.phase})")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> ThreadedServer:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
