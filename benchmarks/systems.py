"""Systems under test: how to start each server on 127.0.0.1, talk to it, and tear it down.

Every server is a subprocess in its own session (process group) on a free loopback port, with
the same thread budget (``OMP_NUM_THREADS`` / intra-op threads = 2) and the hubs switched off.
Startup time is measured from ``Popen`` to the first 200 on the readiness route.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from benchmarks.loadgen import HttpRequest
from benchmarks.models import ROOT, WORK
from benchmarks.workloads import Request

THREADS = 2
LOGS = WORK / "logs"


def base_env(threads: int = THREADS) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        OPENBLAS_NUM_THREADS=str(threads),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        DO_NOT_TRACK="1",
        INFINITY_ANONYMOUS_USAGE_STATS="0",
        PYTHONUNBUFFERED="1",
    )
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- /proc helpers (no psutil dependency) -------------------------------------------------------


def _children_map() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                stat = fh.read()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        out.setdefault(ppid, []).append(int(d))
    return out


def process_tree(pid: int) -> list[int]:
    kids = _children_map()
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo.extend(kids.get(p, []))
    return seen


def rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (mosec runs workers as children)."""
    total_kb = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total_kb += int(line.split()[1])
                        break
        except OSError:
            continue
    return total_kb / 1024.0


def cpu_seconds(pid: int) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, ValueError, IndexError):
            continue
    return total / tick


# --- request/response shapes ---------------------------------------------------------------------


def _scores_native(body: bytes) -> list[float]:
    return [float(s) for s in json.loads(body)["scores"]]


def _scores_infinity(body: bytes) -> list[float]:
    res = json.loads(body)["results"]
    out = [0.0] * len(res)
    for r in res:
        out[int(r["index"])] = float(r["relevance_score"])
    return out


def _embeddings_openai(body: bytes) -> list[list[float]]:
    data = json.loads(body)["data"]
    data = sorted(data, key=lambda d: d.get("index", 0))
    return [list(map(float, d["embedding"])) for d in data]


@dataclass
class ServerSpec:
    """How to start one server and how to speak to it."""

    name: str
    label: str
    task: str  # rerank | embed
    cmd: list[str]
    ready_path: str
    route: str
    env: dict[str, str] = field(default_factory=dict)
    model_field: str | None = None  # value of the "model" field in requests, if the server wants one
    parse: Callable[[bytes], Any] = _scores_native
    config: str = ""  # how it was configured, for the report
    family: str = ""  # encapure | naive | st | infinity | mosec
    ready_timeout_s: float = 180.0
    cwd: Path | None = None

    def http_request(self, req: Request) -> HttpRequest:
        body: dict[str, Any]
        if self.task == "rerank":
            body = {"query": req.query or "", "documents": req.texts}
        else:
            body = {"input": req.texts}
        if self.model_field:
            body["model"] = self.model_field
        return HttpRequest(self.route, json.dumps(body).encode(), req.items, key=req.key)


class ServerProcess:
    """A running server; ``stop()`` is idempotent and also runs at interpreter exit."""

    _live: ClassVar[list[ServerProcess]] = []

    def __init__(self, spec: ServerSpec) -> None:
        self.spec = spec
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s: float | None = None
        self.rss_ready_mb: float | None = None
        self.log = LOGS / f"server-{spec.name}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> float:
        LOGS.mkdir(parents=True, exist_ok=True)
        cmd = [c.replace("{port}", str(self.port)) for c in self.spec.cmd]
        env = base_env()
        env.update(self.spec.env)
        fh = open(self.log, "wb")  # noqa: SIM115 - lives as long as the process
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=self.spec.cwd or ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        ServerProcess._live.append(self)
        deadline = t0 + self.spec.ready_timeout_s
        while True:
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{self.spec.name} exited with {self.proc.returncode} during startup:\n{tail}")
            try:
                with urllib.request.urlopen(self.url + self.spec.ready_path, timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.perf_counter() > deadline:
                self.stop()
                raise RuntimeError(f"{self.spec.name} not ready after {self.spec.ready_timeout_s:.0f} s (log {self.log})")
            time.sleep(0.05)
        self.startup_s = time.perf_counter() - t0
        self.rss_ready_mb = rss_mb(self.proc.pid)
        return self.startup_s

    def rss_mb(self) -> float | None:
        return rss_mb(self.proc.pid) if self.proc and self.proc.poll() is None else None

    def cpu_s(self) -> float:
        return cpu_seconds(self.proc.pid) if self.proc else 0.0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 15.0) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        # Stragglers of the group (e.g. mosec workers) go too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if self in ServerProcess._live:
            ServerProcess._live.remove(self)


@atexit.register
def _stop_all() -> None:
    for s in list(ServerProcess._live):
        s.stop(timeout_s=5)


# --- the catalogue -------------------------------------------------------------------------------

PY = sys.executable


def encapure_spec(model_dir: Path, *, name: str, label: str, task: str = "rerank",
                  extra: list[str] | None = None) -> ServerSpec:
    return ServerSpec(
        name=name,
        label=label,
        task=task,
        cmd=[PY, "-m", "encapure", "serve", "--model", str(model_dir), "--host", "127.0.0.1",
             "--port", "{port}", "--log-level", "warning", *(extra or [])],
        ready_path="/ready",
        route="/rerank" if task == "rerank" else "/v1/embeddings",
        parse=_scores_native if task == "rerank" else _embeddings_openai,
        config="`encapure serve` default settings (scheduler: cross-request batching, length sorting)",
        family="encapure",
    )


def naive_spec(model_dir: Path, *, task: str = "rerank") -> ServerSpec:
    return ServerSpec(
        name=f"naive-{task}",
        label="naive FastAPI+ORT int8",
        task=task,
        cmd=[PY, "-m", "benchmarks.naive_server", "--model", str(model_dir), "--port", "{port}",
             "--threads", str(THREADS)],
        ready_path="/health",
        route="/rerank" if task == "rerank" else "/v1/embeddings",
        parse=_scores_native if task == "rerank" else _embeddings_openai,
        config="benchmarks/naive_server.py: same int8 model.onnx as Encapure, one session.run per request, "
        f"intra-op threads {THREADS}, sync FastAPI handler",
        family="naive",
    )


def st_spec(model: Path, *, task: str = "rerank", max_length: int | None = 256) -> ServerSpec:
    cmd = [PY, "-m", "benchmarks.st_server", "--task", task, "--model", str(model), "--port", "{port}",
           "--threads", str(THREADS)]
    if task == "rerank" and max_length:
        cmd += ["--max-length", str(max_length)]
    return ServerSpec(
        name=f"st-{task}",
        label="sentence-transformers (PyTorch fp32) + FastAPI",
        task=task,
        cmd=cmd,
        ready_path="/health",
        route="/rerank" if task == "rerank" else "/v1/embeddings",
        parse=_scores_native if task == "rerank" else _embeddings_openai,
        config=f"benchmarks/st_server.py: {'CrossEncoder.predict' if task == 'rerank' else 'SentenceTransformer.encode'}"
        f"(batch_size=32), torch threads {THREADS}, sync FastAPI handler",
        family="st",
    )


def infinity_spec(model_dir: Path, python: Path, *, engine: str, task: str = "rerank",
                  pooling: str | None = None) -> ServerSpec:
    exe = python.parent / "infinity_emb"
    # infinity 0.0.78 hands optimum the ONNX file's path as found by globbing the model folder, and
    # optimum 2.x compares it to bare file names: only a model id of "." (run from the folder) matches.
    model_id = "." if engine == "optimum" else str(model_dir)
    cmd = [str(exe), "v2", "--model-id", model_id, "--served-model-name", "bench",
           "--engine", engine, "--device", "cpu", "--host", "127.0.0.1", "--port", "{port}",
           "--batch-size", "32", "--no-vector-disk-cache", "--log-level", "warning"]
    if pooling:
        cmd += ["--pooling-method", pooling]
    return ServerSpec(
        name=f"infinity-{engine}-{task}",
        label=f"infinity-emb ({engine})",
        task=task,
        cmd=cmd,
        ready_path="/health",
        route="/rerank" if task == "rerank" else "/embeddings",
        model_field="bench",
        parse=_scores_infinity if task == "rerank" else _embeddings_openai,
        config=f"`infinity_emb v2 --engine {engine} --device cpu --batch-size 32"
        + (f" --pooling-method {pooling}" if pooling else "")
        + f"`, OMP_NUM_THREADS={THREADS}"
        + ("; our int8 model.onnx linked as model_quantized.onnx beside the HF files, run from that folder"
           if engine == "optimum" else "; PyTorch fp32 from the HF folder"),
        family="infinity",
        ready_timeout_s=300.0,
        cwd=model_dir if engine == "optimum" else None,
    )


def mosec_spec(model_dir: Path, python: Path, *, task: str = "rerank", max_batch: int = 8) -> ServerSpec:
    return ServerSpec(
        name=f"mosec-{task}",
        label="mosec + ORT int8",
        task=task,
        cmd=[str(python), str(ROOT / "benchmarks" / "mosec_server.py"), "--address", "127.0.0.1",
             "--port", "{port}", "--timeout", "30000", "--log-level", "warning"],
        ready_path="/",
        route="/inference",
        env={"BENCH_MODEL_DIR": str(model_dir), "BENCH_TASK": task, "BENCH_THREADS": str(THREADS),
             "BENCH_MAX_BATCH": str(max_batch), "BENCH_MAX_WAIT_MS": "10"},
        parse=_scores_native if task == "rerank" else _embeddings_openai,
        config=f"benchmarks/mosec_server.py: 1 worker, same int8 model.onnx, dynamic batching max_batch_size="
        f"{max_batch} requests, max_wait_time=10 ms, intra-op threads {THREADS}, timeout 30 s",
        family="mosec",
    )


def infinity_model_dir(hf_dir: Path, onnx_file: Path | None, name: str,
                       rename_output: tuple[str, str] | None = None) -> Path:
    """A folder infinity's optimum engine can load: the HF files plus our ONNX file (symlinks).

    Named ``model_quantized.onnx`` so infinity (which prefers "quantize" files on CPU) picks it.
    ``rename_output=(ours, theirs)`` writes a copy whose graph output is renamed (optimum's
    feature-extraction class insists on ``last_hidden_state``); weights and ops are untouched.
    """
    out = WORK / "infinity-models" / name
    out.mkdir(parents=True, exist_ok=True)
    for f in hf_dir.iterdir():
        if f.suffix == ".onnx" or f.name.startswith("."):
            continue
        link = out / f.name
        if not link.exists():
            link.symlink_to(f.resolve())
    if onnx_file is not None:
        link = out / "model_quantized.onnx"
        if rename_output is None:
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(onnx_file.resolve())
        elif not link.exists() or link.is_symlink() or link.stat().st_mtime < onnx_file.stat().st_mtime:
            import onnx

            m = onnx.load(str(onnx_file))
            old, new = rename_output
            for node in m.graph.node:
                node.output[:] = [new if o == old else o for o in node.output]
            for o in m.graph.output:
                if o.name == old:
                    o.name = new
            if link.is_symlink():
                link.unlink()
            onnx.save(m, str(link))
    return out
