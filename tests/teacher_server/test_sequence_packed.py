"""Packed top-k (`top_k_encoding`) from a real teacher serving the small default sequence teacher,
over gRPC, HTTP protobuf and HTTP JSON: the bytes decoded by a reference decoder written here from
docs/protocol.md (Python integers, no project code) equal the plain Tensors' answer, round trip
against the dense log-probabilities, the 8-bit codes stay within their stated error, and the
encodings a model cannot give are refused naming the field. Also: a length-skewed mix of
requests sent together over both transports (merged by the batcher) answers what each request
gets alone."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from protocol import codec
from protocol.v1 import teacher_pb2 as pb
from protocol.v1 import teacher_pb2_grpc as pb_grpc
from student_client.teacher_process import TeacherProcess
from teacher_server.repository.default_sequence_teacher import DEFAULT_SEQUENCE_MODEL_NAME

MODEL = DEFAULT_SEQUENCE_MODEL_NAME
LM, GROUP = "next_token", "topic_group"
TIMEOUT = 30.0
LENGTHS = [7, 2, 11]
TRANSPORTS = ["grpc", "http-protobuf", "http-json"]
KINDS = {"probs": pb.PROBS, "log_probs": pb.LOG_PROBS, "logits": pb.LOGITS}
DTYPES = {"float32": pb.FLOAT32, "float16": pb.FLOAT16, "bfloat16": pb.BFLOAT16}
ENCODINGS = {"tensors": 0, "packed": pb.PACKED, "log_prob_codes": pb.PACKED_LOG_PROB_CODES}
STEP = 1.0 / 16.0  # the codes' step the server states in PackedTopK.log_prob_step

Doors = tuple[pb_grpc.TeacherServiceStub, httpx.Client]


@pytest.fixture(scope="module")
def doors(
    teacher_factory: Callable[..., TeacherProcess],
    sequence_repository: Path,
    connect: Callable[[TeacherProcess], Doors],
) -> Doors:
    # a long queue delay, so requests sent together are merged into one batch
    return connect(teacher_factory(sequence_repository, "--max-queue-delay-ms", "300"))


@pytest.fixture(scope="module")
def info(doors: Doors) -> pb.ModelInfo:
    return doors[0].GetModelInfo(pb.GetModelInfoRequest(model=MODEL), timeout=TIMEOUT)


def batch(vocab: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(len(LENGTHS), max(LENGTHS)), dtype=np.int64)
    return ids, np.asarray(LENGTHS, dtype=np.int64)


# --- a reference decoder, from docs/protocol.md ("Packed top-k") only ---------------------------


def ref_uints(bits: int, shape: list[int], data: bytes) -> np.ndarray:
    """Element i = bits [i * bits, (i + 1) * bits) of `data` read as one little-endian integer."""
    count = int(np.prod(shape))
    assert len(data) == (count * bits + 7) // 8
    whole = int.from_bytes(data, "little")
    assert whole >> (count * bits) == 0  # the unused high bits are zero
    mask = (1 << bits) - 1
    return np.array([(whole >> (i * bits)) & mask for i in range(count)], np.int64).reshape(shape)


def ref_floats(field: dict[str, Any], dtype: str, kind: str) -> np.ndarray:
    """IEEE bit patterns, the sign bit put back (set for log_probs) when it was dropped."""
    patterns = ref_uints(field["bits"], field["shape"], field["data"])
    width = 32 if dtype == "float32" else 16
    if field["bits"] == width - 1 and kind == "log_probs":
        patterns |= 1 << (width - 1)
    if dtype == "float16":
        return patterns.astype(np.uint16).view(np.float16).astype(np.float64)
    if dtype == "bfloat16":
        return (patterns.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return patterns.astype(np.uint32).view(np.float32).astype(np.float64)


def ref_decode(packed: dict[str, Any], kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values, indices, tail mass) of a packed answer, as float64 / int64 / float64."""
    indices = ref_uints(**packed["indices"])
    if packed["values_dtype"] == "uint8":
        log_probs = -ref_uints(**packed["values"]).astype(np.float64) * packed["log_prob_step"]
        values = np.exp(log_probs) if kind == "probs" else log_probs
    else:
        values = ref_floats(packed["values"], packed["values_dtype"], kind)
    tail = (
        ref_floats(packed["tail_mass"], packed["tail_dtype"], "probs")
        if "tail_mass" in packed
        else None
    )
    return values, indices, tail  # type: ignore[return-value]


def _ints(message: pb.PackedInts) -> dict[str, Any]:
    return {"bits": message.bits, "shape": list(message.shape), "data": message.data}


def _packed_from_pb(message: pb.PackedTopK) -> dict[str, Any]:
    packed = {
        "indices": _ints(message.indices),
        "values": _ints(message.values),
        "values_dtype": codec.dtype_name(message.values_dtype),
        "log_prob_step": message.log_prob_step,
    }
    if message.HasField("tail_mass"):
        packed["tail_mass"] = _ints(message.tail_mass)
        packed["tail_dtype"] = codec.dtype_name(message.tail_dtype)
    return packed


def _packed_from_json(entry: dict[str, Any]) -> dict[str, Any]:
    packed = dict(entry)
    for key in ("indices", "values", "tail_mass"):
        if key in packed:
            packed[key] = {**packed[key], "data": base64.b64decode(packed[key]["data"])}
    return packed


# --- asking over each door ----------------------------------------------------------------------


def ask(
    doors: Doors, transport: str, ids: np.ndarray, lengths: np.ndarray, **fields: Any
) -> dict[str, dict[str, Any]]:
    """Per task: `values`, `indices`, `tail_mass` (numpy, from Tensors) or `packed` (as
    `ref_decode` reads it), and the raw `kind`."""
    kind = fields.get("output", "probs")
    encoding = fields.pop("top_k_encoding", "tensors")
    if transport == "http-json":
        body = {"inputs": ids.tolist(), "lengths": lengths.tolist(), **fields}
        if encoding != "tensors":
            body["top_k_encoding"] = encoding
        reply = doors[1].post(f"/v1/models/{MODEL}/soft-targets", json=body)
        assert reply.status_code == 200, reply.text
        answer = {}
        for task, entry in reply.json()["outputs"].items():
            out: dict[str, Any] = {"kind": entry["kind"], "level": entry["level"]}
            if "packed" in entry:
                out["packed"] = _packed_from_json(entry["packed"])
            else:
                out["values"] = np.asarray(entry["values"], np.float64)
                for key in ("indices", "tail_mass"):
                    if key in entry:
                        out[key] = np.asarray(entry[key])
            answer[task] = out
        return answer
    message = pb.SoftTargetsRequest(
        model=MODEL,
        inputs=codec.encode(ids),
        lengths=codec.encode(lengths),
        tasks=fields.get("tasks", []),
        output=KINDS[kind],
        top_k=fields.get("top_k", 0),
        temperature=fields.get("temperature", 1.0),
        output_dtype=DTYPES[fields.get("output_dtype", "float32")],
        top_k_encoding=ENCODINGS[encoding],  # type: ignore[arg-type]
    )
    if transport == "grpc":
        response = doors[0].GetSoftTargets(message, timeout=TIMEOUT)
    else:
        reply = doors[1].post(
            f"/v1/models/{MODEL}/soft-targets",
            content=message.SerializeToString(),
            headers={"content-type": "application/x-protobuf"},
        )
        assert reply.status_code == 200, reply.text
        response = pb.SoftTargetsResponse.FromString(reply.content)
    answer = {}
    for output in response.outputs:
        out = {"kind": kind, "level": output.level}
        if output.HasField("packed"):
            assert not output.HasField("values") and not output.HasField("indices")
            out["packed"] = _packed_from_pb(output.packed)
        else:
            out["values"] = codec.decode(output.values).astype(np.float64)
            if output.HasField("indices"):
                out["indices"] = codec.decode(output.indices)
            if output.HasField("tail_mass"):
                out["tail_mass"] = codec.decode(output.tail_mass)
        answer[output.task] = out
    return answer


# --- the tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(
    ("kind", "dtype"),
    [
        ("log_probs", "float16"),
        ("probs", "float32"),
        ("log_probs", "bfloat16"),
        ("logits", "float16"),
    ],
)
def test_packed_decodes_to_the_tensors_answer(
    doors: Doors, info: pb.ModelInfo, transport: str, kind: str, dtype: str
) -> None:
    ids, lengths = batch(int(info.vocab_size))
    fields = {"top_k": 3, "output": kind, "output_dtype": dtype, "tasks": [LM, GROUP]}
    plain = ask(doors, transport, ids, lengths, **fields)
    compact = ask(doors, transport, ids, lengths, top_k_encoding="packed", **fields)
    assert set(compact) == {LM, GROUP}
    for task in (LM, GROUP):
        packed = compact[task]["packed"]
        classes = int(info.vocab_size) if task == LM else 3
        assert packed["indices"]["bits"] == max(1, (classes - 1).bit_length())
        values, indices, tail = ref_decode(packed, kind)
        np.testing.assert_array_equal(indices, plain[task]["indices"])
        np.testing.assert_array_equal(values, plain[task]["values"])  # lossless in the dtype
        if kind == "logits":
            assert tail is None and "tail_mass" not in plain[task]
            continue
        # the tail mass travels in the values' dtype: its rounding of the float32 tail
        relative = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 0.0}[dtype]
        np.testing.assert_allclose(tail, plain[task]["tail_mass"], rtol=relative, atol=2.0**-24)
    rows = sum(LENGTHS)
    assert compact[LM]["packed"]["values"]["shape"] == [rows, 3]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_packed_round_trips_against_the_dense_log_probabilities(
    doors: Doors, info: pb.ModelInfo, transport: str
) -> None:
    ids, lengths = batch(int(info.vocab_size), seed=4)
    dense = ask(doors, transport, ids, lengths, output="log_probs", tasks=[LM])[LM]["values"]
    k = 32
    for encoding in ("packed", "log_prob_codes"):
        answer = ask(
            doors, transport, ids, lengths, output="log_probs", top_k=k, output_dtype="float32",
            tasks=[LM], top_k_encoding=encoding,
        )  # fmt: skip
        values, indices, tail = ref_decode(answer[LM]["packed"], "log_probs")
        at_ids = np.take_along_axis(dense, indices, axis=1)
        # the k ids are the dense distribution's k largest
        kth = np.sort(dense, axis=1)[:, -k]
        assert (at_ids >= kth[:, None] - 1e-6).all()
        exact_tail = 1.0 - np.exp(at_ids).sum(axis=1)
        np.testing.assert_allclose(tail, exact_tail, atol=1e-5)
        np.testing.assert_allclose(np.exp(values).sum(axis=1) + tail, 1.0, atol=0.05)
        if encoding == "packed":
            np.testing.assert_allclose(values, at_ids, rtol=0, atol=1e-5)
            np.testing.assert_allclose(np.exp(values).sum(axis=1) + tail, 1.0, atol=1e-5)
        else:
            assert answer[LM]["packed"]["log_prob_step"] == STEP
            inside = at_ids >= -255.5 * STEP
            error = np.abs(values - at_ids)[inside]
            assert error.max() <= STEP / 2 + 1e-5, error.max()
            assert (values[~inside] == -255 * STEP).all()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_probs_codes_decode_to_probabilities(
    doors: Doors, info: pb.ModelInfo, transport: str
) -> None:
    ids, lengths = batch(int(info.vocab_size), seed=9)
    fields = {"top_k": 4, "output": "probs", "tasks": [LM], "output_dtype": "float32"}
    plain = ask(doors, transport, ids, lengths, **fields)[LM]
    coded = ask(doors, transport, ids, lengths, top_k_encoding="log_prob_codes", **fields)[LM]
    values, indices, _ = ref_decode(coded["packed"], "probs")
    np.testing.assert_array_equal(indices, plain["indices"])
    ratio = np.log(values) - np.log(plain["values"])
    assert np.abs(ratio).max() <= STEP / 2 + 1e-5


def test_dense_outputs_ignore_the_encoding(doors: Doors, info: pb.ModelInfo) -> None:
    ids, lengths = batch(int(info.vocab_size))
    answer = ask(doors, "grpc", ids, lengths, tasks=[LM], top_k_encoding="packed")
    assert "packed" not in answer[LM] and answer[LM]["values"].shape == (
        sum(LENGTHS),
        info.vocab_size,
    )


def _refusal_grpc(doors: Doors, message: pb.SoftTargetsRequest) -> tuple[Any, str]:
    import grpc

    from protocol.errors import GRPC_FIELD_KEY

    with pytest.raises(grpc.RpcError) as caught:
        doors[0].GetSoftTargets(message, timeout=TIMEOUT)
    error: Any = caught.value
    return error.code(), dict(error.trailing_metadata() or ()).get(GRPC_FIELD_KEY, "")


def test_encodings_a_request_cannot_have_are_refused(
    doors: Doors, info: pb.ModelInfo, stub: pb_grpc.TeacherServiceStub, http: httpx.Client
) -> None:
    import grpc

    ids, lengths = batch(int(info.vocab_size))
    base = {"model": MODEL, "inputs": codec.encode(ids), "lengths": codec.encode(lengths)}
    # codes of logits
    message = pb.SoftTargetsRequest(
        **base, output=pb.LOGITS, top_k=3, top_k_encoding=pb.PACKED_LOG_PROB_CODES
    )
    assert _refusal_grpc(doors, message) == (grpc.StatusCode.INVALID_ARGUMENT, "top_k_encoding")
    body = {"inputs": ids.tolist(), "lengths": lengths.tolist(), "output": "logits", "top_k": 3,
            "top_k_encoding": "log_prob_codes"}  # fmt: skip
    reply = doors[1].post(f"/v1/models/{MODEL}/soft-targets", json=body)
    assert reply.status_code == 400 and reply.json()["error"]["field"] == "top_k_encoding"
    assert "logits" in reply.json()["error"]["message"]
    # an encoding the protocol does not have
    message = pb.SoftTargetsRequest(**base, top_k=3, top_k_encoding=7)  # type: ignore[arg-type]
    assert _refusal_grpc(doors, message) == (grpc.StatusCode.INVALID_ARGUMENT, "top_k_encoding")
    reply = doors[1].post(
        f"/v1/models/{MODEL}/soft-targets",
        json={**body, "output": "probs", "top_k_encoding": "zip"},
    )
    assert reply.status_code == 400 and reply.json()["error"]["field"] == "top_k_encoding"
    assert "'zip'" in reply.json()["error"]["message"]
    # codes from an image model (made by the sequence engine only); packed is fine there
    images = codec.encode(np.zeros((2, 1, 28, 28), np.float32))
    message = pb.SoftTargetsRequest(
        model="mnist-multitask", inputs=images, top_k=2, top_k_encoding=pb.PACKED_LOG_PROB_CODES
    )
    assert _refusal_grpc((stub, http), message) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "top_k_encoding",
    )
    message.top_k_encoding = pb.PACKED
    response = stub.GetSoftTargets(message, timeout=TIMEOUT)
    for output in response.outputs:
        values, indices, tail = ref_decode(_packed_from_pb(output.packed), "probs")
        classes = {"digit": 10, "parity": 2}.get(output.task)
        if classes is not None:
            assert output.packed.indices.bits == (classes - 1).bit_length()
        assert values.shape == (2, 2) and int(indices.max()) < 10
        np.testing.assert_allclose(values.sum(axis=1) + tail, 1.0, atol=1e-5)


def _metric(http: httpx.Client, name: str) -> float:
    total = 0.0
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + "{") and f'model="{MODEL}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_length_skewed_mix_merged_equals_each_request_alone(
    doors: Doors, info: pb.ModelInfo
) -> None:
    """Eight requests of lengths 1 to 32, with different temperatures, k, kinds, dtypes, tasks and
    encodings, sent at once over gRPC and HTTP protobuf (the teacher waits 300 ms to merge), give
    what each gives alone, up to float rounding."""
    import threading

    vocab = int(info.vocab_size)
    rng = np.random.default_rng(17)
    mix: list[tuple[str, np.ndarray, np.ndarray, dict[str, Any]]] = []
    shapes = [[32, 1, 1], [2], [17, 5, 30, 3], [1], [8, 8], [25, 2, 2, 2, 2], [31], [4, 12]]
    for number, lengths in enumerate(shapes):
        ids = rng.integers(1, vocab, size=(len(lengths), max(lengths)), dtype=np.int64)
        fields: dict[str, Any] = {
            "temperature": [0.5, 1.0, 2.0, 4.0][number % 4],
            "output": ["log_probs", "probs", "logits", "log_probs"][number % 4],
            "output_dtype": ["float32", "float16", "float32", "bfloat16"][number % 4],
            "top_k": [3, 0, 2, 3][number % 4] if number % 3 else 7,
            "tasks": [LM, GROUP] if number % 3 else [LM],
            "top_k_encoding": ["tensors", "packed"][number % 2],
        }
        transport = TRANSPORTS[number % 2]  # grpc, http-protobuf
        mix.append((transport, ids, np.asarray(lengths, np.int64), fields))

    def one(item: tuple[str, np.ndarray, np.ndarray, dict[str, Any]]) -> dict[str, Any]:
        transport, ids, lengths, fields = item
        return ask(doors, transport, ids, lengths, **fields)

    alone = [one(item) for item in mix]
    forwards_before = _metric(doors[1], "teacher_batch_requests_count")
    together: list[dict[str, Any] | None] = [None] * len(mix)
    start = threading.Barrier(len(mix))

    def send(index: int) -> None:
        start.wait()
        together[index] = one(mix[index])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(mix))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    forwards = _metric(doors[1], "teacher_batch_requests_count") - forwards_before
    assert forwards < len(mix), f"{forwards} batches for {len(mix)} requests: nothing merged"
    for (_, _, _, fields), single, merged in zip(mix, alone, together, strict=True):
        assert merged is not None
        assert set(single) == set(merged)
        for task in single:
            a, b = single[task], merged[task]
            if "packed" in a:
                kind = fields["output"]
                names = ("values", "indices", "tail_mass")
                a = dict(zip(names, ref_decode(a["packed"], kind), strict=True))
                b = dict(zip(names, ref_decode(b["packed"], kind), strict=True))
            # float16 / bfloat16 values may round a last bit differently after a merged matmul
            tolerance = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}[
                fields["output_dtype"]
            ]
            np.testing.assert_allclose(b["values"], a["values"], rtol=tolerance, atol=tolerance)
            if a.get("indices") is not None:
                assert (np.asarray(a["indices"]) == np.asarray(b["indices"])).mean() > 0.99
            if a.get("tail_mass") is not None:
                np.testing.assert_allclose(
                    b["tail_mass"], a["tail_mass"], rtol=tolerance, atol=1e-5
                )
