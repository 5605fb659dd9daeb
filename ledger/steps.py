"""Step records: what already happened. Fenced on the lease epoch, one statement per record.

Imported only by :mod:`ledger.ledger`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection

from ledger._base import LedgerBase, W, check_lease
from ledger.errors import IllegalTransition, LeaseLost
from ledger.prepared import Prepared
from ledger.records import Claim, StepRecord, StepWrite, utcnow
from ledger.schema import JSONType, step_t
from ledger.states import WorkState

S = step_t.c

_COLUMNS = (
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
    "durability",
    "committed_at",
)
#: step columns a step may fill from ``StepWrite.extra`` (model-call metadata); written when
#: the attempt finishes, never by a running record
STEP_META_COLUMNS: tuple[str, ...] = (
    "model",
    "prompt_fingerprint",
    "input_tokens",
    "output_tokens",
    "cost",
    "finish_reason",
    "model_answered",
    "total_tokens",
    "latency_ms",
    "tool_calls",
    "output_committed",
)
_COLUMNS = _COLUMNS + STEP_META_COLUMNS
_TYPES: dict[str, Any] = {
    "output": JSONType,
    "error": JSONType,
    # SQL NULL, not JSON 'null', for "no progress reported", so the heartbeat upsert's
    # COALESCE keeps the progress reported before
    "progress": sa.JSON(none_as_null=True).with_variant(
        pg_dialect.JSONB(none_as_null=True), "postgresql"
    ),
    "started_at": S.started_at.type,
    "finished_at": S.finished_at.type,
    "last_heartbeat_at": S.last_heartbeat_at.type,
    "committed_at": S.committed_at.type,
}


def _finishing_conflict(new: Any) -> tuple[dict[str, Any], Any]:
    """What a finished attempt overwrites on conflict, and when: never a succeeded record."""
    keep = ("work_id", "seq", "last_heartbeat_at", "progress")
    set_ = {c: getattr(new, c) for c in _COLUMNS if c not in keep}
    set_["progress"] = sa.func.coalesce(new.progress, S.progress)
    return set_, S.status != "succeeded"


def batch_step_upsert(dialect: str) -> Any:
    """``INSERT … VALUES … ON CONFLICT DO UPDATE … RETURNING`` for finished attempts, executed
    with many parameter sets at once (group commit). Not fenced itself: the caller checks the
    leases of the whole batch in the same transaction first."""
    insert = sqlite_dialect.insert if dialect == "sqlite" else pg_dialect.insert
    stmt = insert(step_t).values(
        {c: sa.bindparam(c, type_=_TYPES.get(c, S[c].type)) for c in _COLUMNS}
    )
    set_, where = _finishing_conflict(stmt.excluded)
    return stmt.on_conflict_do_update(
        index_elements=["work_id", "seq"], set_=set_, where=where
    ).returning(S.work_id, S.seq)


def fenced_step_upsert(dialect: str, *, finishing: bool) -> Any:
    """``INSERT … SELECT … FROM work WHERE <lease is ours> ON CONFLICT DO UPDATE``.

    One statement records a step attempt only while the claim's epoch is current; a succeeded
    record is never overwritten. Finishing statements overwrite a running or failed attempt.
    Running statements start a new attempt over an older one, or refresh the heartbeat and
    progress of the same running attempt (a late one never reopens a finished attempt).
    """
    insert = sqlite_dialect.insert if dialect == "sqlite" else pg_dialect.insert
    values = [sa.bindparam(c, type_=_TYPES.get(c, S[c].type)).label(c) for c in _COLUMNS]
    source = sa.select(*values).where(
        W.id == sa.bindparam("work_id"),
        W.lease_epoch == sa.bindparam("epoch"),
        W.state == WorkState.RUNNING.value,
    )
    stmt = insert(step_t).from_select(list(_COLUMNS), source)
    new = stmt.excluded
    if finishing:
        set_, where = _finishing_conflict(new)
    else:
        set_ = {
            "name": new.name,
            "status": new.status,
            "attempt": new.attempt,
            "error": sa.case((S.attempt == new.attempt, S.error), else_=None),
            "error_type": sa.case((S.attempt == new.attempt, S.error_type), else_=None),
            "started_at": new.started_at,
            "finished_at": None,
            "last_heartbeat_at": new.last_heartbeat_at,
            "progress": sa.func.coalesce(new.progress, S.progress),
        }
        where = sa.and_(
            S.status != "succeeded",
            sa.or_(
                S.attempt < new.attempt,
                sa.and_(S.attempt == new.attempt, S.status == "running"),
            ),
        )
    return stmt.on_conflict_do_update(
        index_elements=["work_id", "seq"], set_=set_, where=where
    ).returning(S.seq)


class StepQueries(LedgerBase):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._record_finished = Prepared(
            fenced_step_upsert(self.dialect, finishing=True), self.engines.write_dialect
        )
        self._record_running = fenced_step_upsert(self.dialect, finishing=False)
        self._record_batch = batch_step_upsert(self.dialect)

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

    @staticmethod
    def _step_params(claim: Claim, w: StepWrite) -> dict[str, Any]:
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
            "durability": w.durability,
            "committed_at": None if w.status == "running" else utcnow(),
            **{c: w.extra.get(c) for c in STEP_META_COLUMNS},
        }

    async def record_step(self, claim: Claim, write: StepWrite) -> None:
        """Record a finished step attempt (succeeded or failed) in one fenced statement."""
        outcome = await self._record_one(claim, write)
        if outcome is not None:
            raise outcome

    async def _record_one(self, claim: Claim, write: StepWrite) -> BaseException | None:
        """One finished attempt, fenced inside its insert (no separate lease ``SELECT``);
        returns what refused it (:class:`LeaseLost`, :class:`IllegalTransition`) or ``None``."""
        params = self._step_params(claim, write)
        stmt = self._record_finished

        def tx(conn: Connection) -> BaseException | None:
            if stmt.first(conn, params) is not None:
                return None
            try:
                check_lease(conn, claim)
            except LeaseLost as lost:
                return lost
            return IllegalTransition(
                claim.work_id, "running", "step recorded", f"step {write.seq} exists"
            )

        return await self.engines.run_single(tx)

    async def record_steps(
        self, batch: Sequence[tuple[Claim, StepWrite]]
    ) -> list[BaseException | None]:
        """Record many finished step attempts, of any number of work items, in ONE transaction
        (group commit). Returns one outcome per entry, in order: ``None`` when recorded,
        :class:`LeaseLost` when that item's lease is no longer the claim's (nothing of that
        item is written), :class:`IllegalTransition` when its step is already recorded as
        succeeded. Other items' records commit regardless."""
        if not batch:
            return []
        if len(batch) == 1:  # the common ``sync`` case: the lease check inside the insert
            return [await self._record_one(*batch[0])]
        work_ids = sorted({claim.work_id for claim, _ in batch})
        stmt = self._record_batch

        def tx(conn: Connection) -> list[BaseException | None]:
            held: dict[str, int] = {}
            for i in range(0, len(work_ids), 500):
                rows = conn.execute(
                    sa.select(W.id, W.lease_epoch).where(
                        W.id.in_(work_ids[i : i + 500]), W.state == WorkState.RUNNING.value
                    )
                )
                held.update({r.id: r.lease_epoch for r in rows})
            outcomes: list[BaseException | None] = []
            params = []
            for claim, write in batch:
                if held.get(claim.work_id) != claim.epoch:
                    outcomes.append(LeaseLost(claim.work_id, claim.epoch))
                    continue
                outcomes.append(None)
                p = self._step_params(claim, write)
                del p["epoch"]
                params.append(p)
            if params:
                done = {(r.work_id, r.seq) for r in conn.execute(stmt, params)}
                for i, (claim, write) in enumerate(batch):
                    if outcomes[i] is None and (claim.work_id, write.seq) not in done:
                        outcomes[i] = IllegalTransition(
                            claim.work_id, "running", "step recorded", f"step {write.seq} exists"
                        )
            return outcomes

        return await self.engines.run_write(tx)

    async def record_step_running(
        self, claim: Claim, write: StepWrite, *, heartbeat_at: Any = None
    ) -> None:
        """Record that a step attempt is running, or refresh its heartbeat and progress."""
        params = self._step_params(claim, write)
        if heartbeat_at is not None:
            params["last_heartbeat_at"] = heartbeat_at
        stmt = self._record_running

        def tx(conn: Connection) -> None:
            if conn.execute(stmt, params).first() is None:
                # Not an error when the attempt already finished (a late start record).
                check_lease(conn, claim)

        await self.engines.run_write(tx)

    async def assert_lease(self, claim: Claim) -> None:
        """Raise ``LeaseLost`` unless ``claim`` still holds its lease."""
        await self.engines.run_read(check_lease, claim)

    async def spawn_child(
        self, claim: Claim, seq: int, agent: str, input: Any, *, max_attempts: int
    ) -> str:
        """Create (once) the child work item that step ``seq`` of ``claim`` spawns."""
        await self.assert_lease(claim)
        child, _ = await self.create_work(  # type: ignore[attr-defined]
            agent,
            input,
            source="child",
            source_event_id=f"{claim.work_id}:{seq}",
            parent_id=claim.work_id,
            max_attempts=max_attempts,
        )
        return child.id
