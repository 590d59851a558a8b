"""The stand-in models keep the promises the server tests rely on (see tests/fakes.py)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from fakes import FAIL_WORD, STALL_WORD, fake_model, fake_session

from encapure.errors import ModelError


@pytest.mark.parametrize("task", ["rerank", "embed"])
def test_rows_do_not_depend_on_batch_mates_or_padding(task: str) -> None:
    model = fake_model(task)  # type: ignore[arg-type]
    if task == "rerank":
        short = model.prepare_pairs("capital of France", ["Paris."])
        long = model.prepare_pairs("capital", ["a much longer document " * 10, "Berlin is in Germany."])
    else:
        short = model.prepare_texts(["Paris."])
        long = model.prepare_texts(["a much longer text " * 10, "Berlin is in Germany."])
    alone = model.finish(short, model.forward(short.units))
    padded = model.forward([*long.units, *short.units])[-1:]  # padded to the long unit's width
    batched = model.finish(short, padded)
    if task == "rerank":
        np.testing.assert_array_equal(batched.scores, alone.scores)  # type: ignore[union-attr]
        other = model.finish(long, model.forward(long.units)).scores  # type: ignore[union-attr]
        assert len(set(np.round(np.r_[other, alone.scores], 6))) == 3  # type: ignore[union-attr]
    else:
        np.testing.assert_allclose(batched.embeddings, alone.embeddings, rtol=0, atol=1e-6)  # type: ignore[union-attr]
        assert np.linalg.norm(alone.embeddings[0]) == pytest.approx(1.0, abs=1e-6)  # type: ignore[union-attr]


def test_cost_stall_and_failure_on_demand() -> None:
    model = fake_model("rerank", base_s=0.01, stall_s=0.1)
    plain = model.prepare_pairs("q", ["d"])
    stalled = model.prepare_pairs("q", [" ".join([STALL_WORD] * 3)])
    t = time.perf_counter()
    model.forward(plain.units)
    fast = time.perf_counter() - t
    t = time.perf_counter()
    model.forward([*plain.units, *stalled.units])
    slow = time.perf_counter() - t
    assert 0.01 <= fast < 0.3 and slow >= 0.31, (fast, slow)
    widths = [len(plain.units[0]), len(stalled.units[0])]
    assert fake_session(model).batches[-2:] == [(1, widths[0]), (2, max(widths))]
    with pytest.raises(ModelError, match="on purpose"):
        model.forward(model.prepare_pairs("q", [FAIL_WORD]).units)
