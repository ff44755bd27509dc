"""The teacher's core: the models it serves and the functions every transport calls.

gRPC and HTTP handlers decode their message into a `SoftTargetsRequest`, call
`TeacherCore.soft_targets`, and encode the `SoftTargets` they get back. Validation, batching and
the forward happen here and below, once for every transport.

Models and versions: each model name serves one or more versions (see
`teacher_server.repository.store`), each with its own engine and batcher. A request without
`model_version` gets the default (newest) version. A reload swaps in the new set of versions at
once; versions no longer present are drained (every request already accepted finishes on the
version it started with) and then unloaded. A model folder that fails to load is reported
(ListModels, logs) and the other models keep serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from protocol.errors import FailedPrecondition, NotFound, TeacherError, Unavailable
from teacher_server.repository.background_training import (
    BackgroundTrainingError,
    needs_default_sequence_teacher,
    train_default_sequence_in_background,
)
from teacher_server.repository.default_sequence_teacher import DEFAULT_SEQUENCE_MODEL_NAME
from teacher_server.repository.default_teacher import ensure_default_teacher
from teacher_server.repository.model_config import ModelLoadError, file_sha256
from teacher_server.repository.store import (
    Fingerprint,
    LoadedModel,
    VersionFolder,
    fingerprint,
    load_version,
    read_config,
    scan_repository,
)
from teacher_server.serving.batcher import DynamicBatcher
from teacher_server.serving.engine import Engine, accepted_input_dtypes
from teacher_server.serving.metrics import Metrics
from teacher_server.serving.schema import (
    ModelInfo,
    ReloadResult,
    SoftTargets,
    SoftTargetsRequest,
    TaskInfo,
    TokenizerInfo,
    VersionSummary,
)
from teacher_server.serving.sequence_engine import SequenceEngine
from teacher_server.serving.stage_timing import StageRecorder, current
from teacher_server.serving.validation import validate
from teacher_server.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class ServedVersion:
    loaded: LoadedModel
    engine: Engine | SequenceEngine
    batcher: DynamicBatcher
    info: ModelInfo
    tokenizer_bytes: bytes = b""  # sequence models: the tokenizer file, checked at load


@dataclass
class ServedModel:
    """Every served version of one model name, and the default one."""

    versions: dict[str, ServedVersion] = field(default_factory=dict)
    default: str = ""


def parameter_count(loaded: LoadedModel) -> int:
    if loaded.module is not None:
        return sum(p.numel() for p in loaded.module.parameters())
    return sum(parameter_count(member) for member in loaded.members)


def model_info(
    loaded: LoadedModel,
    engine: Engine | SequenceEngine,
    max_batch_size: int,
    max_batch_tokens: int = 0,
) -> ModelInfo:
    """What ModelInfo reports. Sequence models: their lengths, vocabulary, token budget,
    tokenizer and held-out metrics; per-token hints have the shape of one token's row."""
    config = loaded.config
    tokenizer = config.tokenizer
    sequence = config.is_sequence_model
    return ModelInfo(
        name=config.name,
        model_version=loaded.version,
        tasks=tuple(
            TaskInfo(t.name, t.class_names, t.test_accuracy, t.level, t.num_classes)
            for t in config.tasks
        ),
        input_shape=config.input_shape,
        input_dtype=config.input_dtype,
        accepted_input_dtypes=accepted_input_dtypes(config.input_dtype),
        uint8_scale=config.uint8_scale,
        hints=engine.hint_shapes,
        max_batch_size=max_batch_size,
        description=config.description,
        parameter_count=parameter_count(loaded),
        ready=True,
        max_value=config.max_value,
        members=config.members,
        input_kind=config.input_kind,
        max_length=config.input_shape[0] if sequence else 0,
        vocab_size=(config.max_value or 0) if sequence else 0,
        max_batch_tokens=max_batch_tokens if sequence else 0,
        tokenizer=None
        if tokenizer is None
        else TokenizerInfo(
            tokenizer.file, tokenizer.sha256, tokenizer.vocab_size, dict(tokenizer.special_ids)
        ),
        held_out_metrics=dict(config.held_out_metrics),
    )


def read_tokenizer(folder: Path, loaded: LoadedModel) -> bytes:
    """A sequence model's tokenizer file, whose sha256 must be the config's (b"" if none)."""
    tokenizer = loaded.config.tokenizer
    if tokenizer is None:
        return b""
    path = folder / tokenizer.file
    if not path.is_file():
        raise ModelLoadError(f"model {loaded.config.name!r}: tokenizer file {path} is missing")
    data = path.read_bytes()
    if file_sha256(data) != tokenizer.sha256:
        raise ModelLoadError(
            f"model {loaded.config.name!r}: tokenizer file {path} has hash {file_sha256(data)} "
            f"but config.json says {tokenizer.sha256}"
        )
    return data


class TeacherCore:
    """Owns the served models, their versions and batchers. `load()` (blocking, in a thread),
    then `await start()` on the serving loop; `await reload(name)` any time; `await stop()`."""

    def __init__(self, settings: Settings) -> None:
        settings.apply_torch_settings()
        self.settings = settings
        self.device = settings.torch_device()
        self.models: dict[str, ServedModel] = {}
        self.failures: dict[str, str] = {}  # model name -> why its folder is not served
        self.ready = False
        self._started = False
        self._reload_lock = asyncio.Lock()  # one reload at a time (of any model)
        self._fingerprints: dict[str, Fingerprint] = {}  # model -> its files when last loaded
        self._poll_task: asyncio.Task[None] | None = None
        self._training_task: asyncio.Task[None] | None = None  # the default sequence teacher
        self._draining: set[asyncio.Task[None]] = set()  # old versions finishing after a reload
        self.metrics = Metrics(settings.metrics_max_clients)
        self.metrics.watch_queues(self._queue_depths)
        self.metrics.watch_client_queues(self._queued_rows)
        # per-request stage stamps for bench/request_cost.py; off unless a file is set
        self.stages = StageRecorder(settings.stage_timing_file)

    # ---- loading -------------------------------------------------------------------------

    def _serve(self, loaded: LoadedModel, folder: Path) -> ServedVersion:
        name, metrics = loaded.config.name, self.metrics
        sequence = loaded.config.is_sequence_model
        tokenizer_bytes = read_tokenizer(folder, loaded)
        engine: Engine | SequenceEngine
        try:
            chunk = self.settings.forward_chunk
            # runs a zero sample through the model if it has hints, and times a probe batch
            layout = {"auto": None, "on": True, "off": False}[self.settings.channels_last]
            if sequence:  # two short forwards find the hints' shapes
                engine = SequenceEngine(loaded, self.settings.max_batch_tokens)
            else:
                engine = Engine(
                    loaded, None if chunk < 0 else chunk, self.settings.forward_workers, layout
                )
            log.info("model %r: forward in %s", loaded.config.name, engine.describe_forward())
        except ModelLoadError:
            raise
        except Exception as error:  # e.g. the config's input shape does not fit the architecture
            raise ModelLoadError(
                f"model {loaded.config.name!r}: a forward of a zero input of shape "
                f"{list(loaded.config.input_shape)} failed: {error!r}"
            ) from error
        engine.on_distribution = lambda task, probs: metrics.observe_distribution(name, task, probs)
        batcher = DynamicBatcher(
            engine,
            self.settings.max_batch_size,
            self.settings.max_queue_delay_ms,
            self.settings.max_queue_size,
            on_forward=lambda requests, samples, seconds: metrics.observe_forward(
                name, requests, samples, seconds
            ),
            max_batch_tokens=self.settings.max_batch_tokens if sequence else 0,
            fair=self.settings.fair_queuing,
            max_queued_rows=self.settings.client_max_queued_rows,
            on_served=lambda client, rows, waited: metrics.observe_served(
                name, client, rows, waited
            ),
            on_refused=lambda client: metrics.observe_refused(name, client),
            inline_forward_max_ms=self.settings.inline_forward_max_ms,
        )
        metrics.model_loads.labels(name, "ok").inc()
        info = model_info(
            loaded, engine, self.settings.max_batch_size, self.settings.max_batch_tokens
        )
        accuracy = ", ".join(
            f"{t.name} {t.test_accuracy:.4f}" for t in info.tasks if t.test_accuracy is not None
        )
        log.info(
            "loaded model %s %s(%s) on %s; held-out accuracy: %s",
            info.name,
            f"version {loaded.label} " if loaded.label else "",
            info.model_version[:19],
            loaded.device,
            accuracy or "unknown",
        )
        return ServedVersion(loaded, engine, batcher, info, tokenizer_bytes)

    def _member(self, name: str) -> LoadedModel:
        """An ensemble member: the default version of a served model."""
        served = self.models[name]
        return served.versions[served.default].loaded

    def _load_model(self, name: str, folders: list[VersionFolder]) -> dict[str, ServedVersion]:
        """Load every version folder of one model (blocking). Versions already served with the
        same content are kept as they are, not reloaded."""
        current = self.models.get(name, ServedModel()).versions
        served: dict[str, ServedVersion] = {}
        for folder in folders:
            loaded = load_version(
                folder, self.device, self.settings.allowed_architectures, self._member
            )
            if any(member.config.is_sequence_model for member in loaded.members):
                raise ModelLoadError(
                    f"model {name!r}: ensembles of sequence models are not served (the engine "
                    "averages fixed-shape members only); serve the members on their own"
                )
            served[loaded.version] = current.get(loaded.version) or self._serve(loaded, folder.path)
        return served

    def load(self) -> None:
        """Load the whole repository (blocking), training the default teacher first if the
        repository has no model. Plain models load before ensembles, which need them."""
        root = self.settings.model_repository
        if not scan_repository(root) and self.settings.train_default_if_missing:
            ensure_default_teacher(root)
        found = scan_repository(root)
        pending = dict(found)
        while pending:  # ensembles wait until their members are loaded
            progress = False
            for name, folders in list(pending.items()):
                if self._waits_for_members(folders, set(pending)):
                    continue
                progress = True
                del pending[name]
                self._install_loaded(name, folders)
            if not progress:
                for name in pending:
                    self.failures[name] = f"{name}: ensemble members form a cycle or are missing"
                    log.error("model %s not served: %s", name, self.failures[name])
                break

    def _waits_for_members(self, folders: list[VersionFolder], pending: set[str]) -> bool:
        try:
            members = {m for folder in folders for m in read_config(folder)[0].members}
        except ModelLoadError:
            return False  # fails again (and is reported) when loaded
        return any(member in pending for member in members)

    def _install_loaded(self, name: str, folders: list[VersionFolder]) -> None:
        try:
            seen = fingerprint(folders)  # before reading: a change while loading reloads later
            versions = self._load_model(name, folders)
        except Exception as error:  # a user architecture may raise anything: report, keep serving
            self.failures[name] = str(error)
            self.metrics.model_loads.labels(name, "error").inc()
            log.error("model %s not served: %s", name, error)
            return
        self.models[name] = ServedModel(versions, default=next(reversed(versions)))
        self._fingerprints[name] = seen
        self.failures.pop(name, None)

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        for served in self.models.values():
            for version in served.versions.values():
                version.batcher.start()
        self._started = True
        self.ready = True
        if self.settings.repository_poll_s > 0:
            self._poll_task = asyncio.create_task(self._poll(), name="repository-poll")

    def start_background_training(self) -> None:
        """Once serving: train the default sequence teacher in the background if the settings
        ask for it (`default_sequence_teacher` and `train_default_if_missing`) and the
        repository is the defaults' one without it; it is loaded by `reload` when trained."""
        settings = self.settings
        if not (settings.train_default_if_missing and settings.default_sequence_teacher):
            return
        if not needs_default_sequence_teacher(settings.model_repository):
            return
        self._training_task = asyncio.create_task(
            self._train_default_sequence(), name="train-default-sequence"
        )

    async def _train_default_sequence(self) -> None:
        name, root = DEFAULT_SEQUENCE_MODEL_NAME, self.settings.model_repository
        log.info(
            "training the default sequence teacher %r into %s in the background (a child "
            "process at low priority%s); the other models are served meanwhile",
            name,
            root,
            ", tiny recipe" if self.settings.default_sequence_small else ", about 4 min on 2 cores",
        )
        started = time.perf_counter()
        try:
            await train_default_sequence_in_background(root, self.settings.default_sequence_small)
            await self.reload(name)
        except (BackgroundTrainingError, OSError, TeacherError) as error:
            message = error.message if isinstance(error, TeacherError) else str(error)
            log.error("default sequence teacher %r not served: %s", name, message)
            return
        served = self.models[name]
        log.info(
            "default sequence teacher %r trained and served after %.0fs; held-out perplexity %s",
            name,
            time.perf_counter() - started,
            served.versions[served.default].info.held_out_metrics.get("perplexity", "unknown"),
        )

    async def stop(self) -> None:
        self.ready = False
        if self._poll_task is not None:
            self._poll_task.cancel()
        if self._training_task is not None:
            self._training_task.cancel()  # kills the training child
            with contextlib.suppress(asyncio.CancelledError):
                await self._training_task
        if self._draining:
            await asyncio.gather(*self._draining)
        for served in self.models.values():
            for version in served.versions.values():
                await version.batcher.close()
        self.stages.write()

    # ---- reload --------------------------------------------------------------------------

    async def reload(self, name: str) -> ReloadResult:
        """Re-read model `name`'s folder: load new versions, drain and unload removed ones.
        Ensembles that use `name` are reloaded after it. Raises `NotFound` if the repository has
        no such folder, `FailedPrecondition` if it fails to load (the old versions keep serving).

        One reload runs at a time; callers wait their turn. A reload whose model folder has the
        same files (paths, sizes, mtimes) as when the served versions were last loaded answers
        at once with the served versions and nothing loaded or unloaded, without re-reading or
        re-hashing a byte: a loop of reloads costs a directory listing each."""
        async with self._reload_lock:
            folders = scan_repository(self.settings.model_repository).get(name)
            if (
                folders is not None
                and name in self.models
                and self._fingerprints.get(name) == await asyncio.to_thread(fingerprint, folders)
            ):
                self.metrics.model_reloads.labels(name, "unchanged").inc()
                self.failures.pop(name, None)  # the files are back to what is served
                log.debug("reload of %s: files unchanged since the last load, nothing to do", name)
                return ReloadResult(name, tuple(self._summaries(name)), (), ())
            try:
                result = await self._reload_one(name)
            except TeacherError:
                self.metrics.model_reloads.labels(
                    name if name in self.models else "unknown", "error"
                ).inc()
                raise
            self.metrics.model_reloads.labels(name, "ok").inc()
            for other, served in list(self.models.items()):
                members = {m for v in served.versions.values() for m in v.loaded.config.members}
                if name in members:
                    await self._reload_one(other)
            return result

    async def _reload_one(self, name: str) -> ReloadResult:
        folders = scan_repository(self.settings.model_repository).get(name)
        if folders is None:
            raise NotFound(f"model: the repository has no folder {name!r} (to reload)", "model")
        log.info("reload of %s: started", name)
        try:
            seen = await asyncio.to_thread(fingerprint, folders)
            versions = await asyncio.to_thread(self._load_model, name, folders)
        except Exception as error:  # a user architecture may raise anything: report, keep serving
            self.failures[name] = str(error)
            log.error("reload of %s failed, old versions keep serving: %s", name, error)
            raise FailedPrecondition(
                f"model: reload of {name!r} failed: {error}", "model"
            ) from None
        old = self.models.get(name, ServedModel()).versions
        added = [v for v in versions if v not in old]
        removed = [v for v in old if v not in versions]
        for version in added:
            if self._started:
                versions[version].batcher.start()
        # The swap is one assignment: a request resolves its version before any await.
        self.models[name] = ServedModel(versions, default=next(reversed(versions)))
        self._fingerprints[name] = seen
        self.failures.pop(name, None)
        for version in removed:
            task = asyncio.create_task(old[version].batcher.drain(), name=f"drain {version[:19]}")
            self._draining.add(task)
            task.add_done_callback(self._draining.discard)
        log.info("reloaded %s: loaded %s, unloading %s", name, added or "none", removed or "none")
        return ReloadResult(name, tuple(self._summaries(name)), tuple(added), tuple(removed))

    def _signature(self) -> dict[str, tuple[tuple[str, int, int], ...]]:
        """A cheap fingerprint of the repository (paths, sizes, mtimes) for polling."""
        return {
            name: fingerprint(folders)
            for name, folders in scan_repository(self.settings.model_repository).items()
        }

    async def _poll(self) -> None:
        seen = await asyncio.to_thread(self._signature)
        while True:
            await asyncio.sleep(self.settings.repository_poll_s)
            now = await asyncio.to_thread(self._signature)
            for name in sorted(set(now) | set(seen)):
                if now.get(name) != seen.get(name) and name in now:
                    try:
                        await self.reload(name)
                    except (NotFound, FailedPrecondition) as error:
                        log.error("poll: %s", error.message)
            seen = now

    # ---- queries -------------------------------------------------------------------------

    def _queue_depths(self) -> dict[str, int]:
        return {
            name: sum(v.batcher.queue_depth for v in served.versions.values())
            for name, served in self.models.items()
        }

    def _queued_rows(self) -> dict[str, dict[str, int]]:
        """Model -> client -> rows waiting, over every served version (metrics)."""
        queued: dict[str, dict[str, int]] = {}
        for name, served in self.models.items():
            totals = queued.setdefault(name, {})
            for version in served.versions.values():
                for client, rows in version.batcher.queued_rows_by_client().items():
                    totals[client] = totals.get(client, 0) + rows
        return queued

    def _summaries(self, name: str) -> list[VersionSummary]:
        served = self.models.get(name)
        if served is None:
            return [VersionSummary(name, "", False, error=self.failures.get(name, ""))]
        return [
            VersionSummary(
                name,
                version,
                self.ready,
                version == served.default,
                self.failures.get(name, ""),
                item.loaded.label,
            )
            for version, item in served.versions.items()
        ]

    def list_models(self) -> list[VersionSummary]:
        """Every served version of every model, and the folders that failed to load."""
        names = sorted(set(self.models) | set(self.failures))
        return [summary for name in names for summary in self._summaries(name)]

    def model_info(self, name: str, model_version: str = "") -> ModelInfo:
        return self._resolve(name, model_version).info

    def _resolve(self, name: str, model_version: str) -> ServedVersion:
        served = self.models.get(name)
        if served is None:
            if name in self.failures:
                raise Unavailable(f"model: {name!r} failed to load: {self.failures[name]}", "model")
            raise NotFound(
                f"model: no model named {name!r}; serving {sorted(self.models)}", "model"
            )
        if not model_version:
            return served.versions[served.default]
        if model_version not in served.versions:
            raise FailedPrecondition(
                f"model_version: pinned {model_version!r} but model {name!r} is serving "
                f"{sorted(served.versions)}",
                "model_version",
            )
        return served.versions[model_version]

    def tokenizer_file(self, name: str, model_version: str = "") -> tuple[TokenizerInfo, bytes]:
        """The tokenizer a sequence model's ids come from, and its file's bytes (as checked
        against config.json's sha256 at load). Raises `NotFound` / `FailedPrecondition` as
        `model_info` does, and `FailedPrecondition` for a model without a tokenizer."""
        served = self._resolve(name, model_version)
        if served.info.tokenizer is None:
            raise FailedPrecondition(
                f"model: {name!r} has no tokenizer (input kind {served.info.input_kind!r})",
                "model",
            )
        return served.info.tokenizer, served.tokenizer_bytes

    async def soft_targets(
        self, request: SoftTargetsRequest, timeout: float | None = None, transport: str = "grpc"
    ) -> SoftTargets:
        """Validate, batch with other requests, forward, and return this request's soft targets.
        `timeout` (seconds, e.g. the client's gRPC deadline) is capped by `request_timeout_s`."""
        started = time.perf_counter()
        stamps = current()  # None unless stage timing is on
        # Label by model only for served names: a bad client must not grow the label set.
        model = request.model if request.model in self.models else "unknown"
        try:
            if not self.ready:
                raise Unavailable("server is not ready (starting or shutting down)")
            served = self._resolve(request.model, request.model_version)
            limit = self.settings.request_timeout_s
            timeout = limit if timeout is None else max(0.0, min(timeout, limit))
            validated = validate(request, served.info)
            if stamps is not None:
                stamps.batch_size = validated.batch_size
                stamps.mark("validated")
            result = await served.batcher.submit(validated, timeout)
        except TeacherError as error:
            self.metrics.record_request(transport, model, error.code, time.perf_counter() - started)
            raise
        if stamps is not None:
            stamps.mark("woken")
        self.metrics.record_request(
            transport, model, "OK", time.perf_counter() - started, validated.tasks
        )
        if stamps is not None:
            stamps.mark("recorded")
        return result
