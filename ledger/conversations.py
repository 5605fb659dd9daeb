"""Conversations: inbound chat messages, what each becomes, and what agents reply.

One transaction takes an inbound message: it finds (or creates) the conversation, records the
message once (deduplicated on the channel's message id), and then either resolves the input
wait the conversation's work is waiting on, or applies the agent's ``on_busy`` policy, or
starts new work. Replies are outbox rows written together with the step that sends them, so a
replayed reply is never sent twice. An operator can send again, or give up on, an outbound
message whose delivery is in doubt (``unknown``) or stuck. Imported only by
:mod:`ledger.ledger`.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import jsonschema
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ledger._base import LedgerBase, W, check_lease
from ledger.errors import IllegalTransition, LedgerError
from ledger.prepared import Prepared
from ledger.records import Claim, StepWrite, new_id, utcnow
from ledger.schema import Outbox, conversation_t, event_t, inbox_t, outbox_t, wait_t, work_t
from ledger.states import WorkState

C = conversation_t.c
I = inbox_t.c  # noqa: E741
O = outbox_t.c  # noqa: E741

ON_BUSY = ("enqueue", "interrupt", "reject", "collect")
#: delivery states of an outbound message: ``unknown`` = sent, but whether it arrived is not
#: known (e.g. a timeout after the request left); ``abandoned`` = an operator gave up on it
OUTBOX_STATES = ("pending", "sending", "sent", "failed", "unknown", "abandoned")
#: outbox action -> (states it applies to, target state, event type)
OUTBOX_ACTIONS: dict[str, tuple[tuple[str, ...], str, str]] = {
    "resend": (("unknown",), "pending", "outbox_resent"),
    "abandon": (("unknown", "pending", "failed"), "abandoned", "outbox_abandoned"),
}
BUSY_REPLY = "I'm still working on your previous message; please send this again when I reply."


@dataclass(frozen=True, slots=True)
class Accepted:
    """What an inbound message became."""

    conversation_id: str
    inbox_id: int
    disposition: str
    work_id: str | None
    wait_id: str | None
    duplicate: bool


class OutboxNotFound(LedgerError):
    code = "not_found"

    def __init__(self, outbox_id: int) -> None:
        super().__init__(f"no outbound message with id {outbox_id}")
        self.outbox_id = outbox_id


class OutboxActionRefused(IllegalTransition):
    """The outbound message is not in a state the action applies to; nothing was written."""

    def __init__(self, outbox_id: int, current: str, action: str) -> None:
        sources = OUTBOX_ACTIONS[action][0]
        LedgerError.__init__(
            self,
            f"outbound message {outbox_id} is {current}; only a message that is "
            f"{' or '.join(sources)} can be {'re-sent' if action == 'resend' else 'abandoned'}",
        )
        self.work_id = ""
        self.current = current
        self.target = OUTBOX_ACTIONS[action][1]
        self.outbox_id = outbox_id


def _schema_hint(schema: Any) -> str:
    kind = schema.get("type") if isinstance(schema, dict) else None
    if kind in ("integer", "number"):
        return f"a{'n' if kind == 'integer' else ''} {kind}"
    if kind == "boolean":
        return "yes/no as true or false"
    if kind == "object":
        fields = ", ".join(schema.get("properties", {}))
        return f"JSON with the fields {fields}" if fields else "a JSON object"
    return "a valid answer"


def parse_reply(text: str, schema: Any) -> tuple[bool, Any, str]:
    """A chat reply as the value an input wait expects: ``(ok, value, hint)``."""
    candidates: list[Any] = []
    if not (isinstance(schema, dict) and schema.get("type") == "string"):
        with contextlib.suppress(ValueError):
            candidates.append(json.loads(text))
    candidates.append(text)
    for value in candidates:
        try:
            if schema is not None:
                jsonschema.validate(value, schema)
            return True, value, ""
        except jsonschema.ValidationError:
            continue
    return False, None, _schema_hint(schema)


_CHANNEL = Prepared(sa.select(C.channel).where(C.id == sa.bindparam("conv")))
_OUTBOX = Prepared(
    sa.insert(outbox_t)
    .values(
        work_id=sa.bindparam("work_id"),
        step_seq=sa.bindparam("step_seq"),
        conversation_id=sa.bindparam("conv"),
        channel=sa.bindparam("channel"),
        payload=sa.bindparam("payload", type_=outbox_t.c.payload.type),
        state=sa.bindparam("state"),
        attempts=0,
        created_at=sa.bindparam("now"),
        sent_at=sa.bindparam("sent_at", type_=outbox_t.c.sent_at.type),
    )
    .returning(O.id)
)


class _AcceptStatements:
    """The statements of :meth:`ConversationQueries.accept_message`, built once: taking a
    message is the gateway's hot path, and building and keying SQLAlchemy statements anew for
    every message cost more CPU than the database's own work."""

    def __init__(self, dialect: sa.Dialect, insert: Any) -> None:
        bp = sa.bindparam
        conv = insert(conversation_t).values(
            id=bp("new_conversation_id"),
            channel=bp("channel"),
            chat_id=bp("chat_id"),
            thread_id=bp("thread_id"),
            created_at=bp("now"),
            updated_at=bp("now"),
        )
        # Touching the row on conflict returns its id in the same statement, and on
        # PostgreSQL locks it: one message of a conversation at a time decides what happens.
        self.conversation = Prepared(
            conv.on_conflict_do_update(
                index_elements=["channel", "chat_id", "thread_id"],
                set_={"updated_at": conv.excluded.updated_at},
            ).returning(C.id),
            dialect,
        )
        inbox = (
            insert(inbox_t)
            .values(
                conversation_id=bp("conv"),
                channel=bp("channel"),
                source_event_id=bp("message_id"),
                sender=bp("sender"),
                text=bp("text"),
                payload=bp("payload", type_=inbox_t.c.payload.type),
                disposition="started",
                created_at=bp("now"),
            )
            .on_conflict_do_nothing(index_elements=["channel", "source_event_id"])
            .returning(I.id)
        )
        self.inbox = Prepared(inbox, dialect)
        self.duplicate = sa.select(inbox_t).where(
            I.channel == bp("channel"), I.source_event_id == bp("message_id")
        )
        self.settle = Prepared(
            sa.update(inbox_t)
            .where(I.id == bp("inbox_id"))
            .values(disposition=bp("disposition"), work_id=bp("work_id"), wait_id=bp("wait_id")),
            dialect,
        )
        wait = (
            sa.select(wait_t)
            .join(work_t, W.id == wait_t.c.work_id)
            .where(
                wait_t.c.conversation_id == bp("conv"),
                wait_t.c.kind == "input",
                wait_t.c.state == "pending",
            )
            .order_by(wait_t.c.created_at)
            .limit(1)
        )
        self.input_wait = Prepared(
            wait.with_for_update() if dialect.name == "postgresql" else wait, dialect
        )
        self.active = Prepared(
            sa.select(W.id, W.state, W.not_before, W.input)
            .where(
                W.conversation_id == bp("conv"),
                # two plain parameters: an IN list would be re-rendered per message
                sa.or_(W.state == WorkState.RUNNING.value, W.state == WorkState.QUEUED.value),
            )
            .order_by(W.created_at.desc()),
            dialect,
        )
        work = sa.insert(work_t).values(
            id=bp("work_id"),
            agent=bp("agent"),
            state=WorkState.QUEUED.value,
            input=bp("input", type_=work_t.c.input.type),
            attempt=1,
            max_attempts=5,
            source=bp("channel"),
            source_event_id=bp("message_id"),
            conversation_id=bp("conv"),
            priority=0,
            lease_epoch=0,
            not_before=bp("not_before", type_=W.not_before.type),
            state_reason="created",
            state_detail=bp("state_detail", type_=work_t.c.state_detail.type),
            created_at=bp("now"),
            updated_at=bp("now"),
        )
        self.work = Prepared(work, dialect)


class ConversationQueries(LedgerBase):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._accept = _AcceptStatements(self.engines.write_dialect, self._insert)

    def _conversation(self, conn: Connection, channel: str, chat_id: str, thread_id: str) -> str:
        """The conversation's id, created on first use (and its ``updated_at`` touched)."""
        return self._accept.conversation.scalar(
            conn,
            {
                "new_conversation_id": new_id(),
                "channel": channel,
                "chat_id": chat_id,
                "thread_id": thread_id,
                "now": utcnow(),
            },
        )

    async def accept_message(
        self,
        *,
        channel: str,
        chat_id: str,
        text: str,
        message_id: str,
        agent: str,
        thread_id: str = "",
        sender: str | None = None,
        payload: Any = None,
        on_busy: str = "enqueue",
        collect_window: float = 2.0,
    ) -> Accepted:
        """Take one inbound message durably (see the module docstring). A repeat of the same
        ``(channel, message_id)`` changes nothing and returns what the first one became."""
        if on_busy not in ON_BUSY:
            raise ValueError(f"on_busy must be one of {ON_BUSY}")
        resolve_row = self._resolve_row  # type: ignore[attr-defined]
        st = self._accept

        def tx(conn: Connection) -> tuple[Accepted, bool]:
            now = utcnow()
            conv = self._conversation(conn, channel, chat_id, thread_id)
            inserted = st.inbox.first(
                conn,
                {
                    "conv": conv,
                    "channel": channel,
                    "message_id": message_id,
                    "sender": sender,
                    "text": text,
                    "payload": payload,
                    "now": now,
                },
            )
            if inserted is None:
                row = conn.execute(
                    st.duplicate, {"channel": channel, "message_id": message_id}
                ).one()
                dup = Accepted(conv, row.id, row.disposition, row.work_id, row.wait_id, True)
                return dup, False
            inbox_id = inserted.id

            def settle(disposition: str, work_id: str | None, wait_id: str | None = None) -> Any:
                st.settle.run(
                    conn,
                    {
                        "inbox_id": inbox_id,
                        "disposition": disposition,
                        "work_id": work_id,
                        "wait_id": wait_id,
                    },
                )
                return Accepted(conv, inbox_id, disposition, work_id, wait_id, False)

            # 1. the conversation's work waits for input: this message is the answer
            wait = st.input_wait.first(conn, {"conv": conv})
            if wait is not None:
                ok, value, hint = parse_reply(text, wait.payload_schema)
                if not ok:
                    self._outbox(conn, conv, channel, wait.work_id, f"Please reply with {hint}.")
                    return settle("reasked", wait.work_id, wait.id), False
                resolve_row(conn, wait, {"input": value}, sender, now)
                return settle("resolved_wait", wait.work_id, wait.id), True

            # 2. busy: an item of this conversation runs or is queued
            active = st.active.run(conn, {"conv": conv})
            message = {
                "text": text,
                "sender": sender,
                "channel": channel,
                "chat_id": chat_id,
                "thread_id": thread_id,
                "message_id": message_id,
                "conversation_id": conv,
            }
            not_before: datetime | None = None
            if active and on_busy == "reject":
                self._outbox(conn, conv, channel, None, BUSY_REPLY)
                return settle("rejected", None), False
            if on_busy == "collect":
                window = now + timedelta(seconds=collect_window)
                gathering = [
                    a for a in active if a.state == "queued" and a.not_before and a.not_before > now
                ]
                if gathering:
                    target = gathering[0]
                    merged = dict(target.input or {})
                    merged["texts"] = [*merged.get("texts", [merged.get("text", "")]), text]
                    merged["text"] = "\n".join(merged["texts"])
                    conn.execute(sa.update(work_t).where(W.id == target.id).values(input=merged))
                    return settle("collected", target.id), False
                not_before = window
                message["texts"] = [text]
            if active and on_busy == "interrupt":
                conn.execute(
                    sa.update(work_t)
                    .where(W.conversation_id == conv, W.state == WorkState.RUNNING.value)
                    .values(
                        control="cancel",
                        state_reason="cancel_requested",
                        state_detail={"actor": "interrupted by a new message"},
                        updated_at=now,
                    )
                )
            work_id = new_id()
            st.work.run(
                conn,
                {
                    "work_id": work_id,
                    "agent": agent,
                    "input": message,
                    "channel": channel,
                    "message_id": message_id,
                    "conv": conv,
                    "not_before": not_before,
                    "state_detail": {"actor": sender} if sender else None,
                    "now": now,
                },
            )
            disposition = "queued" if active else "started"
            if active and on_busy == "interrupt":
                disposition = "interrupted"
            return settle(disposition, work_id), True

        accepted, wake = await self.engines.run_write(tx, urgent=True)
        if wake:
            self._fire(self._on_queued, agent)
        if accepted.disposition == "interrupted":
            self._fire(self._on_control, "")
        return accepted

    def _outbox(
        self,
        conn: Connection,
        conversation_id: str,
        channel: str,
        work_id: str | None,
        text: str,
        *,
        step_seq: int | None = None,
        extra: dict[str, Any] | None = None,
    ) -> int:
        """An outbound message. The HTTP channel is read by its clients, so it counts as sent."""
        now = utcnow()
        return _OUTBOX.scalar(
            conn,
            {
                "work_id": work_id,
                "step_seq": step_seq,
                "conv": conversation_id,
                "channel": channel,
                "payload": {"text": text, **(extra or {})},
                "state": "sent" if channel == "http" else "pending",
                "now": now,
                "sent_at": now if channel == "http" else None,
            },
        )

    async def record_reply(
        self, claim: Claim, seq: int, name: str, text: str, extra: dict[str, Any] | None = None
    ) -> int | None:
        """Queue an outbound message to the claim's conversation and record the step that
        sends it, in one fenced transaction. Returns the outbox id (``None`` for work that
        has no conversation: the text is kept in the step record only)."""
        record = self._record_finished  # type: ignore[attr-defined]
        params_for = self._step_params  # type: ignore[attr-defined]

        def tx(conn: Connection) -> int | None:
            check_lease(conn, claim)
            now = utcnow()
            outbox_id = None
            if claim.conversation_id is not None:  # work started by the API has nobody to tell
                channel = _CHANNEL.scalar(conn, {"conv": claim.conversation_id})
                outbox_id = self._outbox(
                    conn, claim.conversation_id, channel, claim.work_id, text, step_seq=seq,
                    extra=extra,
                )  # fmt: skip
            write = StepWrite(
                seq=seq,
                name=name,
                attempt=1,
                idempotency_key=f"{claim.work_id}:{seq}",
                started_at=now,
                status="succeeded",
                output={"outbox_id": outbox_id, "text": text},
                finished_at=now,
            )
            if record.first(conn, params_for(claim, write)) is None:
                check_lease(conn, claim)
            return outbox_id

        return await self.engines.run_write(tx)

    async def find_conversation(self, channel: str, chat_id: str, thread_id: str = "") -> Any:
        q = sa.select(conversation_t).where(
            C.channel == channel, C.chat_id == chat_id, C.thread_id == thread_id
        )
        async with self._read() as conn:
            return (await conn.execute(q)).first()

    async def list_messages(
        self, conversation_id: str, *, limit: int = 500
    ) -> list[dict[str, Any]]:
        """Both directions of a conversation in order: ``{id, direction, text, created_at,
        wait_id, work_id}`` with ``disposition`` (inbound) or ``actions``, ``outbox_id`` and
        the delivery ``state`` (outbound)."""
        ins = sa.select(inbox_t).where(I.conversation_id == conversation_id).order_by(I.id)
        outs = sa.select(outbox_t).where(O.conversation_id == conversation_id).order_by(O.id)
        async with self._read() as conn:
            rows_in = (await conn.execute(ins.limit(limit))).all()
            rows_out = (await conn.execute(outs.limit(limit))).all()
        messages = [
            {
                "id": f"in-{r.id}",
                "direction": "in",
                "text": r.text,
                "created_at": r.created_at,
                "work_id": r.work_id,
                "wait_id": r.wait_id,
                "disposition": r.disposition,
            }
            for r in rows_in
        ] + [
            {
                "id": f"out-{r.id}",
                "direction": "out",
                "text": (r.payload or {}).get("text", ""),
                "created_at": r.created_at,
                "work_id": r.work_id,
                "wait_id": (r.payload or {}).get("wait_id"),
                "actions": (r.payload or {}).get("actions"),
                "outbox_id": r.id,
                "state": r.state,
            }
            for r in rows_out
        ]
        messages.sort(key=lambda m: (m["created_at"], m["id"]))
        return messages[-limit:]

    # -- the outbox, for operators ------------------------------------------------------------

    async def get_outbox(self, outbox_id: int) -> Outbox:
        async with self._read() as conn:
            row = (await conn.execute(sa.select(outbox_t).where(O.id == outbox_id))).first()
        if row is None:
            raise OutboxNotFound(outbox_id)
        return Outbox(**row._mapping)

    async def list_outbox(
        self,
        *,
        state: str | None = None,
        work_id: str | None = None,
        conversation_id: str | None = None,
        limit: int = 100,
    ) -> list[Outbox]:
        """Outbound messages, newest first."""
        q = sa.select(outbox_t).order_by(O.id.desc()).limit(limit)
        if state is not None:
            q = q.where(O.state == state)
        if work_id is not None:
            q = q.where(O.work_id == work_id)
        if conversation_id is not None:
            q = q.where(O.conversation_id == conversation_id)
        async with self._read() as conn:
            return [Outbox(**r._mapping) for r in await conn.execute(q)]

    async def resend_outbox(self, outbox_id: int, actor: str | None = None) -> Outbox:
        """``unknown`` → ``pending``: deliver it again (due now; its attempts are kept)."""
        return await self._outbox_action(outbox_id, "resend", actor, {"next_attempt_at": utcnow()})

    async def abandon_outbox(self, outbox_id: int, actor: str | None = None) -> Outbox:
        """``unknown``, ``pending`` or ``failed`` → ``abandoned``: never delivered (again)."""
        return await self._outbox_action(outbox_id, "abandon", actor, {"next_attempt_at": None})

    async def _outbox_action(
        self, outbox_id: int, action: str, actor: str | None, values: dict[str, Any]
    ) -> Outbox:
        """One conditional update, and an event naming the operator in the history of the
        message's work item (``outbox:<id>`` for a message that belongs to no work item)."""
        sources, target, event_type = OUTBOX_ACTIONS[action]

        def tx(conn: Connection) -> Any:
            current = conn.execute(sa.select(outbox_t).where(O.id == outbox_id)).first()
            if current is None:
                raise OutboxNotFound(outbox_id)
            if current.state not in sources:
                raise OutboxActionRefused(outbox_id, current.state, action)
            row = conn.execute(
                sa.update(outbox_t)
                .where(O.id == outbox_id, O.state == current.state)
                .values(state=target, **values)
                .returning(*outbox_t.c)
            ).first()
            if row is None:  # another operator (or the sender) changed it meanwhile
                state = conn.execute(sa.select(O.state).where(O.id == outbox_id)).scalar_one()
                raise OutboxActionRefused(outbox_id, state, action)
            conn.execute(
                sa.insert(event_t).values(
                    work_id=row.work_id or f"outbox:{outbox_id}",
                    type=event_type,
                    data={
                        "outbox_id": outbox_id,
                        "from": current.state,
                        "to": target,
                        "channel": row.channel,
                        "attempts": row.attempts,
                        "detail": {"actor": actor},
                    },
                    actor=actor,
                    created_at=utcnow(),
                )
            )
            return row

        return Outbox(**(await self.engines.run_write(tx))._mapping)
