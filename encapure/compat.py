"""Drop-in ``CrossEncoder`` and ``SentenceTransformer`` for sentence-transformers code, on our engine.

A script written for sentence-transformers runs unchanged after swapping the import::

    from encapure.compat import CrossEncoder, SentenceTransformer

The classes take the constructor arguments and methods people use (and the integrations of
langchain, llama-index and haystack pass), return the same types and shapes, and run our ONNX
engine underneath: any folder or hub id ``Reranker``/``Embedder.from_pretrained`` can load
(Hugging Face models are exported once and cached). Every argument is either honoured or refused
with ``InvalidInputError`` (a ``ValueError``), never silently dropped: a caller asking for
something we cannot do (``trust_remote_code=True``, a torch dtype, token embeddings) is told so.

Differences that cannot be hidden: models run at Encapure's ``precision`` (``precision="fp32"``
matches sentence-transformers within 1e-4). The default is ``int8`` (calibrated), except for
``SentenceTransformer`` on a CPU with native bf16 where OpenVINO is installed: there it is ``bf16``
(see ``default_embedder_precision``). ``backend`` "torch"
and "onnx" both mean "our ONNX Runtime engine", and torch is only imported when a torch tensor
is asked for (``convert_to_tensor=True``, ``convert_to_numpy=False``, ``similarity`` with torch
installed) or a torch activation module is passed.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from encapure.engine.api import Embedder, Reranker
from encapure.engine.model import OnnxModel, fold_max, l2_normalize
from encapure.engine.types import EmbedOutput, Prepared
from encapure.errors import InvalidInputError
from encapure.manifest import MANIFEST_NAME, Manifest
from encapure.settings import PRECISIONS, Precision, Settings, check_openvino_precision

log = logging.getLogger(__name__)

__all__ = ["CrossEncoder", "SentenceTransformer"]

F32 = npt.NDArray[np.float32]
SimilarityName = Literal["cosine", "dot", "euclidean", "manhattan"]
_SIMILARITIES: tuple[str, ...] = ("cosine", "dot", "euclidean", "manhattan")


# --- shared helpers ---------------------------------------------------------------------------
def _torch() -> Any:
    """torch, imported on demand: the serving install has none, so asking for tensors there is an error."""
    if importlib.util.find_spec("torch") is None:
        raise InvalidInputError("torch tensors were asked for (convert_to_tensor / convert_to_numpy=False), "
                                "but torch is not installed; use the default numpy output")
    import torch

    return torch


def _torch_if_installed() -> Any | None:
    return _torch() if importlib.util.find_spec("torch") is not None else None


def _providers(device: Any) -> list[str]:
    """sentence-transformers' ``device`` as ONNX Runtime execution providers; refuse what we cannot run.

    ``None`` picks the GPU when there is one, as sentence-transformers does (CUDA provider, else CPU).
    """
    if device is None:
        import onnxruntime as ort

        gpu = "CUDAExecutionProvider" in ort.get_available_providers()
        return ["CUDAExecutionProvider", "CPUExecutionProvider"] if gpu else ["CPUExecutionProvider"]
    name = str(device).lower()
    if name == "cpu":
        return ["CPUExecutionProvider"]
    if name in ("cuda", "cuda:0"):
        import onnxruntime as ort

        available = ort.get_available_providers()
        if "CUDAExecutionProvider" not in available:
            raise InvalidInputError(
                f"device={device!r}: this onnxruntime build has no CUDAExecutionProvider "
                f"(available: {', '.join(available)}); install encapure[gpu] (onnxruntime-gpu) or use device='cpu'"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if name.startswith("cuda:"):
        raise InvalidInputError(f"device={device!r}: only the first GPU (cuda or cuda:0) is supported; "
                                "select another with CUDA_VISIBLE_DEVICES")
    raise InvalidInputError(f"device={device!r} is not supported: use 'cpu' or 'cuda'")


def _refuse_unsupported(cls: str, **given: Any) -> None:
    """Arguments sentence-transformers takes that we cannot honour: allowed only at their defaults."""
    for name, value in given.items():
        if value not in (None, False, {}):
            raise InvalidInputError(f"{cls}({name}={value!r}) is not supported by encapure.compat")


# Forward batches for in-process bulk calls. all-MiniLM-L6-v2 int8, 1,000 mixed WikiQA texts, 2 single-thread
# workers (scripts/bench_compat.py's workload, alternating runs on a 2-core AVX-512 VNNI machine):
# max_batch_size 16 (the server's default) 9.2-9.7 s, 17.4-18.8 CPU s, RSS 740-764 MB after the call;
# 8: 8.4-9.5 s, 474-489 MB; 4: 8.1-8.6 s, 15.9-16.5 CPU s, 337-350 MB; 2: 8.1 s, 268-282 MB; 1: 8.3-8.7 s.
# The test reranker int8 on WikiQA-test-gold's 2,351 pairs: 16 -> 5.95-6.43 s, RSS 246 MB; 4 -> 5.94-6.37 s,
# 177 MB. Small batches keep each worker's activations in cache and the arena small; the server keeps its own
# default, where batches are also a latency/concurrency trade-off.
BULK_MAX_BATCH_SIZE = 4


def _bulk_settings() -> Settings:
    """``Settings()`` (environment included), with the bulk batch size unless the environment sets one."""
    s = Settings()
    if "max_batch_size" not in s.model_fields_set:
        s = s.model_copy(update={"max_batch_size": BULK_MAX_BATCH_SIZE})
    return s


# What ``precision=`` takes here: the export precisions, plus "bf16", which is what users of these classes
# expect to be able to write. bf16 is not an export precision (Settings.precision, the manifest, the cache
# key name a file; a bf16 run uses the fp32 file) but a runtime mode of OpenVINO, so the engine keeps it
# in Settings.openvino_inference_precision and compat maps "bf16" onto an fp32 export run that way.
CompatPrecision = Precision | Literal["bf16"]
COMPAT_PRECISIONS: tuple[str, ...] = (*PRECISIONS, "bf16")


def _check_precision_arg(precision: Any) -> CompatPrecision | None:
    if precision is not None and precision not in COMPAT_PRECISIONS:
        raise InvalidInputError(f"precision must be one of {', '.join(COMPAT_PRECISIONS)}, got {precision!r}")
    return precision  # type: ignore[no-any-return]


def default_embedder_precision(settings: Settings) -> CompatPrecision | None:
    """``SentenceTransformer``'s precision when the caller names none: "bf16" on a CPU with native bf16
    (OpenVINO's BF16 capability: AVX-512 BF16 or AMX) where openvino is installed, else None
    (``Settings.precision``, int8 by default).

    Why (README "encapure.compat"): all-MiniLM-L6-v2, 1,000 mixed texts, 2 threads, AMD EPYC AVX-512 BF16,
    load 1.5-3: bf16 (fp32 export, OpenVINO) 2.5-2.7x sentence-transformers, cosine to fp32 >= 0.9999 on every text,
    where ONNX Runtime int8 reached 1.7x and OpenVINO's int8 IR 2.4x (each left one text under 0.99; the IR
    also needs nncf to export). Batch-invariant with the backend's 16-token padding. Without native bf16 OpenVINO
    would emulate it (slower than f32) or run f32, so those CPUs keep int8. A precision, backend or
    OpenVINO precision chosen by the caller (Settings or ``ENCAPURE_*``) or a GPU device keeps its choice.
    """
    chosen = {"precision", "backend", "openvino_inference_precision"} & settings.model_fields_set
    if chosen or settings.providers != ["CPUExecutionProvider"]:
        return None
    from encapure.engine.backends.openvino import cpu_native_bf16

    return "bf16" if cpu_native_bf16() else None


def _runtime(precision: CompatPrecision | None, settings: Settings) -> tuple[Precision | None, Settings]:
    """The export precision and settings for ``precision``: "bf16" is the fp32 export run by OpenVINO
    in bf16; refused where it cannot be honoured (no openvino, a GPU device, an explicit other backend)."""
    if precision != "bf16":
        return precision, settings
    if importlib.util.find_spec("openvino") is None:
        raise InvalidInputError("precision='bf16' runs on OpenVINO: pip install openvino (the openvino extra)")
    if settings.providers != ["CPUExecutionProvider"]:
        raise InvalidInputError("precision='bf16' runs on the CPU (OpenVINO); use device='cpu'")
    backend = settings.backend if "backend" in settings.model_fields_set else "openvino"
    try:
        check_openvino_precision(backend, "bf16")
    except ValueError as e:
        raise InvalidInputError(f"precision='bf16': {e}") from e
    return "fp32", settings.model_copy(update={"backend": "openvino", "openvino_inference_precision": "bf16"})


def _pop_model_kwargs(cls: str, model_kwargs: dict[str, Any] | None) -> CompatPrecision | None:
    """``model_kwargs`` may carry our ``precision`` (integrations pass it through); nothing else."""
    kw = dict(model_kwargs or {})
    precision = _check_precision_arg(kw.pop("precision", None))
    if kw:
        raise InvalidInputError(
            f"{cls}(model_kwargs=...) keys {sorted(kw)} are not supported: Encapure runs exported ONNX models "
            "(choose the precision with precision='fp32'|'int8'|'int4'|'fp16'|'bf16')"
        )
    return precision


def _load(
    cls: type[Reranker] | type[Embedder],
    source: str | Path,
    *,
    precision: Precision | None,
    max_length: int | None,
    settings: Settings,
) -> OnnxModel:
    """Load through the engine; an exported folder's precision is fixed, so a different ask is refused."""
    path = Path(str(source)).expanduser()
    overrides: dict[str, Any] = {}
    if (path / MANIFEST_NAME).is_file():
        have = Manifest.load(path).precision
        # bf16 runs the fp32 file (mapped to "fp32" by _runtime), so an fp32 folder serves it too.
        if precision is not None and precision != have:
            raise InvalidInputError(f"{path} is an exported {have} model; precision={precision!r} needs "
                                    "the Hugging Face model (or a folder exported at that precision)")
        precision = None
    if max_length is not None:
        overrides["max_length"] = int(max_length)
    model = cls.from_pretrained(source, precision=precision, settings=settings, **overrides).model
    if max_length is not None and model.max_length != max_length:
        raise InvalidInputError(f"max_length={max_length} cannot be used with this model (it allows "
                                f"{model.max_length})")
    return model


def _one_of(sentences: Any, inputs: Any) -> Any:
    """sentence-transformers 5 names the first argument ``sentences``, 6 ``inputs``: take either."""
    if (sentences is None) == (inputs is None):
        raise InvalidInputError("pass the texts once, as the first argument (sentences= or inputs=)")
    return sentences if sentences is not None else inputs


def _chunks(order: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(order), size):
        yield order[start : start + size]


def _progress(total: int, show: bool | None, desc: str) -> Any:
    """A tqdm bar when asked for and tqdm is installed (as sentence-transformers shows); else nothing."""
    if not show:
        return None
    if importlib.util.find_spec("tqdm") is None:
        log.warning("show_progress_bar=True but tqdm is not installed; no progress bar")
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="text")


def _check_batch_size(batch_size: Any) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise InvalidInputError(f"batch_size must be a positive integer, got {batch_size!r}")


def _run_in_chunks(model: OnnxModel, prepared: Prepared, batch_size: int, show_progress_bar: bool | None,
                   desc: str) -> F32:
    """Every unit of ``prepared`` through the engine, ``batch_size`` at a time, longest first; rows in unit order.

    Tokenized once up front and chunked by token count (sentence-transformers sorts by characters):
    on 1,000 mixed WikiQA texts that pads 77,952 tokens instead of 82,944 (76,044 real). ``batch_size``
    bounds both the units in flight and every forward batch (the engine may cut a chunk into smaller
    token-budget batches, never bigger ones); the progress bar ticks once per chunk.
    """
    units = prepared.units
    rows = np.zeros((len(units), model.output_dim), dtype=np.float32)
    order = sorted(range(len(units)), key=lambda i: -len(units[i]))
    bar = _progress(prepared.n_inputs, show_progress_bar, desc)
    try:
        for idx in _chunks(order, batch_size):
            part = Prepared(units=[units[i] for i in idx], owners=np.arange(len(idx), dtype=np.int64),
                            n_inputs=len(idx), tokens=[len(units[i]) for i in idx],
                            truncated=[False] * len(idx), options=prepared.options)
            rows[idx] = model.run_prepared(part)
            if bar is not None:
                bar.update(len(set(prepared.owners[idx].tolist())))
    finally:
        if bar is not None:
            bar.close()
    return rows


def _to_output(
    array: F32,
    single: bool,
    convert_to_numpy: bool,
    convert_to_tensor: bool,
) -> Any:
    """sentence-transformers' return convention: tensor, ndarray, or a list of tensors; one input -> its row."""
    if convert_to_tensor:
        torch = _torch()
        result: Any = torch.from_numpy(np.ascontiguousarray(array))
    elif convert_to_numpy:
        result = array if len(array) else np.array([])
    else:
        torch = _torch()
        result = list(torch.from_numpy(np.ascontiguousarray(array)))
    return result[0] if single else result


# --- CrossEncoder -------------------------------------------------------------------------------
_ACTIVATIONS = {"Identity": "identity", "Sigmoid": "sigmoid", "Tanh": "tanh"}


def _default_activation(model: OnnxModel) -> str:
    """What sentence-transformers would apply: the model's saved ``activation_fn``, else sigmoid."""
    sources = [model.manifest.source, str(model.folder)]
    for src in sources:
        cfg = _config_of(src)
        if cfg is None:
            continue
        path = (cfg.get("sentence_transformers") or {}).get("activation_fn") or cfg.get(
            "sbert_ce_default_activation_function")
        if path:
            short = str(path).rsplit(".", 1)[-1]
            if short not in _ACTIVATIONS:
                raise InvalidInputError(f"the model's saved activation_fn {path!r} is not supported; pass "
                                        "activation_fn= explicitly")
            return _ACTIVATIONS[short]
        break
    return "sigmoid"


def _config_of(source: str) -> dict[str, Any] | None:
    """The source model's config.json: a local folder, or the hub cache (never a download)."""
    if not source:
        return None
    path = Path(source).expanduser()
    cfg = path / "config.json" if path.is_dir() else None
    if cfg is None and not path.exists() and "/" in source:
        try:
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(source, "config.json")
            cfg = Path(hit) if isinstance(hit, str) else None
        except Exception:  # an id the hub helper rejects: no cached config to read
            cfg = None
    if cfg is None or not cfg.is_file():
        return None
    data = json.loads(cfg.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else None


def _apply_activation(logits: F32, activation: str | Callable[..., Any]) -> F32:
    if activation == "identity":
        return logits
    if activation == "sigmoid":
        from encapure.engine.model import sigmoid

        return sigmoid(logits)
    if activation == "tanh":
        return np.tanh(logits).astype(np.float32)
    assert callable(activation)
    # A torch module (nn.Sigmoid(), nn.Identity(), ...) as sentence-transformers callers pass: give it a
    # tensor when torch is there, a numpy array otherwise (a plain numpy callable works both ways).
    torch = _torch_if_installed()
    is_torch_module = torch is not None and isinstance(activation, torch.nn.Module)
    out = activation(torch.from_numpy(logits)) if torch is not None and is_torch_module else activation(logits)
    if torch is not None and isinstance(out, torch.Tensor):
        out = out.detach().cpu().numpy()
    return np.asarray(out, dtype=np.float32)


class CrossEncoder:
    """``sentence_transformers.CrossEncoder``'s ``predict``/``rank`` on an Encapure reranker."""

    def __init__(
        self,
        model_name_or_path: str,
        *,
        device: str | None = None,
        max_length: int | None = None,
        activation_fn: Callable[..., Any] | None = None,
        trust_remote_code: bool = False,
        precision: CompatPrecision | None = None,
        settings: Settings | None = None,
        cache_folder: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        backend: Literal["torch", "onnx"] = "torch",
        num_labels: int | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        token: bool | str | None = None,
        processor_kwargs: dict[str, Any] | None = None,
        tokenizer_kwargs: dict[str, Any] | None = None,
        config_kwargs: dict[str, Any] | None = None,
        prompts: dict[str, str] | None = None,
        default_prompt_name: str | None = None,
    ) -> None:
        """``precision`` and ``settings`` are ours (export precision; threads, batching); the rest are
        sentence-transformers' arguments, honoured, or refused when not at their defaults."""
        if trust_remote_code:
            raise InvalidInputError(
                "trust_remote_code=True is not supported: Encapure runs exported ONNX graphs and never executes "
                "code from a model repository; pass trust_remote_code=False"
            )
        if backend not in ("torch", "onnx"):
            raise InvalidInputError(f"backend={backend!r} is not supported; Encapure runs ONNX Runtime "
                                    "('torch' and 'onnx' both mean the Encapure engine)")
        _refuse_unsupported("CrossEncoder", revision=revision, local_files_only=local_files_only, token=token,
                            processor_kwargs=processor_kwargs, tokenizer_kwargs=tokenizer_kwargs,
                            config_kwargs=config_kwargs, prompts=prompts, default_prompt_name=default_prompt_name)
        precision = _check_precision_arg(precision)
        mk_precision = _pop_model_kwargs("CrossEncoder", model_kwargs)
        if precision is not None and mk_precision is not None and precision != mk_precision:
            raise InvalidInputError("precision given twice with different values (argument and model_kwargs)")
        base = settings or _bulk_settings()
        # An explicit device wins; without one, a caller's Settings(providers=...) stands.
        updates: dict[str, Any] = {} if device is None and settings is not None else {"providers": _providers(device)}
        if cache_folder is not None:
            updates["cache_dir"] = Path(cache_folder)
        export_precision, self._settings = _runtime(precision or mk_precision, base.model_copy(update=updates))
        self.model = _load(Reranker, model_name_or_path, precision=export_precision,
                           max_length=max_length, settings=self._settings)
        if num_labels is not None and num_labels != self.num_labels:
            raise InvalidInputError(f"num_labels={num_labels} but the model has {self.num_labels} "
                                    "(a new classification head needs training, which Encapure does not do)")
        self.activation_fn: str | Callable[..., Any] = (
            activation_fn if activation_fn is not None else _default_activation(self.model))
        self.device = "cuda" if "CUDAExecutionProvider" in self._settings.providers else "cpu"

    @property
    def num_labels(self) -> int:
        return int(self.model.output_dim)

    @property
    def max_seq_length(self) -> int:
        return self.model.max_length

    @property
    def max_length(self) -> int:
        """The older name sentence-transformers still answers to."""
        return self.model.max_length

    def predict(
        self,
        sentences: Sequence[Sequence[str]] | Sequence[str] | None = None,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        activation_fn: Callable[..., Any] | None = None,
        apply_softmax: bool | None = False,
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        *,
        inputs: Sequence[Sequence[str]] | Sequence[str] | None = None,
    ) -> Any:
        """Scores of (query, document) pairs: ``[n]`` for one-label models, ``[n, labels]`` otherwise.

        With the model's activation (sigmoid unless its config saved another) unless ``activation_fn``
        is given; a single pair gives a scalar, like sentence-transformers.
        """
        sentences = _one_of(sentences, inputs)
        _check_batch_size(batch_size)
        single = len(sentences) > 0 and isinstance(sentences[0], str)
        pairs = [sentences] if single else list(sentences)
        logits = self._logits(pairs, batch_size, show_progress_bar)  # type: ignore[arg-type]
        scores = _apply_activation(logits, activation_fn if activation_fn is not None else self.activation_fn)
        if self.num_labels == 1 and scores.ndim > 1:
            scores = scores[:, 0]
        if apply_softmax and scores.ndim > 1:
            from encapure.engine.model import softmax

            scores = softmax(scores)
        return _to_output(np.ascontiguousarray(scores, dtype=np.float32), single, convert_to_numpy,
                          convert_to_tensor)

    def rank(
        self,
        query: str,
        documents: Sequence[str],
        top_k: int | None = None,
        return_documents: bool = False,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        activation_fn: Callable[..., Any] | None = None,
        apply_softmax: bool | None = None,
        convert_to_numpy: bool | None = None,
        convert_to_tensor: bool | None = None,
    ) -> list[dict[str, Any]]:
        """``[{"corpus_id", "score"(, "text")}]`` best first (ties keep input order), cut to ``top_k``.

        ``apply_softmax`` / ``convert_to_*`` change nothing here, as in sentence-transformers (which
        deprecated them on ``rank``: scores are always Python floats); they are accepted for the callers
        (haystack) that still pass them.
        """
        if self.num_labels != 1:
            raise InvalidInputError("CrossEncoder.rank() only works for models with num_labels=1; use predict()")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)):
            raise InvalidInputError(f"top_k must be an integer or None, got {top_k!r}")
        docs = list(documents)
        scores = self.predict([[query, d] for d in docs], batch_size=batch_size,
                              show_progress_bar=show_progress_bar, activation_fn=activation_fn)
        results: list[dict[str, Any]] = []
        for i, score in enumerate(np.asarray(scores).tolist()):
            item: dict[str, Any] = {"corpus_id": i, "score": score}
            if return_documents:
                item["text"] = docs[i]
            results.append(item)
        results.sort(key=lambda r: r["score"], reverse=True)
        return results[:top_k]

    def _logits(self, pairs: list[Sequence[str]], batch_size: int, show_progress_bar: bool | None) -> F32:
        """Raw per-label logits ``[n, labels]`` in input order (windows are not used: long pairs are cut)."""
        for i, p in enumerate(pairs):
            if isinstance(p, str) or len(p) != 2:
                raise InvalidInputError(f"sentences[{i}] must be a (query, document) pair")
        n = len(pairs)
        width = self.num_labels
        out = np.zeros((n, width), dtype=np.float32)
        if n == 0:
            return out
        m = self.model
        prepared = m.prepare_pair_list([(p[0], p[1]) for p in pairs], raw_scores=True)
        rows = _run_in_chunks(m, prepared, batch_size, show_progress_bar, "Batches")
        out = fold_max(rows, prepared.owners, n, width)
        return out

    def __repr__(self) -> str:
        return f"encapure.compat.CrossEncoder({self.model!r}, activation_fn={self.activation_fn!r})"


# --- SentenceTransformer ----------------------------------------------------------------------
class SentenceTransformer:
    """``sentence_transformers.SentenceTransformer``'s ``encode`` and friends on an Encapure embedder."""

    def __init__(
        self,
        model_name_or_path: str,
        *,
        device: str | None = None,
        prompts: dict[str, str] | None = None,
        default_prompt_name: str | None = None,
        similarity_fn_name: SimilarityName | None = None,
        truncate_dim: int | None = None,
        trust_remote_code: bool = False,
        precision: CompatPrecision | None = None,
        settings: Settings | None = None,
        cache_folder: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        backend: Literal["torch", "onnx"] = "torch",
        revision: str | None = None,
        local_files_only: bool = False,
        token: bool | str | None = None,
        processor_kwargs: dict[str, Any] | None = None,
        tokenizer_kwargs: dict[str, Any] | None = None,
        config_kwargs: dict[str, Any] | None = None,
    ) -> None:
        """``precision`` and ``settings`` are ours; the rest are sentence-transformers' arguments."""
        if trust_remote_code:
            raise InvalidInputError(
                "trust_remote_code=True is not supported: Encapure runs exported ONNX graphs and never executes "
                "code from a model repository; pass trust_remote_code=False"
            )
        if backend not in ("torch", "onnx"):
            raise InvalidInputError(f"backend={backend!r} is not supported; Encapure runs ONNX Runtime "
                                    "('torch' and 'onnx' both mean the Encapure engine)")
        _refuse_unsupported("SentenceTransformer", revision=revision, local_files_only=local_files_only,
                            token=token, processor_kwargs=processor_kwargs, tokenizer_kwargs=tokenizer_kwargs,
                            config_kwargs=config_kwargs)
        precision = _check_precision_arg(precision)
        mk_precision = _pop_model_kwargs("SentenceTransformer", model_kwargs)
        if precision is not None and mk_precision is not None and precision != mk_precision:
            raise InvalidInputError("precision given twice with different values (argument and model_kwargs)")
        if similarity_fn_name is not None and str(getattr(similarity_fn_name, "value", similarity_fn_name)) \
                not in _SIMILARITIES:
            raise InvalidInputError(f"similarity_fn_name must be one of {', '.join(_SIMILARITIES)}, "
                                    f"got {similarity_fn_name!r}")
        base = settings or _bulk_settings()
        # An explicit device wins; without one, a caller's Settings(providers=...) stands.
        updates: dict[str, Any] = {} if device is None and settings is not None else {"providers": _providers(device)}
        if cache_folder is not None:
            updates["cache_dir"] = Path(cache_folder)
        settings_now = base.model_copy(update=updates)
        self._source = model_name_or_path
        asked = precision or mk_precision
        # An exported folder runs as exported (its precision is fixed): the bf16 default is for models
        # exported on load.
        if asked is None and not (Path(str(model_name_or_path)).expanduser() / MANIFEST_NAME).is_file():
            asked = default_embedder_precision(settings_now)
        self._precision, self._settings = _runtime(asked, settings_now)
        self.model = _load(Embedder, model_name_or_path, precision=self._precision, max_length=None,
                           settings=self._settings)
        # sentence-transformers always has "query" and "document" prompts ("" when the model has none).
        self.prompts: dict[str, str] = {"query": self.model.manifest.query_prefix or "",
                                        "document": self.model.manifest.document_prefix or ""}
        self.prompts.update(prompts or {})
        if default_prompt_name is not None and default_prompt_name not in self.prompts:
            raise InvalidInputError(f"default_prompt_name {default_prompt_name!r} is not among the prompts "
                                    f"{sorted(self.prompts)}")
        self.default_prompt_name = default_prompt_name
        self.similarity_fn_name: str = str(getattr(similarity_fn_name, "value", similarity_fn_name or "cosine"))
        self.truncate_dim = self._check_dim(truncate_dim)
        self.device = "cuda" if "CUDAExecutionProvider" in self._settings.providers else "cpu"

    # --- properties -----------------------------------------------------------------------
    @property
    def max_seq_length(self) -> int:
        return self.model.max_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        """Reload with the new limit (cheap: the exported graph is reused), as tokenizer limits are fixed."""
        if value == self.model.max_length:
            return
        old = self.model
        folder = old.folder if (old.folder / MANIFEST_NAME).is_file() else self._source
        self.model = _load(Embedder, folder, precision=None if folder == old.folder else self._precision,
                           max_length=int(value), settings=self._settings)
        old.close()

    def get_sentence_embedding_dimension(self) -> int:
        return self.get_embedding_dimension()

    def get_embedding_dimension(self) -> int:
        dim = int(self.model.output_dim)
        return min(dim, self.truncate_dim) if self.truncate_dim else dim

    # --- encoding ---------------------------------------------------------------------------
    def encode(
        self,
        sentences: str | Sequence[str] | None = None,
        prompt_name: str | None = None,
        prompt: str | None = None,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        output_value: str | None = "sentence_embedding",
        precision: str = "float32",
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        device: str | None = None,
        normalize_embeddings: bool = False,
        truncate_dim: int | None = None,
        *,
        inputs: str | Sequence[str] | None = None,
    ) -> Any:
        """``[n, D]`` float32 (one text gives ``[D]``), as sentence-transformers: the model's own pooling
        and normalization, then ``truncate_dim``, then ``normalize_embeddings``."""
        if output_value != "sentence_embedding":
            raise InvalidInputError(f"output_value={output_value!r} is not supported: Encapure returns "
                                    "sentence embeddings only")
        if precision != "float32":
            raise InvalidInputError(f"precision={precision!r} is not supported: encode returns float32 "
                                    "(quantize afterwards with sentence_transformers.quantize_embeddings)")
        if device is not None and (_providers(device) and str(device).lower() not in (self.device, f"{self.device}:0")):
            raise InvalidInputError(f"encode(device={device!r}) differs from the model's device "
                                    f"{self.device!r}; load another instance for it")
        sentences = _one_of(sentences, inputs)
        _check_batch_size(batch_size)
        single = isinstance(sentences, str)
        texts: list[str] = [sentences] if isinstance(sentences, str) else list(sentences)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise InvalidInputError(f"sentences[{i}] must be a string, got {type(t).__name__}")
        resolved = self._resolve_prompt(prompt, prompt_name)
        if resolved:
            texts = [resolved + t for t in texts]
        dim = self._check_dim(truncate_dim) or self.truncate_dim
        m = self.model
        if texts:
            prepared = m.prepare_texts(texts)
            done = m.finish(prepared, _run_in_chunks(m, prepared, batch_size, show_progress_bar, "Batches"))
            assert isinstance(done, EmbedOutput)
            out = done.embeddings
        else:
            out = np.zeros((0, m.output_dim), dtype=np.float32)
        if dim:
            out = np.ascontiguousarray(out[:, :dim])
        if normalize_embeddings and len(out):
            out = l2_normalize(out)
        if not len(texts) and not convert_to_tensor:
            return np.array([]) if convert_to_numpy else []
        return _to_output(out, single, convert_to_numpy, convert_to_tensor)

    def encode_query(self, sentences: str | Sequence[str] | None = None, prompt_name: str | None = None,
                     prompt: str | None = None, **kwargs: Any) -> Any:
        """``encode`` with the ``"query"`` prompt when the model has one and no other was given."""
        if prompt_name is None and prompt is None and "query" in self.prompts:
            prompt_name = "query"
        return self.encode(sentences, prompt_name=prompt_name, prompt=prompt, **kwargs)

    def encode_document(self, sentences: str | Sequence[str] | None = None, prompt_name: str | None = None,
                        prompt: str | None = None, **kwargs: Any) -> Any:
        """``encode`` with the first of the ``"document"``/``"passage"``/``"corpus"`` prompts the model has."""
        if prompt_name is None and prompt is None:
            prompt_name = next((p for p in ("document", "passage", "corpus") if p in self.prompts), None)
        return self.encode(sentences, prompt_name=prompt_name, prompt=prompt, **kwargs)

    def _resolve_prompt(self, prompt: str | None, prompt_name: str | None) -> str | None:
        if prompt is not None:
            return prompt
        if prompt_name is not None:
            if prompt_name not in self.prompts:
                raise InvalidInputError(f"Prompt name {prompt_name!r} not found in the configured prompts "
                                        f"dictionary with keys {list(self.prompts)!r}")
            return self.prompts[prompt_name]
        if self.default_prompt_name is not None:
            return self.prompts.get(self.default_prompt_name)
        return None

    def _check_dim(self, dim: int | None) -> int | None:
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int)
                                or not 1 <= dim <= self.model.output_dim):
            raise InvalidInputError(f"truncate_dim must be an integer in 1..{self.model.output_dim}, got {dim!r}")
        return dim

    # --- similarity -------------------------------------------------------------------------
    def similarity(self, embeddings1: Any, embeddings2: Any) -> Any:
        """``[n1, n2]`` scores with ``similarity_fn_name`` (cosine by default), like sentence-transformers:
        a torch tensor when torch is installed (its return type), a float32 ndarray otherwise."""
        a = _as_2d(embeddings1)
        b = _as_2d(embeddings2)
        name = self.similarity_fn_name
        if name == "cosine":
            scores = l2_normalize(a) @ l2_normalize(b).T
        elif name == "dot":
            scores = a @ b.T
        elif name == "euclidean":
            scores = -np.sqrt(np.maximum(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1), 0))
        else:
            scores = -np.abs(a[:, None, :] - b[None, :, :]).sum(-1)
        scores = np.ascontiguousarray(scores, dtype=np.float32)
        torch = _torch_if_installed()
        return torch.from_numpy(scores) if torch is not None else scores

    def __repr__(self) -> str:
        return f"encapure.compat.SentenceTransformer({self.model!r})"


def _as_2d(x: Any) -> F32:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    elif isinstance(x, list) and x and hasattr(x[0], "detach"):
        x = np.stack([t.detach().cpu().numpy() for t in x])
    arr = np.asarray(x, dtype=np.float32)
    return arr[None, :] if arr.ndim == 1 else arr
