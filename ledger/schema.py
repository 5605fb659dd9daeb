"""SQLModel tables of the work ledger.

The tables are the storage contract; :mod:`ledger.ledger` holds every statement that reads or
writes them, and the Alembic migrations in ``ledger/migrations`` create them. Timestamps are
timezone-aware UTC. Imports nothing of Tether's.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, SQLModel

#: JSON on SQLite, JSONB on PostgreSQL.
JSONType = sa.JSON().with_variant(JSONB(), "postgresql")


def _json(nullable: bool = True) -> Any:
    return Field(default=None, sa_type=JSONType, nullable=nullable)


class Work(SQLModel, table=True):
    """One unit of work: what exists right now."""

    __tablename__ = "work"
    __table_args__ = (
        sa.UniqueConstraint("source", "source_event_id", name="uq_work_source_event"),
        sa.Index("ix_work_lease", "state", "lease_expires_at"),
        sa.Index("ix_work_owner", "lease_owner"),
        sa.Index("ix_work_parent", "parent_id"),
        sa.Index("ix_work_conversation", "conversation_id", "created_at"),
        sa.Index("ix_work_updated", "state", "updated_at"),
    )

    id: str = Field(primary_key=True, max_length=40)
    agent: str = Field(max_length=200)
    state: str = Field(max_length=16)
    input: Any = _json()
    result: Any = _json()
    error: Any = _json()
    attempt: int = 1
    max_attempts: int = 5
    source: str | None = Field(default=None, max_length=200)
    source_event_id: str | None = Field(default=None, max_length=400)
    conversation_id: str | None = Field(default=None, max_length=40)
    parent_id: str | None = Field(default=None, max_length=40)
    priority: int = 0
    lease_owner: str | None = Field(default=None, max_length=80)
    lease_epoch: int = 0
    lease_expires_at: datetime | None = None
    last_heartbeat_at: datetime | None = None
    not_before: datetime | None = None
    wait_reason: str | None = None
    paused_from: str | None = Field(default=None, max_length=16)
    control: str | None = Field(default=None, max_length=16)
    #: why the item entered its current state: the type of the event its last transition wrote
    state_reason: str = Field(default="created", max_length=40)
    #: details of the last transition (actor, comment, error summary), copied into its event
    state_detail: Any = _json()
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None = None


class Step(SQLModel, table=True):
    """One checkpointed step of a work item: what already happened."""

    __tablename__ = "step"

    work_id: str = Field(primary_key=True, foreign_key="work.id", ondelete="CASCADE")
    seq: int = Field(primary_key=True)
    name: str = Field(max_length=200)
    status: str = Field(max_length=16)
    attempt: int = 1
    output: Any = _json()
    error: Any = _json()
    error_type: str | None = Field(default=None, max_length=200)
    idempotency_key: str = Field(max_length=80)
    started_at: datetime
    finished_at: datetime | None = None
    last_heartbeat_at: datetime | None = None
    progress: Any = _json()
    # model-call metadata (filled by model steps)
    model: str | None = Field(default=None, max_length=200)
    prompt_fingerprint: str | None = Field(default=None, max_length=80)
    input_tokens: int | None = None
    output_tokens: int | None = None
    cost: float | None = None
    finish_reason: str | None = Field(default=None, max_length=40)
    #: the model the endpoint says answered (often a dated version of the one asked)
    model_answered: str | None = Field(default=None, max_length=200)
    total_tokens: int | None = None
    latency_ms: int | None = None
    #: the tool calls the model asked for: ``[{id, name, arguments}]`` (SQL NULL for steps
    #: that are no model call)
    tool_calls: Any = Field(
        default=None,
        sa_type=sa.JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql"),
        nullable=True,
    )
    #: the model's output is this step's recorded result (streamed partials never are)
    output_committed: bool | None = None
    #: how the worker made this record durable: ``sync``, ``batched`` or ``exit``
    durability: str | None = Field(default=None, max_length=8)
    #: when the transaction that recorded the finished attempt committed (about)
    committed_at: datetime | None = None


class Wait(SQLModel, table=True):
    """A durable wait: why nothing is happening right now."""

    __tablename__ = "wait"
    __table_args__ = (
        sa.UniqueConstraint("work_id", "step_seq", name="uq_wait_step"),
        sa.Index("ix_wait_pending_deadline", "state", "deadline"),
        sa.Index("ix_wait_signal_name", "kind", "name", "key", "state"),
        sa.Index("ix_wait_conversation", "conversation_id", "state"),
    )

    id: str = Field(primary_key=True, max_length=40)
    work_id: str = Field(foreign_key="work.id", ondelete="CASCADE", max_length=40)
    step_seq: int
    kind: str = Field(max_length=16)
    #: the signal's name (signals), or a label of the wait
    name: str | None = Field(default=None, max_length=200)
    key: str | None = Field(default=None, max_length=400)
    token: str | None = Field(default=None, max_length=80, unique=True)
    prompt: str | None = None
    payload_schema: Any = _json()
    channel: str | None = Field(default=None, max_length=40)
    conversation_id: str | None = Field(default=None, max_length=40)
    deadline: datetime | None = None
    on_timeout: str = Field(default="fail", max_length=16)
    state: str = Field(default="pending", max_length=16)
    resolution: Any = _json()
    resolved_by: str | None = Field(default=None, max_length=200)
    resolved_at: datetime | None = None
    escalated_at: datetime | None = None
    created_at: datetime


class Event(SQLModel, table=True):
    """Append-only history of every transition."""

    __tablename__ = "event"
    __table_args__ = (sa.Index("ix_event_work", "work_id", "id"),)

    id: int | None = Field(default=None, primary_key=True)
    work_id: str = Field(max_length=40)
    type: str = Field(max_length=40)
    data: Any = _json()
    actor: str | None = Field(default=None, max_length=200)
    created_at: datetime


class Conversation(SQLModel, table=True):
    """One chat: a channel, a chat id and a thread."""

    __tablename__ = "conversation"
    __table_args__ = (
        sa.UniqueConstraint("channel", "chat_id", "thread_id", name="uq_conversation_chat"),
    )

    id: str = Field(primary_key=True, max_length=40)
    channel: str = Field(max_length=40)
    chat_id: str = Field(max_length=200)
    thread_id: str = Field(default="", max_length=200)
    title: str | None = None
    created_at: datetime
    updated_at: datetime


class Inbox(SQLModel, table=True):
    """Inbound chat messages, as they arrived, and what became of each."""

    __tablename__ = "inbox"
    __table_args__ = (
        sa.UniqueConstraint("channel", "source_event_id", name="uq_inbox_source_event"),
        sa.Index("ix_inbox_conversation", "conversation_id", "id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    conversation_id: str = Field(max_length=40)
    channel: str = Field(max_length=40)
    source_event_id: str = Field(max_length=400)
    sender: str | None = Field(default=None, max_length=200)
    text: str
    payload: Any = _json()
    #: started | queued | resolved_wait | reasked | rejected | collected | interrupted
    disposition: str = Field(max_length=16)
    work_id: str | None = Field(default=None, max_length=40)
    wait_id: str | None = Field(default=None, max_length=40)
    created_at: datetime


class Outbox(SQLModel, table=True):
    """Outbound messages and their delivery state."""

    __tablename__ = "outbox"
    __table_args__ = (
        sa.UniqueConstraint("work_id", "step_seq", name="uq_outbox_step"),
        sa.Index("ix_outbox_state", "state", "next_attempt_at"),
        sa.Index("ix_outbox_conversation", "conversation_id", "id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    work_id: str | None = Field(default=None, max_length=40)
    step_seq: int | None = None
    conversation_id: str | None = Field(default=None, max_length=40)
    channel: str = Field(max_length=40)
    payload: Any = _json()
    state: str = Field(default="pending", max_length=16)
    attempts: int = 0
    next_attempt_at: datetime | None = None
    external_id: str | None = Field(default=None, max_length=200)
    error: str | None = None
    created_at: datetime
    sent_at: datetime | None = None


class WorkerRow(SQLModel, table=True):
    """A worker process and its liveness."""

    __tablename__ = "worker"

    id: str = Field(primary_key=True, max_length=80)
    host: str = Field(max_length=200)
    pid: int
    concurrency: int
    state: str = Field(default="running", max_length=16)
    started_at: datetime
    last_seen_at: datetime
    stopped_at: datetime | None = None


work_t: sa.Table = Work.__table__  # type: ignore[assignment]
# The claim's order (priority first, then oldest first), so a claim reads the few rows it takes
# instead of sorting every queued row.
sa.Index(
    "ix_work_claim",
    work_t.c.state,
    work_t.c.priority.desc(),
    work_t.c.created_at,
    work_t.c.id,
)
step_t: sa.Table = Step.__table__  # type: ignore[assignment]
wait_t: sa.Table = Wait.__table__  # type: ignore[assignment]
event_t: sa.Table = Event.__table__  # type: ignore[assignment]
conversation_t: sa.Table = Conversation.__table__  # type: ignore[assignment]
outbox_t: sa.Table = Outbox.__table__  # type: ignore[assignment]
inbox_t: sa.Table = Inbox.__table__  # type: ignore[assignment]
worker_t: sa.Table = WorkerRow.__table__  # type: ignore[assignment]

metadata = SQLModel.metadata


class ChannelState(SQLModel, table=True):
    """Per-channel cursors, such as Telegram's polling offset (the last committed update id)."""

    __tablename__ = "channel_state"

    channel: str = Field(primary_key=True, max_length=80)
    update_offset: int = Field(sa_type=sa.BigInteger)
    updated_at: datetime


channel_state_t: sa.Table = ChannelState.__table__  # type: ignore[assignment]
