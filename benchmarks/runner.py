"""The benchmark run: prepare models and peers, measure every system side by side, save results.json.

Order of work: rerank servers (all started once, then every cell runs each system in ABBA order
to cancel drift), in-process baselines, embedding servers, the headline model, and a py-spy
profile of the Encapure server under load.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks import loadgen
from benchmarks.envs import PEERS, ensure_env
from benchmarks.models import (
    RERANKER_FIXTURE,
    ROOT,
    WIKIQA_TEST,
    embedder_source,
    ensure_export,
    export_seconds,
)
from benchmarks.systems import (
    THREADS,
    ServerProcess,
    ServerSpec,
    base_env,
    encapure_spec,
    infinity_model_dir,
    infinity_spec,
    mosec_spec,
    naive_spec,
    st_spec,
)
from benchmarks.workloads import (
    TextMaker,
    Workload,
    answerable,
    embedding_workload,
    load_wikiqa,
    mean_average_precision,
    synthetic,
)

REQUEST_TIMEOUT_S = 30.0  # Encapure's default --request-timeout; the client waits longer to see it
_OPEN_ROUNDS = 3  # open-loop rounds per system, order alternated (Bench.open_loop)


@dataclass
class Plan:
    quick: bool
    cell_s: float  # per system and cell, split over two rounds (ABBA)
    concurrencies: list[int]
    synth_concurrency: int
    synth: list[str]
    open_loop_s: float  # per system, over _OPEN_ROUNDS alternated rounds
    map_questions: int | None  # None: all
    inproc_s: float
    inproc_workloads: list[str]
    emb_concurrencies: list[int]
    headline: bool
    headline_c1_s: float
    headline_c8_s: float
    profile_s: float
    precisions: list[str]
    peers: list[str]
    only: list[str] = field(default_factory=list)  # restrict phases
    systems: list[str] = field(default_factory=list)  # restrict systems (substrings of their names)

    def wants(self, name: str) -> bool:
        return not self.systems or any(s in name for s in self.systems)

    @classmethod
    def make(cls, quick: bool) -> Plan:
        if quick:
            # ~3 min on a quiet 2-core machine: three rerank cells (the synthetic mix at c=4: at c=16 its
            # 8 x 400-token requests take seconds each and draining them dominated), one peer, no headline.
            return cls(quick=True, cell_s=1.0, concurrencies=[1, 16], synth_concurrency=4, synth=["mix"],
                       open_loop_s=2.0, map_questions=30, inproc_s=1.5, inproc_workloads=["wikiqa"],
                       emb_concurrencies=[16], headline=False, headline_c1_s=8.0, headline_c8_s=10.0,
                       profile_s=3.0, precisions=["int8"], peers=["infinity-torch"])
        # < 20 min (21.5 min with 4 s cells and synthetic at c=16): a cell's cost is dominated by
        # draining in-flight requests (latency ~ concurrency x docs / throughput) after each half,
        # so the synthetic workloads run at c=8.
        return cls(quick=False, cell_s=3.0, concurrencies=[1, 8, 32, 100], synth_concurrency=8,
                   synth=["short", "long", "mix"], open_loop_s=30.0, map_questions=None, inproc_s=5.0,
                   inproc_workloads=["wikiqa", "mix"], emb_concurrencies=[1, 16],
                   headline=True, headline_c1_s=10.0, headline_c8_s=15.0, profile_s=8.0,
                   precisions=["int8", "fp32", "int4"],
                   peers=["infinity-torch", "infinity-optimum", "mosec"])


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _cosines(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Cosine of each row of ``got`` to the same row of ``ref``."""
    b = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    return np.asarray((got * b).sum(1) / np.linalg.norm(got, axis=1))


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "mem_gb": mem_gb,
        "isa": sorted(f for f in flags if f in {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "fma", "amx_int8"}),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_start": os.getloadavg(),
    }


def main_versions() -> dict[str, str]:
    import importlib.metadata as m

    out = {}
    for n in ("encapure", "onnxruntime", "tokenizers", "numpy", "torch", "transformers", "sentence-transformers",
              "fastapi", "uvicorn", "aiohttp", "py-spy"):
        try:
            out[n] = m.version(n)
        except m.PackageNotFoundError:
            out[n] = "absent"
    return out


class Bench:
    def __init__(self, plan: Plan, out_dir: Path) -> None:
        self.plan = plan
        self.out = out_dir
        self.tmp = Path(tempfile.mkdtemp(prefix="encapure-bench-"))
        self.r: dict[str, Any] = {
            "meta": {"machine": machine_info(), "versions": {"main": main_versions()}, "plan": asdict(plan),
                     "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                     "command": " ".join([Path(sys.executable).name, "-m", "benchmarks", *sys.argv[1:]]),
                     "threads": THREADS},
            "exports": {}, "servers": {}, "cells": [], "quality": {}, "inproc": [], "embed_quality": {},
            "headline": {}, "profile": {}, "problems": [],
        }
        self.wikiqa = load_wikiqa(WIKIQA_TEST)

    # --- helpers -----------------------------------------------------------------------------
    def problem(self, what: str, err: BaseException | str) -> None:
        msg = str(err).strip().splitlines()
        short = " | ".join(msg[-6:])[-900:] if msg else repr(err)
        log(f"PROBLEM {what}: {short}")
        self.r["problems"].append({"what": what, "error": short})

    def export(self, name: str, precision: str) -> Path | None:
        key = f"{name}-{precision}"
        try:
            t0 = time.perf_counter()
            d = ensure_export(name, precision)
            info: dict[str, Any] = {"dir": str(d.relative_to(ROOT)), "export_s": export_seconds(d),
                                    "cached": time.perf_counter() - t0 < 1.0}
            info["size_mb"] = sum(f.stat().st_size for f in d.iterdir() if f.is_file()) / 1e6
            with contextlib.suppress(OSError, ValueError):
                info["parity"] = json.loads((d / "parity.json").read_text())
            try:
                man = json.loads((d / "encapure.json").read_text())
                info["quantization"] = man.get("quantization")
                info["fusions"] = man.get("fusions")
            except (OSError, ValueError):
                pass
            self.r["exports"][key] = info
            return d
        except Exception as e:
            self.problem(f"export {key}", e)
            return None

    def peer(self, name: str) -> Path | None:
        try:
            versions = ensure_env(name)
            self.r["meta"]["versions"][name] = versions
            return PEERS[name].python
        except Exception as e:
            self.problem(f"venv {name}", e)
            return None

    def start(self, spec: ServerSpec, phase: str) -> ServerProcess | None:
        s = ServerProcess(spec)
        info: dict[str, Any] = {"label": spec.label, "config": spec.config, "family": spec.family,
                                "phase": phase, "task": spec.task,
                                "command": " ".join(spec.cmd).replace(str(ROOT) + "/", "")}
        self.r["servers"][spec.name] = info
        try:
            log(f"starting {spec.name}")
            info["startup_s"] = s.start()
            info["rss_ready_mb"] = s.rss_ready_mb
            log(f"  ready in {info['startup_s']:.1f} s, RSS {info['rss_ready_mb']:.0f} MB")
            return s
        except Exception as e:
            info["error"] = str(e)[-600:]
            self.problem(f"start {spec.name}", e)
            s.stop()
            return None

    def idle_cpu(self, servers: list[ServerProcess], seconds: float = 2.0) -> None:
        before = {s.spec.name: s.cpu_s() for s in servers}
        time.sleep(seconds)
        for s in servers:
            self.r["servers"][s.spec.name]["idle_cpu_pct"] = 100.0 * (s.cpu_s() - before[s.spec.name]) / seconds

    def cells(self, phase: str, servers: list[ServerProcess], cells: list[tuple[Workload, int]],
              first: int = 0) -> None:
        """Each cell: every system twice, forward then reverse order (alternating per cell)."""
        for ci, (wl, c) in enumerate(cells):
            log(f"{phase}: {wl.name} concurrency {c}")
            per: dict[str, list[loadgen.RunResult]] = {s.spec.name: [] for s in servers}
            cpu: dict[str, float] = {s.spec.name: 0.0 for s in servers}
            for rnd in range(2):
                order = servers if (first + ci + rnd) % 2 == 0 else list(reversed(servers))
                for s in order:
                    if not s.alive():
                        continue
                    reqs = [s.spec.http_request(r) for r in wl.requests]
                    c0 = s.cpu_s()
                    res = loadgen.run_closed(s.url, reqs, concurrency=c, max_requests=1_000_000,
                                             duration_s=self.plan.cell_s / 2, timeout_s=REQUEST_TIMEOUT_S + 30,
                                             warmup_requests=min(c, 8) if rnd == 0 else 0)
                    cpu[s.spec.name] += s.cpu_s() - c0
                    per[s.spec.name].append(res)
            for s in servers:
                if not per[s.spec.name]:
                    continue
                m = loadgen.merge(per[s.spec.name])
                row = {"phase": phase, "workload": wl.name, "system": s.spec.name, **m.summary()}
                row["server_cpu_util"] = cpu[s.spec.name] / max(m.wall_s, 1e-9)
                self.r["cells"].append(row)
                log(f"  {s.spec.name:28s} {row['items_per_s']:8.1f} items/s  p50 {row['p50_ms'] or 0:8.1f} ms"
                    f"  p99 {row['p99_ms'] or 0:8.1f} ms  errors {row['errors']}")

    def quality_pass(self, servers: list[ServerProcess]) -> None:
        n = self.plan.map_questions or len(self.wikiqa.requests)
        wl = Workload("wikiqa", "rerank", self.wikiqa.requests[:n])
        for s in servers:
            if not s.alive():
                continue
            reqs = [s.spec.http_request(r) for r in wl.requests]
            res = loadgen.run_closed(s.url, reqs, concurrency=8, max_requests=len(reqs), duration_s=240,
                                     timeout_s=120, keep_bodies=True)
            scores = loadgen.bodies_by_key(res, s.spec.parse)
            mp, scored = mean_average_precision(wl, scores)
            sm = res.summary()
            self.r["quality"][s.spec.name] = {"map": mp, "scored": scored, "answerable": answerable(wl),
                                              "questions": n, "items_per_s": sm["items_per_s"]}
            log(f"  MAP {s.spec.name:28s} {mp:.4f} ({scored}/{answerable(wl)} questions)")

    def open_loop(self, phase: str, servers: list[ServerProcess], wl: Workload) -> None:
        """Poisson arrivals at 80% of each system's best closed-loop rate, in ``_OPEN_ROUNDS`` rounds with
        the systems' order alternated, pooled per system.

        Why rounds: near saturation a few % of offered load, or a burst of other work on the 2 cores,
        moves p50 several-fold; one 15 s cell per system ranked close systems by luck (quiet repeats,
        AMD EPYC AVX-512 VNNI: the default's p50 202-224 ms and infinity-emb's 344-466 ms at 80%, where
        one cell of the full run had them 614 vs 543).
        """
        rates: dict[str, tuple[float, float]] = {}
        for s in servers:
            caps = [c["req_per_s"] for c in self.r["cells"]
                    if c["system"] == s.spec.name and c["workload"] == wl.name and c["mode"] == "closed"]
            if caps and max(caps) > 0:
                rates[s.spec.name] = (0.8 * max(caps), max(caps))
        runs: dict[str, list[loadgen.RunResult]] = {name: [] for name in rates}
        for rnd in range(_OPEN_ROUNDS):
            order = servers if rnd % 2 == 0 else list(reversed(servers))
            for s in order:
                if s.spec.name not in rates or not s.alive():
                    continue
                reqs = [s.spec.http_request(r) for r in wl.requests]
                runs[s.spec.name].append(loadgen.run_open(
                    s.url, reqs, rate=rates[s.spec.name][0], max_requests=100_000,
                    duration_s=self.plan.open_loop_s / _OPEN_ROUNDS, timeout_s=REQUEST_TIMEOUT_S + 30))
        for s in servers:
            if not runs.get(s.spec.name):
                continue
            rate, cap = rates[s.spec.name]
            per_round = [r.summary().get("p50_ms") for r in runs[s.spec.name]]
            row = {"phase": phase, "workload": wl.name, "system": s.spec.name,
                   **loadgen.merge(runs[s.spec.name]).summary(), "capacity_req_per_s": cap,
                   "round_p50_ms": per_round}
            self.r["cells"].append(row)
            log(f"  open loop {s.spec.name:24s} {rate:6.1f} req/s -> p50 {row['p50_ms'] or 0:.0f} ms "
                f"p99 {row['p99_ms'] or 0:.0f} ms errors {row['errors']} (round p50s {per_round})")

    # --- phases -----------------------------------------------------------------------------
    def synth_workloads(self, tokenizer: Path) -> dict[str, Workload]:
        maker = TextMaker(tokenizer, self.wikiqa, seed=1)
        n = 48
        return {
            "short": synthetic("short", maker, n_requests=n, docs=8, lengths=[32]),
            "long": synthetic("long", maker, n_requests=n, docs=8, lengths=[256]),
            "mix": synthetic("mix", maker, n_requests=n, docs=8, length_range=(8, 400)),
        }

    def rerank_phase(self, dirs: dict[str, Path]) -> None:
        p = self.plan
        specs: list[ServerSpec] = []
        for prec in p.precisions:
            if prec in dirs:
                specs.append(encapure_spec(dirs[prec], name=f"encapure-{prec}", label=f"Encapure server {prec} (default backend: auto)"))
        int8 = dirs.get("int8")
        if int8 is not None:
            # The default is --backend auto (the probe's pick on this CPU); the same int8 file pinned to
            # ONNX Runtime, and the one-worker x 2-thread split: rows beside the default so one run decides.
            specs.append(encapure_spec(int8, name="encapure-int8-onnxruntime",
                                       label="Encapure server int8, ONNX Runtime pinned",
                                       extra=["--backend", "onnxruntime"]))
            specs.append(encapure_spec(int8, name="encapure-int8-1x2", label="Encapure server int8, 1 worker x 2 threads",
                                       extra=["--workers", "1", "--threads-per-worker", "2"]))
            specs.append(naive_spec(int8))
        specs.append(st_spec(RERANKER_FIXTURE))
        if any(x.startswith("infinity") for x in p.peers) and (py := self.peer("infinity")):
            if "infinity-torch" in p.peers:
                specs.append(infinity_spec(RERANKER_FIXTURE, py, engine="torch"))
            if "infinity-optimum" in p.peers and int8 is not None:
                specs.append(infinity_spec(infinity_model_dir(RERANKER_FIXTURE, int8 / "model.onnx", "reranker-int8"),
                                           py, engine="optimum"))
        if "mosec" in p.peers and int8 is not None and (py := self.peer("mosec")):
            specs.append(mosec_spec(int8, py))
        servers = [s for s in (self.start(sp, "rerank") for sp in specs if p.wants(sp.name)) if s is not None]
        try:
            self.idle_cpu(servers)
            synth = self.synth_workloads(int8 / "tokenizer.json" if int8 else RERANKER_FIXTURE / "tokenizer.json")
            self.r["meta"].setdefault("workloads", {}).update(
                {"wikiqa": self.wikiqa.description, **{k: v.description for k, v in synth.items()}})
            cells = [(self.wikiqa, c) for c in p.concurrencies]
            cells += [(synth[k], p.synth_concurrency) for k in p.synth]
            self.cells("rerank", servers, cells)
            log("rerank: MAP passes")
            self.quality_pass(servers)
            log("rerank: open loop at 80% of capacity")
            self.open_loop("rerank", servers, self.wikiqa)
            enc = next((s for s in servers if s.spec.name == "encapure-int8" and s.alive()), None)
            if enc is not None and p.profile_s > 0:
                self.profile(enc)
            for s in servers:
                self.r["servers"][s.spec.name]["rss_after_mb"] = s.rss_mb()
                self.r["servers"][s.spec.name]["alive_after"] = s.alive()
        finally:
            for s in servers:
                s.stop()
        self._synth = synth

    def profile(self, server: ServerProcess) -> None:
        """py-spy record (Python frames, GIL-idle threads excluded) while 32 clients load the server."""
        log("profile: py-spy on encapure-int8 under concurrency 32")
        pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        out = self.tmp / "profile.txt"
        assert server.proc is not None
        cmd = [pyspy, "record", "--pid", str(server.proc.pid), "--duration", str(int(self.plan.profile_s)),
               "--rate", "200", "--format", "raw", "--output", str(out), "--nonblocking"]
        prof = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        time.sleep(0.5)
        reqs = [server.spec.http_request(r) for r in self.wikiqa.requests]
        res = loadgen.run_closed(server.url, reqs, concurrency=32, max_requests=1_000_000,
                                 duration_s=self.plan.profile_s, timeout_s=90)
        try:
            pout, _ = prof.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            prof.kill()
            pout = b""
        if not out.exists():
            self.problem("py-spy", pout.decode(errors="replace")[-800:])
            return
        self.r["profile"] = summarize_profile(out.read_text())
        self.r["profile"]["load"] = res.summary()
        self.r["profile"]["command"] = " ".join([*cmd[:1], "record", "--pid", "PID", *cmd[4:]]).replace(
            str(self.tmp), "<tmp>")
        (self.out / "profile-encapure-int8.collapsed.txt").write_text(out.read_text())

    def inproc_phase(self, dirs: dict[str, Path]) -> None:
        p = self.plan
        wls: dict[str, Workload] = {"wikiqa": self.wikiqa, **getattr(self, "_synth", {})}
        systems: list[tuple[str, str, str]] = [(f"engine-{prec}", "engine", str(dirs[prec]))
                                                for prec in p.precisions if prec in dirs]
        if "int8" in dirs:
            systems.append(("engine-int8-onnxruntime", "engine", str(dirs["int8"])))
            systems.append(("engine-int8-openvino", "engine", str(dirs["int8"])))
        systems.append(("st-inproc", "st", str(RERANKER_FIXTURE)))
        systems = [x for x in systems if p.wants(x[0])]
        for wi, wname in enumerate(p.inproc_workloads):
            if wname not in wls:
                continue
            wl = wls[wname]
            wf = self.tmp / f"wl-{wname}.json"
            wf.write_text(json.dumps([{"query": r.query, "texts": r.texts, "key": str(r.key)} for r in wl.requests]))
            order = systems if wi % 2 == 0 else list(reversed(systems))
            for name, kind, model in order:
                log(f"inproc: {name} on {wname}")
                res = self.run_inproc(kind, "rerank", model, wf, max_length=256 if kind == "st" else None,
                                      full_pass=wname == "wikiqa" and kind == "engine",
                                      backend=next((b for b in ("openvino", "onnxruntime") if name.endswith(b)), None))
                if res is None:
                    continue
                row = {**{k: v for k, v in res.items() if k != "scores_by_key"}, "system": name, "workload": wname}
                if res["scores_by_key"]:
                    # Same questions as the servers' MAP pass, so the numbers compare.
                    n_q = p.map_questions or len(wl.requests)
                    mp, scored = mean_average_precision(Workload(wl.name, wl.task, wl.requests[:n_q]),
                                                        res["scores_by_key"])
                    row["map"], row["scored"] = mp, scored
                self.r["inproc"].append(row)
                log(f"  {name:12s} bulk {res['bulk_items_per_s']:8.1f} items/s  sequential p50 "
                    f"{res['seq_p50_ms'] or 0:.1f} ms" + (f"  MAP {row['map']:.4f}" if "map" in row else ""))

    def run_inproc(self, kind: str, task: str, model: str, wf: Path, max_length: int | None = None,
                   full_pass: bool = False, backend: str | None = None) -> dict[str, Any] | None:
        out = self.tmp / "inproc.json"
        out.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "benchmarks.inproc", "--system", kind, "--task", task, "--model", model,
               "--workload", str(wf), "--duration", str(self.plan.inproc_s), "--threads", str(THREADS),
               "--out", str(out)]
        if max_length:
            cmd += ["--max-length", str(max_length)]
        if full_pass:
            cmd += ["--full-pass"]
        if backend:
            cmd += ["--backend", backend]
        try:
            r = subprocess.run(cmd, cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=600, check=False)
        except subprocess.TimeoutExpired as e:
            self.problem(f"inproc {kind} {wf.name}", e)
            return None
        if r.returncode != 0 or not out.exists():
            self.problem(f"inproc {kind} {wf.name}", r.stderr[-1500:])
            return None
        return dict(json.loads(out.read_text()))

    def embed_phase(self) -> None:
        p = self.plan
        emb_src = embedder_source()
        int8 = self.export("embedder", "int8")
        wl = embedding_workload(self.wikiqa, per_request=8, n_requests=200)
        self.r["meta"].setdefault("workloads", {})["embed"] = wl.description
        specs: list[ServerSpec] = []
        # The default row serves the Hugging Face folder as a user does (`serve --model FOLDER`): exported on
        # load at int8 and, under --backend auto, the ONNX export on ONNX Runtime or the NNCF IR on OpenVINO,
        # whichever the probe measured faster (first start: two exports and the probe; later ones read the
        # cache). The same int8 ONNX file pinned to ONNX Runtime beside it.
        specs.append(encapure_spec(emb_src, name="encapure-embed-int8",
                                   label="Encapure server int8 (default: HF folder, exported on load, backend auto)",
                                   task="embed"))
        if int8 is not None:
            specs.append(encapure_spec(int8, name="encapure-embed-int8-onnxruntime",
                                       label="Encapure server int8 ONNX, ONNX Runtime pinned", task="embed",
                                       extra=["--backend", "onnxruntime"]))
            specs.append(naive_spec(int8, task="embed"))
        # The OpenVINO int8 embedder recipe (NNCF static int8 IR, what `serve --backend openvino` exports
        # on load): the int8 IR against the int8 ONNX graph above on the same backend.
        ov_ir = self.export("embedder", "int8-openvino")
        if ov_ir is not None:
            specs.append(encapure_spec(ov_ir, name="encapure-embed-int8-ir-openvino",
                                       label="Encapure server int8 IR (NNCF static), OpenVINO", task="embed",
                                       extra=["--backend", "openvino"]))
        specs.append(st_spec(emb_src, task="embed"))
        if any(x.startswith("infinity") for x in p.peers) and (py := self.peer("infinity")):
            if "infinity-torch" in p.peers:
                specs.append(infinity_spec(emb_src, py, engine="torch", task="embed", pooling="mean"))
            if "infinity-optimum" in p.peers and int8 is not None:
                out_name = json.loads((int8 / "encapure.json").read_text())["output_name"]
                inf_dir = infinity_model_dir(emb_src, int8 / "model.onnx", "embedder-int8",
                                             rename_output=(out_name, "last_hidden_state"))
                specs.append(infinity_spec(inf_dir, py,
                                           engine="optimum", task="embed", pooling="mean"))
        if "mosec" in p.peers and int8 is not None and (py := self.peer("mosec")):
            specs.append(mosec_spec(int8, py, task="embed"))
        # Reference: sentence-transformers in-process (fp32), first 64 texts.
        wf = self.tmp / "wl-embed.json"
        wf.write_text(json.dumps([{"query": None, "texts": r.texts, "key": str(r.key)} for r in wl.requests]))
        ref_rows = []
        # int8 beside fp32 in-process: the default (the Hugging Face folder loaded as a user does, which
        # exports at int8 and lets --backend auto pick between the ONNX export and the IR), then per backend:
        # ONNX Runtime runs the int8 ONNX graph (accuracy-first recipe), OpenVINO the int8 IR; both fp32
        # rows run the same fp32 ONNX export.
        fp32 = None if p.quick else self.export("embedder", "fp32")
        inproc: list[tuple[str, str, Path | None, str | None]] = [
            ("engine-embed-int8", "engine", emb_src, None),  # the default: exported on load, backend auto
            ("engine-embed-int8-onnxruntime", "engine", int8, "onnxruntime"),
            ("engine-embed-fp32", "engine", fp32, None),
            ("engine-embed-int8-openvino", "engine", ov_ir, "openvino"),
            ("engine-embed-fp32-openvino", "engine", fp32, "openvino"),
            ("st-embed-inproc", "st", emb_src, None),
        ]
        for name, kind, model, backend in inproc:
            if model is None:
                continue
            log(f"inproc embed: {name}")
            res = self.run_inproc(kind, "embed", str(model), wf, backend=backend)
            if res:
                ref_rows.append((name, res))
                self.r["inproc"].append({**{k: v for k, v in res.items() if k not in ("scores_by_key", "embeddings_head")},
                                         "system": name, "workload": wl.name})
        ref = next((np.array(r["embeddings_head"]) for n, r in ref_rows if n == "st-embed-inproc"), None)
        if ref is not None:  # the in-process rows' cosine, on the texts the servers' is taken on
            for name, res in ref_rows:
                head = res.get("embeddings_head")
                row = next(x for x in self.r["inproc"] if x["system"] == name and x["workload"] == wl.name)
                if name != "st-embed-inproc" and head is not None and len(head) == len(ref):
                    cos = _cosines(np.array(head, dtype=np.float64), ref)
                    row["min_cos"], row["mean_cos"] = float(cos.min()), float(cos.mean())
        servers = [s for s in (self.start(sp, "embed") for sp in specs if p.wants(sp.name)) if s is not None]
        try:
            self.idle_cpu(servers)
            self.cells("embed", servers, [(wl, c) for c in p.emb_concurrencies])
            if ref is not None:
                head = Workload("embed-head", "embed", wl.requests[:8])
                for s in servers:
                    reqs = [s.spec.http_request(r) for r in head.requests]
                    qres = loadgen.run_closed(s.url, reqs, concurrency=1, max_requests=len(reqs), duration_s=60,
                                              keep_bodies=True)
                    got = loadgen.bodies_by_key(qres, s.spec.parse)
                    vecs = [v for r in head.requests for v in got.get(r.key, [])]
                    if len(vecs) != len(ref):
                        continue
                    cos = _cosines(np.array(vecs, dtype=np.float64), ref)
                    self.r["embed_quality"][s.spec.name] = {"min_cos": float(cos.min()), "mean_cos": float(cos.mean())}
                    log(f"  cosine vs sentence-transformers {s.spec.name:28s} min {cos.min():.4f} mean {cos.mean():.4f}")
            for s in servers:
                self.r["servers"][s.spec.name]["rss_after_mb"] = s.rss_mb()
        finally:
            for s in servers:
                s.stop()

    def headline_phase(self) -> None:
        """bge-reranker-v2-m3 per backend/precision, `encapure serve` default settings: startup, RSS at
        ready and after the load, 8 x 64-token latency (c=1) and throughput (c=8).

        Not here: the int8 ONNX export on ``--backend openvino``. Checked once (engine, 1 worker, shared
        2-core AMD EPYC at load ~11): 247 s to load, 63 s for the first batch of 8 short pairs, 22 s for
        the second, 4.4 GB RSS; minutes of a benchmark run for a configuration nobody should serve."""
        p = self.plan
        rows: list[tuple[str, str, list[str]]] = [("int8", "int8", []), ("int4", "int4", []),
                                                  ("int4-openvino", "int4-openvino", [])]
        for label, prec, extra in rows:
            d = self.export("bge-m3", prec)
            if d is None:
                continue
            maker = TextMaker(d / "tokenizer.json", self.wikiqa, seed=2)
            wl = synthetic("bge-8x64", maker, n_requests=16, docs=8, lengths=[64])
            spec = encapure_spec(d, name=f"bge-m3-{label}", label=f"Encapure server bge-reranker-v2-m3 {label}",
                                 extra=extra)
            spec.ready_timeout_s = 600
            s = self.start(spec, "headline")
            if s is None:
                continue
            row: dict[str, Any] = {"startup_s": s.startup_s, "rss_ready_mb": s.rss_ready_mb,
                                   "args": " ".join(extra) or "(defaults)",
                                   "size_mb": self.r["exports"].get(f"bge-m3-{prec}", {}).get("size_mb"),
                                   "export_s": self.r["exports"].get(f"bge-m3-{prec}", {}).get("export_s")}
            try:
                with contextlib.suppress(Exception):  # what the defaults resolved to for this model
                    limits = httpx.get(f"{s.url}/info", timeout=10).json()["limits"]
                    row["workers"], row["threads_per_worker"] = limits["workers"], limits["threads_per_worker"]
                reqs = [spec.http_request(r) for r in wl.requests]
                c1 = loadgen.run_closed(s.url, reqs, concurrency=1, max_requests=200, duration_s=p.headline_c1_s,
                                        timeout_s=120, warmup_requests=2)
                row["c1"] = c1.summary()
                c8 = loadgen.run_closed(s.url, reqs, concurrency=8, max_requests=400, duration_s=p.headline_c8_s,
                                        timeout_s=120)
                row["c8"] = c8.summary()
                time.sleep(1.5)  # one page-out/trim interval after the last inference, as at ready
                row["rss_after_mb"] = s.rss_mb()
                log(f"  bge-m3 {label}: startup {s.startup_s:.1f} s, RSS {s.rss_ready_mb:.0f}->{row['rss_after_mb']:.0f} MB,"
                    f" c1 p50 {row['c1']['p50_ms'] or 0:.0f} ms, c8 {row['c8']['items_per_s']:.1f} pairs/s")
            finally:
                s.stop()
            # Two restarts: one start on a shared machine is one sample of its load (the same server took
            # 9.7 s in one run and 4.7-5.9 s quiet just after). The first start also holds one-time
            # costs (an ONNX file's backend probe), the restarts what a rolling restart costs.
            row["restarts_s"] = []
            for _ in range(2):
                again = ServerProcess(spec)
                try:
                    row["restarts_s"].append(again.start())
                except Exception as e:
                    self.problem(f"restart {spec.name}", e)
                finally:
                    again.stop()
            starts = [row["startup_s"], *row["restarts_s"]]
            row["startup_median_s"] = float(np.median(starts))
            log(f"  bge-m3 {label}: starts {', '.join(f'{x:.1f}' for x in starts)} s")
            self.r["headline"][label] = row

    # --- driver -----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        p = self.plan
        t0 = time.perf_counter()
        # The 1-minute load average sampled through the run: start and end alone hid a busy middle
        # (other jobs on the cores) in earlier reports. Our own servers and load generator count too.
        samples: list[float] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(5.0):
                samples.append(os.getloadavg()[0])

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        dirs = {prec: d for prec in p.precisions if (d := self.export("reranker", prec)) is not None}
        phases = p.only or ["rerank", "inproc", "embed", "headline"]
        for ph in phases:
            t_ph = time.perf_counter()
            try:
                if ph == "rerank":
                    self.rerank_phase(dirs)
                elif ph == "inproc":
                    self.inproc_phase(dirs)
                elif ph == "embed":
                    self.embed_phase()
                elif ph == "headline" and (p.headline or "headline" in p.only):
                    self.headline_phase()
            except Exception as e:
                self.problem(f"phase {ph}", traceback.format_exc())
                del e
            self.r["meta"].setdefault("phase_s", {})[ph] = time.perf_counter() - t_ph
        self.r["meta"]["total_s"] = time.perf_counter() - t0
        stop.set()
        self.r["meta"]["loadavg_end"] = os.getloadavg()
        if samples:
            self.r["meta"]["loadavg_1min_samples"] = {"max": max(samples), "median": float(np.median(samples)),
                                                      "n": len(samples)}
        self.r["meta"]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        shutil.rmtree(self.tmp, ignore_errors=True)
        return self.r


def _frame(f: str) -> str:
    """``func (/long/path/site-packages/pkg/mod.py:123)`` -> ``func (pkg/mod.py)``: group by function."""
    f = re.sub(r":\d+\)$", ")", f.strip())
    head, sep, path = f.partition("(")
    if not sep:
        return f
    path = path.replace(str(ROOT) + "/", "")
    path = re.sub(r"^.*?(site-packages/|lib/python3\.\d+/)", "", path)
    return f"{head}({path}"


# A sample whose stack passes through one of these modules is inside the inference runtime: ONNX Runtime's
# ``session.run`` or OpenVINO's ``InferRequest.infer`` (with ``--backend auto`` either may serve).
RUNTIME_MODULES = ("onnxruntime_inference_collection.py", "openvino/_ov_api.py")


def summarize_profile(raw: str, top: int = 15) -> dict[str, Any]:
    """Collapsed stacks -> share of samples inside the runtime's inference call vs elsewhere, and the
    top frames outside it."""
    total = 0
    in_runtime = 0
    self_frames: dict[str, int] = {}
    incl: dict[str, int] = {}
    for line in raw.splitlines():
        if not line.strip():
            continue
        stack, _, count_s = line.rpartition(" ")
        try:
            count = int(count_s)
        except ValueError:
            continue
        frames = [_frame(f) for f in stack.split(";")]
        total += count
        if any(m in f for f in frames for m in RUNTIME_MODULES):
            in_runtime += count
            continue
        leaf = frames[-1]
        self_frames[leaf] = self_frames.get(leaf, 0) + count
        for f in set(frames[1:]):
            incl[f] = incl.get(f, 0) + count
    outside = total - in_runtime
    return {
        "samples": total,
        "in_runtime_share": in_runtime / total if total else None,
        "outside_share": outside / total if total else None,
        "top_self_outside": sorted(((f, n / total) for f, n in self_frames.items()), key=lambda x: -x[1])[:top]
        if total else [],
        "top_inclusive_outside": sorted(((f, n / total) for f, n in incl.items()), key=lambda x: -x[1])[:top]
        if total else [],
    }
