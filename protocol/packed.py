"""Packed top-k on the wire: `distill.v1.PackedInts` and `PackedTopK` <-> numpy arrays.

A top-k answer asked with `top_k_encoding` PACKED (or PACKED_LOG_PROB_CODES) carries its ids at
ceil(log2(classes)) bits, its values as the IEEE bit patterns of the output dtype without the sign
bit when the sign is known (probabilities are >= 0, log-probabilities <= 0), and its tail mass the
same way; with PACKED_LOG_PROB_CODES the values are 8-bit codes, log p = -code * step. The bit
order is the one of docs/protocol.md ("Packed top-k"): element i occupies bits [i * bits,
(i + 1) * bits) of the bytes read as one little-endian integer.

Decoding validates before it allocates, as `protocol.codec.decode` does: bits in [1, 32], every
dimension >= 1, the element count within `max_elements`, the byte length exact and the unused
high bits of the last byte zero.
"""

from __future__ import annotations

import math
from typing import Final

import numpy as np

from protocol import codec
from protocol.errors import InvalidArgument
from protocol.v1 import teacher_pb2 as pb

LOG_PROB_STEP: Final = 1.0 / 16.0  # nats per code step of PACKED_LOG_PROB_CODES
MAX_CODE: Final = 255

# The float dtypes values and tail mass may have: their width in bits and numpy view.
_FLOAT_WIDTH: Final[dict[pb.DataType, int]] = {pb.FLOAT16: 16, pb.BFLOAT16: 16, pb.FLOAT32: 32}
_SIGN_BIT: Final[dict[int, int]] = {16: 1 << 15, 32: 1 << 31}
# Output kind -> the sign bit every value carries (None: any sign, sent whole).
_KNOWN_SIGN: Final[dict[str, int | None]] = {"probs": 0, "log_probs": 1, "logits": None}


def index_bits(classes: int) -> int:
    """Bits per packed class id for a task of `classes` classes: ceil(log2(classes)), at least 1."""
    return max(1, (int(classes) - 1).bit_length())


def pack_uints(values: np.ndarray, bits: int) -> pb.PackedInts:
    """Pack non-negative integers below 2**bits (any integer dtype, any shape) `bits` bits each,
    least significant bit first (see the module docstring)."""
    if not 1 <= bits <= 32:
        raise ValueError(f"bits must be in [1, 32], got {bits}")
    array = np.asarray(values)
    flat = array.reshape(-1).astype(np.uint32, copy=False)
    if flat.size and int(flat.max()) >> bits:
        raise ValueError(f"a value of {int(flat.max())} does not fit in {bits} bits")
    if bits in (8, 16, 32):  # byte-aligned: the little-endian bytes are the stream itself
        data = flat.astype(f"<u{bits // 8}", copy=False).tobytes()
    else:
        data = _pack_groups(flat, bits)
    return pb.PackedInts(bits=bits, shape=list(array.shape), data=data)


def unpack_uints(
    message: pb.PackedInts, field: str, max_elements: int = codec.DEFAULT_MAX_ELEMENTS
) -> np.ndarray:
    """The integers of `message` as uint32 of its shape; `InvalidArgument` naming `field.bits`,
    `field.shape` or `field.data` if it is malformed."""
    bits = int(message.bits)
    if not 1 <= bits <= 32:
        raise InvalidArgument(f"{field}.bits: must be in [1, 32], got {bits}", f"{field}.bits")
    shape = tuple(int(d) for d in message.shape)
    count = codec.element_count(shape, field, max_elements)
    expected = (count * bits + 7) // 8
    data = message.data
    if len(data) != expected:
        raise InvalidArgument(
            f"{field}.data: {count} values of {bits} bits need {expected} bytes, got {len(data)}",
            f"{field}.data",
        )
    raw = np.frombuffer(data, dtype=np.uint8)
    if bits in (8, 16, 32):
        return np.frombuffer(data, dtype=f"<u{bits // 8}").astype(np.uint32).reshape(shape)
    used = count * bits % 8
    if used and int(raw[-1]) >> used:
        raise InvalidArgument(
            f"{field}.data: the unused high bits of the last byte must be zero", f"{field}.data"
        )
    return _unpack_groups(raw, bits, count).reshape(shape)


def _group(bits: int) -> tuple[int, int, int]:
    """(elements, bytes, 64-bit lanes) of the smallest whole-byte group of `bits`-bit elements."""
    elements = 8 // math.gcd(bits, 8)
    size = elements * bits // 8
    return elements, size, (size + 7) // 8


def _pack_groups(flat: np.ndarray, bits: int) -> bytes:
    """The stream of `flat` (uint32) at `bits` bits, built a whole-byte group of elements at a
    time: element j of a group lands at bit j * bits of the group's little-endian lanes."""
    elements, size, lanes = _group(bits)
    count = flat.size
    groups = -(-count // elements)
    padded = np.zeros(groups * elements, dtype=np.uint64)
    padded[:count] = flat
    columns = padded.reshape(groups, elements)
    words = np.zeros((groups, lanes), dtype=np.uint64)
    for j in range(elements):
        lane, shift = divmod(j * bits, 64)
        words[:, lane] |= columns[:, j] << np.uint64(shift)
        if shift + bits > 64:
            words[:, lane + 1] |= columns[:, j] >> np.uint64(64 - shift)
    stream = words.astype("<u8", copy=False).view(np.uint8)[:, :size].reshape(-1)
    return stream[: (count * bits + 7) // 8].tobytes()


def _unpack_groups(raw: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The inverse of `_pack_groups`: `count` uint32 values from the stream `raw` (uint8)."""
    elements, size, lanes = _group(bits)
    groups = -(-count // elements)
    stream = np.zeros(groups * size, dtype=np.uint8)
    stream[: raw.size] = raw
    padded = np.zeros((groups, lanes * 8), dtype=np.uint8)
    padded[:, :size] = stream.reshape(groups, size)
    words = padded.view("<u8")
    mask = np.uint64((1 << bits) - 1)
    out = np.empty((groups, elements), dtype=np.uint64)
    for j in range(elements):
        lane, shift = divmod(j * bits, 64)
        value = words[:, lane] >> np.uint64(shift)
        if shift + bits > 64:
            value |= words[:, lane + 1] << np.uint64(64 - shift)
        out[:, j] = value & mask
    return out.reshape(-1)[:count].astype(np.uint32)


def _float_bits(array: np.ndarray, dtype: pb.DataType) -> np.ndarray:
    """The IEEE bit patterns (uint32) of `array` rounded to `dtype` (FLOAT16/BFLOAT16/FLOAT32)."""
    if dtype == pb.FLOAT16:
        return array.astype("<f2").view("<u2").astype(np.uint32)
    if dtype == pb.BFLOAT16:
        return codec.float32_to_bfloat16_bits(array.astype(np.float32)).astype(np.uint32)
    return array.astype("<f4").view("<u4").astype(np.uint32)


def _floats(bits: np.ndarray, dtype: pb.DataType) -> np.ndarray:
    """Bit patterns (uint32) -> float16 (FLOAT16) or float32 (BFLOAT16, FLOAT32) values."""
    if dtype == pb.FLOAT16:
        return bits.astype("<u2").view("<f2")
    if dtype == pb.BFLOAT16:
        return codec.bfloat16_bits_to_float32(bits.astype(np.uint16))
    return bits.astype("<u4").view("<f4")


def _pack_floats(array: np.ndarray, dtype: pb.DataType, sign: int | None) -> pb.PackedInts:
    """Floats as `dtype` bit patterns; with a known `sign` (0: +, 1: -) without the sign bit.
    Zeros may carry either sign (they decode to a zero of the known sign)."""
    width = _FLOAT_WIDTH[dtype]
    patterns = _float_bits(np.asarray(array), dtype)
    if sign is None:
        return pack_uints(patterns, width)
    sign_bit = np.uint32(_SIGN_BIT[width])
    magnitude = patterns & np.uint32(sign_bit - 1)
    wrong = ((patterns & sign_bit) != 0) != bool(sign)
    if np.any(wrong & (magnitude != 0)):
        raise ValueError(
            f"a value has sign {'+-'[1 - sign]}; packing needs every value's sign known"
        )
    return pack_uints(magnitude, width - 1)


def _unpack_floats(
    message: pb.PackedInts, dtype: pb.DataType, sign: int | None, field: str, max_elements: int
) -> np.ndarray:
    width = _FLOAT_WIDTH[dtype]
    expected = width if sign is None else width - 1
    if message.bits != expected:
        raise InvalidArgument(
            f"{field}.bits: {codec.dtype_name(dtype)} values need {expected} bits, got "
            f"{message.bits}",
            f"{field}.bits",
        )
    patterns = unpack_uints(message, field, max_elements)
    if sign:
        patterns = patterns | np.uint32(_SIGN_BIT[width])
    return _floats(patterns, dtype)


def log_prob_codes(log_probs: np.ndarray, step: float = LOG_PROB_STEP) -> np.ndarray:
    """uint8 codes round(-log p / step), saturating at 255 (log p below -255.5 * step)."""
    scaled = np.rint(-np.asarray(log_probs, dtype=np.float64) / step)
    return np.clip(np.nan_to_num(scaled, posinf=MAX_CODE), 0, MAX_CODE).astype(np.uint8)


def encode_top_k(
    values: np.ndarray,
    indices: np.ndarray,
    tail_mass: np.ndarray | None,
    kind: str,
    classes: int,
    output_dtype: pb.DataType,
    codes: bool = False,
) -> pb.PackedTopK:
    """One task's top-k answer packed. `values` (rows, k): floats of the request's output dtype
    (float32 arrays may hold bfloat16-rounded values), or with `codes` uint8 log-probability codes
    (`log_prob_codes`); `indices` (rows, k) in [0, classes); `tail_mass` (rows,) or None for
    logits."""
    message = pb.PackedTopK(indices=pack_uints(indices, index_bits(classes)))
    if codes:
        if kind == "logits":
            raise ValueError("log-probability codes need probs or log_probs")
        message.values.CopyFrom(pack_uints(np.asarray(values, dtype=np.uint8), 8))
        message.values_dtype = pb.UINT8
        message.log_prob_step = LOG_PROB_STEP
    else:
        message.values.CopyFrom(_pack_floats(values, output_dtype, _KNOWN_SIGN[kind]))
        message.values_dtype = output_dtype
    if tail_mass is not None:
        message.tail_mass.CopyFrom(_pack_floats(tail_mass, output_dtype, 0))
        message.tail_dtype = output_dtype
    return message


def decode_top_k(
    message: pb.PackedTopK, kind: str, field: str, max_elements: int = codec.DEFAULT_MAX_ELEMENTS
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(values, indices, tail_mass) of a packed answer, as the Tensors would decode: values
    float16 for FLOAT16, else float32 (codes: the log-probabilities, or their exp for PROBS, in
    the tail's dtype); indices int64; tail mass float32, or None when absent."""
    indices = unpack_uints(message.indices, f"{field}.indices", max_elements).astype(np.int64)
    tail = None
    if message.HasField("tail_mass"):
        if message.tail_dtype not in _FLOAT_WIDTH:
            raise InvalidArgument(
                f"{field}.tail_dtype: {codec.dtype_name(message.tail_dtype)} is not FLOAT16, "
                "BFLOAT16 or FLOAT32",
                f"{field}.tail_dtype",
            )
        tail = _unpack_floats(
            message.tail_mass, message.tail_dtype, 0, f"{field}.tail_mass", max_elements
        ).astype(np.float32)
    if message.values_dtype == pb.UINT8:
        if kind == "logits" or not message.log_prob_step > 0:
            raise InvalidArgument(
                f"{field}.values_dtype: codes need probs or log_probs and log_prob_step > 0 "
                f"(kind {kind}, step {message.log_prob_step})",
                f"{field}.values_dtype",
            )
        codes = unpack_uints(message.values, f"{field}.values", max_elements)
        log_probs = -codes.astype(np.float64) * message.log_prob_step
        decoded = np.exp(log_probs) if kind == "probs" else log_probs
        values_dtype = message.tail_dtype if message.HasField("tail_mass") else pb.FLOAT32
        values = decoded.astype(np.float16 if values_dtype == pb.FLOAT16 else np.float32)
        if values_dtype == pb.BFLOAT16:
            values = codec.bfloat16_bits_to_float32(codec.float32_to_bfloat16_bits(values))
    elif message.values_dtype in _FLOAT_WIDTH:
        values = _unpack_floats(
            message.values,
            message.values_dtype,
            _KNOWN_SIGN.get(kind),
            f"{field}.values",
            max_elements,
        )
    else:
        raise InvalidArgument(
            f"{field}.values_dtype: {codec.dtype_name(message.values_dtype)} is not FLOAT16, "
            "BFLOAT16, FLOAT32 or UINT8",
            f"{field}.values_dtype",
        )
    if values.shape != indices.shape or (tail is not None and tail.shape != values.shape[:1]):
        raise InvalidArgument(
            f"{field}: values {list(values.shape)}, indices {list(indices.shape)} and tail mass "
            f"{None if tail is None else list(tail.shape)} do not agree",
            field,
        )
    return values, indices, tail
