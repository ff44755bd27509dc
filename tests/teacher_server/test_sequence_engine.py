"""The core serves sequence models: per-token and per-sequence soft targets of the small default
sequence teacher, in process (no doors). Validation names each bad field; a request's numbers do
not depend on what it is merged with or on its padding; the token budget and padding waste hold."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from protocol.errors import FailedPrecondition, InvalidArgument
from teacher_server.repository.default_sequence_teacher import DEFAULT_SEQUENCE_MODEL_NAME
from teacher_server.repository.model_config import file_sha256
from teacher_server.serving.core import TeacherCore
from teacher_server.serving.schema import SoftTargets, SoftTargetsRequest, ValidatedRequest
from teacher_server.serving.sequence_engine import SequenceEngine, plan_forwards
from teacher_server.serving.validation import validate
from teacher_server.settings import Settings

NAME = DEFAULT_SEQUENCE_MODEL_NAME
LM, GROUP = "next_token", "topic_group"


@pytest.fixture(scope="module")
def core(sequence_repository: Path) -> Iterator[TeacherCore]:
    core = TeacherCore(
        Settings(
            model_repository=sequence_repository,
            train_default_if_missing=False,
            max_batch_tokens=256,
        )
    )
    core.load()
    assert NAME in core.models, core.failures
    yield core


def _engine(core: TeacherCore) -> SequenceEngine:
    served = core.models[NAME].versions[core.models[NAME].default]
    assert isinstance(served.engine, SequenceEngine)
    return served.engine


def _ids(lengths: list[int], seed: int, vocab: int = 512, width: int = 0) -> np.ndarray:
    """Padded ids (batch, width or max(lengths)) with random junk past each length."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab, (len(lengths), max(width, *lengths)), dtype=np.int64)


def _request(lengths: list[int], seed: int = 0, **fields: Any) -> SoftTargetsRequest:
    fields.setdefault("inputs", _ids(lengths, seed))
    return SoftTargetsRequest(model=NAME, lengths=np.array(lengths), **fields)


def _validated(core: TeacherCore, request: SoftTargetsRequest) -> ValidatedRequest:
    return validate(request, core.model_info(NAME))


def _alone(core: TeacherCore, request: SoftTargetsRequest) -> SoftTargets:
    return _engine(core).run([_validated(core, request)])[0]


def _served(core: TeacherCore, *requests: SoftTargetsRequest) -> list[SoftTargets]:
    return _served_by(TeacherCore(core.settings), *requests)


def _served_by(fresh: TeacherCore, *requests: SoftTargetsRequest) -> list[SoftTargets]:
    """The requests sent at once to a core not started yet (a core's batchers live on the loop
    that started them), through validation and the batcher."""
    fresh.load()

    async def main() -> list[SoftTargets]:
        await fresh.start()
        try:
            return list(await asyncio.gather(*(fresh.soft_targets(r) for r in requests)))
        finally:
            await fresh.stop()

    return asyncio.run(main())


def _assert_same(a: SoftTargets, b: SoftTargets) -> None:
    assert [o.task for o in a.outputs] == [o.task for o in b.outputs]
    for x, y in zip(a.outputs, b.outputs, strict=True):
        np.testing.assert_allclose(x.values, y.values, rtol=1e-4, atol=1e-5)
        for field in ("indices", "tail_mass", "scored_values"):
            left, right = getattr(x, field), getattr(y, field)
            assert (left is None) == (right is None), field
            if left is not None:
                np.testing.assert_allclose(left, right, rtol=1e-4, atol=1e-5)
    assert a.hints.keys() == b.hints.keys()
    for name in a.hints:
        np.testing.assert_allclose(a.hints[name], b.hints[name], rtol=1e-4, atol=1e-5)


def test_model_info_describes_the_sequence_model(core: TeacherCore) -> None:
    info = core.model_info(NAME)
    assert info.input_kind == "tokens" and info.max_length == 32 and info.max_batch_tokens == 256
    assert info.vocab_size == 512 and info.tokenizer is not None
    assert info.tokenizer.special_ids == {"pad": 0, "bos": 1, "eos": 2}
    levels = {task.name: (task.level, task.num_classes) for task in info.tasks}
    assert levels == {LM: ("token", 512), GROUP: ("sequence", 3)}
    assert "perplexity" in info.held_out_metrics
    assert info.hints == {"layer_1": (32,)}  # one row per real token
    tokenizer, data = core.tokenizer_file(NAME)
    assert tokenizer == info.tokenizer and data.startswith(b"{")


def test_served_probabilities_sum_to_one_at_real_positions(core: TeacherCore) -> None:
    (result,) = _served(core, _request([5, 1, 32], temperature=2.0, hints=("layer_1",)))
    lm, group = result.outputs
    assert lm.level == "token" and lm.values.shape == (38, 512)
    np.testing.assert_allclose(lm.values.sum(1), 1.0, atol=1e-5)
    assert group.level == "sequence" and group.values.shape == (3, 3)
    np.testing.assert_allclose(group.values.sum(1), 1.0, atol=1e-5)
    assert result.hints["layer_1"].shape == (38, 32)
    assert result.lengths is not None and result.lengths.tolist() == [5, 1, 32]


def test_top_k_with_tail_mass_and_scored_ids_match_the_dense_values(core: TeacherCore) -> None:
    lengths = [7, 3]
    scored = np.random.default_rng(1).integers(0, 512, (10, 4))
    dense = _alone(core, _request(lengths, tasks=(LM,), output="log_probs", temperature=3.0))
    top = _alone(
        core,
        _request(lengths, tasks=(LM,), output="probs", temperature=3.0, top_k=8, scored_ids=scored),
    )
    (dense_lm,), (top_lm,) = dense.outputs, top.outputs
    assert top_lm.indices is not None and top_lm.tail_mass is not None
    np.testing.assert_allclose(top_lm.values.sum(1) + top_lm.tail_mass, 1.0, atol=1e-5)
    expected = np.exp(np.take_along_axis(dense_lm.values, top_lm.indices, 1))
    np.testing.assert_allclose(top_lm.values, expected, rtol=1e-5)
    assert top_lm.scored_values is not None and top_lm.scored_values.shape == (10, 4)
    np.testing.assert_allclose(
        top_lm.scored_values, np.take_along_axis(dense_lm.values, scored, 1), rtol=1e-5
    )


def test_a_request_alone_equals_it_merged_with_a_length_skewed_mix(core: TeacherCore) -> None:
    lengths = [9, 2, 30]
    packed_ids = np.concatenate([_ids([n], seed=i)[0, :n] for i, n in enumerate(lengths)])
    scored = np.random.default_rng(2).integers(0, 512, (41, 3))
    mix = [
        _request([32] * 3 + [1] * 5, seed=7, tasks=(LM,), temperature=0.5, top_k=5),
        _request(lengths, inputs=packed_ids, temperature=2.0, scored_ids=scored),  # packed
        _request([16, 4], seed=8, tasks=(GROUP,), output="logits", hints=("layer_1",)),
        _request([3] * 10, seed=9, tasks=(LM,), output="log_probs", output_dtype="float16"),
        _request([31, 12, 1], seed=10, top_k=3, output_dtype="bfloat16", hints=("layer_1",)),
    ]
    merged = _engine(core).run([_validated(core, r) for r in mix])
    assert len(_engine(core).last_forwards) > 1
    for request, result in zip(mix, merged, strict=True):
        _assert_same(_alone(core, request), result)
    # and through the batcher, all at once
    for request, result in zip(mix, _served(core, *mix), strict=True):
        _assert_same(_alone(core, request), result)


def test_padding_content_and_width_cannot_change_a_result(core: TeacherCore) -> None:
    lengths = [4, 11]
    ids = _ids(lengths, seed=3, width=32)
    other = ids.copy()
    other[0, 4:] = 0
    other[1, 11:] = 511
    packed = np.concatenate([ids[0, :4], ids[1, :11]])
    results = [
        _alone(core, _request(lengths, inputs=array, hints=("layer_1",)))
        for array in (ids, other, ids[:, :11], packed)
    ]
    for result in results[1:]:
        _assert_same(results[0], result)


def test_forwards_keep_the_token_budget_and_little_padding(core: TeacherCore) -> None:
    engine = _engine(core)
    rng = np.random.default_rng(4)
    # length-skewed: many short sequences, a few long ones
    lengths = np.minimum(rng.geometric(0.12, 400), 32).tolist()
    requests = [_request(lengths[i : i + 25], seed=i) for i in range(0, 400, 25)]
    before = (engine.real_tokens, engine.padded_tokens)
    engine.run([_validated(core, r) for r in requests])
    real = engine.real_tokens - before[0]
    padded = engine.padded_tokens - before[1]
    assert real == sum(lengths)
    assert padded / real - 1 < 0.10
    assert all(rows * length <= 256 for rows, length in engine.last_forwards)
    assert sum(rows for rows, _ in engine.last_forwards) == 400


def test_plan_forwards_bounds_padding_and_budget() -> None:
    lengths = np.array([32, 31, 30, 20, 10, 10, 10, 9, 1, 1])
    forwards = plan_forwards(lengths, max_batch_tokens=64)
    assert forwards[0] == (0, 2)  # 3 x 32 > 64
    assert [end - start for start, end in forwards] != [1] * len(lengths)
    for start, end in forwards:
        rows, longest = end - start, int(lengths[start])
        assert rows == 1 or rows * longest <= 64
        assert rows * longest <= 1.1 * lengths[start:end].sum()
    assert plan_forwards(np.array([40]), max_batch_tokens=16) == [(0, 1)]  # runs alone


def test_the_batcher_merges_under_the_token_budget(core: TeacherCore) -> None:
    requests = [_request([32] * 4, seed=i) for i in range(6)]  # 128 tokens each, budget 256
    big = _request([32] * 10, seed=6)  # 320 tokens: above the budget, runs alone
    fresh = TeacherCore(core.settings)
    results = _served_by(fresh, *requests, big)
    assert len(results) == 7
    batcher = fresh.models[NAME].versions[fresh.models[NAME].default].batcher
    assert batcher.forwards >= 4  # at most two requests of 128 tokens per forward, big alone


BAD_REQUESTS: list[tuple[dict[str, Any], str]] = [
    ({"lengths": None}, r"^lengths: model 'pydoc-causal-lm' takes token sequences"),
    ({"lengths": np.array([3, 0])}, r"^lengths\[1\]: 0 is not a length >= 1"),
    ({"lengths": np.array([3, 33])}, r"^lengths\[1\]: 33 is above .* max_length 32"),
    ({"lengths": np.array([[3]])}, r"^lengths: expected a 1-D array of integers"),
    ({"lengths": np.array([3.0])}, r"^lengths: expected a 1-D array of integers"),
    ({"inputs": np.zeros((2, 2), np.int64)}, r"^inputs.shape: padded ids must be \[2, L\]"),
    ({"inputs": np.zeros((2, 33), np.int64)}, r"^inputs.shape: padded ids must be \[2, L\]"),
    ({"inputs": np.zeros(6, np.int64)}, r"^inputs.shape: packed ids must be \[7\]"),
    ({"inputs": np.zeros((2, 4), np.float32)}, r"^inputs.dtype: .* got float32"),
    (
        {"inputs": np.array([[1, 2, 512, 0], [1, 2, 3, 4]])},
        r"^inputs: token id 512 of sequence 0 at position 2 is outside \[0, 512\)",
    ),
    ({"scored_ids": np.zeros((6, 2), np.int64)}, r"^scored_ids: expected integers \[7, m\]"),
    ({"scored_ids": np.zeros((7, 65), np.int64)}, r"^scored_ids: expected integers \[7, m\]"),
    (
        {"scored_ids": np.full((7, 2), 512, np.int64)},
        r"^scored_ids: id 512 at \[0, 0\] is outside \[0, 512\)",
    ),
    (
        {"scored_ids": np.zeros((7, 2), np.int64), "tasks": (GROUP,)},
        r"^scored_ids: only for token-level tasks",
    ),
    ({"top_k": 4, "tasks": (GROUP,)}, r"^top_k: must be between 0 \(dense\) and 3"),
    ({"hints": ("layer_9",)}, r"^hints: unknown hint 'layer_9'"),
]


@pytest.mark.parametrize(("fields", "message"), BAD_REQUESTS)
def test_bad_sequence_requests_name_the_field(
    core: TeacherCore, fields: dict[str, Any], message: str
) -> None:
    request = dataclasses.replace(_request([4, 3], seed=5), **fields)
    with pytest.raises(InvalidArgument, match=message):
        _validated(core, request)


def test_a_foreign_tokenizer_hash_is_refused_naming_both(core: TeacherCore) -> None:
    info = core.model_info(NAME)
    assert info.tokenizer is not None
    request = _request([4], tokenizer_hash="sha256:" + "0" * 64)
    with pytest.raises(FailedPrecondition, match=r"^tokenizer_hash: .*sha256:0{64}.*sha256:") as e:
        _validated(core, request)
    assert info.tokenizer.sha256 in e.value.message
    _validated(core, _request([4], tokenizer_hash=info.tokenizer.sha256))


def test_a_tokenizer_file_that_does_not_match_its_hash_fails_the_load(
    sequence_repository: Path, tmp_path: Path
) -> None:
    folder = tmp_path / NAME
    shutil.copytree(sequence_repository / NAME, folder)
    with (folder / "tokenizer.json").open("ab") as file:
        file.write(b" ")
    core_hash = file_sha256((folder / "tokenizer.json").read_bytes())
    expected = file_sha256((sequence_repository / NAME / "tokenizer.json").read_bytes())
    core = TeacherCore(Settings(model_repository=tmp_path, train_default_if_missing=False))
    core.load()
    assert NAME not in core.models
    assert core_hash in core.failures[NAME] and expected in core.failures[NAME]
