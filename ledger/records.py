"""Plain values the ledger hands out: a worker's claim on a work item and a recorded step.

Imports nothing of Tether's.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any


def utcnow() -> datetime:
    """The current time, timezone-aware UTC (the only clock the ledger uses)."""
    return datetime.now(UTC)


def new_id() -> str:
    """A 28-character id that sorts by creation time (ms) and cannot be guessed."""
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(8)}"


@dataclass(slots=True)
class Claim:
    """A worker's lease on one work item; every write the worker makes carries its epoch."""

    work_id: str
    agent: str
    input: Any
    attempt: int
    max_attempts: int
    epoch: int
    owner: str
    parent_id: str | None = None
    conversation_id: str | None = None
    control: str | None = None
    #: the item's first claim ever, and not a restarted copy: it has no recorded steps
    fresh: bool = False


@dataclass(slots=True, frozen=True)
class StepRecord:
    """A step as recorded: replay returns ``output`` for a succeeded step."""

    seq: int
    name: str
    status: str
    attempt: int
    output: Any = None
    error: Any = None


@dataclass(slots=True, frozen=True)
class StepWrite:
    """What a worker writes for one step attempt."""

    seq: int
    name: str
    attempt: int
    idempotency_key: str
    started_at: datetime
    status: str = "running"
    output: Any = None
    error: Any = None
    error_type: str | None = None
    finished_at: datetime | None = None
    progress: Any = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: when the worker made it durable: ``sync``, ``batched`` or ``exit``
    durability: str = "sync"
