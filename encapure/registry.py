"""Known models and the settings their config files cannot tell us.

A Hugging Face config says the architecture and the label count, but not that e5 wants
``query: `` / ``passage: `` prefixes, that bge-en wants a retrieval instruction on queries only,
or that a reranker was trained at 512 tokens. These entries fill that gap for ``from_pretrained``
and the server; unknown models still work from their config alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from encapure.manifest import Pooling, Task


@dataclass(frozen=True)
class ModelInfo:
    hub_id: str
    task: Task
    max_length: int
    pooling: Pooling | None = None  # embed only
    normalize: bool = False
    query_prefix: str | None = None
    document_prefix: str | None = None
    aliases: tuple[str, ...] = field(default_factory=tuple)
    embedding_dim: int | None = None
    multilingual: bool = False
    notes: str = ""

    @property
    def short_name(self) -> str:
        return self.hub_id.split("/")[-1]


_BGE_EN_QUERY = "Represent this sentence for searching relevant passages: "

MODELS: tuple[ModelInfo, ...] = (
    # --- rerankers ---------------------------------------------------------------------------
    ModelInfo("BAAI/bge-reranker-v2-m3", "rerank", 8192, multilingual=True,
              notes="default reranker; XLM-R large; 512 is the usual serving limit"),
    ModelInfo("BAAI/bge-reranker-base", "rerank", 512, multilingual=True),
    ModelInfo("BAAI/bge-reranker-large", "rerank", 512, multilingual=True),
    ModelInfo("cross-encoder/ms-marco-MiniLM-L-6-v2", "rerank", 512, aliases=("ms-marco-MiniLM-L-6",)),
    ModelInfo("cross-encoder/ms-marco-MiniLM-L-12-v2", "rerank", 512, aliases=("ms-marco-MiniLM-L-12",)),
    ModelInfo("mixedbread-ai/mxbai-rerank-xsmall-v1", "rerank", 512, aliases=("mxbai-rerank-xsmall",)),
    ModelInfo("mixedbread-ai/mxbai-rerank-base-v1", "rerank", 512, aliases=("mxbai-rerank-base",)),
    # --- embedders ---------------------------------------------------------------------------
    ModelInfo("sentence-transformers/all-MiniLM-L6-v2", "embed", 256, "mean", True, embedding_dim=384),
    ModelInfo("sentence-transformers/all-mpnet-base-v2", "embed", 384, "mean", True, embedding_dim=768),
    ModelInfo("BAAI/bge-small-en-v1.5", "embed", 512, "cls", True, query_prefix=_BGE_EN_QUERY,
              embedding_dim=384),
    ModelInfo("BAAI/bge-base-en-v1.5", "embed", 512, "cls", True, query_prefix=_BGE_EN_QUERY,
              embedding_dim=768),
    ModelInfo("intfloat/e5-small-v2", "embed", 512, "mean", True, query_prefix="query: ",
              document_prefix="passage: ", embedding_dim=384),
    ModelInfo("intfloat/multilingual-e5-small", "embed", 512, "mean", True, query_prefix="query: ",
              document_prefix="passage: ", embedding_dim=384, multilingual=True),
    ModelInfo("intfloat/multilingual-e5-base", "embed", 512, "mean", True, query_prefix="query: ",
              document_prefix="passage: ", embedding_dim=768, multilingual=True),
    ModelInfo("nomic-ai/nomic-embed-text-v1.5", "embed", 8192, "mean", True,
              query_prefix="search_query: ", document_prefix="search_document: ", embedding_dim=768,
              notes="Matryoshka: dimensions 64..768; needs trust_remote_code to export"),
    ModelInfo("BAAI/bge-m3", "embed", 8192, "cls", True, embedding_dim=1024, multilingual=True,
              notes="dense vectors only"),
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
