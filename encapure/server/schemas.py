"""Wire schemas of the requests (pydantic: validation and OpenAPI docs).

Responses are built as plain dicts and serialized with orjson: per-item pydantic models on
score and embedding lists cost more than the rest of the HTTP layer put together.
Unknown fields are ignored so that clients sending newer options are not refused; every field
declared here is either honoured or refused with 400, never silently dropped.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    RootModel,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

# Strict: a field declared ``bool`` takes true/false, not 0 or "yes"; an ``int`` takes no float or
# string. What the schema says is what is accepted, so the OpenAPI document does not lie.
_STRICT = ConfigDict(strict=True)


def _whole(value: Any) -> Any:
    """JSON Schema's ``integer`` includes 3.0: take it as 3 (strict mode alone would refuse it)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Int = Annotated[int, BeforeValidator(_whole)]


class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True, strict=True)


class TextDocument(BaseModel):
    """A document given as an object: ``text`` is what is scored; other fields are echoed back
    with ``return_documents``."""

    model_config = ConfigDict(extra="allow", strict=True)
    text: str


class FieldsDocument(BaseModel):
    """Cohere v1's document object: ``text`` is scored, unless ``rank_fields`` names the fields to
    score (then ``text`` may be absent)."""

    model_config = ConfigDict(extra="allow", strict=True)
    text: str | None = None


Document = str | TextDocument | FieldsDocument

# TEI spells the side "Left"/"Right"; lower case is accepted too.
TruncationDirection = Literal["Left", "Right", "left", "right"]


class RerankRequest(_Req):
    """``/rerank``: the native shape (``documents``), or TEI's (``texts``: then the answer is TEI's
    bare, score-sorted list of ``{"index", "score", "text"?}``). Infinity posts the native shape."""

    model_config = ConfigDict(
        # exactly one of the two lists (the validator below says so to the server)
        json_schema_extra={"oneOf": [{"required": ["documents"]}, {"required": ["texts"]}]}
    )

    query: str = Field(min_length=1)
    documents: list[str | TextDocument] | SkipJsonSchema[None] = None
    texts: list[str] | SkipJsonSchema[None] = None
    top_n: Int | None = Field(default=None, ge=1, validation_alias=AliasChoices("top_n", "top_k"))
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

    @field_validator("documents", "texts", mode="before")
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("give a list (or leave the field out), not null")
        return value

    @model_validator(mode="after")
    def _one_list(self) -> RerankRequest:
        if (self.documents is None) == (self.texts is None):
            raise ValueError("give the documents as `documents` (native) or `texts` (TEI), exactly one of them")
        return self


class CohereV1RerankRequest(_Req):
    """Cohere v1 (and Jina, vLLM, Infinity) ``/v1/rerank``."""

    query: str = Field(min_length=1)
    documents: list[str | FieldsDocument]
    model: str | None = None
    top_n: Int | None = Field(default=None, ge=1)
    return_documents: bool = False
    rank_fields: list[str] | None = Field(default=None, min_length=1)
    max_chunks_per_doc: Int | None = Field(default=None, ge=1)
    raw_scores: bool = False  # Infinity's
    # Instruction-following rerankers (Qwen3-Reranker): the task statement in their prompt (default:
    # the model card's). A model without a prompt template refuses it with 400.
    instruction: str | None = None


class CohereV2RerankRequest(_Req):
    """Cohere v2 ``/v2/rerank``."""

    query: str = Field(min_length=1)
    documents: list[str | TextDocument]
    model: str | None = None
    top_n: Int | None = Field(default=None, ge=1)
    max_tokens_per_doc: Int | None = Field(default=None, ge=1)
    return_documents: bool = False
    # Instruction-following rerankers (Qwen3-Reranker): the task statement in their prompt (default:
    # the model card's). A model without a prompt template refuses it with 400.
    instruction: str | None = None


TokenIds = list[int]
TokenId = Annotated[int, BeforeValidator(_whole), Field(ge=0)]
# The prompts our embedders have (a query prefix and a document prefix); TEI's name for them.
PromptName = Literal["query", "document", "passage"]


class OpenAIEmbeddingsRequest(_Req):
    """OpenAI ``/v1/embeddings``: text, texts, token ids or lists of token ids."""

    input: str | list[str] | list[Int] | list[list[Int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    # 0 is Infinity's "all of them" (its client sends 0 by default)
    dimensions: Int | None = Field(default=None, ge=0)
    # An opaque end-user id for the provider's abuse monitoring: written to the request's log line.
    user: str | None = None
    # Infinity's: only text is embedded here (an image or audio URL must not be embedded as text)
    modality: Literal["text"] | None = None
    # Not OpenAI's, but what asymmetric models (e5, bge, nomic) need: which prefix to apply.
    input_type: Literal["query", "document", "passage", "search_query", "search_document"] | None = None


class TEIEmbedRequest(_Req):
    """TEI ``/embed``: a text, token ids, or a list mixing texts and lists of token ids."""

    inputs: str | list[Int] | list[str | list[Int]]
    normalize: bool = True
    truncate: bool | None = True
    truncation_direction: TruncationDirection | None = None
    dimensions: Int | None = Field(default=None, ge=1)
    prompt_name: PromptName | None = None
    model: str | None = None


class TEIPredictRequest(_Req):
    """``inputs``: a text, a [text, text_pair], or a batch of either."""

    inputs: str | list[str] | list[str | Annotated[list[str], Field(min_length=1, max_length=2)]]
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

    # The maximum (the vocabulary) is set in the served document, from the models loaded.
    ids: list[TokenId] | list[Annotated[list[TokenId], Field(min_length=1)]]
    skip_special_tokens: bool = True
    model: str | None = None


class SimilarityInputs(BaseModel):
    model_config = _STRICT
    source_sentence: str
    sentences: list[str]


class SimilarityParameters(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    truncate: bool | None = True
    truncation_direction: TruncationDirection | None = None
    prompt_name: PromptName | None = None


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

    inputs: str | list[Int] | list[str | list[Int]]
    truncate: bool | None = True
    truncation_direction: TruncationDirection | None = None
    prompt_name: PromptName | None = None
    model: str | None = None


class MultiVectorRequest(_Req):
    """``/embed_multivector``: token vectors per text; ``kind`` says query or document (ColBERT models
    encode them differently and need it)."""

    input: str | Annotated[list[str], Field(min_length=1)] = Field(
        validation_alias=AliasChoices("input", "texts", "inputs")
    )
    kind: Literal["query", "document"] | None = None
    truncate: bool | None = True
    model: str | None = None
# --- responses: for the OpenAPI document only ----------------------------------------------------
# Answers are built as dicts and serialized by orjson (see the module docstring); these models say
# what those dicts hold, so that /openapi.json (and schemathesis, which checks every answer
# against it) describes the real answers. Fields a route adds on request are optional here.
class ErrorDetail(BaseModel):
    type: str = Field(description="stable machine-readable kind: invalid_request_error, overloaded_error, ...")
    message: str
    request_id: str | None


class ErrorResponse(BaseModel):
    """Every error answer (OpenAI's error object)."""

    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class RerankResultOut(BaseModel):
    index: int
    score: float
    relevance_score: float
    document: str | dict[str, Any] | None = None


class RerankResponse(BaseModel):
    """``/rerank`` with ``documents``."""

    object: Literal["rerank"]
    id: str
    created: int
    model: str
    results: list[RerankResultOut]
    scores: list[float] = Field(description="every document's score, in input order")
    usage: Usage


class TEIRerankItem(BaseModel):
    index: int
    score: float
    text: str | None = None


class RerankAnswer(RootModel[RerankResponse | list[TEIRerankItem]]):
    """``documents``: the native object; ``texts``: TEI's bare list sorted by score."""


class CohereResultOut(BaseModel):
    index: int
    relevance_score: float
    document: dict[str, Any] | None = None


class CohereRerankResponse(BaseModel):
    id: str
    model: str
    results: list[CohereResultOut]
    meta: dict[str, Any]
    usage: Usage


class EmbeddingItem(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str = Field(description="floats, or base64 of little-endian float32")


class OpenAIEmbeddingsResponse(BaseModel):
    object: Literal["list"]
    data: list[EmbeddingItem]
    model: str
    usage: Usage


class EmbedAnswer(RootModel[list[list[float]]]):
    """TEI ``/embed``: one vector per input."""


class SimilarityAnswer(RootModel[list[float]]):
    """Cosine of each sentence to the source sentence."""


class LabelScore(BaseModel):
    label: str
    score: float


class PredictAnswer(RootModel[list[LabelScore] | list[list[LabelScore]]]):
    """One input: its labels best first; a batch: one such list per input."""


class TokenOut(BaseModel):
    id: int
    text: str
    special: bool
    start: int | None
    stop: int | None


class TokenizeAnswer(RootModel[list[list[TokenOut]]]):
    """Per input, its tokens."""


class DecodeAnswer(RootModel[list[str]]):
    """Per list of ids, its text."""


class RootAnswer(
    RootModel[RerankResponse | list[TEIRerankItem] | OpenAIEmbeddingsResponse | list[list[float]] | list[float]
              | list[LabelScore] | list[list[LabelScore]]]
):
    """What the route the request was dispatched to answers."""


class ServiceInfo(BaseModel):
    name: str
    version: str
    phase: str
    docs: str
    models: dict[str, str]


class HealthResponse(BaseModel):
    status: Literal["ok", "starting"]
    phase: str


class ReadyResponse(BaseModel):
    status: Literal["ready"]
    models: list[str]


class InfoResponse(BaseModel):
    """TEI's Info fields (of the first model), then ours; more keys may follow."""

    version: str
    phase: str
    models: list[dict[str, Any]]
    limits: dict[str, Any]
    max_client_batch_size: int
    max_batch_tokens: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    task: str
    aliases: list[str]


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class EmbedAllAnswer(RootModel[list[list[list[float]]]]):
    """TEI ``/embed_all``: per input, its tokens' vectors."""


class MultiVectorItem(BaseModel):
    object: Literal["multi_vector"]
    index: int
    tokens: int
    embedding: list[list[float]]


class MultiVectorResponse(BaseModel):
    object: Literal["list"]
    data: list[MultiVectorItem]
    model: str
    dimension: int
    usage: Usage
