"""Late interaction (ColBERT): per-token vectors for queries and documents, scored by MaxSim.

A ColBERT export's graph maps tokens to projected, L2-normalized vectors (``output_kind``
``multi_vector``); what turns text into those tokens is recorded in the manifest's ``colbert``
section and applied here exactly as PyLate (``pylate.models.ColBERT.tokenize``/``encode``) does:

- a text is stripped and tokenized with the model's special tokens, truncated to ``length - 1``
  tokens (``query_length`` or ``document_length``), then the query or document marker id
  (PyLate's ``[Q] ``/``[D] `` added tokens, colbert-ai's ``[unused0]``/``[unused1]``) is inserted
  right after the first token;
- queries with expansion are padded to the query length with the expansion token ([MASK]); those
  positions are masked as attention keys unless ``attend_to_expansion_tokens``, and every one of
  the ``query_length`` vectors is kept;
- documents keep every token except the punctuation skip-list ids.

The score of a (query, document) pair is MaxSim: the sum over query vectors of their best cosine
over the document's vectors. No sigmoid: the score is that sum (at most ``query_length``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from encapure.engine.model import OnnxModel, _check_texts
from encapure.engine.types import (
    LongDocuments,
    MultiVectorOutput,
    Prepared,
    RerankOutput,
    Unit,
)
from encapure.errors import InvalidInputError, ModelError, WrongTaskError

Kind = Literal["query", "document"]


@dataclass(frozen=True)
class ColbertSettings:
    """The manifest's ``colbert`` section, checked once at load."""

    query_prefix_id: int | None
    document_prefix_id: int | None
    query_length: int
    document_length: int
    do_query_expansion: bool
    attend_to_expansion_tokens: bool
    expansion_token_id: int
    skiplist_ids: tuple[int, ...]
    layout: str = ""

    @classmethod
    def from_manifest(cls, data: dict[str, Any]) -> ColbertSettings:
        try:
            qp, dp = data.get("query_prefix_id"), data.get("document_prefix_id")
            out = cls(
                query_prefix_id=None if qp is None else int(qp),
                document_prefix_id=None if dp is None else int(dp),
                query_length=int(data["query_length"]),
                document_length=int(data["document_length"]),
                do_query_expansion=bool(data.get("do_query_expansion", True)),
                attend_to_expansion_tokens=bool(data.get("attend_to_expansion_tokens", False)),
                expansion_token_id=int(data["expansion_token_id"]),
                skiplist_ids=tuple(int(i) for i in data.get("skiplist_ids", [])),
                layout=str(data.get("layout", "")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ModelError(f"the manifest's colbert section is incomplete or malformed: {e}") from e
        if out.query_length < 3 or out.document_length < 3:
            raise ModelError("colbert query_length and document_length must be at least 3")
        return out


class ColbertModel(OnnxModel):
    """An ``OnnxModel`` whose graph gives token vectors: reranks by MaxSim and embeds to multi-vectors.

    Its task is ``rerank`` (every rerank route and ``Reranker`` use it); ``prepare_multivector``
    serves the multi-vector embedding routes and ``Reranker.embed_multivector``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        warmup = kwargs.pop("warmup", True)
        super().__init__(*args, warmup=False, **kwargs)
        if self.manifest.output_kind != "multi_vector" or not self.manifest.colbert:
            raise ModelError(f"{self.name!r} is not a ColBERT export (no multi_vector output)")
        self.colbert = ColbertSettings.from_manifest(self.manifest.colbert)
        limit = self.manifest.max_length
        if max(self.colbert.query_length, self.colbert.document_length) > limit:
            raise ModelError("colbert lengths exceed the model's max_length")
        # Settings.max_length may only shorten documents; the query length is part of the model.
        self._doc_length = min(self.colbert.document_length, self._max_length)
        self._skip = np.asarray(sorted(set(self.colbert.skiplist_ids)), dtype=np.int64)
        if warmup:
            self.warmup()

    @property
    def dimension(self) -> int:
        return self.output_dim

    def text_room(self, kind: Kind | None) -> int:
        """How many tokens of text (special tokens and marker aside) a query or document keeps."""
        is_query = kind == "query"
        length = self.colbert.query_length if is_query else self._doc_length
        prefix = self.colbert.query_prefix_id if is_query else self.colbert.document_prefix_id
        specials = len(self.encode_batch([""], "raw")[0].ids)
        return max(1, length - (1 if prefix is not None else 0) - specials)

    # --- tokenization ---------------------------------------------------------------------------
    def encode_units(self, texts: list[str], kind: Kind) -> tuple[list[Unit], list[bool]]:
        """PyLate's tokenization of queries or documents: units and whether each text was cut."""
        cfg = self.colbert
        is_query = kind == "query"
        length = cfg.query_length if is_query else self._doc_length
        prefix = cfg.query_prefix_id if is_query else cfg.document_prefix_id
        room = length - 1 if prefix is not None else length
        # sentence-transformers' Transformer.tokenize strips each text before tokenizing.
        encs = self.encode_batch([t.strip() for t in texts], f"single:{room}")
        expand = is_query and cfg.do_query_expansion
        units: list[Unit] = []
        for e in encs:
            ids = np.asarray(e.ids, dtype=np.int64)
            att = np.ones(ids.shape[0], dtype=np.int64)
            if expand and ids.shape[0] < room:
                extra = room - ids.shape[0]
                ids = np.concatenate([ids, np.full(extra, cfg.expansion_token_id, dtype=np.int64)])
                att = np.concatenate([att, np.full(extra, int(cfg.attend_to_expansion_tokens), dtype=np.int64)])
            if prefix is not None:
                ids = np.concatenate([ids[:1], np.array([prefix], dtype=np.int64), ids[1:]])
                att = np.concatenate([att[:1], np.ones(1, dtype=np.int64), att[1:]])
            type_ids = np.zeros(ids.shape[0], dtype=np.int64) if self._use_type_ids else None
            units.append(Unit(ids=ids, type_ids=type_ids, attention=None if att.all() else att,
                              token_level=True))
        return units, [bool(e.overflowing) for e in encs]

    def keep_mask(self, unit: Unit, kind: Kind) -> npt.NDArray[np.bool_]:
        """Which of a unit's vectors PyLate keeps: all of an expanded query, the attended tokens of
        an unexpanded one, a document's tokens outside the skip-list."""
        if kind == "query":
            if self.colbert.do_query_expansion or unit.attention is None:
                return np.ones(len(unit), dtype=bool)
            return unit.attention.astype(bool)
        if self._skip.size == 0:
            return np.ones(len(unit), dtype=bool)
        return ~np.isin(unit.ids, self._skip)

    # --- requests -------------------------------------------------------------------------------
    def prepare_multivector(
        self,
        texts: list[str],
        *,
        kind: Kind | None = None,
        truncate: bool = True,
    ) -> Prepared:
        items = _check_texts(texts, "texts")
        if kind not in ("query", "document"):
            raise InvalidInputError(
                f"a ColBERT model encodes queries and documents differently: kind must be 'query' or "
                f"'document', not {kind!r}"
            )
        units, truncated = self.encode_units(items, kind) if items else ([], [])
        if not truncate and any(truncated):
            i = truncated.index(True)
            raise InvalidInputError(f"input {i} is longer than the model's {kind} length (allow truncation)")
        return Prepared(units=units, owners=np.arange(len(units), dtype=np.int64), n_inputs=len(units),
                        tokens=[len(u) for u in units], truncated=truncated,
                        options={"multivector": kind})

    def prepare_texts(self, texts: list[str], **kwargs: Any) -> Prepared:
        raise WrongTaskError(
            f"model {self.name!r} is a ColBERT (late-interaction) model: it gives one vector per token, "
            "not one per text; use the multi-vector route (/embed_all, /embed_multivector) or rerank"
        )

    def _prepare_pairs(
        self,
        queries: list[str],
        docs: list[str],
        *,
        truncate: bool,
        long_documents: LongDocuments,
        raw_scores: bool,
        instruction: str | None = None,  # refused before this point: ColBERT has no prompt template
    ) -> Prepared:
        if long_documents not in ("truncate", "window", "error"):
            raise InvalidInputError(f"long_documents must be truncate, window or error, not {long_documents!r}")
        if long_documents == "window":
            raise InvalidInputError(
                "long_documents='window' is not supported for ColBERT models: documents are cut at the "
                f"model's document length ({self._doc_length} tokens)"
            )
        n = len(docs)
        options: dict[str, Any] = {"colbert": True, "raw_scores": bool(raw_scores)}
        if n == 0:
            return Prepared(units=[], owners=np.zeros(0, dtype=np.int64), n_inputs=0, tokens=[],
                            truncated=[], options=options)
        for q in queries:
            if not q.strip():
                raise InvalidInputError("query must be a non-empty string")
        distinct = list(dict.fromkeys(queries))
        q_units, _ = self.encode_units(distinct, "query")  # queries are cut to the query length, always
        d_units, d_cut = self.encode_units(docs, "document")
        if any(d_cut) and (not truncate or long_documents == "error"):
            i = d_cut.index(True)
            raise InvalidInputError(
                f"input {i} is longer than the model's document length of {self._doc_length} tokens "
                "(allow truncation)"
            )
        slot = {q: i for i, q in enumerate(distinct)}
        nq = len(distinct)
        options["query_unit"] = np.fromiter((slot[q] for q in queries), dtype=np.int64, count=n)
        options["n_queries"] = nq
        # The query is encoded once per distinct query and counted with its first document.
        tokens = [len(d) for d in d_units]
        seen: set[int] = set()
        for i, q in enumerate(queries):
            if slot[q] not in seen:
                seen.add(slot[q])
                tokens[i] += len(q_units[slot[q]])
        owners = np.concatenate([np.full(nq, -1, dtype=np.int64), np.arange(n, dtype=np.int64)])
        return Prepared(units=[*q_units, *d_units], owners=owners, n_inputs=n, tokens=tokens,
                        truncated=d_cut, options=options)

    # --- post-processing ------------------------------------------------------------------------
    def finish(self, prepared: Prepared, rows: npt.NDArray[Any]) -> Any:
        opts = prepared.options
        if len(rows) != len(prepared.units):
            raise ModelError(f"got {len(rows)} rows for {len(prepared.units)} units")
        if opts.get("multivector"):
            kind: Kind = opts["multivector"]
            vectors = [np.ascontiguousarray(np.asarray(r, dtype=np.float32)[self.keep_mask(u, kind)])
                       for r, u in zip(rows, prepared.units, strict=True)]
            return MultiVectorOutput(vectors=vectors, tokens=list(prepared.tokens),
                                     truncated=list(prepared.truncated))
        if not opts.get("colbert"):
            raise ModelError("a ColBERT model got a request it did not prepare")
        n = prepared.n_inputs
        scores = np.zeros(n, dtype=np.float32)
        if n:
            nq = int(opts["n_queries"])
            which = opts["query_unit"]
            queries = [np.asarray(rows[j], dtype=np.float32)[self.keep_mask(prepared.units[j], "query")]
                       for j in range(nq)]
            docs = [np.asarray(rows[nq + i], dtype=np.float32)[self.keep_mask(prepared.units[nq + i], "document")]
                    for i in range(n)]
            for j in range(nq):
                idx = np.flatnonzero(which == j)
                scores[idx] = maxsim(queries[j], [docs[i] for i in idx.tolist()])
        return RerankOutput(scores=scores, tokens=list(prepared.tokens), truncated=list(prepared.truncated),
                            raw=True)


def maxsim(
    query_vecs: npt.ArrayLike,
    doc_vecs: npt.ArrayLike | Sequence[npt.ArrayLike],
) -> npt.NDArray[np.float32]:
    """ColBERT's late-interaction score: for each document, the sum over query vectors of their
    largest dot product with the document's vectors (the cosine, for the L2-normalized vectors a
    ColBERT model gives).

    ``query_vecs``: ``[Lq, D]``. ``doc_vecs``: one document ``[Ld, D]`` (returns a 0-d array),
    a list of ``[Ld_i, D]`` documents of any lengths, or a ``[n, Ld, D]`` array (returns ``[n]``).
    Vectorised: one matrix product over all documents' tokens, then a segmented max. A document
    without vectors scores 0. The max is over real vectors only (PyLate's ``rank.rerank`` pads
    shorter documents with zero vectors, so there a query token whose best real cosine is negative
    gets 0 instead; scores of documents with no padding are the same).
    """
    q = np.asarray(query_vecs, dtype=np.float32)
    if q.ndim != 2:
        raise InvalidInputError(f"query vectors must be [tokens, dim], got shape {q.shape}")
    single = False
    if isinstance(doc_vecs, np.ndarray) and doc_vecs.dtype != object:
        arr = np.asarray(doc_vecs, dtype=np.float32)
        if arr.ndim == 2:
            docs, single = [arr], True
        elif arr.ndim == 3:
            docs = list(arr)
        else:
            raise InvalidInputError(f"document vectors must be [tokens, dim] or [n, tokens, dim], got {arr.shape}")
    else:
        docs = [np.asarray(d, dtype=np.float32) for d in doc_vecs]  # type: ignore[union-attr]
    for i, d in enumerate(docs):
        if d.ndim != 2 or (d.shape[0] and d.shape[1] != q.shape[1]):
            raise InvalidInputError(f"document {i}: vectors must be [tokens, {q.shape[1]}], got shape {d.shape}")
    out = np.zeros(len(docs), dtype=np.float32)
    lengths = np.fromiter((d.shape[0] for d in docs), dtype=np.int64, count=len(docs))
    nonempty = np.flatnonzero(lengths > 0)
    if nonempty.size:
        tokens = np.concatenate([docs[i] for i in nonempty.tolist()], axis=0)
        sims = tokens @ q.T  # [sum Ld, Lq]
        starts = np.concatenate([[0], np.cumsum(lengths[nonempty])[:-1]])
        best = np.maximum.reduceat(sims, starts, axis=0)  # [n_nonempty, Lq]
        out[nonempty] = best.sum(axis=1, dtype=np.float64).astype(np.float32)
    return np.asarray(out[0]) if single else out
