"""``encapure export --format openvino``: OpenVINO IR with NNCF weight-only int4/int8, served by OpenVINO.

Real exports of the trained MiniLM reranker fixture (BERT, hidden 384 = 3 groups of 128) and of a
tiny random XLM-R (bge-reranker-v2-m3's model type and vocabulary); scores checked against the fp32
ONNX export on WikiQA-test-gold queries (ranking quality), alone vs batched (batch invariance).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import BGE_ARCH, RERANKER_FIXTURE, WIKIQA_TEST, _model_key, cached_export, need

from encapure.engine import Reranker
from encapure.errors import ExportError, ModelError
from encapure.manifest import Manifest
from encapure.settings import Settings

pytest.importorskip("openvino", reason="--format openvino needs openvino (the openvino extra)")
pytest.importorskip("nncf", reason="--format openvino int4/int8 needs nncf (the export extra)")


@pytest.fixture(autouse=True)
def _openvino_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """conftest pins ENCAPURE_BACKEND=onnxruntime for the suite, and an IR refuses an explicit
    onnxruntime: in this module models open on OpenVINO (the fp32 ONNX references too) unless a
    test names another backend."""
    monkeypatch.setenv("ENCAPURE_BACKEND", "openvino")


PAIRS = [
    ("what is the capital of france", "Paris is the capital and most populous city of France."),
    ("what is the capital of france", "Lyon is a city in France."),
    ("how do vaccines work", "Vaccines train the immune system with a harmless piece of a pathogen. " * 8),
    ("¿Cuál es el río más largo?", "El Nilo y el Amazonas compiten por el título."),
    ("", "an empty query still scores"),
    ("short", "x"),
]


def _ir(precision: str) -> Path:
    from encapure.export import export_model

    src = need(RERANKER_FIXTURE)
    key = _model_key("reranker-ov", [src], precision, extra="openvino")
    return cached_export(key, lambda out: export_model(src, out, precision=precision, format="openvino"))


@pytest.fixture(scope="module")
def ir_int4() -> Path:
    return _ir("int4")


@pytest.fixture(scope="module")
def ir_int8() -> Path:
    return _ir("int8")


@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_ir_folder_and_manifest(precision: str, reranker_fp32_dir: Path) -> None:
    folder = _ir(precision)
    m = Manifest.load(folder)
    assert m.model_file == "model.xml" and m.precision == precision
    assert {"model.xml", "model.bin", "tokenizer.json"} <= set(m.files)
    assert not (folder / "model.onnx").exists()
    q = m.quantization
    assert q["format"] == "openvino" and q["method"] == "nncf_weights"
    assert q["mode"] == {"int4": "int4_sym", "int8": "int8_asym"}[precision]
    if precision == "int4":
        assert q["group_size"] == 128
    parity = json.loads((folder / "parity.json").read_text())
    assert parity["precision"] == precision and parity["cosine"] > {"int4": 0.98, "int8": 0.999}[precision]
    onnx_fp32 = (reranker_fp32_dir / "model.onnx").stat().st_size
    # 4 or 8 bits per weight (embeddings included) plus scales and the f32 biases and LayerNorms
    assert (folder / "model.bin").stat().st_size < {"int4": 0.2, "int8": 0.3}[precision] * onnx_fp32


def _wikiqa_map(model: Reranker, n_queries: int = 60) -> float:
    from encapure.evaluation import load_dataset
    from encapure.evaluation.ranking import evaluate

    groups = [g for g in load_dataset(need(WIKIQA_TEST)) if any(v > 0 for v in g.labels)][:n_queries]
    pairs = [(g.query, d) for g in groups for d in g.documents]
    scores = model.score(pairs, raw_scores=True)
    per_query, i = [], 0
    for g in groups:
        per_query.append((g.labels, scores[i:i + len(g.documents)]))
        i += len(g.documents)
    return evaluate(per_query).map


@pytest.mark.parametrize("precision,floor", [("int8", 0.99), ("int4", 0.95)])
def test_ir_ranks_like_fp32(precision: str, floor: float, reranker_fp32_dir: Path) -> None:
    """The ranking bar: WikiQA MAP (60 queries) of the IR against the fp32 ONNX export."""
    ir = Reranker.from_pretrained(_ir(precision))
    assert type(ir.model.session).__name__ == "OpenVINOSession"
    fp32 = Reranker.from_pretrained(reranker_fp32_dir)
    want = fp32.score(PAIRS, raw_scores=True)
    got = ir.score(PAIRS, raw_scores=True)
    # measured max |Δ logit| on these pairs: int8 weights 0.65, int4 0.5 (over all WikiQA pairs 0.71 / 3.2)
    assert np.abs(got - want).max() < 1.0
    assert got[0] > got[1]  # Paris beats Lyon, as in fp32
    assert _wikiqa_map(ir) >= floor * _wikiqa_map(fp32)


def _alone_and_batched(folder: Path, dq: int) -> tuple[np.ndarray, np.ndarray]:
    settings = Settings(workers=1, threads_per_worker=2, openvino_dynamic_quantization_group_size=dq)
    model = Reranker.from_pretrained(folder, settings=settings)
    batched = model.score(PAIRS, raw_scores=True)
    alone = np.array([model.score([p], raw_scores=True)[0] for p in PAIRS])
    return alone, batched


@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_ir_is_batch_invariant(precision: str) -> None:
    """Weight-only compression keeps activations f32 (the default): a pair scores the same alone
    and in a padded batch."""
    alone, batched = _alone_and_batched(_ir(precision), 0)
    np.testing.assert_allclose(alone, batched, atol=1e-5, rtol=0)


def test_dynamic_quantization_is_only_close_alone_vs_batched(ir_int4: Path) -> None:
    """Why ``openvino_dynamic_quantization_group_size`` defaults to 0: with int8 activations the
    same pair scored alone and in a batch differed (measured 3.9e-3 on the MiniLM fixture, 1.2e-2 on
    bge-reranker-v2-m3; OpenVINO 2026.4, AMD EPYC AVX-512 VNNI). Bounded, not equal."""
    alone, batched = _alone_and_batched(ir_int4, 128)
    assert np.abs(alone - batched).max() < 0.05


def test_ir_refuses_onnxruntime_when_asked(ir_int4: Path) -> None:
    with pytest.raises(ModelError, match=r"OpenVINO IR.*--backend openvino"):
        Reranker.from_pretrained(ir_int4, settings=Settings(backend="onnxruntime"))


def test_ir_mmap_off_scores_the_same(ir_int4: Path) -> None:
    """Also guards against touching the mapped weights: dropping the mapping's pages after each
    inference (madvise) once gave ~100x smaller scores from the second call on."""
    mapped = Reranker.from_pretrained(ir_int4, settings=Settings(openvino_mmap=True))
    on = mapped.score(PAIRS, raw_scores=True)
    again = mapped.score(PAIRS, raw_scores=True)
    off = Reranker.from_pretrained(ir_int4, settings=Settings(openvino_mmap=False)).score(PAIRS, raw_scores=True)
    np.testing.assert_allclose(off, on, atol=1e-6, rtol=0)
    np.testing.assert_allclose(again, on, atol=1e-6, rtol=0)


def test_ir_export_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    from encapure.export import export_model

    src = need(RERANKER_FIXTURE)
    with pytest.raises(ExportError, match="--format openvino supports precision"):
        export_model(src, tmp_path / "a", precision="fp16", format="openvino")
    with pytest.raises(ExportError, match="unknown format"):
        export_model(src, tmp_path / "b", precision="int4", format="tflite")


def test_tiny_xlmr_int4_ir_exports_and_serves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bge-reranker-v2-m3's model type and 250k vocabulary (int4 embedding) at a tiny width. Exported
    with ENCAPURE_BACKEND=onnxruntime in the environment: the export's parity check runs the IR on
    OpenVINO whatever the environment names (it used to fail with "does not load in ONNX Runtime")."""
    import torch
    from transformers import AutoConfig, XLMRobertaForSequenceClassification

    from encapure.export import export_model

    arch = need(BGE_ARCH)
    config = AutoConfig.from_pretrained(str(arch), num_hidden_layers=2, hidden_size=128, num_attention_heads=2,
                                        intermediate_size=256, max_position_embeddings=514)
    torch.manual_seed(0)
    monkeypatch.setenv("ENCAPURE_BACKEND", "onnxruntime")
    res = export_model(XLMRobertaForSequenceClassification(config).eval(), tmp_path / "x", precision="int4",
                       tokenizer=arch, format="openvino")
    monkeypatch.setenv("ENCAPURE_BACKEND", "openvino")
    assert res.manifest.model_file == "model.xml"
    assert not list(res.output.glob("*.onnx*")), "the fp32 intermediate must not stay in the folder"
    assert res.parity["cosine"] > 0.999
    # the int4 word embedding: 250002 x 128 at 4 bits is 16 MB, f32 would be 128 MB
    assert res.size_bytes < 40e6
    model = Reranker.from_pretrained(res.output)
    scores = model.score(PAIRS, raw_scores=True)
    alone = np.array([model.score([p], raw_scores=True)[0] for p in PAIRS])
    np.testing.assert_allclose(alone, scores, atol=1e-5, rtol=0)


# --- paging out the mapped weights (Settings.openvino_release_mapped_weights) --------------------


def _mapped_rss_kb(path: Path) -> int:
    """Resident KB of this process's mappings of ``path`` (Linux /proc/self/smaps)."""
    target, total, inside = str(path.resolve()), 0, False
    with open("/proc/self/smaps", encoding="utf-8") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and not head[0].endswith(":"):
                inside = line.rstrip("\n").endswith(target)
            elif inside and line.startswith("Rss:"):
                total += int(head[1])
    return total


linux_only = pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc/self/smaps")


@linux_only
def test_page_out_never_changes_memory(tmp_path: Path) -> None:
    """The advice must keep every byte: on a private anonymous buffer (what an address range reused
    since /proc/self/maps was read could hold; MADV_DONTNEED would zero it) and on a read-only file
    mapping (whose pages leave RSS and read back from the file)."""
    import ctypes
    import mmap
    import os

    from encapure.engine.backends.openvino import mapped_ranges, page_out

    size = 64 * mmap.PAGESIZE
    data = np.random.default_rng(0).integers(1, 256, size, dtype=np.uint8).tobytes()
    anon = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # Python's default is shared
    anon.write(data)
    view = ctypes.c_char.from_buffer(anon)
    addr = ctypes.addressof(view)
    del view
    page_out([(addr, addr + size)])
    assert anon[:] == data
    anon.close()

    path = tmp_path / "weights.bin"
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # clean pages: reclaimable without writeback
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        assert m[:] == data  # every page touched
        before = _mapped_rss_kb(path)
        ranges = mapped_ranges(path)
        assert ranges and before > 0
        assert page_out(ranges), "MADV_PAGEOUT refused: Linux < 5.4?"
        after = _mapped_rss_kb(path)
        assert m[:] == data
    assert after < before / 2, (before, after)


def _tiny_xlmr_ir() -> Path:
    import torch
    from transformers import AutoConfig, XLMRobertaForSequenceClassification

    from encapure.export import export_model

    arch = need(BGE_ARCH)

    def build(out: Path) -> object:
        config = AutoConfig.from_pretrained(str(arch), num_hidden_layers=2, hidden_size=128, num_attention_heads=2,
                                            intermediate_size=256, max_position_embeddings=514)
        torch.manual_seed(0)
        model = XLMRobertaForSequenceClassification(config).eval()
        return export_model(model, out, precision="int4", tokenizer=arch, format="openvino", check_parity=False)

    return cached_export(_model_key("tiny-xlmr-ov", [arch], "int4", extra="openvino-h128-l2"), build)


def _scores(folder: Path, **kw: object) -> tuple[Reranker, list[np.ndarray]]:
    settings = Settings(workers=1, threads_per_worker=2, **kw)  # type: ignore[arg-type]
    model = Reranker.from_pretrained(folder, settings=settings)
    return model, [model.score(PAIRS, raw_scores=True) for _ in range(3)]


@linux_only
@pytest.mark.parametrize("which", ["minilm", "tiny-xlmr"])
def test_page_out_leaves_scores_unchanged(which: str, ir_int4: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Scores with the mapped weights paged out after inference are those without, bit for bit,
    on every repeated call, after a reload, and equal mmap off within float noise; and the page-out
    did happen (the mapping's resident pages are gone after a call)."""
    from encapure.engine.backends import openvino as ov_backend

    monkeypatch.setattr(ov_backend, "RELEASE_COST_FACTOR", 0.0)  # after every call, not throttled
    folder = ir_int4 if which == "minilm" else _tiny_xlmr_ir()
    paged, on = _scores(folder, openvino_release_mapped_weights=True)
    bin_path = folder / "model.bin"
    assert _mapped_rss_kb(bin_path) < 0.1 * bin_path.stat().st_size / 1024, "nothing was paged out"
    _, kept = _scores(folder, openvino_release_mapped_weights=False)
    _, reloaded = _scores(folder, openvino_release_mapped_weights=True)
    _, off = _scores(folder, openvino_mmap=False)
    for got in (*on, *kept, *reloaded):
        np.testing.assert_array_equal(got, on[0])
    np.testing.assert_allclose(off[0], on[0], atol=1e-6, rtol=0)
    del paged


@linux_only
def test_page_out_under_concurrent_inference(ir_int4: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two workers run while one of them pages the mapping out: every result equals the reference."""
    from concurrent.futures import ThreadPoolExecutor

    from encapure.engine.backends import create_session
    from encapure.engine.backends import openvino as ov_backend

    session = create_session(ir_int4 / "model.xml", Settings(workers=2, threads_per_worker=1))
    rng = np.random.default_rng(0)
    feeds = []
    for rows, length in [(8, 64), (1, 7), (3, 33), (2, 128)]:
        ids = rng.integers(1000, 30000, (rows, length)).astype(np.int64)
        feeds.append({"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)})
    want = [session.run(None, f)[0] for f in feeds]
    monkeypatch.setattr(ov_backend, "RELEASE_COST_FACTOR", 0.0)  # after every call, racing the other worker
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda i: (i % 4, session.run(None, feeds[i % 4])[0]), range(24)))
    for i, out in got:
        np.testing.assert_array_equal(out, want[i])


def test_release_memory_races_inference_safely(ir_int4: Path) -> None:
    """The idle server frees OpenVINO's intermediate tensors (``release_memory``) while a request may be
    starting: releases interleaved with two workers' inferences never change a result, and a release
    never runs during an inference (it reports False then)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from encapure.engine.backends import create_session

    session = create_session(ir_int4 / "model.xml", Settings(workers=2, threads_per_worker=1))
    rng = np.random.default_rng(1)
    feeds = []
    for rows, length in [(16, 64), (1, 9), (4, 40)]:
        ids = rng.integers(1000, 30000, (rows, length)).astype(np.int64)
        feeds.append({"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)})
    want = [session.run(None, f)[0] for f in feeds]
    assert session.release_memory() is True  # idle: released
    stop, released = threading.Event(), []

    def releaser() -> None:
        while not stop.is_set():
            released.append(session.release_memory())

    t = threading.Thread(target=releaser)
    t.start()
    try:
        with ThreadPoolExecutor(2) as pool:
            got = list(pool.map(lambda i: (i % 3, session.run(None, feeds[i % 3])[0]), range(18)))
    finally:
        stop.set()
        t.join()
    for i, out in got:
        np.testing.assert_array_equal(out, want[i])
    assert True in released  # it did release between inferences


@linux_only
def test_page_out_after_each_warm_up_call(ir_int4: Path) -> None:
    """The throttle must not skip the first calls (warm-up shapes): RSS at ready would keep what the
    last of them read from the mapping."""
    from encapure.engine.backends import create_session

    session = create_session(ir_int4 / "model.xml", Settings(workers=1, threads_per_worker=2))
    bin_path = ir_int4 / "model.bin"
    for rows, length in [(1, 8), (4, 32)]:  # back to back, like the engine's warm-up
        ids = np.full((rows, length), 1000, np.int64)
        session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)})
        assert _mapped_rss_kb(bin_path) < 0.1 * bin_path.stat().st_size / 1024


EMBED_TEXTS = [
    "a",
    "what is the capital of france",
    "Paris is the capital and most populous city of France.",
    "Vaccines train the immune system with a harmless piece of a pathogen. " * 12,
    "El Nilo y el Amazonas compiten por el título del río más largo.",
    "ß ü é 北京 😀",
    "How are glacier caves formed? " * 3,
    "A glacier cave is a cave formed within the ice of a glacier. " * 30,  # past the 128-token limit
]


def test_a_changed_ir_recipe_changes_only_its_own_cache_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cached IR made by an old recipe must not be served; the other precisions' IRs and every ONNX
    export keep their cache entries (a bge-reranker-v2-m3 int4 IR takes minutes to export)."""
    from encapure.export import openvino_ir
    from encapure.hub import cache_key

    keys = {(p, f): cache_key("/m", p, format=f) for p in ("int8", "int4") for f in ("onnx", "openvino", "auto")}
    monkeypatch.setitem(openvino_ir.IR_RECIPE_VERSIONS, "int8", "99")
    changed = {k for k in keys if cache_key("/m", k[0], format=k[1]) != keys[k]}
    assert changed == {("int8", "openvino"), ("int8", "auto")}


def test_embedder_recipe_keeps_the_first_third_of_ffn_downs_f32() -> None:
    """Early layers' errors are carried through every later one (MiniLM-L6: layer 0's FFN down alone f32
    0.9936 min cosine, one later layer's 0.9899-0.9905), so the f32 share is counted from the input."""
    from encapure.export.openvino_ir import f32_ffn_downs

    def names(n: int) -> list[str]:
        return [f"/model/encoder/layer.{i}/{part}/MatMul" for i in range(n)
                for part in ("attention/self/query", "intermediate/dense", "output/dense")]

    assert f32_ffn_downs(names(6), 1 / 3) == [f"/model/encoder/layer.{i}/output/dense/MatMul" for i in (0, 1)]
    assert len(f32_ffn_downs(names(12), 1 / 3)) == 4 and len(f32_ffn_downs(names(24), 1 / 3)) == 8
    assert f32_ffn_downs(names(2), 1 / 3) == ["/model/encoder/layer.0/output/dense/MatMul"]
    assert f32_ffn_downs(["/decoder/MatMul"], 1 / 3) == []  # other names: quantized whole


def test_embedder_int8_ir_is_static_mixed_precision(tmp_path: Path) -> None:
    """Embedders at int8 get NNCF static int8 (constant activation scales) with the first third's FFN
    down projections kept f32: an embedding is the same alone and in a padded batch, and close to fp32."""
    from encapure.engine import Embedder
    from encapure.export import export_model

    src = _tiny_bert(tmp_path / "tiny-bert")
    res = export_model(src, tmp_path / "ov8", precision="int8", format="openvino")
    q = res.manifest.quantization
    assert (q["method"], q["model_type"], q["calibration_batch_size"]) == ("nncf_ptq", "transformer", 1)
    assert q["calibration_batches"] > 100  # the shipped set, one text per batch
    # FFN down of the first third of the layers (ceil(2 / 3) = 1 of this 2-layer model)
    assert q["f32_matmuls"] == ["/model/encoder/layer.0/output/dense/MatMul"]
    xml = (res.output / "model.xml").read_text()
    assert xml.count('type="FakeQuantize"') >= 8  # int8 activations for the other MatMuls

    settings = Settings(workers=1, threads_per_worker=2)
    model = Embedder.from_pretrained(res.output, settings=settings)
    assert type(model.model.session).__name__ == "OpenVINOSession"
    batched = model.embed(EMBED_TEXTS)
    alone = np.stack([model.embed([t])[0] for t in EMBED_TEXTS])
    np.testing.assert_allclose(alone, batched, atol=1e-5, rtol=0)

    fp32 = export_model(src, tmp_path / "fp32", precision="fp32")
    want = Embedder.from_pretrained(fp32.output, settings=settings).embed(EMBED_TEXTS)
    cos = (batched * want).sum(1) / np.linalg.norm(batched, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() > 0.99
    assert np.abs(batched - want).max() > 1e-5  # quantized, not a copy of fp32


def _tiny_bert(dst: Path) -> Path:
    """A tiny random-weight BERT (seeded) with the reranker fixture's tokenizer, saved as a Hugging Face folder."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=128)
    BertModel(cfg).eval().save_pretrained(dst)
    BertTokenizerFast.from_pretrained(str(need(RERANKER_FIXTURE))).save_pretrained(dst)
    return dst


def _tiny_st_embedder(root: Path) -> Path:
    """A tiny random-weight BERT saved as a sentence-transformers folder (mean pooling, normalized),
    all-MiniLM-L6-v2's layout: what ``--model`` points at when it is a local Hugging Face folder."""
    from sentence_transformers import SentenceTransformer

    try:
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import Normalize, Pooling, Transformer

    hf = _tiny_bert(root / "hf")
    word = Transformer(str(hf), max_seq_length=128)
    st = SentenceTransformer(modules=[word, Pooling(64, "mean"), Normalize()], device="cpu")
    out = root / "st"
    st.save(str(out))
    return out


def test_openvino_backend_loads_an_int8_embedder_as_the_static_ir(tmp_path: Path) -> None:
    """Exported on load (``load_model`` -> ``cached_export``): backend openvino at int8 gets the NNCF
    static int8 IR, embedding like sentence-transformers; onnxruntime (and auto) get ONNX, each
    under its own cache entry, so neither is handed the other's export."""
    from sentence_transformers import SentenceTransformer

    from encapure.engine import Embedder, load_model
    from encapure.hub import cache_key, export_format

    src = _tiny_st_embedder(tmp_path)
    cache = tmp_path / "cache"
    threads = {"workers": 1, "threads_per_worker": 2, "cache_dir": cache}
    ov = Embedder(load_model(src, settings=Settings(backend="openvino", **threads), precision="int8"))
    m = ov.model.manifest
    assert m.model_file == "model.xml" and (m.quantization["format"], m.quantization["method"]) == (
        "openvino", "nncf_ptq")
    assert type(ov.model.session).__name__ == "OpenVINOSession"
    assert ov.model.folder.name == cache_key(src, "int8", format="auto")

    want = SentenceTransformer(str(src), device="cpu").encode(EMBED_TEXTS)
    got = ov.embed(EMBED_TEXTS)
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() > 0.99
    assert np.abs(got - want).max() > 1e-5  # quantized, not fp32

    for backend in ("onnxruntime", "auto"):
        assert export_format(backend, "int8") == "onnx"
    ort = Embedder(load_model(src, settings=Settings(backend="onnxruntime", **threads), precision="int8"))
    assert ort.model.manifest.model_file == "model.onnx"
    assert ort.model.folder.name == cache_key(src, "int8") != ov.model.folder.name
    cos = (ort.embed(EMBED_TEXTS) * want).sum(1) / np.linalg.norm(want, axis=1)
    assert cos.min() > 0.99
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == sorted(
        [ov.model.folder.name, ort.model.folder.name])


def test_openvino_backend_keeps_onnx_where_the_ir_is_not_faster(tmp_path: Path) -> None:
    """``format="auto"`` resolves after task detection: a reranker at int8 stays the ONNX QDQ graph
    (which OpenVINO runs fast), as does anything at another precision."""
    from encapure.export.core import resolve_format
    from encapure.hub import export_format

    assert export_format("openvino", "int8") == "auto"
    assert export_format("openvino", "fp32") == "onnx"
    assert export_format("openvino", "int8", task="rerank") == "onnx"  # the entry every backend shares
    assert resolve_format("auto", "int8", "embed") == "openvino"
    assert resolve_format("auto", "int8", "rerank") == "onnx"
    assert resolve_format("auto", "int8", "embed", decoder=True) == "onnx"
    assert resolve_format("auto", "fp32", "embed") == "onnx"
    assert resolve_format("onnx", "int8", "embed") == "onnx"
    from encapure.export import export_model

    res = export_model(need(RERANKER_FIXTURE), tmp_path / "r", precision="int8", format="auto", check_parity=False)
    assert res.manifest.model_file == "model.onnx" and res.manifest.quantization.get("format") != "openvino"


def test_without_nncf_the_openvino_backend_falls_back_to_onnx(monkeypatch: pytest.MonkeyPatch) -> None:
    """A partial install (no nncf): ONNX int8 under the ONNX cache key, so installing nncf later
    gets the IR under its own key rather than this fallback."""
    from encapure import hub
    from encapure.export import core

    monkeypatch.setattr(hub, "missing_ir_modules", lambda: ["nncf"])
    monkeypatch.setattr(core, "missing_ir_modules", lambda: ["nncf"])
    assert hub.export_format("openvino", "int8") == "onnx"
    assert core.resolve_format("auto", "int8", "embed") == "onnx"


# --- --backend auto across export formats (int8 embedders) ----------------------------------------
@pytest.fixture(scope="module")
def auto_embedder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, object]:
    """A tiny sentence-transformers embedder exported on load under ``backend=auto`` at int8: the cache
    then holds the ONNX export and the IR, and the probe record between them."""
    from encapure.engine import Embedder, load_model

    root = tmp_path_factory.mktemp("auto-embedder")
    src = _tiny_st_embedder(root)
    settings = Settings(backend="auto", cache_dir=root / "cache", workers=1, threads_per_worker=2)
    model = Embedder(load_model(src, settings=settings, precision="int8"))
    return src, root / "cache", model


def test_auto_exports_both_formats_and_serves_the_probed_one(auto_embedder: tuple[Path, Path, object]) -> None:
    """``backend=auto`` at int8 compares ONNX Runtime on the ONNX export with OpenVINO on the NNCF IR
    (each within its own parity record of PyTorch) and loads what the probe picked; the record makes
    the next load read the choice instead of probing."""
    from sentence_transformers import SentenceTransformer

    from encapure.engine import Embedder, load_model
    from encapure.engine.backends import auto
    from encapure.hub import cache_key

    src, cache, model = auto_embedder
    onnx, ir = cache / cache_key(src, "int8"), cache / cache_key(src, "int8", format="auto")
    assert Manifest.load(onnx).model_file == "model.onnx" and Manifest.load(ir).model_file == "model.xml"
    records = list((cache / "backend-probes").glob("formats-*.json"))
    assert len(records) == 1
    record = json.loads(records[0].read_text())
    assert set(record["invariance"]) == {"onnxruntime", auto.IR_LABEL}, record
    assert "sum of both exports" in record["rule"], record  # both parity records were read
    chosen = ir if record["chosen"] == auto.IR_LABEL else onnx
    assert model.model.folder == chosen  # type: ignore[attr-defined]
    if record["chosen"] == auto.IR_LABEL:
        assert type(model.model.session).__name__ == "OpenVINOSession"  # type: ignore[attr-defined]

    want = SentenceTransformer(str(src), device="cpu").encode(EMBED_TEXTS)
    got = model.embed(EMBED_TEXTS)  # type: ignore[attr-defined]
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() > 0.99
    alone = np.stack([model.embed([t])[0] for t in EMBED_TEXTS])  # type: ignore[attr-defined]
    np.testing.assert_allclose(alone, got, atol=1e-5, rtol=0)

    settings = Settings(backend="auto", cache_dir=cache, workers=1, threads_per_worker=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(auto, "_probe", lambda *a, **k: pytest.fail("probed twice"))
        again = Embedder(load_model(src, settings=settings, precision="int8"))
    assert again.model.folder == chosen


def test_auto_across_formats_switches_only_for_a_clear_gain(auto_embedder: tuple[Path, Path, object],
                                                            tmp_path: Path) -> None:
    """The rules of the per-file probe hold across formats: the IR replaces the ONNX export only with a
    full batch >= 10% faster; a near tie stays on ONNX (the reference, on every install)."""
    from test_backends import _Timed

    from encapure.engine.backends import auto
    from encapure.hub import cache_key

    src, cache, _ = auto_embedder
    onnx, ir = cache / cache_key(src, "int8"), cache / cache_key(src, "int8", format="auto")

    def opener(cost: dict[str, float]):  # type: ignore[no-untyped-def]
        return lambda backend, path, settings: _Timed(cost[backend])

    settings = Settings(cache_dir=tmp_path / "a")
    assert auto.choose_export(onnx, ir, settings, opener({"onnxruntime": 0.1, "openvino": 0.05})) == ir
    settings = Settings(cache_dir=tmp_path / "b")
    assert auto.choose_export(onnx, ir, settings, opener({"onnxruntime": 0.1, "openvino": 0.0975})) == onnx


def test_auto_across_formats_only_for_int8_embedders_with_openvino(monkeypatch: pytest.MonkeyPatch) -> None:
    from encapure import hub

    assert hub.across_formats("auto", "int8")
    assert not hub.across_formats("auto", "int8", task="rerank")
    assert not hub.across_formats("auto", "fp32")
    assert not hub.across_formats("onnxruntime", "int8") and not hub.across_formats("openvino", "int8")
    monkeypatch.setattr(hub, "missing_ir_modules", lambda: ["nncf"])
    assert not hub.across_formats("auto", "int8")  # without nncf: ONNX on ONNX Runtime, as before


def test_server_exporter_probes_across_formats_in_the_serving_process(auto_embedder: tuple[Path, Path, object],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """``encapure serve``'s exporter (a child process per export) asks for both formats under auto and
    returns the recorded choice; a reranker is exported once, as ONNX."""
    from encapure.engine.backends import auto
    from encapure.hub import cache_key
    from encapure.server import loading

    src, cache, model = auto_embedder
    asked: list[str] = []

    def child(source, settings, precision, task, max_length, fmt):  # type: ignore[no-untyped-def]
        asked.append(fmt)
        return cache / cache_key(src, precision, format=fmt)

    monkeypatch.setattr(loading, "_export_in_child", child)
    settings = Settings(backend="auto", cache_dir=cache, workers=1, threads_per_worker=2)
    monkeypatch.setattr(auto, "_probe", lambda *a, **k: pytest.fail("the record should answer"))
    assert loading.export_in_child(src, settings=settings, precision="int8") == model.model.folder  # type: ignore[attr-defined]
    assert asked == ["onnx", "auto"]
    asked.clear()
    loading.export_in_child(src, settings=settings, precision="int8", task="rerank")
    assert asked == ["onnx"]
