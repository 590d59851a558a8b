"""``export_model``: a Hugging Face model in, an Encapure model folder out.

Steps: resolve the source (folder, hub id, or in-memory model) -> detect task/pooling/max length ->
write tokenizer.json -> trace fp32 ONNX -> (optimize) -> quantize -> parity against PyTorch ->
manifest. Everything is built in a temporary sibling folder and renamed into place at the end, so
a failed or interrupted export never leaves a half-written model behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from encapure.errors import ExportError, ParityError, UnsupportedModelError
from encapure.export import colbert
from encapure.export import parity as par
from encapure.export.detect import (
    SourceInfo,
    detect,
    find_model_dir,
    has_tokenizer,
    read_json,
    tokenizer_model_max_length,
)
from encapure.export.progress import Progress
from encapure.hub import download, missing_ir_modules
from encapure.manifest import MANIFEST_NAME, PARITY_NAME, Manifest
from encapure.settings import PRECISIONS

# Bump when the exporter's output changes (the test fixture cache keys on it).
EXPORT_VERSION = "9"
# "auto": what the OpenVINO backend runs fastest, known only after task detection (resolve_format).
FORMATS = ("auto", "onnx", "openvino")


def resolve_format(fmt: str, precision: str, task: str, *, decoder: bool = False, colbert: bool = False) -> str:
    """The concrete format of an export asked for as ``fmt`` (``auto`` resolves, the others are kept).

    ``auto`` is for the OpenVINO backend, which runs either format: an encoder embedder at int8
    becomes the NNCF static int8 IR (all-MiniLM-L6-v2: 1.84x fp32, against 1.1x for the ONNX QDQ
    embedder recipe, which keeps both FFN MatMuls fp32 for ONNX Runtime's sake); everything else
    stays ONNX (the reranker QDQ graph already runs fast on OpenVINO; ColBERT has no IR path; the
    static IR recipe was measured on BERT-family encoders only, not on decoder embedders). Without
    openvino/nncf it falls back to ONNX with a warning rather than failing: the ONNX int8 embedder
    is correct on every backend, only slower.
    """
    if fmt != "auto":
        return fmt
    if precision != "int8" or task != "embed" or decoder or colbert:
        return "onnx"
    missing = missing_ir_modules()
    if missing:
        import logging

        logging.getLogger(__name__).warning(
            "the OpenVINO int8 embedder recipe (static int8 IR) needs %s: exporting ONNX int8 instead, which "
            "is slower (pip install 'encapure[export,openvino]')", " and ".join(missing))
        return "onnx"
    return "openvino"


@dataclass
class ExportResult:
    output: Path
    manifest: Manifest
    parity: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    size_bytes: int = 0

    @property
    def model_path(self) -> Path:
        return self.output / self.manifest.model_file


def export_model(
    source: Any,
    output: str | Path,
    *,
    task: str = "auto",
    precision: str = "int8",
    max_length: int | None = None,
    tokenizer: Any = None,
    optimize: str = "auto",
    check_parity: bool = True,
    progress: bool | Progress = False,
    overwrite: bool = True,
    calibration: str | Path | None = None,
    template: dict[str, str] | None = None,
    format: str = "onnx",
    int8_recipe: str = "auto",
) -> ExportResult:
    """Export ``source`` (folder, hub id, or in-memory transformers model) into ``output``.

    ``tokenizer`` is a transformers/tokenizers object or a folder; required for in-memory models.
    ``optimize``: "auto" (fuse where it measured faster for this precision), "on", "off".
    ``calibration``: a JSONL/text file for static int8 (default: the set shipped in encapure/data).
    ``template``: a prompt template (``prefix``, ``body``, ``suffix``, ``instruction``) that makes a
    decoder LM (Qwen3/Qwen2 ``*ForCausalLM``) a yes/no reranker; Qwen3-Reranker's is the default for
    such models detected by name or ``task="rerank"`` (see ``encapure.export.qwen3``).
    ``int8_recipe`` (int8 only): "auto" (calibrated static, chosen per task), "static", or
    "per-token" (one activation scale per token at run time; see ``quantize.int8_recipe``).
    ``format``: "onnx" (``model.onnx``, any backend) or "openvino" (``model.xml``/``model.bin`` IR with
    NNCF weight-only int4/int8, run by the OpenVINO backend only; see ``encapure.export.openvino_ir``), or
    "auto": the fastest for the OpenVINO backend, decided once the task is known (``resolve_format``).
    Raises ExportError subclasses with one-line messages; ParityError when fp32 does not match.
    """
    prog = progress if isinstance(progress, Progress) else Progress(bool(progress))
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if optimize not in ("auto", "on", "off"):
        raise ExportError(f"optimize must be auto, on or off, not {optimize!r}")
    from encapure.export import openvino_ir

    if format not in FORMATS:
        raise ExportError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    if format == "openvino":
        openvino_ir.recipe(precision)  # refuses fp16 before minutes of work
    from encapure.export.quantize import INT8_SCHEMES

    if int8_recipe not in INT8_SCHEMES:
        raise ExportError(f"unknown int8 recipe {int8_recipe!r}; choose one of {', '.join(INT8_SCHEMES)}")
    if int8_recipe != "auto" and (precision != "int8" or format != "onnx"):
        raise ExportError(f"int8_recipe={int8_recipe!r} applies to --precision int8 --format onnx only")
    output = Path(output).expanduser().resolve()
    _check_output(output, overwrite)
    try:
        return _export(source, output, task=task, precision=precision, max_length=max_length,
                       tokenizer=tokenizer, optimize=optimize, check_parity=check_parity, prog=prog,
                       calibration=calibration, template=template, fmt=format, int8_recipe=int8_recipe)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ExportError(f"disk full while writing the export next to {output}: free some space") from e
        raise ExportError(f"export failed: {e}") from e
    except MemoryError as e:
        raise ExportError("out of memory during export: close other programs or use a bigger machine") from e


def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise ExportError(f"output {output} exists and is not a folder")
    if output.is_dir() and any(output.iterdir()):
        if not (output / MANIFEST_NAME).is_file():
            raise ExportError(f"output {output} is not empty and is not an Encapure model folder; refusing to overwrite")
        if not overwrite:
            raise ExportError(f"output {output} already holds an exported model")


# --- source resolution -------------------------------------------------------------------------------
def _resolve_folder(source: str | Path, prog: Progress) -> tuple[Path, str]:
    path = Path(source).expanduser()
    if path.exists():
        return path.resolve(), str(path.resolve())
    text = str(source)
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or (os.sep == "\\" and "\\" in text):
        raise UnsupportedModelError(f"{source} does not exist")
    return _download(text, prog), text


def _download(repo_id: str, prog: Progress) -> Path:
    with prog.step(f"Downloading {repo_id}"):
        return download(repo_id)


def _safetensors_only(folder: Path) -> bool:
    return any(folder.glob("*.safetensors"))


# --- the pipeline ------------------------------------------------------------------------------------
def _export(
    source: Any,
    output: Path,
    *,
    task: str,
    precision: str,
    max_length: int | None,
    tokenizer: Any,
    optimize: str,
    check_parity: bool,
    prog: Progress,
    calibration: str | Path | None = None,
    template: dict[str, str] | None = None,
    fmt: str = "onnx",
    int8_recipe: str = "auto",
) -> ExportResult:
    t_start = time.perf_counter()
    in_memory = not isinstance(source, (str, Path))
    tok_obj: Any = None
    colbert_src: colbert.ColbertSource | None = None
    st_root: Path | None = None
    if in_memory:
        if not hasattr(source, "config") or not hasattr(source, "forward"):
            raise ExportError(f"source must be a path, a hub id or a transformers model, not {type(source).__name__}")
        if tokenizer is None:
            raise ExportError("an in-memory model needs tokenizer= (a transformers tokenizer or a folder)")
        config = source.config.to_dict()
        if not config.get("architectures"):
            config["architectures"] = [type(source).__name__]
        src_label = f"in-memory {type(source).__name__}"
        name = str(getattr(source, "name_or_path", "") or config.get("_name_or_path") or "")
        tok_dir: Path | None = Path(tokenizer) if isinstance(tokenizer, (str, Path)) else None
        model_dir: Path | None = None
    else:
        root, src_label = _resolve_folder(source, prog)
        name = src_label
        model_dir = find_model_dir(root)
        st_root = root
        config = read_json(model_dir / "config.json")
        tok_dir = Path(tokenizer) if isinstance(tokenizer, (str, Path)) else (
            model_dir if has_tokenizer(model_dir) else root)
        colbert_src = colbert.detect_colbert(root, model_dir, config)
        if colbert_src is not None:
            task = "auto"  # a ColBERT model reranks (MaxSim) and embeds (multi-vector) whatever was asked
        # architecture problems first: they are the more fundamental error
        detect(config, task=task, name=name, template=template)
        if tokenizer is None and not has_tokenizer(tok_dir):
            raise ExportError(f"no tokenizer in {root}: expected tokenizer.json (or vocab/sentencepiece files)")
        if colbert_src is not None and fmt == "openvino":
            raise ExportError("ColBERT models export to ONNX only (--format onnx)")
    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        tok_obj = tokenizer
    elif tok_dir is not None and not has_tokenizer(tok_dir):
        raise ExportError(f"no tokenizer in {tok_dir}: expected tokenizer.json (or vocab/sentencepiece files)")

    info = detect(config, task=task, model_dir=model_dir, st_root=st_root, max_length=max_length,
                  tokenizer_max=tokenizer_model_max_length(tok_dir), name=name, template=template)
    if st_root is not None and colbert_src is None:
        _st_prompts(st_root, info)
    if colbert_src is not None:
        colbert.apply_info(info, colbert_src, max_length)
    fmt = resolve_format(fmt, precision, info.task, decoder=info.decoder, colbert=colbert_src is not None)

    # Heavy imports only now: `encapure export --help` and early errors stay fast.
    with prog.step("Loading model"):
        import torch

        from encapure.export.tokenizer import (
            light_tokenizer,
            load_hf_tokenizer,
            pad_token_id,
            write_tokenizer,
        )

        torch.set_grad_enabled(False)
        if tok_obj is None:
            assert tok_dir is not None
            tok_obj = load_hf_tokenizer(tok_dir)
        if colbert_src is not None:
            assert model_dir is not None
            model = colbert.load_model(colbert_src, model_dir)
        else:
            model = source if in_memory else _load_model(model_dir, info)  # type: ignore[arg-type]
        if in_memory and info.task == "embed" and info.architecture.endswith(
                ("ForSequenceClassification", "ForCausalLM")):
            model = model.base_model
        model.eval()
        _set_eager(model)

    parent = output.parent
    parent.mkdir(parents=True, exist_ok=True)
    _check_space(parent, model)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=parent))
    work.chmod(0o755)
    try:
        rust_tok = write_tokenizer(tok_obj, work)
        pad_id = pad_token_id(tok_obj, config)
        if colbert_src is not None:
            result = colbert.build(model, info, work, rust_tok, pad_id, src=colbert_src, hf_tokenizer=tok_obj,
                                   precision=precision, optimize=optimize, check_parity=check_parity, prog=prog,
                                   calibration=calibration, int8_recipe=int8_recipe)
        else:
            result = _build(model, info, work, rust_tok, pad_id, precision=precision, optimize=optimize,
                            check_parity=check_parity, prog=prog, calibration=calibration, fmt=fmt,
                            int8_recipe=int8_recipe)
        manifest, report = result
        with prog.step("Checking the SentencePiece tokenizer"):
            manifest.tokenizer = light_tokenizer(tok_dir, tok_obj, rust_tok, info.model_type, work)
        manifest.source = src_label
        manifest.tool_versions = _versions()
        files = sorted(p.name for p in work.iterdir() if p.is_file() and p.name not in (MANIFEST_NAME, PARITY_NAME))
        with prog.step("Writing manifest"):
            manifest.compute_files(work, files)
            manifest.validate()
            manifest.save(work)
            report["timings_s"] = dict(prog.timings)
            (work / PARITY_NAME).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        _replace_dir(work, output)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in output.iterdir() if p.name.startswith(("model.onnx", "model.xml", "model.bin")))
    prog.timings["total"] = round(time.perf_counter() - t_start, 3)
    return ExportResult(output=output, manifest=manifest, parity=report, timings=dict(prog.timings), size_bytes=size)


def _st_prompts(root: Path, info: SourceInfo) -> None:
    cfg = root / "config_sentence_transformers.json"
    if not cfg.is_file():
        return
    prompts = read_json(cfg).get("prompts") or {}
    if isinstance(prompts, dict):
        q = prompts.get("query")
        d = prompts.get("document", prompts.get("passage"))
        info.query_prefix = q if isinstance(q, str) and q else None
        info.document_prefix = d if isinstance(d, str) and d else None


def _load_model(model_dir: Path, info: SourceInfo) -> Any:
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    cls: Any = AutoModelForSequenceClassification if info.task in ("rerank", "classify") else AutoModel
    if info.prompt_template is not None:
        cls = AutoModelForCausalLM  # the yes/no rows of its LM head become the score
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - cosmetic only
        pass
    try:
        return cls.from_pretrained(str(model_dir), attn_implementation="eager", dtype="float32")
    except (OSError, ValueError, KeyError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "does not appear to have a file" in msg or "no file named" in msg.lower():
            raise ExportError(f"no model weights in {model_dir}: {msg}") from e
        raise UnsupportedModelError(f"cannot load {model_dir} ({info.architecture or info.model_type}): {msg}") from e


def _set_eager(model: Any) -> None:
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "_attn_implementation"):
        with contextlib.suppress(Exception):
            cfg._attn_implementation = "eager"


def _check_space(folder: Path, model: Any) -> None:
    """Refuse early when the disk cannot hold the fp32 graph plus the output."""
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    free = shutil.disk_usage(folder).free
    if free < 2.2 * n_bytes + (64 << 20):
        raise ExportError(
            f"disk full: {folder} has {free / 1e9:.1f} GB free, the export needs about {2.2 * n_bytes / 1e9:.1f} GB"
        )


def _replace_dir(work: Path, output: Path) -> None:
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        os.replace(output, old)
        os.replace(work, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(work, output)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("encapure", "torch", "transformers", "onnx", "onnxruntime", "tokenizers", "openvino", "nncf"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    out["export_version"] = EXPORT_VERSION
    return out


def _build(
    model: Any,
    info: SourceInfo,
    work: Path,
    rust_tok: Any,
    pad_id: int,
    *,
    precision: str,
    optimize: str,
    check_parity: bool,
    prog: Progress,
    calibration: str | Path | None = None,
    fmt: str = "onnx",
    int8_recipe: str = "auto",
) -> tuple[Manifest, dict[str, Any]]:
    from encapure.export import optimize as opt
    from encapure.export import quantize as qz
    from encapure.export.onnx_export import encoder_inputs, export_onnx

    input_names = encoder_inputs(model, info.config)
    output_kind = "logits" if info.task in ("rerank", "classify") else "token_embeddings"
    output_name = "logits" if output_kind == "logits" else "token_embeddings"
    items, _ = par.sample_inputs(info.task)
    traced = model
    yes_no: tuple[int, int] | None = None
    if info.prompt_template is not None:
        from encapure.export import qwen3

        yes_no = qwen3.yes_no_ids(rust_tok)
        traced = qwen3.yes_no_module(model, *yes_no)
        batches = qwen3.template_feeds(rust_tok, info.prompt_template, items[:4], min(info.max_length, 512), pad_id,
                                       batch_size=4)
    else:
        batches = par.encode(rust_tok, items[:4], min(info.max_length, 512), pad_id)
    ir = fmt == "openvino"
    final = work / "model.onnx"
    fp32_path = final if precision == "fp32" and not ir else work / "fp32.onnx"
    with prog.step("Exporting to ONNX (fp32)"):
        export_onnx(traced, fp32_path, input_names=input_names, output_name=output_name,
                    output_kind=output_kind, sample=batches[0])

    fusions: dict[str, int] = {}
    # IR: OpenVINO fuses attention/LayerNorm itself; ORT's contrib-op fusions would not convert.
    want_fusion = not ir and opt.should_fuse(info.model_type, precision, optimize)
    if want_fusion:
        with prog.step("Optimizing graph (fusion)"):
            fusions = opt.fuse(fp32_path, fp32_path, info.config, info.model_type)

    recipe: dict[str, Any] | None = None
    ir_quant: dict[str, Any] | None = None
    if ir:
        from encapure.export import openvino_ir

        label = {"fp32": "Converting to OpenVINO IR (fp32)"}.get(
            precision, f"Converting to OpenVINO IR and compressing weights ({precision}, NNCF)")

        def ptq_feeds() -> list[dict[str, Any]]:
            from encapure.export import calibration as cal

            items = cal.load_items(calibration, info.task)
            return cal.feeds(rust_tok, items, input_names, min(info.max_length, 512), pad_id, batch_size=1)

        if openvino_ir.recipe(precision, info.task)["method"] == "nncf_ptq":
            label = f"Converting to OpenVINO IR and quantizing ({precision} static, NNCF)"
        with prog.step(label):
            ir_quant = openvino_ir.convert(fp32_path, work / openvino_ir.IR_FILE, precision, task=info.task,
                                           calibration=ptq_feeds)
        for p in (fp32_path, fp32_path.with_name(fp32_path.name + ".data")):
            p.unlink(missing_ok=True)
    elif precision == "int8":
        large = fp32_path.with_name(fp32_path.name + ".data").exists()  # weights past the 2 GB protobuf limit
        recipe = qz.int8_recipe(info.task, info.model_type, large=large, scheme=int8_recipe)
        if large and recipe["method"] == "dynamic":
            prog.info("int8: the model is over 2 GB, so dynamic int8 (static calibration does not fit in memory yet)")

    def feeds() -> list[dict[str, Any]]:
        from encapure.export import calibration as cal

        items = cal.load_items(calibration, info.task)
        if info.prompt_template is not None:
            from encapure.export import qwen3

            return qwen3.template_feeds(rust_tok, info.prompt_template, items, min(info.max_length, 512), pad_id)
        return cal.feeds(rust_tok, items, input_names, min(info.max_length, 512), pad_id)

    if ir_quant is not None:
        quant = ir_quant
    else:
        quant = qz.apply_precision(precision, fp32_path, final, recipe=recipe, feeds=feeds, calibration=calibration,
                                   prog=prog)

    hidden = info.config.get("hidden_size") or info.config.get("dim") or info.config.get("d_model")
    manifest = Manifest(
        task=info.task,  # type: ignore[arg-type]
        precision=precision,
        max_length=info.max_length,
        input_names=input_names,
        output_name=output_name,
        output_kind=output_kind,  # type: ignore[arg-type]
        pooling=info.pooling,  # type: ignore[arg-type]
        normalize=info.normalize,
        labels=info.labels,
        score_activation=info.score_activation,  # type: ignore[arg-type]
        query_prefix=info.query_prefix,
        document_prefix=info.document_prefix,
        prompt_template=info.prompt_template,
        pad_token_id=pad_id,
        embedding_dim=int(hidden) if info.task == "embed" and hidden else None,
        architecture=info.architecture,
        model_type=info.model_type,
        fusions=fusions,
        quantization=quant,
    )
    if ir:
        manifest.model_file = "model.xml"
    report: dict[str, Any] = {"precision": precision, "task": info.task, "fusions": fusions, "quantization": quant}
    if check_parity:
        with prog.step("Verifying against PyTorch"):
            # A draft manifest so the engine loads the folder exactly as it will be served; the final
            # one (with file hashes and versions) replaces it when the export is complete.
            manifest.save(work)
            if yes_no is not None:
                from encapure.export import qwen3

                report.update(qwen3.check(model, work, *yes_no, max_length=min(info.max_length, 512)))
            else:
                report.update(par.check(model, work, info.task, pooling=info.pooling, normalize=info.normalize,
                                        max_length=min(info.max_length, 512)))
        prog.info(par.summary_line(precision, report))
        if precision == "fp32" and report["max_abs_diff"] > par.FP32_ABS_TOL:
            raise ParityError(
                f"fp32 export does not match PyTorch: max |Δ| {report['max_abs_diff']:.2e} > {par.FP32_ABS_TOL:g}"
            )
    return manifest, report

