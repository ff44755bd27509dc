"""The batcher's lone-request fast path (`DynamicBatcher._run_lone`) on the real default teacher:
the same soft targets as the queue path, taken only by a lone request, never by requests that
arrive together (they still merge), and off at `inline_forward_max_ms=0`."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch

from teacher_server.repository.default_teacher import DEFAULT_MODEL_NAME
from teacher_server.repository.store import load_model
from teacher_server.serving.batcher import DynamicBatcher
from teacher_server.serving.engine import Engine
from teacher_server.serving.schema import SoftTargets, SoftTargetsRequest, ValidatedRequest

# generous: a loaded shared machine must still take the fast path for a batch of 2 images
INLINE_MAX_MS = 200.0


@pytest.fixture(scope="module")
def engine(default_repository: Path) -> Engine:
    loaded = load_model(
        default_repository / DEFAULT_MODEL_NAME, torch.device("cpu"), ("teacher_server.models.",)
    )
    return Engine(loaded)


def requests(engine: Engine, images: np.ndarray, count: int) -> list[ValidatedRequest]:
    tasks = engine.config.task_names
    out = []
    for i in range(count):
        batch = np.ascontiguousarray(images[2 * i : 2 * i + 2])  # (2, 1, 28, 28)
        request = SoftTargetsRequest(model=engine.config.name, inputs=batch, temperature=4.0)
        out.append(ValidatedRequest(request, tasks, batch))
    return out


def run_batcher(engine: Engine, inline_ms: float, scenario):  # type: ignore[no-untyped-def]
    async def main():  # type: ignore[no-untyped-def]
        batcher = DynamicBatcher(engine, 64, 2.0, 64, inline_forward_max_ms=inline_ms)
        batcher.start()
        try:
            return await scenario(batcher), batcher
        finally:
            batcher._executor.shutdown(wait=True)  # the engine is shared: not batcher.close()
            assert batcher._task is not None
            batcher._task.cancel()

    return asyncio.run(main())


def assert_same(got: SoftTargets, expected: SoftTargets, exact: bool = True) -> None:
    """Alone (inline or queued) the values are bit-identical; merged with other rows the
    matrix products may round differently."""
    assert [o.task for o in got.outputs] == [o.task for o in expected.outputs]
    for a, b in zip(got.outputs, expected.outputs, strict=True):
        np.testing.assert_allclose(a.values, b.values, rtol=0 if exact else 1e-5, atol=0)


def test_lone_requests_run_inline_with_the_same_results(
    engine: Engine, mnist_test_images: tuple[np.ndarray, np.ndarray]
) -> None:
    items = requests(engine, mnist_test_images[0], 6)

    async def one_at_a_time(batcher: DynamicBatcher) -> list[SoftTargets]:
        results = []
        for item in items:
            results.append(await batcher.submit(item, 30.0))
            await asyncio.sleep(0.1)  # a client's round trip: longer than the forward
        return results

    results, batcher = run_batcher(engine, INLINE_MAX_MS, one_at_a_time)
    # the first request of its size is measured on the queue path, the others run inline
    assert batcher.inline_forwards == len(items) - 1
    assert batcher.forwards == len(items)
    for item, result in zip(items, results, strict=True):
        assert_same(result, engine.run([item])[0])


def test_requests_arriving_together_still_merge(
    engine: Engine, mnist_test_images: tuple[np.ndarray, np.ndarray]
) -> None:
    warm, *items = requests(engine, mnist_test_images[0], 9)

    async def together(batcher: DynamicBatcher) -> list[SoftTargets]:
        await batcher.submit(warm, 30.0)  # measures the size: the fast path is open
        await asyncio.sleep(0.01)
        return list(await asyncio.gather(*(batcher.submit(item, 30.0) for item in items)))

    results, batcher = run_batcher(engine, INLINE_MAX_MS, together)
    assert batcher.requests_forwarded == 9
    # at most the first of the eight runs inline; the rest queue behind it and merge
    assert batcher.inline_forwards <= 1
    assert batcher.forwards <= 3, batcher.forwards
    for item, result in zip(items, results, strict=True):
        assert_same(result, engine.run([item])[0], exact=False)


def test_fast_path_off_at_zero(
    engine: Engine, mnist_test_images: tuple[np.ndarray, np.ndarray]
) -> None:
    items = requests(engine, mnist_test_images[0], 3)

    async def one_at_a_time(batcher: DynamicBatcher) -> None:
        for item in items:
            await batcher.submit(item, 30.0)

    _, batcher = run_batcher(engine, 0.0, one_at_a_time)
    assert batcher.inline_forwards == 0
    assert batcher.forwards == 3
