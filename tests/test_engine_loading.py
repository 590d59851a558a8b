"""from_pretrained and the export cache (real exports of tiny models), classifiers, registry."""

from __future__ import annotations

import multiprocessing as mp
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import BGE_ARCH, need

from encapure.engine import Classifier, Embedder, Reranker, load_model
from encapure.errors import InvalidInputError, ModelNotFoundError
from encapure.hub import cache_key, cached_build
from encapure.manifest import Manifest
from encapure.registry import MODELS, default_reranker, lookup
from encapure.settings import Settings


def _tiny_hf_folder(tmp: Path, num_labels: int) -> Path:
    """A tiny random XLM-R seq-cls model saved as a plain Hugging Face folder."""
    import torch
    from transformers import AutoConfig, XLMRobertaForSequenceClassification

    arch = need(BGE_ARCH)
    labels = {0: "negative", 1: "neutral", 2: "positive"} if num_labels == 3 else None
    config = AutoConfig.from_pretrained(
        str(arch), num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=130, num_labels=num_labels,
        **({"id2label": labels, "label2id": {v: k for k, v in labels.items()}} if labels else {}),
    )
    torch.manual_seed(0)
    model = XLMRobertaForSequenceClassification(config).eval()
    out = tmp / f"tiny-hf-{num_labels}"
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(arch / name, out / name)
    return out


@pytest.fixture(scope="module")
def hf_reranker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_hf_folder(tmp_path_factory.mktemp("hf"), 1)


def test_from_pretrained_exports_once_and_reuses(hf_reranker: Path, tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path / "cache")
    first = Reranker.from_pretrained(hf_reranker, precision="fp32", settings=settings)
    cached = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert len(cached) == 1 and (cached[0] / "encapure.json").is_file()
    assert first.model.folder == cached[0] and first.model.manifest.precision == "fp32"
    stamp = (cached[0] / "model.onnx").stat().st_mtime_ns
    t0 = time.perf_counter()
    again = Reranker.from_pretrained(hf_reranker, precision="fp32", settings=settings)
    assert time.perf_counter() - t0 < 20  # no second export
    assert again.model.folder == cached[0]
    assert (cached[0] / "model.onnx").stat().st_mtime_ns == stamp
    assert not list((tmp_path / "cache").glob(".tmp-*"))  # nothing half-written left behind
    docs = ["one", "two words", "three words here"]
    np.testing.assert_allclose(again.score([("q", d) for d in docs]), first.score([("q", d) for d in docs]))
    # Another precision is another cache entry.
    assert cache_key(hf_reranker, "int8") != cache_key(hf_reranker, "fp32")


def _build_slowly(args: tuple[str, str]) -> str:
    cache, log = args

    def build(tmp: Path) -> None:
        with open(log, "a") as f:
            f.write("built\n")
        tmp.mkdir(parents=True)
        time.sleep(0.5)
        (tmp / "payload.bin").write_bytes(b"x" * 1000)
        Manifest(task="rerank", precision="fp32", max_length=8, input_names=["input_ids"],
                 output_name="logits", output_kind="logits").save(tmp)

    return str(cached_build(Path(cache), "entry", build))


def test_cache_is_safe_across_processes(tmp_path: Path) -> None:
    log = tmp_path / "builds.log"
    ctx = mp.get_context("spawn")
    with ctx.Pool(4) as pool:
        results = pool.map(_build_slowly, [(str(tmp_path / "c"), str(log))] * 4)
    assert len(set(results)) == 1
    assert log.read_text().count("built") == 1
    final = Path(results[0])
    assert (final / "payload.bin").stat().st_size == 1000
    assert not list((tmp_path / "c").glob(".tmp-*"))


def test_failed_build_leaves_nothing(tmp_path: Path) -> None:
    def broken(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        (tmp / "half.onnx").write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        cached_build(tmp_path, "bad", broken)
    assert not (tmp_path / "bad").exists()
    assert not list(tmp_path.glob(".tmp-*"))


def test_classifier_texts_and_pairs(tmp_path: Path) -> None:
    folder = _tiny_hf_folder(tmp_path, 3)
    clf = Classifier.from_pretrained(folder, precision="fp32", settings=Settings(cache_dir=tmp_path / "cache"))
    assert clf.labels == ["negative", "neutral", "positive"]
    preds = clf.predict(["great product", "terrible", ""])
    assert len(preds) == 3
    for p in preds:
        assert set(p) == {"negative", "neutral", "positive"}
        assert sum(p.values()) == pytest.approx(1.0, abs=1e-5)
        assert list(p.values()) == sorted(p.values(), reverse=True)
    out = clf.compute([("premise", "hypothesis"), ("a", "b")])
    assert out.scores.shape == (2, 3) and out.scores.dtype == np.float32
    raw = clf.compute(["great product"], raw_scores=True)
    np.testing.assert_allclose(np.exp(raw.scores) / np.exp(raw.scores).sum(), clf.compute(["great product"]).scores,
                               atol=1e-5)
    assert clf.predict([]) == []
    with pytest.raises(InvalidInputError):
        clf.model.prepare_texts(["x"], dimensions=8)
    with pytest.raises(Exception, match="classify"):
        Reranker(clf.model)


def test_unknown_sources_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        load_model(tmp_path)  # empty folder
    with pytest.raises(ModelNotFoundError):
        load_model("not a model id at all")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ModelNotFoundError):
        load_model(tmp_path / "file.txt")
    with pytest.raises(ModelNotFoundError):
        Embedder.from_pretrained(tmp_path / "missing-folder")


def test_registry() -> None:
    assert default_reranker().hub_id == "BAAI/bge-reranker-v2-m3"
    assert lookup("bge-reranker-v2-m3") is default_reranker()
    assert lookup("baai/BGE-RERANKER-V2-M3") is default_reranker()
    e5 = lookup("intfloat/multilingual-e5-small")
    assert e5 is not None and e5.query_prefix == "query: " and e5.document_prefix == "passage: "
    nomic = lookup("nomic-embed-text-v1.5")
    assert nomic is not None and nomic.query_prefix == "search_query: "
    assert lookup("ms-marco-MiniLM-L-6") is lookup("cross-encoder/ms-marco-MiniLM-L-6-v2")  # an alias
    names = {m.short_name for m in MODELS}
    for expected in ("bge-reranker-base", "bge-reranker-large", "ms-marco-MiniLM-L-6-v2", "ms-marco-MiniLM-L-12-v2",
                     "mxbai-rerank-xsmall-v1", "mxbai-rerank-base-v1", "all-mpnet-base-v2", "bge-small-en-v1.5",
                     "bge-base-en-v1.5", "e5-small-v2", "multilingual-e5-base", "bge-m3"):
        assert expected in names
    for m in MODELS:  # prefixes are for embedders; rerankers only resolve names
        assert m.task == "embed" or (m.query_prefix is None and m.document_prefix is None)


def test_registry_fills_missing_prefixes_only() -> None:
    """What the registry drives in loading: prefixes a known source's manifest lacks, for the same task."""
    from encapure.engine.loading import _apply_registry

    def manifest(source: str, task: str = "embed", **kw: object) -> Manifest:
        return Manifest(task=task, precision="fp32", max_length=8, input_names=["input_ids"],  # type: ignore[arg-type]
                        output_name="x", output_kind="sentence_embedding", source=source, **kw)  # type: ignore[arg-type]

    m = manifest("intfloat/e5-small-v2")
    _apply_registry(m)
    assert (m.query_prefix, m.document_prefix) == ("query: ", "passage: ")
    m = manifest("intfloat/e5-small-v2", query_prefix="q> ")
    _apply_registry(m)
    assert (m.query_prefix, m.document_prefix) == ("q> ", "passage: ")  # the manifest wins
    m = manifest("intfloat/e5-small-v2", task="classify")
    _apply_registry(m)
    assert m.query_prefix is None  # another task: not this entry
    m = manifest("someone/unknown")
    _apply_registry(m)
    assert m.query_prefix is None and m.document_prefix is None


def test_session_options_and_provider_fallback(caplog: pytest.LogCaptureFixture) -> None:
    import onnxruntime as ort

    from encapure.engine.backends.onnxruntime import resolve_providers, session_options

    so = session_options(Settings(graph_optimization="basic", memory_arena=False, workers=1, threads_per_worker=3))
    assert so.intra_op_num_threads == 3 and so.inter_op_num_threads == 1
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert so.enable_cpu_mem_arena is False
    assert session_options(Settings(workers=2, threads_per_worker=0)).intra_op_num_threads >= 1
    # Weight pre-packing: on unless switched off.
    key = "session.disable_prepacking"

    def prepack_off(settings: Settings) -> bool:
        try:
            return session_options(settings).get_session_config_entry(key) == "1"
        except RuntimeError:  # ORT: no such entry
            return False

    assert not prepack_off(Settings())
    assert prepack_off(Settings(prepacking=False))
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA; the fallback path cannot be shown")
    with caplog.at_level("WARNING"):
        assert resolve_providers(["cuda", "tensorrt", "openvino"]) == ["CPUExecutionProvider"]
    assert "not available" in caplog.text
    assert resolve_providers(["cpu"]) == ["CPUExecutionProvider"]


# --- the engine hands Hugging Face sources to an exporter; it never imports encapure.export ----------
def test_hf_sources_go_to_the_given_exporter(hf_reranker: Path, reranker_fp32_dir: Path) -> None:
    calls: list[tuple[str, dict[str, object]]] = []

    def exporter(source: str | Path, **kw: object) -> Path:
        calls.append((str(source), kw))
        return reranker_fp32_dir

    settings = Settings(precision="int4")
    model = load_model(hf_reranker, settings=settings, exporter=exporter, warmup=False)
    assert model.folder == reranker_fp32_dir and model.name == hf_reranker.name
    load_model("bge-reranker-v2-m3", settings=settings, exporter=exporter, precision="fp32", warmup=False)
    load_model("someone/some-model", settings=settings, exporter=exporter, max_length=64, warmup=False)
    assert [c[0] for c in calls] == [str(hf_reranker), "BAAI/bge-reranker-v2-m3", "someone/some-model"]
    assert calls[0][1] == {"settings": settings}  # precision then defaults to settings.precision
    assert calls[1][1]["precision"] == "fp32" and calls[2][1]["max_length"] == 64


def test_engine_imports_nothing_from_export() -> None:
    import ast
    import subprocess
    import sys

    engine = Path(__file__).resolve().parents[1] / "encapure" / "engine"
    for path in engine.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any(n.startswith("encapure.export") for n in names), f"{path.name} imports {names}"
    code = ("import sys, encapure.engine, encapure.engine.loading; "
            "print(sorted(m for m in sys.modules if m.startswith(('encapure.export', 'torch'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
