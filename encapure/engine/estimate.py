"""A request's size before it is tokenized: bounds from characters, no tokenizer call.

Why: admission must decide on a request before paying for its tokenization (a refused request
should cost almost nothing), and a request that would need more units than allowed should be
refused before it is cut into thousands of windows. Every tokenizer we load (WordPiece,
SentencePiece/Unigram, byte-level BPE) makes at most one token per UTF-8 byte, so the byte count
is an upper bound on a text's tokens; each input is at least one unit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class WorkEstimate:
    """What a request may cost: ``inputs`` (each at least one unit), at most ``units`` units
    (windows counted) holding at most ``tokens`` tokens, none longer than ``unit_max`` tokens."""

    inputs: int
    units: int
    tokens: int
    unit_max: int


def token_bound(text: str) -> int:
    """At most this many tokens (specials aside): the text's UTF-8 byte count."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def estimate_texts(texts: Sequence[str], *, max_length: int, specials: int) -> WorkEstimate:
    """One unit per text, cut at ``max_length``."""
    tokens = sum(min(max_length, token_bound(t) + specials) for t in texts)
    return WorkEstimate(len(texts), len(texts), tokens, max_length)


def estimate_pairs(
    queries: Sequence[str],
    docs: Sequence[str],
    *,
    max_length: int,
    specials: int,
    window: bool,
    overlap: int = 0,
) -> WorkEstimate:
    """(query, document) pairs; with ``window`` a long document becomes overlapping windows, each
    holding the query and up to ``max_length - specials - query`` document tokens."""
    units = tokens = 0
    q_cache: dict[str, int] = {}
    for q, d in zip(queries, docs, strict=True):
        qb = q_cache.get(q)
        if qb is None:
            qb = q_cache[q] = token_bound(q)
        db = token_bound(d)
        whole = qb + db + specials
        room = max_length - specials - qb
        if not window or whole <= max_length or room <= 0:
            units += 1
            tokens += min(max_length, whole)
            continue
        step = max(1, room - min(overlap, room // 2))
        n = 1 + math.ceil(max(0, db - room) / step)
        units += n
        tokens += n * max_length
    return WorkEstimate(len(docs), units, tokens, max_length)
