"""Packed top-k (`protocol.packed`) against a reference decoder written here from the bit order of
docs/protocol.md alone (numpy's `unpackbits`, little bit order), hypothesis round trips, the sign
bit dropped and restored, the 8-bit codes' stated maximum error, and malformed messages refused."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import packed
from protocol.errors import InvalidArgument
from protocol.v1 import teacher_pb2 as pb


def reference_unpack(data: bytes, bits: int, count: int) -> np.ndarray:
    """docs/protocol.md: bit j of the stream is bit (j mod 8) of byte j // 8, least significant
    first; element i is bits [i * bits, (i + 1) * bits), its least significant bit first."""
    stream = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    assert len(data) == (count * bits + 7) // 8
    assert not stream[count * bits :].any()  # the unused high bits of the last byte are zero
    fields = stream[: count * bits].reshape(count, bits).astype(np.uint64)
    return (fields << np.arange(bits, dtype=np.uint64)).sum(axis=1)


def reference_floats(data: bytes, bits: int, count: int, kind: str, dtype: str) -> np.ndarray:
    """Float values of a packed field: the bit patterns, with the known sign put back."""
    patterns = reference_unpack(data, bits, count)
    width = 16 if dtype in ("float16", "bfloat16") else 32
    if bits == width - 1 and kind == "log_probs":
        patterns |= np.uint64(1 << (width - 1))
    if dtype == "float16":
        return patterns.astype(np.uint16).view(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        return (patterns.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return patterns.astype(np.uint32).view(np.float32)


@settings(max_examples=200, deadline=None)
@given(
    bits=st.integers(1, 32),
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    seed=st.integers(0, 2**32 - 1),
)
def test_pack_matches_the_reference_bit_order(bits: int, shape: list[int], seed: int) -> None:
    values = np.random.default_rng(seed).integers(0, 1 << bits, size=shape, dtype=np.uint64)
    message = packed.pack_uints(values, bits)
    assert message.bits == bits and list(message.shape) == shape
    count = int(np.prod(shape))
    np.testing.assert_array_equal(reference_unpack(message.data, bits, count), values.ravel())
    np.testing.assert_array_equal(packed.unpack_uints(message, "x"), values)
    # the same bits as one little-endian integer (the definition in the proto comment)
    whole = int.from_bytes(message.data, "little")
    assert [(whole >> (i * bits)) & ((1 << bits) - 1) for i in range(count)] == [
        int(v) for v in values.ravel()
    ]


def test_a_worked_example_of_the_bit_order() -> None:
    # 12-bit ids 0xABC, 0x123: stream bits LSB first -> bytes 0xBC, 0x3A, 0x12 (docs/protocol.md)
    message = packed.pack_uints(np.array([0xABC, 0x123]), 12)
    assert message.data == bytes([0xBC, 0x3A, 0x12])


@pytest.mark.parametrize("dtype", [pb.FLOAT16, pb.BFLOAT16, pb.FLOAT32])
@pytest.mark.parametrize("kind", ["probs", "log_probs", "logits"])
def test_top_k_round_trips_exactly_in_the_output_dtype(dtype: pb.DataType, kind: str) -> None:
    rng = np.random.default_rng(int(dtype) * 7 + len(kind))
    rows, k, classes = 50, 8, 4096
    log_probs = np.log(rng.dirichlet(np.full(classes, 0.1), size=rows))
    order = np.argsort(-log_probs, axis=1)[:, :k]
    top = np.take_along_axis(log_probs, order, axis=1)
    values = {"probs": np.exp(top), "log_probs": top, "logits": top * 3 + 1}[kind]
    tail = None if kind == "logits" else 1.0 - np.exp(top).sum(axis=1)
    name = {pb.FLOAT16: "float16", pb.BFLOAT16: "bfloat16", pb.FLOAT32: "float32"}[dtype]
    if dtype == pb.FLOAT16:
        rounded = values.astype(np.float16)
    elif dtype == pb.BFLOAT16:
        # bfloat16 as the engine hands it over: float32 holding bfloat16-rounded values
        rounded = (
            (values.astype(np.float32).view(np.uint32) + np.uint32(0x8000)) & np.uint32(0xFFFF0000)
        ).view(np.float32)
    else:
        rounded = values.astype(np.float32)
    message = packed.encode_top_k(rounded, order, tail, kind, classes, dtype)
    assert message.indices.bits == 12
    width = 32 if dtype == pb.FLOAT32 else 16
    assert message.values.bits == (width if kind == "logits" else width - 1)
    decoded, indices, decoded_tail = packed.decode_top_k(message, kind, "out")
    np.testing.assert_array_equal(indices, order)
    np.testing.assert_array_equal(decoded, rounded)
    reference = reference_floats(message.values.data, message.values.bits, rows * k, kind, name)
    np.testing.assert_array_equal(reference.reshape(rows, k), np.asarray(rounded, np.float32))
    np.testing.assert_array_equal(
        reference_unpack(message.indices.data, 12, rows * k).reshape(rows, k), order
    )
    if tail is None:
        assert decoded_tail is None and not message.HasField("tail_mass")
    else:
        assert decoded_tail is not None
        # the tail is rounded to the output dtype: within half a unit in its last place
        relative = {pb.FLOAT16: 2.0**-11, pb.BFLOAT16: 2.0**-8, pb.FLOAT32: 2.0**-24}[dtype]
        np.testing.assert_allclose(decoded_tail, tail, rtol=relative, atol=2.0**-25)


def test_a_value_of_the_wrong_sign_is_not_packed() -> None:
    with pytest.raises(ValueError, match="sign"):
        packed.encode_top_k(
            np.array([[0.5, -0.1]], np.float16),
            np.array([[0, 1]]),
            None,
            "log_probs",
            4,
            pb.FLOAT16,
        )
    # zeros of either sign are fine: they decode to zero
    message = packed.encode_top_k(
        np.array([[0.0, -0.5]], np.float16), np.array([[0, 1]]), np.zeros(1), "log_probs", 4,
        pb.FLOAT16,
    )  # fmt: skip
    values, _, _ = packed.decode_top_k(message, "log_probs", "out")
    assert values[0, 0] == 0.0 and values[0, 1] == -0.5


def test_log_prob_codes_are_within_half_a_step() -> None:
    rng = np.random.default_rng(3)
    log_probs = -rng.uniform(0, 255.5 * packed.LOG_PROB_STEP, size=(200, 16))
    codes = packed.log_prob_codes(log_probs)
    message = packed.encode_top_k(
        codes, np.zeros((200, 16), np.int64), rng.random(200), "log_probs", 50_000, pb.FLOAT32,
        codes=True,
    )  # fmt: skip
    assert message.values.bits == 8 and message.values_dtype == pb.UINT8
    assert message.indices.bits == 16  # ceil(log2(50,000))
    values, _, _ = packed.decode_top_k(message, "log_probs", "out")
    assert np.abs(values - log_probs).max() <= packed.LOG_PROB_STEP / 2 + 1e-12
    # below the last code, the value saturates at -255 * step
    assert packed.log_prob_codes(np.array([-100.0, -np.inf]))[0] == packed.MAX_CODE
    assert packed.log_prob_codes(np.array([-np.inf]))[0] == packed.MAX_CODE


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda m: setattr(m, "bits", 0), "x.bits"),
        (lambda m: setattr(m, "bits", 33), "x.bits"),
        (lambda m: setattr(m, "data", m.data[:-1]), "x.data"),
        (lambda m: setattr(m, "data", m.data + b"\0"), "x.data"),
        (lambda m: setattr(m, "data", m.data[:-1] + b"\xff"), "x.data"),  # unused bits set
        (lambda m: m.shape.append(0), "x.shape"),
    ],
)
def test_malformed_packed_ints_are_refused(mutate, field: str) -> None:  # type: ignore[no-untyped-def]
    message = packed.pack_uints(np.arange(5), 3)  # 15 bits: 2 bytes, 1 unused bit
    mutate(message)
    with pytest.raises(InvalidArgument) as error:
        packed.unpack_uints(message, "x")
    assert error.value.field == field


def test_index_bits() -> None:
    assert [packed.index_bits(n) for n in (1, 2, 3, 256, 257, 4096, 50_257, 1 << 16, 152_064)] == [
        1, 1, 2, 8, 9, 12, 16, 16, 18,
    ]  # fmt: skip
