"""The sequence contract at both doors of a real teacher serving the small default sequence teacher
(`pydoc-causal-lm`: token-level `next_token` over the vocabulary, sequence-level `topic_group`):
padded and packed ids with lengths, per-token dense and top-k outputs, scored ids, ModelInfo's
tokenizer and the tokenizer download, and bad input refused with the right status on gRPC (via the
`protocol.v1` stubs) and HTTP JSON (via httpx)."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest

from protocol import codec
from protocol.errors import GRPC_CODE_KEY, GRPC_FIELD_KEY
from protocol.kserve_v2 import grpc_predict_v2_pb2 as v2pb
from protocol.kserve_v2 import grpc_predict_v2_pb2_grpc as v2pb_grpc
from protocol.v1 import teacher_pb2 as pb
from protocol.v1 import teacher_pb2_grpc as pb_grpc
from student_client.teacher_process import TeacherProcess, loopback_channel
from teacher_server.repository.default_sequence_teacher import DEFAULT_SEQUENCE_MODEL_NAME

MODEL = DEFAULT_SEQUENCE_MODEL_NAME
LM, GROUP = "next_token", "topic_group"
TIMEOUT = 30.0
LENGTHS = [5, 3, 8]
TRANSPORTS = ["grpc", "http"]

Doors = tuple[pb_grpc.TeacherServiceStub, httpx.Client]


@dataclass
class Output:
    level: str
    values: np.ndarray
    indices: np.ndarray | None = None
    tail_mass: np.ndarray | None = None
    scored_values: np.ndarray | None = None


@dataclass
class Answer:
    outputs: dict[str, Output]
    lengths: np.ndarray | None
    raw: Any = field(repr=False, default=None)


@dataclass
class Refusal:
    code: str
    field: str
    message: str
    status: Any  # grpc.StatusCode or the HTTP status


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sequence_teacher(
    teacher_factory: Callable[..., TeacherProcess], sequence_repository: Path
) -> TeacherProcess:
    return teacher_factory(sequence_repository)


@pytest.fixture(scope="module")
def doors(connect: Callable[[TeacherProcess], Doors], sequence_teacher: TeacherProcess) -> Doors:
    return connect(sequence_teacher)


@pytest.fixture(scope="module")
def info(doors: Doors) -> pb.ModelInfo:
    return doors[0].GetModelInfo(pb.GetModelInfoRequest(model=MODEL), timeout=TIMEOUT)


@pytest.fixture(scope="module")
def vocab(info: pb.ModelInfo) -> int:
    return int(info.vocab_size)


def sequences(vocab: int, lengths: list[int] = LENGTHS, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, size=n, dtype=np.int64) for n in lengths]


def padded(seqs: list[np.ndarray], width: int | None = None, pad: int = 0) -> np.ndarray:
    width = width or max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad, dtype=np.int64)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = s
    return ids


# --- one request, either door -----------------------------------------------------------------


def _grpc_request(ids: np.ndarray, lengths: Any, **fields: Any) -> pb.SoftTargetsRequest:
    message = pb.SoftTargetsRequest(model=fields.pop("model", MODEL), inputs=codec.encode(ids))
    if lengths is not None:
        message.lengths.CopyFrom(codec.encode(np.asarray(lengths, dtype=np.int64)))
    scored = fields.pop("scored_ids", None)
    if scored is not None:
        message.scored_ids.CopyFrom(codec.encode(np.asarray(scored, dtype=np.int64)))
    output = fields.pop("output", "probs")
    message.output = {"probs": pb.PROBS, "log_probs": pb.LOG_PROBS, "logits": pb.LOGITS}[output]
    for name, value in fields.items():
        if name == "tasks":
            message.tasks.extend(value)
        else:
            setattr(message, name, value)
    return message


def _grpc_answer(response: pb.SoftTargetsResponse) -> Answer:
    outputs = {}
    for output in response.outputs:
        outputs[output.task] = Output(
            level=output.level,
            values=codec.decode(output.values, "values"),
            indices=codec.decode(output.indices) if output.HasField("indices") else None,
            tail_mass=codec.decode(output.tail_mass) if output.HasField("tail_mass") else None,
            scored_values=codec.decode(output.scored_values)
            if output.HasField("scored_values")
            else None,
        )
    lengths = codec.decode(response.lengths) if response.HasField("lengths") else None
    return Answer(outputs, lengths, response)


def _http_body(ids: np.ndarray, lengths: Any, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"inputs": ids.tolist(), **fields}
    body.pop("model", None)
    if lengths is not None:
        body["lengths"] = np.asarray(lengths).tolist()
    if body.get("scored_ids") is not None:
        body["scored_ids"] = np.asarray(body["scored_ids"]).tolist()
    return body


def _http_answer(body: dict[str, Any]) -> Answer:
    outputs = {}
    for task, entry in body["outputs"].items():

        def array(key: str, dtype: type, entry: dict[str, Any] = entry) -> np.ndarray | None:
            return np.asarray(entry[key], dtype=dtype) if key in entry else None

        values = array("values", np.float32)
        assert values is not None
        outputs[task] = Output(
            level=entry["level"],
            values=values,
            indices=array("indices", np.int64),
            tail_mass=array("tail_mass", np.float32),
            scored_values=array("scored_values", np.float32),
        )
    lengths = np.asarray(body["lengths"]) if "lengths" in body else None
    return Answer(outputs, lengths, body)


def ask(doors: Doors, transport: str, ids: np.ndarray, lengths: Any, **fields: Any) -> Answer:
    """Soft targets over `transport`; fails the test on an error."""
    model = fields.get("model", MODEL)
    if transport == "grpc":
        response = doors[0].GetSoftTargets(_grpc_request(ids, lengths, **fields), timeout=TIMEOUT)
        return _grpc_answer(response)
    reply = doors[1].post(
        f"/v1/models/{model}/soft-targets", json=_http_body(ids, lengths, **fields)
    )
    assert reply.status_code == 200, reply.text
    return _http_answer(reply.json())


def refused(doors: Doors, transport: str, ids: np.ndarray, lengths: Any, **fields: Any) -> Refusal:
    """The refusal of a request that must fail, over `transport`."""
    model = fields.get("model", MODEL)
    if transport == "grpc":
        with pytest.raises(grpc.RpcError) as info:
            doors[0].GetSoftTargets(_grpc_request(ids, lengths, **fields), timeout=TIMEOUT)
        error: Any = info.value
        trailers = dict(error.trailing_metadata() or ())
        return Refusal(
            trailers.get(GRPC_CODE_KEY, ""),
            trailers.get(GRPC_FIELD_KEY, ""),
            error.details(),
            error.code(),
        )
    reply = doors[1].post(
        f"/v1/models/{model}/soft-targets", json=_http_body(ids, lengths, **fields)
    )
    assert reply.status_code != 200, reply.text
    body = reply.json()["error"]
    return Refusal(body["code"], body["field"], body["message"], reply.status_code)


# --- model info and the tokenizer -------------------------------------------------------------


def test_model_info_shows_the_sequence_contract(doors: Doors, info: pb.ModelInfo) -> None:
    assert info.input_kind == "tokens"
    assert info.max_length > 0 and info.vocab_size > 256 and info.max_batch_tokens >= 0
    assert info.tokenizer.file_name == "tokenizer.json"
    assert info.tokenizer.sha256.startswith("sha256:")
    assert 0 < info.tokenizer.vocab_size <= info.vocab_size
    assert "pad" in info.tokenizer.special_ids
    assert info.held_out_metrics  # measured when trained
    levels = {t.name: (t.level, t.num_classes) for t in info.tasks}
    assert levels[LM] == ("token", info.vocab_size)
    assert levels[GROUP][0] == "sequence" and levels[GROUP][1] >= 2
    assert pb.INT64 in info.accepted_input_dtypes

    http = doors[1].get(f"/v1/models/{MODEL}").json()
    assert http["input_kind"] == "tokens"
    assert http["max_length"] == info.max_length and http["vocab_size"] == info.vocab_size
    assert http["tokenizer"]["sha256"] == info.tokenizer.sha256
    assert http["tokenizer"]["special_ids"] == dict(info.tokenizer.special_ids)
    assert http["held_out_metrics"] == pytest.approx(dict(info.held_out_metrics))
    assert {t["name"]: t["level"] for t in http["tasks"]} == {LM: "token", GROUP: "sequence"}


def test_the_tokenizer_is_downloadable_and_its_hash_matches(
    doors: Doors, info: pb.ModelInfo
) -> None:
    stub, http = doors
    answer = stub.GetTokenizer(pb.GetTokenizerRequest(model=MODEL), timeout=TIMEOUT)
    digest = "sha256:" + hashlib.sha256(answer.content).hexdigest()
    assert answer.sha256 == digest == info.tokenizer.sha256
    assert answer.file_name == info.tokenizer.file_name

    reply = http.get(f"/v1/models/{MODEL}/tokenizer")
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("application/json")
    assert reply.headers["x-tokenizer-sha256"] == info.tokenizer.sha256
    assert reply.content == answer.content
    assert "model" in reply.json()  # a tokenizers JSON file

    pinned = http.get(f"/v1/models/{MODEL}/tokenizer", params={"model_version": info.model_version})
    assert pinned.content == answer.content


def test_a_model_without_tokenizer_refuses_the_download(
    stub: pb_grpc.TeacherServiceStub, http: httpx.Client
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.GetTokenizer(pb.GetTokenizerRequest(model="mnist-multitask"), timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert dict(info.value.trailing_metadata())[GRPC_FIELD_KEY] == "model"
    reply = http.get("/v1/models/mnist-multitask/tokenizer")
    assert reply.status_code == 412
    assert reply.json()["error"]["field"] == "model"
    assert http.get("/v1/models/nope/tokenizer").status_code == 404


# --- results ----------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_dense_token_probabilities_sum_to_one_at_real_positions(
    doors: Doors, vocab: int, transport: str
) -> None:
    seqs = sequences(vocab)
    answer = ask(doors, transport, padded(seqs, width=10), LENGTHS, tasks=[LM])
    lm = answer.outputs[LM]
    assert lm.level == "token"
    assert lm.values.shape == (sum(LENGTHS), vocab)  # real tokens only, no padding rows
    np.testing.assert_allclose(lm.values.astype(np.float64).sum(axis=1), 1.0, atol=1e-4)
    assert answer.lengths is not None and answer.lengths.tolist() == LENGTHS


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_padding_never_reaches_a_result(doors: Doors, vocab: int, transport: str) -> None:
    seqs = sequences(vocab)
    zeros = ask(doors, transport, padded(seqs, width=12, pad=0), LENGTHS, tasks=[LM, GROUP])
    noise = padded(seqs, width=12, pad=vocab - 1)
    noise[0, LENGTHS[0] :] = np.arange(12 - LENGTHS[0]) + 7
    other = ask(doors, transport, noise, LENGTHS, tasks=[LM, GROUP])
    for task in (LM, GROUP):
        np.testing.assert_allclose(
            other.outputs[task].values, zeros.outputs[task].values, atol=1e-5
        )


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_top_k_values_and_tail_mass_sum_to_one(doors: Doors, vocab: int, transport: str) -> None:
    seqs = sequences(vocab, seed=1)
    ids = padded(seqs)
    k = 5
    top = ask(doors, transport, ids, LENGTHS, tasks=[LM, GROUP], top_k=2, temperature=2.0)
    assert top.outputs[LM].values.shape == (sum(LENGTHS), 2)
    assert top.outputs[GROUP].values.shape == (len(LENGTHS), 2)
    top = ask(doors, transport, ids, LENGTHS, tasks=[LM], top_k=k, temperature=2.0)
    dense = ask(doors, transport, ids, LENGTHS, tasks=[LM], temperature=2.0).outputs[LM]
    lm = top.outputs[LM]
    assert lm.indices is not None and lm.tail_mass is not None
    assert lm.values.shape == lm.indices.shape == (sum(LENGTHS), k)
    assert lm.tail_mass.shape == (sum(LENGTHS),)
    total = lm.values.astype(np.float64).sum(axis=1) + lm.tail_mass
    np.testing.assert_allclose(total, 1.0, atol=1e-5)
    assert (np.diff(lm.values, axis=1) <= 0).all()
    rows = np.arange(sum(LENGTHS))[:, None]
    np.testing.assert_allclose(dense.values[rows, lm.indices], lm.values, atol=1e-6)
    if transport == "grpc":  # the narrowest index dtype for a token-level vocabulary
        assert top.raw.outputs[0].indices.dtype == codec.index_dtype(vocab, token_level=True)
        assert top.raw.outputs[0].indices.dtype == pb.UINT16


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_scored_ids_equal_the_dense_log_probabilities(
    doors: Doors, vocab: int, transport: str
) -> None:
    seqs = sequences(vocab, seed=2)
    tokens = sum(LENGTHS)
    scored = np.random.default_rng(3).integers(0, vocab, size=(tokens, 4), dtype=np.int64)
    answer = ask(
        doors,
        transport,
        padded(seqs),
        LENGTHS,
        tasks=[LM, GROUP],
        output="log_probs",
        temperature=3.0,
        scored_ids=scored,
    )
    lm = answer.outputs[LM]
    assert lm.scored_values is not None and lm.scored_values.shape == (tokens, 4)
    np.testing.assert_allclose(
        lm.scored_values, np.take_along_axis(lm.values, scored, axis=1), atol=1e-5
    )
    assert answer.outputs[GROUP].scored_values is None  # sequence-level: no scored values
    # Scored values are log-probabilities whatever the output kind.
    probs = ask(
        doors, transport, padded(seqs), LENGTHS, tasks=[LM], temperature=3.0, scored_ids=scored
    ).outputs[LM]
    assert probs.scored_values is not None
    np.testing.assert_allclose(
        np.exp(probs.scored_values.astype(np.float64)),
        np.take_along_axis(probs.values, scored, axis=1),
        rtol=1e-4,
        atol=1e-7,
    )


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_padded_and_packed_give_the_same_answer(doors: Doors, vocab: int, transport: str) -> None:
    seqs = sequences(vocab, seed=4)
    packed = np.concatenate(seqs)
    a = ask(doors, transport, padded(seqs), LENGTHS, tasks=[LM, GROUP], top_k=3)
    b = ask(doors, transport, packed, LENGTHS, tasks=[LM, GROUP], top_k=3)
    for task in (LM, GROUP):
        np.testing.assert_allclose(a.outputs[task].values, b.outputs[task].values, atol=1e-6)
        assert a.outputs[task].indices is not None and b.outputs[task].indices is not None
        np.testing.assert_array_equal(a.outputs[task].indices, b.outputs[task].indices)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_sequence_and_token_tasks_in_one_request(
    doors: Doors, info: pb.ModelInfo, vocab: int, transport: str
) -> None:
    groups = next(t for t in info.tasks if t.name == GROUP)
    answer = ask(doors, transport, padded(sequences(vocab)), LENGTHS, tasks=[GROUP, LM])
    assert list(answer.outputs) == [GROUP, LM]
    group = answer.outputs[GROUP]
    assert group.level == "sequence"
    assert group.values.shape == (len(LENGTHS), len(groups.class_names))
    np.testing.assert_allclose(group.values.astype(np.float64).sum(axis=1), 1.0, atol=1e-5)
    assert answer.outputs[LM].values.shape == (sum(LENGTHS), vocab)


def test_image_outputs_keep_their_dtypes_and_say_sequence_level(
    stub: pb_grpc.TeacherServiceStub,
) -> None:
    """The image model's answer gains `level` only: indices stay UINT8 (at most 256 classes)."""
    request = pb.SoftTargetsRequest(
        model="mnist-multitask",
        inputs=codec.encode(np.zeros((2, 1, 28, 28), np.float32)),
        top_k=2,
    )
    response = stub.GetSoftTargets(request, timeout=TIMEOUT)
    assert all(o.level == "sequence" and o.indices.dtype == pb.UINT8 for o in response.outputs)
    assert not response.HasField("lengths")
    info = stub.GetModelInfo(pb.GetModelInfoRequest(model="mnist-multitask"), timeout=TIMEOUT)
    assert info.input_kind == "tensor" and not info.HasField("tokenizer")
    assert [t.num_classes for t in info.tasks] == [len(t.class_names) for t in info.tasks]


# --- bad input --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    name: str
    build: Callable[[int, int], tuple[np.ndarray, Any, dict[str, Any]]]  # (vocab, max_length)
    code: str
    field: str
    fragments: tuple[str, ...]


def _ids(vocab: int) -> np.ndarray:
    return padded(sequences(vocab))


BAD = [
    Bad(
        "id outside the vocabulary",
        lambda v, m: (np.where(np.arange(8) == 2, v, 1)[None, :], [8], {}),
        "INVALID_ARGUMENT",
        "inputs",
        ("token id", "outside [0, "),
    ),
    Bad(
        "negative id",
        lambda v, m: (np.array([[1, -1, 2]]), [3], {}),
        "INVALID_ARGUMENT",
        "inputs",
        ("token id -1",),
    ),
    Bad(
        "length above the padded length",
        lambda v, m: (_ids(v), [5, 3, 9], {}),
        "INVALID_ARGUMENT",
        "inputs.shape",
        ("padded ids",),
    ),
    Bad(
        "length above max_length",
        lambda v, m: (np.ones((1, m + 1), np.int64), [m + 1], {}),
        "INVALID_ARGUMENT",
        "lengths",
        ("max_length",),
    ),
    Bad(
        "zero length",
        lambda v, m: (_ids(v), [5, 0, 8], {}),
        "INVALID_ARGUMENT",
        "lengths",
        ("lengths[1]", "0"),
    ),
    Bad(
        "negative length",
        lambda v, m: (_ids(v), [5, -2, 8], {}),
        "INVALID_ARGUMENT",
        "lengths",
        ("lengths[1]", "-2"),
    ),
    Bad(
        "no lengths",
        lambda v, m: (_ids(v), None, {}),
        "INVALID_ARGUMENT",
        "lengths",
        ("lengths",),
    ),
    Bad(
        "packed lengths not summing to the ids",
        lambda v, m: (np.ones(15, np.int64), LENGTHS, {}),
        "INVALID_ARGUMENT",
        "inputs.shape",
        ("packed ids", "[16]", "[15]"),
    ),
    Bad(
        "scored id outside the vocabulary",
        lambda v, m: (_ids(v), LENGTHS, {"scored_ids": np.full((16, 2), v)}),
        "INVALID_ARGUMENT",
        "scored_ids",
        ("scored_ids", "outside [0, "),
    ),
    Bad(
        "scored ids of the wrong shape",
        lambda v, m: (_ids(v), LENGTHS, {"scored_ids": np.ones((17, 2), np.int64)}),
        "INVALID_ARGUMENT",
        "scored_ids",
        ("[16, m]", "[17, 2]"),
    ),
    Bad(
        "scored ids without a token-level task",
        lambda v, m: (_ids(v), LENGTHS, {"scored_ids": np.ones((16, 2)), "tasks": [GROUP]}),
        "INVALID_ARGUMENT",
        "scored_ids",
        ("token-level",),
    ),
    Bad(
        "top_k above the vocabulary",
        lambda v, m: (_ids(v), LENGTHS, {"top_k": v + 1, "tasks": [LM]}),
        "INVALID_ARGUMENT",
        "top_k",
        ("top_k",),
    ),
    Bad(
        "another tokenizer",
        lambda v, m: (_ids(v), LENGTHS, {"tokenizer_hash": "sha256:" + "0" * 64}),
        "FAILED_PRECONDITION",
        "tokenizer_hash",
        ("sha256:" + "0" * 64, "sha256:"),
    ),
]
STATUS = {
    "INVALID_ARGUMENT": (grpc.StatusCode.INVALID_ARGUMENT, 400),
    "FAILED_PRECONDITION": (grpc.StatusCode.FAILED_PRECONDITION, 412),
}


def check(refusal: Refusal, transport: str, code: str, field_name: str, *fragments: str) -> None:
    assert refusal.code == code, refusal
    assert refusal.status == STATUS[code][0 if transport == "grpc" else 1], refusal
    assert refusal.field == field_name, refusal
    assert refusal.message.startswith(field_name.split(".")[0]), refusal
    for fragment in fragments:
        assert fragment in refusal.message, refusal


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("case", BAD, ids=lambda case: case.name)
def test_bad_sequence_input_is_refused(
    doors: Doors, info: pb.ModelInfo, transport: str, case: Bad
) -> None:
    ids, lengths, fields = case.build(int(info.vocab_size), int(info.max_length))
    refusal = refused(doors, transport, np.asarray(ids, dtype=np.int64), lengths, **fields)
    check(refusal, transport, case.code, case.field, *case.fragments)


def test_tokenizer_mismatch_names_both_hashes(doors: Doors, info: pb.ModelInfo, vocab: int) -> None:
    wrong = "sha256:" + "ab" * 32
    for transport in TRANSPORTS:
        refusal = refused(doors, transport, _ids(vocab), LENGTHS, tokenizer_hash=wrong)
        assert wrong in refusal.message and info.tokenizer.sha256 in refusal.message
    good = ask(doors, "grpc", _ids(vocab), LENGTHS, tokenizer_hash=info.tokenizer.sha256)
    assert set(good.outputs) == {LM, GROUP}


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_the_image_model_refuses_sequence_requests(
    stub: pb_grpc.TeacherServiceStub, http: httpx.Client, transport: str
) -> None:
    doors = (stub, http)
    ids = np.ones((2, 5), np.int64)
    refusal = refused(doors, transport, ids, [5, 5], model="mnist-multitask")
    check(refusal, transport, "INVALID_ARGUMENT", "lengths", "fixed-shape")
    images = np.zeros((1, 1, 28, 28), np.float32)
    refusal = refused(doors, transport, images, None, model="mnist-multitask", tasks=[LM])
    check(refusal, transport, "INVALID_ARGUMENT", "tasks", repr(LM))


def test_json_ids_must_be_whole_numbers(doors: Doors) -> None:
    body = {"inputs": [[1, 2.5, 3]], "lengths": [3]}
    reply = doors[1].post(f"/v1/models/{MODEL}/soft-targets", json=body)
    assert reply.status_code == 400
    assert reply.json()["error"]["field"] == "inputs"
    body = {"inputs": [[1, 2, 3]], "lengths": [10**30]}
    reply = doors[1].post(f"/v1/models/{MODEL}/soft-targets", json=body)
    assert reply.status_code == 400
    assert reply.json()["error"]["field"] == "lengths"
    body = {"inputs": [[1, 2, 3]], "lengths": [3], "scored_ids": [[1.5], [2], [3]]}
    reply = doors[1].post(f"/v1/models/{MODEL}/soft-targets", json=body)
    assert reply.status_code == 400
    assert reply.json()["error"]["field"] == "scored_ids"


def test_a_good_client_is_unaffected_by_bad_requests(
    doors: Doors, sequence_teacher: TeacherProcess, info: pb.ModelInfo, vocab: int
) -> None:
    """Bad requests are refused before the batcher, so a good client's answers stay bitwise the
    same while they fly (its own requests go one at a time, so each runs in a forward alone):
    over gRPC and over HTTP (JSON, the answer's bytes), while every bad case flies on both."""
    seqs = sequences(vocab, seed=5)
    good = _grpc_request(padded(seqs), LENGTHS, top_k=3, output="log_probs")
    good_json = _http_body(padded(seqs), LENGTHS, top_k=3, output="log_probs")

    def run() -> list[bytes]:
        response = doors[0].GetSoftTargets(good, timeout=TIMEOUT)
        reply = doors[1].post(f"/v1/models/{MODEL}/soft-targets", json=good_json)
        assert reply.status_code == 200, reply.text
        return [o.SerializeToString() for o in response.outputs] + [reply.content]

    before = run()
    stop = threading.Event()
    wrong: list[str] = []
    sent = [0]

    def bad_client(transport: str) -> None:
        from student_client.teacher_process import loopback_channel, loopback_http_client

        with (
            loopback_channel(sequence_teacher.grpc_address) as channel,
            loopback_http_client(sequence_teacher.http_url, timeout=TIMEOUT) as http,
        ):
            own = (pb_grpc.TeacherServiceStub(channel), http)
            while not stop.is_set() or sent[0] < 2 * len(BAD):
                for case in BAD:
                    ids, lengths, fields = case.build(vocab, int(info.max_length))
                    try:
                        refusal = refused(own, transport, np.asarray(ids), lengths, **fields)
                        if refusal.code != case.code:
                            wrong.append(f"{case.name} over {transport}: {refusal}")
                    except BaseException as error:  # reported below, not lost in the thread
                        wrong.append(f"{case.name} over {transport}: {error!r}")
                    sent[0] += 1
                if sent[0] > 40 * len(BAD):
                    break

    threads = [threading.Thread(target=bad_client, args=(t,)) for t in TRANSPORTS]
    for thread in threads:
        thread.start()
    try:
        during = [run() for _ in range(5)]
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    assert wrong == []
    assert sent[0] >= 2 * len(BAD)
    assert all(answer == before for answer in during)


# --- the Open Inference Protocol (v2) door ----------------------------------------------------


def _v2_dense(answer: dict[str, Any]) -> dict[str, np.ndarray]:
    return {
        output["name"]: np.asarray(output["data"], np.float32).reshape(output["shape"])
        for output in answer["outputs"]
    }


def test_v2_metadata_lists_ids_and_lengths(doors: Doors, info: pb.ModelInfo) -> None:
    meta = doors[1].get(f"/v2/models/{MODEL}").json()
    assert meta["inputs"] == [
        {"name": "inputs", "datatype": "INT64", "shape": [-1, -1]},
        {"name": "lengths", "datatype": "INT64", "shape": [-1]},
    ]
    shapes = {o["name"]: o["shape"] for o in meta["outputs"]}
    assert shapes[LM] == [-1, info.vocab_size]


def test_v2_padded_ids_and_lengths_give_v1_values(
    doors: Doors, sequence_teacher: TeacherProcess, vocab: int
) -> None:
    """JSON, the binary extension and gRPC: the same per-token and per-sequence values as v1."""
    ids = padded(sequences(vocab, seed=6))
    lengths = np.asarray(LENGTHS, np.int64)
    v1 = ask(doors, "grpc", ids, LENGTHS, tasks=[LM, GROUP], temperature=2.0)
    want = {task: v1.outputs[task].values for task in (LM, GROUP)}
    outputs = [{"name": LM}, {"name": GROUP}]
    parameters = {"temperature": 2.0}

    def entry(name: str, array: np.ndarray, **extra: Any) -> dict[str, Any]:
        return {"name": name, "datatype": "INT64", "shape": list(array.shape), **extra}

    body = {
        "inputs": [
            entry("lengths", lengths, data=lengths.tolist()),
            entry("inputs", ids, data=ids.tolist()),
        ],
        "outputs": outputs,
        "parameters": parameters,
    }
    reply = doors[1].post(f"/v2/models/{MODEL}/infer", json=body)
    assert reply.status_code == 200, reply.text
    got_json = _v2_dense(reply.json())

    header = {
        "inputs": [
            entry("inputs", ids, parameters={"binary_data_size": ids.nbytes}),
            entry("lengths", lengths, parameters={"binary_data_size": lengths.nbytes}),
        ],
        "outputs": outputs,
        "parameters": parameters,
    }
    head = json.dumps(header).encode()
    reply = doors[1].post(
        f"/v2/models/{MODEL}/infer",
        content=head + ids.astype("<i8").tobytes() + lengths.astype("<i8").tobytes(),
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
    assert reply.status_code == 200, reply.text
    got_binary = _v2_dense(reply.json())

    request = v2pb.ModelInferRequest(model_name=MODEL)
    request.parameters["temperature"].double_param = 2.0
    for name, array in (("inputs", ids), ("lengths", lengths)):
        request.inputs.add(name=name, datatype="INT64", shape=list(array.shape))
        request.raw_input_contents.append(array.astype("<i8").tobytes())
    request.outputs.add(name=LM)
    request.outputs.add(name=GROUP)
    with loopback_channel(sequence_teacher.grpc_address) as channel:
        response = v2pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=TIMEOUT)
    got_grpc = {
        output.name: np.frombuffer(raw, "<f4").reshape(list(output.shape))
        for output, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }
    for got in (got_json, got_binary, got_grpc):
        assert got[LM].shape == (sum(LENGTHS), vocab)
        assert got[GROUP].shape == want[GROUP].shape
        for task in (LM, GROUP):
            np.testing.assert_allclose(got[task], want[task], atol=1e-5)


def test_v2_sequence_model_without_lengths_is_refused(doors: Doors, vocab: int) -> None:
    ids = padded(sequences(vocab))
    body = {
        "inputs": [
            {
                "name": "inputs",
                "datatype": "INT64",
                "shape": list(ids.shape),
                "data": ids.flatten().tolist(),
            }
        ]
    }
    reply = doors[1].post(f"/v2/models/{MODEL}/infer", json=body)
    assert reply.status_code == 400
    assert reply.json()["error"].startswith("lengths:")
    body["inputs"].append({"name": "lengths", "datatype": "INT64", "shape": [3], "data": [5, 0, 8]})
    reply = doors[1].post(f"/v2/models/{MODEL}/infer", json=body)
    assert reply.status_code == 400
    assert reply.json()["error"].startswith("lengths[1]:")


def test_protobuf_over_http_and_the_stream_carry_the_sequence_fields(
    doors: Doors, info: pb.ModelInfo, vocab: int
) -> None:
    scored = np.ones((sum(LENGTHS), 2), np.int64)
    request = _grpc_request(
        padded(sequences(vocab, seed=7)),
        LENGTHS,
        top_k=3,
        scored_ids=scored,
        tokenizer_hash=info.tokenizer.sha256,
        batch_id="s1",
    )
    unary = doors[0].GetSoftTargets(request, timeout=TIMEOUT)
    reply = doors[1].post(
        f"/v1/models/{MODEL}/soft-targets",
        content=request.SerializeToString(),
        headers={"content-type": "application/x-protobuf"},
    )
    assert reply.status_code == 200, reply.text
    over_http = pb.SoftTargetsResponse.FromString(reply.content)
    (streamed,) = doors[0].StreamSoftTargets(iter([request]), timeout=TIMEOUT)
    for response in (over_http, streamed.soft_targets):
        assert codec.decode(response.lengths).tolist() == LENGTHS
        for got, want in zip(response.outputs, unary.outputs, strict=True):
            assert (got.task, got.level) == (want.task, want.level)
            assert got.indices.dtype == want.indices.dtype
            np.testing.assert_array_equal(codec.decode(got.indices), codec.decode(want.indices))
            np.testing.assert_allclose(
                codec.decode(got.values), codec.decode(want.values), atol=1e-6
            )
            assert got.HasField("scored_values") == (got.level == "token")
