"""Workloads: WikiQA-test-gold grouped by question (with MAP), synthetic length-controlled sets, embeddings.

WikiQA is read and ranked by ``encapure.evaluation`` (the same reader and MAP as ``encapure eval``).

Synthetic documents are cut from WikiQA words to an exact token count *of the model's own
tokenizer*, so "8 docs x 64 tokens" means 64 tokens for the model under test.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from encapure.evaluation import evaluate, load_dataset


@dataclass
class Request:
    """One API call: a query and its documents (rerank) or texts to embed (query None)."""

    texts: list[str]
    query: str | None = None
    key: Any = None
    labels: list[int] | None = None

    @property
    def items(self) -> int:
        return len(self.texts)


@dataclass
class Workload:
    name: str
    task: str  # rerank | embed
    requests: list[Request]
    description: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def items(self) -> int:
        return sum(r.items for r in self.requests)

    def pairs(self) -> list[tuple[str, str]]:
        return [(r.query or "", t) for r in self.requests for t in r.texts]


def load_wikiqa(path: Path) -> Workload:
    """One request per question, its candidate sentences as documents, labels kept for MAP."""
    reqs = [Request(texts=list(g.documents), query=g.query, key=g.qid, labels=[int(x) for x in g.labels])
            for g in load_dataset(path)]
    n_pairs = sum(r.items for r in reqs)
    return Workload(
        "wikiqa",
        "rerank",
        reqs,
        f"WikiQA-test-gold: {len(reqs)} questions, {n_pairs} pairs (~{n_pairs / len(reqs):.1f} docs/request)",
    )


def mean_average_precision(workload: Workload, scores_by_key: dict[Any, Sequence[float]]) -> tuple[float, int]:
    """MAP over the questions that have a positive and got a complete answer; also how many were scored.

    A system's responses are matched to questions by key; a missing or short answer leaves the
    question out rather than counting as wrong (errors are reported separately).
    """
    answered = [(r.labels, scores_by_key[r.key]) for r in workload.requests
                if r.labels is not None and r.key in scores_by_key and len(scores_by_key[r.key]) == len(r.labels)]
    m = evaluate(answered)
    return m.map, m.queries


def answerable(workload: Workload) -> int:
    return sum(1 for r in workload.requests if r.labels and sum(r.labels) > 0)


class TextMaker:
    """Cuts word soup from WikiQA to exact token counts of a given tokenizer."""

    def __init__(self, tokenizer_file: Path, wikiqa: Workload, seed: int = 0) -> None:
        self.tok = Tokenizer.from_file(str(tokenizer_file))
        self.tok.no_truncation()
        self.tok.no_padding()
        self.rng = random.Random(seed)
        words: list[str] = []
        for r in wikiqa.requests:
            for t in r.texts:
                words.extend(t.split())
        self.words = words
        self.questions = [r.query or "" for r in wikiqa.requests]

    def text(self, n_tokens: int) -> str:
        n_words = max(8, int(n_tokens * 1.2) + 8)
        while True:
            start = self.rng.randrange(0, max(1, len(self.words) - n_words))
            text = " ".join(self.words[start : start + n_words])
            enc = self.tok.encode(text, add_special_tokens=False)
            if len(enc.ids) >= n_tokens:
                return text[: enc.offsets[n_tokens - 1][1]]
            n_words *= 2

    def query(self) -> str:
        return self.rng.choice(self.questions)


def synthetic(
    name: str, maker: TextMaker, *, n_requests: int, docs: int, lengths: Sequence[int] | None = None,
    length_range: tuple[int, int] | None = None,
) -> Workload:
    """``docs`` documents per request of fixed ``lengths`` (cycled) or log-uniform in ``length_range``."""
    reqs = []
    for i in range(n_requests):
        texts = []
        for j in range(docs):
            if length_range is not None:
                lo, hi = length_range
                n = round(math.exp(maker.rng.uniform(math.log(lo), math.log(hi))))
            else:
                assert lengths is not None
                n = lengths[(i * docs + j) % len(lengths)]
            texts.append(maker.text(n))
        reqs.append(Request(texts=texts, query=maker.query(), key=i))
    if length_range:
        desc = f"{n_requests} requests x {docs} docs, lengths log-uniform {length_range[0]}-{length_range[1]} tokens"
    else:
        desc = f"{n_requests} requests x {docs} docs x {'/'.join(map(str, sorted(set(lengths or []))))} tokens"
    return Workload(name, "rerank", reqs, desc)


def embedding_workload(wikiqa: Workload, *, per_request: int = 8, n_requests: int = 200) -> Workload:
    """WikiQA sentences, ``per_request`` texts per call (mixed natural lengths)."""
    sentences = [t for r in wikiqa.requests for t in r.texts]
    reqs = [
        Request(texts=sentences[i * per_request : (i + 1) * per_request], key=i)
        for i in range(min(n_requests, len(sentences) // per_request))
    ]
    return Workload("embed-wikiqa", "embed", reqs, f"{len(reqs)} requests x {per_request} WikiQA sentences")
