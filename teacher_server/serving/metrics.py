"""Prometheus metrics of one teacher process, served at HTTP `GET /metrics`.

Operations: requests by transport, model and status; soft targets returned per task; queue depth;
requests and samples per forward; forward and end-to-end latency; bytes in and out; model loads
and reloads. Per client (see `teacher_server.serving.clients`): rows queued, rows served and the
wait before the forward, and requests refused at the client's cap, labelled by client name with
the label set bounded (`ClientLabels`). Distillation telemetry no inference server has: per task, histograms of the teacher's
entropy (nats) at the requested temperature and of its top-1 probability, one observation per
sample, so an operator sees what the students are being taught.

Each `Metrics` has its own registry (no process-global state), so tests can start many.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999)
ENTROPY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0)
PENDING_ROWS = 4096  # distributions' rows gathered before they are counted (or at a scrape)


class BulkHistogram(Collector):
    """A labelled histogram that takes a whole array of observations at once (numpy bucket
    counting), for per-sample telemetry without a Python call per sample. Thread-safe."""

    def __init__(
        self, name: str, documentation: str, labels: Sequence[str], buckets: Sequence[float]
    ):
        self.name, self.documentation, self.labels = name, documentation, tuple(labels)
        self.edges = np.asarray(buckets, dtype=np.float64)
        self._series: dict[tuple[str, ...], tuple[np.ndarray, float]] = {}
        self._lock = threading.Lock()

    def observe_many(self, label_values: Sequence[str], values: np.ndarray) -> None:
        # counts[i] = observations <= edges[i]; the last slot holds everything (+Inf)
        index = np.searchsorted(self.edges, values, side="left")
        counts = np.bincount(index, minlength=len(self.edges) + 1)
        with self._lock:
            key = tuple(label_values)
            previous, total = self._series.get(key, (np.zeros(len(self.edges) + 1, np.int64), 0.0))
            self._series[key] = (previous + counts, total + float(values.sum()))

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        with self._lock:
            series = dict(self._series)
        for key, (counts, total) in sorted(series.items()):
            cumulative = np.cumsum(counts)
            buckets = [
                (_bound(e), float(c)) for e, c in zip(self.edges, cumulative[:-1], strict=True)
            ]
            family.add_metric(list(key), [*buckets, ("+Inf", float(cumulative[-1]))], total)
        yield family


def _bound(edge: float) -> str:
    return repr(float(edge))


class _QueueDepth(Collector):
    def __init__(self, depths: Callable[[], dict[str, int]]) -> None:
        self._depths = depths

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "teacher_queue_depth", "Requests waiting for a forward, per model.", labels=["model"]
        )
        for model, depth in sorted(self._depths().items()):
            family.add_metric([model], depth)
        yield family


OTHER_CLIENTS = "other"


class ClientLabels:
    """Client name -> its metrics label, with a bounded label set: clients named in the tokens
    file keep their names (the operator controls how many there are); of the others (peer
    addresses), the first `limit` seen keep theirs and every later one is counted as `other`.
    Thread-safe."""

    def __init__(self, limit: int, named: Iterable[str] = ()) -> None:
        self.limit = limit
        self._named = set(named)
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def name(self, clients: Iterable[str]) -> None:
        """Give these clients their own label whatever the limit (the tokens file's names)."""
        with self._lock:
            self._named.update(clients)

    def __call__(self, client: str) -> str:
        if client in self._named or client in self._seen:
            return client
        with self._lock:
            if len(self._seen) < self.limit:
                self._seen.add(client)
                return client
        return OTHER_CLIENTS


class _ClientQueuedRows(Collector):
    def __init__(
        self, queued: Callable[[], dict[str, dict[str, int]]], labels: ClientLabels
    ) -> None:
        self._queued, self._labels = queued, labels

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "teacher_client_queued_rows",
            "Rows waiting for a forward, per model and client.",
            labels=["model", "client"],
        )
        for model, clients in sorted(self._queued().items()):
            totals: dict[str, int] = {}
            for client, rows in clients.items():
                label = self._labels(client)
                totals[label] = totals.get(label, 0) + rows
            for label, rows in sorted(totals.items()):
                family.add_metric([model, label], rows)
        yield family


class Metrics:
    def __init__(self, max_client_labels: int = 16, named_clients: Iterable[str] = ()) -> None:
        """`max_client_labels`: anonymous clients with their own label (see `ClientLabels`);
        `named_clients`: the tokens file's client names, always labelled."""
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.client_labels = ClientLabels(max_client_labels, named_clients)
        # distributions waiting to be counted (see observe_distribution)
        self._pending: list[tuple[str, str, np.ndarray]] = []
        self._pending_rows = 0
        self._pending_lock = threading.Lock()
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "teacher_requests",
            "Soft-target requests answered, by transport, model and status.",
            ["transport", "model", "status"],
            registry=r,
        )
        self.task_outputs = Counter(
            "teacher_task_outputs",
            "Task outputs returned (one per task per request).",
            ["transport", "model", "task"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "teacher_request_seconds",
            "End-to-end latency of a soft-target request in the server.",
            ["transport", "model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.bytes_received = Counter(
            "teacher_bytes_received", "Request payload bytes.", ["transport"], registry=r
        )
        self.bytes_sent = Counter(
            "teacher_bytes_sent", "Response payload bytes.", ["transport"], registry=r
        )
        self.batch_requests = Histogram(
            "teacher_batch_requests",
            "Requests merged into one forward.",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batch_samples = Histogram(
            "teacher_batch_samples",
            "Samples in one forward.",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.forward_seconds = Histogram(
            "teacher_forward_seconds",
            "Time of one merged forward (and post-processing).",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.model_loads = Counter(
            "teacher_model_loads",
            "Model version loads, by result.",
            ["model", "result"],
            registry=r,
        )
        self.model_reloads = Counter(
            "teacher_model_reloads",
            "Reloads requested, by result.",
            ["model", "result"],
            registry=r,
        )
        self.entropy = BulkHistogram(
            "teacher_soft_target_entropy_nats",
            "Entropy of the teacher's distribution at the requested temperature, per sample.",
            ["model", "task"],
            ENTROPY_BUCKETS,
        )
        self.confidence = BulkHistogram(
            "teacher_soft_target_top1_probability",
            "The teacher's top-1 probability at the requested temperature, per sample.",
            ["model", "task"],
            CONFIDENCE_BUCKETS,
        )
        self.client_served_rows = Counter(
            "teacher_client_served_rows",
            "Rows taken into a forward, per model and client.",
            ["model", "client"],
            registry=r,
        )
        self.client_wait_seconds = Histogram(
            "teacher_client_wait_seconds",
            "Time a request waited in the queue before its forward, per model and client.",
            ["model", "client"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.client_refused = Counter(
            "teacher_client_refused",
            "Requests refused because the client was over its cap of queued rows.",
            ["model", "client"],
            registry=r,
        )
        r.register(self.entropy)
        r.register(self.confidence)

    def watch_queues(self, depths: Callable[[], dict[str, int]]) -> None:
        self.registry.register(_QueueDepth(depths))

    def watch_client_queues(self, queued: Callable[[], dict[str, dict[str, int]]]) -> None:
        """`queued()`: model -> client name -> rows waiting, read at each scrape."""
        self.registry.register(_ClientQueuedRows(queued, self.client_labels))

    def observe_served(self, model: str, client: str, rows: int, waited: float) -> None:
        label = self.client_labels(client)
        self._child(self.client_served_rows, model, label).inc(rows)
        self._child(self.client_wait_seconds, model, label).observe(waited)

    def observe_refused(self, model: str, client: str) -> None:
        self._child(self.client_refused, model, self.client_labels(client)).inc()

    def observe_forward(self, model: str, requests: int, samples: int, seconds: float) -> None:
        self.batch_requests.labels(model).observe(requests)
        self.batch_samples.labels(model).observe(samples)
        self.forward_seconds.labels(model).observe(seconds)

    def observe_distribution(self, model: str, task: str, probs: np.ndarray) -> None:
        """Per-sample entropy (nats) and top-1 probability of `probs` (batch, classes), counted
        later: the array is kept (not copied: the caller must not change it) and the histograms
        are computed for many requests at once when `PENDING_ROWS` rows have gathered or at the
        next scrape, off the request's path (a dozen numpy calls per task per request, most of a
        small request's telemetry cost). Thread-safe."""
        with self._pending_lock:
            self._pending.append((model, task, probs))
            self._pending_rows += len(probs)
            full = self._pending_rows >= PENDING_ROWS
        if full:
            self.flush_distributions()

    def flush_distributions(self) -> None:
        """Count every pending distribution into the entropy and confidence histograms."""
        with self._pending_lock:
            pending, self._pending, self._pending_rows = self._pending, [], 0
        groups: dict[tuple[str, str, int], list[np.ndarray]] = {}
        for model, task, probs in pending:
            groups.setdefault((model, task, probs.shape[1]), []).append(probs)
        for (model, task, _), arrays in groups.items():
            probs = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
            safe = np.clip(probs, 1e-300, 1.0)
            entropy = -(probs * np.log(safe)).sum(axis=1)
            self.entropy.observe_many((model, task), np.maximum(entropy, 0.0))
            self.confidence.observe_many((model, task), probs.max(axis=1))

    def _child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, memoised: a few dict look-ups per request instead of
        prometheus_client's label checks and lock (seven children per soft-target request)."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children.setdefault(key, metric.labels(*labels))
        return child

    def record_request(
        self,
        transport: str,
        model: str,
        status: str,
        seconds: float,
        tasks: Sequence[str] = (),
    ) -> None:
        self._child(self.requests, transport, model, status).inc()
        self._child(self.request_seconds, transport, model).observe(seconds)
        for task in tasks:
            self._child(self.task_outputs, transport, model, task).inc()

    def record_bytes(self, transport: str, received: int, sent: int) -> None:
        self._child(self.bytes_received, transport).inc(received)
        self._child(self.bytes_sent, transport).inc(sent)

    def exposition(self) -> bytes:
        self.flush_distributions()
        return generate_latest(self.registry)
