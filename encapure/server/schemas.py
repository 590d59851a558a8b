"""Wire schemas of the requests (pydantic: validation and OpenAPI docs).

Responses are built as plain dicts and serialized with orjson: per-item pydantic models on
score and embedding lists cost more than the rest of the HTTP layer put together.
Unknown fields are ignored so that clients sending newer options are not refused.
"""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field


class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class TextDocument(BaseModel):
    """A document given as an object; only ``text`` is read (Cohere v1, Jina)."""

    model_config = ConfigDict(extra="allow")
    text: str


Document = str | TextDocument


class RerankRequest(_Req):
    """Native rerank (``/rerank``)."""

    query: str = Field(min_length=1)
    documents: list[Document] = Field(validation_alias=AliasChoices("documents", "texts"))
    top_n: int | None = Field(default=None, ge=1, validation_alias=AliasChoices("top_n", "top_k"))
    return_documents: bool = Field(
        default=False, validation_alias=AliasChoices("return_documents", "return_text")
    )
    raw_scores: bool = False
    truncate: bool = True
    # A document longer than the model's window: cut it, score it by its best overlapping window,
    # or refuse it (400).
    long_documents: Literal["truncate", "window", "error"] = "truncate"
    model: str | None = None


class CohereV1RerankRequest(_Req):
    """Cohere v1 (and Jina) ``/v1/rerank``."""

    query: str = Field(min_length=1)
    documents: list[Document]
    model: str | None = None
    top_n: int | None = Field(default=None, ge=1)
    return_documents: bool = False
    rank_fields: list[str] | None = None
    max_chunks_per_doc: int | None = None


class CohereV2RerankRequest(_Req):
    """Cohere v2 ``/v2/rerank``."""

    query: str = Field(min_length=1)
    documents: list[Document]
    model: str | None = None
    top_n: int | None = Field(default=None, ge=1)
    max_tokens_per_doc: int | None = Field(default=None, ge=1)
    return_documents: bool = False


class OpenAIEmbeddingsRequest(_Req):
    """OpenAI ``/v1/embeddings``: text, texts, token ids or lists of token ids."""

    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None
    # Not OpenAI's, but what asymmetric models (e5, bge, nomic) need: which prefix to apply.
    input_type: Literal["query", "document", "passage", "search_query", "search_document"] | None = None


class TEIEmbedRequest(_Req):
    inputs: str | list[str]
    normalize: bool = True
    truncate: bool = True
    dimensions: int | None = Field(default=None, ge=1)
    prompt_name: str | None = None
    model: str | None = None


class TEIPredictRequest(_Req):
    """``inputs``: a text, a [text, text_pair], or a batch of either."""

    inputs: str | list[str] | list[list[str]]
    raw_scores: bool = False
    truncate: bool = True
    model: str | None = None


class TEITokenizeRequest(_Req):
    inputs: str | list[str]
    add_special_tokens: bool = True
    model: str | None = None
