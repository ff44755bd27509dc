"""The engine's CPU chunking: a merged batch cut into row chunks (in turn, or on a pool of
workers) gives the soft targets and hints of the whole-batch forward, in request order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from teacher_server.repository.store import load_model
from teacher_server.serving.engine import Engine
from teacher_server.serving.schema import SoftTargetsRequest, ValidatedRequest


def _requests(engine: Engine, images: np.ndarray, sizes: list[int]) -> list[ValidatedRequest]:
    tasks = engine.config.task_names
    out, start = [], 0
    for i, size in enumerate(sizes):
        batch = images[start : start + size]
        request = SoftTargetsRequest(
            model=engine.config.name,
            inputs=batch,
            tasks=tasks,
            temperature=1.0 + i,  # per-request settings survive the chunking
            batch_id=f"r{i}",
        )
        out.append(ValidatedRequest(request, tasks, batch))
        start += size
    return out


@pytest.mark.parametrize(("chunk", "workers"), [(7, 1), (64, 1), (7, 2), (64, 3)])
def test_chunked_forward_equals_whole_batch(
    default_repository: Path,
    mnist_test_images: tuple[np.ndarray, np.ndarray],
    chunk: int,
    workers: int,
) -> None:
    folder = default_repository / "mnist-multitask"
    model = load_model(folder, torch.device("cpu"), ("teacher_server.models.",))
    whole = Engine(model, forward_chunk=0)
    chunked = Engine(model, forward_chunk=chunk, forward_workers=workers)
    sizes = [5, 40, 1, 90]  # 136 rows: several chunks, chunk borders inside requests
    expected = whole.run(_requests(whole, mnist_test_images[0], sizes))
    got = chunked.run(_requests(chunked, mnist_test_images[0], sizes))
    assert [r.batch_id for r in got] == ["r0", "r1", "r2", "r3"]
    for a, b in zip(got, expected, strict=True):
        assert a.temperature == b.temperature
        for out_a, out_b in zip(a.outputs, b.outputs, strict=True):
            assert out_a.task == out_b.task and out_a.values.shape == out_b.values.shape
            np.testing.assert_allclose(out_a.values, out_b.values, rtol=0, atol=1e-6)


def test_auto_chunk_keeps_the_faster_of_whole_and_chunks(default_repository: Path) -> None:
    """On a CPU the engine times a probe batch whole and in chunks at load and keeps chunks
    unless whole batches are at least 10% faster; the choice follows its own timings."""
    model = load_model(
        default_repository / "mnist-multitask", torch.device("cpu"), ("teacher_server.models.",)
    )
    engine = Engine(model)
    timings = engine.chunk_timings
    if not timings:  # the probe batch took over PROBE_MAX_S (a loaded machine): chunks, unprobed
        assert engine.forward_chunk == 64
    else:
        assert set(timings) == {0, 64} and all(0 < t < 1 for t in timings.values())
        assert engine.forward_chunk == (0 if timings[0] < 0.9 * timings[64] else 64)
    assert Engine(model, forward_chunk=0).chunk_timings == {}  # an explicit size is not probed


def test_requests_sharing_settings_are_shaped_together_and_keep_their_own_rows(
    default_repository: Path, mnist_test_images: tuple[np.ndarray, np.ndarray]
) -> None:
    """A merged batch of runs of requests with the same settings and requests with their own
    (temperature, output kind, top-k, dtype, tasks): the engine shapes each run in one go, and
    every request gets what it gets alone, in order."""
    model = load_model(
        default_repository / "mnist-multitask", torch.device("cpu"), ("teacher_server.models.",)
    )
    engine = Engine(model, forward_chunk=0)
    all_tasks = engine.config.task_names
    settings = [  # (rows, tasks, temperature, output, top_k, output_dtype)
        (3, all_tasks, 4.0, "probs", 0, "float32"),
        (5, all_tasks, 4.0, "probs", 0, "float32"),
        (2, all_tasks, 4.0, "probs", 0, "float32"),
        (4, all_tasks, 2.0, "probs", 0, "float32"),
        (1, ("digit",), 2.0, "log_probs", 3, "float16"),
        (6, ("digit",), 2.0, "log_probs", 3, "float16"),
        (2, all_tasks, 1.0, "logits", 0, "bfloat16"),
        (3, all_tasks, 4.0, "probs", 0, "float32"),
    ]
    images, start, batch = mnist_test_images[0], 0, []
    for i, (rows, tasks, temperature, output, top_k, dtype) in enumerate(settings):
        inputs = images[start : start + rows]
        request = SoftTargetsRequest(
            model=engine.config.name,
            inputs=inputs,
            tasks=tasks,
            temperature=temperature,
            output=output,
            top_k=top_k,
            output_dtype=dtype,
            batch_id=f"r{i}",
        )
        batch.append(ValidatedRequest(request, tasks, inputs))
        start += rows
    merged = engine.run(batch)
    assert [r.batch_id for r in merged] == [f"r{i}" for i in range(len(settings))]
    for got, item in zip(merged, batch, strict=True):
        (alone,) = engine.run([item])
        assert got.temperature == alone.temperature
        assert [o.task for o in got.outputs] == list(item.tasks)
        for a, b in zip(got.outputs, alone.outputs, strict=True):
            assert (a.kind, a.classes, a.values.shape) == (b.kind, b.classes, b.values.shape)
            np.testing.assert_allclose(a.values, b.values, rtol=0, atol=2e-3)  # float16 rounding
            if b.indices is None:
                assert a.indices is None
            else:
                np.testing.assert_array_equal(a.indices, b.indices)
            if b.tail_mass is not None:
                np.testing.assert_allclose(a.tail_mass, b.tail_mass, rtol=0, atol=1e-6)


def test_channels_last_gives_the_same_soft_targets_and_hints(
    default_repository: Path, mnist_test_images: tuple[np.ndarray, np.ndarray]
) -> None:
    """The channels-last layout (auto: on for a CPU model with 2-d convolutions) changes float
    rounding only: soft targets and hints equal the default layout's, hints as C-order arrays."""
    folder = default_repository / "mnist-multitask"
    plain = Engine(
        load_model(folder, torch.device("cpu"), ("teacher_server.models.",)), 0, 1, False
    )
    auto = Engine(load_model(folder, torch.device("cpu"), ("teacher_server.models.",)), 0)
    assert not plain.channels_last and auto.channels_last
    assert "channels last" in auto.describe_forward()
    hints = tuple(plain.config.hints)
    requests = []
    for engine in (plain, auto):
        batch = mnist_test_images[0][:24]
        request = SoftTargetsRequest(
            model=engine.config.name, inputs=batch, temperature=2.0, hints=hints, batch_id="b"
        )
        requests.append([ValidatedRequest(request, engine.config.task_names, batch)])
    (expected,) = plain.run(requests[0])
    (got,) = auto.run(requests[1])
    for a, b in zip(got.outputs, expected.outputs, strict=True):
        np.testing.assert_allclose(a.values, b.values, rtol=0, atol=1e-5)
    assert set(got.hints) == set(hints) and hints
    for name in hints:
        assert got.hints[name].flags.c_contiguous
        np.testing.assert_allclose(got.hints[name], expected.hints[name], rtol=1e-4, atol=1e-4)
