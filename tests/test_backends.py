"""Backends: the same exported folder scored by OpenVINO and by ONNX Runtime must agree."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from encapure.engine import Embedder, Reranker
from encapure.engine.backends import BACKENDS, create_session
from encapure.errors import ModelError
from encapure.settings import Settings

PAIRS = [
    ("what is the capital of france", "Paris is the capital and most populous city of France."),
    ("what is the capital of france", "Lyon is a city in France."),
    ("how do vaccines work", "Vaccines train the immune system with a harmless piece of a pathogen. " * 8),
    ("¿Cuál es el río más largo?", "El Nilo y el Amazonas compiten por el título."),
    ("", "an empty query still scores"),
]


def test_registry_and_settings_agree() -> None:
    from typing import get_args

    assert set(BACKENDS) | {"auto"} == set(get_args(Settings.model_fields["backend"].annotation))
    with pytest.raises(ModelError, match="does not exist"):
        create_session(Path("/nonexistent/model.onnx"), Settings())


@pytest.fixture(scope="module")
def openvino() -> None:
    pytest.importorskip("openvino", reason="the openvino backend is optional: pip install openvino")


@pytest.mark.usefixtures("openvino")
def test_openvino_fp32_equals_onnxruntime(reranker_fp32_dir: Path) -> None:
    ort = Reranker.from_pretrained(reranker_fp32_dir)
    ov = Reranker.from_pretrained(reranker_fp32_dir, settings=Settings(backend="openvino"))
    assert type(ov.model.session).__name__ == "OpenVINOSession"
    want = ort.score(PAIRS, raw_scores=True)
    got = ov.score(PAIRS, raw_scores=True)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # batch-invariant like ORT: alone == in a batch
    alone = np.array([ov.score([p], raw_scores=True)[0] for p in PAIRS])
    np.testing.assert_allclose(alone, got, atol=1e-5, rtol=0)


@pytest.mark.usefixtures("openvino")
def test_openvino_runs_the_static_int8_graph(reranker_int8_dir: Path, reranker_fp32_dir: Path) -> None:
    """OpenVINO reads our QDQ int8 export as is; scores stay close to fp32.

    Not exactly batch-invariant, unlike ONNX Runtime on the same file: OpenVINO's fp32 kernels round
    by shape (~1e-6), which now and then flips an int8 rounding step. Measured over all WikiQA-test-gold
    pairs (AVX-512 VNNI): max 0.11 logits alone vs batched, ~1e-3 typically; the bound here is that.
    """
    fp32 = Reranker.from_pretrained(reranker_fp32_dir).score(PAIRS, raw_scores=True)
    ov = Reranker.from_pretrained(reranker_int8_dir, settings=Settings(backend="openvino", workers=2))
    got = ov.score(PAIRS, raw_scores=True)
    assert np.abs(got - fp32).max() < 1.0
    assert list(np.argsort(-got[:2])) == list(np.argsort(-fp32[:2]))
    alone = np.array([ov.score([p], raw_scores=True)[0] for p in PAIRS])
    assert np.abs(alone - got).max() < 0.15


@pytest.mark.usefixtures("openvino")
def test_openvino_embedder_equals_onnxruntime(embedder_fp32_dir: Path) -> None:
    texts = ["hello", "A longer sentence about embeddings and how they are pooled.", "北京 😀"]
    want = Embedder.from_pretrained(embedder_fp32_dir).embed(texts)
    got = Embedder.from_pretrained(embedder_fp32_dir, settings=Settings(backend="openvino")).embed(texts)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_openvino_missing_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, reranker_fp32_dir: Path) -> None:
    import builtins

    real_import = builtins.__import__

    def no_openvino(name: str, *args: object, **kwargs: object) -> object:
        if name == "openvino" or name.startswith("openvino."):
            raise ImportError("No module named 'openvino'")
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_openvino)
    with pytest.raises(ModelError, match="pip install openvino"):
        create_session(reranker_fp32_dir / "model.onnx", Settings(backend="openvino"))


# --- --backend auto ----------------------------------------------------------------------------------
class _Wrapped:
    """An ONNX Runtime session with a handicap: slower (runs each batch ``repeat`` times),
    batch-dependent, or off by a constant."""

    def __init__(self, inner: object, *, repeat: int = 1, batch_noise: float = 0.0, offset: float = 0.0) -> None:
        self.inner, self.repeat, self.batch_noise, self.offset = inner, repeat, batch_noise, offset

    def get_inputs(self) -> object:
        return self.inner.get_inputs()  # type: ignore[attr-defined]

    def get_outputs(self) -> object:
        return self.inner.get_outputs()  # type: ignore[attr-defined]

    def run(self, names: list[str] | None, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        for _ in range(self.repeat - 1):
            self.inner.run(names, feed)  # type: ignore[attr-defined]
        out = self.inner.run(names, feed)  # type: ignore[attr-defined]
        rows = len(next(iter(feed.values())))
        return [o + self.offset + self.batch_noise * rows for o in out]


def test_auto_probe_picks_the_fastest_backend_that_scores_alike(reranker_fp32_dir: Path) -> None:
    from encapure.engine.backends import auto
    from encapure.engine.backends.onnxruntime import create_session as ort_session

    def open_session(name: str, path: Path, settings: Settings) -> object:
        if name == "broken":
            raise RuntimeError("cannot compile")
        handicap = {"slow": {"repeat": 3}, "fast": {}, "variant": {"batch_noise": 1e-3},
                    "off": {"offset": 0.5}}[name]
        return _Wrapped(ort_session(path, settings), **handicap)

    model = reranker_fp32_dir / "model.onnx"
    res = auto.probe(model, Settings(), open_session, ["slow", "variant", "off", "broken", "fast"])
    assert res.chosen == "fast", res
    assert set(res.seconds) == {"slow", "fast"} and res.seconds["fast"] < res.seconds["slow"]
    assert "batch-invariant" in res.rejected["variant"]
    assert "disagrees" in res.rejected["off"]
    assert "cannot compile" in res.rejected["broken"]
    # nothing qualifies but the reference: the reference
    assert auto.probe(model, Settings(), open_session, ["slow", "variant"]).chosen == "slow"


def test_auto_is_the_default_and_a_near_tie_stays_on_the_reference(reranker_fp32_dir: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A switch of runtime moves int8 scores, so it must pay: a candidate only as fast as the reference
    (here: the same runtime twice) never replaces it, whatever the timing noise says."""
    from encapure.engine.backends import auto

    monkeypatch.delenv("ENCAPURE_BACKEND", raising=False)  # the suite pins onnxruntime (conftest.py)
    assert Settings().backend == "auto"
    model = reranker_fp32_dir / "model.onnx"
    # Sleep-timed sessions, long enough that a loaded machine's scheduling delay (seen: 3 ms per call
    # at load 9) stays far below the 10% margin.
    cost = {"ref": 0.100, "twin": 0.0975, "faster": 0.050}

    def timed(name: str, path: Path, settings: Settings) -> object:
        return _Timed(cost[name])

    res = auto.probe(model, Settings(), timed, ["ref", "twin"])
    assert res.chosen == "ref", res  # 2.5% faster: a tie
    assert auto.probe(model, Settings(), timed, ["ref", "twin", "faster"]).chosen == "faster"


def test_auto_a_candidate_slower_alone_stays_off_even_when_far_faster_in_bulk(reranker_fp32_dir: Path) -> None:
    """A lone request must not get slower by switching: OpenVINO probed 4% slower alone (inside the 10%
    allowance there once was) yet 2x faster in bulk, and served c=1 requests 13-22% slower."""
    from encapure.engine.backends import auto

    model = reranker_fp32_dir / "model.onnx"

    def timed(name: str, path: Path, settings: Settings) -> object:
        # ref: 20 ms a call; "bulky": 21 ms for small batches (lone), 10 ms for the full batch
        return _ByRows(0.020, 0.020) if name == "ref" else _ByRows(0.021, 0.010)

    res = auto.probe(model, Settings(), timed, ["ref", "bulky"])
    assert res.chosen == "ref", res
    assert res.seconds["bulky"] * 1.5 < res.seconds["ref"]  # far faster in bulk, still not picked


class _ByRows:
    """A batch-invariant session whose call takes ``small`` seconds up to 8 rows, ``full`` beyond."""

    def __init__(self, small: float, full: float) -> None:
        self.small, self.full = small, full

    def get_inputs(self) -> list[object]:
        return _Timed(0).get_inputs()

    def get_outputs(self) -> list[object]:
        return _Timed(0).get_outputs()

    def run(self, names: list[str] | None, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        import time

        time.sleep(self.small if len(feed["input_ids"]) <= 8 else self.full)
        return [(feed["input_ids"] * feed["attention_mask"]).sum(1, keepdims=True).astype(np.float32) / 1000]


class _Timed:
    """A session that takes ``seconds`` per call and scores a row by its tokens alone (batch-invariant)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def get_inputs(self) -> list[object]:
        from types import SimpleNamespace

        return [SimpleNamespace(name=n, shape=["batch", "sequence"]) for n in ("input_ids", "attention_mask")]

    def get_outputs(self) -> list[object]:
        from types import SimpleNamespace

        return [SimpleNamespace(name="logits", shape=["batch", 1])]

    def run(self, names: list[str] | None, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        import time

        time.sleep(self.seconds)
        return [(feed["input_ids"] * feed["attention_mask"]).sum(1, keepdims=True).astype(np.float32) / 1000]


def test_auto_record_is_one_per_model_and_machine_not_per_worker_layout(reranker_fp32_dir: Path,
                                                                       tmp_path: Path) -> None:
    """The library (1 worker) and a server (2 workers, other batch sizes) on one machine must read the
    same record, or they could run different runtimes and score the same pair differently."""
    from encapure.engine.backends import auto

    model = reranker_fp32_dir / "model.onnx"
    key = auto._key(model, Settings(cache_dir=tmp_path), ["onnxruntime", "openvino"])
    other = Settings(cache_dir=tmp_path, workers=1, threads_per_worker=2, max_batch_size=4, max_batch_tokens=512)
    assert auto._key(model, other, ["onnxruntime", "openvino"]) == key
    # what changes what a runtime computes does change the record
    assert auto._key(model, Settings(openvino_device="GPU"), ["onnxruntime", "openvino"]) != key


def test_auto_probe_times_in_the_default_thread_split_whatever_the_caller_set(reranker_fp32_dir: Path) -> None:
    """The record is shared by every process on the machine, so who probes first must not decide it: a
    process oversubscribing the cores (2 workers x 2 threads on 2) once recorded the ONNX embedder,
    which loses at the default split. Here "split" is fast only at the default split."""
    from encapure.engine.backends import auto

    model = reranker_fp32_dir / "model.onnx"
    default = Settings(workers=2).resolved_threads()
    seen: list[int] = []

    def timed(name: str, path: Path, settings: Settings) -> object:
        seen.append(settings.resolved_threads())
        at_default = settings.resolved_threads() == default
        return _Timed(0.03 if name == "ref" else 0.012 if at_default else 0.06)

    for caller in (Settings(workers=2), Settings(workers=2, threads_per_worker=default + 1)):
        res = auto.probe(model, caller, timed, ["ref", "split"])
        assert res.chosen == "split", res
        assert res.layout == f"2 x {default}"
    assert set(seen) == {default}


def test_auto_backend_is_recorded_and_scores_like_onnxruntime(reranker_int8_dir: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from encapure.engine.backends import auto

    settings = Settings(backend="auto", cache_dir=tmp_path)
    rr = Reranker.from_pretrained(reranker_int8_dir, settings=settings)
    records = list((tmp_path / "backend-probes").glob("*.json"))
    assert len(records) == 1
    record = json.loads(records[0].read_text())
    assert record["chosen"] in BACKENDS and record["chosen"] in record["seconds"]
    assert record["invariance"][record["chosen"]] <= 1e-5
    # an int8 export: the bound is its own deviation from PyTorch, and the scores keep to it
    tolerance = json.loads((reranker_int8_dir / "parity.json").read_text())["max_abs_diff"]
    assert record["tolerance"] == tolerance and "parity.json" in record["rule"]
    want = Reranker.from_pretrained(reranker_int8_dir).score(PAIRS, raw_scores=True)
    assert np.abs(rr.score(PAIRS, raw_scores=True) - want).max() <= tolerance
    # a restart reads the record: no second probe, the same backend
    monkeypatch.setattr(auto, "probe", lambda *a, **k: pytest.fail("probed twice"))
    again = Reranker.from_pretrained(reranker_int8_dir, settings=settings)
    assert type(again.model.session).__name__ == type(rr.model.session).__name__


@pytest.mark.usefixtures("openvino")
def test_auto_accepts_openvino_on_int8_within_the_quantization_error(reranker_int8_dir: Path) -> None:
    """OpenVINO's int8 kernels round differently from ONNX Runtime's (~2.5% of the output scale on
    AVX-512 VNNI, measured): beyond the full-precision rule, far inside what int8 itself moved the
    scores from PyTorch, so it qualifies; a backend off by more than that is still rejected."""
    import json

    from encapure.engine.backends import auto, open_backend
    from encapure.engine.backends.onnxruntime import create_session as ort_session

    model = reranker_int8_dir / "model.onnx"
    recorded = json.loads((reranker_int8_dir / "parity.json").read_text())["max_abs_diff"]
    tolerance = auto.quantized_tolerance(model)
    assert tolerance is not None and tolerance[0] == recorded
    res = auto.probe(model, Settings(), open_backend, ["onnxruntime", "openvino"])
    assert res.tolerance == recorded
    # Agreement is what this test is about. Batch invariance is checked as well and depends on the
    # CPU's int8 kernels (bit-exact on AMD EPYC AVX-512 VNNI; an earlier Intel VNNI machine differed by
    # up to 0.11 logits), so a CPU may still reject OpenVINO for that, never for disagreeing.
    assert "disagrees" not in res.rejected.get("openvino", ""), res
    assert 0 < res.agreement["openvino"] <= recorded

    def off(name: str, path: Path, settings: Settings) -> object:
        # ONNX Runtime itself, its scores shifted by twice the recorded quantization error
        return _Wrapped(ort_session(path, settings), offset=0.0 if name == "ref" else 2 * recorded)

    res = auto.probe(model, Settings(), off, ["ref", "off"])
    assert res.chosen == "ref" and "disagrees" in res.rejected["off"], res


def test_auto_keeps_the_strict_rule_without_a_quantization_record(reranker_fp32_dir: Path, reranker_int8_dir: Path,
                                                                   tmp_path: Path) -> None:
    from encapure.engine.backends import auto
    from encapure.engine.backends.onnxruntime import create_session as ort_session

    assert auto.quantized_tolerance(reranker_fp32_dir / "model.onnx") is None  # fp32: numeric noise only
    # an int8 folder exported with --no-parity: nothing recorded, nothing loosened
    bare = tmp_path / "no-parity"
    bare.mkdir()
    for f in reranker_int8_dir.iterdir():
        if f.name != "parity.json":
            (bare / f.name).symlink_to(f)
    assert auto.quantized_tolerance(bare / "model.onnx") is None

    def off(name: str, path: Path, settings: Settings) -> object:
        return _Wrapped(ort_session(path, settings), offset=0.0 if name == "ref" else 0.01)

    res = auto.probe(bare / "model.onnx", Settings(), off, ["ref", "off"])
    assert "full precision" in res.rule and "disagrees" in res.rejected["off"], res


@pytest.mark.usefixtures("openvino")
def test_openvino_pads_lengths_to_repeat_shapes_without_changing_outputs(embedder_fp32_dir: Path,
                                                                         reranker_int8_dir: Path) -> None:
    """Batches run padded to a multiple of LENGTH_STEP; token outputs come back at the batch's width,
    equal to ONNX Runtime's, and int8 scores equal the unpadded run's."""
    from encapure.engine.backends import openvino as ovb

    rng = np.random.default_rng(0)
    width = ovb.LENGTH_STEP + 1
    ids = rng.integers(5, 1000, (3, width))
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    settings = Settings()
    ov = ovb.create_session(embedder_fp32_dir / "model.onnx", settings)
    assert ov._padded(feed, width)["input_ids"].shape == (3, 2 * ovb.LENGTH_STEP)
    want = create_session(embedder_fp32_dir / "model.onnx", settings)
    names = [i.name for i in want.get_inputs()]
    feed = {k: v for k, v in feed.items() if k in names}
    got, ref = ov.run(None, feed)[0], want.run(None, feed)[0]
    assert got.shape == ref.shape and got.shape[1] == width
    np.testing.assert_allclose(got[mask.astype(bool)], ref[mask.astype(bool)], atol=1e-4, rtol=0)

    padded = ovb.create_session(reranker_int8_dir / "model.onnx", settings)
    unpadded = ovb.create_session(reranker_int8_dir / "model.onnx", settings)
    unpadded._pad_limit = 0  # as before padding: the feed runs as given
    np.testing.assert_array_equal(padded.run(None, feed)[0], unpadded.run(None, feed)[0])


class _PerRow(_Timed):
    """A session whose run takes ``seconds`` per row of the batch, as a large model's does."""

    def run(self, names: list[str] | None, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        import time

        time.sleep(self.seconds * len(feed["input_ids"]))
        return [(feed["input_ids"] * feed["attention_mask"]).sum(1, keepdims=True).astype(np.float32) / 1000]


def test_auto_probe_shrinks_the_full_batch_of_a_slow_model(reranker_fp32_dir: Path) -> None:
    """A full batch that takes the reference over a second (bge-reranker-v2-m3 on 2 cores: seconds per
    run, 82.5 s of probing at its first start) is timed with fewer rows of the same length, and lone
    passes of seconds in one round; a small model keeps the full batch and the alternated rounds."""
    from encapure.engine.backends import auto

    model = reranker_fp32_dir / "model.onnx"
    settings = Settings(workers=1)
    full = auto._bulk_shape(settings)
    slow = auto.probe(model, settings, lambda name, path, s: _PerRow(0.2), ["ref"])
    assert slow.bulk[1] == full[1] and 1 <= slow.bulk[0] < full[0], slow
    assert slow.bulk[0] * 0.2 <= auto._BULK_BUDGET_S * 1.05
    assert slow.rounds == 1  # lone passes of seconds: one round
    fast = auto.probe(model, settings, lambda name, path, s: _PerRow(0.005), ["ref"])
    assert fast.bulk == list(full) and fast.rounds == auto._ROUNDS, fast
