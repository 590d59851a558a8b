"""ColBERT (late interaction) exports, in the two layouts people publish.

- PyLate / sentence-transformers: ``modules.json`` with a Transformer and one or more ``Dense``
  projections (``pylate.models.Dense.Dense``, or sentence-transformers' own), and PyLate's
  settings in ``config_sentence_transformers.json`` (``query_prefix`` ``[Q] ``, ``document_prefix``
  ``[D] ``, ``query_length``, ``document_length``, ``do_query_expansion``,
  ``attend_to_expansion_tokens``, ``skiplist_words``).
- colbert-ai (Stanford) checkpoints: ``config.json`` with ``architectures: ["HF_ColBERT"]``, a BERT
  whose state dict also holds ``linear.weight`` (the projection, no bias), and optionally
  ``artifact.metadata`` (``query_token_id``, ``doc_token_id``, ``query_maxlen``, ``doc_maxlen``,
  ``attend_to_mask_tokens``). Markers default to ``[unused0]``/``[unused1]`` as PyLate reads them.

Defaults are PyLate's (query length 32, document length 180, expansion on, expansion tokens not
attended, ``string.punctuation`` as the skip-list). The graph is encoder -> projection(s) -> L2
normalization per token, output ``token_vectors`` ``[batch, sequence, dim]``; tokenization rules go
into the manifest's ``colbert`` section, which ``encapure.engine.colbert`` applies.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from encapure.errors import ExportError, ParityError, UnsupportedModelError
from encapure.export.detect import SourceInfo, position_limit, read_json
from encapure.export.progress import Progress
from encapure.manifest import Manifest

OUTPUT_NAME = "token_vectors"
# Bump when the ColBERT graph or its manifest section changes (test caches key on it, beside
# EXPORT_VERSION, so a ColBERT change does not redo every other cached export).
RECIPE_VERSION = "2"
_IDENTITY = ("torch.nn.modules.linear.Identity", "torch.nn.Identity")

_PARITY_QUERIES = ["what is the capital of france?", "how are glacier caves formed?",
                   "Wie hoch ist der Mount Everest?", "x"]
_PARITY_DOCS = [
    "Paris is the capital and most populous city of France.",
    "A glacier cave is a cave formed within the ice of a glacier; meltwater carves it (mostly).",
    "Der Mount Everest ist mit 8848 Metern der höchste Berg der Erde!",
    "Berlin is the capital of Germany.",
    "",
    "Punctuation, only: ... !!! ???",
]


@dataclass
class ColbertSource:
    """What a ColBERT folder says, before any weights are loaded."""

    layout: str  # "pylate" | "colbert-ai"
    dense_dirs: list[Path] = field(default_factory=list)  # PyLate: the Dense modules, in order
    query_prefix: str = "[Q] "
    document_prefix: str = "[D] "
    query_length: int = 32
    document_length: int = 180
    do_query_expansion: bool = True
    attend_to_expansion_tokens: bool = False
    skiplist_words: list[str] = field(default_factory=lambda: list(string.punctuation))


def detect_colbert(root: Path | None, model_dir: Path | None, config: dict[str, Any]) -> ColbertSource | None:
    """A ColBERT layout in ``root`` (the folder given) or ``model_dir`` (its transformer), or None."""
    archs = config.get("architectures") or []
    if archs and archs[0] == "HF_ColBERT":
        return _colbert_ai(model_dir or root)
    if root is None or not (root / "modules.json").is_file():
        return None
    try:
        modules = json.loads((root / "modules.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    st_cfg = read_json(root / "config_sentence_transformers.json") if (
        root / "config_sentence_transformers.json").is_file() else {}
    types = [str(m.get("type", "")) for m in modules if isinstance(m, dict)]
    pylate = any(t.startswith("pylate.") for t in types) or st_cfg.get("similarity_fn_name") == "MaxSim"
    if not pylate:
        return None
    dense = [root / str(m.get("path", "")) for m in modules
             if isinstance(m, dict) and str(m.get("type", "")).endswith("Dense")]
    if not dense:
        raise UnsupportedModelError(
            f"{root} is a PyLate model without a Dense projection; PyLate would add a random one at load "
            "time, so there is nothing fixed to export (save the model after building it)"
        )
    others = [t for t in types if not t.endswith(("Transformer", "Dense"))]
    if others:
        raise UnsupportedModelError(f"PyLate model {root} has modules Encapure cannot export: {others}")
    src = ColbertSource(layout="pylate", dense_dirs=dense)
    for key in ("query_prefix", "document_prefix"):
        if isinstance(st_cfg.get(key), str):
            setattr(src, key, st_cfg[key])
    for key in ("query_length", "document_length"):
        if isinstance(st_cfg.get(key), int) and st_cfg[key] > 0:
            setattr(src, key, int(st_cfg[key]))
    for key in ("do_query_expansion", "attend_to_expansion_tokens"):
        if isinstance(st_cfg.get(key), bool):
            setattr(src, key, st_cfg[key])
    if isinstance(st_cfg.get("skiplist_words"), list):
        src.skiplist_words = [str(w) for w in st_cfg["skiplist_words"]]
    if not src.do_query_expansion:
        src.attend_to_expansion_tokens = False
    return src


def _colbert_ai(folder: Path | None) -> ColbertSource:
    src = ColbertSource(layout="colbert-ai", query_prefix="[unused0]", document_prefix="[unused1]")
    meta_path = folder / "artifact.metadata" if folder is not None else None
    if meta_path is not None and meta_path.is_file():
        meta = read_json(meta_path)
        if isinstance(meta.get("query_token_id"), str):
            src.query_prefix = meta["query_token_id"]
        if isinstance(meta.get("doc_token_id"), str):
            src.document_prefix = meta["doc_token_id"]
        if isinstance(meta.get("query_maxlen"), int):
            src.query_length = meta["query_maxlen"]
        if isinstance(meta.get("doc_maxlen"), int):
            src.document_length = meta["doc_maxlen"]
        if isinstance(meta.get("attend_to_mask_tokens"), bool):
            src.attend_to_expansion_tokens = meta["attend_to_mask_tokens"]
    return src


def apply_info(info: SourceInfo, src: ColbertSource, explicit_max_length: int | None) -> None:
    """A ColBERT model serves reranking (MaxSim) and multi-vector embeddings; its lengths are its own."""
    limit = position_limit(info.config)
    if explicit_max_length is not None:
        src.document_length = explicit_max_length  # --max-length sets the document length
    longest = max(src.query_length, src.document_length)
    if limit is not None and longest > limit:
        raise ExportError(f"ColBERT length {longest} exceeds what the model's positions allow ({limit})")
    info.task = "rerank"
    info.pooling = None
    info.normalize = True
    info.labels = None
    info.score_activation = "none"
    info.max_length = longest
    info.query_prefix = None
    info.document_prefix = None
    info.notes.append(f"ColBERT ({src.layout} layout)")


# --- weights -------------------------------------------------------------------------------------
def _read_tensors(folder: Path, names: tuple[str, ...]) -> dict[str, Any]:
    import torch

    st = folder / "model.safetensors"
    if st.is_file():
        from safetensors import safe_open

        with safe_open(str(st), framework="pt", device="cpu") as f:
            keys = set(f.keys())
            return {n: f.get_tensor(n) for n in names if n in keys}
    binf = folder / "pytorch_model.bin"
    if binf.is_file():
        state = torch.load(str(binf), map_location="cpu", weights_only=True)
        return {n: state[n] for n in names if n in state}
    raise ExportError(f"no model.safetensors or pytorch_model.bin in {folder}")


def load_projections(src: ColbertSource, model_dir: Path) -> list[Any]:
    """The projection layers as ``torch.nn.Linear`` modules, in order."""
    import torch

    layers: list[Any] = []
    if src.layout == "colbert-ai":
        t = _read_tensors(model_dir, ("linear.weight",))
        if "linear.weight" not in t:
            raise UnsupportedModelError(f"HF_ColBERT checkpoint {model_dir} has no linear.weight (the projection)")
        w = t["linear.weight"].float()
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        lin.weight.data.copy_(w)
        return [lin]
    for d in src.dense_dirs:
        cfg = read_json(d / "config.json")
        act = str(cfg.get("activation_function", "torch.nn.modules.linear.Identity"))
        if act not in _IDENTITY:
            raise UnsupportedModelError(f"{d}: Dense activation {act} is not supported (only Identity)")
        if cfg.get("use_residual"):
            raise UnsupportedModelError(f"{d}: Dense use_residual is not supported")
        t = _read_tensors(d, ("linear.weight", "linear.bias"))
        if "linear.weight" not in t:
            raise ExportError(f"{d} holds no linear.weight")
        w = t["linear.weight"].float()
        bias = "linear.bias" in t
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=bias)
        lin.weight.data.copy_(w)
        if bias:
            lin.bias.data.copy_(t["linear.bias"].float())
        layers.append(lin)
    return layers


def build_graph_module(encoder: Any, projections: list[Any]) -> Any:
    """encoder -> projections -> per-token L2 normalization, with the encoder's call signature."""
    import inspect
    from types import SimpleNamespace

    import torch

    accepted = set(inspect.signature(encoder.forward).parameters)

    class ColbertGraph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder
            self.projections = torch.nn.ModuleList(projections)
            self.config = encoder.config

        def forward(self, input_ids: Any, attention_mask: Any = None, token_type_ids: Any = None,
                    return_dict: bool = True) -> Any:
            kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if token_type_ids is not None and "token_type_ids" in accepted:
                kwargs["token_type_ids"] = token_type_ids
            h = self.encoder(**kwargs, return_dict=True).last_hidden_state
            for p in self.projections:
                h = p(h)
            # F.normalize's arithmetic, spelled with ReduceSum: its ReduceL2 carries ``axes`` as an
            # attribute, which the int4 quantizer's opset-21 graph refuses.
            norm = torch.sqrt((h * h).sum(dim=-1, keepdim=True)).clamp(min=1e-12)
            return SimpleNamespace(last_hidden_state=h / norm)

    return ColbertGraph().eval()


def load_model(src: ColbertSource, model_dir: Path) -> Any:
    from transformers import AutoModel

    try:
        encoder = AutoModel.from_pretrained(str(model_dir), attn_implementation="eager", dtype="float32")
    except (OSError, ValueError, KeyError) as e:
        raise UnsupportedModelError(f"cannot load the ColBERT encoder in {model_dir}: {e}") from e
    return build_graph_module(encoder.eval(), load_projections(src, model_dir))


# --- the manifest's colbert section ------------------------------------------------------------
def settings_for(src: ColbertSource, tok: Any) -> dict[str, Any]:
    """Marker, expansion and skip-list ids, resolved with the model's tokenizer as PyLate does."""
    unk = getattr(tok, "unk_token_id", None)

    def marker(text: str) -> int | None:
        if text == "":
            return None
        tid = tok.convert_tokens_to_ids(text)
        if not isinstance(tid, int) or (tid == unk and text != getattr(tok, "unk_token", None)):
            raise ExportError(f"the ColBERT marker {text!r} is not a token of the tokenizer")
        return int(tid)

    for attr in ("mask_token_id", "eos_token_id", "pad_token_id"):
        expansion = getattr(tok, attr, None)
        if isinstance(expansion, int):
            break
    else:
        raise ExportError("the tokenizer has no [MASK], EOS or pad token for query expansion")
    skip = [tok.convert_tokens_to_ids(w) for w in src.skiplist_words]
    return {
        "layout": src.layout,
        "query_prefix": src.query_prefix,
        "document_prefix": src.document_prefix,
        "query_prefix_id": marker(src.query_prefix),
        "document_prefix_id": marker(src.document_prefix),
        "query_length": src.query_length,
        "document_length": src.document_length,
        "do_query_expansion": src.do_query_expansion,
        "attend_to_expansion_tokens": src.attend_to_expansion_tokens,
        "expansion_token_id": int(expansion),
        "skiplist_words": list(src.skiplist_words),
        "skiplist_ids": sorted({int(i) for i in skip if isinstance(i, int)}),
    }


# --- the build --------------------------------------------------------------------------------
def build(
    model: Any,
    info: SourceInfo,
    work: Path,
    rust_tok: Any,
    pad_id: int,
    *,
    src: ColbertSource,
    hf_tokenizer: Any,
    precision: str,
    optimize: str,
    check_parity: bool,
    prog: Progress,
    calibration: str | Path | None = None,
    int8_recipe: str = "auto",
) -> tuple[Manifest, dict[str, Any]]:
    """Trace, fuse, quantize and check a ColBERT graph; the manifest and parity report."""
    from encapure.export import optimize as opt
    from encapure.export import quantize as qz
    from encapure.export.onnx_export import encoder_inputs, export_onnx

    colbert = settings_for(src, hf_tokenizer)
    input_names = encoder_inputs(model, info.config)
    hidden = model.projections[-1].out_features
    final = work / "model.onnx"
    fp32_path = final if precision == "fp32" else work / "fp32.onnx"
    manifest = Manifest(
        task="rerank", precision="fp32", max_length=info.max_length, input_names=input_names,
        output_name=OUTPUT_NAME, output_kind="multi_vector", model_file=fp32_path.name, pooling=None,
        normalize=True, score_activation="none", pad_token_id=pad_id, embedding_dim=int(hidden),
        architecture=info.architecture, model_type=info.model_type, colbert=colbert,
    )
    ids = list(rust_tok.encode("this is a test").ids)
    sample = {"input_ids": np.asarray([ids], dtype=np.int64),
              "attention_mask": np.ones((1, len(ids)), dtype=np.int64),
              "token_type_ids": np.zeros((1, len(ids)), dtype=np.int64)}
    with prog.step("Exporting to ONNX (fp32, ColBERT)"):
        export_onnx(model, fp32_path, input_names=input_names, output_name=OUTPUT_NAME,
                    output_kind="token_embeddings", sample=sample)
    fusions: dict[str, int] = {}
    if opt.should_fuse(info.model_type, precision, optimize):
        with prog.step("Optimizing graph (fusion)"):
            fusions = opt.fuse(fp32_path, fp32_path, info.config, info.model_type)
    manifest.save(work)  # a draft, so the engine can tokenize calibration and parity inputs
    # Token vectors are embeddings: the embedder recipe (attention MatMuls in int8, FFN in fp32).
    recipe = qz.int8_recipe("embed", info.model_type, scheme=int8_recipe) if precision == "int8" else None
    quant = qz.apply_precision(precision, fp32_path, final, recipe=recipe,
                               feeds=lambda: _calibration_feeds(work, calibration), calibration=calibration,
                               prog=prog)
    manifest.model_file = "model.onnx"
    manifest.precision = precision
    manifest.fusions = fusions
    manifest.quantization = quant
    report: dict[str, Any] = {"precision": precision, "task": "rerank", "colbert": src.layout,
                              "fusions": fusions, "quantization": quant}
    if check_parity:
        with prog.step("Verifying against PyTorch"):
            manifest.save(work)
            report.update(parity(model, work))
        prog.info(f"{precision}: token vectors max |Δ| {report['max_abs_diff']:.2e}, MaxSim max |Δ| "
                  f"{report['maxsim_max_abs_diff']:.2e}, Spearman {report['spearman']:.4f}, order kept for "
                  f"{report['queries_ranking_preserved']} sample queries")
        from encapure.export.parity import FP32_ABS_TOL

        if precision == "fp32" and report["max_abs_diff"] > FP32_ABS_TOL:
            raise ParityError(
                f"fp32 ColBERT export does not match PyTorch: max |Δ| {report['max_abs_diff']:.2e} > {FP32_ABS_TOL:g}"
            )
    return manifest, report


def _engine(work: Path) -> Any:
    from encapure.engine.loading import load_model as load_engine
    from encapure.settings import Settings

    settings = Settings(workers=1, providers=["CPUExecutionProvider"])
    return load_engine(work, settings=settings, name="colbert-export", warmup=False)


def _calibration_feeds(work: Path, calibration: str | Path | None) -> list[dict[str, np.ndarray]]:
    """Queries (expanded with [MASK]) and documents, tokenized as served, in padded batches."""
    from encapure.engine.batching import plan_batches
    from encapure.export import calibration as cal
    from encapure.export.parity import _pad

    engine = _engine(work)
    pairs = cal.load_items(calibration, "rerank")
    queries = list(dict.fromkeys(q for q, _ in pairs if q.strip()))
    docs = list(dict.fromkeys(d for _, d in pairs if d.strip()))
    units = engine.encode_units(queries, "query")[0] + engine.encode_units(docs, "document")[0]
    names = engine.manifest.input_names
    feeds = []
    for batch in plan_batches([len(u) for u in units], 4096, 16):
        chunk = [units[i] for i in batch]
        feed, _ = _pad(chunk, engine.manifest.pad_token_id)
        for r, u in enumerate(chunk):
            if u.attention is not None:
                feed["attention_mask"][r, : len(u)] = u.attention
        feeds.append({k: v for k, v in feed.items() if k in names})
    engine.close()
    return feeds


def parity(torch_model: Any, work: Path) -> dict[str, Any]:
    """Served token vectors and MaxSim scores vs the PyTorch graph module on the same tokens."""
    import torch

    from encapure.engine.colbert import maxsim
    from encapure.export.parity import _pad, spearman

    engine = _engine(work)
    q_units = engine.encode_units(_PARITY_QUERIES, "query")[0]
    d_units = engine.encode_units(_PARITY_DOCS, "document")[0]
    refs: list[np.ndarray] = []
    gots: list[np.ndarray] = []
    diff = 0.0
    for units, kind in ((q_units, "query"), (d_units, "document")):
        feed, _ = _pad(units, engine.manifest.pad_token_id)
        for r, u in enumerate(units):
            if u.attention is not None:
                feed["attention_mask"][r, : len(u)] = u.attention
        with torch.no_grad():
            out = torch_model(**{k: torch.from_numpy(feed[k]) for k in engine.manifest.input_names})
        ref = out.last_hidden_state.float().numpy()
        got = engine.forward(units)
        for r, u in enumerate(units):
            keep = engine.keep_mask(u, kind)
            a, b = ref[r, : len(u)][keep], np.asarray(got[r])[keep]
            diff = max(diff, float(np.abs(a - b).max()))
            refs.append(a)
            gots.append(b)
    nq = len(q_units)
    s_ref = np.stack([maxsim(refs[i], refs[nq:]) for i in range(nq)])
    s_got = np.stack([maxsim(gots[i], gots[nq:]) for i in range(nq)])
    engine.close()
    held = [bool(np.array_equal(np.argsort(-s_ref[i], kind="stable"), np.argsort(-s_got[i], kind="stable")))
            for i in range(nq)]
    return {
        "n_items": len(q_units) + len(d_units),
        "max_abs_diff": diff,
        "maxsim_max_abs_diff": float(np.abs(s_ref - s_got).max()),
        "spearman": float(np.mean([spearman(s_ref[i], s_got[i]) for i in range(nq)])),
        "ranking_preserved": all(held),
        "queries_ranking_preserved": f"{sum(held)}/{nq}",
    }
