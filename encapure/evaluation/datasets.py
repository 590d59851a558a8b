"""Reranking evaluation data: each query with its candidate documents and relevance labels.

Formats read (detected from the path):
- a BEIR folder: ``queries.jsonl``, ``corpus.jsonl``, ``qrels/test.tsv`` (or ``qrels/<split>.tsv``).
  Candidates are the judged documents of each query plus ``negatives`` corpus documents drawn with a
  fixed seed (BEIR ships no first-stage run; the draw keeps the task non-trivial and repeatable);
- a TSV with a header naming the columns (WikiQA's ``QuestionID Question ... Sentence Label`` loads
  as is; generally: a query column, a document column, a label column, optionally a query id), or a
  headerless 3-column ``query<TAB>document<TAB>label`` TSV;
- a JSONL of ``{"query", "document", "label"}`` rows (``passage``/``text`` accepted for the document)
  or of grouped ``{"query", "documents": [...], "labels": [...]}`` rows.

This is the project's one reader of these formats: benchmarks, scripts, experiments and tests take
their WikiQA pairs, labels and texts from here rather than parsing the TSV themselves.
"""

from __future__ import annotations

import csv
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from encapure.errors import InvalidInputError

_QUERY_COLS = ("query", "question", "q", "query_text")
_QID_COLS = ("qid", "query_id", "questionid", "query-id")
_DOC_COLS = ("document", "sentence", "passage", "text", "doc", "answer", "corpus_text")
_LABEL_COLS = ("label", "relevance", "score", "rel", "is_relevant")


@dataclass
class QueryGroup:
    query: str
    documents: list[str] = field(default_factory=list)
    labels: list[float] = field(default_factory=list)
    qid: str = ""


def load_dataset(path: str | Path, *, split: str = "test", negatives: int = 20, seed: int = 0) -> list[QueryGroup]:
    """Query groups in file order (groups by query id, else by query text); see the module doc for formats."""
    p = Path(path).expanduser()
    if p.is_dir():
        return _load_beir(p, split=split, negatives=negatives, seed=seed)
    if not p.is_file():
        raise InvalidInputError(f"dataset {p} does not exist")
    if p.suffix.lower() in (".jsonl", ".json"):
        return _load_jsonl(p)
    return _load_tsv(p)


def _groups_from_rows(rows: list[tuple[str, str, str, float]]) -> list[QueryGroup]:
    groups: dict[str, QueryGroup] = {}
    for qid, query, doc, label in rows:
        key = qid or query
        g = groups.get(key)
        if g is None:
            g = groups[key] = QueryGroup(query=query, qid=key)
        g.documents.append(doc)
        g.labels.append(label)
    return list(groups.values())


def _pick(header: list[str], names: tuple[str, ...]) -> int | None:
    lowered = [h.strip().lower() for h in header]
    for n in names:
        if n in lowered:
            return lowered.index(n)
    return None


def _label(value: str, where: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise InvalidInputError(f"{where}: label {value!r} is not a number") from None


def _load_tsv(p: Path) -> list[QueryGroup]:
    csv.field_size_limit(sys.maxsize)
    with p.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        lines = [r for r in reader if r]
    if not lines:
        raise InvalidInputError(f"{p} is empty")
    header = lines[0]
    qi, di, li = _pick(header, _QUERY_COLS), _pick(header, _DOC_COLS), _pick(header, _LABEL_COLS)
    if qi is not None and di is not None and li is not None:
        idi = _pick(header, _QID_COLS)
        body = lines[1:]
    elif len(header) == 3:
        qi, di, li, idi = 0, 1, 2, None
        body = lines
    else:
        raise InvalidInputError(
            f"{p}: cannot tell the columns; give a header with query, document and label columns "
            "(e.g. Question/Sentence/Label) or use 3 columns query<TAB>document<TAB>label"
        )
    need = max(i for i in (qi, di, li, idi) if i is not None)
    rows = []
    for n, r in enumerate(body, start=2 if body is not lines else 1):
        if len(r) <= need:
            raise InvalidInputError(f"{p}:{n}: expected at least {need + 1} columns, got {len(r)}")
        rows.append((r[idi] if idi is not None else "", r[qi], r[di], _label(r[li], f"{p}:{n}")))
    return _groups_from_rows(rows)


def _load_jsonl(p: Path) -> list[QueryGroup]:
    groups: list[QueryGroup] = []
    rows: list[tuple[str, str, str, float]] = []
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj: dict[str, Any] = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidInputError(f"{p}:{n}: not JSON ({e.msg})") from None
            query = obj.get("query", obj.get("question"))
            if not isinstance(query, str):
                raise InvalidInputError(f"{p}:{n}: needs a string 'query'")
            if "documents" in obj:
                docs, labels = obj["documents"], obj.get("labels")
                if not isinstance(docs, list) or not isinstance(labels, list) or len(docs) != len(labels):
                    raise InvalidInputError(f"{p}:{n}: 'documents' and 'labels' must be lists of equal length")
                groups.append(QueryGroup(query, [str(d) for d in docs], [float(x) for x in labels],
                                         str(obj.get("qid", n))))
                continue
            doc = next((obj[k] for k in ("document", "passage", "text") if k in obj), None)
            if not isinstance(doc, str) or "label" not in obj:
                raise InvalidInputError(f"{p}:{n}: needs 'document' (or 'passage'/'text') and 'label'")
            rows.append((str(obj.get("qid", "")), query, doc, float(obj["label"])))
    return groups + _groups_from_rows(rows)


def _read_jsonl(p: Path) -> list[dict[str, Any]]:
    with p.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _load_beir(folder: Path, *, split: str, negatives: int, seed: int) -> list[QueryGroup]:
    qrels_path = folder / "qrels" / f"{split}.tsv"
    for need in (folder / "queries.jsonl", folder / "corpus.jsonl", qrels_path):
        if not need.is_file():
            raise InvalidInputError(f"{folder} is not a BEIR folder: {need.relative_to(folder)} is missing")
    queries = {str(q["_id"]): q["text"] for q in _read_jsonl(folder / "queries.jsonl")}
    corpus = {}
    for d in _read_jsonl(folder / "corpus.jsonl"):
        title = d.get("title") or ""
        corpus[str(d["_id"])] = f"{title}. {d['text']}" if title else d["text"]
    judged: dict[str, dict[str, float]] = {}
    with qrels_path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 3 or (n == 1 and not parts[-1].lstrip("-").isdigit()):
                continue  # header
            qid, did, score = parts[0], parts[1], _label(parts[-1], f"{qrels_path}:{n}")
            if qid in queries and did in corpus:
                judged.setdefault(qid, {})[did] = score
    rng = random.Random(seed)
    ids = sorted(corpus)
    groups = []
    for qid in sorted(judged):
        docs = dict(judged[qid])
        if negatives > 0 and len(ids) > len(docs):
            pool = [i for i in rng.sample(ids, min(len(ids), negatives + len(docs))) if i not in docs]
            for did in pool[:negatives]:
                docs[did] = 0.0
        groups.append(QueryGroup(queries[qid], [corpus[d] for d in docs], list(docs.values()), qid))
    return groups


def pairs(groups: list[QueryGroup]) -> list[tuple[str, str]]:
    """(query, document) of every candidate, group after group: the flat order scores are split back in."""
    return [(g.query, d) for g in groups for d in g.documents]


def text_pool(groups: list[QueryGroup]) -> tuple[list[str], list[str]]:
    """Distinct queries and all documents, in file order: raw material for texts of varied lengths."""
    return list(dict.fromkeys(g.query for g in groups)), [d for g in groups for d in g.documents]


def mixed_texts(groups: list[QueryGroup], n: int, rng: np.random.Generator, *, max_run: int = 14) -> list[str]:
    """``n`` texts from a few tokens to past a 256-token limit, so int8 and padding effects show.

    A third queries, a third single documents, the rest runs of 2..``max_run``-1 consecutive documents
    (passages). ``rng`` is the caller's so a measurement keeps its own, repeatable draw.
    """
    queries, docs = text_pool(groups)
    texts = [queries[i] for i in rng.choice(len(queries), n // 3, replace=False)]
    texts += [docs[i] for i in rng.choice(len(docs), n // 3, replace=False)]
    while len(texts) < n:
        k = int(rng.integers(2, max_run))
        start = int(rng.integers(0, len(docs) - k))
        texts.append(" ".join(docs[start : start + k]))
    return texts
