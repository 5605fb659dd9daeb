"""Worker liveness rows and retention (``tether db prune``). Imported only by ledger.ledger."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ledger._base import LedgerBase, W
from ledger.records import utcnow
from ledger.schema import WorkerRow, event_t, outbox_t, step_t, wait_t, work_t, worker_t
from ledger.states import TERMINAL, WorkState


class MaintenanceQueries(LedgerBase):
    async def register_worker(
        self, worker_id: str, *, host: str, pid: int, concurrency: int
    ) -> None:
        now = utcnow()
        row = {
            "id": worker_id,
            "host": host,
            "pid": pid,
            "concurrency": concurrency,
            "state": "running",
            "started_at": now,
            "last_seen_at": now,
        }
        await self.engines.run_write(lambda conn: conn.execute(sa.insert(worker_t).values(row)))

    async def stop_worker(self, worker_id: str) -> None:
        now = utcnow()
        stmt = (
            sa.update(worker_t)
            .where(worker_t.c.id == worker_id)
            .values(state="stopped", stopped_at=now, last_seen_at=now)
        )
        await self.engines.run_write(lambda conn: conn.execute(stmt))

    async def list_workers(self) -> list[WorkerRow]:
        async with self._read() as conn:
            rows = await conn.execute(sa.select(worker_t).order_by(worker_t.c.started_at.desc()))
            return [WorkerRow(**r._mapping) for r in rows]

    async def count_leases_by_owner(self) -> dict[str, int]:
        """``{worker_id: number of running work items it holds a lease on}``."""
        q = (
            sa.select(W.lease_owner, sa.func.count())
            .where(W.state == WorkState.RUNNING.value, W.lease_owner.is_not(None))
            .group_by(W.lease_owner)
        )
        async with self._read() as conn:
            return {owner: n for owner, n in await conn.execute(q)}

    async def prune(self, older_than: timedelta, *, batch: int = 500) -> int:
        """Delete finished work older than ``older_than`` (by finish time) with its steps,
        waits, outbox rows and events, ``batch`` items per short transaction."""
        cutoff = utcnow() - older_than
        terminal = [s.value for s in TERMINAL]

        def tx(conn: Connection) -> int:
            ids = (
                conn.execute(
                    sa.select(W.id)
                    .where(W.state.in_(terminal), W.finished_at < cutoff)
                    .limit(batch)
                )
                .scalars()
                .all()
            )
            if ids:
                conn.execute(sa.delete(event_t).where(event_t.c.work_id.in_(ids)))
                conn.execute(sa.delete(outbox_t).where(outbox_t.c.work_id.in_(ids)))
                conn.execute(sa.delete(step_t).where(step_t.c.work_id.in_(ids)))
                conn.execute(sa.delete(wait_t).where(wait_t.c.work_id.in_(ids)))
                conn.execute(sa.delete(work_t).where(W.id.in_(ids)))
            return len(ids)

        deleted = 0
        while n := await self.engines.run_write(tx):
            deleted += n
            await asyncio.sleep(0)  # let workers' transactions in between batches
        return deleted
