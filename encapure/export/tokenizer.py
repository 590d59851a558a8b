"""Turn whatever tokenizer a model ships into one ``tokenizer.json`` the engine can trust.

Tokenizer files carry their own padding and truncation (all-MiniLM-L6-v2's pads and cuts at 128
while sentence-transformers uses 256). The manifest's ``max_length`` is the one truth, so the file
we write has both disabled and the engine applies the manifest's limit itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from encapure.errors import ExportError


def load_hf_tokenizer(folder: Path) -> Any:
    """Load with transformers (applies tokenizer_config: lower-casing, added tokens, post-processor)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # transformers raises many types here
        raise ExportError(f"cannot load the tokenizer from {folder}: {_first_line(e)}") from e


def backend_tokenizer(tok: Any) -> Any:
    """The Rust ``tokenizers.Tokenizer`` behind a transformers tokenizer (converting slow ones)."""
    from tokenizers import Tokenizer

    if isinstance(tok, Tokenizer):
        return Tokenizer.from_str(tok.to_str())
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        try:
            from transformers.convert_slow_tokenizer import convert_slow_tokenizer

            backend = convert_slow_tokenizer(tok)
        except Exception as e:
            raise ExportError(
                f"the tokenizer {type(tok).__name__} has no fast (tokenizers) version and cannot be "
                f"converted: {_first_line(e)}"
            ) from e
    # A private copy: we change padding/truncation and must not touch the caller's object.
    return Tokenizer.from_str(backend.to_str())


def write_tokenizer(tok: Any, output: Path) -> Any:
    """Write tokenizer.json with padding and truncation disabled; return the Tokenizer written."""
    rust = backend_tokenizer(tok)
    rust.no_padding()
    rust.no_truncation()
    rust.save(str(output / "tokenizer.json"))
    return rust


def pad_token_id(tok: Any, config: dict[str, Any]) -> int:
    value = getattr(tok, "pad_token_id", None)
    if isinstance(value, int):
        return value
    value = config.get("pad_token_id")
    return value if isinstance(value, int) else 0


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


_XLMR_TYPES = ("xlm-roberta", "xlm-roberta-xl", "xlm_roberta")


def light_tokenizer(tok_dir: Path | None, tok: Any, rust_tok: Any, model_type: str, output: Path) -> str:
    """``"sentencepiece"`` when encapure's SentencePiece-backed tokenizer reproduces ``rust_tok`` for this
    (XLM-R-family) model, with sentencepiece.bpe.model copied into ``output``; ``""`` otherwise.

    Checked here, at export, because at load the point is to never build the HF tokenizer's
    ~280 MB Unigram trie; the engine then trusts the manifest.
    """
    import json
    import logging
    import shutil

    from encapure.engine import spm_tokenizer as spt

    log = logging.getLogger(__name__)
    candidates = [Path(p) for p in (getattr(tok, "vocab_file", None),) if isinstance(p, str)]
    if tok_dir is not None:
        candidates.insert(0, tok_dir / spt.SPM_FILE)
    spm_file = next((p for p in candidates if p.is_file() and p.name == spt.SPM_FILE), None)
    xlmr = model_type in _XLMR_TYPES or type(tok).__name__.startswith("XLMRobertaTokenizer")
    if spm_file is None or not xlmr:
        return ""
    spec = json.loads(rust_tok.to_str())
    if spec.get("model", {}).get("type") != "Unigram":
        return ""
    # Added tokens (ColBERT markers, new specials) live only in tokenizer.json: SpmTokenizer knows XLM-R's five.
    added = {(t.get("content"), t.get("id"), bool(t.get("lstrip"))) for t in spec.get("added_tokens") or []}
    n_vocab = len(spec["model"].get("vocab") or [])
    expected = {("<s>", 0, False), ("<pad>", 1, False), ("</s>", 2, False), ("<unk>", 3, False),
                ("<mask>", n_vocab - 1, True)}
    if added != expected:
        log.info("tokenizer has added tokens beyond XLM-R's specials; serving keeps tokenizers")
        return ""
    try:
        light = spt.SpmTokenizer(spm_file)
        work = rust_tok.__class__.from_str(rust_tok.to_str())
        problems = spt.compare(work, light)
    except (ImportError, ValueError, OSError) as e:
        log.warning("SentencePiece tokenizer not usable for this model (%s); serving keeps tokenizers", e)
        return ""
    if problems:
        log.warning("SentencePiece tokenizer differs from tokenizer.json on %d checks (first: %s); "
                    "serving keeps tokenizers", len(problems), problems[0])
        return ""
    shutil.copyfile(spm_file, output / spt.SPM_FILE)
    return "sentencepiece"
