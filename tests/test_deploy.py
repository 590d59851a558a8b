"""Deployment artefacts: Kubernetes manifests, the container files, and the Ray Serve application.

- The kustomization is rendered (``kubectl kustomize`` when kubectl or kustomize is installed, else
  each listed resource file is loaded) and every resource is validated offline against the
  Kubernetes schemas shipped in the ``kubernetes-validate`` package (strict: unknown fields fail).
  The ServiceMonitor is a CRD, whose schema no offline validator ships: it is checked against the
  subset of the prometheus-operator CRD schema in deploy/k8s/schemas/.
- Numbers that must agree across files are checked: the grace period covers preStop + drain, the
  HPA's metric is a metric the scheduler really exports, the probes hit the real routes.
- Ray Serve (``slow``; skipped without ``pip install 'encapure[ray]'``): a local 2-CPU Ray cluster
  on 127.0.0.1, 2 replicas; answers equal the library's and both replicas serve.

The image itself is built and run by deploy/container-check.sh (root, podman, minutes: by hand).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import IN_CI

from encapure.scheduler.metrics import SchedulerMetrics
from encapure.server.routes import router
from encapure.server.testing import free_port
from encapure.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
K8S_VERSION = "1.32.0"
SERVICEMONITOR_SCHEMA = K8S / "schemas" / "servicemonitor-monitoring.coreos.com-v1.json"


# --- Kubernetes ------------------------------------------------------------------------------------
def _validator(name: str) -> Any:
    """The validation libraries (the `deploy` extra, installed by `make setup`): CI must have them."""
    if IN_CI:
        return importlib.import_module(name)
    return pytest.importorskip(name, reason="the validator is not installed (pip install 'encapure[deploy]')")


def _kustomize_cmd() -> list[str] | None:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize", str(K8S)]
    if shutil.which("kustomize"):
        return ["kustomize", "build", str(K8S)]
    return None


def _resources_from_files() -> list[dict[str, Any]]:
    """Without a kustomize binary: the listed files as they are, and the generated ConfigMap."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for name in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    for gen in kustomization.get("configMapGenerator", []):
        data = dict(lit.split("=", 1) for lit in gen.get("literals", []))
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data})
    return docs


@pytest.fixture(scope="module")
def resources() -> list[dict[str, Any]]:
    cmd = _kustomize_cmd()
    if cmd is None:
        return _resources_from_files()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _one(resources: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [r for r in resources if r["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def test_every_resource_validates_against_the_kubernetes_schemas(resources: list[dict[str, Any]]) -> None:
    kubernetes_validate, jsonschema = _validator("kubernetes_validate"), _validator("jsonschema")
    kinds = sorted(r["kind"] for r in resources)
    assert kinds == sorted(
        ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PersistentVolumeClaim",
         "PodDisruptionBudget", "Service", "ServiceMonitor"]
    )
    for r in resources:
        if r["apiVersion"].startswith("monitoring.coreos.com/"):
            jsonschema.validate(r, json.loads(SERVICEMONITOR_SCHEMA.read_text()))
            continue
        kubernetes_validate.validate(r, K8S_VERSION, strict=True)


def test_the_validator_rejects_a_broken_manifest(resources: list[dict[str, Any]]) -> None:
    """The validation above can fail: a typo in a probe and a missing container image are caught."""
    kubernetes_validate, jsonschema = _validator("kubernetes_validate"), _validator("jsonschema")
    deployment = json.loads(json.dumps(_one(resources, "Deployment")))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbe"]["httpGett"] = container["readinessProbe"].pop("httpGet")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    monitor = json.loads(json.dumps(_one(resources, "ServiceMonitor")))
    monitor["spec"]["endpoints"][0]["interval"] = "15 seconds"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(monitor, json.loads(SERVICEMONITOR_SCHEMA.read_text()))


def _settings_env(resources: list[dict[str, Any]]) -> dict[str, str]:
    return dict(_one(resources, "ConfigMap")["data"])


def test_the_configmap_is_valid_encapure_settings(resources: list[dict[str, Any]], monkeypatch) -> None:
    env = _settings_env(resources)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.port == 8000 and settings.host == "0.0.0.0"
    assert all(k.startswith(("ENCAPURE_", "HF_")) for k in env)


def test_grace_period_covers_prestop_and_drain(resources: list[dict[str, Any]]) -> None:
    pod = _one(resources, "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    prestop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert prestop[0] == "sleep"
    drain = float(_settings_env(resources)["ENCAPURE_SHUTDOWN_TIMEOUT_S"])
    grace = pod["terminationGracePeriodSeconds"]
    assert float(prestop[1]) + drain < grace <= float(prestop[1]) + drain + 15


def test_probes_and_ports_point_at_real_routes(resources: list[dict[str, Any]]) -> None:
    routes = {getattr(r, "path", "") for r in router.routes}
    container = _one(resources, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["startupProbe"]["httpGet"]["path"] in routes
    assert {"/health", "/ready", "/metrics"} <= routes
    port = int(_settings_env(resources)["ENCAPURE_PORT"])
    assert container["ports"][0]["containerPort"] == port
    assert _one(resources, "ServiceMonitor")["spec"]["endpoints"][0]["path"] == "/metrics"
    limits, requests = container["resources"]["limits"], container["resources"]["requests"]
    assert limits["memory"] and requests["memory"] and requests["cpu"]


def test_selectors_match_the_pods(resources: list[dict[str, Any]]) -> None:
    labels = _one(resources, "Deployment")["spec"]["template"]["metadata"]["labels"]
    service = _one(resources, "Service")
    for selector in (
        _one(resources, "Deployment")["spec"]["selector"]["matchLabels"],
        _one(resources, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        service["spec"]["selector"],
    ):
        assert selector and selector.items() <= labels.items()
    monitor = _one(resources, "ServiceMonitor")["spec"]["selector"]["matchLabels"]
    assert monitor.items() <= service["metadata"]["labels"].items()


def test_hpa_scales_on_cpu_and_on_a_metric_the_scheduler_exports(resources: list[dict[str, Any]]) -> None:
    from prometheus_client import generate_latest

    hpa = _one(resources, "HorizontalPodAutoscaler")
    names = {m["resource"]["name"] if m["type"] == "Resource" else m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]}
    exported = generate_latest(SchedulerMetrics().registry).decode()
    assert "cpu" in names and "encapure_queue_depth_items" in names
    assert re.search(r"^# TYPE encapure_queue_depth_items gauge$", exported, re.M)
    adapter = yaml.safe_load((K8S / "prometheus-adapter-rules.yaml").read_text())
    assert "encapure_queue_depth_items" in adapter["rules"]["custom"][0]["seriesQuery"]


# --- container files ----------------------------------------------------------------------------------
def _stages(dockerfile: str) -> dict[str, str]:
    parts = re.split(r"^FROM\s+\S+\s+AS\s+(\S+)\s*$", dockerfile, flags=re.M | re.I)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfile_runtime_stage(name: str) -> None:
    text = (ROOT / name).read_text()
    runtime = _stages(text)["runtime"]
    assert re.search(r'^ENTRYPOINT \["encapure", "serve"\]$', runtime, re.M), "exec form: SIGTERM reaches the server"
    assert re.search(r"^USER encapure$", runtime, re.M)
    assert "HEALTHCHECK" in runtime and "encapure.deploy.healthcheck" in runtime
    assert not re.search(r"torch|gcc|build-essential|pip install", runtime), "the runtime stage installs nothing"
    assert "HF_HUB_OFFLINE=1" in runtime
    for var in re.findall(r"\b(ENCAPURE_[A-Z_]+)=", runtime):
        field = var.removeprefix("ENCAPURE_").lower()
        assert field in Settings.model_fields or var == "ENCAPURE_CACHE", f"{var} is not a setting"
    assert re.search(r"^ARG BASE=", text, re.M)


def test_compose_scrapes_both_services() -> None:
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    targets = {t.split(":")[0] for sc in prom["scrape_configs"] for s in sc["static_configs"] for t in s["targets"]}
    assert targets == {"reranker", "embedder"} <= set(compose["services"])


def test_healthcheck_module(monkeypatch) -> None:
    from encapure.deploy import healthcheck

    monkeypatch.setenv("ENCAPURE_PORT", str(free_port()))
    assert healthcheck.main() == 1  # nothing listens there


# --- Ray Serve -----------------------------------------------------------------------------------------
QUERY = "how are glacier caves formed?"
DOCUMENTS = [
    "A partly submerged glacier cave on Perito Moreno Glacier.",
    "The ice facade is approximately 60 m high.",
    "A glacier cave is a cave formed within the ice of a glacier.",
    "Glacier caves are often called ice caves, but this term is properly used for bedrock caves.",
    "Paris is the capital of France.",
]


READY_TIMEOUT_ENV = "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"


@pytest.fixture(scope="module")
def ray_serve() -> Any:
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'encapure[ray]')")
    import ray
    from ray import serve

    from encapure.deploy.ray import PROXY_CALLBACK, PROXY_CALLBACK_ENV

    # The proxy actor reads this at start; it inherits the environment of the local cluster. So does
    # Serve's controller, which kills a proxy not ready within RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S
    # (5 s by default): on 2 cores shared with other heavy work that killed it once ("killed by
    # ray.kill ... never ran"), and serve.start failed.
    saved = {k: os.environ.get(k) for k in (PROXY_CALLBACK_ENV, READY_TIMEOUT_ENV)}
    os.environ[PROXY_CALLBACK_ENV] = PROXY_CALLBACK
    os.environ[READY_TIMEOUT_ENV] = "60"
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=80 * 1024 * 1024, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield serve, f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_ray_args_are_checked_on_the_driver() -> None:
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'encapure[ray]')")
    from pydantic import ValidationError

    from encapure.deploy.ray import split_args

    options, fields = split_args({"model": "/m", "num_replicas": "2", "workers": "1"})
    assert options.num_replicas == 2 and fields == {"model": "/m", "workers": "1", "shutdown_timeout_s": 30.0}
    with pytest.raises(ValueError, match="unknown argument"):
        split_args({"model": "/m", "replicas": 2})
    with pytest.raises(ValidationError, match="workers"):
        split_args({"model": "/m", "workers": "0"})


@pytest.mark.slow
def test_ray_serve_two_replicas_answer_like_the_library(ray_serve: Any, reranker_int8_dir: Path) -> None:
    from encapure import Reranker
    from encapure.deploy.ray import REPLICA_HEADER, build_app

    serve, url = ray_serve
    t0 = time.perf_counter()
    serve.run(
        build_app({"model": f"rr={reranker_int8_dir}", "num_replicas": 2, "workers": 1, "threads_per_worker": 1}),
        name="encapure-test", route_prefix="/",
    )
    startup = time.perf_counter() - t0
    reranker = Reranker.from_pretrained(reranker_int8_dir)
    try:
        expected = [(r.index, r.score) for r in reranker.rerank(QUERY, DOCUMENTS)]
    finally:
        reranker.close()

    with httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/ready").json()["status"] == "ready"
        native = client.post("/rerank", json={"query": QUERY, "documents": DOCUMENTS}).json()
        got = [(r["index"], r["score"]) for r in native["results"]]
        assert [i for i, _ in got] == [i for i, _ in expected]
        assert [s for _, s in got] == pytest.approx([s for _, s in expected], abs=1e-5)
        cohere = client.post("/v1/rerank", json={"model": "rr", "query": QUERY, "documents": DOCUMENTS, "top_n": 2})
        assert [r["index"] for r in cohere.json()["results"]] == [i for i, _ in expected[:2]]
        assert "encapure_queue_depth_items" in client.get("/metrics").text

    async def burst() -> set[str]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:

            async def one() -> httpx.Response:
                # a burst beyond what a replica finishes in time is refused (503 overloaded_error,
                # Retry-After) by work-based admission: a client retries, as clients should
                for _ in range(30):
                    r = await client.post("/rerank", json={"query": QUERY, "documents": DOCUMENTS * 4})
                    if r.status_code != 503 or r.json()["error"]["type"] != "overloaded_error":
                        return r
                    await asyncio.sleep(min(2.0, float(r.headers["retry-after"])))
                return r

            answers = await asyncio.gather(*[one() for _ in range(48)])
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200]
        return {a.headers[REPLICA_HEADER] for a in answers}

    assert len(asyncio.run(burst())) == 2, "both replicas serve"
    print(f"2 replicas ready in {startup:.1f} s")

    # One replica killed under load: its in-flight requests are retried by the proxy middleware
    # (Ray alone answers them 500), so every client gets its answer or our 503 with Retry-After.
    import ray

    async def under_load(seconds: float) -> list[httpx.Response]:
        stop = time.monotonic() + seconds
        answers: list[httpx.Response] = []

        async def client(http: httpx.AsyncClient) -> None:
            while time.monotonic() < stop:
                answers.append(await http.post("/rerank", json={"query": QUERY, "documents": DOCUMENTS * 8}))

        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            tasks = [asyncio.create_task(client(http)) for _ in range(16)]
            await asyncio.sleep(seconds / 3)
            victim = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                            if a["name"].startswith("SERVE_REPLICA::"))[0]
            ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
            await asyncio.gather(*tasks)
        return answers

    answers = asyncio.run(under_load(9.0))
    codes = sorted({a.status_code for a in answers})
    assert set(codes) <= {200, 503}, codes
    assert all("retry-after" in a.headers for a in answers if a.status_code == 503)
    print(f"replica killed under load: {len(answers)} answers, statuses {codes}")
    serve.delete("encapure-test")


def test_retry_middleware_replays_lost_requests_only() -> None:
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'encapure[ray]')")
    from encapure.deploy.ray import RetryLostRequests

    calls: list[bytes] = []

    def toy(behaviour: list[str]) -> Any:
        async def app(scope: Any, receive: Any, send: Any) -> None:
            message = await receive()
            calls.append(message["body"])
            what = behaviour[min(len(calls), len(behaviour)) - 1]
            if what == "lost":  # what Ray's proxy does when the replica died: nothing
                return
            if what == "cut":  # the replica died between the response's start and its body
                await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
                raise RuntimeError("ActorDiedError")
            status, ctype = {"ok": (200, b"application/json"), "ray500": (500, b"text/plain"),
                             "app500": (500, b"application/json")}[what]
            await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", ctype)]})
            await send({"type": "http.response.body", "body": what.encode()})
        return app

    async def post(behaviour: list[str]) -> httpx.Response:
        calls.clear()
        app = RetryLostRequests(toy(behaviour), retries=2, backoff_s=0)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.post("/rerank", content=b"payload")

    r = asyncio.run(post(["lost", "ok"]))
    assert (r.status_code, r.text, calls) == (200, "ok", [b"payload", b"payload"])
    r = asyncio.run(post(["cut", "ok"]))  # nothing reached the client before the body: replayed
    assert (r.status_code, r.text, len(calls)) == (200, "ok", 2)
    r = asyncio.run(post(["ray500", "ok"]))
    assert (r.status_code, len(calls)) == (200, 2)
    r = asyncio.run(post(["app500"]))  # our own errors are answers, never replayed
    assert (r.status_code, r.text, len(calls)) == (500, "app500", 1)
    r = asyncio.run(post(["lost"]))
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and len(calls) == 3
    assert r.json()["error"]["type"] == "service_unavailable"
