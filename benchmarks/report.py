"""results.json -> BENCHMARKS.md (tables, goals, machine, versions, commands) and PNG plots."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from benchmarks.models import ROOT

Row = dict[str, Any]


def _f(x: Any, nd: int = 1, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, (int, float)):
        return f"{x:,.{nd}f}{unit}"
    return str(x)


def _cells(r: dict[str, Any], *, phase: str, workload: str, mode: str = "closed") -> list[Row]:
    return [c for c in r["cells"] if c["phase"] == phase and c["workload"] == workload and c["mode"] == mode]


def _sat(r: dict[str, Any], system: str, workload: str = "wikiqa", phase: str = "rerank") -> float | None:
    vals = [c["items_per_s"] for c in _cells(r, phase=phase, workload=workload) if c["system"] == system]
    return max(vals) if vals else None


def _cell(r: dict[str, Any], system: str, workload: str, c: int, phase: str = "rerank") -> Row | None:
    for row in _cells(r, phase=phase, workload=workload):
        if row["system"] == system and row["concurrency"] == c:
            return row
    return None


def _inproc(r: dict[str, Any], system: str, workload: str) -> Row | None:
    return next((x for x in r["inproc"] if x["system"] == system and x["workload"] == workload), None)


def _label(r: dict[str, Any], name: str) -> str:
    s = r["servers"].get(name)
    return s["label"] if s else name


# --- plots ---------------------------------------------------------------------------------------


def plots(r: dict[str, Any], out: Path) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    made: list[str] = []
    rows = _cells(r, phase="rerank", workload="wikiqa")
    systems = list(dict.fromkeys(c["system"] for c in rows))
    if rows:
        fig, ax = plt.subplots(figsize=(8, 5))
        for s in systems:
            pts = sorted((c["concurrency"], c["items_per_s"]) for c in rows if c["system"] == s)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=_label(r, s))
        for name, style in (("engine-int8", "--"), ("st-inproc", ":")):
            ip = _inproc(r, name, "wikiqa")
            if ip:
                ax.axhline(ip.get("full_items_per_s") or ip["bulk_items_per_s"], linestyle=style, color="grey",
                           label=f"{name} in-process (bulk)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("concurrent clients (closed loop)")
        ax.set_ylabel("pairs/s (successful)")
        ax.set_title("Rerank throughput vs concurrency — WikiQA-test-gold, 2 threads")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "throughput_vs_concurrency.png", dpi=110)
        plt.close(fig)
        made.append("throughput_vs_concurrency.png")

        fig, axes = plt.subplots(1, 3, figsize=(14, 4.5), sharey=True)
        for ax, q in zip(axes, ("p50_ms", "p95_ms", "p99_ms"), strict=True):
            for s in systems:
                pts = sorted((c["concurrency"], c[q]) for c in rows if c["system"] == s and c[q] is not None)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=_label(r, s))
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(q.replace("_ms", "") + " latency")
            ax.set_xlabel("concurrent clients")
            ax.grid(True, which="both", alpha=0.3)
        axes[0].set_ylabel("ms")
        axes[-1].legend(fontsize=7)
        fig.suptitle("Rerank latency vs concurrency — WikiQA-test-gold, 2 threads")
        fig.tight_layout()
        fig.savefig(out / "latency_vs_concurrency.png", dpi=110)
        plt.close(fig)
        made.append("latency_vs_concurrency.png")

    mpts: list[tuple[str, float, float, str]] = []
    for name, q in r["quality"].items():
        sat = _sat(r, name)
        if sat and q.get("map") == q.get("map"):
            mpts.append((_label(r, name), q["map"], sat, "server"))
    n_server = {q["scored"] for q in r["quality"].values()}
    for ip in r["inproc"]:
        # Only where the in-process MAP covers the same questions as the servers' pass.
        if ip["workload"] == "wikiqa" and ip.get("map") is not None and (not n_server or ip.get("scored") in n_server):
            mpts.append((ip["system"] + " (in-process)", ip["map"], ip.get("full_items_per_s") or ip["bulk_items_per_s"],
                         "inproc"))
    if mpts:
        fig, ax = plt.subplots(figsize=(8, 5))
        for lab, m, s, kind in mpts:
            ax.scatter(m, s, marker="o" if kind == "server" else "s")
            ax.annotate(lab, (m, s), fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.set_yscale("log")
        ax.set_xlabel("MAP on WikiQA-test-gold")
        ax.set_ylabel("pairs/s (server: best closed-loop; in-process: bulk)")
        ax.set_title("Speed vs quality by precision and system")
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "pairs_per_s_vs_map.png", dpi=110)
        plt.close(fig)
        made.append("pairs_per_s_vs_map.png")
    return made


# --- markdown ------------------------------------------------------------------------------------


def _goal(ok: bool | None) -> str:
    return "–" if ok is None else ("**met**" if ok else "**missed**")


def goals(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    out: list[tuple[str, str, str]] = []
    enc = "encapure-int8"
    sat = _sat(r, enc)
    eng = _inproc(r, "engine-int8", "wikiqa")
    if sat and eng:
        eng_rate = eng.get("full_items_per_s") or eng["bulk_items_per_s"]
        ratio = sat / eng_rate
        out.append(("Server throughput at saturation ≥ 90% of the in-process engine",
                    f"{ratio:.0%} ({sat:.0f} vs {eng_rate:.0f} pairs/s, WikiQA int8, engine given all pairs in one call); "
                    f"server overhead {1 - ratio:.0%}", _goal(ratio >= 0.9)))
    st_sat = _sat(r, "st-rerank")
    st_in = _inproc(r, "st-inproc", "wikiqa")
    st_map = (r["quality"].get("st-rerank") or {}).get("map") or (st_in or {}).get("map")
    for prec in ("int8", "fp32", "int4"):
        s = _sat(r, f"encapure-{prec}")
        m = (r["quality"].get(f"encapure-{prec}") or {}).get("map")
        if s and st_sat and m and st_map:
            x = s / st_sat
            mr = m / st_map
            extra = f"; vs in-process CrossEncoder {s / st_in['bulk_items_per_s']:.1f}x" if st_in else ""
            out.append((f"≥ 5× sentence-transformers pairs/s at ≥ 99.5% of its MAP ({prec})",
                        f"{x:.1f}x the CrossEncoder server{extra}; MAP {m:.4f} = {mr:.2%} of {st_map:.4f}",
                        _goal(x >= 5 and mr >= 0.995)))
    naive_rows = []
    for c in r["cells"]:
        if c["phase"] == "rerank" and c["mode"] == "closed" and c["system"] == "naive-rerank" and (c["concurrency"] or 0) >= 8:
            mine = _cell(r, enc, c["workload"], c["concurrency"])
            if mine and c["items_per_s"]:
                naive_rows.append((c["workload"], c["concurrency"], mine["items_per_s"] / c["items_per_s"]))
    if naive_rows:
        worst = min(x[2] for x in naive_rows)
        txt = ", ".join(f"{w}@{c}: {x:.2f}x" for w, c, x in naive_rows)
        out.append(("≥ 1.5× the naive ONNX server at concurrency ≥ 8", f"min {worst:.2f}x ({txt})",
                    _goal(worst >= 1.5)))
    for name in ("infinity-torch-rerank", "infinity-optimum-rerank"):
        inf = _sat(r, name)
        if sat and inf:
            out.append((f"≥ 2× infinity-emb ({name.split('-')[1]} engine), saturation on WikiQA",
                        f"{sat / inf:.2f}x ({sat:.0f} vs {inf:.0f} pairs/s)", _goal(sat / inf >= 2)))
        elif name in r["servers"] and r["servers"][name].get("error"):
            out.append((f"≥ 2× infinity-emb ({name.split('-')[1]} engine)", "did not run (see problems)", "–"))
    c100 = [c for c in r["cells"] if c["system"] == enc and c["concurrency"] == 100 and c["phase"] == "rerank"]
    if c100:
        bad = {k: v for c in c100 for k, v in c["errors"].items() if k != "503"}
        n503 = sum(c["errors"].get("503", 0) for c in c100)
        mx = max(c["max_ms_all"] or 0 for c in c100)
        out.append(("Concurrency 100: no errors but 503 by design, none slower than the request timeout (30 s)",
                    f"non-503 errors {bad or 0}, 503s {n503}, slowest request {mx / 1000:.1f} s",
                    _goal(not bad and mx < 30_000)))
    out += speed_goals(r)
    h = r["headline"].get("int4-openvino") or r["headline"].get("int4")
    if h:
        startup = h.get("startup_median_s") or h.get("startup_s")
        out.append(("bge-reranker-v2-m3 int4 (OpenVINO IR where exported): RSS < 500 MB and startup < 5 s "
                    "(median of 3 starts)",
                    f"RSS {_f(h.get('rss_ready_mb'), 0)} MB at ready, {_f(h.get('rss_after_mb'), 0)} MB after load; "
                    f"startup {_starts(h)} s",
                    _goal((h.get("rss_after_mb") or h.get("rss_ready_mb") or 1e9) < 500 and (startup or 99) < 5)))
    return out


def _bulk(row: Row | None) -> float | None:
    """In-process throughput on the same slice for every system (the first ~800 items in one call):
    sentence-transformers is not timed on the whole workload."""
    return None if row is None else row.get("bulk_items_per_s")


def _starts(h: dict[str, Any]) -> str:
    """"first; restarts (median)" of a headline row, or the one start of an older result."""
    if not h.get("restarts_s"):
        return _f(h.get("startup_s"), 1)
    rest = ", ".join(_f(x, 1) for x in h["restarts_s"])
    return f"{_f(h.get('startup_s'), 1)}; {rest} (median {_f(h.get('startup_median_s'), 1)})"


def speed_goals(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Issue 11's speed and latency bars, for the default server (--backend auto) and ONNX Runtime pinned."""
    out: list[tuple[str, str, str]] = []
    st_in = _bulk(_inproc(r, "st-inproc", "wikiqa"))
    for name in ("engine-int8", "engine-int8-onnxruntime", "engine-int8-openvino"):
        eng = _bulk(_inproc(r, name, "wikiqa"))
        if eng and st_in:
            out.append((f"Engine ≥ 3× sentence-transformers in-process, WikiQA ({name})",
                        f"{eng / st_in:.1f}x ({eng:.0f} vs {st_in:.0f} pairs/s)", _goal(eng / st_in >= 3)))
    st_sat = _sat(r, "st-rerank")
    for name in ("encapure-int8", "encapure-int8-onnxruntime"):
        sat = _sat(r, name)
        if sat and st_sat:
            out.append((f"Server ≥ 2.5× the sentence-transformers server, WikiQA saturation ({_label(r, name)})",
                        f"{sat / st_sat:.1f}x ({sat:.0f} vs {st_sat:.0f} pairs/s)", _goal(sat / st_sat >= 2.5)))
    naive = _cell(r, "naive-rerank", "wikiqa", 1)
    opn = {c["system"]: c for c in r["cells"] if c["mode"] == "open" and c["workload"] == "wikiqa"}
    inf = opn.get("infinity-optimum-rerank")
    for name in ("encapure-int8", "encapure-int8-onnxruntime"):
        mine = _cell(r, name, "wikiqa", 1)
        if mine and naive and mine.get("p50_ms") and naive.get("p50_ms"):
            out.append((f"Concurrency-1 p50 ≤ the naive server's ({_label(r, name)})",
                        f"{mine['p50_ms']:.1f} vs {naive['p50_ms']:.1f} ms", _goal(mine["p50_ms"] <= naive["p50_ms"])))
        o = opn.get(name)
        if o and inf and o.get("p50_ms") and inf.get("p50_ms"):
            ok = o["p50_ms"] <= inf["p50_ms"] and (o.get("p99_ms") or 1e9) <= (inf.get("p99_ms") or 0)
            out.append((f"Open loop at 80%: p50 and p99 ≤ infinity-emb (optimum) ({_label(r, name)})",
                        f"p50 {o['p50_ms']:.0f} vs {inf['p50_ms']:.0f} ms, p99 {_f(o.get('p99_ms'), 0)} vs "
                        f"{_f(inf.get('p99_ms'), 0)} ms", _goal(ok)))
    emb = {x["system"]: _bulk(x) for x in r["inproc"] if x["system"].startswith("engine-embed-")}
    fp32 = emb.get("engine-embed-fp32")
    for name, rate in emb.items():
        if "int8" in name and rate and fp32:
            out.append((f"Embedder int8 ≥ 1.5× fp32 in-process ({name} vs engine-embed-fp32)",
                        f"{rate / fp32:.2f}x ({rate:.0f} vs {fp32:.0f} texts/s)", _goal(rate / fp32 >= 1.5)))
    return out


def render(r: dict[str, Any], plot_files: list[str], plot_dir: Path, md_dir: Path = ROOT) -> str:
    m = r["meta"]
    mach = m["machine"]
    L: list[str] = []
    L.append("# Encapure benchmarks\n")
    L.append(f"Generated by `{m['command']}` on {m['finished']} in {m['total_s'] / 60:.1f} min"
             + (" (**--quick**: short cells, subset of systems — indicative only)" if m["plan"]["quick"] else "") + ".\n")
    L.append("Re-run: `make bench` or `.venv/bin/python -m benchmarks [--quick] [--out DIR]` from the repo root "
             "(peers' venvs and exported models are created under `benchmarks/.work/` on first run).\n")
    la0, la1 = mach["loadavg_start"], m.get("loadavg_end", [None])
    if max(la0[0], (la1[0] if la1 and la1[0] is not None else 0)) > 3:
        L.append(f"> **Measured on a busy machine** (1-min load average {la0[0]:.1f} at start, "
                 f"{la1[0] if la1 and la1[0] is not None else 0:.1f} at end, on {mach['cores']} cores): other jobs "
                 "took most of the CPU, so absolute throughput and latency here are far below what this machine "
                 "does when quiet, and ratios are noisy. Re-run `python -m benchmarks` on an idle machine before "
                 "quoting any number.\n")
    L.append("## Machine and conditions\n")
    L.append(f"- CPU: {mach['cpu']} — {mach['cores']} cores visible, ISA {', '.join(mach['isa']) or '?'}; "
             f"RAM {_f(mach['mem_gb'], 1)} GiB; Linux {mach['kernel']}; Python {mach['python']}.")
    L.append(f"- Thread budget: every system gets {m['threads']} threads (ORT intra-op threads, torch threads, "
             "OMP_NUM_THREADS); the load generator runs on the same 2 cores (loopback) and its CPU is part of what "
             "every server competes with.")
    L.append(f"- Load average at start {', '.join(f'{x:.2f}' for x in la0)}; at end "
             f"{', '.join(f'{x:.2f}' for x in la1) if la1 and la1[0] is not None else '?'}. "
             "A load average well above 2 before the run means other work shared the cores: absolute numbers are "
             "then low and noisy; ratios inside one cell (systems alternated ABBA) are the robust part.")
    if (ls := m.get("loadavg_1min_samples")):
        L.append(f"- 1-minute load average sampled every 5 s during the run: median {ls['median']:.1f}, max "
                 f"{ls['max']:.1f} (our own server plus load generator bring it to ~2-3; more means other work).")
    L.append("- Servers run one at a time under load; the others idle (idle CPU of each server measured below).\n")

    L.append("## Goals\n")
    L.append("| goal | reached | |\n|---|---|---|")
    for g, v, ok in goals(r):
        L.append(f"| {g} | {v} | {ok} |")
    L.append("")

    # Throughput table
    rows = _cells(r, phase="rerank", workload="wikiqa")
    if rows:
        conc = sorted({c["concurrency"] for c in rows})
        systems = list(dict.fromkeys(c["system"] for c in rows))
        L.append("## Rerank: WikiQA-test-gold, closed loop\n")
        L.append(f"{m.get('workloads', {}).get('wikiqa', '')}. Each cell: {m['plan']['cell_s']:.1f} s per system "
                 "(two halves, order reversed between them). pairs/s counts successful requests only.\n")
        L.append("| system | " + " | ".join(f"c={c} pairs/s" for c in conc) + " | " +
                 " | ".join(f"c={c} p50/p95/p99 ms" for c in conc) + " | errors |")
        L.append("|---" * (1 + 2 * len(conc) + 1) + "|")
        for s in systems:
            cs = {c["concurrency"]: c for c in rows if c["system"] == s}
            errs = {k: v for c in cs.values() for k, v in c["errors"].items()}
            L.append(f"| {_label(r, s)} | " + " | ".join(_f(cs[c]["items_per_s"]) if c in cs else "–" for c in conc)
                     + " | " + " | ".join(
                         f"{_f(cs[c]['p50_ms'], 0)} / {_f(cs[c]['p95_ms'], 0)} / {_f(cs[c]['p99_ms'], 0)}" if c in cs else "–"
                         for c in conc) + f" | {errs or '–'} |")
        L.append("")
    synth = [c for c in r["cells"] if c["phase"] == "rerank" and c["mode"] == "closed" and c["workload"] != "wikiqa"]
    if synth:
        wls = list(dict.fromkeys(c["workload"] for c in synth))
        systems = list(dict.fromkeys(c["system"] for c in synth))
        L.append("## Rerank: synthetic workloads, closed loop\n")
        for w in wls:
            L.append(f"- **{w}**: {m.get('workloads', {}).get(w, '')}")
        L.append("")
        L.append("| system | " + " | ".join(f"{w} (c={next(c['concurrency'] for c in synth if c['workload'] == w)}) pairs/s, p50 ms" for w in wls) + " |")
        L.append("|---" * (1 + len(wls)) + "|")
        for s in systems:
            vals = []
            for w in wls:
                c = next((x for x in synth if x["system"] == s and x["workload"] == w), None)
                vals.append(f"{_f(c['items_per_s'])}, {_f(c['p50_ms'], 0)}" if c else "–")
            L.append(f"| {_label(r, s)} | " + " | ".join(vals) + " |")
        L.append("")
    opn = [c for c in r["cells"] if c["mode"] == "open"]
    if opn:
        L.append("## Open loop at 80% of each system's measured capacity (WikiQA, Poisson arrivals)\n")
        rounds_note = (f" Each system runs {_f(r['meta']['plan'].get('open_loop_s'), 0)} s in all, in rounds with "
                       "the systems' order alternated; the percentiles pool the rounds, whose own p50s are listed."
                       if any(c.get("round_p50_ms") for c in opn) else "")
        L.append(f"Latency counted from the scheduled arrival (no coordinated omission).{rounds_note}\n")
        L.append("| system | capacity req/s | offered req/s | served pairs/s | p50 ms | p95 ms | p99 ms | round p50s ms "
                 "| errors |")
        L.append("|---|---|---|---|---|---|---|---|---|")
        for c in opn:
            rounds = " / ".join(_f(x, 0) for x in c.get("round_p50_ms") or []) or "–"
            L.append(f"| {_label(r, c['system'])} | {_f(c['capacity_req_per_s'])} | {_f(c['rate'])} | {_f(c['items_per_s'])} "
                     f"| {_f(c['p50_ms'], 0)} | {_f(c['p95_ms'], 0)} | {_f(c['p99_ms'], 0)} | {rounds} "
                     f"| {c['errors'] or '–'} |")
        L.append("")
    if r["quality"] or r["inproc"]:
        L.append("## Quality (MAP on WikiQA-test-gold, from each system's own responses) and in-process baselines\n")
        L.append("| system | MAP | questions scored | pairs/s in this pass (c=8) |")
        L.append("|---|---|---|---|")
        for name, q in r["quality"].items():
            L.append(f"| {_label(r, name)} | {_f(q['map'], 4)} | {q['scored']}/{q['answerable']} | {_f(q['items_per_s'])} |")
        L.append("")
        L.append("In-process (child process, no HTTP): *bulk* = the whole workload in one call (the library's own "
                 "batching), *sequential* = one call per request.\n")
        L.append("| system | workload | bulk pairs/s (first ~800 items) | whole workload pairs/s | sequential pairs/s "
                 "| sequential p50 / p99 ms | MAP | min / mean cosine |")
        L.append("|---|---|---|---|---|---|---|---|")
        for ip in r["inproc"]:
            cos = f"{_f(ip['min_cos'], 4)} / {_f(ip.get('mean_cos'), 4)}" if ip.get("min_cos") is not None else "–"
            L.append(f"| {ip['system']} | {ip['workload']} | {_f(ip['bulk_items_per_s'])} | {_f(ip.get('full_items_per_s'))} "
                     f"| {_f(ip.get('seq_items_per_s'))} "
                     f"| {_f(ip.get('seq_p50_ms'), 1)} / {_f(ip.get('seq_p99_ms'), 1)} | {_f(ip.get('map'), 4)} | {cos} |")
        L.append("")
    erows = [c for c in r["cells"] if c["phase"] == "embed"]
    if erows:
        conc = sorted({c["concurrency"] for c in erows})
        systems = list(dict.fromkeys(c["system"] for c in erows))
        L.append("## Embeddings: all-MiniLM-L6-v2 on the OpenAI route\n")
        L.append(f"{m.get('workloads', {}).get('embed', '')}; cosine against sentence-transformers fp32 "
                 "(in-process) on the first 64 texts.\n")
        L.append("| system | " + " | ".join(f"c={c} texts/s, p50 ms" for c in conc) + " | min / mean cosine | errors |")
        L.append("|---" * (3 + len(conc)) + "|")
        for s in systems:
            cs = {c["concurrency"]: c for c in erows if c["system"] == s}
            q = r["embed_quality"].get(s)
            errs = {k: v for c in cs.values() for k, v in c["errors"].items()}
            L.append(f"| {_label(r, s)} | " + " | ".join(
                f"{_f(cs[c]['items_per_s'])}, {_f(cs[c]['p50_ms'], 0)}" if c in cs else "–" for c in conc)
                + f" | {_f(q['min_cos'], 4) if q else '–'} / {_f(q['mean_cos'], 4) if q else '–'} | {errs or '–'} |")
        L.append("")
    if r["headline"]:
        L.append("## Headline: bge-reranker-v2-m3 architecture (random weights), Encapure server\n")
        L.append("Startup = process start to the first 200 on `/ready`: the first start (it holds one-time costs such "
                 "as an ONNX file's backend probe), then two restarts, and their median. Workload: 8 documents x 64 "
                 "tokens per request (XLM-R tokenizer).\n")
        L.append("| precision | files MB | startup s | RSS at ready MB | RSS after load MB | c=1 p50 / p99 ms | c=8 pairs/s | c=8 p50 ms |")
        L.append("|---|---|---|---|---|---|---|---|")
        for prec, h in r["headline"].items():
            c1, c8 = h.get("c1") or {}, h.get("c8") or {}
            L.append(f"| {prec} | {_f(h.get('size_mb'), 0)} | {_starts(h)} | {_f(h.get('rss_ready_mb'), 0)} "
                     f"| {_f(h.get('rss_after_mb'), 0)} | {_f(c1.get('p50_ms'), 0)} / {_f(c1.get('p99_ms'), 0)} "
                     f"| {_f(c8.get('items_per_s'), 1)} | {_f(c8.get('p50_ms'), 0)} |")
        L.append("")
    qwen3 = ROOT / "benchmarks" / "results" / "qwen3-reranker-0.6b.md"
    if qwen3.is_file():  # written by scripts/measure_qwen3.py (a separate, slower measurement)
        L.append(qwen3.read_text().rstrip() + "\n")
    bge_memory = ROOT / "benchmarks" / "results" / "bge-reranker-v2-m3-memory.md"
    if bge_memory.is_file():  # written by scripts/measure_bge_memory.py (a separate, slower measurement)
        L.append(bge_memory.read_text().rstrip() + "\n")
    if r["profile"]:
        p = r["profile"]
        L.append("## CPU profile of the Encapure server under load (py-spy)\n")
        L.append(f"`{p.get('command', 'py-spy record')}` while 32 clients sent WikiQA requests "
                 f"({_f((p.get('load') or {}).get('items_per_s'))} pairs/s during the profile). Python frames only; "
                 "threads idle in the GIL-free wait are not sampled.\n")
        inside = p.get("in_runtime_share", p.get("in_ort_share"))  # results before OpenVINO counted: ORT only
        L.append(f"- Samples: {p['samples']}; inside the runtime's inference call (ONNX Runtime `session.run`, "
                 f"OpenVINO `InferRequest.infer`): {_f((inside or 0) * 100, 1)}%; "
                 f"elsewhere: {_f((p['outside_share'] or 0) * 100, 1)}%.")
        L.append("\nTop frames outside the runtime (self time, share of all samples):\n")
        L.append("| frame | share |\n|---|---|")
        for f, share in p["top_self_outside"][:12]:
            L.append(f"| `{f}` | {share:.1%} |")
        L.append("\nTop frames outside the runtime (inclusive):\n")
        L.append("| frame | share |\n|---|---|")
        for f, share in p["top_inclusive_outside"][:12]:
            L.append(f"| `{f}` | {share:.1%} |")
        L.append("")
    if plot_files:
        L.append("## Plots\n")
        for pf in plot_files:
            rel = os.path.relpath(plot_dir / pf, md_dir)
            L.append(f"![{pf}]({rel})\n")
    L.append("## Systems and how they were configured\n")
    L.append("| system | startup s | RSS ready / after MB | idle CPU % | configuration |")
    L.append("|---|---|---|---|---|")
    for name, s in r["servers"].items():
        L.append(f"| {s['label']} (`{name}`) | {_f(s.get('startup_s'), 1)} | {_f(s.get('rss_ready_mb'), 0)} / "
                 f"{_f(s.get('rss_after_mb'), 0)} | {_f(s.get('idle_cpu_pct'), 1)} | {s['config']}"
                 + (f" — **failed to start**: {s['error'][:200]}" if s.get("error") else "") + " |")
    L.append("")
    L.append("Commands (paths relative to the repo root; `{port}` is a free loopback port):\n")
    for name, s in r["servers"].items():
        L.append(f"- `{name}`: `{s['command']}`")
    L.append("")
    if r["exports"]:
        L.append("## Exported models\n")
        L.append("| model | files MB | export s | quantization | parity |")
        L.append("|---|---|---|---|---|")
        for k, e in r["exports"].items():
            q = e.get("quantization") or {}
            par = e.get("parity") or {}
            pk = {k2: par[k2] for k2 in ("max_abs_diff", "cosine", "spearman", "ranking_preserved") if k2 in par}
            L.append(f"| {k} | {_f(e.get('size_mb'), 0)} | {_f(e.get('export_s'), 0)} | "
                     f"{q.get('method', '')} {q.get('weight_type', '')} {'per-channel' if q.get('per_channel') else ''} "
                     f"| {json.dumps(pk) if pk else '–'} |")
        L.append("")
    L.append("## Versions\n")
    for env, vs in m["versions"].items():
        L.append(f"- {env}: " + ", ".join(f"{k} {v}" for k, v in vs.items()))
    L.append("")
    if r["problems"]:
        L.append("## Problems during this run\n")
        for p in r["problems"]:
            L.append(f"- {p['what']}: `{p['error'][:400]}`")
        L.append("")
    return "\n".join(L) + "\n"


def write_report(r: dict[str, Any], out_dir: Path, md_path: Path) -> Path:
    files = plots(r, out_dir)
    md_path.write_text(render(r, files, out_dir, md_path.resolve().parent))
    return md_path


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="re-render BENCHMARKS.md from a results.json")
    ap.add_argument("results", type=Path)
    ap.add_argument("--md", type=Path, default=ROOT / "BENCHMARKS.md")
    a = ap.parse_args()
    res = json.loads(a.results.read_text())
    print(write_report(res, a.results.parent, a.md))
