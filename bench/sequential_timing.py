"""Closed-loop timing of one request in flight, shared by the load clients that run in the KServe
venv (`bench.kserve_client`, `bench.kserve_tritonclient`). Standard library and numpy only: those
clients must not import each other (KServe's and tritonclient's gRPC modules may not share a
process) nor the project's protocol package."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def time_sequential(
    call: Callable[[np.ndarray], Any], batches: list[np.ndarray], args: argparse.Namespace
) -> dict[str, Any]:
    """One request in flight: warm-up, then timed until `duration` (at least 3 calls)."""
    warm_end = time.perf_counter() + args.warmup
    for i in range(args.max_calls):
        call(batches[i % len(batches)])
        if time.perf_counter() >= warm_end and i >= 1:
            break
    latencies, samples = [], 0
    start = time.perf_counter()
    for i in range(args.max_calls):
        sent = time.perf_counter()
        call(batches[i % len(batches)])
        done = time.perf_counter()
        latencies.append(done - sent)
        samples += len(batches[0])
        if done - start >= args.duration and len(latencies) >= 3:
            break
    return {"latencies_s": latencies, "samples": samples, "seconds": time.perf_counter() - start}
