"""The engine: one forward per merged batch, then each request's soft targets from its rows.

The shared backbone runs once, then every requested head, then per-request temperature, softmax /
log-softmax, top-k and output dtype.

An ensemble runs each member's forward on the same batch; its soft targets are the mean of the
members' probabilities at the request's temperature (`probs`), the log of that mean (`log_probs`),
or the mean of the members' logits / T (`logits`, a log-space variant).

`Engine.run` is blocking and meant for the batcher's worker thread; it is not re-entrant (one
worker per engine). Results are split back per request in the order given.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch import nn

from protocol.codec import bfloat16_bits_to_float32, float32_to_bfloat16_bits
from teacher_server.repository.store import LoadedModel
from teacher_server.serving.schema import SoftTargets, TaskResult, ValidatedRequest


def accepted_input_dtypes(model_dtype: str) -> tuple[str, ...]:
    """Wire dtypes a model accepts: float models take float32/float16/uint8 (scaled), token models
    take int64/int32."""
    return ("float32", "float16", "uint8") if model_dtype == "float32" else ("int64", "int32")


def _task_logits(
    model: LoadedModel, inputs: torch.Tensor, tasks: list[str]
) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Per member (one for a plain model): task -> logits (batch, classes) float32; and the plain
    model's named features (the hints)."""
    if model.members:
        return [_task_logits(member, inputs, tasks)[0][0] for member in model.members], {}
    assert model.forward_features is not None and model.heads is not None
    features = model.forward_features(inputs)
    return [{task: model.heads[task](features["features"]).float() for task in tasks}], features


# On a CPU a convolutional teacher's forward can cost far more per sample at batch 256 than at
# 32-128 (its activations outgrow the caches), while an MLP's is cheapest whole. So on a CPU the
# engine times a probe batch once when the model loads, whole and in chunks of these sizes, and
# keeps chunks unless whole batches are at least 10% faster (chunks also bound the activations'
# memory, which whole merged batches of a CNN make swing). A GPU wants whole batches.
# (The figures behind this are in docs/performance.md.)
CHUNK_CANDIDATES = (64,)
PROBE_ROWS = 256
PROBE_MAX_S = 0.25  # a model slower than this on the probe batch gets chunks, unprobed


def _chunked_logits(
    model: LoadedModel,
    inputs: torch.Tensor,
    tasks: list[str],
    hints: set[str],
    chunk: int,
    pool: ThreadPoolExecutor | None,
) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """`_task_logits` run on row chunks of at most `chunk`, on `pool`'s threads at once when
    given, and joined in order: the same values."""
    if chunk <= 0 or len(inputs) <= chunk:
        return _task_logits(model, inputs, tasks)
    pieces = inputs.split(chunk)

    def forward(piece: torch.Tensor) -> tuple[list[dict[str, torch.Tensor]], dict[str, Any]]:
        with torch.inference_mode():  # inference mode is per thread
            return _task_logits(model, piece, tasks)

    parts = list(pool.map(forward, pieces)) if pool else [forward(piece) for piece in pieces]
    members = [
        {task: torch.cat([part[0][m][task] for part in parts]) for task in tasks}
        for m in range(len(parts[0][0]))
    ]
    features = {name: torch.cat([part[1][name] for part in parts]) for name in hints}
    return members, features


class Engine:
    def __init__(
        self,
        loaded: LoadedModel,
        forward_chunk: int | None = None,
        forward_workers: int = 1,
        channels_last: bool | None = None,
    ) -> None:
        """`forward_chunk`: run merged batches in row chunks of at most this many (0: never);
        None: on a CPU the fastest of whole and `CHUNK_CANDIDATES` on a probe batch (see
        `_fastest_chunk`), on other devices whole batches. `forward_workers`
        > 1, on a CPU: compute that many chunks at once on a thread pool (a batch smaller than
        workers x chunk is cut into one chunk per worker); meant for torch's intra-op threads at
        1 (`Settings.apply_torch_settings` does that). Other devices use one worker.
        `channels_last`: run image models (4-d inputs) in the channels-last memory format;
        None: on a CPU when the model has 2-d convolutions (where that layout is faster),
        elsewhere not. The same values up to float rounding."""
        self.loaded = loaded
        self.config = loaded.config
        self.device = loaded.device
        if channels_last is None:
            channels_last = loaded.device.type == "cpu" and _has_conv2d(loaded)
        self.channels_last = channels_last and len(self.config.input_shape) == 3
        if self.channels_last:
            for module in _modules(loaded):
                module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.forward_workers = max(1, forward_workers) if loaded.device.type == "cpu" else 1
        self._pool = (
            ThreadPoolExecutor(self.forward_workers, thread_name_prefix="forward")
            if self.forward_workers > 1
            else None
        )
        self.hint_shapes = self._probe_hint_shapes()
        self.chunk_timings: dict[int, float] = {}  # chunk size (0: whole) -> probe seconds
        if forward_chunk is None:
            forward_chunk = self._fastest_chunk() if loaded.device.type == "cpu" else 0
        self.forward_chunk = forward_chunk
        # Called from the worker thread with (task, probabilities (batch, classes) float64) of
        # every request, for telemetry.
        self.on_distribution: Callable[[str, np.ndarray], None] | None = None
        # Stage timing (teacher_server.serving.stage_timing), set by the batcher around one
        # `run` when on: `run` appends ("inputs" | "forward" | "post", perf_counter_ns) and
        # ("telemetry_ns", nanoseconds spent in `on_distribution`).
        self.stage_marks: list[tuple[str, int]] | None = None

    def describe_forward(self) -> str:
        """How merged batches are run, and why: for the load log."""
        mode = f"chunks of {self.forward_chunk} rows" if self.forward_chunk else "whole batches"
        if self.channels_last:
            mode += ", channels last"
        if not self.chunk_timings:
            return f"{mode} (not probed)"
        ms = {size or "whole": round(t * 1e3, 2) for size, t in self.chunk_timings.items()}
        return f"{mode} (probe of {PROBE_ROWS} rows, best ms: {ms})"

    def close(self) -> None:
        """Stop the forward workers' threads, if any (after the last `run`)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _fastest_chunk(self) -> int:
        """Time forwards of `PROBE_ROWS` zero samples whole and in chunks of each candidate
        size (five interleaved rounds after a warm-up, best of each) and return the fastest chunk
        size, or 0 (whole batches) when whole is at least 10% faster: chunks also bound the
        activations' memory, so a close or noisy probe keeps them. A model slower than
        `PROBE_MAX_S` on the probe batch gets the first candidate without probing.
        `chunk_timings` keeps the times."""
        dtype = np.int64 if self.config.input_dtype == "int64" else np.float32
        tasks = list(self.config.task_names)
        # made as requests' inputs are (dtype, device, memory format)
        probe = self._model_inputs([np.zeros((PROBE_ROWS, *self.config.input_shape), dtype)])
        with torch.inference_mode():
            _task_logits(self.loaded, probe, tasks)  # the first call initialises lazily
            started = time.perf_counter()
            _task_logits(self.loaded, probe, tasks)
            whole = time.perf_counter() - started
            if whole > PROBE_MAX_S:
                # Too slow to probe quickly: a heavy model, whose activations are large too;
                # chunks bound their memory (whole merged batches of such a model grew the
                # server's RSS under load: docs/performance.md).
                return CHUNK_CANDIDATES[0]
            chunks = [c for c in CHUNK_CANDIDATES if c < PROBE_ROWS]
            for candidate in chunks:  # warm-up (whole batches are warm already)
                _chunked_logits(self.loaded, probe, tasks, set(), candidate, self._pool)
            candidates = (0, *chunks)
            best = {c: float("inf") for c in candidates}
            best[0] = whole
            for _ in range(5):
                for candidate in candidates:
                    started = time.perf_counter()
                    _chunked_logits(self.loaded, probe, tasks, set(), candidate, self._pool)
                    best[candidate] = min(best[candidate], time.perf_counter() - started)
        self.chunk_timings = best
        chunked = min((c for c in best if c), key=best.__getitem__)
        return 0 if best[0] < 0.9 * best[chunked] else chunked

    def _model_inputs(self, arrays: list[np.ndarray]) -> torch.Tensor:
        """The requests' inputs as one tensor of the model's dtype on the device, (batch,
        *input_shape), made with one copy. uint8 inputs are scaled by the config's `uint8_scale`."""
        parts: list[np.ndarray]
        if self.config.input_dtype == "int64":
            parts = [array.astype(np.int64, copy=False) for array in arrays]
        else:
            scale = np.float32(self.config.uint8_scale)
            parts = [
                array.astype(np.float32) * scale
                if array.dtype == np.uint8
                else array.astype(np.float32, copy=False)
                for array in arrays
            ]
        batch = torch.from_numpy(np.concatenate(parts)).to(self.device)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch

    def _probe_hint_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-sample shapes of the declared hints, found by one forward of a zero sample."""
        if not self.config.hints:
            return {}
        dtype = np.int64 if self.config.input_dtype == "int64" else np.float32
        sample = np.zeros((1, *self.config.input_shape), dtype=dtype)
        with torch.inference_mode():
            _, features = _task_logits(self.loaded, self._model_inputs([sample]), [])
        missing = [name for name in self.config.hints if name not in features]
        if missing:
            from teacher_server.repository.model_config import ModelLoadError

            raise ModelLoadError(
                f"model {self.config.name!r}: hints {missing} are not returned by forward_features "
                f"(it returns {sorted(features)})"
            )
        return {name: tuple(features[name].shape[1:]) for name in self.config.hints}

    def run(self, batch: list[ValidatedRequest]) -> list[SoftTargets]:
        """Forward the requests as one batch and return each request's soft targets."""
        marks = self.stage_marks
        tasks = sorted({task for item in batch for task in item.tasks})
        inputs = self._model_inputs([item.inputs for item in batch])
        if marks is not None:
            marks.append(("inputs", _synchronized_ns(self.device)))
        hints = {name for item in batch for name in item.request.hints}
        chunk = self.forward_chunk
        if self._pool is not None and chunk > 0:  # every worker gets a chunk
            chunk = min(chunk, -(-len(inputs) // self.forward_workers))
        with torch.inference_mode():
            member_logits, features = _chunked_logits(
                self.loaded, inputs, tasks, hints, chunk, self._pool
            )
        if marks is not None:
            marks.append(("forward", _synchronized_ns(self.device)))
        results = []
        start = 0
        for _, run in itertools.groupby(batch, key=_settings):
            group = list(run)
            # Requests side by side with the same tasks and output settings (the usual case:
            # students of one run) get their values, telemetry and shaping in one set of ops
            # over all their rows, then split by rows: each op is row-wise, so every request's
            # numbers are those it would get alone.
            first = group[0].request
            rows = sum(item.batch_size for item in group)
            shaped = []
            for task in group[0].tasks:
                members = [logits[task][start : start + rows] for logits in member_logits]
                values = task_values(members, first.temperature, first.output)
                if self.on_distribution is not None:
                    telemetry_started = time.perf_counter_ns()
                    self.on_distribution(task, probabilities(values, first.output))
                    if marks is not None:
                        marks.append(("telemetry_ns", time.perf_counter_ns() - telemetry_started))
                shaped.append(
                    shape_values(task, values, first.output, first.top_k, first.output_dtype)
                )
            offset = 0
            for item in group:
                request, size = item.request, item.batch_size
                results.append(
                    SoftTargets(
                        model=self.config.name,
                        model_version=self.loaded.version,
                        batch_id=request.batch_id,
                        temperature=request.temperature,
                        output_dtype=request.output_dtype,
                        top_k_encoding=request.top_k_encoding,
                        outputs=tuple(_rows(result, offset, offset + size) for result in shaped),
                        hints={
                            name: np.ascontiguousarray(
                                features[name][start : start + size].float().cpu().numpy()
                            )
                            for name in request.hints
                        },
                    )
                )
                offset += size
                start += size
        if marks is not None:
            marks.append(("post", time.perf_counter_ns()))
        return results


def _synchronized_ns(device: torch.device) -> int:
    """`perf_counter_ns` once the device's queued work is done (stage timing only: a CUDA
    forward returns before it runs)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter_ns()


def _modules(loaded: LoadedModel) -> list[nn.Module]:
    """The torch modules of a plain model or of every member of an ensemble."""
    if loaded.members:
        return [module for member in loaded.members for module in _modules(member)]
    return [loaded.module] if loaded.module is not None else []


def _has_conv2d(loaded: LoadedModel) -> bool:
    return any(
        isinstance(layer, nn.Conv2d) for module in _modules(loaded) for layer in module.modules()
    )


def _settings(item: ValidatedRequest) -> tuple[object, ...]:
    """What requests must share to be post-processed together: tasks and output settings."""
    request = item.request
    return (item.tasks, request.temperature, request.output, request.top_k, request.output_dtype)


def _rows(result: TaskResult, start: int, end: int) -> TaskResult:
    """The rows [start, end) of a task's result."""
    if start == 0 and end == len(result.values):
        return result
    return dataclasses.replace(
        result,
        values=result.values[start:end],
        indices=None if result.indices is None else result.indices[start:end],
        tail_mass=None if result.tail_mass is None else result.tail_mass[start:end],
    )


def _round_dtype(values: np.ndarray, output_dtype: str) -> np.ndarray:
    if output_dtype == "float16":
        return values.astype(np.float16)
    if output_dtype == "bfloat16":
        return bfloat16_bits_to_float32(float32_to_bfloat16_bits(values))
    return values


def task_values(members: list[torch.Tensor], temperature: float, kind: str) -> torch.Tensor:
    """(batch, classes) float64 values of one task from each member's logits (one member for a
    plain model): softmax / log-softmax / logits at T, averaged in probability space."""
    # float64, so that T and the softmax round once, at the end
    scaled = [logits.double() / temperature for logits in members]
    if len(scaled) == 1:
        (z,) = scaled
        if kind == "probs":
            return torch.softmax(z, dim=1)
        return torch.log_softmax(z, dim=1) if kind == "log_probs" else z
    if kind == "logits":
        return torch.stack(scaled).mean(0)
    log_probs = torch.stack([torch.log_softmax(z, dim=1) for z in scaled])  # (members, batch, C)
    # the log of the mean probability, computed in log space
    mean_log_probs = torch.logsumexp(log_probs, dim=0) - math.log(len(members))
    return mean_log_probs if kind == "log_probs" else mean_log_probs.exp()


def probabilities(values: torch.Tensor, kind: str) -> np.ndarray:
    """The probabilities (batch, classes) behind `task_values` output of `kind`."""
    if kind == "probs":
        probs = values
    elif kind == "log_probs":
        probs = values.exp()
    else:
        probs = torch.softmax(values, dim=1)
    return probs.cpu().numpy()


def shape_values(
    task: str, values: torch.Tensor, kind: str, top_k: int, output_dtype: str
) -> TaskResult:
    """One task's values (batch, classes) as the request asked: dense or top-k, in its dtype."""
    classes = int(values.shape[1])
    if top_k == 0:
        return TaskResult(
            task, kind, _round_dtype(values.float().cpu().numpy(), output_dtype), classes=classes
        )
    top_values, top_indices = torch.topk(values, top_k, dim=1)  # (batch, k), descending
    tail_mass = None
    if kind != "logits":
        top_probs = top_values if kind == "probs" else top_values.exp()
        tail = (1.0 - top_probs.sum(dim=1)).clamp(min=0.0)
        if top_k == classes:
            tail = torch.zeros_like(tail)  # nothing is left out: exactly 0, not rounding residue
        tail_mass = tail.float().cpu().numpy()
    return TaskResult(
        task,
        kind,
        _round_dtype(top_values.float().cpu().numpy(), output_dtype),
        top_indices.cpu().numpy().astype(np.int64),
        tail_mass,
        classes,
    )
