"""bf16 inference on OpenVINO (``Settings.openvino_inference_precision``, ``precision="bf16"`` in compat).

Checked here: the setting is refused where it cannot be honoured (ONNX Runtime, ``backend=auto``, a
CPU without native bf16), bf16 embeddings of all-MiniLM-L6-v2 keep the engine's bar against
sentence-transformers on the 304 mixed texts of test_engine_embed.py, a text embeds the same alone and
in a padded batch, and the compat embedder's default follows the documented rule.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import embedder_source
from pydantic import ValidationError
from test_engine_embed import _cosines, _mixed_texts

from encapure.engine import Embedder
from encapure.errors import InvalidInputError, ModelError
from encapure.settings import Settings, describe_error

ov = pytest.importorskip("openvino", reason="bf16 runs on OpenVINO (the openvino extra)")
from encapure.engine.backends.openvino import cpu_native_bf16  # noqa: E402

native = pytest.mark.skipif(not cpu_native_bf16(), reason="this CPU has no native bf16 (OpenVINO reports no "
                            "BF16 capability: needs AVX-512 BF16 or AMX)")


def test_bf16_refused_off_openvino() -> None:
    for backend in ("onnxruntime", "auto"):
        with pytest.raises(ValidationError, match="openvino backend only") as e:
            Settings(backend=backend, openvino_inference_precision="bf16")
        assert "invalid settings: " in describe_error(e.value)
    # from the environment too, and on assignment
    os.environ["ENCAPURE_OPENVINO_INFERENCE_PRECISION"] = "bf16"
    try:
        with pytest.raises(ValidationError, match="openvino backend only"):
            Settings()
        assert Settings(backend="openvino").openvino_inference_precision == "bf16"
    finally:
        del os.environ["ENCAPURE_OPENVINO_INFERENCE_PRECISION"]
    s = Settings(backend="openvino", openvino_inference_precision="bf16")
    with pytest.raises(ValidationError):
        s.backend = "onnxruntime"
    # f32 and auto are meaningful with any backend (auto: bf16 only where OpenVINO runs on native bf16)
    assert Settings(backend="onnxruntime", openvino_inference_precision="auto").backend == "onnxruntime"


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return _mixed_texts()


@pytest.fixture(scope="module")
def bf16(embedder_fp32_dir: Path) -> Embedder:
    if not cpu_native_bf16():
        pytest.skip("this CPU has no native bf16")
    s = Settings(backend="openvino", openvino_inference_precision="bf16", workers=1, threads_per_worker=2)
    return Embedder.from_pretrained(embedder_fp32_dir, settings=s)


@native
def test_bf16_runs_in_bf16_and_keeps_the_cosine_bar(bf16: Embedder, embedder_fp32_dir: Path,
                                                    texts: list[str]) -> None:
    """The 304 texts against sentence-transformers (the engine's embedder bar: every text >= 0.99);
    measured min 0.9999 (AMD EPYC AVX-512 BF16, OpenVINO 2026.4). Also far from exact: bf16 did run."""
    from sentence_transformers import SentenceTransformer

    session = bf16.model.session
    assert session.inference_precision == "bf16"
    assert session._compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.bf16
    st = SentenceTransformer(str(embedder_source()), device="cpu")
    ref = np.asarray(st.encode(texts, batch_size=32, normalize_embeddings=True), dtype=np.float32)
    got = bf16.embed(texts)
    cos = _cosines(got, ref)
    print(f"\nbf16 cosine vs sentence-transformers: min={cos.min():.6f} mean={cos.mean():.6f}")
    assert cos.min() >= 0.99
    f32 = Embedder.from_pretrained(embedder_fp32_dir, settings=Settings(backend="openvino", workers=1))
    assert f32.model.session.inference_precision == "f32"
    assert np.abs(f32.embed(texts) - got).max() > 1e-4  # bf16 really changed the arithmetic


@native
def test_bf16_is_batch_invariant(bf16: Embedder, texts: list[str]) -> None:
    """A text alone and inside a padded batch: the same vector. Measured max |d| 0.0 on all 304 texts
    (OpenVINO 2026.4, AMD EPYC AVX-512 BF16) since the backend pads batches to a multiple of 16 tokens;
    before that, odd widths took other kernel tails and differed by 7.6e-4 (cosine 0.99999)."""
    sample = texts[::3]
    batched = bf16.embed(sample)  # engine batches per length band, padded to their longest
    alone = np.stack([bf16.embed(t) for t in sample])
    print(f"\nbf16 alone vs batched: max |d| = {np.abs(alone - batched).max():.2e}")
    np.testing.assert_allclose(alone, batched, atol=1e-5, rtol=0)


def test_explicit_bf16_refused_without_native_bf16(embedder_fp32_dir: Path) -> None:
    """Where the device reports no native bf16 (a CPU without it, or a device that cannot say),
    bf16 is refused: OpenVINO would emulate it or quietly run f32."""
    s = Settings(backend="openvino", openvino_inference_precision="bf16", openvino_device="AUTO:CPU")
    with pytest.raises(ModelError, match="no native bf16"):
        Embedder.from_pretrained(embedder_fp32_dir, settings=s)
    auto = Settings(backend="openvino", openvino_inference_precision="auto", openvino_device="AUTO:CPU")
    assert Embedder.from_pretrained(embedder_fp32_dir, settings=auto).model.session.inference_precision == "f32"


def test_auto_follows_the_cpu(embedder_fp32_dir: Path) -> None:
    s = Settings(backend="openvino", openvino_inference_precision="auto", workers=1)
    got = Embedder.from_pretrained(embedder_fp32_dir, settings=s).model.session.inference_precision
    assert got == ("bf16" if cpu_native_bf16() else "f32")


def test_compat_precision_bf16(embedder_fp32_dir: Path, embedder_int8_dir: Path, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    from encapure.compat import SentenceTransformer, default_embedder_precision

    monkeypatch.delenv("ENCAPURE_BACKEND", raising=False)  # the suite's pin (conftest.py) would count as a choice

    if cpu_native_bf16():
        m = SentenceTransformer(str(embedder_fp32_dir), precision="bf16")
        assert m.model.session.inference_precision == "bf16"
    with pytest.raises(InvalidInputError, match="exported int8"):
        SentenceTransformer(str(embedder_int8_dir), precision="bf16")  # bf16 runs the fp32 file
    with pytest.raises(InvalidInputError, match="openvino backend only"):
        SentenceTransformer(str(embedder_fp32_dir), precision="bf16", settings=Settings(backend="onnxruntime"))
    # The default rule: bf16 on native-bf16 CPUs unless the caller chose precision, backend or device.
    assert default_embedder_precision(Settings()) == ("bf16" if cpu_native_bf16() else None)
    assert default_embedder_precision(Settings(precision="int8")) is None
    assert default_embedder_precision(Settings(backend="onnxruntime")) is None
    assert default_embedder_precision(Settings(providers=["cuda"])) is None
    # An exported folder runs as exported, default or not.
    assert type(SentenceTransformer(str(embedder_fp32_dir)).model.session).__name__ != "OpenVINOSession"


def test_compat_default_embedder_follows_the_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``SentenceTransformer(hf_folder)`` end to end: the fp32 export on OpenVINO bf16 where the CPU has
    native bf16, else the calibrated int8 export on the default backend."""
    from encapure.compat import SentenceTransformer

    monkeypatch.delenv("ENCAPURE_BACKEND", raising=False)  # the suite's pin (conftest.py) would count as a choice
    monkeypatch.setenv("ENCAPURE_CACHE_DIR", str(tmp_path / "cache"))  # auto's probe record, if it probes

    m = SentenceTransformer(str(embedder_source()), cache_folder=str(tmp_path))
    session = m.model.session
    if cpu_native_bf16():
        assert m.model.manifest.precision == "fp32" and session.inference_precision == "bf16"
    else:
        assert m.model.manifest.precision == "int8"  # on whichever runtime auto's probe picked
    assert m.encode(["a glacier cave"]).shape == (1, 384)
