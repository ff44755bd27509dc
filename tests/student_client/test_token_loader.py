"""The student client on a sequence teacher (`pydoc-causal-lm`, small): `TokenBatch` requests
over gRPC and HTTP, token-level answers, the tokenizer download, and `TokenTargetLoader`."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from protocol.errors import FailedPrecondition
from protocol.v1 import teacher_pb2 as pb
from protocol.v1 import teacher_pb2_grpc as pb_grpc
from student_client import TargetOptions, TeacherClient
from student_client.online.messages import request_to_pb, soft_targets_from_pb
from student_client.online.token_loader import TokenTargetLoader
from student_client.teacher_process import TeacherProcess, loopback_channel
from student_client.types import ModelInfo, TokenBatch

MODEL = "pydoc-causal-lm"
TRANSPORTS = ["grpc", "http", "http-json"]


@pytest.fixture(scope="module")
def sequence_teacher(
    sequence_repository: Path, teacher_factory: Callable[..., TeacherProcess]
) -> TeacherProcess:
    return teacher_factory(sequence_repository)


def address(teacher: TeacherProcess, transport: str) -> str:
    return teacher.grpc_address if transport == "grpc" else teacher.http_url


def random_batches(
    info: ModelInfo, count: int, seed: int = 0, size: int = 4
) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """`count` padded batches (ids (size, L), lengths (size,), label = the batch's number), with
    padding past each length set to -1 (never read by the teacher)."""
    rng = np.random.default_rng(seed)
    batches = []
    for number in range(count):
        lengths = rng.integers(1, info.max_length + 1, size=size)
        ids = rng.integers(3, info.vocab_size, size=(size, int(lengths.max())))
        for row, length in enumerate(lengths):
            ids[row, length:] = -1
        batches.append((ids, lengths, number))
    return batches


def hash_of(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_model_info_and_tokenizer(
    sequence_teacher: TeacherProcess, sequence_repository: Path, transport: str
) -> None:
    stored = sequence_repository / MODEL / "tokenizer.json"
    with TeacherClient(address(sequence_teacher, transport), transport=transport) as client:  # type: ignore[arg-type]
        info = client.model_info(MODEL)
        assert info.input_kind == "tokens" and info.max_length == 32
        assert info.vocab_size > 256 and info.max_batch_size > 0
        assert info.tokenizer is not None and info.tokenizer.sha256 == hash_of(stored)
        assert info.tokenizer.file_name == "tokenizer.json"
        assert set(info.tokenizer.special_ids) >= {"pad", "bos", "eos"}
        assert info.task("next_token").level == "token"
        assert info.task("next_token").classes == info.vocab_size
        assert info.task("topic_group").level == "sequence"
        assert info.task("topic_group").classes == 3
        assert "perplexity" in info.held_out_metrics
        file = client.tokenizer(MODEL)
        assert file.content == stored.read_bytes() and file.sha256 == info.tokenizer.sha256
        assert file.file_name == "tokenizer.json"


def test_image_model_info_keeps_its_defaults(teacher: TeacherProcess) -> None:
    with TeacherClient(teacher.grpc_address) as client:
        info = client.model_info()
        assert info.input_kind == "tensor" and info.tokenizer is None
        assert all(task.level == "sequence" for task in info.tasks)
        with pytest.raises(FailedPrecondition) as caught:
            client.tokenizer()
        assert caught.value.field == "model"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_padded_and_packed_give_the_same_token_rows(
    sequence_teacher: TeacherProcess, transport: str
) -> None:
    with TeacherClient(address(sequence_teacher, transport), transport=transport) as client:  # type: ignore[arg-type]
        info = client.model_info(MODEL)
        ids, lengths, _ = random_batches(info, 1, seed=3)[0]
        padded = TokenBatch(ids, lengths)
        total = int(lengths.sum())
        scored = np.random.default_rng(1).integers(0, info.vocab_size, size=(total, 3))
        kwargs = dict(model=MODEL, tasks=("next_token", "topic_group"), temperature=2.0, top_k=3)
        answer = client.sequence_targets(padded, scored_ids=scored, **kwargs)  # type: ignore[arg-type]
        packed = client.sequence_targets(padded.packed(), scored_ids=scored, **kwargs)  # type: ignore[arg-type]
        dense = client.sequence_targets(
            padded, model=MODEL, tasks=("next_token",), output="log_probs", temperature=2.0
        )
    tokens = answer.outputs["next_token"]
    assert answer.lengths is not None and answer.lengths.tolist() == lengths.tolist()
    assert answer.batch_size == len(lengths)
    assert tokens.level == "token" and tokens.values.shape == (total, 3)
    assert tokens.indices is not None and tokens.indices.dtype == np.int64
    assert tokens.tail_mass is not None and tokens.tail_mass.shape == (total,)
    topic = answer.outputs["topic_group"]
    assert topic.level == "sequence" and topic.values.shape == (len(lengths), 3)
    for task in ("next_token", "topic_group"):
        np.testing.assert_allclose(
            answer.outputs[task].values, packed.outputs[task].values, atol=1e-5
        )
    # Scored ids: log-probabilities at exactly those ids, as the dense answer has them.
    assert tokens.scored_values is not None and tokens.scored_values.shape == (total, 3)
    expected = np.take_along_axis(dense.outputs["next_token"].values, scored, axis=1)
    np.testing.assert_allclose(tokens.scored_values, expected, atol=1e-4)
    # Top-k rows agree with the dense distribution (probs = exp of log_probs at T).
    dense_probs = np.exp(dense.outputs["next_token"].values)
    np.testing.assert_allclose(
        tokens.values, np.take_along_axis(dense_probs, tokens.indices, axis=1), atol=1e-5
    )
    # Split per sequence.
    parts = answer.split("next_token")
    assert [len(part) for part in parts] == lengths.tolist()


def test_top_k_indices_travel_as_uint16(sequence_teacher: TeacherProcess) -> None:
    ids = np.array([[1, 57, 402], [1, 88, 0]], dtype=np.int64)
    batch = TokenBatch(ids, np.array([3, 2]))
    options = TargetOptions(model=MODEL, tasks=("next_token",), top_k=5, top_k_encoding="tensors")
    with loopback_channel(sequence_teacher.grpc_address) as channel:
        stub = pb_grpc.TeacherServiceStub(channel)
        response = stub.GetSoftTargets(request_to_pb(batch, options, MODEL, "b"), timeout=30)
    assert response.outputs[0].indices.dtype == pb.UINT16
    decoded = soft_targets_from_pb(response).outputs["next_token"]
    assert decoded.indices is not None and decoded.indices.dtype == np.int64
    assert decoded.indices.shape == (5, 5) and int(decoded.indices.max()) < 65536


def test_sequence_top_k_asks_for_packed_by_default(sequence_teacher: TeacherProcess) -> None:
    batch = TokenBatch(np.array([[1, 57, 402], [1, 88, 0]], dtype=np.int64), np.array([3, 2]))
    options = TargetOptions(model=MODEL, tasks=("next_token",), top_k=5)
    request = request_to_pb(batch, options, MODEL, "b")
    assert request.top_k_encoding == pb.PACKED
    with loopback_channel(sequence_teacher.grpc_address) as channel:
        stub = pb_grpc.TeacherServiceStub(channel)
        response = stub.GetSoftTargets(request, timeout=30)
        vocab = stub.GetModelInfo(pb.GetModelInfoRequest(model=MODEL), timeout=30).vocab_size
    output = response.outputs[0]
    assert output.HasField("packed") and not output.HasField("indices")
    assert output.packed.indices.bits == (vocab - 1).bit_length()  # ceil(log2 V)
    assert output.packed.values.bits == 15  # float16 probabilities without their sign bit
    # image requests, and dense ones, keep the plain Tensors
    assert (
        request_to_pb(np.zeros((1, 1, 28, 28), np.float32), options, "m", "b").top_k_encoding == 0
    )
    dense = TargetOptions(model=MODEL, tasks=("next_token",))
    assert request_to_pb(batch, dense, MODEL, "b").top_k_encoding == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("encoding", ["packed", "log_prob_codes"])
def test_packed_answers_decode_like_the_tensors(
    sequence_teacher: TeacherProcess, transport: str, encoding: str
) -> None:
    """The client's decode of a packed answer equals the plain answer: values and ids exactly
    (codes: within half a step), the tail mass within float16 rounding."""
    with TeacherClient(address(sequence_teacher, transport), transport=transport) as client:  # type: ignore[arg-type]
        info = client.model_info(MODEL)
        ids, lengths, _ = random_batches(info, 1, seed=11)[0]
        batch = TokenBatch(ids, lengths)
        base = TargetOptions(model=MODEL, output="log_probs", top_k=3, temperature=2.0)
        plain = client.soft_targets_with(batch, replace(base, top_k_encoding="tensors"))
        compact = client.soft_targets_with(batch, replace(base, top_k_encoding=encoding))
    for task in ("next_token", "topic_group"):
        want, got = plain.outputs[task], compact.outputs[task]
        assert got.values.dtype == np.float16  # JSON's plain answer is lists, read as float32
        assert want.values.dtype == (np.float32 if transport == "http-json" else np.float16)
        assert got.indices is not None and want.indices is not None
        assert got.tail_mass is not None and want.tail_mass is not None
        assert got.indices.dtype == np.int64 and got.tail_mass.dtype == np.float32
        np.testing.assert_array_equal(got.indices, want.indices)
        np.testing.assert_allclose(got.tail_mass, want.tail_mass, rtol=2.0**-11, atol=2.0**-25)
        if encoding == "packed":
            np.testing.assert_array_equal(got.values.astype(np.float32), want.values)
        else:  # codes of the float64 log-probs vs their float16 rounding
            error = np.abs(got.values.astype(np.float64) - want.values.astype(np.float64))
            assert error.max() <= 1 / 32 + 2.0**-7


def test_a_wrong_tokenizer_hash_is_refused_by_the_teacher(
    sequence_teacher: TeacherProcess,
) -> None:
    batch = TokenBatch.padded([[1, 5, 6]])
    with TeacherClient(sequence_teacher.grpc_address) as client:
        with pytest.raises(FailedPrecondition) as caught:
            client.sequence_targets(batch, model=MODEL, tokenizer_hash="sha256:" + "0" * 64)
        assert caught.value.field == "tokenizer_hash"


@pytest.mark.parametrize(("transport", "depth"), [("grpc", 1), ("grpc", 4), ("http", 4)])
def test_loader_keeps_order_and_matches_direct_requests(
    sequence_teacher: TeacherProcess, sequence_repository: Path, transport: str, depth: int
) -> None:
    options = TargetOptions(model=MODEL, tasks=("next_token", "topic_group"), top_k=3)
    tokenizer = sequence_repository / MODEL / "tokenizer.json"
    with TeacherClient(address(sequence_teacher, transport), transport=transport) as client:  # type: ignore[arg-type]
        info = client.model_info(MODEL)
        batches = random_batches(info, 12)
        loader = TokenTargetLoader(
            batches, client, options, tokenizer_file=tokenizer, depth=depth, ids_dtype="int32"
        )
        labels, ids = [], []
        for batch, label, targets in loader:
            labels.append(label)
            ids.append(targets.batch_id)
            assert isinstance(batch, TokenBatch)  # as read (ids_dtype converts what is sent)
            ids_, lengths, _ = batches[label]
            assert targets.lengths is not None and targets.lengths.tolist() == lengths.tolist()
            if label in (0, 7):  # the loader's answer is the teacher's for exactly this batch
                alone = client.soft_targets_with(TokenBatch(ids_, lengths), options)
                for task in options.tasks:
                    np.testing.assert_allclose(
                        targets.outputs[task].values, alone.outputs[task].values, atol=1e-3
                    )
        assert targets.model_version == info.model_version
    assert labels == list(range(12)) and len(set(ids)) == 12
    stats = loader.stats
    assert (stats.sent, stats.received, stats.yielded) == (12, 12, 12), stats
    assert stats.samples == 12 * 4


@pytest.mark.parametrize("transport", ["grpc", "http-json"])
def test_tokenizer_mismatch_is_refused_before_the_first_batch(
    sequence_teacher: TeacherProcess, transport: str
) -> None:
    read: list[int] = []

    def source():  # type: ignore[no-untyped-def]
        for number in range(3):
            read.append(number)
            yield TokenBatch.padded([[1, 5, 6]]), number

    wrong = "sha256:" + "ab" * 32
    with TeacherClient(address(sequence_teacher, transport), transport=transport) as client:  # type: ignore[arg-type]
        loader = TokenTargetLoader(
            source(), client, TargetOptions(model=MODEL), tokenizer_hash=wrong
        )
        with pytest.raises(FailedPrecondition) as caught:
            next(iter(loader))
        teacher_hash = client.model_info(MODEL).tokenizer.sha256  # type: ignore[union-attr]
    assert caught.value.field == "tokenizer_hash"
    assert wrong in caught.value.message and teacher_hash in caught.value.message
    assert read == [] and loader.stats.sent == 0


def test_loader_needs_the_students_tokenizer(sequence_teacher: TeacherProcess) -> None:
    with TeacherClient(sequence_teacher.grpc_address) as client, pytest.raises(ValueError):
        TokenTargetLoader([], client, TargetOptions(model=MODEL))


def test_scored_ids_from_a_callback_round_trip(
    sequence_teacher: TeacherProcess, sequence_repository: Path
) -> None:
    tokenizer = sequence_repository / MODEL / "tokenizer.json"
    options = TargetOptions(model=MODEL, tasks=("next_token",), output="log_probs")
    calls: list[int] = []

    def student_top_ids(batch: TokenBatch) -> np.ndarray:
        """Stands in for the student's own top-2 ids per real token."""
        calls.append(batch.tokens)
        return (np.arange(batch.tokens * 2).reshape(batch.tokens, 2) * 7) % 300

    with TeacherClient(sequence_teacher.grpc_address) as client:
        info = client.model_info(MODEL)
        batches = random_batches(info, 5, seed=9)
        loader = TokenTargetLoader(
            batches, client, options, tokenizer_file=tokenizer, scored_ids=student_top_ids, depth=2
        )
        for batch, _, targets in loader:
            assert batch.scored_ids is not None
            tokens = targets.outputs["next_token"]
            assert tokens.scored_values is not None
            np.testing.assert_allclose(
                tokens.scored_values,
                np.take_along_axis(tokens.values, batch.scored_ids, axis=1),
                atol=1e-4,
            )
    assert calls == [int(lengths.sum()) for _, lengths, _ in batches]
