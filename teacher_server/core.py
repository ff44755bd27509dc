"""The teacher's core: the models it serves and the one function every transport calls.

gRPC and HTTP handlers decode their message into a `SoftTargetsRequest`, call
`TeacherCore.soft_targets`, and encode the `SoftTargets` they get back. Validation, batching and
the forward happen here and below, once for every transport.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from protocol.errors import NotFound, Unavailable
from teacher_server.batcher import DynamicBatcher
from teacher_server.default_teacher import DEFAULT_MODEL_NAME, train_default_teacher
from teacher_server.engine import Engine, accepted_input_dtypes
from teacher_server.repository import LoadedModel, ModelLoadError, load_model, model_folders
from teacher_server.schema import ModelInfo, SoftTargets, SoftTargetsRequest, TaskInfo
from teacher_server.settings import Settings
from teacher_server.validation import validate

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    loaded: LoadedModel
    engine: Engine
    batcher: DynamicBatcher
    info: ModelInfo


def model_info(loaded: LoadedModel, engine: Engine, max_batch_size: int) -> ModelInfo:
    config = loaded.config
    return ModelInfo(
        name=config.name,
        model_version=loaded.version,
        tasks=tuple(TaskInfo(t.name, t.class_names, t.test_accuracy) for t in config.tasks),
        input_shape=config.input_shape,
        input_dtype=config.input_dtype,
        accepted_input_dtypes=accepted_input_dtypes(config.input_dtype),
        uint8_scale=config.uint8_scale,
        hints=engine.hint_shapes,
        max_batch_size=max_batch_size,
        description=config.description,
        parameter_count=sum(p.numel() for p in loaded.module.parameters()),
        ready=True,
    )


def load_repository(settings: Settings) -> tuple[list[LoadedModel], dict[str, str]]:
    """Load every model folder; train the default teacher first if the repository has none.
    Returns the loaded models and, per folder that failed, its error (the others still serve)."""
    root = settings.model_repository
    device = settings.torch_device()
    if not model_folders(root) and settings.train_default_if_missing:
        log.info("no model in %s: training the default teacher (about 30 s on 2 CPU cores)", root)
        train_default_teacher(root / DEFAULT_MODEL_NAME)
    loaded, failures = [], {}
    for folder in model_folders(root):
        try:
            loaded.append(load_model(folder, device, settings.allowed_architectures))
        except ModelLoadError as error:
            log.error("model folder %s not served: %s", folder, error)
            failures[folder.name] = str(error)
    return loaded, failures


class TeacherCore:
    """Owns the served models and their batchers. Create it, `await start()` on the serving
    loop, `await stop()` at shutdown."""

    def __init__(self, models: list[LoadedModel], settings: Settings) -> None:
        settings.apply_torch_settings()
        self.settings = settings
        self.models: dict[str, ServedModel] = {}
        for loaded in models:
            engine = Engine(loaded)
            batcher = DynamicBatcher(
                engine,
                settings.max_batch_size,
                settings.max_queue_delay_ms,
                settings.max_queue_size,
            )
            info = model_info(loaded, engine, settings.max_batch_size)
            self.models[loaded.config.name] = ServedModel(loaded, engine, batcher, info)
            accuracy = ", ".join(
                f"{t.name} {t.test_accuracy:.4f}" for t in info.tasks if t.test_accuracy is not None
            )
            log.info(
                "serving model %s (%s) on %s; held-out accuracy: %s",
                info.name,
                info.model_version[:19],
                loaded.device,
                accuracy or "unknown",
            )
        self.ready = False

    @classmethod
    def from_repository(cls, settings: Settings) -> TeacherCore:
        models, _ = load_repository(settings)
        return cls(models, settings)

    @classmethod
    def from_folders(cls, folders: list[Path], settings: Settings) -> TeacherCore:
        device = settings.torch_device()
        return cls(
            [load_model(f, device, settings.allowed_architectures) for f in folders], settings
        )

    async def start(self) -> None:
        for served in self.models.values():
            served.batcher.start()
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        for served in self.models.values():
            await served.batcher.close()

    def list_models(self) -> list[ModelInfo]:
        return [served.info for served in self.models.values()]

    def model_info(self, name: str) -> ModelInfo:
        return self._served(name).info

    def _served(self, name: str) -> ServedModel:
        try:
            return self.models[name]
        except KeyError:
            raise NotFound(
                f"model: no model named {name!r}; serving {sorted(self.models)}", "model"
            ) from None

    async def soft_targets(
        self, request: SoftTargetsRequest, timeout: float | None = None
    ) -> SoftTargets:
        """Validate, batch with other requests, forward, and return this request's soft targets.
        `timeout` (seconds, e.g. the client's gRPC deadline) is capped by `request_timeout_s`."""
        if not self.ready:
            raise Unavailable("server is not ready (starting or shutting down)")
        served = self._served(request.model)
        limit = self.settings.request_timeout_s
        timeout = limit if timeout is None else max(0.0, min(timeout, limit))
        return await served.batcher.submit(validate(request, served.info), timeout)
