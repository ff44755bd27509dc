"""Digests of inputs: per-sample sha256 keys (cache, export rows) and whole-dataset fingerprints.

The bottom of the package: imports nothing of `student_client`, so the cache, the export and the
offline reader agree on one definition of "the same sample" without importing each other.
"""

from __future__ import annotations

import hashlib

import numpy as np

_LITTLE = np.little_endian


def _little_endian(array: np.ndarray) -> np.ndarray:
    if array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and not _LITTLE):
        return array.astype(array.dtype.newbyteorder("<"))
    return array


def sample_digests(inputs: np.ndarray) -> list[bytes]:
    """sha256 of each sample of `inputs` (batch, ...): over its dtype (little-endian), per-sample
    shape and C-order bytes, so equal bytes of another dtype or shape are another sample."""
    array = _little_endian(np.ascontiguousarray(inputs))
    if array.ndim == 0:
        raise ValueError("inputs: expected a batch (batch, ...), got a scalar")
    header = f"{array.dtype.newbyteorder('<').str}|{','.join(map(str, array.shape[1:]))}|"
    prefix = np.frombuffer(header.encode(), dtype=np.uint8)
    n = len(array)
    if n == 0:
        return []
    # One row per sample, header then bytes, hashed whole: one sha256 call per sample (which
    # releases the GIL for rows of 2 KiB and more), no per-sample numpy objects.
    rows = np.empty((n, len(prefix) + array[:1].nbytes), dtype=np.uint8)
    rows[:, : len(prefix)] = prefix
    rows[:, len(prefix) :] = array.reshape(n, -1).view(np.uint8)
    width, buffer = rows.shape[1], memoryview(rows.data).cast("B")
    sha256 = hashlib.sha256
    return [sha256(buffer[i * width : (i + 1) * width]).digest() for i in range(n)]


def dataset_fingerprint(inputs: np.ndarray) -> str:
    """`sha256:<hex>` over the inputs' dtype, shape and bytes (C order, little-endian)."""
    array = _little_endian(np.ascontiguousarray(inputs))
    digest = hashlib.sha256(
        f"{array.dtype.newbyteorder('<').str}|{','.join(map(str, array.shape))}|".encode()
    )
    if array.size:
        digest.update(array.data)
    return "sha256:" + digest.hexdigest()


def sequence_digests(ids: np.ndarray, lengths: np.ndarray, tokenizer_hash: str) -> list[bytes]:
    """sha256 of each sequence of a token batch: over its tokenizer hash and its real ids as
    little-endian int64, never the padding. `ids` padded (batch, L) or packed (sum(lengths),).
    The same ids sent as int32 or int64, padded or packed, give the same digest (the teacher reads
    them the same); the same ids under another tokenizer are another sequence."""
    ids = np.asarray(ids)
    lengths = np.asarray(lengths, dtype=np.int64)
    prefix = f"tokens|{tokenizer_hash}|".encode()
    sha256 = hashlib.sha256
    digests = []
    start = 0
    for row, length in enumerate(lengths.tolist()):
        real = ids[row, :length] if ids.ndim == 2 else ids[start : start + length]
        start += length
        digest = sha256(prefix)
        digest.update(np.ascontiguousarray(real, dtype="<i8").data)
        digests.append(digest.digest())
    return digests
