"""A request's size before it is tokenized: bounds from characters, no tokenizer call.

Why: admission must decide on a request before paying for its tokenization (a refused request
should cost almost nothing), and a request that would need more units than allowed should be
refused before it is cut into thousands of windows. Every tokenizer we load (WordPiece,
SentencePiece/Unigram, byte-level BPE) makes at most one token per UTF-8 byte, so the byte count
is an upper bound on a text's tokens; each input is at least one unit. That bound is 4-5x real
counts on English, so for reserving room a *likely* size is given too, from half the bytes (English
runs ~4-5 bytes a token, CJK ~3, long runs of punctuation ~1: rarely above it, and the real size
replaces it once the request is tokenized).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class WorkEstimate:
    """What a request may cost: ``inputs`` (each at least one unit), at most ``units`` units
    (windows counted) holding at most ``tokens`` tokens, none longer than ``unit_max`` tokens;
    and likely ``likely_units`` units of ``likely_tokens`` tokens in all."""

    inputs: int
    units: int
    tokens: int
    unit_max: int
    likely_units: int = 0
    likely_tokens: int = 0


def token_bound(text: str) -> int:
    """At most this many tokens (specials aside): the text's UTF-8 byte count."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


# Bytes per token assumed for the likely size.
LIKELY_BYTES_PER_TOKEN = 2


def estimate_texts(texts: Sequence[str], *, max_length: int, specials: int) -> WorkEstimate:
    """One unit per text, cut at ``max_length``."""
    bounds = [token_bound(t) for t in texts]
    tokens = sum(min(max_length, b + specials) for b in bounds)
    likely = sum(min(max_length, -(-b // LIKELY_BYTES_PER_TOKEN) + specials) for b in bounds)
    return WorkEstimate(len(texts), len(texts), tokens, max_length, len(texts), likely)


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
    units = tokens = likely_units = likely_tokens = 0
    q_cache: dict[str, int] = {}
    for q, d in zip(queries, docs, strict=True):
        qb = q_cache.get(q)
        if qb is None:
            qb = q_cache[q] = token_bound(q)
        db = token_bound(d)
        n, t = _pair_size(qb, db, max_length, specials, window, overlap)
        units += n
        tokens += t
        n, t = _pair_size(-(-qb // LIKELY_BYTES_PER_TOKEN), -(-db // LIKELY_BYTES_PER_TOKEN), max_length, specials,
                          window, overlap)
        likely_units += n
        likely_tokens += t
    return WorkEstimate(len(docs), units, tokens, max_length, likely_units, likely_tokens)


def _pair_size(qb: int, db: int, max_length: int, specials: int, window: bool, overlap: int) -> tuple[int, int]:
    """Units and tokens of one pair of ``qb`` and ``db`` tokens."""
    whole = qb + db + specials
    room = max_length - specials - qb
    if not window or whole <= max_length or room <= 0:
        return 1, min(max_length, whole)
    step = max(1, room - min(overlap, room // 2))
    n = 1 + math.ceil(max(0, db - room) / step)
    return n, n * max_length
