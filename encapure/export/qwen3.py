"""Decoder-only LMs (Qwen3, Qwen2) as rerankers and embedders.

- **Rerankers** (Qwen3-Reranker): a causal LM asked whether a document meets a query, scored as
  softmax over the "no"/"yes" logits at the last position = sigmoid(logit_yes - logit_no). The
  exported graph computes exactly that one number per pair: the transformer body, the hidden
  state at each row's last real token (gathered from the attention mask, so right padding gives
  the same result as no padding: the attention is causal, later padding is never seen), and a
  1 x hidden linear holding ``lm_head[yes] - lm_head[no]``. The 151,669-wide LM head is never
  run. The prompt template (prefix, body with instruction/query/document, suffix) and the default
  instruction go into the manifest; the engine applies them (``encapure.engine.prompts``).
- **Embedders** (Qwen3-Embedding): the base model's last hidden state pooled at the last real
  token and L2-normalized, with the instruction prefix on queries only.

Detection is by name (the hub id or folder says "reranker" / "embedding"), by ``--task``, or by a
given template. The JSON-only part (``family_task``, ``source_fields``) imports no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from encapure.errors import ExportError, ManifestError, ModelError, UnsupportedModelError

DECODER_TYPES = ("qwen2", "qwen3")
DEFAULT_MAX_LENGTH = 8192

# From the Qwen/Qwen3-Reranker-0.6B model card (also ../shared/models/qwen3-reranker-0.6b-arch/README.md).
QWEN3_RERANK_TEMPLATE: dict[str, str] = {
    "prefix": "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and "
              "the Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n"
              "<|im_start|>user\n",
    "body": "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}",
    "suffix": "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
    "instruction": "Given a web search query, retrieve relevant passages that answer the query",
}
YES_TOKEN = "yes"
NO_TOKEN = "no"
# Qwen3-Embedding's query format (model card: f"Instruct: {task}\nQuery:{query}"); documents go bare.
QWEN3_EMBED_QUERY_PREFIX = (
    "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"
)


def _arch(config: dict[str, Any]) -> str:
    archs = config.get("architectures") or []
    return str(archs[0]) if archs else ""


def family_task(config: dict[str, Any], *, task: str, name: str, template: dict[str, str] | None) -> str | None:
    """``rerank`` / ``embed`` when this module handles the model, None when the usual path does.

    A ``*ForSequenceClassification`` conversion (a seq-cls checkpoint) goes the usual way; a causal
    LM with nothing saying what it is used for is refused with the two ways to say it.
    """
    if template is not None:
        check_template(template)
    if config.get("model_type") not in DECODER_TYPES:
        if template is not None:
            raise UnsupportedModelError(
                f"a prompt template applies to decoder LM rerankers ({', '.join(DECODER_TYPES)}), "
                f"not to {config.get('model_type')!r}"
            )
        return None
    arch = _arch(config)
    if arch.endswith("ForSequenceClassification") and template is None:
        return None
    label = name.rstrip("/\\").replace("\\", "/").split("/")[-1].lower()
    causal = arch.endswith("ForCausalLM")
    if template is not None or task == "rerank" or (task == "auto" and "reranker" in label):
        if not causal:
            raise UnsupportedModelError(
                f"a {config.get('model_type')} reranker must be a *ForCausalLM (its LM head gives the yes/no "
                f"logits); {arch or 'this model'} has none"
            )
        return "rerank"
    if task == "embed" or (task == "auto" and ("embedding" in label or not causal)):
        return "embed"
    if task == "classify":
        raise UnsupportedModelError(f"{arch} is a causal LM: it cannot be exported as a classifier")
    raise UnsupportedModelError(
        f"{arch} is a causal LM: say what it serves with --task rerank (a yes/no reranker such as "
        "Qwen3-Reranker) or --task embed (last-token embeddings such as Qwen3-Embedding)"
    )


def check_template(template: dict[str, str]) -> None:
    """Refuse a template the engine could not apply before any weights are loaded."""
    keys = ("prefix", "body", "suffix", "instruction")
    if not isinstance(template, dict) or any(not isinstance(template.get(k), str) for k in keys):
        raise ExportError(f"a prompt template needs string fields {', '.join(keys)}")
    body = template["body"]
    if "{query}" not in body or not body.endswith("{document}"):
        raise ExportError("the template body must hold {query} and end with {document} (only the document is cut)")


def default_max_length(config: dict[str, Any], explicit: int | None, limit: int | None) -> int:
    if explicit is not None:
        from encapure.export.detect import check_max_length

        return check_max_length(explicit, limit)
    return min(DEFAULT_MAX_LENGTH, limit) if limit else DEFAULT_MAX_LENGTH


def query_prefix_for(config: dict[str, Any], name: str) -> str | None:
    label = name.rstrip("/").split("/")[-1].lower()
    return QWEN3_EMBED_QUERY_PREFIX if config.get("model_type") == "qwen3" and "embedding" in label else None


# --- torch side ---------------------------------------------------------------------------------
def yes_no_ids(rust_tok: Any) -> tuple[int, int]:
    ids = []
    for word in (YES_TOKEN, NO_TOKEN):
        enc = rust_tok.encode(word, add_special_tokens=False).ids
        if len(enc) != 1:
            raise ExportError(f"the tokenizer splits {word!r} into {len(enc)} tokens; a yes/no reranker needs one")
        ids.append(int(enc[0]))
    return ids[0], ids[1]


def yes_no_module(causal_lm: Any, yes_id: int, no_id: int) -> Any:
    """The transformer body + a 1-logit head ``lm_head[yes] - lm_head[no]`` at the last real token.

    Returns a module with the HF calling convention (``**inputs, return_dict=True`` -> ``.logits``)
    so the generic exporter traces it.
    """
    import torch
    from transformers.modeling_outputs import SequenceClassifierOutput

    body: Any = getattr(causal_lm, "model", None)
    head = causal_lm.get_output_embeddings() if hasattr(causal_lm, "get_output_embeddings") else None
    if body is None or head is None:
        raise UnsupportedModelError(f"{type(causal_lm).__name__} has no LM head to take the yes/no rows from")
    weight = head.weight.detach()
    linear = torch.nn.Linear(weight.shape[1], 1, bias=False)
    with torch.no_grad():
        linear.weight.copy_((weight[yes_id] - weight[no_id]).float()[None, :])
        bias = getattr(head, "bias", None)
        if bias is not None:
            linear.bias = torch.nn.Parameter((bias[yes_id] - bias[no_id]).reshape(1).float())

    class YesNoReranker(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = body
            self.score = linear
            self.config = causal_lm.config

        def forward(self, input_ids: Any, attention_mask: Any, return_dict: bool = True) -> Any:
            hidden = self.body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            last = attention_mask.sum(dim=1) - 1
            picked = hidden[torch.arange(hidden.shape[0]), last]
            return SequenceClassifierOutput(logits=self.score(picked))

    return YesNoReranker().eval()


def template_feeds(
    rust_tok: Any,
    template: dict[str, str],
    pairs: list[tuple[str, str]],
    max_length: int,
    pad_id: int,
    *,
    batch_tokens: int = 4096,
    batch_size: int = 16,
) -> list[dict[str, np.ndarray]]:
    """Templated pairs in the engine's length-sorted token-budget batches (right padding): the
    inputs the served model sees, for tracing and static int8 calibration."""
    from tokenizers import Tokenizer

    from encapure.engine.batching import plan_batches
    from encapure.engine.prompts import PairTemplate, encode_pairs

    tok = Tokenizer.from_str(rust_tok.to_str())
    tok.no_truncation()
    tok.no_padding()

    def encode(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]

    pairs = [(q if q.strip() else "?", d) for q, d in pairs]
    out = encode_pairs(encode, PairTemplate.from_dict(template), [q for q, _ in pairs], [d for _, d in pairs],
                       instruction=None, max_length=max_length)
    lengths = [len(x) for x in out.ids]
    feeds = []
    for batch in plan_batches(lengths, batch_tokens, batch_size):
        width = max(lengths[i] for i in batch)
        ids = np.full((len(batch), width), pad_id, dtype=np.int64)
        mask = np.zeros_like(ids)
        for r, i in enumerate(batch):
            ids[r, : lengths[i]] = out.ids[i]
            mask[r, : lengths[i]] = 1
        feeds.append({"input_ids": ids, "attention_mask": mask})
    return feeds


def reference_scores(causal_lm: Any, units: list[Any], yes_id: int, no_id: int, pad_id: int) -> np.ndarray:
    """PyTorch's yes/no formula on the full causal LM: the LM head's logits at each sequence's last
    token, ``logit_yes - logit_no`` (its sigmoid is softmax over [no, yes]). Right-padded batch; the
    LM head runs on the last positions only (the same numbers, without a [B, L, 151669] tensor)."""
    import torch

    width = max(len(u.ids) for u in units)
    ids = np.full((len(units), width), pad_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    for r, u in enumerate(units):
        ids[r, : len(u.ids)] = u.ids
        mask[r, : len(u.ids)] = 1
    with torch.no_grad():
        hidden = causal_lm.model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                                 use_cache=False).last_hidden_state
        last = hidden[torch.arange(len(units)), torch.from_numpy(mask.sum(1) - 1)]
        logits = causal_lm.lm_head(last).float()
        return (logits[:, yes_id] - logits[:, no_id]).numpy()[:, None]


CUSTOM_INSTRUCTION = "Given a question, retrieve passages that contain its answer"


def check(causal_lm: Any, folder: Path, yes_id: int, no_id: int, *, max_length: int,
          batch_size: int = 4, limit: int | None = None) -> dict[str, Any]:
    """The exported folder as the engine serves it vs PyTorch's yes/no formula on the same token ids,
    over the standard parity samples with the default instruction and with a custom one."""
    from encapure.engine.loading import load_model
    from encapure.export import parity as par
    from encapure.settings import Settings

    settings = Settings(workers=1, max_length=max_length, providers=["CPUExecutionProvider"], backend="onnxruntime",
                        openvino_inference_precision="f32")  # the reference runtime, whatever the environment says
    try:
        engine = load_model(folder, settings=settings, name="parity", warmup=False)
    except (ModelError, ManifestError) as e:
        raise ExportError(f"the exported model does not load in ONNX Runtime: {e.message}") from e
    items, groups = par.sample_inputs("rerank")
    items = [(q or "?", d) for q, d in items]
    if limit is not None:
        items, groups = items[:limit], groups[:limit]
    units = []
    for instruction in (None, CUSTOM_INSTRUCTION):
        units += engine.prepare_pair_list(items, instruction=instruction).units
    groups = groups + [g + max(groups) + 1 for g in groups]
    refs, gots = [], []
    for start in range(0, len(units), batch_size):
        chunk = units[start : start + batch_size]
        gots.append(engine.forward(chunk))
        refs.append(reference_scores(causal_lm, chunk, yes_id, no_id, engine.manifest.pad_token_id))
    report: dict[str, Any] = {"n_items": len(units), "reference": "PyTorch causal LM: logit_yes - logit_no at the "
                              "last token (score = softmax over [no, yes])", "yes_no_ids": [yes_id, no_id]}
    report.update(par._compare_logits("rerank", np.concatenate(refs), np.concatenate(gots), groups))
    return report
