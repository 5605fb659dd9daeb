"""Work items: creation (deduplicated), reads, claims, leases and the worker-side transitions.

Worker writes are fenced on the claim's lease epoch. Imported only by :mod:`ledger.ledger`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ledger._base import (
    RELEASE,
    LedgerBase,
    W,
    check_lease,
    close_open_waits,
    error_summary,
    fenced_transition,
    wake_joined_parent,
)
from ledger.errors import IllegalTransition, LeaseLost, WorkNotFound
from ledger.prepared import Prepared, PreparedCache
from ledger.records import Claim, new_id, utcnow
from ledger.schema import Event, Step, Wait, Work, event_t, step_t, wait_t, work_t, worker_t
from ledger.states import TERMINAL, WorkState

_TERMINAL_VALUES = [s.value for s in TERMINAL]
#: :func:`fenced_transition` to ``succeeded``, built once: every finished item takes it
_COMPLETE = Prepared(
    sa.update(work_t)
    .where(
        W.id == sa.bindparam("work_id"),
        W.lease_epoch == sa.bindparam("epoch"),
        W.state == WorkState.RUNNING.value,
    )
    .values(
        state=WorkState.SUCCEEDED.value,
        state_reason="succeeded",
        updated_at=sa.bindparam("now"),
        result=sa.bindparam("result", type_=W.result.type),
        finished_at=sa.bindparam("now"),
        control=None,
        state_detail=None,
        **RELEASE,
    )
    .returning(W.id)
)
#: the columns ``create_work`` writes
_CREATE_COLUMNS = (
    "id",
    "agent",
    "state",
    "input",
    "attempt",
    "max_attempts",
    "source",
    "source_event_id",
    "conversation_id",
    "parent_id",
    "priority",
    "lease_epoch",
    "not_before",
    "state_reason",
    "state_detail",
    "created_at",
    "updated_at",
)


def _utc(value: datetime) -> datetime:
    """An aware datetime in UTC; a naive one is taken as UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class WorkQueries(LedgerBase):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: claim statements built once per agent list (building one costs more than running it)
        self._claim_statements = PreparedCache(partial(_claim_statement, self.dialect))
        insert = self._insert(work_t).values(
            {c: sa.bindparam(c, type_=W[c].type) for c in _CREATE_COLUMNS}
        )
        #: by "deduplicated on (source, source_event_id)"
        self._create_statements = {
            False: insert.returning(W.id),
            True: insert.on_conflict_do_nothing(
                index_elements=["source", "source_event_id"]
            ).returning(W.id),
        }

    # -- creating and reading ----------------------------------------------------------------

    async def create_work(
        self,
        agent: str,
        input: Any = None,
        *,
        source: str | None = None,
        source_event_id: str | None = None,
        conversation_id: str | None = None,
        parent_id: str | None = None,
        priority: int = 0,
        max_attempts: int = 5,
        not_before: datetime | None = None,
        actor: str | None = None,
    ) -> tuple[Work, bool]:
        """Create a queued work item. Deduplicated on ``(source, source_event_id)``: a repeat
        returns the existing item and ``False``, and writes nothing."""
        if (source is None) != (source_event_id is None):
            raise ValueError("source and source_event_id go together")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        now = utcnow()
        row = {
            "id": new_id(),
            "agent": agent,
            "state": WorkState.QUEUED.value,
            "input": input,
            "attempt": 1,
            "max_attempts": max_attempts,
            "source": source,
            "source_event_id": source_event_id,
            "conversation_id": conversation_id,
            "parent_id": parent_id,
            "priority": priority,
            "lease_epoch": 0,
            "not_before": not_before,
            "state_reason": "created",
            "state_detail": {"actor": actor} if actor else None,
            "created_at": now,
            "updated_at": now,
        }
        stmt = self._create_statements[source is not None]

        def tx(conn: Connection) -> Any:
            if conn.execute(stmt, row).first() is not None:
                return None
            return conn.execute(
                sa.select(work_t).where(W.source == source, W.source_event_id == source_event_id)
            ).one()

        existing = await self.engines.run_single(tx)
        if existing is None:
            self._fire(self._on_queued, agent)
            return Work(**row), True
        return Work(**existing._mapping), False

    async def get_work(self, work_id: str) -> Work:
        async with self._read() as conn:
            row = (await conn.execute(sa.select(work_t).where(W.id == work_id))).first()
        if row is None:
            raise WorkNotFound(work_id)
        return Work(**row._mapping)

    async def list_work(
        self, *, state: str | None = None, agent: str | None = None, limit: int = 100
    ) -> list[Work]:
        q = sa.select(work_t).order_by(W.created_at.desc(), W.id.desc()).limit(limit)
        if state is not None:
            q = q.where(W.state == WorkState(state).value)
        if agent is not None:
            q = q.where(W.agent == agent)
        async with self._read() as conn:
            return [Work(**r._mapping) for r in await conn.execute(q)]

    async def count_by_state(self) -> dict[str, int]:
        q = sa.select(W.state, sa.func.count()).group_by(W.state)
        async with self._read() as conn:
            counts = {s.value: 0 for s in WorkState}
            counts.update({state: n for state, n in await conn.execute(q)})
            return counts

    async def search_work(
        self,
        *,
        state: str | None = None,
        agent: str | None = None,
        conversation_id: str | None = None,
        source: str | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        updated_after: datetime | None = None,
        updated_before: datetime | None = None,
        text: str | None = None,
        before: tuple[datetime, str] | None = None,
        limit: int = 100,
    ) -> list[Work]:
        """Work items that match every filter given, newest first (``created_at``, then ``id``).

        ``*_after`` bounds are inclusive, ``*_before`` bounds exclusive; ``text`` is found in
        the wait reason, case-insensitively. ``before`` is the ``(created_at, id)`` of the last
        item of the previous page (keyset pagination): only items after it in this order are
        returned, so a walk through the pages neither repeats nor skips an item while new work
        is created (new items sort before the walk's start)."""
        q = sa.select(work_t).order_by(W.created_at.desc(), W.id.desc()).limit(limit)
        if state is not None:
            q = q.where(W.state == WorkState(state).value)
        for column, value in (
            (W.agent, agent),
            (W.conversation_id, conversation_id),
            (W.source, source),
        ):
            if value is not None:
                q = q.where(column == value)
        for column, low, high in (
            (W.created_at, created_after, created_before),
            (W.updated_at, updated_after, updated_before),
        ):
            if low is not None:
                q = q.where(column >= _utc(low))
            if high is not None:
                q = q.where(column < _utc(high))
        if text:
            q = q.where(W.wait_reason.icontains(text, autoescape=True))
        if before is not None:
            at, last_id = _utc(before[0]), before[1]
            q = q.where(sa.or_(W.created_at < at, sa.and_(W.created_at == at, W.id < last_id)))
        async with self._read() as conn:
            return [Work(**r._mapping) for r in await conn.execute(q)]

    async def work_overview(self) -> dict[str, int]:
        """:meth:`count_by_state` plus what needs an operator's eye: ``expired_leases``
        (running items whose lease ran out: their worker is gone or stuck, the reaper has not
        taken them back yet) and ``retrying`` (queued again after a failure, waiting for
        their next attempt time, ``not_before``)."""
        counts = await self.count_by_state()
        now = utcnow()
        expired = (
            sa.select(sa.func.count())
            .where(W.state == WorkState.RUNNING.value, W.lease_expires_at < now)
            .scalar_subquery()
        )
        retrying = (
            sa.select(sa.func.count())
            .where(W.state == WorkState.QUEUED.value, W.not_before > now, W.attempt > 1)
            .scalar_subquery()
        )
        async with self._read() as conn:
            row = (await conn.execute(sa.select(expired, retrying))).one()
        return {**counts, "expired_leases": row[0], "retrying": row[1]}

    async def get_current_wait(self, work_id: str) -> Wait | None:
        """The pending wait of a work item (the newest, should there be several), or None."""
        q = (
            sa.select(wait_t)
            .where(wait_t.c.work_id == work_id, wait_t.c.state == "pending")
            .order_by(wait_t.c.created_at.desc(), wait_t.c.id.desc())
            .limit(1)
        )
        async with self._read() as conn:
            row = (await conn.execute(q)).first()
        return None if row is None else Wait(**row._mapping)

    async def list_steps(self, work_id: str) -> list[Step]:
        q = sa.select(step_t).where(step_t.c.work_id == work_id).order_by(step_t.c.seq)
        async with self._read() as conn:
            return [Step(**r._mapping) for r in await conn.execute(q)]

    async def list_events(self, work_id: str, *, after: int = 0, limit: int = 1000) -> list[Event]:
        q = (
            sa.select(event_t)
            .where(event_t.c.work_id == work_id, event_t.c.id > after)
            .order_by(event_t.c.id)
            .limit(limit)
        )
        async with self._read() as conn:
            return [Event(**r._mapping) for r in await conn.execute(q)]

    async def list_recent_events(self, work_id: str, *, limit: int = 500) -> list[Event]:
        """The last ``limit`` events of a work item, oldest first."""
        q = (
            sa.select(event_t)
            .where(event_t.c.work_id == work_id)
            .order_by(event_t.c.id.desc())
            .limit(limit)
        )
        async with self._read() as conn:
            return [Event(**r._mapping) for r in reversed((await conn.execute(q)).all())]

    async def list_children(self, work_id: str) -> list[Work]:
        q = sa.select(work_t).where(W.parent_id == work_id).order_by(W.created_at)
        async with self._read() as conn:
            return [Work(**r._mapping) for r in await conn.execute(q)]

    # -- claims and leases -------------------------------------------------------------------

    async def claim_work(
        self,
        owner: str,
        *,
        limit: int,
        lease_ttl: float,
        agents: Sequence[str] | None = None,
    ) -> list[Claim]:
        """Lease up to ``limit`` queued items to ``owner``, bumping each one's lease epoch.

        PostgreSQL picks rows with ``FOR UPDATE SKIP LOCKED`` so concurrent workers claim
        disjoint items; SQLite runs the one ``UPDATE … RETURNING`` under ``BEGIN IMMEDIATE``.
        """
        if limit <= 0:
            return []
        now = utcnow()
        key = None if agents is None else tuple(agents)
        stmt = self._claim_statements.get(key)
        params: dict[str, Any] = {
            "owner": owner,
            "now": now,
            "expires": now + timedelta(seconds=lease_ttl),
            "limit": limit,
            "detail": {"worker": owner},
        }
        if key is not None:
            params.update({f"agent_{i}": a for i, a in enumerate(key)})
        rows = await self.engines.run_single(lambda conn: stmt.run(conn, params))
        return [
            Claim(
                work_id=r.id,
                agent=r.agent,
                input=r.input,
                attempt=r.attempt,
                max_attempts=r.max_attempts,
                epoch=r.lease_epoch,
                owner=owner,
                parent_id=r.parent_id,
                conversation_id=r.conversation_id,
                control=r.control,
                fresh=r.lease_epoch == 1 and r.source != "restart",
            )
            for r in rows
        ]

    async def renew_leases(
        self, owner: str, *, lease_ttl: float, work_ids: Sequence[str] | None = None
    ) -> dict[str, tuple[int, str | None]]:
        """Extend the leases ``owner`` holds (only ``work_ids``, if given: an item the worker
        no longer runs is left to expire) in one statement, and mark the worker alive.

        Returns ``{work_id: (epoch, control)}`` of the leases still held; a lease the worker
        believes it holds but that is missing here is lost.
        """
        now = utcnow()
        renew = sa.update(work_t).where(W.lease_owner == owner, W.state == WorkState.RUNNING.value)
        if work_ids is not None:
            renew = renew.where(W.id.in_(list(work_ids)))

        def tx(conn: Connection) -> dict[str, tuple[int, str | None]]:
            rows = conn.execute(
                renew.values(
                    lease_expires_at=now + timedelta(seconds=lease_ttl), last_heartbeat_at=now
                ).returning(W.id, W.lease_epoch, W.control)
            ).all()
            conn.execute(sa.update(worker_t).where(worker_t.c.id == owner).values(last_seen_at=now))
            return {r.id: (r.lease_epoch, r.control) for r in rows}

        return await self.engines.run_write(tx)

    # -- worker-side transitions (fenced) ----------------------------------------------------

    async def complete_work(self, claim: Claim, result: Any) -> None:
        """running → succeeded, fenced; wakes a parent joined on this item."""

        def tx(conn: Connection) -> None:
            now = utcnow()
            params = {"work_id": claim.work_id, "epoch": claim.epoch, "now": now, "result": result}
            if _COMPLETE.first(conn, params) is None:
                raise LeaseLost(claim.work_id, claim.epoch, "could not record succeeded")
            close_open_waits(conn, claim.work_id, now)
            wake_joined_parent(conn, claim.parent_id, claim.work_id, now)

        await self.engines.run_write(tx)
        if claim.parent_id:
            self._fire(self._on_queued, "")

    async def fail_work(
        self, claim: Claim, error: dict[str, Any], *, retry_at: datetime | None = None
    ) -> WorkState:
        """running → queued again at ``retry_at`` (attempt + 1), or → failed when no attempt
        is left (or ``retry_at`` is None). Fenced. Returns the new state."""

        def tx(conn: Connection) -> WorkState:
            now = utcnow()
            if retry_at is not None and claim.attempt < claim.max_attempts:
                detail = {"error": error_summary(error), "retry_at": retry_at.isoformat()}
                values = {
                    "attempt": W.attempt + 1,
                    "not_before": retry_at,
                    "error": error,
                    "state_detail": detail,
                    **RELEASE,
                }
                fenced_transition(conn, claim, WorkState.QUEUED, "retried", values, now)
                return WorkState.QUEUED
            values = {
                "error": error,
                "finished_at": now,
                "state_detail": {"error": error_summary(error)},
                **RELEASE,
            }
            fenced_transition(conn, claim, WorkState.FAILED, "failed", values, now)
            close_open_waits(conn, claim.work_id, now)
            wake_joined_parent(conn, claim.parent_id, claim.work_id, now)
            return WorkState.FAILED

        state = await self.engines.run_write(tx)
        self._fire(self._on_queued, claim.agent)
        return state

    async def release_work(self, claim: Claim, reason: str = "released") -> None:
        """running → queued without spending an attempt (graceful shutdown). Fenced."""
        await self.engines.run_write(
            lambda conn: fenced_transition(
                conn, claim, WorkState.QUEUED, reason, dict(RELEASE), utcnow()
            )
        )
        self._fire(self._on_queued, claim.agent)

    async def acknowledge_control(self, claim: Claim) -> WorkState:
        """The owning worker stops at a step boundary: running → paused or cancelled, as the
        pending control request says. Fenced."""

        def tx(conn: Connection) -> WorkState:
            now = utcnow()
            control = conn.execute(
                sa.select(W.control).where(W.id == claim.work_id)
            ).scalar_one_or_none()
            if control == "pause":
                target, reason = WorkState.PAUSED, "paused"
                extra: dict[str, Any] = {"paused_from": WorkState.RUNNING.value}
            elif control == "cancel":
                target, reason = WorkState.CANCELLED, "cancelled"
                extra = {"finished_at": now}
            else:
                check_lease(conn, claim)  # a lost lease is the better answer
                raise IllegalTransition(claim.work_id, "running", "paused", "no request pending")
            values = {"control": None, **extra, **RELEASE}
            fenced_transition(conn, claim, target, reason, values, now)
            if target is WorkState.CANCELLED:
                close_open_waits(conn, claim.work_id, now)
                wake_joined_parent(conn, claim.parent_id, claim.work_id, now)
            return target

        return await self.engines.run_write(tx)

    async def suspend_for_child(self, claim: Claim, child_id: str) -> Work | None:
        """Park the claimed item until ``child_id`` finishes. Returns the child if it already
        finished (nothing is written), else ``None`` after running → waiting."""
        postgres = self.dialect == "postgresql"

        def tx(conn: Connection) -> Work | None:
            q = sa.select(work_t).where(W.id == child_id)
            if postgres:
                q = q.with_for_update()  # the child's finish waits for this decision
            child = conn.execute(q).first()
            if child is None:
                raise WorkNotFound(child_id)
            if child.state in _TERMINAL_VALUES:
                return Work(**child._mapping)
            values = {
                "wait_reason": f"join {child_id}",
                "state_detail": {"kind": "child", "child_id": child_id},
                **RELEASE,
            }
            fenced_transition(conn, claim, WorkState.WAITING, "waiting", values, utcnow())
            return None

        return await self.engines.run_write(tx)

    async def next_lease_expiry(self) -> datetime | None:
        """When the soonest lease of a running item runs out (``None``: nothing is running)."""
        q = sa.select(sa.func.min(W.lease_expires_at)).where(W.state == WorkState.RUNNING.value)
        async with self._read() as conn:
            soonest = (await conn.execute(q)).scalar_one_or_none()
        return None if soonest is None else _utc(soonest)

    async def reap_expired_leases(self, *, limit: int = 500) -> list[tuple[str, str]]:
        """Expired leases go back to ``queued`` with attempt + 1 (a ``lease_expired`` event),
        to ``failed`` when their attempts are spent, or to the paused/cancelled state an
        operator asked for. Returns ``[(work_id, new_state)]``."""
        postgres = self.dialect == "postgresql"

        def tx(conn: Connection) -> list[tuple[str, str]]:
            now = utcnow()
            pick = (
                sa.select(W.id, W.attempt, W.max_attempts, W.lease_epoch, W.control, W.parent_id)
                .where(W.state == WorkState.RUNNING.value, W.lease_expires_at < now)
                .order_by(W.lease_expires_at)
                .limit(limit)
            )
            if postgres:
                pick = pick.with_for_update(skip_locked=True)
            reaped: list[tuple[str, str]] = []
            for r in conn.execute(pick).all():
                target, reason, values = _after_expiry(r, now)
                done = conn.execute(
                    sa.update(work_t)
                    .where(
                        W.id == r.id,
                        W.lease_epoch == r.lease_epoch,
                        W.state == WorkState.RUNNING.value,
                    )
                    .values(state=target.value, state_reason=reason, **values)
                    .returning(W.id)
                ).first()
                if done is not None:
                    reaped.append((r.id, target.value))
                    if target in TERMINAL:
                        close_open_waits(conn, r.id, now)
                        wake_joined_parent(conn, r.parent_id, r.id, now)
            return reaped

        reaped = await self.engines.run_write(tx)
        if reaped:
            self._fire(self._on_queued, "")
        return reaped


def _claim_statement(dialect: str, agents: tuple[str, ...] | None) -> Prepared:
    """``UPDATE work … RETURNING`` that leases up to ``:limit`` claimable items to ``:owner``.

    Bound at execution: ``owner``, ``now``, ``expires``, ``limit``, ``detail`` and one
    ``agent_<i>`` per agent (single parameters, not an expanding list: nothing is re-rendered
    per call).
    """
    now = sa.bindparam("now", type_=W.updated_at.type)
    pick = (
        sa.select(W.id)
        .where(
            W.state == WorkState.QUEUED.value,
            sa.or_(W.not_before.is_(None), W.not_before <= now),
        )
        .order_by(W.priority.desc(), W.created_at, W.id)
        .limit(sa.bindparam("limit", type_=sa.Integer))
    )
    if agents is not None:
        pick = pick.where(
            W.agent.in_(
                [sa.bindparam(f"agent_{i}", type_=W.agent.type) for i in range(len(agents))]
            )
            if agents
            else sa.false()
        )
    pick = pick.where(sa.or_(W.conversation_id.is_(None), ~_conversation_busy()))
    picked: Any = pick.scalar_subquery()
    if dialect == "postgresql":
        # A materialized CTE locks its rows once. As an ``IN (subquery)`` the planner may
        # rescan the pick per row (a semi join), and each rescan skips the rows this very
        # statement already updated and locks ``limit`` more: every queued row got claimed.
        cte = pick.with_for_update(skip_locked=True).cte("picked").prefix_with("MATERIALIZED")
        picked = sa.select(cte.c.id)
        # A row picked and locked may have changed state meanwhile: check it again.
        where = [W.id.in_(picked), W.state == WorkState.QUEUED.value]
    else:
        # One statement under the write lock: the pick is current. (A ``state`` condition
        # here made SQLite walk every queued row through ``ix_work_updated`` per claim.)
        where = [W.id.in_(picked)]
    return Prepared(
        sa.update(work_t)
        .where(*where)
        .values(
            state=WorkState.RUNNING.value,
            lease_owner=sa.bindparam("owner", type_=W.lease_owner.type),
            lease_epoch=W.lease_epoch + 1,
            lease_expires_at=sa.bindparam("expires", type_=W.lease_expires_at.type),
            last_heartbeat_at=now,
            not_before=None,
            state_reason="claimed",
            state_detail=sa.bindparam("detail", type_=W.state_detail.type),
            updated_at=now,
        )
        .returning(
            W.id,
            W.agent,
            W.input,
            W.attempt,
            W.max_attempts,
            W.lease_epoch,
            W.parent_id,
            W.conversation_id,
            W.control,
            W.source,
        )
    )


def _conversation_busy() -> Any:
    """One item per conversation runs at a time, in arrival order: an item is not claimable
    while another of its conversation runs, or an earlier one is still queued."""
    other = work_t.alias("other")
    o = other.c
    earlier = sa.or_(
        o.created_at < W.created_at, sa.and_(o.created_at == W.created_at, o.id < W.id)
    )
    return (
        sa.exists()
        .where(
            o.conversation_id == W.conversation_id,
            sa.or_(
                o.state == WorkState.RUNNING.value,
                sa.and_(o.state == WorkState.QUEUED.value, earlier),
            ),
        )
        .correlate(work_t)
    )


def _after_expiry(r: Any, now: datetime) -> tuple[WorkState, str, dict[str, Any]]:
    """Where an item whose lease expired goes, and what its transition records."""
    values: dict[str, Any] = {**RELEASE, "updated_at": now, "state_detail": None}
    if r.control == "pause":
        return WorkState.PAUSED, "paused", {**values, "control": None, "paused_from": "running"}
    if r.control == "cancel":
        return WorkState.CANCELLED, "cancelled", {**values, "control": None, "finished_at": now}
    if r.attempt >= r.max_attempts:
        msg = f"lease expired on attempt {r.attempt} of {r.max_attempts}"
        return (
            WorkState.FAILED,
            "failed",
            {
                **values,
                "finished_at": now,
                "error": {"type": "LeaseExpired", "message": msg},
                "state_detail": {"cause": "lease_expired", "error": msg},
            },
        )
    detail = {"expired_epoch": r.lease_epoch}
    return (
        WorkState.QUEUED,
        "lease_expired",
        {**values, "attempt": W.attempt + 1, "state_detail": detail},
    )


__all__ = ["WorkQueries"]
