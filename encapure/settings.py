"""One settings object for the CLI, ``ENCAPURE_*`` environment variables and the library.

Precedence: explicit arguments (CLI flags, constructor kwargs) > environment > defaults.
The CLI builds ``Settings(**flags_given)`` so unset flags fall through to the environment.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_RERANKER = "BAAI/bge-reranker-v2-m3"

Precision = Literal["fp32", "fp16", "int8", "int4"]


def default_cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "encapure"


class Settings(BaseSettings):
    """Every tunable of the engine, scheduler and server."""

    model_config = SettingsConfigDict(env_prefix="ENCAPURE_", extra="ignore", populate_by_name=True)

    # --- models ---------------------------------------------------------------------------
    # Repeatable on the CLI; in the environment a comma-separated list. "name=ID_OR_PATH" names a model.
    model: Annotated[list[str], NoDecode] = Field(default_factory=lambda: [DEFAULT_RERANKER])
    precision: Precision = "int8"
    # ENCAPURE_CACHE is the documented name; ENCAPURE_CACHE_DIR (the prefixed field name) works too.
    cache_dir: Path = Field(
        default_factory=default_cache_dir,
        validation_alias=AliasChoices("cache_dir", "ENCAPURE_CACHE", "ENCAPURE_CACHE_DIR"),
    )
    max_length: int | None = None  # None: the manifest's
    providers: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["CPUExecutionProvider"])
    truncation_side: Literal["left", "right"] = "right"  # which end of a too-long text is cut
    window_overlap: int = 64  # tokens shared by neighbouring windows (long_documents="window")

    # --- runtime ----------------------------------------------------------------------------
    # Inference workers (threads sharing one ORT session). Measured on the 2-core dev machine
    # (scripts/bench_engine.py --sections threads): 2 single-thread workers beat one 2-thread run
    # for throughput, both for bulk scoring and for streams of small requests.
    workers: int = 2
    threads_per_worker: int = 0  # 0: all cores / workers
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    memory_arena: bool = True
    # ORT pre-packs constant weights into kernel layouts. Off saves memory only for one bare session:
    # bge-reranker-v2-m3 int4 at 2 threads 595 -> 443 MB after load, but 8x64-token latency 1.9 ->
    # 2.6 s; in the engine (2 single-thread workers) int4 without it grows to 1040 MB after a warm-up
    # request instead of 887 MB (weights are unpacked per run), so it stays on unless asked.
    prepacking: bool = True

    # --- batching ---------------------------------------------------------------------------
    # Measured on a 2-core AVX2 CPU (WikiQA, c=16, int8): 16384/64 ran at 0.87x a naive one-request-per-run
    # server; 4096/16 at 1.40x (1.63x on a wide length mix), 2048/8 at 1.42x (1.93x) with a slower c=1.
    max_batch_tokens: int = 4096  # padded tokens (batch size x longest item) per batch
    max_batch_size: int = 16
    max_wait_ms: float = 2.0  # how long a partial batch waits for company

    # --- admission and deadlines -----------------------------------------------------------
    max_concurrent_requests: int = 512
    max_queued_items: int = 8192
    admission_timeout_s: float = 0.5
    request_timeout_s: float = 30.0
    # Tests only: honour Prepared.options["fault"] = "fail_batch" | "kill_worker" | "slow:<ms>".
    fault_injection: bool = False

    # --- HTTP ---------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_request_bytes: int = 8 * 1024 * 1024
    max_client_batch_size: int = 1024
    shutdown_timeout_s: float = 30.0
    log_format: Literal["text", "json"] = "text"
    log_level: str = "info"

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

    def resolved_threads(self) -> int:
        if self.threads_per_worker > 0:
            return self.threads_per_worker
        return max(1, (os.cpu_count() or 1) // max(1, self.workers))
