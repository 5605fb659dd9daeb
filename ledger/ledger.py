"""The work ledger: every statement that reads or writes Tether's tables lives here.

Work lifecycle (create, claim, finish, fail, release), fenced step records, lease renewal and
reaping, operator control, history and retention. Every state change is a conditional ``UPDATE``
built from :mod:`ledger.states`; the database's history triggers append the matching ``event`` in
the same transaction. Worker writes are fenced on the claim's lease epoch and raise
:class:`LeaseLost` when it no longer matches. Imports only the ledger's own modules.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection

from ledger import _postgres
from ledger.engine import Engines, create_engines
from ledger.errors import IllegalTransition, LeaseLost, LedgerUnavailable, WorkNotFound
from ledger.records import Claim, StepRecord, StepWrite, new_id, utcnow
from ledger.schema import (
    Event,
    JSONType,
    Step,
    Work,
    WorkerRow,
    event_t,
    outbox_t,
    step_t,
    wait_t,
    work_t,
    worker_t,
)
from ledger.states import TERMINAL, WorkState, allowed_sources

log = logging.getLogger(__name__)

W = work_t.c
S = step_t.c

_STEP_COLUMNS = (
    "work_id",
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
_STEP_TYPES: dict[str, Any] = {
    "output": JSONType,
    "error": JSONType,
    # SQL NULL, not JSON 'null', for "no progress reported", so the heartbeat upsert's
    # COALESCE keeps the progress reported before
    "progress": sa.JSON(none_as_null=True).with_variant(
        pg_dialect.JSONB(none_as_null=True), "postgresql"
    ),
    "started_at": step_t.c.started_at.type,
    "finished_at": step_t.c.finished_at.type,
    "last_heartbeat_at": step_t.c.last_heartbeat_at.type,
}


def _fenced_step_upsert(dialect: str, *, finishing: bool) -> Any:
    """``INSERT … SELECT … FROM work WHERE <lease is ours> ON CONFLICT DO UPDATE``.

    One statement records a step attempt only while the claim's epoch is current; a succeeded
    record is never overwritten. ``finishing`` statements overwrite a running/failed attempt;
    start and heartbeat statements only refresh a running record of the same attempt.
    """
    insert = sqlite_dialect.insert if dialect == "sqlite" else pg_dialect.insert
    values = [sa.bindparam(c, type_=_STEP_TYPES.get(c)).label(c) for c in _STEP_COLUMNS]
    source = sa.select(*values).where(
        W.id == sa.bindparam("work_id"),
        W.lease_epoch == sa.bindparam("epoch"),
        W.state == WorkState.RUNNING.value,
    )
    stmt = insert(step_t).from_select(list(_STEP_COLUMNS), source)
    excluded = stmt.excluded
    if finishing:
        set_ = {
            c: getattr(excluded, c)
            for c in _STEP_COLUMNS
            if c not in ("work_id", "seq", "last_heartbeat_at", "progress")
        }
        where = step_t.c.status != "succeeded"
    else:
        set_ = {
            "last_heartbeat_at": excluded.last_heartbeat_at,
            "progress": sa.func.coalesce(excluded.progress, step_t.c.progress),
        }
        where = sa.and_(step_t.c.status == "running", step_t.c.attempt == excluded.attempt)
    return stmt.on_conflict_do_update(
        index_elements=["work_id", "seq"], set_=set_, where=where
    ).returning(step_t.c.seq)


class Ledger:
    """Async access to the work ledger. One instance per process; safe to share between tasks."""

    def __init__(self, engines: Engines) -> None:
        self.engines = engines
        self.dialect = engines.dialect
        self._record_finished = _fenced_step_upsert(self.dialect, finishing=True)
        self._record_running = _fenced_step_upsert(self.dialect, finishing=False)
        self._insert = sqlite_dialect.insert if self.dialect == "sqlite" else pg_dialect.insert
        #: in-process wake-ups (SQLite, and the embedded `serve`): called after commits
        self._on_queued: list[Callable[[str], None]] = []
        self._on_control: list[Callable[[str], None]] = []
        self._listener: _postgres.Listener | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    @classmethod
    async def open(
        cls, url: str, *, migrate: bool = False, sqlite_synchronous: str = "FULL"
    ) -> Ledger:
        """Connect to ``url``; with ``migrate`` apply pending migrations first."""
        engines = create_engines(url, sqlite_synchronous=sqlite_synchronous)
        if migrate:
            from ledger.migrate import upgrade

            try:
                await upgrade(engines)
            except (OperationalError, DBAPIError, OSError) as exc:
                await engines.dispose()
                raise LedgerUnavailable(f"cannot migrate the database: {exc}") from exc
        return cls(engines)

    async def close(self) -> None:
        if self._listener is not None:
            await self._listener.stop()
            self._listener = None
        await self.engines.dispose()

    async def ping(self) -> None:
        """Raise :class:`LedgerUnavailable` unless the database answers and is migrated."""
        try:
            async with self.engines.read.connect() as conn:
                await conn.execute(sa.select(sa.func.count()).select_from(worker_t))
        except (OperationalError, DBAPIError, OSError) as exc:
            raise LedgerUnavailable(str(exc).splitlines()[0]) from exc

    def on_work_queued(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(agent_or_empty)`` when work may be claimable (this process or, on
        PostgreSQL after :meth:`listen`, any process)."""
        self._on_queued.append(callback)

    def on_control(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(work_id)`` when a pause or cancel is requested ('' = check all)."""
        self._on_control.append(callback)

    async def listen(self) -> None:
        """On PostgreSQL, start ``LISTEN`` for wake-ups from other processes (no-op on SQLite)."""
        if self.dialect != "postgresql" or self._listener is not None:
            return
        self._listener = _postgres.Listener(
            self.engines.url,
            {
                _postgres.WORK_CHANNEL: lambda p: self._fire(self._on_queued, p),
                _postgres.CONTROL_CHANNEL: lambda p: self._fire(self._on_control, p),
            },
        )
        await self._listener.start()

    @staticmethod
    def _fire(callbacks: Iterable[Callable[[str], None]], payload: str) -> None:
        for cb in list(callbacks):
            try:
                cb(payload)
            except Exception:  # a broken subscriber must not break a commit path
                log.exception("wake-up callback failed")

    def _write(self) -> Any:
        return self.engines.write.begin()

    def _read(self) -> Any:
        return self.engines.read.connect()

    # -- creating and reading work -----------------------------------------------------------

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
        stmt = self._insert(work_t).values(row)
        if source is not None:
            stmt = stmt.on_conflict_do_nothing(index_elements=["source", "source_event_id"])
        async with self._write() as conn:
            created = (await conn.execute(stmt.returning(W.id))).first() is not None
            if not created:
                existing = (
                    await conn.execute(
                        sa.select(work_t).where(
                            W.source == source, W.source_event_id == source_event_id
                        )
                    )
                ).one()
        if created:
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

    async def list_steps(self, work_id: str) -> list[Step]:
        q = sa.select(step_t).where(S.work_id == work_id).order_by(S.seq)
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
        pick = (
            sa.select(W.id)
            .where(
                W.state == WorkState.QUEUED.value,
                sa.or_(W.not_before.is_(None), W.not_before <= now),
            )
            .order_by(W.priority.desc(), W.created_at, W.id)
            .limit(limit)
        )
        if agents is not None:
            pick = pick.where(W.agent.in_(list(agents)))
        picked: Any = pick.scalar_subquery()
        if self.dialect == "postgresql":
            # A materialized CTE locks its rows once. As an ``IN (subquery)`` the planner may
            # rescan the pick per row (a semi join), and each rescan skips the rows this very
            # statement already updated and locks ``limit`` more: every queued row got claimed.
            cte = pick.with_for_update(skip_locked=True).cte("picked").prefix_with("MATERIALIZED")
            picked = sa.select(cte.c.id)
        stmt = (
            sa.update(work_t)
            .where(W.id.in_(picked), W.state == WorkState.QUEUED.value)
            .values(
                state=WorkState.RUNNING.value,
                lease_owner=owner,
                lease_epoch=W.lease_epoch + 1,
                lease_expires_at=now + timedelta(seconds=lease_ttl),
                last_heartbeat_at=now,
                not_before=None,
                state_reason="claimed",
                state_detail={"worker": owner},
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
            )
        )
        async with self._write() as conn:
            rows = (await conn.execute(stmt)).all()
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
            )
            for r in rows
        ]

    async def renew_leases(
        self, owner: str, *, lease_ttl: float
    ) -> dict[str, tuple[int, str | None]]:
        """Extend every lease ``owner`` holds in one statement and mark the worker alive.

        Returns ``{work_id: (epoch, control)}`` of the leases still held; a lease the worker
        believes it holds but that is missing here is lost.
        """
        now = utcnow()
        stmt = (
            sa.update(work_t)
            .where(W.lease_owner == owner, W.state == WorkState.RUNNING.value)
            .values(lease_expires_at=now + timedelta(seconds=lease_ttl), last_heartbeat_at=now)
            .returning(W.id, W.lease_epoch, W.control)
        )
        async with self._write() as conn:
            rows = (await conn.execute(stmt)).all()
            await conn.execute(
                sa.update(worker_t).where(worker_t.c.id == owner).values(last_seen_at=now)
            )
        return {r.id: (r.lease_epoch, r.control) for r in rows}

    async def _fenced_transition(
        self,
        conn: AsyncConnection,
        claim: Claim,
        target: WorkState,
        reason: str,
        values: dict[str, Any],
    ) -> None:
        now = utcnow()
        values = {"state_detail": None, **values}
        done = await conn.execute(
            sa.update(work_t)
            .where(
                W.id == claim.work_id,
                W.lease_epoch == claim.epoch,
                W.state == WorkState.RUNNING.value,
            )
            .values(state=target.value, state_reason=reason, updated_at=now, **values)
            .returning(W.id)
        )
        if done.first() is None:
            raise LeaseLost(claim.work_id, claim.epoch, f"could not record {reason}")

    _RELEASE = {"lease_owner": None, "lease_expires_at": None}

    async def complete_work(self, claim: Claim, result: Any) -> None:
        """running → succeeded, fenced; wakes a parent joined on this item."""
        async with self._write() as conn:
            await self._fenced_transition(
                conn,
                claim,
                WorkState.SUCCEEDED,
                "succeeded",
                {"result": result, "finished_at": utcnow(), "control": None, **self._RELEASE},
            )
            await self._wake_joined_parent(conn, claim.parent_id, claim.work_id)
        if claim.parent_id:
            self._fire(self._on_queued, "")

    async def fail_work(
        self, claim: Claim, error: dict[str, Any], *, retry_at: datetime | None = None
    ) -> WorkState:
        """running → queued again at ``retry_at`` (attempt + 1), or → failed when no attempt
        is left (or ``retry_at`` is None). Fenced. Returns the new state."""
        async with self._write() as conn:
            if retry_at is not None and claim.attempt < claim.max_attempts:
                await self._fenced_transition(
                    conn,
                    claim,
                    WorkState.QUEUED,
                    "retried",
                    {
                        "attempt": W.attempt + 1,
                        "not_before": retry_at,
                        "error": error,
                        "state_detail": {
                            "error": _summary(error),
                            "retry_at": retry_at.isoformat(),
                        },
                        **self._RELEASE,
                    },
                )
                state = WorkState.QUEUED
            else:
                await self._fenced_transition(
                    conn,
                    claim,
                    WorkState.FAILED,
                    "failed",
                    {
                        "error": error,
                        "finished_at": utcnow(),
                        "state_detail": {"error": _summary(error)},
                        **self._RELEASE,
                    },
                )
                await self._wake_joined_parent(conn, claim.parent_id, claim.work_id)
                state = WorkState.FAILED
        self._fire(self._on_queued, claim.agent)
        return state

    async def release_work(self, claim: Claim, reason: str = "released") -> None:
        """running → queued without spending an attempt (graceful shutdown). Fenced."""
        async with self._write() as conn:
            await self._fenced_transition(conn, claim, WorkState.QUEUED, reason, self._RELEASE)
        self._fire(self._on_queued, claim.agent)

    async def acknowledge_control(self, claim: Claim) -> WorkState:
        """The owning worker stops at a step boundary: running → paused or cancelled, as the
        pending control request says. Fenced."""
        async with self._write() as conn:
            control = (
                await conn.execute(sa.select(W.control).where(W.id == claim.work_id))
            ).scalar_one_or_none()
            if control == "pause":
                target, reason = WorkState.PAUSED, "paused"
                extra: dict[str, Any] = {"paused_from": WorkState.QUEUED.value}
            elif control == "cancel":
                target, reason = WorkState.CANCELLED, "cancelled"
                extra = {"finished_at": utcnow()}
            else:
                await self._check_lease(conn, claim)  # a lost lease is the better answer
                raise IllegalTransition(claim.work_id, "running", "paused", "no request pending")
            await self._fenced_transition(
                conn, claim, target, reason, {"control": None, **extra, **self._RELEASE}
            )
            if target is WorkState.CANCELLED:
                await self._wake_joined_parent(conn, claim.parent_id, claim.work_id)
        return target

    async def suspend_for_child(self, claim: Claim, child_id: str) -> Work | None:
        """Park the claimed item until ``child_id`` finishes. Returns the child if it already
        finished (nothing is written), else ``None`` after running → waiting."""
        async with self._write() as conn:
            q = sa.select(work_t).where(W.id == child_id)
            if self.dialect == "postgresql":
                q = q.with_for_update()  # the child's finish waits for this decision
            child = (await conn.execute(q)).first()
            if child is None:
                raise WorkNotFound(child_id)
            if child.state in {s.value for s in TERMINAL}:
                return Work(**child._mapping)
            await self._fenced_transition(
                conn,
                claim,
                WorkState.WAITING,
                "waiting",
                {
                    "wait_reason": f"join {child_id}",
                    "state_detail": {"kind": "child", "child_id": child_id},
                    **self._RELEASE,
                },
            )
        return None

    async def _wake_joined_parent(
        self, conn: AsyncConnection, parent_id: str | None, child_id: str
    ) -> None:
        if parent_id is None:
            return
        await conn.execute(
            sa.update(work_t)
            .where(
                W.id == parent_id,
                W.state == WorkState.WAITING.value,
                W.wait_reason == f"join {child_id}",
            )
            .values(
                state=WorkState.QUEUED.value,
                wait_reason=None,
                state_reason="resumed",
                state_detail={"child_id": child_id},
                updated_at=utcnow(),
            )
        )

    async def reap_expired_leases(self, *, limit: int = 500) -> list[tuple[str, str]]:
        """Expired leases go back to ``queued`` with attempt + 1 (a ``lease_expired`` event),
        to ``failed`` when their attempts are spent, or to the paused/cancelled state an
        operator asked for. Returns ``[(work_id, new_state)]``."""
        now = utcnow()
        pick = (
            sa.select(W.id, W.attempt, W.max_attempts, W.lease_epoch, W.control, W.parent_id)
            .where(W.state == WorkState.RUNNING.value, W.lease_expires_at < now)
            .order_by(W.lease_expires_at)
            .limit(limit)
        )
        if self.dialect == "postgresql":
            pick = pick.with_for_update(skip_locked=True)
        reaped: list[tuple[str, str]] = []
        async with self._write() as conn:
            for r in (await conn.execute(pick)).all():
                common = {
                    "lease_owner": None,
                    "lease_expires_at": None,
                    "updated_at": now,
                    "state_detail": None,
                }
                if r.control == "pause":
                    target, reason = WorkState.PAUSED, "paused"
                    values: dict[str, Any] = {"control": None, "paused_from": "queued"}
                elif r.control == "cancel":
                    target, reason = WorkState.CANCELLED, "cancelled"
                    values = {"control": None, "finished_at": now}
                elif r.attempt >= r.max_attempts:
                    target, reason = WorkState.FAILED, "failed"
                    msg = f"lease expired on attempt {r.attempt} of {r.max_attempts}"
                    values = {
                        "finished_at": now,
                        "error": {"type": "LeaseExpired", "message": msg},
                        "state_detail": {"cause": "lease_expired", "error": msg},
                    }
                else:
                    target, reason = WorkState.QUEUED, "lease_expired"
                    values = {
                        "attempt": W.attempt + 1,
                        "state_detail": {"expired_epoch": r.lease_epoch},
                    }
                done = await conn.execute(
                    sa.update(work_t)
                    .where(
                        W.id == r.id,
                        W.lease_epoch == r.lease_epoch,
                        W.state == WorkState.RUNNING.value,
                    )
                    .values(state=target.value, state_reason=reason, **{**common, **values})
                    .returning(W.id)
                )
                if done.first() is not None:
                    reaped.append((r.id, target.value))
                    if target in TERMINAL:
                        await self._wake_joined_parent(conn, r.parent_id, r.id)
        if reaped:
            self._fire(self._on_queued, "")
        return reaped

    # -- steps -------------------------------------------------------------------------------

    async def load_steps(self, work_id: str) -> dict[int, StepRecord]:
        """The recorded steps of a work item, for replay."""
        q = sa.select(S.seq, S.name, S.status, S.attempt, S.output, S.error).where(
            S.work_id == work_id
        )
        async with self._read() as conn:
            return {
                r.seq: StepRecord(r.seq, r.name, r.status, r.attempt, r.output, r.error)
                for r in await conn.execute(q)
            }

    def _step_params(self, claim: Claim, w: StepWrite) -> dict[str, Any]:
        return {
            "work_id": claim.work_id,
            "epoch": claim.epoch,
            "seq": w.seq,
            "name": w.name,
            "status": w.status,
            "attempt": w.attempt,
            "output": w.output,
            "error": w.error,
            "error_type": w.error_type,
            "idempotency_key": w.idempotency_key,
            "started_at": w.started_at,
            "finished_at": w.finished_at,
            "last_heartbeat_at": w.started_at if w.status == "running" else None,
            "progress": w.progress,
        }

    async def record_step(self, claim: Claim, write: StepWrite) -> None:
        """Record a finished step attempt (succeeded or failed) in one fenced statement."""
        params = self._step_params(claim, write)
        async with self._write() as conn:
            if (await conn.execute(self._record_finished, params)).first() is None:
                await self._explain_step_refusal(conn, claim, write.seq)

    async def record_step_running(
        self, claim: Claim, write: StepWrite, *, heartbeat_at: datetime | None = None
    ) -> None:
        """Record that a step attempt is running, or refresh its heartbeat and progress."""
        params = self._step_params(claim, write)
        if heartbeat_at is not None:
            params["last_heartbeat_at"] = heartbeat_at
        async with self._write() as conn:
            if (await conn.execute(self._record_running, params)).first() is None:
                # Not an error when the attempt already finished (a late start record).
                await self._check_lease(conn, claim)

    async def _check_lease(self, conn: AsyncConnection, claim: Claim) -> None:
        row = (
            await conn.execute(sa.select(W.state, W.lease_epoch).where(W.id == claim.work_id))
        ).first()
        if row is None or row.lease_epoch != claim.epoch or row.state != "running":
            raise LeaseLost(claim.work_id, claim.epoch)

    async def _explain_step_refusal(self, conn: AsyncConnection, claim: Claim, seq: int) -> None:
        await self._check_lease(conn, claim)
        raise IllegalTransition(claim.work_id, "running", "step recorded", f"step {seq} exists")

    async def spawn_child(
        self, claim: Claim, seq: int, agent: str, input: Any, *, max_attempts: int
    ) -> str:
        """Create (once) the child work item that step ``seq`` of ``claim`` spawns."""
        await self._assert_lease(claim)
        child, _ = await self.create_work(
            agent,
            input,
            source="child",
            source_event_id=f"{claim.work_id}:{seq}",
            parent_id=claim.work_id,
            conversation_id=None,
            max_attempts=max_attempts,
        )
        return child.id

    async def _assert_lease(self, claim: Claim) -> None:
        async with self._read() as conn:
            await self._check_lease(conn, claim)

    # -- operator control --------------------------------------------------------------------

    async def _operator_transition(
        self,
        work_id: str,
        target: WorkState,
        reason: str,
        actor: str | None,
        values: dict[str, Any] | None = None,
        sources: frozenset[WorkState] | None = None,
        detail: dict[str, Any] | None = None,
    ) -> Work:
        allowed = sources if sources is not None else allowed_sources(target)
        now = utcnow()
        async with self._write() as conn:
            current = (
                await conn.execute(sa.select(W.state).where(W.id == work_id))
            ).scalar_one_or_none()
            if current is None:
                raise WorkNotFound(work_id)
            if WorkState(current) not in allowed:
                raise IllegalTransition(work_id, current, target.value)
            row = (
                await conn.execute(
                    sa.update(work_t)
                    .where(W.id == work_id, W.state == current)
                    .values(
                        state=target.value,
                        state_reason=reason,
                        state_detail={"actor": actor, **(detail or {})},
                        updated_at=now,
                        **(values or {}),
                    )
                    .returning(*work_t.c)
                )
            ).first()
            if row is None:  # changed under us; report what it is now
                raise IllegalTransition(work_id, current, target.value, "it changed concurrently")
        if target is WorkState.QUEUED:
            self._fire(self._on_queued, row.agent)
        return Work(**row._mapping)

    async def _request_control(self, work_id: str, control: str, actor: str | None) -> Work:
        now = utcnow()
        async with self._write() as conn:
            row = (
                await conn.execute(
                    sa.update(work_t)
                    .where(W.id == work_id, W.state == WorkState.RUNNING.value)
                    .values(
                        control=control,
                        state_reason=f"{control}_requested",
                        state_detail={"actor": actor},
                        updated_at=now,
                    )
                    .returning(*work_t.c)
                )
            ).first()
        if row is None:
            return None  # type: ignore[return-value]
        self._fire(self._on_control, work_id)
        return Work(**row._mapping)

    async def pause_work(self, work_id: str, *, actor: str | None = None) -> Work:
        """Queued or waiting → paused at once; running → paused at its next step boundary."""
        requested = await self._request_control(work_id, "pause", actor)
        if requested is not None:
            return requested
        current = await self.get_work(work_id)
        return await self._operator_transition(
            work_id,
            WorkState.PAUSED,
            "paused",
            actor,
            {"paused_from": current.state},
            sources=frozenset({WorkState.QUEUED, WorkState.WAITING}),
        )

    async def resume_work(self, work_id: str, *, actor: str | None = None) -> Work:
        """paused → the state it was paused from (queued, or waiting if its wait is open)."""
        current = await self.get_work(work_id)
        target = WorkState.WAITING if current.paused_from == "waiting" else WorkState.QUEUED
        return await self._operator_transition(
            work_id,
            target,
            "resumed",
            actor,
            {"paused_from": None},
            sources=frozenset({WorkState.PAUSED}),
        )

    async def cancel_work(self, work_id: str, *, actor: str | None = None) -> Work:
        """Queued, waiting or paused → cancelled; running → cancelled at its next step boundary."""
        requested = await self._request_control(work_id, "cancel", actor)
        if requested is not None:
            return requested
        return await self._operator_transition(
            work_id,
            WorkState.CANCELLED,
            "cancelled",
            actor,
            {"finished_at": utcnow(), "control": None},
            sources=frozenset({WorkState.QUEUED, WorkState.WAITING, WorkState.PAUSED}),
        )

    async def retry_work(self, work_id: str, *, actor: str | None = None) -> Work:
        """failed or cancelled → queued for one more attempt; recorded steps are kept, so the
        work re-runs from the step that failed."""
        return await self._operator_transition(
            work_id,
            WorkState.QUEUED,
            "retried",
            actor,
            {
                "attempt": W.attempt + 1,
                "max_attempts": sa.func.max(W.max_attempts, W.attempt + 1)
                if self.dialect == "sqlite"
                else sa.func.greatest(W.max_attempts, W.attempt + 1),
                "finished_at": None,
                "not_before": None,
                "control": None,
            },
            sources=frozenset({WorkState.FAILED, WorkState.CANCELLED}),
        )

    # -- workers -----------------------------------------------------------------------------

    async def register_worker(
        self, worker_id: str, *, host: str, pid: int, concurrency: int
    ) -> None:
        now = utcnow()
        async with self._write() as conn:
            await conn.execute(
                sa.insert(worker_t).values(
                    id=worker_id,
                    host=host,
                    pid=pid,
                    concurrency=concurrency,
                    state="running",
                    started_at=now,
                    last_seen_at=now,
                )
            )

    async def stop_worker(self, worker_id: str) -> None:
        now = utcnow()
        async with self._write() as conn:
            await conn.execute(
                sa.update(worker_t)
                .where(worker_t.c.id == worker_id)
                .values(state="stopped", stopped_at=now, last_seen_at=now)
            )

    async def list_workers(self) -> list[WorkerRow]:
        async with self._read() as conn:
            rows = await conn.execute(sa.select(worker_t).order_by(worker_t.c.started_at.desc()))
            return [WorkerRow(**r._mapping) for r in rows]

    # -- retention ---------------------------------------------------------------------------

    async def prune(self, older_than: timedelta, *, batch: int = 500) -> int:
        """Delete finished work older than ``older_than`` (by finish time) with its steps,
        waits, outbox rows and events, ``batch`` items per short transaction."""
        cutoff = utcnow() - older_than
        deleted = 0
        while True:
            async with self._write() as conn:
                ids = (
                    (
                        await conn.execute(
                            sa.select(W.id)
                            .where(
                                W.state.in_([s.value for s in TERMINAL]),
                                W.finished_at < cutoff,
                            )
                            .limit(batch)
                        )
                    )
                    .scalars()
                    .all()
                )
                if not ids:
                    return deleted
                await conn.execute(sa.delete(event_t).where(event_t.c.work_id.in_(ids)))
                await conn.execute(sa.delete(outbox_t).where(outbox_t.c.work_id.in_(ids)))
                await conn.execute(sa.delete(step_t).where(S.work_id.in_(ids)))
                await conn.execute(sa.delete(wait_t).where(wait_t.c.work_id.in_(ids)))
                await conn.execute(sa.delete(work_t).where(W.id.in_(ids)))
            deleted += len(ids)
            await asyncio.sleep(0)  # let workers' transactions in between batches


def _summary(error: dict[str, Any]) -> str:
    return f"{error.get('type', 'Error')}: {error.get('message', '')}"[:500]
