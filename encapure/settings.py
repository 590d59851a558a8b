"""One settings object for the CLI, ``ENCAPURE_*`` environment variables and the library.

Precedence: explicit arguments (CLI flags, constructor kwargs) > environment > defaults.
The CLI builds ``Settings(**flags_given)`` so unset flags fall through to the environment.

Every value is checked here, when it is parsed: a bad ``ENCAPURE_*`` variable or flag fails at
start-up with the setting's name, not later inside the scheduler or the runtime. The flags of
``encapure serve`` and the table in docs/api.md are generated from these fields
(``python -m encapure.settings --markdown``), so a new setting is one new field.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_RERANKER = "BAAI/bge-reranker-v2-m3"
# At and above this many parameters a model gets one worker by default (``Settings.workers_for``).
# Measured at the two ends only: MiniLM-L6 (23 M) is faster with 2 single-thread workers, and
# bge-reranker-v2-m3 (568 M) holds less memory with 1 (see the ``workers`` field); the line between
# them is a judgement (not measured there), placed above the base-size models (~110 M).
LARGE_MODEL_PARAMETERS = 200_000_000

Precision = Literal["fp32", "fp16", "int8", "int4"]
# The one list of precisions: CLI choices, export checks and the docs all read it.
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
# Not a precision: how OpenVINO computes an fp32 (or weight-compressed) graph. Precisions above name
# what is exported and cached (the manifest's "precision", a file on disk); bf16 is a runtime mode of
# one backend over the same fp32 file, so it is a setting of that backend (see openvino_inference_precision).
OpenVINOPrecision = Literal["f32", "bf16", "auto"]
LogLevel = Literal["debug", "info", "warning", "error", "critical"]


def default_cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "encapure"


def _doc(default: str | None = None, *, flag: bool = True, metavar: str | None = None) -> dict[str, Any]:
    """Extra field metadata for the flag generator: shown default, whether it is a CLI flag, metavar."""
    out: dict[str, Any] = {"flag": flag}
    if default is not None:
        out["default_doc"] = default
    if metavar is not None:
        out["metavar"] = metavar
    return out


class Settings(BaseSettings):
    """Every tunable of the engine, scheduler and server."""

    model_config = SettingsConfigDict(
        env_prefix="ENCAPURE_", extra="ignore", populate_by_name=True, validate_assignment=True
    )

    # --- models ---------------------------------------------------------------------------
    # Repeatable on the CLI; in the environment a comma-separated list. "name=ID_OR_PATH" names a model.
    model: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [DEFAULT_RERANKER],
        min_length=1,
        description="model to serve (repeatable): an exported folder, a Hugging Face folder or a hub id, "
        "optionally NAME=...; offline, the default falls back to the local reranker fixture",
        json_schema_extra=_doc(metavar="[NAME=]ID_OR_FOLDER"),
    )
    precision: Precision = Field(default="int8", description="precision of models exported on load")
    # ENCAPURE_CACHE is the documented name; ENCAPURE_CACHE_DIR (the prefixed field name) works too.
    cache_dir: Path = Field(
        default_factory=default_cache_dir,
        validation_alias=AliasChoices("cache_dir", "ENCAPURE_CACHE", "ENCAPURE_CACHE_DIR"),
        description="where models exported on load are kept",
        json_schema_extra=_doc("$XDG_CACHE_HOME/encapure or ~/.cache/encapure"),
    )
    max_length: int | None = Field(
        default=None,
        ge=1,
        description="cap on tokens per input (never above the model's own limit)",
        json_schema_extra=_doc("the model's"),
    )
    providers: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["CPUExecutionProvider"],
        min_length=1,
        description="ONNX Runtime execution providers in order of preference (repeatable; cpu, cuda, "
        "tensorrt, openvino, coreml, dml or full names); unavailable ones fall back to CPU",
    )
    truncation_side: Literal["left", "right"] = Field(
        default="right", description="which end of a too-long text is cut"
    )
    tokenizer: Literal["auto", "hf", "sentencepiece"] = Field(
        default="auto",
        description="auto: the light SentencePiece tokenizer where the export checked it against tokenizer.json "
        "(XLM-R models: ~280 MB less RSS), else Hugging Face tokenizers; hf or sentencepiece force one",
    )
    window_overlap: int = Field(
        default=64, ge=0, description='tokens shared by neighbouring windows (long_documents="window")'
    )

    # --- runtime ----------------------------------------------------------------------------
    # auto by default: which runtime is faster depends on the CPU and the model, and "a backend is the
    # default where it wins". The int8 MiniLM reranker, probe at the default split (2 workers x 1 thread):
    # Intel Xeon AVX-512 VNNI + AMX, OpenVINO 2.1x ONNX Runtime on the full batch and faster alone (picked);
    # AMD EPYC AVX-512 VNNI, 1.34-1.45x on the full batch but 1.04-1.14x slower alone (ONNX Runtime kept).
    # fp32: OpenVINO slower alone on both (ONNX Runtime kept). The int8 embedder as the NNCF IR on
    # OpenVINO (first third's FFN down f32): full batch 2.19x (AMD) / 3.1x (Intel) the ONNX one on ONNX
    # Runtime. Without openvino installed auto is onnxruntime.
    backend: Literal["auto", "onnxruntime", "openvino"] = Field(
        default="auto",
        description="what runs the exported ONNX graph: onnxruntime, openvino (pip install openvino), or auto "
        "(default: a one-time probe per model and CPU, ~5-10 s at the first start, picks the fastest "
        "batch-invariant backend that agrees with onnxruntime: within 1e-3 of the output scale, or for a "
        "quantized export within its own recorded deviation from PyTorch (parity.json), and is at least 10% "
        "faster on a full batch; recorded in the cache, so every process on the machine then uses it). An int8 "
        "embedder exported on load: with openvino the NNCF static int8 IR; with auto (openvino and nncf "
        "installed) both the ONNX export and the IR, and the same probe picks which one is served; with "
        "onnxruntime ONNX",
    )
    openvino_device: str = Field(
        default="CPU", min_length=1, description="OpenVINO device name for --backend openvino (CPU, GPU, AUTO:...)"
    )
    # f32 by default: on CPUs with native bf16 OpenVINO would compute in bf16 unasked, and a server's
    # scores must not change with the CPU it runs on. bf16 is for who asks: all-MiniLM-L6-v2, 1,000 mixed
    # texts, 2 threads, AMD EPYC AVX-512 BF16: 6.2 s vs 10.1 s f32, min cosine 0.99995 (README "encapure.compat").
    openvino_inference_precision: OpenVINOPrecision = Field(
        default="f32",
        description="how OpenVINO computes floating-point layers: f32; bf16 (needs a CPU with native bf16, "
        "AVX-512 BF16 or AMX; refused elsewhere and with --backend onnxruntime/auto); auto: bf16 where the "
        "device reports native bf16, else f32",
    )
    openvino_mmap: bool = Field(
        default=True,
        description="OpenVINO reads an IR's weights (model.bin) by mapping the file; off: reads them into memory, "
        "a copy that stayed beside the plugin's repacked weights when measured (bge-reranker-v2-m3 int4, "
        "model only: 652 MB after 100 requests; scripts/measure_bge_memory.py)",
    )
    openvino_release_mapped_weights: bool = Field(
        default=True,
        description="after an OpenVINO inference (at most once a second), ask Linux to reclaim the resident pages "
        "of the mapped model.bin (madvise MADV_PAGEOUT, which never changes memory contents): the CPU plugin "
        "has repacked those weights into its own copy, so they would otherwise count twice in RSS; pages still "
        "read (embedding rows) fault back in from the file",
    )
    openvino_dynamic_quantization_group_size: int = Field(
        default=0,
        ge=0,
        description="OpenVINO CPU: quantize activations to int8 per group of this many channels of each token "
        "for int4/int8-weight IR (~1.4x faster, but scores then move with batch-mates; 0 = off, f32 activations)",
    )
    # Inference workers (threads sharing one ORT session). Measured on the 2-core dev machine
    # (scripts/bench_engine.py --sections threads): 2 single-thread workers beat one 2-thread run
    # for throughput, both for bulk scoring and for streams of small requests. That holds for small
    # models; a large one pays each extra worker's activations (an OpenVINO stream, an arena) in
    # memory, so the server sizes the default by the model (``workers_for``) unless it is set.
    workers: int = Field(
        default=2,
        ge=1,
        description="inference worker threads; when not set, `encapure serve` uses 1 for a model of over "
        "200 M parameters (estimated from its weight files): bge-reranker-v2-m3 int4 IR held 462 MB at ready "
        "and 617 MB after 30 requests of 8 x 64 tokens with 2, 409 and 500 MB with 1 "
        "(scripts/measure_bge_memory.py), while small models (MiniLM) run faster with 2",
        json_schema_extra=_doc("2 (1 for models over 200 M parameters)"),
    )
    threads_per_worker: int = Field(
        default=0,
        ge=0,
        description="ONNX Runtime threads per worker",
        json_schema_extra=_doc("0 (cores / workers)"),
    )
    graph_optimization: Literal["disable", "basic", "extended", "all"] = Field(
        default="all", description="ONNX Runtime graph optimization level"
    )
    memory_arena: bool = Field(default=True, description="ONNX Runtime CPU memory arena and memory patterns")
    # ORT pre-packs constant weights into kernel layouts. Off saves memory only for one bare session:
    # bge-reranker-v2-m3 int4 at 2 threads 595 -> 443 MB after load, but 8x64-token latency 1.9 ->
    # 2.6 s; in the engine (2 single-thread workers) int4 without it grows to 1040 MB after a warm-up
    # request instead of 887 MB (weights are unpacked per run), so it stays on unless asked.
    prepacking: bool = Field(
        default=True,
        description="let ONNX Runtime pre-pack weights into kernel layouts (faster; off saves memory "
        "only in rare setups)",
    )

    # glibc malloc in the server process (encapure/server/memory.py); no effect with another C library.
    # Measured through `encapure serve` on bge-reranker-v2-m3 int4 IR, 1 worker x 2 threads, after 30
    # requests of 8 x 64 tokens (scripts/measure_bge_memory.py, shared 2-core AMD EPYC, load 6-9):
    # neither setting 409 MB at ready / 500 after; arenas capped at 2 alone 411 / 503 (no gain with one
    # worker, so off by default); trim on 404 / 494.
    malloc_arena_max: int = Field(
        default=0,
        ge=0,
        description="cap on the server process's malloc arenas (glibc; set at start, before worker threads "
        "exist); 0: glibc's default (8 per core), or MALLOC_ARENA_MAX from the environment. Measured on "
        "bge-reranker-v2-m3 int4: 2 saved ~13 MB with 2 workers, nothing with 1",
    )
    malloc_trim: bool = Field(
        default=True,
        description="give memory back when idle: OpenVINO's intermediate tensors (release_memory), then the "
        "free heap (glibc malloc_trim), at ready and once no request has been in flight for 0.25 s, at most "
        "once a second (bge-reranker-v2-m3 int4 IR after a 16 x 64 batch: 418 -> 337 MB, session alone)",
    )

    # --- batching ---------------------------------------------------------------------------
    # Measured on a 2-core AVX2 CPU (WikiQA, c=16, int8): 16384/64 ran at 0.87x a naive one-request-per-run
    # server; 4096/16 at 1.40x (1.63x on a wide length mix), 2048/8 at 1.42x (1.93x) with a slower c=1.
    max_batch_tokens: int = Field(
        default=4096, ge=1, description="padded tokens (batch size x longest item) per batch"
    )
    max_batch_size: int = Field(default=16, ge=1, description="items per batch")
    max_wait_ms: float = Field(default=2.0, ge=0, description="how long a partial batch waits for company")
    # ONNX Runtime's memory arena keeps what the largest batch it ran needed; warmed at start, the
    # RSS starts at that plateau instead of climbing for minutes under traffic (a 5-minute soak
    # grew +11.7%). Priced first: for a large model (bge-m3: seconds per sequence) the largest
    # batch would add tens of seconds to start-up and memory the traffic may never need.
    warmup_budget_s: float = Field(
        default=2.0,
        ge=0,
        description="at start every worker runs the largest batch (--max-batch-tokens, sequences of the "
        "model's max length up to 512) when timing one sequence (a 64-token one first, then a full-length "
        "one; time spent waiting for a CPU excluded) says the batch takes at most this many seconds, so "
        "memory use starts at its plateau; 0: off",
    )

    # --- admission and deadlines -----------------------------------------------------------
    max_concurrent_requests: int = Field(
        default=512, ge=1, description="requests admitted at once (more wait, then 503)"
    )
    max_queued_items: int = Field(default=8192, ge=1, description="inputs admitted at once (more wait, then 503)")
    # A count cap, checked before any work: long_documents="window" makes one 1 MB document ~1,800
    # units. What finishes within the deadline is the scheduler's work limit (scheduler/admission.py:
    # one request may bring at most a sixth of the request timeout in measured work, else 413 with
    # the seconds it needs), which follows the model and the machine; this count stays at
    # max_client_batch_size so that a request of that many short inputs is never refused by it.
    max_units_per_request: int = Field(
        default=1024,
        ge=1,
        description="most units (inputs plus extra windows of long documents) in one request (else 413)",
    )
    admission_timeout_s: float = Field(
        default=0.5, ge=0, description="seconds a request may wait for capacity before 503"
    )
    request_timeout_s: float = Field(
        default=30.0, ge=0, description="seconds before a request's queued work is dropped (503)"
    )
    # Work-based admission (scheduler/admission.py): the shares of time that measured work may
    # fill. The rest is margin for a throughput estimate that drifts (a shared CPU) and for the
    # fair scheduler serving later small requests first; the backlog share also bounds Retry-After.
    admission_deadline_share: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="a request is admitted when the work ahead of it plus its own drains, at the measured "
        "throughput, within this share of its time left",
    )
    admission_backlog_share: float = Field(
        default=0.33,
        gt=0,
        le=1,
        description="all admitted work may hold at most this share of --request-timeout (one request at "
        "most half of it)",
    )
    # Tests only: wrap each model in scheduler.faults.FaultyRunner; faults.mark(prepared, ...) (the
    # x-encapure-fault header) then acts: "fail_batch" | "kill_worker" | "slow:<ms>".
    fault_injection: bool = Field(
        default=False, description="tests only: honour fault headers", json_schema_extra=_doc(flag=False)
    )

    # --- HTTP ---------------------------------------------------------------------------------
    host: str = Field(default="127.0.0.1", min_length=1, description="address to listen on")
    port: int = Field(default=8000, ge=0, le=65535, description="port to listen on (0: any free port)")
    api_key: str | None = Field(
        default=None,
        description="require 'Authorization: Bearer KEY' (not on /health, /ready and the docs)",
        json_schema_extra=_doc("none"),
    )
    max_request_bytes: int = Field(
        default=8 * 1024 * 1024,
        ge=1,
        description="largest request body (else 413)",
        json_schema_extra=_doc("8388608 (8 MiB)"),
    )
    max_client_batch_size: int = Field(
        default=1024, ge=1, description="most documents/texts in one request (else 413)"
    )
    # A /tokenize answer is ~70 bytes of JSON a token, and tokenizing costs ~700 bytes of RSS a
    # token while it runs (7 MB of text: 1.4 M tokens, 1 GB): 65,536 tokens keep one answer ~5 MB.
    max_tokenize_tokens: int = Field(
        default=65_536,
        ge=1,
        description="most tokens one /tokenize answer may hold (else 413; texts over 10 characters a "
        "token of it are refused untokenized)",
    )
    strict_model_names: bool = Field(
        default=False,
        description="404 for a model name not served here (by default the one loaded model that can "
        "answer serves it, as TEI does, since clients send hard-coded names)",
    )
    # Slow clients hold a socket (and, while a body trickles in, a request slot) for as long as they
    # like unless the server gives up on them: 200 slowloris sockets stayed open for good before.
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="seconds a client has to send a request's headers (then 408 and the connection closes)",
    )
    body_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="seconds a client has to send a request's whole body (then 408 and the connection closes)",
    )
    # uvicorn's default (5 s) closed connections that clients honouring Retry-After (9-15 s seen
    # under overload; at most 60 s) then reused: 1-3 client errors per overload run. Above 60 s it
    # also outlasts the usual load balancer idle timeout (60 s), so the balancer closes first.
    keep_alive_timeout_s: float = Field(
        default=65.0,
        gt=0,
        description="seconds an idle keep-alive connection stays open (above the 60 s cap on Retry-After, "
        "so a client that waits it out finds its connection)",
    )
    shutdown_timeout_s: float = Field(
        default=30.0, ge=0, description="seconds in-flight requests get to finish on SIGTERM"
    )
    log_format: Literal["text", "json"] = Field(default="text", description="one line per event, as text or JSON")
    log_level: LogLevel = Field(default="info", description="lowest level logged")

    @field_validator("model", "providers", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        """Environment lists are written as people write them: ``a``, ``a,b`` or a JSON list."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: Any) -> Any:
        """``LOG_LEVEL=INFO`` is how levels are usually written in environments."""
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _bf16_needs_openvino(self) -> Settings:
        """A bf16 request that ONNX Runtime would run (in f32) is refused, not silently ignored."""
        check_openvino_precision(self.backend, self.openvino_inference_precision)
        return self

    def workers_for(self, parameters: int | None) -> int:
        """Worker threads for a model of ``parameters`` (None: unknown): ``workers`` when it was set
        (flag, environment, argument), else 1 for a large model (``LARGE_MODEL_PARAMETERS``) and the
        default for the rest."""
        if "workers" in self.model_fields_set or parameters is None or parameters < LARGE_MODEL_PARAMETERS:
            return self.workers
        return 1

    def resolved_threads(self) -> int:
        if self.threads_per_worker > 0:
            return self.threads_per_worker
        return max(1, (os.cpu_count() or 1) // max(1, self.workers))


def check_openvino_precision(backend: str, precision: str) -> None:
    """``openvino_inference_precision="bf16"`` only with ``backend="openvino"``: ONNX Runtime has no bf16
    mode for an fp32 graph, and ``auto`` may pick ONNX Runtime. Raises ``ValueError``."""
    if precision == "bf16" and backend != "openvino":
        raise ValueError(f"openvino_inference_precision=bf16 runs on the openvino backend only, not "
                         f"backend={backend!r}: set backend=openvino (pip install openvino), or use f32/auto")


# --- flags, environment names and the docs table, all from the fields ------------------------------
def _extra(field: FieldInfo) -> dict[str, Any]:
    extra = field.json_schema_extra
    return extra if isinstance(extra, dict) else {}


def flag_fields() -> list[str]:
    """Settings that are CLI flags, in declaration order."""
    return [name for name, f in Settings.model_fields.items() if _extra(f).get("flag", True)]


def flag_name(name: str) -> str:
    """``admission_timeout_s`` -> ``--admission-timeout``: seconds are said by the help, not the flag."""
    return "--" + name.removesuffix("_s").replace("_", "-")


def env_name(name: str) -> str:
    """The documented environment variable of a setting (its first ``ENCAPURE_*`` alias, if any)."""
    alias = Settings.model_fields[name].validation_alias
    if isinstance(alias, AliasChoices):
        for choice in alias.choices:
            if isinstance(choice, str) and choice.startswith("ENCAPURE_"):
                return choice
    return f"ENCAPURE_{name.upper()}"


def _base_type(annotation: Any) -> Any:
    """``int | None`` -> ``int``: a flag is either given a value or absent."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def default_text(name: str) -> str:
    field = Settings.model_fields[name]
    shown = _extra(field).get("default_doc")
    if shown is not None:
        return str(shown)
    value = field.get_default(call_default_factory=True)
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def add_settings_flags(parser: argparse.ArgumentParser, names: Iterable[str] | None = None) -> None:
    """Add one flag per setting; each flag's ``dest`` is the field name.

    Flags default to ``argparse.SUPPRESS`` so only the ones given reach ``Settings(**given)`` and
    the rest fall through to the environment. Types and choices come from the field's annotation.
    """
    for name in names if names is not None else flag_fields():
        field = Settings.model_fields[name]
        base = _base_type(field.annotation)
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS}
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(base) is list:
            kwargs["action"] = "append"
        elif get_origin(base) is Literal:
            kwargs["choices"] = get_args(base)
        else:
            kwargs["type"] = base
        if "choices" not in kwargs and kwargs.get("action") is not argparse.BooleanOptionalAction:
            kwargs["metavar"] = _extra(field).get("metavar", flag_name(name)[2:].replace("-", "_").upper())
        where = f"env {env_name(name)}; default {default_text(name)}"
        kwargs["help"] = f"{field.description} ({where})" if field.description else where
        parser.add_argument(flag_name(name), **kwargs)


def settings_from_namespace(args: argparse.Namespace) -> Settings:
    """``Settings`` from the flags that were given; the others come from the environment or defaults."""
    fields = Settings.model_fields
    return Settings(**{k: v for k, v in vars(args).items() if k in fields})


class DeprecatedFlag(argparse.Action):
    """A renamed flag kept as a hidden alias: stores into the new ``dest`` and says the new name."""

    def __init__(self, option_strings: Sequence[str], dest: str, *, new: str, **kwargs: Any) -> None:
        self.new = new
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(f"encapure: warning: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def describe_error(error: ValidationError) -> str:
    """One line per bad setting, naming its flag and environment variable, for the CLI."""
    lines = []
    for err in error.errors():
        loc = err.get("loc")
        if not loc:  # a check across settings (a model validator): its message names them
            lines.append(f"invalid settings: {err['msg']}")
            continue
        name = str(loc[0])
        where = f"{flag_name(name)} / {env_name(name)}" if name in Settings.model_fields else name
        lines.append(f"invalid setting {name} ({where}): {err['msg']}, got {err.get('input')!r}")
    return "; ".join(lines)


def markdown_table() -> str:
    """The flag table of docs/api.md (kept in sync by tests/test_settings.py)."""
    rows = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for name in flag_fields():
        field = Settings.model_fields[name]
        flag = flag_name(name)
        base = _base_type(field.annotation)
        if base is bool:
            flag = f"{flag}, --no-{flag[2:]}"
        elif get_origin(base) is Literal:
            flag = f"{flag} {{{','.join(str(c) for c in get_args(base))}}}"
        desc = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{flag}` | `{env_name(name)}` | {default_text(name)} | {desc} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":  # pragma: no cover - exercised by tests/test_settings.py via markdown_table
    cli = argparse.ArgumentParser(prog="python -m encapure.settings", description=__doc__)
    cli.add_argument("--markdown", action="store_true", help="print the flag table of docs/api.md")
    if not cli.parse_args().markdown:
        cli.print_help()
        sys.exit(2)
    sys.stdout.write(markdown_table())
