"""Shared helpers for the worker tests: run a real WorkerPool in the background and wait for work.

Imported as a plain module (``import helpers_worker``): pytest's default ``prepend`` import mode
puts this directory on ``sys.path`` for the test modules beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterable
from datetime import timedelta
from typing import Any

import sqlalchemy as sa

from ledger import Ledger, utcnow
from ledger.schema import Event, Step, Work, work_t
from worker import WorkerPool

TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
#: Default timeout for one wait; every test stays well under it when the code works.
TIMEOUT = 8.0


@contextlib.asynccontextmanager
async def running_pool(ledger: Ledger, **kwargs: Any) -> AsyncIterator[WorkerPool]:
    """A real :class:`WorkerPool` running in a background task; stopped (and awaited) on exit.

    An exception that ends ``pool.run()`` is re-raised here instead of vanishing."""
    kwargs.setdefault("concurrency", 4)
    kwargs.setdefault("lease_ttl", 30.0)
    kwargs.setdefault("poll_interval", 0.05)
    kwargs.setdefault("shutdown_grace", 2.0)
    pool = WorkerPool(ledger, **kwargs)
    task = asyncio.create_task(pool.run(), name=f"test-pool:{pool.worker_id}")
    pool._test_task = task  # type: ignore[attr-defined]  # read by wait_for_state
    try:
        yield pool
    finally:
        pool.stop()
        await asyncio.wait_for(task, timeout=TIMEOUT)


async def wait_for_state(
    ledger: Ledger,
    work_id: str,
    states: Iterable[str] = TERMINAL_STATES,
    *,
    timeout: float = TIMEOUT,
    pool: WorkerPool | None = None,
) -> Work:
    """Poll until the work item is in one of ``states``; fail the test with its history if not."""
    wanted = frozenset(states)
    deadline = time.monotonic() + timeout
    while True:
        work = await ledger.get_work(work_id)
        if work.state in wanted:
            return work
        task = getattr(pool, "_test_task", None)
        if task is not None and task.done():
            task.result()  # raise what stopped the pool
            raise AssertionError(f"the pool stopped while work {work_id} was {work.state}")
        if time.monotonic() > deadline:
            history = await event_types(ledger, work_id)
            raise AssertionError(
                f"work {work_id} is {work.state}, not {sorted(wanted)}, after {timeout}s; "
                f"events: {history}; error: {work.error}"
            )
        await asyncio.sleep(0.02)


async def wait_until(predicate: Any, *, timeout: float = TIMEOUT, what: str = "condition") -> None:
    """Poll an async or sync zero-argument predicate until it is true."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def run_work(
    ledger: Ledger,
    agent: str,
    input: Any = None,
    *,
    states: Iterable[str] = TERMINAL_STATES,
    timeout: float = TIMEOUT,
    **pool_kwargs: Any,
) -> Work:
    """Create a work item for ``agent`` and run a pool until it reaches one of ``states``."""
    work, _ = await ledger.create_work(agent, input)
    return await run_until(ledger, work.id, states=states, timeout=timeout, **pool_kwargs)


async def run_until(
    ledger: Ledger,
    work_id: str,
    *,
    states: Iterable[str] = TERMINAL_STATES,
    timeout: float = TIMEOUT,
    **pool_kwargs: Any,
) -> Work:
    """Run a pool until the existing work item reaches one of ``states``."""
    async with running_pool(ledger, **pool_kwargs) as pool:
        return await wait_for_state(ledger, work_id, states, timeout=timeout, pool=pool)


async def events(ledger: Ledger, work_id: str) -> list[Event]:
    return await ledger.list_events(work_id)


async def event_types(ledger: Ledger, work_id: str) -> list[str]:
    return [e.type for e in await ledger.list_events(work_id)]


async def steps_by_seq(ledger: Ledger, work_id: str) -> dict[int, Step]:
    return {s.seq: s for s in await ledger.list_steps(work_id)}


async def expire_lease_and_reap(ledger: Ledger, work_id: str) -> None:
    """Make the running item's lease expire now and let the reaper take it back.

    The lease is moved into the past with a plain ``UPDATE`` (``updated_at`` untouched, so no
    history event), then :meth:`Ledger.reap_expired_leases` does what the scheduler's reaper
    does. Repeated if a renewal slipped in between the two statements."""
    for _ in range(50):
        await ledger.engines.run_write(_expire_lease, work_id)
        reaped = await ledger.reap_expired_leases()
        if any(wid == work_id for wid, _ in reaped):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"could not expire the lease of work {work_id}")


def _expire_lease(conn: sa.Connection, work_id: str) -> None:
    conn.execute(
        sa.update(work_t)
        .where(work_t.c.id == work_id, work_t.c.state == "running")
        .values(lease_expires_at=utcnow() - timedelta(hours=1))
    )
