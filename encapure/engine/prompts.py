"""Instruction templates for LLM pair scorers (Qwen3-Reranker and its kin).

Such a model is a causal LM asked "does this document meet the query? yes/no": each pair becomes
``prefix + body + suffix``, where the body carries the instruction, the query and the document.
The model card tokenizes the three parts separately (prefix and suffix once, the body per pair)
and cuts only the body's end, so with the document last in the body only the document is ever
cut and the suffix, whose last token is where the answer is read, always survives. This module
reproduces exactly that, with plain token-id lists, so the engine and the exporter's calibration
and parity share one implementation.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from encapure.errors import InvalidInputError

_FIELD = re.compile(r"\{(instruction|query|document)\}")

# Tokenize a batch of texts without special tokens: texts -> token id lists.
EncodeFn = Callable[[list[str]], list[list[int]]]


@dataclass(frozen=True)
class PairTemplate:
    prefix: str
    body: str  # holds {instruction} and {query}, ends with {document}
    suffix: str
    instruction: str  # the default instruction (the model card's)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PairTemplate:
        return cls(prefix=str(data["prefix"]), body=str(data["body"]), suffix=str(data["suffix"]),
                   instruction=str(data["instruction"]))

    def to_dict(self) -> dict[str, str]:
        return {"prefix": self.prefix, "body": self.body, "suffix": self.suffix, "instruction": self.instruction}

    def fill(self, instruction: str, query: str, document: str) -> str:
        """The body for one pair. One pass of substitution, so braces inside a query or document
        (``{document}`` in a user's text) are left as they are."""
        values = {"instruction": instruction, "query": query, "document": document}
        return _FIELD.sub(lambda m: values[m.group(1)], self.body)


@dataclass
class TemplatedPairs:
    ids: list[list[int]]  # per pair: prefix + (cut) body + suffix
    truncated: list[bool]


def encode_pairs(
    encode: EncodeFn,
    template: PairTemplate,
    queries: list[str],
    documents: list[str],
    *,
    instruction: str | None,
    max_length: int,
    truncate: bool = True,
) -> TemplatedPairs:
    """Token ids of each (query, document) under ``template``, at most ``max_length`` long.

    Raises InvalidInputError when a pair does not fit and ``truncate`` is off, or when the
    instruction and query alone leave no room for any of the document (cutting them would change
    the question, not shorten the evidence).
    """
    instr = template.instruction if instruction is None else instruction
    prefix, suffix = encode([template.prefix, template.suffix])
    room = max_length - len(prefix) - len(suffix)
    if room <= 0:
        raise InvalidInputError(f"the model's template alone takes {len(prefix) + len(suffix)} tokens; "
                                f"max_length {max_length} leaves no room for a pair")
    distinct = list(dict.fromkeys(queries))
    heads = encode([template.fill(instr, q, "") for q in distinct])
    for head in heads:
        if len(head) >= room:
            raise InvalidInputError(
                f"the instruction and query take {len(head)} tokens, which leaves no room for the document "
                f"within the model's maximum of {max_length} tokens (template {len(prefix) + len(suffix)}): "
                f"shorten the query{'' if instruction is None else ' or the instruction'}"
            )
    bodies = encode([template.fill(instr, q, d) for q, d in zip(queries, documents, strict=True)])
    ids: list[list[int]] = []
    cut: list[bool] = []
    for i, body in enumerate(bodies):
        over = len(body) > room
        if over and not truncate:
            raise InvalidInputError(
                f"input {i} is longer than the model's maximum of {max_length} tokens (allow truncation)"
            )
        ids.append(prefix + (body[:room] if over else body) + suffix)
        cut.append(over)
    return TemplatedPairs(ids=ids, truncated=cut)


def check_instruction(instruction: Any, template: PairTemplate | None, model_name: str) -> None:
    """A field we accept is honoured or refused: an instruction for a model without a template
    would be silently dropped, so it is a 400."""
    if instruction is None:
        return
    if not isinstance(instruction, str):
        raise InvalidInputError(f"instruction must be a string, got {type(instruction).__name__}")
    if template is None:
        raise InvalidInputError(
            f"model {model_name!r} takes no instruction: `instruction` applies to instruction-following "
            "rerankers (e.g. Qwen3-Reranker), whose export records a prompt template"
        )
