"""`SoftTargetCache` with token batches: one entry per sequence (keyed by its tokenizer hash and
real ids), token-level and sequence-level rows, against the real sequence teacher."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from student_client import TargetOptions, TeacherClient
from student_client.digests import sequence_digests
from student_client.offline.cache import SoftTargetCache
from student_client.offline.scope import CacheScope
from student_client.online.token_loader import TokenTargetLoader
from student_client.teacher_process import TeacherProcess
from student_client.types import SoftTargets, TokenBatch

MODEL = "pydoc-causal-lm"
TASKS = ("next_token", "topic_group")
# top-k is bounded by the fewest classes of the tasks asked (topic_group: 3)
OPTIONS = TargetOptions(model=MODEL, tasks=TASKS, top_k=3, output_dtype="float16")


@pytest.fixture(scope="module")
def sequence_teacher(
    sequence_repository: Path, teacher_factory: Callable[..., TeacherProcess]
) -> TeacherProcess:
    return teacher_factory(sequence_repository)


def tokenizer_hash(repository: Path) -> str:
    data = (repository / MODEL / "tokenizer.json").read_bytes()
    return "sha256:" + hashlib.sha256(data).hexdigest()


def batches(count: int, seed: int, vocab: int, pad: int = -1) -> list[tuple[TokenBatch, int]]:
    """`count` padded batches of 4 sequences (1..32 tokens), padding set to `pad`."""
    rng = np.random.default_rng(seed)
    out = []
    for number in range(count):
        lengths = rng.integers(1, 33, size=4)
        ids = rng.integers(3, vocab, size=(4, int(lengths.max())))
        for row, length in enumerate(lengths):
            ids[row, length:] = pad
        out.append((TokenBatch(ids, lengths), number))
    return out


def assert_same(a: SoftTargets, b: SoftTargets) -> None:
    """Bitwise equal answers: every task's values, indices, tail mass and level, and lengths."""
    assert a.lengths is not None and b.lengths is not None
    assert a.lengths.tolist() == b.lengths.tolist()
    assert set(a.outputs) == set(b.outputs)
    for task, ours in a.outputs.items():
        theirs = b.outputs[task]
        assert ours.level == theirs.level and ours.kind == theirs.kind
        for left, right in [
            (ours.values, theirs.values),
            (ours.indices, theirs.indices),
            (ours.tail_mass, theirs.tail_mass),
        ]:
            assert (left is None) == (right is None)
            if left is not None:
                assert left.dtype == right.dtype and left.shape == right.shape  # type: ignore[union-attr]
                assert left.tobytes() == right.tobytes()  # type: ignore[union-attr]


def test_sequence_digests_read_only_the_real_ids() -> None:
    padded = TokenBatch(np.array([[5, 6, 7, -1], [9, 0, 0, 0]]), np.array([3, 1]))
    repadded = TokenBatch(np.array([[5, 6, 7, 4], [9, 4, 4, 4]], dtype=np.int32), np.array([3, 1]))
    packed = padded.packed()
    one = sequence_digests(padded.ids, padded.lengths, "sha256:aa")
    assert one == sequence_digests(repadded.ids, repadded.lengths, "sha256:aa")
    assert one == sequence_digests(packed.ids, packed.lengths, "sha256:aa")
    assert len(set(one)) == 2
    other = sequence_digests(padded.ids, padded.lengths, "sha256:bb")
    assert not set(one) & set(other)  # the same ids under another tokenizer: another key
    shorter = sequence_digests(padded.ids, np.array([2, 1]), "sha256:aa")
    assert shorter[0] != one[0] and shorter[1] == one[1]


def test_select_packs_the_chosen_sequences() -> None:
    batch = TokenBatch(np.array([[5, 6, 7], [8, -1, -1], [1, 2, -1]]), np.array([3, 1, 2]))
    chosen = batch.select([2, 0])
    assert chosen.ids.tolist() == [1, 2, 5, 6, 7] and chosen.lengths.tolist() == [2, 3]


def test_second_pass_is_answered_from_the_cache(
    sequence_teacher: TeacherProcess, sequence_repository: Path, tmp_path: Path
) -> None:
    hash_ = tokenizer_hash(sequence_repository)
    with (
        TeacherClient(sequence_teacher.grpc_address) as client,
        SoftTargetCache(tmp_path / "cache.sqlite") as cache,
    ):
        vocab = client.model_info(MODEL).vocab_size
        source = batches(5, seed=1, vocab=vocab)
        first_loader = TokenTargetLoader(source, client, OPTIONS, tokenizer_hash=hash_, cache=cache)
        first = {label: targets for _, label, targets in first_loader}
        assert first_loader.stats.sent == 5 and first_loader.stats.cached_samples == 0
        for targets in first.values():
            assert targets.outputs["next_token"].level == "token"
            assert targets.outputs["next_token"].values.shape[1] == 3
        assert len(cache) == 5 * 4 * len(TASKS)  # an entry per sequence and task

        # Padding differs, and one batch comes packed: the key reads only the real ids.
        again = [(TokenBatch(b.ids.clip(0), b.lengths), n) for b, n in source]
        again[2] = (source[2][0].packed(), 2)
        second_loader = TokenTargetLoader(again, client, OPTIONS, tokenizer_hash=hash_, cache=cache)
        second = {label: targets for _, label, targets in second_loader}
        stats = second_loader.stats
        assert (stats.sent, stats.cached_batches, stats.cached_samples) == (0, 5, 20), stats
        assert sorted(second) == list(range(5))
        for label, targets in second.items():
            assert_same(targets, first[label])

        # A batch of 2 cached sequences and 2 new ones sends only the new ones, then merges.
        old, new = source[0][0], batches(1, seed=99, vocab=vocab)[0][0]
        mixed = TokenBatch.padded(
            [
                new.ids[0, : new.lengths[0]].tolist(),
                old.ids[1, : old.lengths[1]].tolist(),
                new.ids[1, : new.lengths[1]].tolist(),
                old.ids[3, : old.lengths[3]].tolist(),
            ]
        )
        seen: list[int] = []
        original = client.open_stream

        def counting_stream(*args, **kwargs):  # type: ignore[no-untyped-def]
            stream = original(*args, **kwargs)
            send = stream.send

            def counted(inputs, *rest, **named):  # type: ignore[no-untyped-def]
                seen.append(inputs.batch_size)
                return send(inputs, *rest, **named)

            stream.send = counted  # type: ignore[method-assign]
            return stream

        client.open_stream = counting_stream  # type: ignore[method-assign]
        try:
            loader = TokenTargetLoader(
                [(mixed, "m")], client, OPTIONS, tokenizer_hash=hash_, cache=cache
            )
            ((_, _, merged),) = list(loader)
        finally:
            client.open_stream = original  # type: ignore[method-assign]
        assert seen == [2]  # one request, the 2 uncached sequences only
        assert (loader.stats.sent, loader.stats.cached_samples) == (1, 2)
        assert merged.lengths is not None and merged.lengths.tolist() == mixed.lengths.tolist()
        cached_rows = first[0].split("next_token")
        rows = merged.split("next_token")
        assert rows[1].tobytes() == cached_rows[1].tobytes()
        assert rows[3].tobytes() == cached_rows[3].tobytes()
        topic = merged.outputs["topic_group"].values
        assert topic[1].tobytes() == first[0].outputs["topic_group"].values[1].tobytes()
        alone = client.soft_targets_with(mixed, OPTIONS)
        for task in TASKS:  # the fresh rows are the teacher's for those sequences
            np.testing.assert_allclose(
                merged.outputs[task].values.astype(np.float32),
                alone.outputs[task].values.astype(np.float32),
                atol=2e-3,
            )
        # The merged batch is now whole in the cache, and its rows equal the merged answer.
        loader = TokenTargetLoader(
            [(mixed, "m")], client, OPTIONS, tokenizer_hash=hash_, cache=cache
        )
        ((_, _, replay),) = list(loader)
        assert loader.stats.sent == 0
        assert_same(replay, merged)


def test_other_temperature_k_or_tokenizer_misses(
    sequence_teacher: TeacherProcess, sequence_repository: Path, tmp_path: Path
) -> None:
    hash_ = tokenizer_hash(sequence_repository)
    with (
        TeacherClient(sequence_teacher.grpc_address) as client,
        SoftTargetCache(tmp_path / "cache.sqlite") as cache,
    ):
        source = batches(3, seed=2, vocab=client.model_info(MODEL).vocab_size)
        loader = TokenTargetLoader(source, client, OPTIONS, tokenizer_hash=hash_, cache=cache)
        assert len(list(loader)) == 3 and loader.stats.sent == 3
        for other in (
            TargetOptions(model=MODEL, tasks=TASKS, top_k=3, output_dtype="float16", temperature=2),
            TargetOptions(model=MODEL, tasks=TASKS, top_k=2, output_dtype="float16"),
            TargetOptions(model=MODEL, tasks=TASKS, top_k=3, output="log_probs"),
            # another wire encoding: tensors' tail mass is float32, the codes are lossy
            TargetOptions(
                model=MODEL, tasks=TASKS, top_k=3, output_dtype="float16", top_k_encoding="tensors"
            ),
            TargetOptions(
                model=MODEL,
                tasks=TASKS,
                top_k=3,
                output_dtype="float16",
                top_k_encoding="log_prob_codes",
            ),
        ):
            loader = TokenTargetLoader(source, client, other, tokenizer_hash=hash_, cache=cache)
            assert len(list(loader)) == 3
            assert (loader.stats.sent, loader.stats.cached_samples) == (3, 0), other
        # Another tokenizer's key for the same ids finds nothing (the teacher itself refuses
        # a loader whose tokenizer is not its own, so this is checked at the cache).
        version = client.model_info(MODEL).model_version
        scope = CacheScope.from_options(OPTIONS, version, TASKS, ("next_token",))
        batch = source[0][0]
        same = cache.lookup(scope, sequence_digests(batch.ids, batch.lengths, hash_), batch.lengths)
        assert same.complete
        wrong = sequence_digests(batch.ids, batch.lengths, "sha256:" + "ab" * 32)
        assert cache.lookup(scope, wrong, batch.lengths).missing == [0, 1, 2, 3]


def test_cache_refuses_scored_ids(sequence_teacher: TeacherProcess, tmp_path: Path) -> None:
    with (
        TeacherClient(sequence_teacher.grpc_address) as client,
        SoftTargetCache(tmp_path / "cache.sqlite") as cache,
        pytest.raises(ValueError, match="scored ids"),
    ):
        TokenTargetLoader(
            [], client, OPTIONS, tokenizer_hash="sha256:aa", scored_ids=lambda b: b.ids, cache=cache
        )


def test_bytes_per_token_for_top_32_float16(
    sequence_teacher: TeacherProcess, sequence_repository: Path, tmp_path: Path
) -> None:
    """Prints the figure docs/cache-and-export.md quotes (entry bytes and file bytes per token)."""
    options = TargetOptions(model=MODEL, tasks=("next_token",), top_k=32, output_dtype="float16")
    path = tmp_path / "cache.sqlite"
    with (
        TeacherClient(sequence_teacher.grpc_address) as client,
        SoftTargetCache(path, memory_bytes=0) as cache,
    ):
        source = batches(64, seed=3, vocab=client.model_info(MODEL).vocab_size)
        hash_ = tokenizer_hash(sequence_repository)
        loader = TokenTargetLoader(source, client, options, tokenizer_hash=hash_, cache=cache)
        tokens = sum(targets.outputs["next_token"].values.shape[0] for _, _, targets in loader)
        entries = cache.total_bytes
        assert len(cache) == 64 * 4
    per_token = entries / tokens
    file_per_token = path.stat().st_size / tokens
    print(
        f"\ntop-32 float16: {tokens} tokens, {per_token:.1f} entry B/token, "
        f"{file_per_token:.1f} file B/token"
    )
    # values 32 x 2 B + indices 32 x 8 B + tail 4 B per token, plus 56 B per sequence entry
    assert 324 <= per_token <= 324 + 56
