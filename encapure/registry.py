"""Known models: short names for hub ids, and the query/document prefixes their files do not say.

A Hugging Face config says the architecture and the label count, but not that e5 wants
``query: `` / ``passage: `` prefixes or that bge-en wants a retrieval instruction on queries only.
``load_model`` reads this table for two things: a short name or alias (``bge-reranker-v2-m3``)
resolves to its hub id, and an exported model of a known source gets these prefixes when its
manifest has none (never overriding the manifest, and only when the task matches). Everything
else (task, pooling, normalization, max length, dimension) comes from the model's own files at
export time. Unknown models work from their files alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from encapure.manifest import Task


@dataclass(frozen=True)
class ModelInfo:
    hub_id: str
    task: Task
    query_prefix: str | None = None
    document_prefix: str | None = None
    aliases: tuple[str, ...] = ()

    @property
    def short_name(self) -> str:
        return self.hub_id.split("/")[-1]


_BGE_EN_QUERY = "Represent this sentence for searching relevant passages: "

MODELS: tuple[ModelInfo, ...] = (
    # --- rerankers ---------------------------------------------------------------------------
    ModelInfo("BAAI/bge-reranker-v2-m3", "rerank"),  # the default reranker (XLM-R large)
    ModelInfo("BAAI/bge-reranker-base", "rerank"),
    ModelInfo("BAAI/bge-reranker-large", "rerank"),
    ModelInfo("cross-encoder/ms-marco-MiniLM-L-6-v2", "rerank", aliases=("ms-marco-MiniLM-L-6",)),
    ModelInfo("cross-encoder/ms-marco-MiniLM-L-12-v2", "rerank", aliases=("ms-marco-MiniLM-L-12",)),
    ModelInfo("mixedbread-ai/mxbai-rerank-xsmall-v1", "rerank", aliases=("mxbai-rerank-xsmall",)),
    ModelInfo("mixedbread-ai/mxbai-rerank-base-v1", "rerank", aliases=("mxbai-rerank-base",)),
    # LLM yes/no rerankers: the prompt template comes from the export (encapure/export/qwen3.py).
    ModelInfo("Qwen/Qwen3-Reranker-0.6B", "rerank"),
    # --- embedders ---------------------------------------------------------------------------
    ModelInfo("sentence-transformers/all-MiniLM-L6-v2", "embed"),
    ModelInfo("sentence-transformers/all-mpnet-base-v2", "embed"),
    ModelInfo("BAAI/bge-small-en-v1.5", "embed", query_prefix=_BGE_EN_QUERY),
    ModelInfo("BAAI/bge-base-en-v1.5", "embed", query_prefix=_BGE_EN_QUERY),
    ModelInfo("intfloat/e5-small-v2", "embed", "query: ", "passage: "),
    ModelInfo("intfloat/multilingual-e5-small", "embed", "query: ", "passage: "),
    ModelInfo("intfloat/multilingual-e5-base", "embed", "query: ", "passage: "),
    # Matryoshka (dimensions 64..768); needs trust_remote_code to export.
    ModelInfo("nomic-ai/nomic-embed-text-v1.5", "embed", query_prefix="search_query: ",
              document_prefix="search_document: "),
    ModelInfo("BAAI/bge-m3", "embed"),  # dense vectors only
    ModelInfo("Qwen/Qwen3-Embedding-0.6B", "embed"),  # last-token pooling; query instruction from the export
)

_BY_KEY: dict[str, ModelInfo] = {}
for _m in MODELS:
    for _k in (_m.hub_id, _m.short_name, *_m.aliases):
        _BY_KEY[_k.lower()] = _m


def lookup(name: str) -> ModelInfo | None:
    """The entry for a hub id, its short name or an alias (case-insensitive), else None."""
    return _BY_KEY.get(name.strip().lower())


def default_reranker() -> ModelInfo:
    info = lookup("BAAI/bge-reranker-v2-m3")
    assert info is not None
    return info
