"""Operator control: pause, resume, cancel, retry. Each action is one conditional update whose
event names the operator; an illegal one raises ``IllegalTransition`` and changes nothing.

A running item is not interrupted mid-step: pause and cancel set a request (``control``) that
its worker acts on at the next step boundary (or the reaper, if the worker is gone).
Imported only by :mod:`ledger.ledger`.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ledger._base import LedgerBase, W, close_open_waits, wake_joined_parent
from ledger.errors import IllegalTransition, WorkNotFound
from ledger.records import utcnow
from ledger.schema import Work, work_t
from ledger.states import WorkState

Q, R, Wt, P = WorkState.QUEUED, WorkState.RUNNING, WorkState.WAITING, WorkState.PAUSED
F, C = WorkState.FAILED, WorkState.CANCELLED


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
