"""`SoftTargetCache` with `SoftTargetLoader` against real teacher servers: a warm epoch sends no
request and is bitwise what the teacher sent, a partly warm one sends only the missing rows, a new
model version gets no hits, and the size bound evicts the least recently used entries. Requests
and samples are counted on each server's own `/metrics`."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from student_client import SoftTargetLoader, SoftTargets, TargetOptions, TaskTargets, TeacherClient
from student_client.digests import sample_digests
from student_client.offline.cache import SoftTargetCache
from student_client.offline.scope import CacheError, CacheScope
from teacher_server.repository.default_teacher import DEFAULT_MODEL_NAME
from teacher_server.repository.store import load_model, save_model

MODEL = DEFAULT_MODEL_NAME


def _metric(teacher, name: str) -> float:  # type: ignore[no-untyped-def]
    """Sum of `name` over the model's series (all transports and statuses)."""
    text = httpx.get(teacher.http_url + "/metrics", timeout=10, trust_env=False).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and sample.labels.get("model") == MODEL
    )


def _requests(teacher) -> float:  # type: ignore[no-untyped-def]
    return _metric(teacher, "teacher_requests_total")


def _samples(teacher) -> float:  # type: ignore[no-untyped-def]
    return _metric(teacher, "teacher_batch_samples_sum")


def _batches(
    images: np.ndarray, order: np.ndarray, size: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Batches of `images[order]` with the dataset indices as labels."""
    return [(images[order[s : s + size]], order[s : s + size]) for s in range(0, len(order), size)]


def _by_sample(loader: SoftTargetLoader, n: int) -> dict[str, dict[str, np.ndarray]]:
    """Run one pass; each task's values (and indices, tail mass) rearranged by dataset index."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for _, index, targets in loader:
        for task, output in targets.outputs.items():
            parts = {"values": output.values, "indices": output.indices, "tail": output.tail_mass}
            for part, array in parts.items():
                if array is None:
                    continue
                store = out.setdefault(task, {})
                if part not in store:
                    store[part] = np.zeros((n, *array.shape[1:]), dtype=array.dtype)
                store[part][index] = array
    return out


def _assert_bitwise(
    a: dict[str, dict[str, np.ndarray]], b: dict[str, dict[str, np.ndarray]]
) -> None:
    assert a.keys() == b.keys()
    for task in a:
        assert a[task].keys() == b[task].keys()
        for part in a[task]:
            assert a[task][part].dtype == b[task][part].dtype
            np.testing.assert_array_equal(a[task][part], b[task][part])


@pytest.fixture(scope="module")
def counted_teacher(default_repository: Path, teacher_factory):  # type: ignore[no-untyped-def]
    """A teacher of its own, so that its counters move only with this module's traffic."""
    return teacher_factory(default_repository)


@pytest.mark.parametrize(
    "options",
    [
        TargetOptions(temperature=4.0),
        TargetOptions(temperature=2.0, top_k=3, output_dtype="float16", tasks=("digit", "loops")),
    ],
    ids=["dense", "top3-float16"],
)
def test_warm_epoch_sends_nothing_and_is_bitwise(
    counted_teacher, mnist_test_images, tmp_path, options
) -> None:  # type: ignore[no-untyped-def]
    images = mnist_test_images[0][:400]
    rng = np.random.default_rng(0)
    path = tmp_path / "cache.sqlite"
    with TeacherClient(counted_teacher.grpc_address) as client:
        with SoftTargetCache(path) as cache:
            cold = SoftTargetLoader(
                _batches(images, rng.permutation(400), 32), client, options, cache=cache
            )
            first = _by_sample(cold, 400)
            assert cold.stats.sent == 13 and cold.stats.cached_samples == 0
            assert cache.stats.stored == 400 * len(first)
        requests, samples = _requests(counted_teacher), _samples(counted_teacher)
        # A re-shuffled epoch of other batch sizes, from a reopened file with no memory layer
        # (SQLite only), then again from the same object (the in-process layer).
        with SoftTargetCache(path, memory_bytes=0) as cache:
            warm = SoftTargetLoader(
                _batches(images, rng.permutation(400), 50), client, options, cache=cache
            )
            _assert_bitwise(_by_sample(warm, 400), first)
            assert warm.stats.sent == 0 and warm.stats.cached_batches == 8
            assert warm.stats.cached_samples == warm.stats.samples == 400
        with SoftTargetCache(path) as cache:
            for size in (64, 7):
                warm = SoftTargetLoader(
                    _batches(images, rng.permutation(400), size), client, options, cache=cache
                )
                _assert_bitwise(_by_sample(warm, 400), first)
                assert warm.stats.sent == 0
            assert cache.stats.memory_hits > 0
        assert _requests(counted_teacher) == requests
        assert _samples(counted_teacher) == samples


def test_partly_warm_batch_sends_only_missing_rows(
    counted_teacher, mnist_test_images, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    images = mnist_test_images[0][:1000]
    options = TargetOptions(temperature=3.0)
    with (
        TeacherClient(counted_teacher.grpc_address) as client,
        SoftTargetCache(tmp_path / "cache.sqlite") as cache,
    ):
        warm_part = np.random.default_rng(1).permutation(550)  # samples 0..549, shuffled
        first = _by_sample(
            SoftTargetLoader(_batches(images, warm_part, 64), client, options, cache=cache), 1000
        )
        reference = _by_sample(
            SoftTargetLoader(_batches(images, np.arange(1000), 100), client, options), 1000
        )
        requests, samples = _requests(counted_teacher), _samples(counted_teacher)
        # Batches 0-4 are cached whole, batch 5 holds 50 cached and 50 new samples (interleaved),
        # batches 6-9 are new: 5 requests carrying 50 + 400 rows.
        order = np.arange(1000)
        order[500:600] = np.array([500 + i // 2 + (50 if i % 2 else 0) for i in range(100)])
        loader = SoftTargetLoader(
            _batches(images, order, 100), client, options, cache=cache, depth=4
        )
        mixed = _by_sample(loader, 1000)
        assert _requests(counted_teacher) - requests == 5
        assert _samples(counted_teacher) - samples == 450
        assert loader.stats.sent == 5 and loader.stats.cached_batches == 5
        assert loader.stats.cached_samples == 550 and loader.stats.samples == 1000
    for task in reference:
        # The cached rows are bitwise the first answers, in their place in each batch; the new
        # rows are the teacher's (equal up to float rounding of another batch composition).
        np.testing.assert_array_equal(mixed[task]["values"][:550], first[task]["values"][:550])
        np.testing.assert_allclose(mixed[task]["values"], reference[task]["values"], atol=1e-6)


@pytest.fixture(scope="module")
def other_version(default_repository: Path, tmp_path_factory, teacher_factory):  # type: ignore[no-untyped-def]
    """A second teacher serving the same model name with other weights: another model version."""
    loaded = load_model(
        default_repository / MODEL, torch.device("cpu"), ("teacher_server.models.",)
    )
    assert loaded.module is not None
    with torch.no_grad():
        for parameter in loaded.module.parameters():
            parameter.mul_(1.05)
    root = tmp_path_factory.mktemp("other_version")
    save_model(root / MODEL, loaded.config, loaded.module)
    return teacher_factory(root)


def test_new_model_version_gets_no_hits(
    counted_teacher, other_version, mnist_test_images, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    images = mnist_test_images[0][:300]
    options = TargetOptions(temperature=4.0)
    batches = _batches(images, np.arange(300), 60)
    with SoftTargetCache(tmp_path / "cache.sqlite") as cache:
        with TeacherClient(counted_teacher.grpc_address) as old:
            first = _by_sample(SoftTargetLoader(batches, old, options, cache=cache), 300)
            version_one = old.model_info().model_version
        with TeacherClient(other_version.grpc_address) as new:
            version_two = new.model_info().model_version
            assert version_two != version_one
            requests = _requests(other_version)
            loader = SoftTargetLoader(batches, new, options, cache=cache)
            second = _by_sample(loader, 300)
            assert loader.stats.cached_samples == 0 and loader.stats.sent == 5
            assert _requests(other_version) - requests == 5
            assert not np.array_equal(second["digit"]["values"], first["digit"]["values"])
            # Pinned to the old version, the new teacher is never asked and never answers: the
            # pinned pass's lookups are of the old version only.
            pinned = TargetOptions(temperature=4.0, model_version=version_one, tasks=("digit",))
            again = _by_sample(SoftTargetLoader(batches, new, pinned, cache=cache), 300)
            np.testing.assert_array_equal(again["digit"]["values"], first["digit"]["values"])
            assert _requests(other_version) - requests == 5
        with TeacherClient(counted_teacher.grpc_address) as old:
            requests = _requests(counted_teacher)
            back = _by_sample(SoftTargetLoader(batches, old, options, cache=cache), 300)
            _assert_bitwise(back, first)  # the old version's entries are intact
            assert _requests(counted_teacher) == requests
        assert {v for _, v, _, _ in cache.versions()} == {version_one, version_two}
        assert cache.drop(version_one) == 300 * 3
        assert {v for _, v, _, _ in cache.versions()} == {version_two}


def test_size_bound_evicts_least_recently_used(
    counted_teacher, mnist_test_images, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    images = mnist_test_images[0]
    options = TargetOptions(temperature=4.0, tasks=("digit",), output_dtype="float32")
    entry = 32 + 10 * 4 + 24  # digest + 10 float32 + row overhead (see cache.ROW_OVERHEAD)
    a, b, c = (images[i * 100 : (i + 1) * 100] for i in range(3))
    with (
        TeacherClient(counted_teacher.grpc_address) as client,
        SoftTargetCache(tmp_path / "cache.sqlite", max_bytes=200 * entry) as cache,
    ):

        def run(*batches: np.ndarray) -> None:
            list(SoftTargetLoader(list(batches), client, options, cache=cache, depth=1))

        run(a, b)
        assert len(cache) == 200 and cache.total_bytes == 200 * entry and cache.stats.evicted == 0
        run(a)  # a is used again: b is now the least recently used
        run(c)
        assert cache.stats.evicted == 100
        assert len(cache) == 200 and cache.total_bytes <= 200 * entry
        version = client.model_info().model_version
        scope = CacheScope(MODEL, version, ("digit",), "probs", 4.0, 0, "float32")
        for batch, expected_missing in ((a, 0), (b, 100), (c, 0)):
            assert len(cache.lookup(scope, sample_digests(batch)).missing) == expected_missing


def test_cache_refuses_what_it_cannot_do(teacher, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with (
        TeacherClient(teacher.grpc_address) as client,
        SoftTargetCache(tmp_path / "c.sqlite") as cache,
    ):
        with pytest.raises(ValueError, match="pin_version"):
            SoftTargetLoader([], client, cache=cache, pin_version=False)
        with pytest.raises(ValueError, match="hints"):
            list(SoftTargetLoader([], client, TargetOptions(hints=("features",)), cache=cache))
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(CacheError, match=r"garbage\.sqlite"):
        SoftTargetCache(garbage)
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as db:
        db.executescript(
            "CREATE TABLE meta (name TEXT PRIMARY KEY, value); INSERT INTO meta VALUES ('format', 2);"
        )
    with pytest.raises(CacheError, match=r"other\.sqlite: cache format 2"):
        SoftTargetCache(other)


def test_sample_digests_depend_on_bytes_dtype_and_shape() -> None:
    x = np.arange(12, dtype=np.float32).reshape(2, 6)
    assert sample_digests(x)[0] == sample_digests(x[:1].copy())[0]
    assert sample_digests(x)[0] != sample_digests(x)[1]
    assert sample_digests(x)[0] != sample_digests(x.reshape(2, 2, 3))[0]
    assert sample_digests(x)[0] != sample_digests(x.astype(np.float64))[0]
    assert sample_digests(x)[0] == sample_digests(x.astype(">f4"))[0]  # byte order normalised


def _synthetic(rng: np.random.Generator, n: int, version: str = "v1") -> SoftTargets:
    values = rng.random((n, 5), dtype=np.float32)
    return SoftTargets(MODEL, version, "b", 2.0, {"t": TaskTargets("t", "probs", values)})


def test_memory_layer_stays_bounded_and_exact(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """No teacher: the in-process layer under a small bound, against the file and the truth."""
    rng = np.random.default_rng(0)
    scope = CacheScope(MODEL, "v1", ("t",), "probs", 2.0, 0, "float32")
    digests = [bytes([i % 256, i // 256]) * 16 for i in range(300)]
    truth = _synthetic(rng, 300)
    bound = 64 * (160 + 5 * 4)  # 64 slots of one task of 5 float32 (see cache.MEMORY_SLOT_OVERHEAD)
    with SoftTargetCache(tmp_path / "c.sqlite", memory_bytes=bound) as cache:
        for start in range(0, 300, 20):
            rows = np.arange(start, start + 20)
            part = SoftTargets(
                MODEL,
                "v1",
                "b",
                2.0,
                {"t": TaskTargets("t", "probs", truth.outputs["t"].values[rows])},
            )
            assert cache.store(scope, [digests[i] for i in rows], part) == 20
        for _ in range(5):
            order = rng.permutation(300)
            for start in range(0, 300, 37):
                rows = order[start : start + 37]
                found = cache.lookup(scope, [digests[i] for i in rows])
                assert found.complete
                np.testing.assert_array_equal(
                    cache.assemble(found).outputs["t"].values, truth.outputs["t"].values[rows]
                )
                assert sum(slab.size for slab in cache._slabs.values()) <= bound
        assert 0 < cache.stats.memory_hits < cache.stats.hits == 1500
        # A batch with a repeated sample and unknown samples: only those are missing, and the
        # batch is assembled in its own order.
        unknown = [b"x" * 32, b"y" * 32]
        batch = [digests[5], unknown[0], digests[5], digests[250], unknown[1]]
        found = cache.lookup(scope, batch)
        assert found.missing == [1, 4]
        fresh = _synthetic(rng, 2)
        merged = cache.assemble(found, fresh).outputs["t"].values
        np.testing.assert_array_equal(merged[[0, 2, 3]], truth.outputs["t"].values[[5, 5, 250]])
        np.testing.assert_array_equal(merged[[1, 4]], fresh.outputs["t"].values)
        # Another version is another namespace: nothing of v1 is found under v2.
        other = CacheScope(MODEL, "v2", ("t",), "probs", 2.0, 0, "float32")
        assert len(cache.lookup(other, digests[:10]).missing) == 10
    # Evicted from the file means evicted from memory too.
    entry = 32 + 5 * 4 + 24
    with SoftTargetCache(tmp_path / "small.sqlite", max_bytes=100 * entry) as cache:
        cache.store(
            scope,
            digests[:100],
            SoftTargets(
                MODEL,
                "v1",
                "b",
                2.0,
                {"t": TaskTargets("t", "probs", truth.outputs["t"].values[:100])},
            ),
        )
        assert cache.lookup(scope, digests[:100]).complete
        cache.store(
            scope,
            digests[100:150],
            SoftTargets(
                MODEL,
                "v1",
                "b",
                2.0,
                {"t": TaskTargets("t", "probs", truth.outputs["t"].values[100:150])},
            ),
        )
        assert cache.stats.evicted == 50 and len(cache) == 100
        assert len(cache.lookup(scope, digests[:150]).missing) == 50
