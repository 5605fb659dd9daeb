"""Retry policies: how often a step (or a whole work item) is tried, and how long to wait."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter.

    ``max_attempts`` counts the first try. The delay before attempt ``n + 1`` is
    ``min(initial_delay * backoff ** (n - 1), max_delay)``, spread by ±``jitter`` (a fraction).
    Exceptions in ``no_retry_on`` fail at once; others are retried while attempts remain.
    """

    max_attempts: int = 3
    initial_delay: float = 0.2
    backoff: float = 2.0
    max_delay: float = 60.0
    jitter: float = 0.2
    no_retry_on: tuple[type[BaseException], ...] = ()

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("RetryPolicy.max_attempts must be at least 1")
        if self.initial_delay < 0 or self.max_delay < 0 or self.backoff < 1:
            raise ValueError("RetryPolicy delays must be >= 0 and backoff >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("RetryPolicy.jitter is a fraction between 0 and 1")

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1-based)."""
        base = min(self.initial_delay * self.backoff ** max(attempt - 1, 0), self.max_delay)
        if self.jitter:
            base *= 1 + random.uniform(-self.jitter, self.jitter)
        return max(base, 0.0)

    def should_retry(self, attempt: int, exc: BaseException) -> bool:
        return attempt < self.max_attempts and not isinstance(exc, self.no_retry_on)


#: Steps: three tries, 0.2 s then 0.4 s apart.
DEFAULT_STEP_RETRY = RetryPolicy()
#: Whole work items: an exception that escapes the agent fails the work (steps already retried).
NO_RETRY = RetryPolicy(max_attempts=1)
