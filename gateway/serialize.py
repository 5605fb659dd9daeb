"""JSON rendering of ledger rows for the operator API: work items, steps, waits, events,
workers.

Datetimes become ISO 8601 strings with their UTC offset. Imports only :mod:`ledger`.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from ledger.schema import Event, Step, Wait, Work, WorkerRow

WORK_FIELDS = (
    "id",
    "agent",
    "state",
    "input",
    "result",
    "error",
    "attempt",
    "max_attempts",
    "priority",
    "created_at",
    "updated_at",
    "finished_at",
    "parent_id",
    "conversation_id",
    "source",
    "source_event_id",
    "lease_owner",
    "lease_epoch",
    "lease_expires_at",
    "last_heartbeat_at",
    "not_before",
    "wait_reason",
    "control",
    "state_reason",
)
SUMMARY_FIELDS = (
    "id",
    "agent",
    "state",
    "state_reason",
    "attempt",
    "created_at",
    "updated_at",
    "finished_at",
)
STEP_FIELDS = (
    "seq",
    "name",
    "status",
    "attempt",
    "output",
    "error",
    "error_type",
    "idempotency_key",
    "started_at",
    "finished_at",
    "last_heartbeat_at",
    "progress",
)
#: a wait as the API shows it; never its resume-URL token (a credential)
WAIT_FIELDS = (
    "id",
    "work_id",
    "step_seq",
    "kind",
    "name",
    "key",
    "prompt",
    "payload_schema",
    "channel",
    "conversation_id",
    "deadline",
    "on_timeout",
    "state",
    "resolution",
    "resolved_by",
    "resolved_at",
    "escalated_at",
    "created_at",
)
EVENT_FIELDS = ("id", "type", "data", "actor", "created_at")
WORKER_FIELDS = (
    "id",
    "host",
    "pid",
    "concurrency",
    "state",
    "started_at",
    "last_seen_at",
    "stopped_at",
)


def iso(value: datetime | None) -> str | None:
    """ISO 8601 with offset; a naive value (never expected) is taken as UTC."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.isoformat()


def _pick(obj: Any, fields: Iterable[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in fields:
        value = getattr(obj, name)
        out[name] = iso(value) if isinstance(value, datetime) else value
    return out


def work_json(work: Work) -> dict[str, Any]:
    """A work item as the API shows it (list entries, action answers, the detail's head)."""
    return _pick(work, WORK_FIELDS)


def work_summary(work: Work) -> dict[str, Any]:
    """The short form used for a work item's children."""
    return _pick(work, SUMMARY_FIELDS)


def step_json(step: Step) -> dict[str, Any]:
    return _pick(step, STEP_FIELDS)


def wait_json(wait: Wait) -> dict[str, Any]:
    """A wait without its token."""
    return _pick(wait, WAIT_FIELDS)


def event_json(event: Event) -> dict[str, Any]:
    return _pick(event, EVENT_FIELDS)


def worker_json(worker: WorkerRow) -> dict[str, Any]:
    return _pick(worker, WORKER_FIELDS)


def work_detail(
    work: Work,
    *,
    steps: Iterable[Step],
    waits: Iterable[dict[str, Any]],
    events: Iterable[Event],
    children: Iterable[Work],
) -> dict[str, Any]:
    """The detail view: the work item with its steps, waits, events and children."""
    return {
        **work_json(work),
        "steps": [step_json(s) for s in steps],
        "waits": list(waits),
        "events": [event_json(e) for e in events],
        "children": [work_summary(c) for c in children],
    }
