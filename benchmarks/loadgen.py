"""Async HTTP load generator for loopback benchmarks.

Two modes, both bounded in request count *and* wall time so a run always ends by itself:

* closed loop: ``concurrency`` virtual users, each sends its next request as soon as the
  previous one answers (throughput at a given parallelism; saturation when it is high enough);
* open loop: requests arrive at a fixed rate (Poisson or uniform inter-arrival times) whether or
  not earlier ones have answered, which is how real traffic behaves; latency is measured from the
  *scheduled* arrival, so a client falling behind cannot hide queueing (no coordinated omission).

Every request's status code and latency is recorded; a connection failure is status -1, a
client-side timeout status 0.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
import numpy as np

STATUS_TIMEOUT = 0
STATUS_CONN_ERROR = -1


@dataclass(frozen=True)
class HttpRequest:
    """One prepared request: what to send and how many items (pairs or texts) it carries."""

    path: str
    body: bytes
    items: int
    key: Any = None  # caller's tag (e.g. the WikiQA question index) for matching responses
    method: str = "POST"
    headers: tuple[tuple[str, str], ...] = (("Content-Type", "application/json"),)


@dataclass
class Record:
    key: Any
    items: int
    start: float  # seconds since the run started (scheduled time in open loop)
    latency: float  # seconds
    status: int
    body: bytes | None = None


@dataclass
class RunResult:
    mode: str
    concurrency: int | None
    rate: float | None
    wall_s: float
    records: list[Record] = field(default_factory=list)
    dropped: int = 0  # open loop only: arrivals not sent because max_outstanding was reached

    def summary(self) -> dict[str, Any]:
        return summarize(self)


def summarize(result: RunResult) -> dict[str, Any]:
    """Throughput (successful requests and items per second) and latency percentiles."""
    recs = result.records
    ok = [r for r in recs if 200 <= r.status < 300]
    lat_ok = np.array([r.latency for r in ok], dtype=np.float64)
    lat_all = np.array([r.latency for r in recs], dtype=np.float64)
    statuses = Counter(r.status for r in recs)
    wall = max(result.wall_s, 1e-9)

    def pct(a: np.ndarray, q: float) -> float | None:
        return float(np.percentile(a, q) * 1000.0) if a.size else None

    return {
        "mode": result.mode,
        "concurrency": result.concurrency,
        "rate": result.rate,
        "requests": len(recs),
        "ok": len(ok),
        "errors": {str(k): v for k, v in sorted(statuses.items()) if not 200 <= k < 300},
        "dropped": result.dropped,
        "wall_s": result.wall_s,
        "req_per_s": len(ok) / wall,
        "items_per_s": sum(r.items for r in ok) / wall,
        "p50_ms": pct(lat_ok, 50),
        "p95_ms": pct(lat_ok, 95),
        "p99_ms": pct(lat_ok, 99),
        "mean_ms": float(lat_ok.mean() * 1000.0) if lat_ok.size else None,
        "max_ms_all": float(lat_all.max() * 1000.0) if lat_all.size else None,
    }


class LoadGenerator:
    """Sends prepared requests to one base URL (loopback only) and records the outcome."""

    def __init__(self, base_url: str, *, timeout_s: float = 60.0, keep_bodies: bool = False) -> None:
        host = urlsplit(base_url).hostname or ""
        if not (host == "localhost" or host.startswith("127.") or host in ("::1", "[::1]")):
            raise ValueError(f"load generator only targets loopback addresses, not {host!r}")
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.keep_bodies = keep_bodies

    async def _send(self, session: aiohttp.ClientSession, req: HttpRequest) -> tuple[int, bytes | None]:
        try:
            async with session.request(
                req.method, self.base_url + req.path, data=req.body, headers=dict(req.headers)
            ) as resp:
                body = await resp.read()
                return resp.status, body if self.keep_bodies else None
        except asyncio.TimeoutError:
            return STATUS_TIMEOUT, None
        except aiohttp.ClientError:
            return STATUS_CONN_ERROR, None

    def _session(self, limit: int) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=limit, force_close=False, enable_cleanup_closed=True)
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        return aiohttp.ClientSession(connector=connector, timeout=timeout)

    async def closed_loop(
        self,
        requests: Sequence[HttpRequest],
        *,
        concurrency: int,
        max_requests: int,
        duration_s: float,
        warmup_requests: int = 0,
    ) -> RunResult:
        """``concurrency`` users cycle through ``requests``; stop at ``max_requests`` or ``duration_s``.

        Requests still in flight at the deadline are awaited (bounded by the client timeout) and
        counted; the wall time runs to the last completion so throughput is not inflated.
        """
        if not requests:
            raise ValueError("no requests to send")
        async with self._session(limit=concurrency + 4) as session:
            if warmup_requests:
                warm = [requests[i % len(requests)] for i in range(warmup_requests)]
                sem = asyncio.Semaphore(concurrency)

                async def _warm(r: HttpRequest) -> None:
                    async with sem:
                        await self._send(session, r)

                await asyncio.gather(*(_warm(r) for r in warm))
            source = itertools.cycle(range(len(requests)))
            issued = 0
            records: list[Record] = []
            t0 = time.perf_counter()
            deadline = t0 + duration_s

            async def user() -> None:
                nonlocal issued
                while issued < max_requests and time.perf_counter() < deadline:
                    issued += 1
                    req = requests[next(source)]
                    start = time.perf_counter()
                    status, body = await self._send(session, req)
                    end = time.perf_counter()
                    records.append(Record(req.key, req.items, start - t0, end - start, status, body))

            await asyncio.gather(*(user() for _ in range(concurrency)))
            wall = time.perf_counter() - t0
        return RunResult("closed", concurrency, None, wall, records)

    async def open_loop(
        self,
        requests: Sequence[HttpRequest],
        *,
        rate: float,
        max_requests: int,
        duration_s: float,
        arrivals: Literal["poisson", "uniform"] = "poisson",
        max_outstanding: int = 1000,
        seed: int = 0,
    ) -> RunResult:
        """Requests arrive at ``rate`` per second regardless of answers; latency counts from arrival."""
        if rate <= 0:
            raise ValueError("rate must be positive")
        rng = random.Random(seed)
        n = min(max_requests, max(1, int(rate * duration_s)))
        offsets: list[float] = []
        t = 0.0
        for _ in range(n):
            t += rng.expovariate(rate) if arrivals == "poisson" else 1.0 / rate
            if t > duration_s:
                break
            offsets.append(t)
        records: list[Record] = []
        dropped = 0
        outstanding = 0
        async with self._session(limit=max_outstanding + 4) as session:
            t0 = time.perf_counter()

            async def one(i: int, scheduled: float) -> None:
                nonlocal outstanding
                req = requests[i % len(requests)]
                status, body = await self._send(session, req)
                end = time.perf_counter()
                outstanding -= 1
                records.append(Record(req.key, req.items, scheduled, end - (t0 + scheduled), status, body))

            tasks: list[asyncio.Task[None]] = []
            for i, off in enumerate(offsets):
                delay = t0 + off - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if outstanding >= max_outstanding:
                    dropped += 1
                    continue
                outstanding += 1
                tasks.append(asyncio.create_task(one(i, off)))
            if tasks:
                await asyncio.gather(*tasks)
            wall = time.perf_counter() - t0
        return RunResult("open", None, rate, wall, records, dropped=dropped)


def run_closed(
    base_url: str,
    requests: Sequence[HttpRequest],
    *,
    concurrency: int,
    max_requests: int,
    duration_s: float,
    timeout_s: float = 60.0,
    warmup_requests: int = 0,
    keep_bodies: bool = False,
) -> RunResult:
    """Synchronous wrapper (one fresh event loop per run)."""
    gen = LoadGenerator(base_url, timeout_s=timeout_s, keep_bodies=keep_bodies)
    return _run(
        gen.closed_loop(
            requests,
            concurrency=concurrency,
            max_requests=max_requests,
            duration_s=duration_s,
            warmup_requests=warmup_requests,
        )
    )


def run_open(
    base_url: str,
    requests: Sequence[HttpRequest],
    *,
    rate: float,
    max_requests: int,
    duration_s: float,
    arrivals: Literal["poisson", "uniform"] = "poisson",
    timeout_s: float = 60.0,
    keep_bodies: bool = False,
) -> RunResult:
    gen = LoadGenerator(base_url, timeout_s=timeout_s, keep_bodies=keep_bodies)
    return _run(
        gen.open_loop(requests, rate=rate, max_requests=max_requests, duration_s=duration_s, arrivals=arrivals)
    )


def _run(coro: Any) -> RunResult:
    try:
        import uvloop

        return uvloop.run(coro)  # type: ignore[no-any-return]
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)  # type: ignore[no-any-return]


def merge(results: Iterable[RunResult]) -> RunResult:
    """Combine the rounds of one cell (e.g. ABBA order): records pooled, wall times added."""
    results = list(results)
    if not results:
        raise ValueError("nothing to merge")
    first = results[0]
    return RunResult(
        first.mode,
        first.concurrency,
        first.rate,
        sum(r.wall_s for r in results),
        [rec for r in results for rec in r.records],
        dropped=sum(r.dropped for r in results),
    )


def bodies_by_key(result: RunResult, parse: Callable[[bytes], Any]) -> dict[Any, Any]:
    """First successful parsed response per request key (e.g. scores per WikiQA question)."""
    out: dict[Any, Any] = {}
    for r in result.records:
        if r.key not in out and 200 <= r.status < 300 and r.body is not None:
            out[r.key] = parse(r.body)
    return out
