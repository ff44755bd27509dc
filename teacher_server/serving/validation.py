"""Validation of soft-target requests, done once for every transport.

Each failure is an `InvalidArgument` / `NotFound` / `FailedPrecondition` whose message names the
field and the value, e.g. `inputs.shape: expected [N, 1, 28, 28], got [4, 784]`.
"""

from __future__ import annotations

import math

import numpy as np

from protocol.errors import FailedPrecondition, InvalidArgument
from teacher_server.serving.schema import (
    OUTPUT_DTYPES,
    OUTPUT_KINDS,
    TOP_K_ENCODINGS,
    ModelInfo,
    SoftTargetsRequest,
    ValidatedRequest,
)

MAX_BATCH_ID_LENGTH = 128
MAX_SCORED_IDS = 64  # ids scored per token


def validate(request: SoftTargetsRequest, info: ModelInfo) -> ValidatedRequest:
    """Check `request` against the model described by `info`; return it with tasks resolved."""
    if request.model_version and request.model_version != info.model_version:
        raise FailedPrecondition(
            f"model_version: pinned {request.model_version!r} but model {info.name!r} is serving "
            f"{info.model_version!r}",
            "model_version",
        )
    if len(request.batch_id) > MAX_BATCH_ID_LENGTH:
        raise InvalidArgument(
            f"batch_id: at most {MAX_BATCH_ID_LENGTH} characters, got {len(request.batch_id)}",
            "batch_id",
        )
    task_names = tuple(task.name for task in info.tasks)
    tasks = request.tasks or task_names
    unknown = [task for task in tasks if task not in task_names]
    if unknown:
        raise InvalidArgument(
            f"tasks: unknown task {unknown[0]!r}; model {info.name!r} has {list(task_names)}",
            "tasks",
        )
    if len(set(tasks)) != len(tasks):
        raise InvalidArgument(f"tasks: listed twice in {list(tasks)}", "tasks")
    temperature = request.temperature
    if not (
        isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0
    ):
        raise InvalidArgument(
            f"temperature: must be a finite number > 0, got {temperature!r}", "temperature"
        )
    if request.output not in OUTPUT_KINDS:
        raise InvalidArgument(
            f"output: unknown output kind {request.output!r}; expected one of {list(OUTPUT_KINDS)}",
            "output",
        )
    if request.output_dtype not in OUTPUT_DTYPES:
        raise InvalidArgument(
            f"output_dtype: {request.output_dtype!r} is not one of {list(OUTPUT_DTYPES)}",
            "output_dtype",
        )
    classes = {task.name: task.num_classes or len(task.class_names) for task in info.tasks}
    smallest = min(classes[task] for task in tasks)
    if not 0 <= request.top_k <= smallest:
        raise InvalidArgument(
            f"top_k: must be between 0 (dense) and {smallest} (the fewest classes of the requested "
            f"tasks), got {request.top_k}",
            "top_k",
        )
    _validate_top_k_encoding(request, info)
    if len(set(request.hints)) != len(request.hints):
        raise InvalidArgument(f"hints: listed twice in {list(request.hints)}", "hints")
    unknown_hints = [hint for hint in request.hints if hint not in info.hints]
    if unknown_hints:
        raise InvalidArgument(
            f"hints: unknown hint {unknown_hints[0]!r}; model {info.name!r} has {list(info.hints)}",
            "hints",
        )
    if info.input_kind == "tokens":
        return _validate_sequences(request, info, tuple(tasks), classes)
    for field in ("lengths", "scored_ids"):
        if getattr(request, field) is not None:
            raise InvalidArgument(
                f"{field}: model {info.name!r} takes fixed-shape inputs, not sequences", field
            )
    return ValidatedRequest(
        request=request, tasks=tuple(tasks), inputs=_validate_inputs(request, info)
    )


def _validate_top_k_encoding(request: SoftTargetsRequest, info: ModelInfo) -> None:
    """Packed top-k is a wire encoding, accepted for every model; 8-bit log-probability codes
    are made by the sequence engine, for probabilities and log-probabilities only."""
    encoding = request.top_k_encoding
    if encoding not in TOP_K_ENCODINGS:
        raise InvalidArgument(
            f"top_k_encoding: {encoding!r} is not one of {list(TOP_K_ENCODINGS)}", "top_k_encoding"
        )
    if encoding != "log_prob_codes":
        return
    if info.input_kind != "tokens":
        raise InvalidArgument(
            f"top_k_encoding: log-probability codes are for sequence models; model {info.name!r} "
            "takes fixed-shape inputs (use packed)",
            "top_k_encoding",
        )
    if request.output == "logits":
        raise InvalidArgument(
            "top_k_encoding: log-probability codes need output probs or log_probs, got logits",
            "top_k_encoding",
        )


def _validate_sequences(
    request: SoftTargetsRequest, info: ModelInfo, tasks: tuple[str, ...], classes: dict[str, int]
) -> ValidatedRequest:
    """A sequence model's request: lengths, padded or packed ids, scored ids, tokenizer hash.
    Returns padded int64 ids (batch, max(lengths)) with the pad id past each length."""
    if (
        request.tokenizer_hash
        and info.tokenizer is not None
        and request.tokenizer_hash != info.tokenizer.sha256
    ):
        raise FailedPrecondition(
            f"tokenizer_hash: the ids came from tokenizer {request.tokenizer_hash!r} but model "
            f"{info.name!r} reads tokenizer {info.tokenizer.sha256!r}",
            "tokenizer_hash",
        )
    lengths = _validate_lengths(request.lengths, info)
    inputs = request.inputs
    if inputs.dtype.name not in info.accepted_input_dtypes:
        raise InvalidArgument(
            f"inputs.dtype: model {info.name!r} accepts {list(info.accepted_input_dtypes)}, "
            f"got {inputs.dtype.name}",
            "inputs.dtype",
        )
    batch, longest = len(lengths), int(lengths.max())
    real = np.arange(longest)[None, :] < lengths[:, None]  # (batch, longest)
    pad_id = info.tokenizer.special_ids.get("pad", 0) if info.tokenizer is not None else 0
    ids = np.full((batch, longest), pad_id, dtype=np.int64)
    if inputs.ndim == 2:
        if inputs.shape[0] != batch or not longest <= inputs.shape[1] <= info.max_length:
            raise InvalidArgument(
                f"inputs.shape: padded ids must be [{batch}, L] with {longest} <= L <= "
                f"{info.max_length} (the longest of lengths; max_length), got {list(inputs.shape)}",
                "inputs.shape",
            )
        ids[real] = inputs[:, :longest][real]
    elif inputs.ndim == 1:
        if inputs.shape[0] != int(lengths.sum()):
            raise InvalidArgument(
                f"inputs.shape: packed ids must be [{int(lengths.sum())}] (the sum of lengths), "
                f"got {list(inputs.shape)}",
                "inputs.shape",
            )
        ids[real] = inputs  # row-major order of `real` is the packed order
    else:
        raise InvalidArgument(
            f"inputs.shape: expected padded ids [N, L] or packed ids [sum(lengths)], got "
            f"{list(inputs.shape)}",
            "inputs.shape",
        )
    bad = real & ((ids < 0) | (ids >= info.vocab_size))
    if bad.any():
        sequence, position = (int(i) for i in np.argwhere(bad)[0])
        raise InvalidArgument(
            f"inputs: token id {int(ids[sequence, position])} of sequence {sequence} at position "
            f"{position} is outside [0, {info.vocab_size}) for model {info.name!r}",
            "inputs",
        )
    return ValidatedRequest(
        request=request,
        tasks=tasks,
        inputs=ids,
        lengths=lengths,
        scored_ids=_validate_scored_ids(request.scored_ids, info, tasks, classes, lengths),
    )


def _validate_lengths(lengths: np.ndarray | None, info: ModelInfo) -> np.ndarray:
    if lengths is None:
        raise InvalidArgument(
            f"lengths: model {info.name!r} takes token sequences; give each sequence's length",
            "lengths",
        )
    if lengths.ndim != 1 or lengths.dtype.kind not in "iu":
        raise InvalidArgument(
            f"lengths: expected a 1-D array of integers, got shape {list(lengths.shape)} of "
            f"{lengths.dtype.name}",
            "lengths",
        )
    if not 1 <= len(lengths) <= info.max_batch_size:
        raise InvalidArgument(
            f"lengths: {len(lengths)} sequences; send between 1 and {info.max_batch_size}",
            "lengths",
        )
    for index, length in enumerate(lengths.tolist()):
        if length < 1:
            raise InvalidArgument(f"lengths[{index}]: {length} is not a length >= 1", "lengths")
        if length > info.max_length:
            raise InvalidArgument(
                f"lengths[{index}]: {length} is above model {info.name!r}'s max_length "
                f"{info.max_length}",
                "lengths",
            )
    return lengths.astype(np.int64)


def _validate_scored_ids(
    scored_ids: np.ndarray | None,
    info: ModelInfo,
    tasks: tuple[str, ...],
    classes: dict[str, int],
    lengths: np.ndarray,
) -> np.ndarray | None:
    if scored_ids is None:
        return None
    levels = {task.name: task.level for task in info.tasks}
    token_tasks = [task for task in tasks if levels[task] == "token"]
    if not token_tasks:
        raise InvalidArgument(
            f"scored_ids: only for token-level tasks; none of {list(tasks)} is one", "scored_ids"
        )
    tokens = int(lengths.sum())
    if (
        scored_ids.ndim != 2
        or scored_ids.dtype.kind not in "iu"
        or scored_ids.shape[0] != tokens
        or not 1 <= scored_ids.shape[1] <= MAX_SCORED_IDS
    ):
        raise InvalidArgument(
            f"scored_ids: expected integers [{tokens}, m] (one row per real token) with 1 <= m <= "
            f"{MAX_SCORED_IDS}, got {list(scored_ids.shape)} of {scored_ids.dtype.name}",
            "scored_ids",
        )
    smallest = min(classes[task] for task in token_tasks)
    bad = (scored_ids < 0) | (scored_ids >= smallest)
    if bad.any():
        row, column = (int(i) for i in np.argwhere(bad)[0])
        raise InvalidArgument(
            f"scored_ids: id {int(scored_ids[row, column])} at [{row}, {column}] is outside "
            f"[0, {smallest}) (the classes of {token_tasks})",
            "scored_ids",
        )
    return scored_ids.astype(np.int64)


def _validate_inputs(request: SoftTargetsRequest, info: ModelInfo) -> np.ndarray:
    inputs = request.inputs
    dtype = inputs.dtype.name
    if dtype not in info.accepted_input_dtypes:
        raise InvalidArgument(
            f"inputs.dtype: model {info.name!r} accepts {list(info.accepted_input_dtypes)}, got {dtype}",
            "inputs.dtype",
        )
    expected = ["N", *info.input_shape]
    if inputs.ndim != len(expected) or tuple(inputs.shape[1:]) != info.input_shape:
        raise InvalidArgument(
            f"inputs.shape: expected [{', '.join(map(str, expected))}], got {list(inputs.shape)}",
            "inputs.shape",
        )
    batch = inputs.shape[0]
    if batch < 1:
        raise InvalidArgument(
            "inputs.shape: empty batch (N = 0); send at least one sample", "inputs.shape"
        )
    if batch > info.max_batch_size:
        raise InvalidArgument(
            f"inputs.shape: batch of {batch} is above the maximum of {info.max_batch_size}; split it",
            "inputs.shape",
        )
    if inputs.dtype.kind in "iu" and info.max_value is not None and inputs.size:
        bad = (inputs < 0) | (inputs >= info.max_value)
        if bad.any():
            position = [int(i) for i in np.argwhere(bad)[0]]
            raise InvalidArgument(
                f"inputs: token id {int(inputs[tuple(position)])} at index {position} is outside "
                f"[0, {info.max_value}) for model {info.name!r}",
                "inputs",
            )
    if inputs.dtype.kind == "f":
        finite = np.isfinite(inputs)
        if not finite.all():
            where = tuple(int(i) for i in np.argwhere(~finite)[0])
            raise InvalidArgument(
                f"inputs: value {inputs[where]} at index {list(where)} is not finite", "inputs"
            )
    return inputs
