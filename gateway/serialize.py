"""JSON rendering of ledger rows for the operator API: work items, steps, waits, events,
workers, conversation messages and outbound messages.

Datetimes become ISO 8601 strings with their UTC offset. Imports only :mod:`ledger`.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from ledger.schema import Event, Outbox, Step, Wait, Work, WorkerRow
from ledger.usage import UsageTotals

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
    # when the record became durable: sync, batched or exit, and the commit's time
    "durability",
    "committed_at",
    # model calls (null for other steps)
    "model",
    "model_answered",
    "prompt_fingerprint",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "cost",
    "finish_reason",
    "latency_ms",
    "tool_calls",
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

OUTBOX_FIELDS = (
    "id",
    "work_id",
    "step_seq",
    "conversation_id",
    "channel",
    "payload",
    "state",
    "attempts",
    "next_attempt_at",
    "external_id",
    "error",
    "created_at",
    "sent_at",
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


def worker_json(worker: WorkerRow, *, leases_held: int | None = None) -> dict[str, Any]:
    """A worker; with ``leases_held``, the number of running items it holds a lease on."""
    out = _pick(worker, WORKER_FIELDS)
    if leases_held is not None:
        out["leases_held"] = leases_held
    return out


def outbox_json(message: Outbox) -> dict[str, Any]:
    """An outbound message and its delivery state."""
    return _pick(message, OUTBOX_FIELDS)


def message_json(message: dict[str, Any]) -> dict[str, Any]:
    """One message of a conversation (from ``Ledger.list_messages``): both directions have the
    same keys; ``state`` and ``outbox_id`` are the delivery of an outbound one (None inbound),
    ``disposition`` what an inbound one became (None outbound)."""
    return {
        "id": message["id"],
        "direction": message["direction"],
        "text": message["text"],
        "created_at": iso(message["created_at"]),
        "work_id": message.get("work_id"),
        "wait_id": message.get("wait_id"),
        "actions": message.get("actions"),
        "disposition": message.get("disposition"),
        "outbox_id": message.get("outbox_id"),
        "state": message.get("state"),
    }


def last_checkpoint(steps: Iterable[Step]) -> dict[str, Any] | None:
    """The last succeeded step (highest seq): where a resumed run picks up."""
    done = [s for s in steps if s.status == "succeeded"]
    if not done:
        return None
    last = max(done, key=lambda s: s.seq)
    return {"seq": last.seq, "name": last.name, "finished_at": iso(last.finished_at)}


def usage_json(totals: UsageTotals | None) -> dict[str, Any]:
    """Model-call totals: ``{calls, input_tokens, output_tokens, total_tokens, cost,
    unpriced_calls}`` (cost in USD over the priced calls)."""
    return (totals or UsageTotals()).as_json()


def usage_list_json(
    by: str, groups: Iterable[tuple[str | None, UsageTotals]], total: UsageTotals
) -> dict[str, Any]:
    """``GET /api/v1/usage``: one entry per group (``key`` is the agent, model, conversation
    or work id), the most expensive first, and the total over all of them."""
    return {
        "by": by,
        "items": [{"key": key, **usage_json(t)} for key, t in groups],
        "total": usage_json(total),
    }


def work_detail(
    work: Work,
    *,
    steps: Iterable[Step],
    waits: Iterable[dict[str, Any]],
    events: Iterable[Event],
    children: Iterable[Work],
    current_wait: Wait | None = None,
    messages: Iterable[dict[str, Any]] = (),
    usage: UsageTotals | None = None,
) -> dict[str, Any]:
    """The detail view: the work item with its steps, the last checkpoint, its waits (and
    the pending one), events, children, its conversation's messages and its model usage."""
    steps = list(steps)
    return {
        **work_json(work),
        "current_wait": wait_json(current_wait) if current_wait is not None else None,
        "last_checkpoint": last_checkpoint(steps),
        "steps": [step_json(s) for s in steps],
        "waits": list(waits),
        "events": [event_json(e) for e in events],
        "children": [work_summary(c) for c in children],
        "messages": [message_json(m) for m in messages],
        "usage": usage_json(usage),
    }
