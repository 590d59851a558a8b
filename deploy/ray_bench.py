"""Ray Serve figures, run by hand: replica startup, pairs/s with 1 vs 2 replicas, a replica killed under load.

    .venv/bin/python deploy/ray_bench.py --model /tmp/rr-int8 [--seconds 20] [--concurrency 16]

Each configuration serves WikiQA-test queries (one request = one query and its candidates) to a
closed loop of ``--concurrency`` clients for ``--seconds`` after a warm-up, on a local Ray cluster
with ``--cpus`` CPUs on 127.0.0.1. ``encapure serve`` on the same model and threads is the
baseline without Ray. Then, with 2 replicas under the same load, one replica's actor is killed
and every answer's status is counted (Ray Serve replaces the replica; what the clients saw is the
point: with encapure.deploy.ray.proxy_middlewares, unless --no-retry), and likewise while the deployment is scaled from 2 replicas to 1 (a graceful stop). Needs ``pip install 'encapure[ray]'``; not part of the test suite (minutes, all the cores).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
WIKIQA = ROOT.parent / "shared" / "data" / "wikiqa" / "WikiQA-test-gold.tsv"


def requests_from_wikiqa(path: Path) -> list[dict[str, Any]]:
    from encapure.evaluation.datasets import load_dataset

    return [{"query": g.query, "documents": g.documents} for g in load_dataset(path) if g.documents]


async def load(url: str, bodies: list[dict[str, Any]], seconds: float, concurrency: int,
               during: Any = None) -> dict[str, Any]:
    """Closed loop: ``concurrency`` clients send requests back to back for ``seconds``."""
    codes: collections.Counter[str] = collections.Counter()
    pairs = 0
    stop = time.perf_counter() + seconds

    async def client(i: int, http: httpx.AsyncClient) -> None:
        nonlocal pairs
        k = i
        while time.perf_counter() < stop:
            body = bodies[k % len(bodies)]
            k += concurrency
            try:
                r = await http.post(f"{url}/rerank", json=body)
                codes[str(r.status_code)] += 1
                if r.status_code == 200:
                    pairs += len(body["documents"])
            except httpx.HTTPError as e:
                codes[type(e).__name__] += 1

    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=concurrency)) as http:
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(client(i, http)) for i in range(concurrency)]
        if during is not None:
            await asyncio.sleep(seconds / 3)
            await asyncio.to_thread(during)
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - t0
    return {"pairs_per_s": round(pairs / elapsed, 1), "codes": dict(codes)}


def wait_ready(url: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(url)


def main() -> int:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--model", required=True, help="exported model folder")
    cli.add_argument("--seconds", type=float, default=20.0)
    cli.add_argument("--concurrency", type=int, default=16)
    cli.add_argument("--cpus", type=int, default=2)
    cli.add_argument("--dataset", type=Path, default=WIKIQA)
    cli.add_argument("--failures-only", action="store_true", help="skip the throughput runs")
    cli.add_argument("--no-retry", action="store_true",
                     help="without the proxy middleware that retries requests of a lost replica")
    args = cli.parse_args()

    import ray
    from ray import serve

    from encapure.deploy.ray import PROXY_CALLBACK, PROXY_CALLBACK_ENV, build_app
    from encapure.server.testing import ServerProcess

    bodies = requests_from_wikiqa(args.dataset)
    report: dict[str, Any] = {"cpus": args.cpus, "concurrency": args.concurrency, "seconds": args.seconds,
                              "requests": len(bodies)}

    # Baseline: the plain server, 2 single-thread workers (the default on 2 cores).
    if not args.failures_only:
        with ServerProcess(["--model", args.model, "--workers", "2", "--threads-per-worker", "1"]) as server:
            asyncio.run(load(server.url, bodies, 3, args.concurrency))
            report["encapure serve"] = asyncio.run(load(server.url, bodies, args.seconds, args.concurrency))
    print(json.dumps(report), flush=True)

    if not args.no_retry:  # read by the proxy actor, which inherits this environment
        os.environ[PROXY_CALLBACK_ENV] = PROXY_CALLBACK
    report["proxy retry middleware"] = not args.no_retry
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=80 * 1024 * 1024, log_to_driver=False)
    from encapure.server.testing import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        configs = {
            # One replica gets both cores: 2 single-thread workers, as the baseline.
            "ray 1 replica": {"num_replicas": 1, "workers": 2, "threads_per_worker": 1},
            # Two replicas share them: one single-thread worker each.
            "ray 2 replicas": {"num_replicas": 2, "workers": 1, "threads_per_worker": 1},
        }
        for name, extra in configs.items():
            if args.failures_only and name != "ray 2 replicas":
                continue
            t0 = time.perf_counter()
            serve.run(build_app({"model": args.model, **extra}), name="bench", route_prefix="/")
            wait_ready(url)
            startup = round(time.perf_counter() - t0, 2)
            if args.failures_only:
                continue
            asyncio.run(load(url, bodies, 3, args.concurrency))
            report[name] = {"startup_s": startup, **asyncio.run(load(url, bodies, args.seconds, args.concurrency))}
            print(json.dumps(report), flush=True)

        def scale_down() -> None:
            # Same code and settings, fewer replicas: Ray stops one gracefully (drain, then our lifespan).
            serve.run(build_app({"model": args.model, **configs["ray 2 replicas"], "num_replicas": 1}),
                      name="bench", route_prefix="/", blocking=False)

        report["ray 2 -> 1 replica under load"] = asyncio.run(
            load(url, bodies, args.seconds, args.concurrency, during=scale_down)
        )
        serve.run(build_app({"model": args.model, **configs["ray 2 replicas"]}), name="bench", route_prefix="/")
        wait_ready(url)

        def kill_one() -> None:
            names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                     if a["name"].startswith("SERVE_REPLICA::")]
            victim = sorted(names)[0]
            ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
            report["killed"] = victim

        report["ray 2 replicas, one killed"] = asyncio.run(
            load(url, bodies, args.seconds, args.concurrency, during=kill_one)
        )
        serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
