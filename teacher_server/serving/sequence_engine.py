"""The sequence engine: merged token sequences run in few length buckets, then each request's
per-token and per-sequence soft targets, copied to the host once.

A merged batch's sequences (every request's, padded or packed on the wire, padded by validation)
are sorted by length, longest first, and cut into forwards: a forward takes the next sequences
while its padded size (rows x its longest length) stays within `max_batch_tokens` and its padding
within `MAX_PADDING_WASTE` of its real tokens (a single sequence always fits). Each forward calls
the model's `forward_features(ids, lengths)` (the sequence model contract in
`teacher_server.models.causal_transformer`); the states of real positions only are kept, so padding
never reaches a head, and put back in request order.

Per request and task: a token-level task's head runs on the request's real token states (tokens,
dim) -> (tokens, classes); a sequence-level task's on its sequences' pooled states (batch, dim).
Then temperature, probs / log_probs / logits in float64, dense or top-k (`torch.topk` on the
device, tail mass = 1 - sum of the top-k probabilities; with `top_k_encoding` log_prob_codes the
top-k values as uint8 codes of the float64 log-probabilities, `protocol.packed`), the scored ids'
log-probabilities at T, and the output dtype, all on the device; everything sent (and the sequence-level probabilities
for telemetry) is copied to the host in one transfer. A request's numbers are those it would get
alone, up to float rounding: every op after the forward is per row, and padding is masked.

Hints: a per-token hint (the model returns it as (batch, length, *shape)) comes back as rows of
real tokens (tokens, *shape), like a token-level task; a per-sequence hint as (batch, *shape).

`SequenceEngine.run` is blocking, for the batcher's worker thread, and not re-entrant.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from protocol.codec import bfloat16_bits_to_float32
from protocol.packed import LOG_PROB_STEP, MAX_CODE
from teacher_server.repository.store import LoadedModel
from teacher_server.serving.engine import task_values
from teacher_server.serving.schema import (
    SoftTargets,
    SoftTargetsRequest,
    TaskResult,
    ValidatedRequest,
)

MAX_PADDING_WASTE = 0.08  # padded tokens / real tokens - 1, at most, in any forward of several rows


def plan_forwards(
    lengths: np.ndarray, max_batch_tokens: int, max_waste: float = MAX_PADDING_WASTE
) -> list[tuple[int, int]]:
    """Cut `lengths` (sorted longest first) into forwards [start, end): each one's padded size
    (rows x lengths[start]) at most `max_batch_tokens` and at most (1 + max_waste) x its real
    tokens, unless it holds a single sequence."""
    forwards = []
    start, count = 0, len(lengths)
    while start < count:
        longest, real, end = int(lengths[start]), 0, start
        while end < count:
            rows, length = end - start + 1, int(lengths[end])
            padded = rows * longest
            if rows > 1 and (
                padded > max_batch_tokens or padded > (1 + max_waste) * (real + length)
            ):
                break
            real += length
            end += 1
        forwards.append((start, end))
        start = end
    return forwards


class _HostCopy:
    """Tensors on the device gathered as bytes and copied to the host in one transfer."""

    def __init__(self) -> None:
        self._parts: list[torch.Tensor] = []
        self._specs: list[tuple[torch.dtype, tuple[int, ...], int]] = []

    def add(self, tensor: torch.Tensor) -> int:
        """Queue `tensor`; its index in `fetch()`'s list."""
        tensor = tensor.contiguous()
        size = tensor.numel() * tensor.element_size()
        raw = tensor.reshape(-1).view(torch.uint8)
        if size % 8:  # keep each part 8-byte aligned in the host buffer
            raw = torch.cat([raw, raw.new_zeros(8 - size % 8)])
        self._parts.append(raw)
        self._specs.append((tensor.dtype, tuple(tensor.shape), size))
        return len(self._parts) - 1

    def fetch(self) -> list[np.ndarray]:
        """Every queued tensor as a numpy array (bfloat16 as float32 of the same values)."""
        if not self._parts:
            return []
        host = torch.cat(self._parts).cpu().numpy()
        arrays, offset = [], 0
        for (dtype, shape, size), part in zip(self._specs, self._parts, strict=True):
            chunk = host[offset : offset + size]
            offset += len(part)
            if dtype == torch.bfloat16:
                arrays.append(bfloat16_bits_to_float32(chunk.view(np.uint16)).reshape(shape))
            else:
                numpy_dtype = torch.empty((), dtype=dtype).numpy().dtype
                arrays.append(chunk.view(numpy_dtype).reshape(shape))
        return arrays


@dataclass
class _TaskPlan:
    """One task of one request: its result's fields, as indices into the host copy."""

    task: str
    level: str
    classes: int
    copies: dict[str, int] = field(default_factory=dict)


_DEVICE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class SequenceEngine:
    """Serves a model of input kind `tokens` (see the module docstring)."""

    def __init__(self, loaded: LoadedModel, max_batch_tokens: int) -> None:
        self.loaded = loaded
        self.config = loaded.config
        self.device = loaded.device
        self.max_batch_tokens = max_batch_tokens
        special = self.config.tokenizer.special_ids if self.config.tokenizer else {}
        self.pad_id = special.get("pad", 0)
        self.levels = {task.name: task.level for task in self.config.tasks}
        self.token_hints: set[str] = set()
        self.hint_shapes = self._probe_hint_shapes()
        # Counted over every run (tests and docs read them): forwards, and the tokens they held.
        self.forwards = 0
        self.real_tokens = 0
        self.padded_tokens = 0
        self.last_forwards: list[tuple[int, int]] = []  # the last run's (rows, padded length)
        # Called from the worker thread with (task, probabilities (batch, classes) float64) of
        # each request's sequence-level tasks, for telemetry.
        self.on_distribution: Callable[[str, np.ndarray], None] | None = None

    def describe_forward(self) -> str:
        return (
            f"length buckets of at most {self.max_batch_tokens} padded tokens and "
            f"{MAX_PADDING_WASTE:.0%} padding"
        )

    def close(self) -> None:
        """Nothing to stop (no worker threads of its own)."""

    def _features(self, ids: torch.Tensor, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        assert self.loaded.forward_features is not None
        forward_features: Callable[..., dict[str, torch.Tensor]] = self.loaded.forward_features
        return forward_features(ids, lengths)

    def _probe_hint_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-row shapes of the hints; a hint whose second axis follows the input's length is
        per token (found with two forwards of lengths 1 and 2)."""
        shapes = []
        with torch.inference_mode():
            for length in (1, 2):
                ids = torch.full((1, length), self.pad_id, dtype=torch.int64, device=self.device)
                lengths = torch.tensor([length], device=self.device)
                features = self._features(ids, lengths)
                shapes.append({name: tuple(value.shape) for name, value in features.items()})
        from teacher_server.repository.model_config import ModelLoadError

        missing = [n for n in ("tokens", "sequence", *self.config.hints) if n not in shapes[0]]
        if missing:
            raise ModelLoadError(
                f"model {self.config.name!r}: {missing} are not returned by forward_features "
                f"(it returns {sorted(shapes[0])})"
            )
        hint_shapes = {}
        for name in self.config.hints:
            one, two = shapes[0][name], shapes[1][name]
            if len(one) >= 3 and one[1] == 1 and two[1] == 2:
                self.token_hints.add(name)
                hint_shapes[name] = one[2:]
            else:
                hint_shapes[name] = one[1:]
        return hint_shapes

    def _forward(
        self, batch: list[ValidatedRequest], needed: set[str]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Run every request's sequences in length buckets; return the `needed` features in
        request order, per-token ones as real-token rows (tokens, ...), per-sequence ones as
        (sequences, ...), and the lengths (sequences,) on the device."""
        lengths = np.concatenate([item.lengths for item in batch if item.lengths is not None])
        longest = int(lengths.max())
        ids = np.full((len(lengths), longest), self.pad_id, dtype=np.int64)
        row = 0
        for item in batch:
            ids[row : row + item.batch_size, : item.inputs.shape[1]] = item.inputs
            row += item.batch_size
        order = np.argsort(-lengths, kind="stable")  # longest first
        sorted_lengths = lengths[order]
        device_ids = torch.from_numpy(ids).to(self.device)
        device_lengths = torch.from_numpy(lengths).to(self.device)
        device_order = torch.from_numpy(order).to(self.device)
        pieces: dict[str, list[torch.Tensor]] = {name: [] for name in needed}
        self.last_forwards = []
        for start, end in plan_forwards(sorted_lengths, self.max_batch_tokens):
            length = int(sorted_lengths[start])
            rows = device_order[start:end]
            piece_lengths = device_lengths[rows]
            features = self._features(device_ids[rows, :length], piece_lengths)
            real = torch.arange(length, device=self.device)[None, :] < piece_lengths[:, None]
            for name in needed:
                per_token = name == "tokens" or name in self.token_hints
                pieces[name].append(features[name][real] if per_token else features[name])
            self.last_forwards.append((end - start, length))
            self.forwards += 1
            self.padded_tokens += (end - start) * length
        self.real_tokens += int(lengths.sum())
        # Back to request order: sequence s sits at sorted position `position[s]`; its tokens
        # start at the sorted token offset of that position.
        position = np.empty_like(order)
        position[order] = np.arange(len(order))
        sorted_starts = np.concatenate([[0], np.cumsum(sorted_lengths)[:-1]])
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        token_order = np.repeat(sorted_starts[position] - starts, lengths) + np.arange(
            int(lengths.sum())
        )
        device_position = torch.from_numpy(position).to(self.device)
        device_token_order = torch.from_numpy(token_order).to(self.device)
        features = {}
        for name, parts in pieces.items():
            joined = torch.cat(parts)
            per_token = name == "tokens" or name in self.token_hints
            features[name] = joined[device_token_order if per_token else device_position]
        return features, device_lengths

    def run(self, batch: list[ValidatedRequest]) -> list[SoftTargets]:
        """Forward the requests' sequences together and return each request's soft targets."""
        assert self.loaded.heads is not None
        heads = self.loaded.heads
        needed = {name for item in batch for name in item.request.hints}
        needed |= {
            "tokens" if self.levels[task] == "token" else "sequence"
            for item in batch
            for task in item.tasks
        }
        copy = _HostCopy()
        plans: list[tuple[list[_TaskPlan], dict[str, int]]] = []  # per request: tasks, hints
        with torch.inference_mode():
            features, _ = self._forward(batch, needed)
            sequence_start = token_start = 0
            for item in batch:
                assert item.lengths is not None
                request = item.request
                tokens = int(item.lengths.sum())
                rows = {
                    "token": slice(token_start, token_start + tokens),
                    "sequence": slice(sequence_start, sequence_start + item.batch_size),
                }
                tasks = []
                for task in item.tasks:
                    level = self.levels[task]
                    state = features["tokens" if level == "token" else "sequence"][rows[level]]
                    logits = heads[task](state).float()  # (rows, classes)
                    scored = item.scored_ids if level == "token" else None
                    tasks.append(self._shape(copy, task, level, logits, request, scored))
                hints = {
                    name: copy.add(features[name][rows[self._hint_level(name)]].float())
                    for name in request.hints
                }
                plans.append((tasks, hints))
                sequence_start += item.batch_size
                token_start += tokens
        host = copy.fetch()
        results = []
        for item, (tasks, hints) in zip(batch, plans, strict=True):
            request = item.request
            outputs = []
            for plan in tasks:
                fields = {key: host[index] for key, index in plan.copies.items()}
                if "telemetry" in fields and self.on_distribution is not None:
                    self.on_distribution(plan.task, fields["telemetry"])
                outputs.append(
                    TaskResult(
                        plan.task,
                        request.output,
                        fields["values"],
                        fields.get("indices"),
                        fields.get("tail_mass"),
                        plan.classes,
                        plan.level,
                        fields.get("scored_values"),
                    )
                )
            results.append(
                SoftTargets(
                    model=self.config.name,
                    model_version=self.loaded.version,
                    batch_id=request.batch_id,
                    temperature=request.temperature,
                    output_dtype=request.output_dtype,
                    top_k_encoding=request.top_k_encoding,
                    outputs=tuple(outputs),
                    hints={name: host[index] for name, index in hints.items()},
                    lengths=item.lengths,
                )
            )
        return results

    def _shape(
        self,
        copy: _HostCopy,
        task: str,
        level: str,
        logits: torch.Tensor,
        request: SoftTargetsRequest,
        scored_ids: np.ndarray | None,
    ) -> _TaskPlan:
        """One task's values as the request asked, queued on `copy`; what to read back."""
        kind, top_k, temperature = request.output, request.top_k, request.temperature
        dtype = _DEVICE_DTYPES[request.output_dtype]
        values = task_values([logits], temperature, kind)  # (rows, classes) float64
        classes = int(values.shape[1])
        plan = _TaskPlan(task, level, classes)
        copies = plan.copies
        if top_k == 0:
            copies["values"] = copy.add(values.float().to(dtype))
        else:
            top_values, top_indices = torch.topk(values, top_k, dim=1)  # (rows, k), descending
            if request.top_k_encoding == "log_prob_codes":  # from the float64 log-probs
                top_log_probs = top_values if kind == "log_probs" else top_values.log()
                codes = (-top_log_probs / LOG_PROB_STEP).round().clamp(0, MAX_CODE)
                copies["values"] = copy.add(codes.to(torch.uint8))
            else:
                copies["values"] = copy.add(top_values.float().to(dtype))
            copies["indices"] = copy.add(top_indices)
            if kind != "logits":
                top_probs = top_values if kind == "probs" else top_values.exp()
                tail = (1.0 - top_probs.sum(dim=1)).clamp(min=0.0)
                if top_k == classes:
                    tail = torch.zeros_like(tail)  # nothing left out: exactly 0
                copies["tail_mass"] = copy.add(tail.float())
        if scored_ids is not None:
            log_probs = (
                values
                if kind == "log_probs"
                else torch.log_softmax(logits.double() / temperature, dim=1)
            )
            ids = torch.from_numpy(scored_ids).to(self.device)
            copies["scored_values"] = copy.add(log_probs.gather(1, ids).float().to(dtype))
        if level == "sequence" and self.on_distribution is not None:
            probs = (
                values
                if kind == "probs"
                else (values.exp() if kind == "log_probs" else torch.softmax(values, dim=1))
            )
            copies["telemetry"] = copy.add(probs)
        return plan

    def _hint_level(self, name: str) -> str:
        return "token" if name in self.token_hints else "sequence"
