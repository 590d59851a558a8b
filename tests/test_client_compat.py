"""Real client libraries, unmodified, against a real server: the drop-in promise for the clients
people already run (TEI, Infinity, vLLM, Cohere, OpenAI and the frameworks built on them).

The server is uvicorn in a thread (``ThreadedServer``) over stand-in models (``tests/fakes.py``):
what the clients see is the wire format, and the numbers they decode must be what the engine
computes for the same input. Each test is configured from one ``ClientConfig``; ``docs/clients.md``
is generated from those (``python tests/test_client_compat.py`` rewrites it, and
``test_clients_doc_is_current`` fails when it drifts). The libraries are the ``clients`` extra
(``pip install -e '.[clients]'``); a client that is not installed skips with the reason.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # for `python tests/test_client_compat.py`

from fakes import FakeSession, fake_model

from encapure.engine.model import OnnxModel
from encapure.manifest import Manifest
from encapure.server.testing import ThreadedServer
from encapure.settings import Settings

# litellm fetches its model price map from the internet at import unless told to use its own copy
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

KEY = "compat-key"
DOC = Path(__file__).resolve().parent.parent / "docs" / "clients.md"
QUERY = "What is the capital of France?"
DOCS = ["The cat sat on the mat.", "Paris is the capital of France.", "Berlin is in Germany."]
TEXTS = ["hello world", "Paris is the capital of France."]


@dataclass(frozen=True)
class ClientConfig:
    """How a client is pointed at Encapure: what the test runs and what docs/clients.md says."""

    name: str  # the client as its users know it
    package: str  # the PyPI package
    module: str  # imported to tell whether it is installed
    path: str  # appended to the server's URL to make the base URL the client is given
    setup: str  # the exact configuration, with {URL} the server's URL and {KEY} the API key
    note: str = ""


CONFIGS: dict[str, ClientConfig] = {
    c.name: c
    for c in [
        ClientConfig(
            "huggingface_hub InferenceClient", "huggingface_hub", "huggingface_hub", "",
            'InferenceClient(base_url="{URL}", api_key="{KEY}").feature_extraction(texts) / '
            ".sentence_similarity(source, others) / .text_classification(text)",
            "POST / answers by the request's shape: embeddings, similarity, or classification "
            "(`parameters` present) on a classifier or reranker",
        ),
        ClientConfig(
            "haystack HuggingFaceTEIRanker", "huggingface-api-haystack", "haystack_integrations", "",
            'HuggingFaceTEIRanker(url="{URL}", token=Secret.from_token("{KEY}"), top_k=2)',
            "posts TEI's `texts`: answered with TEI's bare list",
        ),
        ClientConfig(
            "haystack HuggingFaceAPITextEmbedder / DocumentEmbedder (TEI)", "huggingface-api-haystack",
            "haystack_integrations", "",
            'HuggingFaceAPITextEmbedder(api_type="text_embeddings_inference", api_params={{"url": "{URL}"}}, '
            'token=Secret.from_token("{KEY}"))',
            "goes through huggingface_hub, which posts to `POST /`",
        ),
        ClientConfig(
            "llama-index TextEmbeddingInference (rerank)", "llama-index-postprocessor-tei-rerank",
            "llama_index.postprocessor.tei_rerank", "",
            'TextEmbeddingInference(base_url="{URL}", top_n=2, auth_token="Bearer {KEY}")',
            "its `auth_token` is sent as the whole Authorization header: include `Bearer `",
        ),
        ClientConfig(
            "llama-index TextEmbeddingsInference (embeddings)", "llama-index-embeddings-text-embeddings-inference",
            "llama_index.embeddings.text_embeddings_inference", "",
            'TextEmbeddingsInference(model_name="any", base_url="{URL}", auth_token="{KEY}")',
        ),
        ClientConfig(
            "infinity_client", "infinity-client", "infinity_client", "",
            'Client(base_url="{URL}", headers={{"Authorization": "Bearer {KEY}"}}); rerank.sync(client=..., '
            "body=RerankInput(query=..., documents=..., model=...)), embeddings.sync(client=..., "
            "body=OpenAIEmbeddingInputText(input_=texts)), models.sync(client=...)",
            "needs httpx<0.28 by its metadata; works with 0.28 (install it with --no-deps)",
        ),
        ClientConfig(
            "langchain-community InfinityRerank", "langchain-community", "langchain_community", "",
            'InfinityRerank(client=infinity_client.Client(base_url="{URL}", headers=...), model="any", top_n=2)',
        ),
        ClientConfig(
            "langchain-openai OpenAIEmbeddings", "langchain-openai", "langchain_openai", "/v1",
            'OpenAIEmbeddings(base_url="{URL}/v1", api_key="{KEY}", model="any", check_embedding_ctx_length=False)',
            "check_embedding_ctx_length=False: otherwise it sends tiktoken (cl100k) ids, not text",
        ),
        ClientConfig(
            "langchain-cohere CohereRerank", "langchain-cohere", "langchain_cohere", "",
            'CohereRerank(base_url="{URL}", cohere_api_key="{KEY}", model="rerank-english-v3.0", top_n=2)',
            "pins cohere<6 but works with cohere 7: install it with --no-deps (as the Makefile does)",
        ),
        ClientConfig(
            "litellm cohere/", "litellm", "litellm", "",
            'litellm.rerank(model="cohere/rerank-english-v3.0", api_base="{URL}", api_key="{KEY}", ...)',
        ),
        ClientConfig(
            "litellm jina_ai/", "litellm", "litellm", "/v1",
            'litellm.rerank(model="jina_ai/jina-reranker-v2-base-multilingual", api_base="{URL}/v1", api_key="{KEY}", ...)',
        ),
        ClientConfig(
            "litellm infinity/", "litellm", "litellm", "",
            'litellm.rerank(model="infinity/any", api_base="{URL}", api_key="{KEY}", ...)',
        ),
        ClientConfig(
            "litellm hosted_vllm/", "litellm", "litellm", "/v1",
            'litellm.rerank(model="hosted_vllm/any", api_base="{URL}/v1", api_key="{KEY}", ...)',
            "the same api_base as for vLLM's OpenAI routes: it posts to /v1/rerank, whose documents are "
            "`{text}` objects as vLLM's; without /v1 it posts to /rerank, whose documents are strings as "
            "Infinity's, which this provider cannot read",
        ),
        ClientConfig(
            "litellm huggingface/", "litellm", "litellm", "",
            'litellm.rerank(model="huggingface/any", api_base="{URL}", api_key="{KEY}", ...)',
        ),
        ClientConfig(
            "litellm openai/ (embeddings)", "litellm", "litellm", "/v1",
            'litellm.embedding(model="openai/text-embedding-3-small", api_base="{URL}/v1", api_key="{KEY}", '
            "input=texts)",
        ),
    ]
}


def need(name: str) -> ClientConfig:
    """The client's config, or a skip naming what is missing."""
    cfg = CONFIGS[name]
    try:
        importlib.import_module(cfg.module)
    except Exception as e:  # not installed, or broken on this Python
        pytest.skip(f"{cfg.name}: `pip install {cfg.package}` ({cfg.note or 'the clients extra'}) "
                    f"({type(e).__name__}: {e})")
    return cfg


def classifier(name: str) -> OnnxModel:
    """A two-label classifier over the stand-in session (the hub's text-classification task)."""
    base = fake_model("rerank", name=name)
    manifest = Manifest(
        task="classify", precision="fp32", max_length=256, input_names=list(base.manifest.input_names),
        output_name="logits", output_kind="logits", labels=["negative", "positive"],
        score_activation="softmax", source="fake-classify", architecture="FakeSession", model_type="bert",
    )
    session = FakeSession("logits", vocab_size=base.vocab_size, dim=2, seed=3)
    tok = base.folder / "tokenizer.json"
    return OnnxModel(base.folder, manifest, name=name, tokenizer_path=tok, session=session)


@pytest.fixture(autouse=True)
def _hub_client_online(monkeypatch: pytest.MonkeyPatch) -> None:
    """Other test modules set HF_HUB_OFFLINE=1 to load local models, and huggingface_hub reads it
    once, at import: its clients would then refuse even 127.0.0.1. These talk to our server only."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture(scope="module")
def engine() -> dict[str, OnnxModel]:
    return {"rr": fake_model("rerank", name="rr"), "emb": fake_model("embed", name="emb", dim=64)}


@pytest.fixture(scope="module")
def server(engine: dict[str, OnnxModel]) -> Iterator[ThreadedServer]:
    with ThreadedServer(engine, Settings(api_key=KEY)) as srv:
        yield srv


@pytest.fixture(scope="module")
def classify_server() -> Iterator[tuple[ThreadedServer, OnnxModel]]:
    model = classifier("clf")
    with ThreadedServer({"clf": model}, Settings(api_key=KEY)) as srv:
        yield srv, model


def embed(model: Any, texts: list[str], normalize: bool | None = None) -> np.ndarray:
    p = model.prepare_texts(texts, normalize=normalize)
    return np.asarray(model.finish(p, model.forward(p.units)).embeddings)


def scores(model: Any, query: str, docs: list[str]) -> np.ndarray:
    p = model.prepare_pairs(query, docs)
    return np.asarray(model.finish(p, model.forward(p.units)).scores)


def base_url(server: ThreadedServer, cfg: ClientConfig) -> str:
    return server.url + cfg.path


# --- huggingface_hub ------------------------------------------------------------------------------
def test_huggingface_hub_inference_client(server: ThreadedServer, engine: dict[str, Any]) -> None:
    cfg = need("huggingface_hub InferenceClient")
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=base_url(server, cfg), api_key=KEY)
    got = np.asarray(client.feature_extraction(TEXTS))
    np.testing.assert_allclose(got, embed(engine["emb"], TEXTS), atol=1e-5)
    one = np.asarray(client.feature_extraction(TEXTS[0]))
    np.testing.assert_allclose(one.reshape(-1), embed(engine["emb"], TEXTS[:1])[0], atol=1e-5)
    sims = client.sentence_similarity("hello world", ["hello world", "Quantum chromodynamics"])
    v = embed(engine["emb"], ["hello world", "hello world", "Quantum chromodynamics"])
    np.testing.assert_allclose(sims, v[1:] @ v[0], atol=1e-5)


def test_huggingface_hub_text_classification(classify_server: tuple[ThreadedServer, OnnxModel]) -> None:
    cfg = need("huggingface_hub InferenceClient")
    from huggingface_hub import InferenceClient

    server, model = classify_server
    client = InferenceClient(base_url=base_url(server, cfg), api_key=KEY)
    out = client.text_classification("I love this movie")
    p = model.prepare_texts(["I love this movie"])
    expected = model.finish(p, model.forward(p.units)).top()[0]  # type: ignore[union-attr]
    assert [x.label for x in out] == [lab for lab, _ in expected]
    np.testing.assert_allclose([x.score for x in out], [s for _, s in expected], atol=1e-6)
    assert len(client.text_classification("I love this movie", top_k=1)) == 1


# --- haystack ---------------------------------------------------------------------------------------
def test_haystack_tei_ranker(server: ThreadedServer, engine: dict[str, Any]) -> None:
    cfg = need("haystack HuggingFaceTEIRanker")
    from haystack import Document
    from haystack.utils import Secret
    from haystack_integrations.components.rankers.huggingface_api import HuggingFaceTEIRanker

    ranker = HuggingFaceTEIRanker(url=base_url(server, cfg), token=Secret.from_token(KEY), top_k=2)
    out = ranker.run(query=QUERY, documents=[Document(content=d) for d in DOCS])["documents"]
    expected = scores(engine["rr"], QUERY, DOCS)
    order = np.argsort(-expected, kind="stable")[:2]
    assert [d.content for d in out] == [DOCS[i] for i in order]
    np.testing.assert_allclose([d.score for d in out], expected[order], atol=1e-5)


def test_haystack_tei_embedders(server: ThreadedServer, engine: dict[str, Any]) -> None:
    cfg = need("haystack HuggingFaceAPITextEmbedder / DocumentEmbedder (TEI)")
    from haystack import Document
    from haystack.utils import Secret
    from haystack_integrations.components.embedders.huggingface_api import (
        HuggingFaceAPIDocumentEmbedder,
        HuggingFaceAPITextEmbedder,
    )

    params = {"url": base_url(server, cfg)}
    text = HuggingFaceAPITextEmbedder(api_type="text_embeddings_inference", api_params=params,
                                      token=Secret.from_token(KEY))
    got = text.run(text=TEXTS[0])["embedding"]
    # the embedders send TEI's normalize=false by default, and the server honours it
    np.testing.assert_allclose(got, embed(engine["emb"], TEXTS[:1], normalize=False)[0], atol=1e-5)
    docs = HuggingFaceAPIDocumentEmbedder(api_type="text_embeddings_inference", api_params=params,
                                          token=Secret.from_token(KEY))
    out = docs.run(documents=[Document(content=t) for t in TEXTS])["documents"]
    np.testing.assert_allclose([d.embedding for d in out], embed(engine["emb"], TEXTS, normalize=False), atol=1e-5)


# --- llama-index -----------------------------------------------------------------------------------
def test_llama_index_tei_rerank(server: ThreadedServer, engine: dict[str, Any]) -> None:
    cfg = need("llama-index TextEmbeddingInference (rerank)")
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
    from llama_index.postprocessor.tei_rerank import TextEmbeddingInference

    rerank = TextEmbeddingInference(base_url=base_url(server, cfg), top_n=2, auth_token=f"Bearer {KEY}")
    nodes = [NodeWithScore(node=TextNode(text=d), score=0.0) for d in DOCS]
    out = rerank.postprocess_nodes(nodes, QueryBundle(QUERY))
    expected = scores(engine["rr"], QUERY, DOCS)
    order = np.argsort(-expected, kind="stable")[:2]
    assert [n.node.get_content() for n in out] == [DOCS[i] for i in order]
    np.testing.assert_allclose([n.score for n in out], expected[order], atol=1e-5)


def test_llama_index_tei_embeddings(server: ThreadedServer, engine: dict[str, Any]) -> None:
    cfg = need("llama-index TextEmbeddingsInference (embeddings)")
    from llama_index.embeddings.text_embeddings_inference import TextEmbeddingsInference

    emb = TextEmbeddingsInference(model_name="any", base_url=base_url(server, cfg), auth_token=KEY)
    np.testing.assert_allclose(emb.get_text_embedding_batch(TEXTS), embed(engine["emb"], TEXTS), atol=1e-5)
    np.testing.assert_allclose(emb.get_query_embedding(TEXTS[0]), embed(engine["emb"], TEXTS[:1])[0], atol=1e-5)


# --- Infinity clients --------------------------------------------------------------------------------
def test_infinity_client_rerank(server: ThreadedServer, engine: dict[str, Any]) -> None:
    cfg = need("infinity_client")
    from infinity_client import Client
    from infinity_client.api.default import rerank
    from infinity_client.models import RerankInput

    client = Client(base_url=base_url(server, cfg), headers={"Authorization": f"Bearer {KEY}"})
    out = rerank.sync(client=client, body=RerankInput(query=QUERY, documents=DOCS, model="any",
                                                      return_documents=True))
    assert out is not None and not hasattr(out, "detail"), out
    expected = scores(engine["rr"], QUERY, DOCS)
    got = {r.index: r.relevance_score for r in out.results}  # type: ignore[union-attr]
    np.testing.assert_allclose([got[i] for i in range(len(DOCS))], expected, atol=1e-5)
    assert all(r.document == DOCS[r.index] for r in out.results)  # type: ignore[union-attr]
    assert out.model == "rr" and out.usage.prompt_tokens > 0  # type: ignore[union-attr]


def test_infinity_client_embeddings(server: ThreadedServer, engine: dict[str, Any]) -> None:
    cfg = need("infinity_client")
    from infinity_client import Client
    from infinity_client.api.default import embeddings
    from infinity_client.models import OpenAIEmbeddingInputText

    client = Client(base_url=base_url(server, cfg), headers={"Authorization": f"Bearer {KEY}"})
    out = embeddings.sync(client=client, body=OpenAIEmbeddingInputText(input_=TEXTS))  # sends dimensions=0
    assert out is not None and hasattr(out, "data"), out
    got = [d.embedding for d in out.data]  # type: ignore[union-attr]
    np.testing.assert_allclose(got, embed(engine["emb"], TEXTS), atol=1e-5)


def test_infinity_client_models(server: ThreadedServer) -> None:
    cfg = need("infinity_client")
    from infinity_client import Client
    from infinity_client.api.default import models

    client = Client(base_url=base_url(server, cfg), headers={"Authorization": f"Bearer {KEY}"})
    out = models.sync(client=client)
    assert out is not None and not hasattr(out, "detail"), out
    assert {m.id: m.capabilities for m in out.data} == {"rr": ["rerank"], "emb": ["embed"]}  # type: ignore[union-attr]


def test_langchain_infinity_rerank(server: ThreadedServer, engine: dict[str, Any]) -> None:
    cfg = need("langchain-community InfinityRerank")
    need("infinity_client")
    from infinity_client import Client
    from langchain_community.document_compressors.infinity_rerank import InfinityRerank
    from langchain_core.documents import Document

    client = Client(base_url=base_url(server, cfg), headers={"Authorization": f"Bearer {KEY}"})
    rerank = InfinityRerank(client=client, model="any", top_n=2)
    out = rerank.compress_documents([Document(page_content=d) for d in DOCS], QUERY)
    expected = scores(engine["rr"], QUERY, DOCS)
    order = np.argsort(-expected, kind="stable")[:2]
    assert [d.page_content for d in out] == [DOCS[i] for i in order]
    np.testing.assert_allclose([d.metadata["relevance_score"] for d in out], expected[order], atol=1e-5)


# --- langchain-openai -----------------------------------------------------------------------------------
def test_langchain_openai_embeddings(server: ThreadedServer, engine: dict[str, Any]) -> None:
    cfg = need("langchain-openai OpenAIEmbeddings")
    from langchain_openai import OpenAIEmbeddings

    emb = OpenAIEmbeddings(base_url=base_url(server, cfg), api_key=KEY, model="any",  # type: ignore[arg-type]
                           check_embedding_ctx_length=False)
    np.testing.assert_allclose(emb.embed_documents(TEXTS), embed(engine["emb"], TEXTS), atol=1e-5)
    np.testing.assert_allclose(emb.embed_query(TEXTS[0]), embed(engine["emb"], TEXTS[:1])[0], atol=1e-5)


def test_langchain_cohere_rerank(server: ThreadedServer, engine: dict[str, Any]) -> None:
    cfg = need("langchain-cohere CohereRerank")
    from langchain_cohere import CohereRerank
    from langchain_core.documents import Document

    rerank = CohereRerank(base_url=base_url(server, cfg), cohere_api_key=KEY,  # type: ignore[call-arg]
                          model="rerank-english-v3.0", top_n=2)
    out = rerank.compress_documents([Document(page_content=d) for d in DOCS], QUERY)
    expected = scores(engine["rr"], QUERY, DOCS)
    order = np.argsort(-expected, kind="stable")[:2]
    assert [d.page_content for d in out] == [DOCS[i] for i in order]
    np.testing.assert_allclose([d.metadata["relevance_score"] for d in out], expected[order], atol=1e-5)


# --- litellm -----------------------------------------------------------------------------------------
LITELLM_RERANK = {
    "litellm cohere/": "cohere/rerank-english-v3.0",
    "litellm jina_ai/": "jina_ai/jina-reranker-v2-base-multilingual",
    "litellm infinity/": "infinity/any",
    "litellm hosted_vllm/": "hosted_vllm/any",
    "litellm huggingface/": "huggingface/any",
}


@pytest.mark.parametrize("name", list(LITELLM_RERANK))
def test_litellm_rerank(server: ThreadedServer, engine: dict[str, Any], name: str) -> None:
    cfg = need(name)
    import litellm

    out = litellm.rerank(model=LITELLM_RERANK[name], query=QUERY, documents=DOCS, top_n=2,
                         return_documents=True, api_base=base_url(server, cfg), api_key=KEY)
    expected = scores(engine["rr"], QUERY, DOCS)
    order = np.argsort(-expected, kind="stable")[:2]
    assert [r["index"] for r in out.results] == order.tolist()
    np.testing.assert_allclose([r["relevance_score"] for r in out.results], expected[order], atol=1e-5)
    for r in out.results:  # each provider reads the document in its own server's shape
        if r.get("document") is not None:
            assert r["document"]["text"] == DOCS[r["index"]], (name, r)


def test_litellm_openai_embeddings(server: ThreadedServer, engine: dict[str, Any]) -> None:
    cfg = need("litellm openai/ (embeddings)")
    import litellm

    out = litellm.embedding(model="openai/text-embedding-3-small", input=TEXTS, api_base=base_url(server, cfg),
                            api_key=KEY)
    np.testing.assert_allclose([d["embedding"] for d in out.data], embed(engine["emb"], TEXTS), atol=1e-5)


# --- the doc ---------------------------------------------------------------------------------------
def clients_markdown() -> str:
    lines = [
        "# Clients",
        "",
        "Client libraries that work with Encapure unmodified, and how each is pointed at it. Generated",
        "from `tests/test_client_compat.py`, which runs every one of them against a real server",
        "(`python tests/test_client_compat.py` rewrites this file; a test fails when it drifts).",
        "`URL` is the server's address (`http://127.0.0.1:8000`), `KEY` its `--api-key` (any",
        "non-empty string when the server has none). Install them all with `pip install -e '.[clients]'`.",
        "",
        "A request naming a model the server does not have is served by the one loaded model that can",
        "answer it (the answer names that model), so the clients' hard-coded model names work;",
        "`--strict-model-names` turns that off.",
        "",
        "| client | package | base URL | configuration | note |",
        "|---|---|---|---|---|",
    ]
    for c in CONFIGS.values():
        setup = c.setup.replace("{URL}", "URL").replace("{KEY}", "KEY").replace("{{", "{").replace("}}", "}")
        lines.append(f"| {c.name} | `{c.package}` | `URL{c.path}` | `{setup}` | {c.note} |")
    lines += [
        "",
        "The `cohere` (v1 and v2 clients) and `openai` SDKs themselves are tested in `tests/test_clients.py`:",
        "`cohere.Client(base_url=URL, api_key=KEY)`, `cohere.ClientV2(base_url=URL, api_key=KEY)`,",
        "`openai.OpenAI(base_url=URL/v1, api_key=KEY)`.",
        "",
        "Not covered: `langchain-huggingface`. From 1.0 its `HuggingFaceEndpointEmbeddings` refuses a URL",
        "(`model must be a HuggingFace repo ID, not a URL`), so it cannot reach any self-hosted server,",
        "TEI included (tried with 1.2.3 and huggingface_hub 2.4). 0.3.x takes `model=URL` and posts to",
        "`POST /` through `huggingface_hub`, which the suite drives directly, but it needs",
        "`langchain-core<1`, which would downgrade the other langchain clients.",
        "",
    ]
    return "\n".join(lines)


def test_clients_doc_is_current() -> None:
    assert DOC.read_text(encoding="utf-8") == clients_markdown(), (
        "docs/clients.md drifted from tests/test_client_compat.py: run `python tests/test_client_compat.py`"
    )


if __name__ == "__main__":
    DOC.write_text(clients_markdown(), encoding="utf-8")
    print(f"wrote {DOC}")
