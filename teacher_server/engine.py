"""The engine: one forward of the shared backbone per merged batch, then every requested head, then
per-request temperature, softmax / log-softmax, top-k and output dtype.

`Engine.run` is blocking and meant for the batcher's worker thread; it is not re-entrant (one
worker per engine). Results are split back per request in the order given.
"""

from __future__ import annotations

import numpy as np
import torch

from protocol.codec import bfloat16_bits_to_float32, float32_to_bfloat16_bits
from teacher_server.repository import LoadedModel
from teacher_server.schema import SoftTargets, TaskResult, ValidatedRequest


def accepted_input_dtypes(model_dtype: str) -> tuple[str, ...]:
    """Wire dtypes a model accepts: float models take float32/float16/uint8 (scaled), token models
    take int64/int32."""
    return ("float32", "float16", "uint8") if model_dtype == "float32" else ("int64", "int32")


class Engine:
    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.config = loaded.config
        self.device = loaded.device
        self.forward_features = loaded.forward_features
        self.heads = loaded.heads
        self.hint_shapes = self._probe_hint_shapes()

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
        return torch.from_numpy(np.concatenate(parts)).to(self.device)

    def _probe_hint_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-sample shapes of the declared hints, found by one forward of a zero sample."""
        dtype = np.int64 if self.config.input_dtype == "int64" else np.float32
        sample = np.zeros((1, *self.config.input_shape), dtype=dtype)
        with torch.inference_mode():
            features = self.forward_features(self._model_inputs([sample]))
        return {name: tuple(features[name].shape[1:]) for name in self.config.hints}

    def run(self, batch: list[ValidatedRequest]) -> list[SoftTargets]:
        """Forward the requests as one batch and return each request's soft targets."""
        tasks = sorted({task for item in batch for task in item.tasks})
        inputs = self._model_inputs([item.inputs for item in batch])
        with torch.inference_mode():
            features = self.forward_features(inputs)
            logits = {task: self.heads[task](features["features"]).float() for task in tasks}
        results = []
        start = 0
        for item in batch:
            end = start + item.batch_size
            request = item.request
            outputs = tuple(
                shape_output(
                    task,
                    logits[task][start:end],
                    request.temperature,
                    request.output,
                    request.top_k,
                    request.output_dtype,
                )
                for task in item.tasks
            )
            results.append(
                SoftTargets(
                    model=self.config.name,
                    model_version=self.loaded.version,
                    batch_id=request.batch_id,
                    temperature=request.temperature,
                    output_dtype=request.output_dtype,
                    outputs=outputs,
                    hints={
                        name: features[name][start:end].float().cpu().numpy()
                        for name in request.hints
                    },
                )
            )
            start = end
        return results


def _round_dtype(values: np.ndarray, output_dtype: str) -> np.ndarray:
    if output_dtype == "float16":
        return values.astype(np.float16)
    if output_dtype == "bfloat16":
        return bfloat16_bits_to_float32(float32_to_bfloat16_bits(values))
    return values


def shape_output(
    task: str, logits: torch.Tensor, temperature: float, kind: str, top_k: int, output_dtype: str
) -> TaskResult:
    """Turn one task's logits (batch, classes) into what the request asked for."""
    scaled = logits.double() / temperature  # float64 so T and the softmax round once, at the end
    if kind == "probs":
        values = torch.softmax(scaled, dim=1)
    elif kind == "log_probs":
        values = torch.log_softmax(scaled, dim=1)
    else:
        values = scaled
    if top_k == 0:
        return TaskResult(task, kind, _round_dtype(values.float().cpu().numpy(), output_dtype))
    top_values, top_indices = torch.topk(values, top_k, dim=1)  # (batch, k), descending
    tail_mass = None
    if kind != "logits":
        top_probs = top_values if kind == "probs" else top_values.exp()
        tail_mass = (1.0 - top_probs.sum(dim=1)).clamp(min=0.0).float().cpu().numpy()
    return TaskResult(
        task,
        kind,
        _round_dtype(top_values.float().cpu().numpy(), output_dtype),
        top_indices.cpu().numpy().astype(np.int64),
        tail_mass,
    )
