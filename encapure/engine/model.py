"""``OnnxModel``: tokenize -> run -> post-process for one loaded model.

The engine never decides *how* a model is run: the manifest does (task, pooling, activation,
input/output names, max length). This module only turns that into fast code: batch tokenization
in Rust, vectorized padding, one ``session.run`` per batch, vectorized pooling and folding.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from tokenizers import Encoding

from encapure.engine.backends import Session, create_session
from encapure.engine.batching import plan_batches
from encapure.engine.prompts import PairTemplate, check_instruction, encode_pairs
from encapure.engine.spm_tokenizer import open_tokenizer
from encapure.engine.types import (
    ClassifyOutput,
    EmbedOutput,
    LongDocuments,
    ModelOutput,
    MultiVectorOutput,
    Prepared,
    RerankOutput,
    Side,
    Unit,
)
from encapure.errors import InvalidInputError, ModelError, WrongTaskError
from encapure.manifest import Manifest, Task
from encapure.settings import Settings

log = logging.getLogger(__name__)

_KNOWN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_EMPTY_IDS = np.zeros(0, dtype=np.int64)


def _check_texts(texts: Any, what: str) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise InvalidInputError(f"{what} must be a list of strings, got {type(texts).__name__}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InvalidInputError(f"{what}[{i}] must be a string, got {type(t).__name__}")
    return list(texts)


# Inputs per tokenizer call under the shared lock (tokenizers parallelizes within a call).
_ENCODE_CHUNK = 64
# No token of our tokenizers covers more characters than this (WordPiece makes one [UNK] of a longer
# word; Unigram and byte-level BPE pieces are far shorter). So a text that will be truncated is cut
# at this many characters per token kept before it is tokenized: truncation keeps the same tokens,
# and a megabyte document costs what its first kilobytes do (tokenizing 7 MB took 44 s and 1 GB).
_CHARS_PER_TOKEN_MAX = 100


class OnnxModel:
    """A loaded model; implements ``encapure.engine.types.InferenceModel``.

    ``forward`` is thread-safe (ONNX Runtime sessions allow concurrent ``run``; everything else
    is local), so the scheduler may call it from several workers at once.
    """

    def __init__(
        self,
        folder: str | Path,
        manifest: Manifest,
        *,
        settings: Settings | None = None,
        name: str | None = None,
        tokenizer_path: str | Path | None = None,
        model_path: str | Path | None = None,
        truncation_side: Side | None = None,
        window_overlap: int | None = None,
        warmup: bool = True,
        session: Any = None,
    ) -> None:
        self.settings = settings or Settings()
        self.folder = Path(folder)
        self.manifest = manifest
        self.name = name or manifest.source or self.folder.name
        t0 = time.perf_counter()

        max_len = manifest.max_length
        if self.settings.max_length is not None:
            if self.settings.max_length > manifest.max_length:
                log.warning(
                    "max_length %d exceeds the model's %d; using %d",
                    self.settings.max_length, manifest.max_length, manifest.max_length,
                )
            max_len = min(self.settings.max_length, manifest.max_length)
        self._max_length = max_len
        self.truncation_side: Side = truncation_side or self.settings.truncation_side
        overlap = window_overlap if window_overlap is not None else self.settings.window_overlap
        self.window_overlap = max(0, min(int(overlap), max_len // 2))

        mpath = Path(model_path) if model_path else self.folder / manifest.model_file
        # The runtime compiles the graph (C++, without the GIL) while the tokenizer loads: bge-reranker-v2-m3's
        # int4 IR takes ~1.2 s to compile and its SentencePiece tokenizer ~1.5 s to load, one after the other
        # before. Not while --backend auto may probe: its timings must not share the CPU with the tokenizer.
        opening: Future[Session] | None = None
        if session is None and (self.settings.backend != "auto" or mpath.suffix.lower() == ".xml"):
            opener = ThreadPoolExecutor(1, thread_name_prefix="encapure-open")
            opening = opener.submit(create_session, mpath, self.settings)
            opener.shutdown(wait=False)
        try:
            self._open_tokenizer(tokenizer_path, manifest)
        except BaseException:
            if opening is not None:
                opening.exception()  # let the compile finish before the error leaves
            raise
        if opening is not None:
            session = opening.result()
        self.session = session if session is not None else create_session(mpath, self.settings)
        self._check_io()
        self._use_type_ids = "token_type_ids" in manifest.input_names
        self._use_mask = "attention_mask" in manifest.input_names
        self._pad_id = int(manifest.pad_token_id)
        self.prompt_template = PairTemplate.from_dict(manifest.prompt_template) if manifest.prompt_template else None
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self.output_dim = self._infer_output_dim()
        if warmup:
            self.warmup()
        self.load_seconds = time.perf_counter() - t0

    def _open_tokenizer(self, tokenizer_path: str | Path | None, manifest: Manifest) -> None:
        tok_path = Path(tokenizer_path) if tokenizer_path else self.folder / manifest.tokenizer_file
        if tok_path.is_dir():
            tok_path = tok_path / "tokenizer.json"
        if not tok_path.is_file():
            raise ModelError(f"tokenizer file {tok_path} not found (a tokenizer.json is required)")
        # One tokenizer per model, reconfigured per truncation mode under a lock: a Tokenizer holds its
        # whole vocabulary (XLM-R's 250k-piece Unigram trie is ~280 MB), so one instance per mode
        # cost bge-reranker-v2-m3 ~0.8 GB of RSS. Tokenizing is a few % of a request's time.
        # XLM-R models checked at export get the SentencePiece-backed tokenizer (a few MB, not ~280).
        self._tok, self.tokenizer_kind = open_tokenizer(tok_path, manifest.tokenizer, self.settings.tokenizer)
        self._tok.no_padding()
        self._tok_mode: str | None = None
        self._tok_lock = threading.Lock()
        self._pair_specials = self._tok.num_special_tokens_to_add(True)

    # --- contract ---------------------------------------------------------------------------
    @property
    def task(self) -> Task:
        return self.manifest.task

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def labels(self) -> list[str]:
        if self.manifest.labels:
            return list(self.manifest.labels)
        return [f"LABEL_{i}" for i in range(self.output_dim)]

    # --- setup helpers ------------------------------------------------------------------------
    def encode_batch(
        self, items: list[Any], mode: str = "raw", *, add_special_tokens: bool = True
    ) -> list[Encoding]:
        """Tokenize under one of the truncation modes: raw (none), single, pair, pair_both, pair_window.

        Truncation is mutable state of the shared ``Tokenizer`` (and tokenizers refuses a
        reconfiguration while another thread encodes), so setting it and encoding happen under
        one lock.
        """
        out: list[Encoding] = []
        # a chunk at a time, so one big request does not hold the lock (and every other
        # request's tokenization) for its whole length
        for start in range(0, max(1, len(items)), _ENCODE_CHUNK):
            with self._tok_lock:
                if mode != self._tok_mode:
                    self._configure_truncation(mode)
                out.extend(self._tok.encode_batch(items[start : start + _ENCODE_CHUNK],
                                                  add_special_tokens=add_special_tokens))
        return out

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        with self._tok_lock:
            return str(self._tok.decode(ids, skip_special_tokens=skip_special_tokens))

    @property
    def vocab_size(self) -> int:
        with self._tok_lock:  # a read must not overlap a reconfiguration either
            return int(self._tok.get_vocab_size())

    def _configure_truncation(self, mode: str) -> None:
        tok = self._tok
        side = self.truncation_side
        if mode == "single":
            tok.enable_truncation(self._max_length, strategy="longest_first", direction=side)
        elif mode == "pair":  # the document gives way, the query stays whole
            tok.enable_truncation(self._max_length, strategy="only_second", direction=side)
        elif mode == "pair_both":  # the query alone is too long: both are cut
            tok.enable_truncation(self._max_length, strategy="longest_first", direction=side)
        elif mode == "pair_window":
            tok.enable_truncation(
                self._max_length, strategy="only_second", direction="right", stride=self.window_overlap
            )
        elif mode == "raw":
            tok.no_truncation()
        elif mode.startswith("single:"):  # a length of the model's own (ColBERT's query/document lengths)
            tok.enable_truncation(int(mode[7:]), strategy="longest_first", direction=side)
        else:
            raise ValueError(mode)
        self._tok_mode = mode

    def _check_io(self) -> None:
        m = self.manifest
        graph_inputs = [i.name for i in self.session.get_inputs()]
        graph_outputs = [o.name for o in self.session.get_outputs()]
        unknown = [n for n in graph_inputs if n not in _KNOWN_INPUTS]
        if unknown:
            raise ModelError(
                f"model input(s) {unknown} are not understood; Encapure feeds only {list(_KNOWN_INPUTS)}"
            )
        missing = [n for n in m.input_names if n not in graph_inputs]
        if missing:
            raise ModelError(f"manifest names input(s) {missing} that the graph lacks (graph: {graph_inputs})")
        # Feed exactly what the graph takes, whatever the manifest listed.
        m.input_names = graph_inputs
        if m.output_name not in graph_outputs:
            raise ModelError(f"model has no output {m.output_name!r} (outputs: {graph_outputs})")

    def _infer_output_dim(self) -> int:
        out = next(o for o in self.session.get_outputs() if o.name == self.manifest.output_name)
        last = out.shape[-1] if out.shape else None
        if isinstance(last, int) and last > 0:
            return last
        if self.manifest.embedding_dim:
            return int(self.manifest.embedding_dim)
        if self.manifest.labels:
            return len(self.manifest.labels)
        rows = self.forward([Unit(ids=np.array([self._pad_id, self._pad_id], dtype=np.int64))])
        return int(rows.shape[1])

    def warmup(self) -> None:
        """Run a couple of shapes once so the first real request does not pay for allocation."""
        for n, length in ((1, 8), (4, min(32, self._max_length))):
            units = [Unit(ids=np.full(length, self._pad_id, dtype=np.int64),
                          type_ids=np.zeros(length, dtype=np.int64) if self._use_type_ids else None)
                     for _ in range(n)]
            self.forward(units)

    # --- pre-processing ------------------------------------------------------------------------
    def _precut(self, text: str, side: str) -> str:
        """``text`` cut to what truncation at ``max_length`` tokens can keep of it (see
        ``_CHARS_PER_TOKEN_MAX``), from the side truncation keeps."""
        limit = self._max_length * _CHARS_PER_TOKEN_MAX
        if len(text) <= limit:
            return text
        return text[:limit] if side == "right" else text[-limit:]

    def _unit(self, e: Encoding) -> Unit:
        ids = np.array(e.ids, dtype=np.int64)
        type_ids = np.array(e.type_ids, dtype=np.int64) if self._use_type_ids else None
        return Unit(ids=ids, type_ids=type_ids)

    def prepare_pairs(
        self,
        query: str,
        documents: list[str],
        *,
        truncate: bool = True,
        long_documents: LongDocuments = "truncate",
        raw_scores: bool = False,
        instruction: str | None = None,
    ) -> Prepared:
        if not isinstance(query, str):
            raise InvalidInputError(f"query must be a string, got {type(query).__name__}")
        if not query.strip():
            raise InvalidInputError("query must be a non-empty string")
        docs = _check_texts(documents, "documents")
        check_instruction(instruction, self.prompt_template, self.name)
        # Only a templated model gets the keyword: subclasses (ColBERT) have their own _prepare_pairs.
        extra = {} if instruction is None else {"instruction": instruction}
        return self._prepare_pairs([query] * len(docs), docs, truncate=truncate,
                                   long_documents=long_documents, raw_scores=raw_scores, **extra)

    def prepare_pair_list(
        self,
        pairs: list[tuple[str, str]],
        *,
        truncate: bool = True,
        long_documents: LongDocuments = "truncate",
        raw_scores: bool = False,
        instruction: str | None = None,
    ) -> Prepared:
        if isinstance(pairs, str) or not isinstance(pairs, Sequence):
            raise InvalidInputError("pairs must be a list of (query, document) pairs")
        queries: list[str] = []
        docs: list[str] = []
        for i, p in enumerate(pairs):
            if (not isinstance(p, (tuple, list)) or len(p) != 2
                    or not isinstance(p[0], str) or not isinstance(p[1], str)):
                raise InvalidInputError(f"pairs[{i}] must be a (query, document) pair of strings")
            queries.append(p[0])
            docs.append(p[1])
        check_instruction(instruction, self.prompt_template, self.name)
        extra = {} if instruction is None else {"instruction": instruction}
        return self._prepare_pairs(queries, docs, truncate=truncate,
                                   long_documents=long_documents, raw_scores=raw_scores, **extra)

    def _prepare_pairs(
        self,
        queries: list[str],
        docs: list[str],
        *,
        truncate: bool,
        long_documents: LongDocuments,
        raw_scores: bool,
        instruction: str | None = None,
    ) -> Prepared:
        if self.task == "embed":
            raise WrongTaskError(f"model {self.name!r} is an embedding model; it does not score pairs")
        if long_documents not in ("truncate", "window", "error"):
            raise InvalidInputError(f"long_documents must be truncate, window or error, not {long_documents!r}")
        check_instruction(instruction, self.prompt_template, self.name)
        n = len(docs)
        options = {"raw_scores": bool(raw_scores)}
        if self.prompt_template is None:  # a template cuts documents its own way
            queries = [self._precut(q, self.truncation_side) for q in queries]
            if long_documents != "window":  # a window needs the whole document
                docs = [self._precut(d, self.truncation_side) for d in docs]
        if n == 0:
            return Prepared(units=[], owners=np.zeros(0, dtype=np.int64), n_inputs=0, tokens=[],
                            truncated=[], options=options)
        if self.prompt_template is not None:
            return self._prepare_templated(queries, docs, truncate=truncate, long_documents=long_documents,
                                           instruction=instruction, options=options)
        # Which queries are too long to keep whole? Encode each distinct query once.
        distinct = list(dict.fromkeys(queries))
        q_lens = dict(zip(distinct, (len(e.ids) for e in self.encode_batch(
            distinct, "raw", add_special_tokens=False)), strict=True))
        room = self._max_length - self._pair_specials
        long_q = np.fromiter((q_lens[q] >= room for q in queries), dtype=bool, count=n)

        encodings: list[Encoding | None] = [None] * n
        window = long_documents == "window"
        normal_idx = np.flatnonzero(~long_q).tolist()
        if normal_idx:
            encs = self.encode_batch([(queries[i], docs[i]) for i in normal_idx],
                                     "pair_window" if window else "pair")
            for i, e in zip(normal_idx, encs, strict=True):
                encodings[i] = e
        long_idx = np.flatnonzero(long_q).tolist()
        if long_idx:
            encs = self.encode_batch([(queries[i], docs[i]) for i in long_idx], "pair_both")
            for i, e in zip(long_idx, encs, strict=True):
                encodings[i] = e

        units: list[Unit] = []
        owners: list[int] = []
        tokens: list[int] = []
        truncated: list[bool] = []
        for i, maybe in enumerate(encodings):
            assert maybe is not None
            e = maybe
            over = e.overflowing
            if window and over and not long_q[i]:
                parts = [e, *over]
                for part in parts:
                    units.append(self._unit(part))
                    owners.append(i)
                tokens.append(sum(len(p.ids) for p in parts))
                truncated.append(False)
                continue
            cut = bool(over)
            if cut and (not truncate or long_documents == "error"):
                raise InvalidInputError(
                    f"input {i} is longer than the model's maximum of {self._max_length} tokens "
                    "(allow truncation or use long_documents='window')"
                )
            units.append(self._unit(e))
            owners.append(i)
            tokens.append(len(e.ids))
            truncated.append(cut)
        return Prepared(units=units, owners=np.asarray(owners, dtype=np.int64), n_inputs=n,
                        tokens=tokens, truncated=truncated, options=options)

    def _prepare_templated(
        self,
        queries: list[str],
        docs: list[str],
        *,
        truncate: bool,
        long_documents: LongDocuments,
        instruction: str | None,
        options: dict[str, Any],
    ) -> Prepared:
        """Pairs of an instruction-following LLM reranker: the template around each pair, only
        the document cut (see ``encapure.engine.prompts``); scored at the last token."""
        assert self.prompt_template is not None
        if long_documents == "window":
            raise InvalidInputError(
                f"model {self.name!r} reads up to {self._max_length} tokens per pair and does not score "
                "overlapping windows; use long_documents='truncate' (or 'error')"
            )

        def encode(texts: list[str]) -> list[list[int]]:
            return [e.ids for e in self.encode_batch(texts, "raw", add_special_tokens=False)]

        out = encode_pairs(encode, self.prompt_template, queries, docs, instruction=instruction,
                           max_length=self._max_length, truncate=truncate and long_documents != "error")
        units = [Unit(ids=np.asarray(ids, dtype=np.int64)) for ids in out.ids]
        return Prepared(units=units, owners=np.arange(len(units), dtype=np.int64), n_inputs=len(units),
                        tokens=[len(u) for u in units], truncated=out.truncated, options=options)

    def prepare_texts(
        self,
        texts: list[str],
        *,
        truncate: bool = True,
        kind: Literal["query", "document"] | None = None,
        dimensions: int | None = None,
        normalize: bool | None = None,
        raw_scores: bool = False,
    ) -> Prepared:
        items = _check_texts(texts, "texts")
        if self.task == "rerank":
            raise WrongTaskError(f"model {self.name!r} is a reranker; it scores (query, document) pairs")
        if kind not in (None, "query", "document"):
            raise InvalidInputError(f"kind must be 'query' or 'document', not {kind!r}")
        if dimensions is not None:
            if self.task != "embed":
                raise InvalidInputError("dimensions applies to embedding models only")
            if isinstance(dimensions, bool) or not isinstance(dimensions, int) or not (
                    1 <= dimensions <= self.output_dim):
                raise InvalidInputError(f"dimensions must be an integer in 1..{self.output_dim}, got {dimensions!r}")
        options: dict[str, Any] = {
            "dimensions": dimensions,
            "normalize": self.manifest.normalize if normalize is None else bool(normalize),
            "raw_scores": bool(raw_scores),
        }
        prefix = None
        if kind == "query":
            prefix = self.manifest.query_prefix
        elif kind == "document":
            prefix = self.manifest.document_prefix
        if prefix:
            items = [prefix + t for t in items]
        n = len(items)
        if n == 0:
            return Prepared(units=[], owners=np.zeros(0, dtype=np.int64), n_inputs=0, tokens=[],
                            truncated=[], options=options)
        encs = self.encode_batch([self._precut(t, self.truncation_side) for t in items], "single")
        units = [self._unit(e) for e in encs]
        truncated = [bool(e.overflowing) for e in encs]
        if not truncate and any(truncated):
            i = truncated.index(True)
            raise InvalidInputError(
                f"input {i} is longer than the model's maximum of {self._max_length} tokens (allow truncation)"
            )
        return Prepared(units=units, owners=np.arange(n, dtype=np.int64), n_inputs=n,
                        tokens=[len(u) for u in units], truncated=truncated, options=options)

    # --- running --------------------------------------------------------------------------------
    def forward(self, units: list[Unit]) -> npt.NDArray[np.float32]:
        """Pad to the batch's longest unit, run once, return one raw row per unit."""
        n = len(units)
        if n == 0:
            return np.zeros((0, self.output_dim), dtype=np.float32)
        lengths = np.fromiter((u.ids.shape[0] for u in units), dtype=np.int64, count=n)
        width = int(lengths.max())
        mask = np.arange(width, dtype=np.int64)[None, :] < lengths[:, None]
        ids = np.full((n, width), self._pad_id, dtype=np.int64)
        ids[mask] = np.concatenate([u.ids for u in units])
        feed: dict[str, npt.NDArray[np.int64]] = {"input_ids": ids}
        if self._use_mask:
            attention = mask.astype(np.int64)
            for r, u in enumerate(units):
                if u.attention is not None:
                    attention[r, : lengths[r]] = u.attention
            feed["attention_mask"] = attention
        if self._use_type_ids:
            tt = np.zeros((n, width), dtype=np.int64)
            if all(u.type_ids is not None for u in units):
                tt[mask] = np.concatenate([u.type_ids for u in units])  # type: ignore[misc]
            feed["token_type_ids"] = tt
        try:
            out = self.session.run([self.manifest.output_name], feed)[0]
        except Exception as e:  # ORT errors are not ours to leak
            raise ModelError(f"inference failed for a batch of {n}x{width}: {e}") from e
        out = np.asarray(out, dtype=np.float32)
        kind = self.manifest.output_kind
        if kind == "multi_vector":
            return token_rows(out, lengths, [True] * n)
        if kind == "token_embeddings":
            pooled = pool(out, mask, self.manifest.pooling or "cls", lengths)
            wanted = [u.token_level for u in units]
            if any(wanted):  # /embed_all units share the batch with pooled ones
                return token_rows(out, lengths, wanted, pooled)
            return pooled
        if out.ndim == 1:
            out = out[:, None]
        elif out.ndim == 3:  # e.g. a [B, 1, C] head
            out = out.reshape(n, -1)
        return out

    def _executor(self) -> ThreadPoolExecutor | None:
        workers = max(1, self.settings.workers)
        if workers == 1:
            return None
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="encapure-infer")
            return self._pool

    def run_prepared(self, prepared: Prepared) -> npt.NDArray[np.float32]:
        """All units of ``prepared`` through the model, batched; rows in unit order."""
        units = prepared.units
        if not units:
            return np.zeros((0, self.output_dim), dtype=np.float32)
        batches = plan_batches([len(u) for u in units], self.settings.max_batch_tokens,
                               self.settings.max_batch_size)
        pool = self._executor()
        workers = max(1, self.settings.workers)
        # Fewer batches than workers (a small request): split the largest so no worker idles.
        while pool is not None and len(batches) < workers:
            big = max(range(len(batches)), key=lambda j: len(batches[j]))
            if len(batches[big]) < 2:
                break
            b = batches.pop(big)
            batches += [b[: len(b) // 2], b[len(b) // 2 :]]
        if pool is None or len(batches) == 1:
            results = [self.forward([units[i] for i in b]) for b in batches]
        else:
            futures = [pool.submit(self.forward, [units[i] for i in b]) for b in batches]
            results = [f.result() for f in futures]
        if any(r.dtype == object for r in results):
            rows = np.empty(len(units), dtype=object)
            for b, r in zip(batches, results, strict=True):
                for i, row in zip(b, r, strict=True):
                    rows[i] = row
            return rows
        rows = np.empty((len(units), results[0].shape[1]), dtype=np.float32)
        for b, r in zip(batches, results, strict=True):
            rows[b] = r
        return rows

    def __call__(self, prepared: Prepared) -> ModelOutput:
        return self.finish(prepared, self.run_prepared(prepared))

    # --- post-processing ----------------------------------------------------------------------
    def finish(self, prepared: Prepared, rows: npt.NDArray[np.float32]) -> ModelOutput:
        opts = prepared.options
        n = prepared.n_inputs
        if opts.get("multivector"):
            return self._finish_multivector(prepared, rows)
        if rows.dtype == object:  # pooled rows that came back through a batch with token-level units
            rows = np.stack(list(rows)) if len(rows) else np.zeros((0, self.output_dim), dtype=np.float32)
        rows = np.asarray(rows, dtype=np.float32)
        if rows.shape[0] != len(prepared.units):
            raise ModelError(f"got {rows.shape[0]} rows for {len(prepared.units)} units")
        if self.task == "embed":
            emb = fold_mean(rows, prepared.owners, n) if rows.shape[0] != n else rows
            if emb.shape[0] == 0:
                emb = np.zeros((0, self.output_dim), dtype=np.float32)
            dims = opts.get("dimensions")
            if dims:
                emb = emb[:, :dims]
            if opts.get("normalize", self.manifest.normalize):
                emb = l2_normalize(emb)
            return EmbedOutput(embeddings=np.ascontiguousarray(emb, dtype=np.float32),
                               tokens=list(prepared.tokens), truncated=list(prepared.truncated))
        raw = bool(opts.get("raw_scores", False))
        width = rows.shape[1] if rows.shape[0] else self.output_dim
        logits = fold_max(rows, prepared.owners, n, width)
        if self.task == "rerank":
            if width == 1:
                scores = logits[:, 0] if raw else sigmoid(logits[:, 0])
            else:  # two-logit rerankers: probability (or logit) of the relevant class
                scores = logits[:, -1] if raw else softmax(logits)[:, -1]
            return RerankOutput(scores=scores.astype(np.float32), tokens=list(prepared.tokens),
                                truncated=list(prepared.truncated), raw=raw)
        act = self.manifest.score_activation
        if raw:
            scores = logits
        elif act == "sigmoid":
            scores = sigmoid(logits)
        else:
            scores = softmax(logits)
        return ClassifyOutput(scores=scores.astype(np.float32), labels=self.labels,
                              tokens=list(prepared.tokens), truncated=list(prepared.truncated), raw=raw)

    # --- token-level output (TEI /embed_all) ------------------------------------------------------
    def prepare_multivector(
        self,
        texts: list[str],
        *,
        kind: Literal["query", "document"] | None = None,
        truncate: bool = True,
    ) -> Prepared:
        """One ``[n_tokens, hidden]`` matrix per text: the last hidden state's rows, special tokens
        included. Needs a graph with token outputs (all our embedding exports); ColBERT models
        override this with their query/document encodings."""
        if self.task != "embed" or self.manifest.output_kind != "token_embeddings":
            raise InvalidInputError(
                f"model {self.name!r} has no token-level output (it gives "
                f"{'pooled sentence vectors' if self.task == 'embed' else self.task + ' scores'}); "
                "per-token vectors need an embedding model exported by Encapure, or a ColBERT model"
            )
        prepared = self.prepare_texts(texts, truncate=truncate, kind=kind)
        for u in prepared.units:
            u.token_level = True
        prepared.options = {"multivector": "hidden"}
        return prepared

    def _finish_multivector(self, prepared: Prepared, rows: npt.NDArray[Any]) -> MultiVectorOutput:
        if len(rows) != len(prepared.units):
            raise ModelError(f"got {len(rows)} rows for {len(prepared.units)} units")
        vectors = [np.ascontiguousarray(r, dtype=np.float32) for r in rows]
        return MultiVectorOutput(vectors=vectors, tokens=list(prepared.tokens), truncated=list(prepared.truncated))

    def release_memory(self) -> bool:
        """Let the runtime free memory it keeps between batches, if it can (OpenVINO: intermediate
        tensors); for a caller that knows no inference is due (an idle server). False: nothing done."""
        release = getattr(self.session, "release_memory", None)
        return bool(release()) if callable(release) else False

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    def __repr__(self) -> str:
        return (f"OnnxModel(name={self.name!r}, task={self.task}, precision={self.manifest.precision}, "
                f"max_length={self._max_length})")


# --- vectorized numerics ---------------------------------------------------------------------
def pool(
    hidden: npt.NDArray[np.float32],
    mask: npt.NDArray[np.bool_],
    mode: str,
    lengths: npt.NDArray[np.int64] | None = None,
) -> npt.NDArray[np.float32]:
    """Sentence vectors from token vectors ``[B, L, D]``, ignoring padding (``mask`` ``[B, L]``)."""
    if mode == "cls":
        return np.ascontiguousarray(hidden[:, 0, :])
    if mode == "mean":
        m = mask[:, :, None].astype(np.float32)
        total = np.einsum("bld,bl->bd", hidden, mask.astype(np.float32))
        return (total / np.maximum(m.sum(axis=1), 1e-9)).astype(np.float32)
    if mode == "max":
        masked = np.where(mask[:, :, None], hidden, -np.inf)
        return masked.max(axis=1).astype(np.float32)
    if mode == "last":
        if lengths is None:
            lengths = mask.sum(axis=1)
        idx = np.maximum(np.asarray(lengths) - 1, 0)
        return np.ascontiguousarray(hidden[np.arange(hidden.shape[0]), idx, :])
    raise ModelError(f"unknown pooling mode {mode!r}")


def token_rows(
    out: npt.NDArray[np.float32],
    lengths: npt.NDArray[np.int64],
    wanted: list[bool],
    pooled: npt.NDArray[np.float32] | None = None,
) -> npt.NDArray[Any]:
    """A 1-D object array: each unit's ``[length, D]`` token rows (a copy, without padding), or its
    pooled row where the unit did not ask for tokens."""
    rows = np.empty(out.shape[0], dtype=object)
    for i, want in enumerate(wanted):
        if want or pooled is None:
            rows[i] = np.array(out[i, : int(lengths[i])], dtype=np.float32)
        else:
            rows[i] = pooled[i]
    return rows


def l2_normalize(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def sigmoid(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    # Split by sign so large |x| never overflows exp.
    out = np.empty_like(x, dtype=np.float32)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    ex = np.exp(x[~pos])
    out[~pos] = ex / (1.0 + ex)
    return out


def softmax(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    z = x - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def fold_max(rows: npt.NDArray[np.float32], owners: npt.NDArray[np.int64], n: int,
             width: int) -> npt.NDArray[np.float32]:
    """Per input, the best of its units (windows); rows of single-unit inputs pass through."""
    if rows.shape[0] == n:
        if n == 0:
            return np.zeros((0, width), dtype=np.float32)
        if np.array_equal(owners, np.arange(n)):
            return rows
    out = np.full((n, width), -np.inf, dtype=np.float32)
    np.maximum.at(out, owners, rows)
    return out


def fold_mean(rows: npt.NDArray[np.float32], owners: npt.NDArray[np.int64], n: int) -> npt.NDArray[np.float32]:
    out = np.zeros((n, rows.shape[1]), dtype=np.float32)
    np.add.at(out, owners, rows)
    counts = np.bincount(owners, minlength=n).astype(np.float32)
    return (out / np.maximum(counts, 1)[:, None]).astype(np.float32)
