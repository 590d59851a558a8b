"""Wire schemas of the requests (pydantic: validation and OpenAPI docs).

Responses are built as plain dicts and serialized with orjson: per-item pydantic models on
score and embedding lists cost more than the rest of the HTTP layer put together.
Unknown fields are ignored so that clients sending newer options are not refused; every field
declared here is either honoured or refused with 400, never silently dropped.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator


class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class TextDocument(BaseModel):
    """A document given as an object. ``text`` is what is scored, unless Cohere v1's
    ``rank_fields`` names other fields to score (then ``text`` may be absent)."""

    model_config = ConfigDict(extra="allow")
    text: str | None = None


Document = str | TextDocument

# TEI spells the side "Left"/"Right"; lower case is accepted too.
TruncationDirection = Literal["Left", "Right", "left", "right"]


class RerankRequest(_Req):
    """``/rerank``: the native shape (``documents``), or TEI's (``texts``: then the answer is TEI's
    bare, score-sorted list of ``{"index", "score", "text"?}``). Infinity posts the native shape."""

    query: str = Field(min_length=1)
    documents: list[Document] | None = None
    texts: list[str] | None = None
    top_n: int | None = Field(default=None, ge=1, validation_alias=AliasChoices("top_n", "top_k"))
    return_documents: bool = Field(
        default=False, validation_alias=AliasChoices("return_documents", "return_text")
    )
    raw_scores: bool = False
    truncate: bool | None = True  # TEI sends null for "the server's default" (= true)
    truncation_direction: TruncationDirection | None = None
    # A document longer than the model's window: cut it, score it by its best overlapping window,
    # or refuse it (400).
    long_documents: Literal["truncate", "window", "error"] = "truncate"
    # Instruction-following rerankers (Qwen3-Reranker): the task statement in their prompt (default:
    # the model card's). A model without a prompt template refuses it with 400.
    instruction: str | None = None
    model: str | None = None

    @model_validator(mode="after")
    def _one_list(self) -> RerankRequest:
        if (self.documents is None) == (self.texts is None):
            raise ValueError("give the documents as `documents` (native) or `texts` (TEI), exactly one of them")
        return self


class CohereV1RerankRequest(_Req):
    """Cohere v1 (and Jina, vLLM, Infinity) ``/v1/rerank``."""

    query: str = Field(min_length=1)
    documents: list[Document]
    model: str | None = None
    top_n: int | None = Field(default=None, ge=1)
    return_documents: bool = False
    rank_fields: list[str] | None = Field(default=None, min_length=1)
    max_chunks_per_doc: int | None = Field(default=None, ge=1)
    raw_scores: bool = False  # Infinity's
    # Instruction-following rerankers (Qwen3-Reranker): the task statement in their prompt (default:
    # the model card's). A model without a prompt template refuses it with 400.
    instruction: str | None = None


class CohereV2RerankRequest(_Req):
    """Cohere v2 ``/v2/rerank``."""

    query: str = Field(min_length=1)
    documents: list[Document]
    model: str | None = None
    top_n: int | None = Field(default=None, ge=1)
    max_tokens_per_doc: int | None = Field(default=None, ge=1)
    return_documents: bool = False
    # Instruction-following rerankers (Qwen3-Reranker): the task statement in their prompt (default:
    # the model card's). A model without a prompt template refuses it with 400.
    instruction: str | None = None


TokenIds = list[int]


class OpenAIEmbeddingsRequest(_Req):
    """OpenAI ``/v1/embeddings``: text, texts, token ids or lists of token ids."""

    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    # 0 is Infinity's "all of them" (its client sends 0 by default)
    dimensions: int | None = Field(default=None, ge=0)
    # An opaque end-user id for the provider's abuse monitoring: written to the request's log line.
    user: str | None = None
    # Infinity's: only text is embedded here (an image or audio URL must not be embedded as text)
    modality: Literal["text"] | None = None
    # Not OpenAI's, but what asymmetric models (e5, bge, nomic) need: which prefix to apply.
    input_type: Literal["query", "document", "passage", "search_query", "search_document"] | None = None


class TEIEmbedRequest(_Req):
    """TEI ``/embed``: a text, token ids, or a list mixing texts and lists of token ids."""

    inputs: str | list[int] | list[str | list[int]]
    normalize: bool = True
    truncate: bool | None = True
    truncation_direction: TruncationDirection | None = None
    dimensions: int | None = Field(default=None, ge=1)
    prompt_name: str | None = None
    model: str | None = None


class TEIPredictRequest(_Req):
    """``inputs``: a text, a [text, text_pair], or a batch of either."""

    inputs: str | list[str] | list[str | list[str]]
    raw_scores: bool = False
    truncate: bool | None = True
    truncation_direction: TruncationDirection | None = None
    model: str | None = None


class TEITokenizeRequest(_Req):
    inputs: str | list[str]
    add_special_tokens: bool = True
    model: str | None = None


class TEIDecodeRequest(_Req):
    """TEI ``/decode``: token ids back to text."""

    ids: list[int] | list[list[int]]
    skip_special_tokens: bool = True
    model: str | None = None


class SimilarityInputs(BaseModel):
    source_sentence: str
    sentences: list[str]


class SimilarityParameters(BaseModel):
    model_config = ConfigDict(extra="ignore")
    truncate: bool | None = True
    truncation_direction: TruncationDirection | None = None
    prompt_name: str | None = None


class TEISimilarityRequest(_Req):
    """TEI ``/similarity`` (the hub's sentence-similarity task): cosine of each sentence to the source."""

    inputs: SimilarityInputs
    parameters: SimilarityParameters | None = None
    model: str | None = None


def describe_keys(body: Any) -> str:
    """For an error message: the top-level keys a request sent."""
    return ", ".join(sorted(body)) if isinstance(body, dict) else type(body).__name__


class TEIEmbedAllRequest(_Req):
    """TEI ``/embed_all``: per-token vectors of each input (a text, token ids, or a mixed list).
    ``prompt_name`` ``query`` or ``document``/``passage`` picks how a ColBERT model encodes the texts
    (documents when absent) and, on other embedding models, adds the model's prefix."""

    inputs: str | list[int] | list[str | list[int]]
    truncate: bool | None = True
    truncation_direction: TruncationDirection | None = None
    prompt_name: str | None = None
    model: str | None = None


class MultiVectorRequest(_Req):
    """``/embed_multivector``: token vectors per text; ``kind`` says query or document (ColBERT models
    encode them differently and need it)."""

    input: str | list[str] = Field(validation_alias=AliasChoices("input", "texts", "inputs"))
    kind: Literal["query", "document"] | None = None
    truncate: bool | None = True
    model: str | None = None
