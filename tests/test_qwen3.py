"""Qwen3-Reranker (a causal LM as a yes/no judge) and Qwen3-Embedding (last-token pooling).

The models are tiny and random (2 layers, hidden 64) but have the real Qwen3 vocabulary and
tokenizer from ../shared/models/qwen3-reranker-0.6b-arch. The references are the model cards'
own PyTorch code: the reranker's ``format_instruction`` / ``process_inputs`` (left padding, body
cut to ``max_length - len(prefix) - len(suffix)``) / ``compute_logits`` (softmax over the "no" and
"yes" logits at the last position), and the embedder's ``last_token_pool`` + L2 normalization.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import MODELS, need

from encapure import Embedder, Reranker
from encapure.errors import ExportError, InvalidInputError, UnsupportedModelError
from encapure.export import qwen3
from encapure.export.detect import detect
from encapure.export.parity import spearman
from encapure.server.testing import InProcessServer, ServerProcess
from encapure.settings import Settings

QWEN_ARCH = MODELS / "qwen3-reranker-0.6b-arch"
TINY = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "max_window_layers": 2,
        # Wider than the default 0.02 so that random weights give scores spread over (0, 1): with
        # near-equal scores a ranking comparison (int8 vs fp32) would measure only noise.
        "initializer_range": 0.2}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")
TEMPLATE = qwen3.QWEN3_RERANK_TEMPLATE
CUSTOM = "Given a recipe question, retrieve passages about cooking"
SHORT_MAX = 96  # a served max length short enough that the long document below is cut

QUERY = "What is the capital of France?"
DOCS = [
    "Paris is the capital and most populous city of France.",
    "Berlin is the capital of Germany.",
    "The Eiffel Tower is in Paris. " * 40,  # > SHORT_MAX tokens: truncated
    "Bananas are rich in potassium.",
    "France's capital, Paris, lies on the Seine.",
    "東京は日本の首都です。",
]


def _config(**extra: Any) -> Any:
    from transformers import Qwen3Config

    data = json.loads((need(QWEN_ARCH) / "config.json").read_text())
    data.update(TINY, **extra)
    return Qwen3Config(**data)


def _save(model: Any, folder: Path) -> Path:
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(QWEN_ARCH / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def tiny_reranker_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(_config()).eval()
    return _save(model, tmp_path_factory.mktemp("hf") / "Qwen3-Reranker-tiny")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def rr_fp32(tiny_reranker_src: Path, cache: Path) -> Reranker:
    """Detected from the folder's name alone: no task, no template given."""
    return Reranker.from_pretrained(tiny_reranker_src, precision="fp32", settings=Settings(cache_dir=cache))


@pytest.fixture(scope="module")
def rr_int8(tiny_reranker_src: Path, cache: Path) -> Reranker:
    return Reranker.from_pretrained(tiny_reranker_src, precision="int8", settings=Settings(cache_dir=cache))


def card_scores(src: Path, pairs: list[tuple[str, str]], instruction: str | None, max_length: int) -> np.ndarray:
    """The Qwen3-Reranker model card's scoring code, verbatim in substance."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(src), padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
    prefix = tokenizer.encode(TEMPLATE["prefix"], add_special_tokens=False)
    suffix = tokenizer.encode(TEMPLATE["suffix"], add_special_tokens=False)
    instr = instruction or TEMPLATE["instruction"]
    texts = [f"<Instruct>: {instr}\n<Query>: {q}\n<Document>: {d}" for q, d in pairs]
    inputs = tokenizer(texts, padding=False, truncation="longest_first", return_attention_mask=False,
                       max_length=max_length - len(prefix) - len(suffix))
    inputs["input_ids"] = [prefix + ids + suffix for ids in inputs["input_ids"]]
    batch = tokenizer.pad(inputs, padding=True, return_tensors="pt", max_length=max_length)
    with torch.no_grad():
        logits = model(**batch).logits[:, -1, :]
    two = torch.stack([logits[:, no], logits[:, yes]], dim=1)
    return torch.nn.functional.log_softmax(two, dim=1)[:, 1].exp().numpy()


# --- detection (JSON only) -------------------------------------------------------------------------
def test_detection_by_name_task_and_template() -> None:
    config = json.loads((need(QWEN_ARCH) / "config.json").read_text())
    assert detect(config, name="Qwen/Qwen3-Reranker-0.6B").task == "rerank"
    info = detect(config, name="/models/qwen3-reranker-4b")
    assert info.prompt_template == TEMPLATE and info.max_length == 8192 and info.score_activation == "sigmoid"
    assert detect(config, task="rerank", name="my-llm").task == "rerank"
    custom = {**TEMPLATE, "instruction": CUSTOM}
    assert detect(config, name="my-llm", template=custom).prompt_template == custom
    assert detect(config, name="x/Qwen3-Reranker-0.6B", max_length=1024).max_length == 1024
    emb = detect(config, name="Qwen/Qwen3-Embedding-0.6B")
    assert (emb.task, emb.pooling, emb.normalize) == ("embed", "last", True)
    assert emb.query_prefix == qwen3.QWEN3_EMBED_QUERY_PREFIX
    assert detect(config, task="embed", name="llm").pooling == "last"
    with pytest.raises(UnsupportedModelError, match="--task rerank"):
        detect(config, name="Qwen/Qwen3-0.6B")  # a plain LM: we do not guess
    with pytest.raises(ExportError, match="end with"):
        detect(config, template={**TEMPLATE, "body": "{document} {query}"})
    bert = {"model_type": "bert", "architectures": ["BertForSequenceClassification"], "num_labels": 1}
    with pytest.raises(UnsupportedModelError, match="template"):
        detect(bert, template=TEMPLATE)


# --- reranker: scores ------------------------------------------------------------------------------
def test_fp32_matches_model_card_yes_no_probabilities(rr_fp32: Reranker, tiny_reranker_src: Path) -> None:
    m = rr_fp32.model.manifest
    assert m.task == "rerank" and m.prompt_template == TEMPLATE and m.max_length == 8192
    assert m.output_name == "logits" and m.input_names == ["input_ids", "attention_mask"]
    parity = json.loads((rr_fp32.model.folder / "parity.json").read_text())
    assert parity["max_abs_diff"] < 1e-4 and parity["yes_no_ids"] == [9693, 2152]

    short = Reranker(_reload(rr_fp32, max_length=SHORT_MAX))
    pairs = [(QUERY, d) for d in DOCS]
    for instruction in (None, CUSTOM):
        ours = short.compute(QUERY, DOCS, instruction=instruction)
        assert ours.truncated == [False, False, True, False, False, False]
        assert max(ours.tokens) == SHORT_MAX
        ref = card_scores(tiny_reranker_src, pairs, instruction, SHORT_MAX)
        np.testing.assert_allclose(ours.scores, ref, atol=1e-4)
        assert float(np.ptp(ref)) > 0.05  # the pairs really score differently
    # The instruction is honoured: it changes the scores.
    assert not np.allclose(short.compute(QUERY, DOCS).scores, short.compute(QUERY, DOCS, instruction=CUSTOM).scores)
    # At the full 8192 window nothing is cut and the card agrees too.
    np.testing.assert_allclose(rr_fp32.compute(QUERY, DOCS).scores, card_scores(tiny_reranker_src, pairs, None, 8192),
                               atol=1e-4)


def _reload(rr: Reranker, **settings: Any) -> Any:
    from encapure.engine.loading import load_model

    return load_model(rr.model.folder, settings=Settings(**settings))


def test_batch_invariance(rr_fp32: Reranker, rr_int8: Reranker) -> None:
    for rr in (rr_fp32, rr_int8):
        together = rr.compute(QUERY, DOCS, instruction=CUSTOM).scores
        alone = np.array([rr.compute(QUERY, [d], instruction=CUSTOM).scores[0] for d in DOCS])
        np.testing.assert_allclose(alone, together, atol=1e-5)


def test_int8_keeps_the_ranking(rr_fp32: Reranker, rr_int8: Reranker) -> None:
    from encapure.export.parity import sample_inputs

    items, _ = sample_inputs("rerank")
    pairs = [(q or "?", d) for q, d in items] + [(QUERY, d) for d in DOCS]
    a, b = rr_fp32.score(pairs), rr_int8.score(pairs)
    rho = spearman(a, b)
    assert rho >= 0.95, rho
    assert rr_int8.model.manifest.precision == "int8"
    assert rr_int8.model.manifest.quantization["quantized_gathers"]  # the 151k x hidden table in int8 too


def test_int4_export_when_asked(tiny_reranker_src: Path, tmp_path: Path) -> None:
    """The int4 path: MatMulNBits + a 4-bit embedding table; the graph stays valid at opset 21
    (RMSNorm's ReduceMean keeps its axes as an input)."""
    from encapure.export import export_model

    result = export_model(tiny_reranker_src, tmp_path / "int4", precision="int4")
    assert result.manifest.quantization["MatMulNBits"] > 0
    assert result.parity["n_items"] >= 40 and result.parity["cosine"] > 0.9
    rr = Reranker.from_pretrained(tmp_path / "int4")
    assert len(rr.rerank(QUERY, DOCS)) == len(DOCS)


def test_instruction_and_limits_are_honoured_or_refused(rr_fp32: Reranker) -> None:
    with pytest.raises(InvalidInputError, match="windows"):
        rr_fp32.compute(QUERY, DOCS, long_documents="window")
    short = Reranker(_reload(rr_fp32, max_length=SHORT_MAX))
    with pytest.raises(InvalidInputError, match="longer than"):
        short.compute(QUERY, DOCS, truncate=False)
    with pytest.raises(InvalidInputError, match="no room for the document"):
        short.compute("word " * 200, ["d"])
    with pytest.raises(InvalidInputError, match="string"):
        rr_fp32.compute(QUERY, DOCS, instruction=3)  # type: ignore[arg-type]
    # Braces in user text are text, not template fields.
    assert rr_fp32.compute("{document} {query}", ["{instruction}"]).scores.shape == (1,)


def test_instruction_refused_by_a_model_without_template(tiny_xlmr_reranker_dir: Path) -> None:
    plain = Reranker.from_pretrained(tiny_xlmr_reranker_dir)
    assert plain.model.prompt_template is None
    with pytest.raises(InvalidInputError, match="takes no instruction"):
        plain.rerank("q", ["d"], instruction="anything")


# --- reranker: served ------------------------------------------------------------------------------
@pytest.mark.anyio
async def test_served_cohere_and_tei_shapes_with_and_without_instruction(
    rr_fp32: Reranker, tiny_xlmr_reranker_dir: Path
) -> None:
    from encapure.engine.loading import load_model

    plain = load_model(tiny_xlmr_reranker_dir)
    default = rr_fp32.compute(QUERY, DOCS).scores
    custom = rr_fp32.compute(QUERY, DOCS, instruction=CUSTOM).scores
    async with InProcessServer({"qwen": rr_fp32.model, "plain": plain}, Settings()) as srv:
        c = srv.client
        for path in ("/v1/rerank", "/v2/rerank"):
            for instruction, expected in ((None, default), (CUSTOM, custom)):
                body: dict[str, Any] = {"model": "qwen", "query": QUERY, "documents": DOCS}
                if instruction is not None:
                    body["instruction"] = instruction
                r = await c.post(path, json=body)
                assert r.status_code == 200, r.text
                got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
                np.testing.assert_allclose([got[i] for i in range(len(DOCS))], expected, atol=1e-6)
        for instruction, expected in ((None, default), (CUSTOM, custom)):  # TEI: texts in, bare list out
            body = {"model": "qwen", "query": QUERY, "texts": DOCS, "return_text": True}
            if instruction is not None:
                body["instruction"] = instruction
            r = await c.post("/rerank", json=body)
            assert r.status_code == 200, r.text
            rows = r.json()
            assert [x["index"] for x in rows] == list(np.argsort(-expected, kind="stable"))
            np.testing.assert_allclose([x["score"] for x in rows], np.sort(expected)[::-1], atol=1e-6)
            assert rows[0]["text"] == DOCS[rows[0]["index"]]
        # A field we accept is honoured or refused.
        for path, body in (("/v1/rerank", {"documents": ["d"]}), ("/rerank", {"texts": ["d"]})):
            r = await c.post(path, json={"model": "plain", "query": "q", "instruction": "x", **body})
            assert r.status_code == 400, r.text
            assert "instruction" in r.json()["error"]["message"]
        r = await c.post("/rerank", json={"model": "qwen", "query": QUERY, "texts": DOCS,
                                          "truncation_direction": "Left"})
        assert r.status_code == 400 and "Right" in r.text
        r = await c.post("/rerank", json={"model": "qwen", "query": QUERY, "documents": DOCS,
                                          "long_documents": "window"})
        assert r.status_code == 400


@pytest.mark.anyio
async def test_async_reranker_instruction(rr_fp32: Reranker) -> None:
    from encapure import AsyncReranker

    expected = rr_fp32.compute(QUERY, DOCS, instruction=CUSTOM).scores
    async with AsyncReranker(rr_fp32) as arr:
        ranked = await arr.rerank(QUERY, DOCS, instruction=CUSTOM)
        scores = await arr.score([(QUERY, d) for d in DOCS], instruction=CUSTOM)
    np.testing.assert_allclose([r.score for r in sorted(ranked, key=lambda r: r.index)], expected, atol=1e-6)
    np.testing.assert_allclose(scores, expected, atol=1e-6)


def test_encapure_serve_process(rr_fp32: Reranker) -> None:
    """``encapure serve --model <exported folder>``: the real process, the Jina/Cohere v1 shape."""
    import httpx

    with ServerProcess(["--model", str(rr_fp32.model.folder)]) as srv:
        r = httpx.post(f"{srv.url}/v1/rerank", json={"query": QUERY, "documents": DOCS[:3], "instruction": CUSTOM},
                       timeout=60)
        assert r.status_code == 200, r.text
        got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
        expected = rr_fp32.compute(QUERY, DOCS[:3], instruction=CUSTOM).scores
        np.testing.assert_allclose([got[i] for i in range(3)], expected, atol=1e-5)


# --- Qwen3-Embedding ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_embedder_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import Qwen3Model

    torch.manual_seed(1)
    config = _config()
    config.architectures = ["Qwen3ForCausalLM"]  # as Qwen3-Embedding's config.json says
    return _save(Qwen3Model(config).eval(), tmp_path_factory.mktemp("hf") / "Qwen3-Embedding-tiny")


def card_embeddings(src: Path, texts: list[str]) -> np.ndarray:
    """Qwen3-Embedding's model card: left padding, ``last_token_pool``, L2 normalization."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(src), padding_side="left")
    model = AutoModel.from_pretrained(str(src), dtype=torch.float32).eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=8192, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"]
    if bool((mask[:, -1].sum() == mask.shape[0]).item()):  # left padding: the last column is real
        pooled = hidden[:, -1]
    else:
        lengths = mask.sum(dim=1) - 1
        pooled = hidden[torch.arange(hidden.shape[0]), lengths]
    return torch.nn.functional.normalize(pooled, p=2, dim=1).numpy()


def test_qwen3_embedding_last_token_pooling_matches_model_card(tiny_embedder_src: Path, cache: Path) -> None:
    emb = Embedder.from_pretrained(tiny_embedder_src, precision="fp32", settings=Settings(cache_dir=cache))
    m = emb.model.manifest
    assert (m.task, m.pooling, m.normalize, m.max_length) == ("embed", "last", True, 8192)
    assert m.query_prefix == qwen3.QWEN3_EMBED_QUERY_PREFIX and m.document_prefix is None
    queries = ["What is the capital of China?", "Explain gravity"]
    docs = ["The capital of China is Beijing.", "Gravity is a force that attracts two bodies towards each other. " * 5,
            "ok"]
    prefixed = [qwen3.QWEN3_EMBED_QUERY_PREFIX + q for q in queries]
    np.testing.assert_allclose(emb.embed_query(queries), card_embeddings(tiny_embedder_src, prefixed), atol=1e-4)
    np.testing.assert_allclose(emb.embed_documents(docs), card_embeddings(tiny_embedder_src, docs), atol=1e-4)
    alone = np.stack([emb.embed(d) for d in docs])
    np.testing.assert_allclose(alone, emb.embed(docs), atol=1e-5)  # batch-mates change nothing


@pytest.mark.anyio
async def test_qwen3_embedding_served(tiny_embedder_src: Path, cache: Path) -> None:
    emb = Embedder.from_pretrained(tiny_embedder_src, precision="fp32", settings=Settings(cache_dir=cache))
    async with InProcessServer({"qe": emb.model}, Settings()) as srv:
        r = await srv.client.post("/v1/embeddings", json={"input": ["Explain gravity"], "input_type": "query"})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["data"][0]["embedding"], emb.embed_query("Explain gravity"), atol=1e-6)
