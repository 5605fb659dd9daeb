"""Operator control: pause, resume, cancel, retry, restart from a step. Each action is one
conditional update whose event names the operator; an illegal one raises ``IllegalTransition``
and changes nothing.

A running item is not interrupted mid-step: pause and cancel set a request (``control``) that
its worker acts on at the next step boundary (or the reaper, if the worker is gone).
Imported only by :mod:`ledger.ledger`.
"""

from __future__ import annotations

import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ledger._base import LedgerBase, W, close_open_waits, wake_joined_parent
from ledger.errors import IllegalTransition, LedgerError, WorkNotFound
from ledger.records import new_id, utcnow
from ledger.schema import Work, step_t, work_t
from ledger.states import WorkState

Q, R, Wt, P = WorkState.QUEUED, WorkState.RUNNING, WorkState.WAITING, WorkState.PAUSED
F, C = WorkState.FAILED, WorkState.CANCELLED
S = step_t.c


class InvalidRestartStep(LedgerError):
    """``from_step`` is not a step the work item can be restarted from; nothing was written."""

    code = "invalid_step"

    def __init__(self, work_id: str, from_step: int, last_seq: int) -> None:
        super().__init__(
            f"work {work_id} can be restarted from step 1 to {last_seq + 1} "
            f"(its last recorded step is {last_seq}), not from step {from_step}"
        )
        self.work_id = work_id
        self.from_step = from_step
        self.last_seq = last_seq


class RestartRefused(IllegalTransition):
    """The work item is running: a fork would race its worker. Nothing was written."""

    def __init__(self, work_id: str, current: str) -> None:
        LedgerError.__init__(
            self,
            f"work {work_id} is {current}; pause or cancel it (or let it finish) "
            "before restarting it from a step",
        )
        self.work_id = work_id
        self.current = current
        self.target = "restarted"


class ControlQueries(LedgerBase):
    async def _operator_transition(
        self,
        work_id: str,
        target: WorkState,
        reason: str,
        actor: str | None,
        sources: frozenset[WorkState],
        values: dict[str, Any] | None = None,
    ) -> Work:
        def tx(conn: Connection) -> Any:
            current = conn.execute(sa.select(W.state).where(W.id == work_id)).scalar_one_or_none()
            if current is None:
                raise WorkNotFound(work_id)
            if WorkState(current) not in sources:
                raise IllegalTransition(work_id, current, target.value)
            extra = dict(values or {})
            if extra.get("paused_from") == "?":
                extra["paused_from"] = current
            row = conn.execute(
                sa.update(work_t)
                .where(W.id == work_id, W.state == current)
                .values(
                    state=target.value,
                    state_reason=reason,
                    state_detail={"actor": actor},
                    updated_at=utcnow(),
                    **extra,
                )
                .returning(*work_t.c)
            ).first()
            if row is None:
                raise IllegalTransition(work_id, current, target.value, "it changed concurrently")
            if target is WorkState.CANCELLED:
                close_open_waits(conn, work_id, row.updated_at)
                wake_joined_parent(conn, row.parent_id, work_id, row.updated_at)
            return row

        row = await self.engines.run_write(tx)
        if target is WorkState.QUEUED:
            self._fire(self._on_queued, row.agent)
        return Work(**row._mapping)

    async def _request_control(self, work_id: str, control: str, actor: str | None) -> Work | None:
        """Ask the worker running ``work_id`` to stop at its next step boundary. ``None`` if
        the item is not running. A pending cancel is not downgraded to a pause."""
        replaceable = [None, control] if control == "pause" else [None, "pause", "cancel"]

        def tx(conn: Connection) -> Any:
            row = conn.execute(
                sa.update(work_t)
                .where(
                    W.id == work_id,
                    W.state == WorkState.RUNNING.value,
                    sa.or_(W.control.is_(None), W.control.in_([c for c in replaceable if c])),
                )
                .values(
                    control=control,
                    state_reason=f"{control}_requested",
                    state_detail={"actor": actor},
                    updated_at=utcnow(),
                )
                .returning(*work_t.c)
            ).first()
            if row is None:
                pending = conn.execute(sa.select(W.state, W.control).where(W.id == work_id)).first()
                if pending is not None and pending.state == "running" and pending.control:
                    raise IllegalTransition(
                        work_id, "running", "paused", f"a {pending.control} is already requested"
                    )
            return row

        row = await self.engines.run_write(tx)
        if row is None:
            return None
        self._fire(self._on_control, work_id)
        return Work(**row._mapping)

    async def pause_work(self, work_id: str, *, actor: str | None = None) -> Work:
        """Queued or waiting → paused at once; running → paused at its next step boundary."""
        requested = await self._request_control(work_id, "pause", actor)
        if requested is not None:
            return requested
        return await self._operator_transition(
            work_id, P, "paused", actor, frozenset({Q, Wt}), {"paused_from": "?"}
        )

    async def resume_work(self, work_id: str, *, actor: str | None = None) -> Work:
        """paused → queued. Work paused while waiting runs again from the top and, if its wait
        is still open, goes straight back to waiting; if the wait was resolved (or its child
        finished) meanwhile, it carries on."""
        return await self._operator_transition(
            work_id, Q, "resumed", actor, frozenset({P}), {"paused_from": None, "wait_reason": None}
        )

    async def cancel_work(self, work_id: str, *, actor: str | None = None) -> Work:
        """Queued, waiting or paused → cancelled; running → cancelled at its next step boundary."""
        requested = await self._request_control(work_id, "cancel", actor)
        if requested is not None:
            return requested
        return await self._operator_transition(
            work_id,
            C,
            "cancelled",
            actor,
            frozenset({Q, Wt, P}),
            {"finished_at": utcnow(), "control": None},
        )

    async def retry_work(self, work_id: str, *, actor: str | None = None) -> Work:
        """failed or cancelled → queued for one more attempt; recorded steps are kept, so the
        work re-runs from the step that failed."""
        return await self._operator_transition(
            work_id,
            Q,
            "retried",
            actor,
            frozenset({F, C}),
            {
                "attempt": W.attempt + 1,
                "max_attempts": self.greatest(W.max_attempts, W.attempt + 1),
                "finished_at": None,
                "not_before": None,
                "control": None,
            },
        )

    async def restart_from_step(
        self, work_id: str, from_step: int, actor: str | None = None
    ) -> Work:
        """Fork ``work_id`` into a new queued work item that keeps its steps ``1..from_step-1``
        and runs ``from_step`` onward.

        The fork has the original's agent, input, conversation, parent, priority and attempt
        budget; source ``restart`` and source_event_id ``{work_id}:{from_step}:<uuid>``. The
        kept step records are copied as they are (outputs included; a replay returns them
        without running them) under the new id, with idempotency keys ``{new_id}:{seq}``.
        The original is not changed but for its history: a ``restarted_as`` event (its state
        stays). The fork's ``created`` event carries ``{restarted_from, from_step}``.

        ``from_step`` runs from 1 to the last recorded step + 1 (:class:`InvalidRestartStep`);
        a running original is refused (:class:`RestartRefused`, an ``IllegalTransition``).
        """
        postgres = self.dialect == "postgresql"

        def tx(conn: Connection) -> Any:
            q = sa.select(work_t).where(W.id == work_id)
            old = conn.execute(q.with_for_update() if postgres else q).first()
            if old is None:
                raise WorkNotFound(work_id)
            if old.state == R.value:
                raise RestartRefused(work_id, old.state)
            last = conn.execute(
                sa.select(sa.func.max(S.seq)).where(S.work_id == work_id)
            ).scalar_one_or_none()
            last = last or 0
            if not 1 <= from_step <= last + 1:
                raise InvalidRestartStep(work_id, from_step, last)
            now = utcnow()
            fork_id = new_id()
            conn.execute(
                sa.insert(work_t).values(
                    id=fork_id,
                    agent=old.agent,
                    state=Q.value,
                    input=old.input,
                    attempt=1,
                    max_attempts=old.max_attempts,
                    source="restart",
                    source_event_id=f"{work_id}:{from_step}:{uuid.uuid4().hex}",
                    conversation_id=old.conversation_id,
                    parent_id=old.parent_id,
                    priority=old.priority,
                    lease_epoch=0,
                    state_reason="created",
                    state_detail={
                        "actor": actor,
                        "restarted_from": work_id,
                        "from_step": from_step,
                    },
                    created_at=now,
                    updated_at=now,
                )
            )
            # Copied row by row inside the database: JSON values (and SQL NULLs) stay as stored.
            columns = [c.name for c in step_t.c]
            fork_key = (sa.literal(f"{fork_id}:") + sa.cast(S.seq, sa.String)).label(
                "idempotency_key"
            )
            picked = [
                sa.literal(fork_id).label("work_id")
                if name == "work_id"
                else fork_key
                if name == "idempotency_key"
                else S[name]
                for name in columns
            ]
            conn.execute(
                sa.insert(step_t).from_select(
                    columns,
                    sa.select(*picked)
                    .where(S.work_id == work_id, S.seq < from_step)
                    .order_by(S.seq),
                )
            )
            # The original's history records the fork; its state is left as it is.
            marked = conn.execute(
                sa.update(work_t)
                .where(W.id == work_id, W.state == old.state)
                .values(
                    state_reason="restarted_as",
                    state_detail={
                        "actor": actor,
                        "restarted_as": fork_id,
                        "from_step": from_step,
                    },
                    updated_at=now,
                )
                .returning(W.id)
            ).first()
            if marked is None:
                raise IllegalTransition(work_id, old.state, "restarted", "it changed concurrently")
            return conn.execute(sa.select(work_t).where(W.id == fork_id)).one()

        row = await self.engines.run_write(tx)
        self._fire(self._on_queued, row.agent)
        return Work(**row._mapping)
