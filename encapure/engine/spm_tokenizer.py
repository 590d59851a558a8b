"""A light XLM-RoBERTa tokenizer on ``sentencepiece``, a drop-in for the subset of ``tokenizers`` we use.

Why: the Hugging Face fast tokenizer of XLM-R (bge-m3, bge-reranker-v2-m3, multilingual-e5) builds a
Unigram trie of 250k pieces that costs ~280 MB of RSS, more than half of an int4 bge-reranker-v2-m3's
budget. ``sentencepiece`` holds the same model in a few MB. It only has to *be* the HF tokenizer for
these models, so this module reproduces the HF pipeline step by step rather than trusting
sentencepiece's own defaults (which strip and merge whitespace differently):

1. split the raw text on the added (special) tokens, ``<mask>`` eating the whitespace on its left;
2. normalize each other segment with the model's precompiled charsmap (sentencepiece's normalizer,
   whitespace left alone, with an alignment back to the raw text);
3. split on Unicode whitespace (Rust's ``char::is_whitespace``) and prefix every word with ``▁``;
4. Viterbi over the pieces (sentencepiece, with an identity normalizer);
5. fairseq ids (``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3, pieces +1, ``<mask>`` last), then
   HF's truncation (strategies, direction, stride, overflowing) and the template
   ``<s> A </s>`` / ``<s> A </s></s> B </s>`` with HF's merge rules for overflowing parts.

Only models whose exporter checked this against the HF tokenizer get it (the manifest says
``"tokenizer": "sentencepiece"``), see ``encapure.export``; everything else keeps ``tokenizers``.
"""

from __future__ import annotations

import re
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import regex

SPM_FILE = "sentencepiece.bpe.model"

_SPACE = "\u2581"
# Rust's char::is_whitespace (the White_Space property); Python's \s also takes \x1c-\x1f.
_WS = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_WORD = re.compile(f"[^{_WS}]+")
_WS_CHARS = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000"
                      + "".join(chr(c) for c in range(0x2000, 0x200B)))

_GRAPHEME = regex.compile(r"\X")
_PLAIN = re.compile(r"[\t\n\r\x0c\x20-\x7e]*")

_BOS, _PAD, _EOS, _UNK = 0, 1, 2, 3
_SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")


@dataclass
class SpmEncoding:
    """The fields of ``tokenizers.Encoding`` the engine and the server read."""

    ids: list[int]
    type_ids: list[int]
    tokens: list[str]
    offsets: list[tuple[int, int]]
    special_tokens_mask: list[int]
    overflowing: list[SpmEncoding] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def attention_mask(self) -> list[int]:
        return [1] * len(self.ids)

    def _copy(self) -> SpmEncoding:
        return SpmEncoding(list(self.ids), list(self.type_ids), list(self.tokens), list(self.offsets),
                           list(self.special_tokens_mask), [o._copy() for o in self.overflowing])

    def _slice(self, start: int, stop: int) -> SpmEncoding:
        return SpmEncoding(self.ids[start:stop], self.type_ids[start:stop], self.tokens[start:stop],
                           self.offsets[start:stop], self.special_tokens_mask[start:stop])

    def _truncate(self, max_len: int, stride: int, direction: str) -> None:
        """``tokenizers``' ``Encoding::truncate``: keep one window, the rest become overflowing."""
        n = len(self.ids)
        if max_len >= n:
            return
        if max_len == 0:
            whole = SpmEncoding(self.ids, self.type_ids, self.tokens, self.offsets, self.special_tokens_mask,
                                self.overflowing)
            self.ids, self.type_ids, self.tokens, self.offsets, self.special_tokens_mask = [], [], [], [], []
            self.overflowing = [whole]
            return
        if stride >= max_len:
            raise ValueError(f"`stride` must be strictly less than `max_len={max_len}` (note that `max_len` "
                             "may be shorter than the max length of the original model, as it subtracts the "
                             "number of special characters")
        step = max_len - stride
        ranges: list[tuple[int, int]] = []
        if direction == "right":
            for start in range(0, n, step):
                stop = min(start + max_len, n)
                ranges.append((start, stop))
                if stop == n:
                    break
        else:
            for last in range(n - 1, -1, -step):
                stop = last + 1
                start = max(0, stop - max_len)
                ranges.append((start, stop))
                if start == 0:
                    break
        parts = [self._slice(a, b) for a, b in ranges]
        first = parts[0]
        self.ids, self.type_ids, self.tokens = first.ids, first.type_ids, first.tokens
        self.offsets, self.special_tokens_mask = first.offsets, first.special_tokens_mask
        self.overflowing = parts[1:]

    def _merge_with(self, pair: SpmEncoding) -> None:
        """``tokenizers``' ``Encoding::merge_with`` (offsets not growing), overflowing parts included."""
        over: list[SpmEncoding] = []
        for mine in self.overflowing:
            e = mine._copy()
            e._merge_with(pair._copy())
            over.append(e)
            for theirs in pair.overflowing:
                e = mine._copy()
                e._merge_with(theirs._copy())
                over.append(e)
        for theirs in pair.overflowing:
            e = self._copy()
            e._merge_with(theirs._copy())
            over.append(e)
        self.ids = self.ids + pair.ids
        self.type_ids = self.type_ids + pair.type_ids
        self.tokens = self.tokens + pair.tokens
        self.offsets = self.offsets + pair.offsets
        self.special_tokens_mask = self.special_tokens_mask + pair.special_tokens_mask
        self.overflowing = over


@dataclass
class _Truncation:
    max_length: int
    stride: int
    strategy: str
    direction: str


class SpmTokenizer:
    """XLM-R's tokenizer on ``sentencepiece`` with the ``tokenizers.Tokenizer`` methods we call.

    Not thread-safe for reconfiguration (like ``tokenizers``); the engine serializes it under a lock.
    """

    def __init__(self, model_file: str | Path) -> None:
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as pb

        raw = Path(model_file).read_bytes()
        # Edit the model's small specs on the wire: parsing the whole ModelProto in Python would build
        # 250k piece objects (~20 MB that the allocator keeps). The pieces are copied as spans of the
        # file, not one by one: per-piece copies took ~1 s of a bge-reranker-v2-m3 server's start.
        fields = _wire_spans(raw)
        trainer: Any = pb.TrainerSpec()  # type: ignore[attr-defined]  # generated protobuf module
        trainer.ParseFromString(_payload(raw, fields, 2))
        if trainer.model_type != 1:  # TrainerSpec.UNIGRAM
            raise ValueError(f"{model_file}: not a Unigram sentencepiece model")
        if (trainer.unk_id, trainer.bos_id, trainer.eos_id) != (0, 1, 2):
            raise ValueError(f"{model_file}: not the XLM-R layout (<unk>, <s>, </s> = 0, 1, 2)")
        spec: Any = pb.NormalizerSpec()  # type: ignore[attr-defined]
        spec.ParseFromString(_payload(raw, fields, 3))
        # Step 2: the model's own charsmap, applied the way HF's Precompiled normalizer does.
        self._charsmap = PrecompiledCharsmap(spec.precompiled_charsmap)
        # Step 4: the same pieces and scores over text that is already normalized and ▁-prefixed.
        spec.name = "identity"
        spec.precompiled_charsmap = b""
        spec.add_dummy_prefix = False
        spec.remove_extra_whitespaces = False
        spec.escape_whitespaces = False
        # normalizer_spec replaced, denormalizer_spec (not used) dropped
        out = _splice(raw, fields, {3: spec.SerializeToString(), 5: None})
        self._sp = spm.SentencePieceProcessor(model_proto=out)
        del raw, out, fields
        n_pieces = self._sp.get_piece_size()
        self._mask_id = n_pieces + 1
        self._vocab_size = n_pieces + 2
        self._special_ids = {"<s>": _BOS, "<pad>": _PAD, "</s>": _EOS, "<unk>": _UNK, "<mask>": self._mask_id}
        self._id_to_special = {v: k for k, v in self._special_ids.items()}
        self._special_re = re.compile("|".join(re.escape(t) for t in sorted(_SPECIAL_TOKENS, key=len, reverse=True)))
        self._trunc: _Truncation | None = None

    # --- the tokenizers.Tokenizer subset -------------------------------------------------------
    def no_padding(self) -> None:
        """We never pad in the tokenizer (the engine pads per batch)."""

    def no_truncation(self) -> None:
        self._trunc = None

    def enable_truncation(self, max_length: int, stride: int = 0, strategy: str = "longest_first",
                          direction: str = "right") -> None:
        if strategy not in ("longest_first", "only_first", "only_second"):
            raise ValueError(f"unknown truncation strategy {strategy!r}")
        if direction not in ("left", "right"):
            raise ValueError(f"unknown truncation direction {direction!r}")
        self._trunc = _Truncation(int(max_length), int(stride), strategy, direction)

    @property
    def truncation(self) -> dict[str, Any] | None:
        t = self._trunc
        if t is None:
            return None
        return {"max_length": t.max_length, "stride": t.stride, "strategy": t.strategy, "direction": t.direction}

    def num_special_tokens_to_add(self, is_pair: bool) -> int:
        return 4 if is_pair else 2

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return self._vocab_size

    def token_to_id(self, token: str) -> int | None:
        if token in self._special_ids:
            return self._special_ids[token]
        i = self._sp.piece_to_id(token)
        if i == 0 and token != self._sp.id_to_piece(0):
            return None
        return self._from_spm(i)

    def id_to_token(self, i: int) -> str | None:
        if i in self._id_to_special:
            return self._id_to_special[i]
        if 4 <= i < self._mask_id:
            return str(self._sp.id_to_piece(i - 1))
        return None

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """HF's Metaspace decoder: ``▁`` -> space, the first token's leading space dropped."""
        parts: list[str] = []
        for i in ids:
            tok = self.id_to_token(int(i))
            if tok is None or (skip_special_tokens and int(i) in self._id_to_special):
                continue
            tok = tok.replace(_SPACE, " ")
            if not parts and tok.startswith(" "):
                tok = tok[1:]
            parts.append(tok)
        return "".join(parts)

    def encode(self, sequence: str, pair: str | None = None, add_special_tokens: bool = True) -> SpmEncoding:
        return self._encode_one(sequence if pair is None else (sequence, pair), add_special_tokens)

    def encode_batch(self, inputs: list[Any], add_special_tokens: bool = True) -> list[SpmEncoding]:
        return [self._encode_one(x, add_special_tokens) for x in inputs]

    # --- internals -------------------------------------------------------------------------------
    def _from_spm(self, i: int) -> int:
        return _UNK if i == 0 else i + 1

    def _encode_one(self, item: Any, add_special_tokens: bool) -> SpmEncoding:
        try:
            if isinstance(item, str):
                a, b = self._tokenize(item), None
            elif isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(x, str) for x in item):
                a, b = self._tokenize(item[0]), self._tokenize(item[1], type_id=1)
            else:
                raise TypeError("TextEncodeInput must be a str or a (str, str) pair")
        except UnicodeEncodeError as e:  # a lone surrogate: tokenizers refuses it with a TypeError too
            raise TypeError(f"TextEncodeInput must be valid Unicode text: {e}") from e
        if self._trunc is not None:
            self._truncate(a, b, add_special_tokens)
        return self._post_process(a, b, add_special_tokens)

    def _tokenize(self, text: str, type_id: int = 0) -> SpmEncoding:
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        tokens: list[str] = []
        pos = 0
        for m in self._special_re.finditer(text):
            start = m.start()
            if m.group() == "<mask>":  # lstrip: the match takes the whitespace on its left
                while start > pos and text[start - 1] in _WS_CHARS:
                    start -= 1
            self._tokenize_segment(text, pos, start, ids, offsets, tokens)
            ids.append(self._special_ids[m.group()])
            offsets.append((start, m.end()))
            tokens.append(text[start:m.end()])  # HF names the token by what it matched, <mask>'s lstrip included
            pos = m.end()
        self._tokenize_segment(text, pos, len(text), ids, offsets, tokens)
        n = len(ids)
        return SpmEncoding(ids, [type_id] * n, tokens, offsets, [0] * n)

    def _tokenize_segment(self, text: str, begin: int, end: int, ids: list[int],
                          offsets: list[tuple[int, int]], tokens: list[str]) -> None:
        if begin >= end:
            return
        norm, align = self._charsmap.normalize(text, begin, end)
        # Each word, ▁-prefixed unless it starts with ▁ already; `where` maps the prefixed string
        # back to normalized positions (the added ▁ aligned like the word's first character).
        chunks: list[str] = []
        where: list[int] = []
        for w in _WORD.finditer(norm):
            word = w.group()
            if not word.startswith(_SPACE):
                chunks.append(_SPACE)
                where.append(w.start())
            chunks.append(word)
            where.extend(range(w.start(), w.end()))
        if not chunks:
            return
        joined = "".join(chunks)
        proto = self._sp.encode(joined, out_type="proto")
        char_at: Callable[[int], int]
        if joined.isascii():
            char_at = int
        else:
            # Piece boundaries come as byte offsets into `joined`; turn them into character positions.
            table: dict[int, int] = {}
            b = 0
            for c, ch in enumerate(joined):
                table[b] = c
                b += len(ch.encode("utf-8"))
            table[b] = len(joined)
            char_at = table.__getitem__
        for p in proto.pieces:
            i = self._from_spm(p.id)
            s, e = char_at(p.begin), char_at(p.end)
            ids.append(i)
            tokens.append(joined[s:e] if i == _UNK else str(p.piece))
            offsets.append((align[where[s]][0], align[where[e - 1]][1]))

    def _truncate(self, a: SpmEncoding, b: SpmEncoding | None, add_special_tokens: bool) -> None:
        """``tokenizers``' ``truncate_encodings`` with room made for the special tokens."""
        t = self._trunc
        assert t is not None
        max_length = t.max_length
        if add_special_tokens:
            max_length -= self.num_special_tokens_to_add(b is not None)
            if max_length < 0:
                max_length = 0
        if max_length == 0:
            a._truncate(0, t.stride, t.direction)
            if b is not None:
                b._truncate(0, t.stride, t.direction)
            return
        total = len(a) + (len(b) if b is not None else 0)
        if total <= max_length:
            return
        to_remove = total - max_length
        if t.strategy == "longest_first":
            if b is None:
                a._truncate(total - to_remove, t.stride, t.direction)
                return
            n1, n2 = len(a), len(b)
            swap = n1 > n2
            if swap:
                n1, n2 = n2, n1
            n2 = n1 if n1 > max_length else max(n1, max_length - n1)
            if n1 + n2 > max_length:
                n1 = max_length // 2
                n2 = n1 + max_length % 2
            if swap:
                n1, n2 = n2, n1
            a._truncate(n1, t.stride, t.direction)
            b._truncate(n2, t.stride, t.direction)
            return
        if t.strategy == "only_first":
            target = a
        elif b is not None:
            target = b
        else:
            raise ValueError("Truncation error: Second sequence not provided")
        if len(target) > to_remove:
            target._truncate(len(target) - to_remove, t.stride, t.direction)
        else:
            raise ValueError("Truncation error: Sequence to truncate too short to respect the provided max_length")

    def _post_process(self, a: SpmEncoding, b: SpmEncoding | None, add_special_tokens: bool) -> SpmEncoding:
        """``TemplateProcessing`` ``<s> A </s>`` / ``<s> A </s></s> B </s>`` (all type id 0), merged
        left to right as ``Encoding::merge`` does, so overflowing parts get their specials too."""
        def special(i: int) -> SpmEncoding:
            return SpmEncoding([i], [0], [self._id_to_special[i]], [(0, 0)], [1])

        # The template's type ids (all 0) go on the top-level parts only: overflowing parts of the
        # second sequence keep the 1 they were encoded with, as in tokenizers.
        a.type_ids = [0] * len(a.ids)
        if b is not None:
            b.type_ids = [0] * len(b.ids)
        parts: list[SpmEncoding]
        if b is None:
            parts = [special(_BOS), a, special(_EOS)] if add_special_tokens else [a]
        elif add_special_tokens:
            parts = [special(_BOS), a, special(_EOS), special(_EOS), b, special(_EOS)]
        else:
            parts = [a, b]
        out = SpmEncoding([], [], [], [], [])
        for p in parts:
            out._merge_with(p)
        return out


class PrecompiledCharsmap:
    """HF ``tokenizers``' ``Precompiled`` normalizer over sentencepiece's precompiled charsmap.

    HF does not apply the charsmap the way sentencepiece does (longest match anywhere): it walks
    extended grapheme clusters, replaces a cluster of under 6 UTF-8 bytes by the value of the
    *shortest* key that prefixes it, and otherwise maps each character on its own. The ids differ
    (half-width katakana with a sound mark, for one), so this reimplements HF's rule on the same
    double-array trie (darts-clone layout: u32 trie size, the units, then the NUL-separated values).
    """

    def __init__(self, blob: bytes) -> None:
        import array

        (trie_size,) = struct.unpack_from("<I", blob, 0)
        units = array.array("I")
        units.frombytes(blob[4:4 + trie_size])
        if sys.byteorder != "little":
            units.byteswap()
        self._units = units
        self._values = blob[4 + trie_size:]
        self._cache: dict[str, str | None] = {}

    def _lookup(self, key: str) -> str | None:
        """The value of the shortest key that prefixes ``key`` (spm_precompiled's ``transform``)."""
        units = self._units
        node = 0
        unit = units[0]
        node ^= (unit >> 10) << ((unit & (1 << 9)) >> 6)
        for c in key.encode("utf-8"):
            if c == 0:
                break
            node ^= c
            unit = units[node]
            if (unit & ((1 << 31) | 0xFF)) != c:
                return None
            node ^= (unit >> 10) << ((unit & (1 << 9)) >> 6)
            if (unit >> 8) & 1:
                start = units[node] & ((1 << 31) - 1)
                stop = self._values.index(b"\0", start)
                return self._values[start:stop].decode("utf-8")
        return None

    def _transform(self, chunk: str) -> str | None:
        try:
            return self._cache[chunk]
        except KeyError:
            pass
        out = self._lookup(chunk)
        if len(self._cache) < 100_000:
            self._cache[chunk] = out
        return out

    def normalize(self, text: str, begin: int, end: int) -> tuple[str, list[tuple[int, int]]]:
        """``text[begin:end]`` normalized, and for each output character the span of ``text`` it
        is aligned with, by HF's rules: a replacement's characters take the original characters
        one by one, extra ones share the previous one's span, and characters removed are folded
        into the previous output character (or, at the very start, shift the alignment: HF does so)."""
        if _PLAIN.fullmatch(text, begin, end):
            # Printable ASCII and \t\n\r\f: the charsmap leaves the characters of words alone and maps
            # these whitespace characters to spaces (checked in tests), so words keep their positions.
            return text[begin:end], [(i, i + 1) for i in range(begin, end)]
        out: list[str] = []
        changes: list[int] = []

        def replace(old_len: int, new: str) -> None:
            out.extend(new)
            changes.extend([0] * len(new))
            diff = len(new) - old_len
            if diff > 0:
                changes[len(changes) - diff:] = [1] * diff
            elif diff < 0 and changes:
                changes[-1] += diff

        for g in _GRAPHEME.findall(text, begin, end):
            if len(g.encode("utf-8")) < 6:
                rep = self._transform(g)
                if rep is not None:
                    replace(len(g), rep)
                    continue
            for ch in g:
                rep = self._transform(ch) if (ch < " " or ch > "~") else None
                if rep is None:
                    out.append(ch)
                    changes.append(0)
                else:
                    replace(1, rep)
        align: list[tuple[int, int]] = []
        i = begin
        for change in changes:
            if change > 0:
                align.append(align[-1] if align else (i, i + 1))
            else:
                align.append((i, i + 1))
                i += 1 - change
        return "".join(out), align


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _wire_spans(data: bytes) -> list[tuple[int, int, int, int]]:
    """The top-level fields of a ModelProto (all length-delimited) as (number, field start, payload
    start, end) offsets into ``data``; nothing is copied. Single-byte keys and lengths (nearly every
    one of the 250k pieces) take the inline path."""
    out: list[tuple[int, int, int, int]] = []
    append = out.append
    pos, n = 0, len(data)
    while pos < n:
        start = pos
        key = data[pos]
        if key < 0x80:
            pos += 1
        else:
            key, pos = _varint(data, pos)
        if key & 7 != 2:
            raise ValueError("unexpected field in sentencepiece model")
        size = data[pos]
        if size < 0x80:
            pos += 1
        else:
            size, pos = _varint(data, pos)
        append((key >> 3, start, pos, pos + size))
        pos += size
    if pos != n:
        raise ValueError("truncated sentencepiece model")
    return out


def _payload(data: bytes, fields: list[tuple[int, int, int, int]], number: int) -> bytes:
    """The payloads of field ``number``, joined (protobuf merges repeated occurrences of a message)."""
    return b"".join(data[a:b] for f, _, a, b in fields if f == number)


def _splice(data: bytes, fields: list[tuple[int, int, int, int]], replace: dict[int, bytes | None]) -> bytes:
    """``data`` with the fields numbered in ``replace`` replaced by that payload (``None``: dropped),
    the others copied in runs of consecutive fields."""
    out = bytearray()
    run = -1  # start of the run of unchanged fields being copied
    for number, start, _, _end in fields:
        if number in replace:
            if run >= 0:
                out += data[run:start]
                run = -1
            new = replace[number]
            if new is not None:
                out += _wire_field(number, new)
        elif run < 0:
            run = start
    if run >= 0:
        out += data[run:fields[-1][3]]
    return bytes(out)


def _wire_field(number: int, payload: bytes) -> bytes:
    def varint(v: int) -> bytes:
        b = bytearray()
        while v >= 0x80:
            b.append((v & 0x7F) | 0x80)
            v >>= 7
        b.append(v)
        return bytes(b)

    return varint(number << 3 | 2) + varint(len(payload)) + payload


def available(folder: str | Path) -> bool:
    """Whether ``folder`` has a sentencepiece model and ``sentencepiece`` is importable."""
    if not (Path(folder) / SPM_FILE).is_file():
        return False
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        return False
    return True


def open_tokenizer(tok_path: Path, recorded: str, choice: str) -> tuple[Any, str]:
    """The tokenizer for a model: (object with the ``tokenizers.Tokenizer`` methods we use, its kind).

    ``choice`` is the ``tokenizer`` setting: ``hf`` always loads tokenizer.json with ``tokenizers``;
    ``sentencepiece`` insists on the light one (the model folder must hold sentencepiece.bpe.model);
    ``auto`` takes the light one only where the exporter checked it against the HF tokenizer
    (``recorded`` is the manifest's ``tokenizer``), since loading the HF one to compare would cost
    the very memory this saves.
    """
    spm_path = tok_path.parent / SPM_FILE
    if choice == "sentencepiece" or (choice == "auto" and recorded == "sentencepiece"):
        if available(tok_path.parent):
            return SpmTokenizer(spm_path), "sentencepiece"
        if choice == "sentencepiece":
            from encapure.errors import ModelError

            raise ModelError(f"tokenizer=sentencepiece needs {spm_path} and the sentencepiece package "
                             "(pip install sentencepiece)")
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tok_path)), "hf"


# Texts the exporter tokenizes both ways before it lets a model use SpmTokenizer: scripts,
# whitespace runs, compatibility forms the charsmap rewrites, special tokens typed in the text.
CHECK_TEXTS: tuple[str, ...] = (
    "", " ", "Hello world!", "  leading and trailing spaces  ", "multiple    internal     spaces",
    "tab\tseparated\tand\nnewline\r\nmixed", "BGE-M3 是一個多語言 embedding 模型。", "日本語のテキストをトークン化する。",
    "한국어 문장을 토큰화합니다.", "Русский текст для проверки токенизатора.", "النص العربي للاختبار",
    "हिन्दी पाठ परीक्षण के लिए", "ภาษาไทยไม่มีช่องว่างระหว่างคำ", "Ελληνικά κείμενα", "עברית מימין לשמאל",
    "Français: garçon, naïve, cœur; Deutsch: Straße; Türkçe: İstanbul ğüşiöç; Tiếng Việt có dấu",
    "ﬁｒｅ ①  café  ＡＢＣ １２３ ㎞ ㍿", "ｶﾀｶﾅ半角 ﾊﾟﾋﾟﾌﾟ", "e\u0301 a\u0308 precomposed vs combining",
    "emoji 🙂👍🏽🇫🇷 family 👨‍👩‍👧 text", "control\x01chars\x1f here\x7f and \x00 nul", "zero\u200bwidth\u200djoiner\ufeffbom",
    "nbsp\xa0and\u3000ideographic\u2000en\u1680ogham\x85nel spaces", "▁already ▁meta▁space", "ǅ ǈ ǋ titlecase",
    "<s> </s> <pad> <unk> <mask> fake special tokens", "x<mask>y  <mask> z", "supplementary 𠀀𠀁 𡈽 CJK ext",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕞𝕒𝕥𝕙 𝒷𝑜𝓁𝒹", "code: def f(x): return x**2  # comment", "numbers 3.14159 1,000,000 1e-5 0x1F",
    "What is the capital of France? Paris is the capital and most populous city of France. " * 6,
)


def compare(hf_tok: Any, light: SpmTokenizer, texts: tuple[str, ...] = CHECK_TEXTS) -> list[str]:
    """Where ``light`` and the HF tokenizer disagree (ids, type ids, offsets, overflowing windows),
    over single texts and pairs, with and without specials, under the truncation modes the engine uses."""
    def flat(e: Any) -> list[Any]:
        out: list[Any] = [list(e.ids), list(e.type_ids), list(e.offsets), list(e.special_tokens_mask)]
        return out + [flat(o) for o in e.overflowing]

    singles: list[Any] = list(texts)
    pairs: list[Any] = [(texts[i], texts[(i * 7 + 3) % len(texts)]) for i in range(len(texts))]
    modes: list[tuple[int, int, str, str] | None] = [None]
    for direction in ("right", "left"):
        modes += [(16, 0, "longest_first", direction), (24, 4, "only_second", direction), (64, 8, "only_second", direction)]
    problems: list[str] = []
    try:
        for mode in modes:
            for tok in (hf_tok, light):
                if mode is None:
                    tok.no_truncation()
                else:
                    tok.enable_truncation(mode[0], stride=mode[1], strategy=mode[2], direction=mode[3])
            batches = [singles, pairs] if mode is None or mode[2] != "only_second" else [pairs]
            for batch in batches:
                for add in (True, False):
                    for item in batch:
                        results: list[list[Any] | None] = []
                        for tok in (hf_tok, light):
                            try:
                                results.append(flat(tok.encode_batch([item], add_special_tokens=add)[0]))
                            except Exception:  # only_second with a second text too short: both must refuse
                                results.append(None)
                        if results[0] != results[1]:
                            problems.append(f"{mode} add_special_tokens={add}: {item!r}")
        hf_tok.no_truncation()
        for text in singles:
            ids = hf_tok.encode(text).ids
            if hf_tok.decode(ids, skip_special_tokens=True) != light.decode(ids, skip_special_tokens=True):
                problems.append(f"decode: {text!r}")
    finally:
        hf_tok.no_truncation()
        light.no_truncation()
    return problems
