"""The asyncio API: same answers as the sync engine classes, with concurrent calls pooled into
shared batches.

The models are the engine's real ``OnnxModel`` over a fake ONNX Runtime session whose rows depend
only on their own tokens (``tests/fakes.py``): what is tested is the plumbing (arguments, batching,
lifecycle), not the network. Loading an exported folder keeps one real test.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fakes import FakeSession, fake_model

from encapure.engine import Classifier, Embedder, Reranker
from encapure.engine.model import OnnxModel
from encapure.errors import InvalidInputError, ShuttingDownError, WrongTaskError
from encapure.scheduler import AsyncClassifier, AsyncEmbedder, AsyncReranker, Scheduler
from encapure.settings import Settings

pytestmark = pytest.mark.timeout(60)

BATCH_S = 0.002  # what one batch costs on the fake models

TEXTS = [
    "How are glacier caves formed?",
    "A partly submerged glacier cave on Perito Moreno Glacier.",
    "The ice facade is approximately 60 m high.",
    "Ice formations in the Titlis glacier cave.",
    "A glacier cave is a cave formed within the ice of a glacier.",
    "Glacier caves are often called ice caves, but this term is properly used to describe bedrock caves "
    "that contain year-round ice.",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France, with an estimated population of two million.",
    "python asyncio event loop",
    "x",
]


def _requests(n: int, seed: int = 0) -> list[tuple[str, list[str]]]:
    rng = random.Random(seed)
    return [(rng.choice(TEXTS), rng.sample(TEXTS, rng.randint(1, 6))) for _ in range(n)]


@pytest.fixture(scope="module")
def rr_model() -> Any:
    return fake_model("rerank", name="rr", settings=Settings(threads_per_worker=1), base_s=BATCH_S)


@pytest.fixture(scope="module")
def emb_model() -> Any:
    return fake_model("embed", name="emb", settings=Settings(threads_per_worker=1), base_s=BATCH_S)


def fake_classifier(rr_model: Any) -> OnnxModel:
    """The reranker's tokenizer and manifest as a 3-label classifier over a fake session."""
    manifest = dataclasses.replace(
        rr_model.manifest, task="classify", labels=["a", "b", "c"], score_activation="softmax"
    )
    session = FakeSession("logits", vocab_size=rr_model.vocab_size, dim=3, base_s=BATCH_S)
    return OnnxModel(rr_model.folder, manifest, name="cls", tokenizer_path=rr_model.folder / "tokenizer.json",
                     session=session, settings=Settings(threads_per_worker=1))


def test_async_reranker_matches_sync_and_batches_across_calls(rr_model: Any) -> None:
    sync = Reranker(rr_model)
    reqs = _requests(40)
    expected = [sync.rerank(q, d, top_n=3, return_documents=True) for q, d in reqs]
    pairs = [(q, d) for q, docs in reqs[:5] for d in docs]

    async def main() -> tuple[list[Any], np.ndarray, dict[str, Any]]:
        async with AsyncReranker(rr_model, settings=Settings(workers=1)) as rr:
            got = await asyncio.gather(*(rr.rerank(q, d, top_n=3, return_documents=True) for q, d in reqs))
            scores = await rr.score(pairs)
            assert await rr.rerank("q", []) == []
            with pytest.raises(InvalidInputError):
                await rr.rerank("q", ["a"], top_n=-1)
            with pytest.raises(InvalidInputError):
                await rr.rerank("", ["a"])
            return got, scores, rr.scheduler.stats()

    got, scores, stats = asyncio.run(main())
    for g, e in zip(got, expected, strict=True):
        assert [r.index for r in g] == [r.index for r in e]
        assert [r.document for r in g] == [r.document for r in e]
        np.testing.assert_allclose([r.score for r in g], [r.score for r in e], atol=2e-5)
    np.testing.assert_allclose(scores, sync.score(pairs), atol=2e-5)
    assert stats["cross_request_batches"] >= 1
    assert stats["batches"] < 40


def test_async_embedder_matches_sync(emb_model: Any) -> None:
    sync = Embedder(emb_model)

    async def main() -> None:
        async with AsyncEmbedder(emb_model) as emb:
            assert emb.dimension == sync.dimension
            many = await asyncio.gather(*(emb.embed(TEXTS[i : i + 3]) for i in range(0, len(TEXTS), 3)))
            np.testing.assert_allclose(np.concatenate(many), sync.embed(TEXTS), atol=1e-5)
            one = await emb.embed(TEXTS[0])
            assert one.shape == (sync.dimension,)
            np.testing.assert_allclose(
                await emb.embed_query(TEXTS[:2]), sync.embed_query(TEXTS[:2]), atol=1e-5
            )
            np.testing.assert_allclose(
                await emb.embed_documents(TEXTS[2:5]), sync.embed_documents(TEXTS[2:5]), atol=1e-5
            )
            small = await emb.embed(TEXTS[:4], dimensions=64)
            assert small.shape == (4, 64)
            np.testing.assert_allclose(np.linalg.norm(small, axis=1), 1.0, atol=1e-5)
            assert (await emb.embed([])).shape[0] == 0

    asyncio.run(main())


def test_async_classifier_matches_sync(rr_model: Any) -> None:
    model = fake_classifier(rr_model)
    sync = Classifier(model)
    pairs = [(TEXTS[0], t) for t in TEXTS[1:6]]

    async def main() -> tuple[list[dict[str, float]], list[dict[str, float]]]:
        async with AsyncClassifier(model) as clf:
            return await clf.predict(pairs, raw_scores=True), await clf.predict(TEXTS[:4])

    got, got_texts = asyncio.run(main())
    for g_all, w_all in ((got, sync.predict(pairs, raw_scores=True)), (got_texts, sync.predict(TEXTS[:4]))):
        assert [list(g) for g in g_all] == [list(w) for w in w_all]
        for g, w in zip(g_all, w_all, strict=True):
            np.testing.assert_allclose(list(g.values()), list(w.values()), atol=2e-5)


def test_shared_scheduler_serves_reranker_and_embedder(rr_model: Any, emb_model: Any) -> None:
    async def main() -> None:
        sched = Scheduler({"rr": rr_model, "emb": emb_model}, Settings(workers=2))
        await sched.start()
        rr = AsyncReranker(rr_model, scheduler=sched)
        emb = AsyncEmbedder(emb_model, scheduler=sched)
        ranked, vecs = await asyncio.gather(rr.rerank(TEXTS[0], TEXTS[1:5]), emb.embed(TEXTS[:5]))
        assert len(ranked) == 4 and vecs.shape == (5, emb.dimension)
        await rr.aclose()  # not the owner: the shared scheduler keeps running
        assert sched.is_accepting()
        assert (await emb.embed("still up")).shape == (emb.dimension,)
        await sched.shutdown(5)

    asyncio.run(main())


def test_wrong_task_closed_and_lazy_start(rr_model: Any, emb_model: Any) -> None:
    with pytest.raises(WrongTaskError):
        AsyncReranker(emb_model)
    with pytest.raises(WrongTaskError):
        AsyncEmbedder(rr_model)

    async def main() -> None:
        rr = AsyncReranker(rr_model)
        assert len(await rr.rerank(TEXTS[0], TEXTS[1:3])) == 2  # started on first use
        await rr.aclose()
        with pytest.raises(ShuttingDownError):
            await rr.rerank(TEXTS[0], TEXTS[1:3])

    asyncio.run(main())


def test_from_pretrained_loads_an_exported_folder(reranker_fp32_dir: Path) -> None:
    async def main() -> None:
        async with AsyncReranker.from_pretrained(reranker_fp32_dir) as rr:
            out = await rr.rerank(TEXTS[0], TEXTS[1:6], top_n=2)
            assert len(out) == 2 and out[0].score >= out[1].score

    asyncio.run(main())


def test_lazy_instance_survives_a_second_asyncio_run(rr_model: Any) -> None:
    """Started lazily in one asyncio.run(), used again in the next: it starts afresh, never hangs."""
    rr = AsyncReranker(rr_model)

    async def once() -> int:
        return len(await asyncio.wait_for(rr.rerank(TEXTS[0], TEXTS[1:4]), 30))

    assert asyncio.run(once()) == 3
    first = rr.scheduler
    assert asyncio.run(once()) == 3
    assert rr.scheduler is not first
    first_threads = first.workers.threads
    for t in first_threads:
        t.join(5)
    assert not any(t.is_alive() for t in first_threads)

    async def close() -> None:
        await rr.aclose()

    asyncio.run(close())


def test_scheduler_refuses_a_foreign_event_loop(rr_model: Any) -> None:
    sched = Scheduler({"rr": rr_model}, Settings())
    asyncio.run(sched.start())

    async def use() -> None:
        p = rr_model.prepare_pairs("q", ["d"])
        with pytest.raises(RuntimeError, match="another event loop"):
            await sched.submit("rr", p)

    asyncio.run(use())
    sched.abandon()


def test_library_calls_have_no_per_request_caps(rr_model: Any) -> None:
    """``--max-units-per-request`` and the one-request work limit keep an HTTP client from crowding
    out the others; a library caller asked for all of its work: it must not get a 413."""
    from encapure.errors import PayloadTooLargeError

    docs = [f"document number {i} about something" for i in range(12)]
    settings = Settings(workers=1, max_units_per_request=4)

    async def main() -> tuple[list[Any], Any]:
        async with AsyncReranker(rr_model, settings=settings) as rr:
            got = await rr.rerank("query", docs)
        shared = Scheduler({rr_model.name: rr_model}, settings)  # a server's scheduler keeps them
        await shared.start()
        rr2 = AsyncReranker(rr_model, scheduler=shared)
        with pytest.raises(PayloadTooLargeError) as caught:
            await rr2.rerank("query", docs)
        await shared.shutdown(5)
        return got, caught

    got, _ = asyncio.run(main())
    assert sorted(r.index for r in got) == list(range(12))
