"""When and how long the client retries: exponential backoff with full jitter, bounded in time.

Retried: `Unavailable` (teacher down, connection reset, stream broken), `ResourceExhausted` from an
overloaded queue, and `DeadlineExceeded` (every soft-target request is idempotent: asking twice
gives the same answer). Never retried: `InvalidArgument`, `NotFound`, `FailedPrecondition`,
`Unauthenticated`, `PermissionDenied`, `Internal`, and a message too large for the server
(`ResourceExhausted` with field `body`), which no retry can fix.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from protocol.errors import DeadlineExceeded, ResourceExhausted, TeacherError, Unavailable

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff before attempt n (n >= 1) is uniform in [0, min(max_backoff_s, initial_backoff_s *
    multiplier**(n-1))]; retrying stops once `max_elapsed_s` have passed since the first failure.
    `RetryPolicy(max_elapsed_s=0)` disables retries."""

    max_elapsed_s: float = 60.0
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    multiplier: float = 2.0

    def backoff(self, attempt: int) -> float:
        ceiling = min(
            self.max_backoff_s, self.initial_backoff_s * self.multiplier ** max(attempt - 1, 0)
        )
        return random.uniform(0.0, ceiling)


DEFAULT_RETRY = RetryPolicy()
NO_RETRY = RetryPolicy(max_elapsed_s=0.0)


def is_retryable(error: BaseException) -> bool:
    if isinstance(error, ResourceExhausted):
        return error.field != "body"
    return isinstance(error, (Unavailable, DeadlineExceeded))


class RetryBudget:
    """Tracks one run of consecutive failures: `failed(error)` sleeps the next backoff (or
    `next_delay(error)` returns it), or raises `error` when it cannot be retried or the time is
    up; `succeeded()` starts a fresh run."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self._first_failure: float | None = None
        self._attempt = 0

    def succeeded(self) -> None:
        self._first_failure, self._attempt = None, 0

    def next_delay(self, error: TeacherError) -> float:
        """Count a failure and return the backoff before the retry, or raise `error` when it
        cannot be retried or the time is up (without sleeping: see `failed`)."""
        now = time.monotonic()
        if self._first_failure is None:
            self._first_failure = now
        self._attempt += 1
        if not is_retryable(error) or now - self._first_failure >= self.policy.max_elapsed_s:
            raise error
        return self.policy.backoff(self._attempt)

    def failed(self, error: TeacherError) -> None:
        time.sleep(self.next_delay(error))


def call_with_retries(policy: RetryPolicy, call: Callable[[], T]) -> T:
    """`call()`, retried on retryable `TeacherError`s as the policy allows."""
    budget = RetryBudget(policy)
    while True:
        try:
            return call()
        except TeacherError as error:
            budget.failed(error)
