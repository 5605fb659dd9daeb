"""Durable timers: each due wait fires exactly once and on time, with one scheduler or two.

In-process: :class:`WaitTimers` keeps only ``max_loaded`` deadlines in APScheduler and refills
early, and a timer opened after start is picked up at once (the ``on_wait_deadline`` wake-up).
Across processes: two real ``tether scheduler`` processes share 200 timers.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
from collections import Counter
from collections.abc import Iterable
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from ledger import Claim, Ledger, WaitSpec, utcnow
from ledger.schema import event_t, wait_t, work_t
from scheduler import SchedulerService
from scheduler.timers import WaitTimers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))

from procs import ProcessGroup, wait_until

A = wait_t.c


async def claimed_sleepers(ledger: Ledger, n: int) -> list[Claim]:
    """``n`` work items, each claimed by a throwaway owner (as a worker about to sleep)."""
    for _ in range(n):
        await ledger.create_work("sleeper", None)
    claims = await ledger.claim_work("test-owner", limit=n, lease_ttl=600, agents=["sleeper"])
    assert len(claims) == n
    return claims


async def park(ledger: Ledger, claims: Iterable[Claim], deadlines: Iterable[datetime]) -> None:
    """Each claimed item enters a timer wait (step 1) due at its deadline."""
    pairs = list(zip(claims, deadlines, strict=True))
    for i in range(0, len(pairs), 20):  # a few at a time: the PostgreSQL pool has 20
        await asyncio.gather(
            *(
                ledger.enter_wait(claim, WaitSpec(seq=1, kind="timer", deadline=d), "sleep")
                for claim, d in pairs[i : i + 20]
            )
        )


def spread(n: int, start: datetime, seconds: float) -> list[datetime]:
    return [start + timedelta(seconds=seconds * i / n) for i in range(n)]


async def wait_rows(ledger: Ledger) -> list[sa.Row]:
    async with ledger.engines.read.connect() as conn:
        return list((await conn.execute(sa.select(wait_t))).all())


async def pending(ledger: Ledger) -> int:
    async with ledger.engines.read.connect() as conn:
        q = sa.select(sa.func.count()).select_from(wait_t).where(A.state == "pending")
        return (await conn.execute(q)).scalar_one()


def lateness(rows: Iterable[sa.Row]) -> list[float]:
    return sorted((r.resolved_at - r.deadline).total_seconds() for r in rows)


def p99(values: list[float]) -> float:
    return values[min(len(values) - 1, int(len(values) * 0.99))]


async def test_refill_fires_more_timers_than_are_loaded(ledger: Ledger) -> None:
    """100 timers, at most 10 deadlines loaded at once: the early refill loads the rest."""
    claims = await claimed_sleepers(ledger, 100)
    await park(ledger, claims, spread(100, utcnow() + timedelta(seconds=0.5), 1.5))
    aps = AsyncIOScheduler(timezone="UTC")
    aps.start()
    # No periodic refill and no wake-ups within the test: only the early refill can load more.
    timers = WaitTimers(ledger, aps, max_loaded=10, refill_every=600)
    try:
        await timers.start()
        give_up = utcnow() + timedelta(seconds=10)
        while await pending(ledger):
            assert timers.loaded_slots <= 10
            assert utcnow() < give_up, f"{await pending(ledger)} timers never fired"
            await asyncio.sleep(0.01)
    finally:
        aps.shutdown(wait=False)
    rows = await wait_rows(ledger)
    assert len(rows) == 100 and timers.fired == 100
    assert {(r.state, r.resolved_by) for r in rows} == {("resolved", "scheduler")}
    late = lateness(rows)
    # Without the early refill the last 90 would wait for the next periodic one, 600 s away;
    # the bound leaves room for a slow CI machine (it once took 1.8 s on PostgreSQL there).
    assert late[0] >= 0 and late[-1] < 5.0, late[-5:]


async def test_timer_opened_after_start_fires_at_once(ledger: Ledger, db_url: str) -> None:
    """A wait opened after the scheduler loaded its deadlines wakes it (in-process callback;
    on PostgreSQL from another connection, through NOTIFY), well before the next refill."""
    service = SchedulerService(ledger, reaper_interval=5.0)
    task = asyncio.create_task(service.run())
    writer = ledger if ledger.dialect == "sqlite" else await Ledger.open(db_url)
    try:
        await wait_until(lambda: service.timers is not None, 5, "the scheduler to start")
        await asyncio.sleep(0.2)  # started, loaded (nothing), waiting for the next refill in 5 s
        (claim,) = await claimed_sleepers(writer, 1)
        opened = utcnow()
        await park(writer, [claim], [opened + timedelta(seconds=0.3)])
        await wait_until(lambda: _none_pending(ledger), 3, "the timer to fire")
        fired_after = (utcnow() - opened).total_seconds()
    finally:
        service.stop()
        await task
        if writer is not ledger:
            await writer.close()
    (row,) = await wait_rows(ledger)
    assert (row.state, row.resolved_by) == ("resolved", "scheduler")
    assert 0 <= (row.resolved_at - row.deadline).total_seconds() < 0.5
    assert fired_after < 1.0
    assert (await ledger.get_work(claim.work_id)).state == "queued"


async def _none_pending(ledger: Ledger) -> bool:
    return await pending(ledger) == 0


async def test_two_scheduler_processes_fire_each_timer_once(
    ledger: Ledger, db_url: str, tmp_path: Path
) -> None:
    """Two ``tether scheduler`` processes, 200 timers due over 3 s: every wait is resolved
    exactly once (one ``timer_fired`` event per item, each item queued again), and on time."""
    n = 200
    procs = ProcessGroup(tmp_path / "procs")
    try:
        schedulers = [procs.scheduler(db_url, reaper_interval=1.0) for _ in range(2)]
        claims = await claimed_sleepers(ledger, n)
        for p in schedulers:
            await p.wait_ready()
        # PostgreSQL wakes both schedulers when a wait is opened (NOTIFY). SQLite cannot reach
        # another process: a scheduler there sees new deadlines at its next refill (every 5 s),
        # so the first timer is due after that.
        lead = 1.5 if ledger.dialect == "postgresql" else 6.0
        await park(ledger, claims, spread(n, utcnow() + timedelta(seconds=lead), 3.0))
        await wait_until(
            lambda: _none_pending(ledger), lead + 15, lambda: f"all timers\n{procs.tails()}", 0.1
        )
        for p in schedulers:
            assert p.alive, procs.tails()
    finally:
        procs.cleanup()

    rows = await wait_rows(ledger)
    assert len(rows) == n
    assert {(r.kind, r.state, r.resolved_by) for r in rows} == {("timer", "resolved", "scheduler")}
    assert all(r.resolution == {"fired": "due"} for r in rows)
    async with ledger.engines.read.connect() as conn:
        fired = Counter(
            (
                await conn.execute(
                    sa.select(event_t.c.work_id).where(event_t.c.type == "timer_fired")
                )
            ).scalars()
        )
        states = Counter((await conn.execute(sa.select(work_t.c.state))).scalars())
    assert set(fired) == {c.work_id for c in claims}
    assert set(fired.values()) == {1}
    assert states == {"queued": n}
    late = lateness(rows)
    summary = f"lateness median {statistics.median(late):.3f}s p99 {p99(late):.3f}s"
    print(f"[{ledger.dialect}] two schedulers, {n} timers: {summary}")
    assert late[0] >= 0, summary
    assert p99(late) < 1.0, summary


@pytest.fixture(autouse=True)
def _quiet_apscheduler() -> None:
    import logging

    logging.getLogger("apscheduler").setLevel(logging.WARNING)
