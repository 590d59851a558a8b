"""The SentencePiece-backed XLM-R tokenizer must be the HF tokenizer, id for id (issue 11, headline memory).

Golden ids of the genuine bge-m3 fast tokenizer, a seeded property test against ``tokenizers`` on the
real tokenizer.json (multilingual text, whitespace runs, emoji, control characters, special tokens
typed in the text, pairs, every truncation strategy and direction, strides and overflowing windows),
the load-time choice, and engine scores that do not depend on which tokenizer ran.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import BGE_ARCH, need

pytest.importorskip("sentencepiece")

from encapure.engine.spm_tokenizer import SPM_FILE, SpmTokenizer, compare, open_tokenizer
from encapure.errors import ModelError


@pytest.fixture(scope="module")
def arch() -> Path:
    folder = need(BGE_ARCH)
    if not (folder / SPM_FILE).is_file():
        pytest.skip(f"{folder / SPM_FILE} is absent")
    return folder


@pytest.fixture(scope="module")
def light(arch: Path) -> SpmTokenizer:
    return SpmTokenizer(arch / SPM_FILE)


@pytest.fixture(scope="module")
def hf(arch: Path) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(arch / "tokenizer.json"))


def _flat(e: Any) -> list[Any]:
    """Everything the engine reads of an encoding, overflowing windows (nested) included."""
    out: list[Any] = [list(e.ids), list(e.type_ids), list(e.offsets), list(e.special_tokens_mask), list(e.tokens)]
    return out + [_flat(o) for o in e.overflowing]


def test_golden_ids(arch: Path, light: SpmTokenizer) -> None:
    golden = json.loads((arch / "tokenizer_golden_ids.json").read_text(encoding="utf-8"))
    assert len(golden) == 46
    wrong = [(g["text"], light.encode(g["text"]).ids, g["ids"]) for g in golden if light.encode(g["text"]).ids != g["ids"]]
    assert not wrong


def test_fairseq_ids_and_template(light: SpmTokenizer, hf: Any) -> None:
    assert light.get_vocab_size() == hf.get_vocab_size() == 250002
    for tok in ("<s>", "<pad>", "</s>", "<unk>", "<mask>", "▁Hello", ",", "▁"):
        assert light.token_to_id(tok) == hf.token_to_id(tok), tok
    assert light.token_to_id("no-such-piece-xyz") is None
    assert light.num_special_tokens_to_add(False) == 2 and light.num_special_tokens_to_add(True) == 4
    a, b = light.encode("Hello", "world").ids, light.encode("Hello").ids
    assert b[0] == 0 and b[-1] == 2
    assert a[:len(b)] == b and a[len(b)] == 2 and a[-1] == 2  # <s> A </s></s> B </s>


def _random_text(rng: random.Random, words: list[str], alphabet: list[str]) -> str:
    k = rng.random()
    if k < 0.35:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
    if k < 0.85:
        return " ".join(rng.choice(words) for _ in range(rng.randint(0, 80)))
    return rng.choice(words) + rng.choice(alphabet) * rng.randint(1, 4) + rng.choice(words)


ALPHABET = (list("abcXYZ  \t\n\r\x0b\x0c\x00\x01\x1f\x7f\x85\xa0\u1680\u2000\u3000\u2581.,!?-'\"éçñüß日本語中文한국어")
            + list("русскийعربيहिन्दी") + ["🙂", "👍🏽", "🇫🇷", "e\u0301", "ﾊﾟ", "ｶ", "ﬁ", "①", "㍿", "<s>", "</s>",
                                           "<mask>", " <mask>", "<pad>", "<unk>", "\u200b", "\u200d", "\ufeff", "𠀀"])


def test_matches_hf_tokenizers_property(arch: Path, light: SpmTokenizer, hf: Any) -> None:
    """Seeded random texts and pairs under random truncation: ids, type ids, offsets, tokens and the
    (nested) overflowing windows are those of tokenizers, and so is refusing what it refuses."""
    golden = [g["text"] for g in json.loads((arch / "tokenizer_golden_ids.json").read_text(encoding="utf-8"))]
    words = " ".join(golden).split()
    rng = random.Random(11)
    configs: list[tuple[int, int, str, str] | None] = [None]
    for ml in (5, 6, 9, 16, 40, 128):
        for stride in (0, 1, 3, 32):
            for strat in ("longest_first", "only_first", "only_second"):
                # tokenizers panics (not raises) when a stride reaches a window: keep strides it accepts.
                if stride < ml - 4 and (stride == 0 or strat != "longest_first"):
                    configs += [(ml, stride, strat, "right"), (ml, stride, strat, "left")]
    compared = 0
    try:
        for _ in range(150):
            cfg = rng.choice(configs)
            for tok in (hf, light):
                if cfg is None:
                    tok.no_truncation()
                else:
                    tok.enable_truncation(cfg[0], stride=cfg[1], strategy=cfg[2], direction=cfg[3])
            add = rng.random() < 0.8
            for _ in range(6):
                item: Any = _random_text(rng, words, ALPHABET)
                if rng.random() < 0.5:
                    item = (item, _random_text(rng, words, ALPHABET))
                results = []
                for tok in (hf, light):
                    try:
                        results.append(_flat(tok.encode_batch([item], add_special_tokens=add)[0]))
                    except BaseException as e:  # a truncation error (tokenizers: a Rust panic too): both refuse
                        if isinstance(e, (KeyboardInterrupt, SystemExit)):
                            raise
                        results.append("refused")
                assert results[0] == results[1], (cfg, add, item)
                compared += 1
    finally:
        hf.no_truncation()
        light.no_truncation()
    assert compared == 900


def test_plain_ascii_shortcut_holds(light: SpmTokenizer) -> None:
    """PrecompiledCharsmap skips printable ASCII and \\t\\n\\r\\f: the charsmap must leave the former alone
    and turn the latter into spaces (\\v is removed, so it is not in the shortcut)."""
    cm = light._charsmap
    assert [chr(c) for c in range(0x20, 0x7F) if cm._lookup(chr(c)) is not None] == []
    assert [cm._lookup(c) for c in "\t\n\r\x0c"] == [" "] * 4
    assert cm._lookup("\x0b") == ""


def test_windows_like_the_engine(light: SpmTokenizer, hf: Any) -> None:
    """long_documents="window": only_second with a stride over a long document, and left truncation."""
    doc = ("Paris is the capital and most populous city of France, with an estimated population of "
           "2,102,650 residents in January 2023 over an area of more than 105 km². 東京は日本の首都です。 ") * 40
    try:
        for mode in ((512, 64, "only_second", "right"), (128, 16, "only_second", "right"),
                     (128, 0, "longest_first", "left"), (64, 0, "longest_first", "right")):
            for tok in (hf, light):
                tok.enable_truncation(mode[0], stride=mode[1], strategy=mode[2], direction=mode[3])
            pairs: list[Any] = [("what is the capital of France?", doc), ("q", doc[:300])]
            if mode[2] == "longest_first":
                pairs += [doc[:2000], (doc[:900], doc)]
            want = hf.encode_batch(pairs)
            got = light.encode_batch(pairs)
            assert [_flat(e) for e in got] == [_flat(e) for e in want], mode
            assert want[0].overflowing  # the test exercises windows
    finally:
        hf.no_truncation()
        light.no_truncation()


def test_refuses_like_tokenizers(light: SpmTokenizer, hf: Any) -> None:
    for bad in (["a\ud800b"], [("q", "\udfff")], [3], [("a", "b", "c")]):
        for tok in (hf, light):
            with pytest.raises(TypeError):
                tok.encode_batch(bad)


def test_decode_matches(light: SpmTokenizer, hf: Any) -> None:
    for text in ("Hello world!", "  spaces   here ", "日本語のテキスト", "<s> x <mask> y", "ﬁ ①"):
        ids = hf.encode(text).ids
        for skip in (True, False):
            assert light.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_export_check_passes_on_the_real_tokenizer(light: SpmTokenizer, hf: Any) -> None:
    assert compare(hf, light) == []


def test_open_tokenizer_choice(arch: Path, tmp_path: Path) -> None:
    tok_json = arch / "tokenizer.json"
    assert open_tokenizer(tok_json, "sentencepiece", "auto")[1] == "sentencepiece"
    assert open_tokenizer(tok_json, "sentencepiece", "hf")[1] == "hf"
    assert open_tokenizer(tok_json, "", "sentencepiece")[1] == "sentencepiece"
    # no sentencepiece model beside tokenizer.json: auto falls back, a forced choice is an error
    (tmp_path / "tokenizer.json").write_bytes(tok_json.read_bytes())
    assert open_tokenizer(tmp_path / "tokenizer.json", "sentencepiece", "auto")[1] == "hf"
    with pytest.raises(ModelError):
        open_tokenizer(tmp_path / "tokenizer.json", "", "sentencepiece")


def test_light_tokenizer_memory_is_small(arch: Path) -> None:
    """The point of the class: a few MB, where tokenizers' Unigram trie takes ~280 MB (measured in a
    fresh process so nothing else loaded counts)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "def rss():\n"
        "    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) / 1024\n"
        "from encapure.engine.spm_tokenizer import SpmTokenizer\n"
        "import sentencepiece, regex\n"
        "r0 = rss(); t = SpmTokenizer(sys.argv[1]); t.encode_batch(['hello world'] * 10); print(rss() - r0)\n"
    )
    if not Path("/proc/self/status").is_file():
        pytest.skip("needs /proc")
    out = subprocess.run([sys.executable, "-c", code, str(arch / SPM_FILE)], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1])
    assert float(out.stdout.strip().splitlines()[-1]) < 100  # ~49 MB measured; tokenizers: ~280 MB


def test_engine_scores_equal_with_either_tokenizer(tiny_xlmr_reranker_dir: Path) -> None:
    """A tiny random XLM-R reranker exported with the real tokenizer: the exporter recorded the light
    tokenizer, auto picks it, and scores (truncated, windowed, multilingual) equal those under tokenizers."""
    from encapure.engine.loading import load_model
    from encapure.settings import Settings

    manifest = json.loads((tiny_xlmr_reranker_dir / "encapure.json").read_text(encoding="utf-8"))
    assert manifest["tokenizer"] == "sentencepiece"
    assert (tiny_xlmr_reranker_dir / SPM_FILE).is_file()
    auto = load_model(tiny_xlmr_reranker_dir, settings=Settings(tokenizer="auto", max_length=64))
    ref = load_model(tiny_xlmr_reranker_dir, settings=Settings(tokenizer="hf", max_length=64))
    assert auto.tokenizer_kind == "sentencepiece" and ref.tokenizer_kind == "hf"
    query = "what is the capital of France?"
    docs = ["Paris is the capital of France. " * 20, "日本の首都は東京です。", "  <mask> whitespace\t\truns  ",
            "emoji 🙂👍🏽 and ﬁ ligatures", ""]
    for long_documents in ("truncate", "window"):
        a = auto.prepare_pairs(query, docs, long_documents=long_documents)
        b = ref.prepare_pairs(query, docs, long_documents=long_documents)
        assert [u.ids.tolist() for u in a.units] == [u.ids.tolist() for u in b.units]
        assert a.truncated == b.truncated and a.tokens == b.tokens
        np.testing.assert_array_equal(auto.forward(a.units), ref.forward(b.units))


def test_exporter_refuses_tokenizers_with_extra_added_tokens(arch: Path, tmp_path: Path) -> None:
    """A ColBERT marker or any token added to tokenizer.json is unknown to SpmTokenizer: keep tokenizers."""
    transformers = pytest.importorskip("transformers")
    from encapure.export.tokenizer import light_tokenizer, write_tokenizer

    tok = transformers.AutoTokenizer.from_pretrained(str(arch))
    assert light_tokenizer(arch, tok, write_tokenizer(tok, tmp_path), "xlm-roberta", tmp_path) == "sentencepiece"
    assert (tmp_path / SPM_FILE).is_file()
    tok.add_tokens(["[Q]"], special_tokens=True)
    (tmp_path / SPM_FILE).unlink()
    assert light_tokenizer(arch, tok, write_tokenizer(tok, tmp_path), "xlm-roberta", tmp_path) == ""
    assert not (tmp_path / SPM_FILE).exists()


@pytest.mark.anyio
async def test_server_answers_the_same_with_either_tokenizer(tiny_xlmr_reranker_dir: Path) -> None:
    """/tokenize (ids, token texts, offsets, special flags) and /rerank scores through the real server."""
    from encapure.engine.loading import load_model
    from encapure.server.testing import InProcessServer
    from encapure.settings import Settings

    docs = ["Paris is the capital of France. " * 30, "日本の首都は東京です。", "ﬁ ① <mask>  tabs\there", "🙂"]
    answers = []
    for kind in ("hf", "auto"):
        model = load_model(tiny_xlmr_reranker_dir, settings=Settings(tokenizer=kind, max_length=64))
        async with InProcessServer({"x": model}, Settings()) as srv:
            tok = await srv.client.post("/tokenize", json={"inputs": docs, "model": "x"})
            rr = await srv.client.post("/rerank", json={"query": "capital of France", "documents": docs,
                                                         "model": "x", "return_documents": False})
            assert tok.status_code == 200 and rr.status_code == 200, (tok.text, rr.text)
            answers.append((tok.json(), [(r["index"], r["relevance_score"]) for r in rr.json()["results"]]))
    assert answers[0] == answers[1]


def test_spliced_model_equals_a_full_protobuf_rewrite(arch: Path) -> None:
    """The light loader copies the 250k pieces as spans of the file; protobuf's own parse and rewrite
    of the same edit must give the same message."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    from encapure.engine.spm_tokenizer import _splice, _wire_spans

    raw = (arch / SPM_FILE).read_bytes()
    fields = _wire_spans(raw)
    assert fields[0][1] == 0 and fields[-1][3] == len(raw)
    assert all(a[3] == b[1] for a, b in itertools.pairwise(fields))  # contiguous, nothing skipped
    spec = pb.NormalizerSpec(name="identity", add_dummy_prefix=False)  # type: ignore[attr-defined]
    expected = pb.ModelProto.FromString(raw)  # type: ignore[attr-defined]
    expected.normalizer_spec.CopyFrom(spec)
    expected.ClearField("denormalizer_spec")
    got = pb.ModelProto.FromString(_splice(raw, fields, {3: spec.SerializeToString(), 5: None}))  # type: ignore[attr-defined]
    assert got == expected
    assert len(got.pieces) == len(expected.pieces) > 200_000
    with pytest.raises(ValueError, match="truncated"):
        _wire_spans(raw[:-1])
