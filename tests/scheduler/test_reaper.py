"""The scheduler's lease reaper: periodic sweeps, plus one at the soonest lease's expiry.

A crashed worker's lease is requeued when it runs out, not up to ``reaper_interval`` later:
here the periodic sweep is a minute away, so only the look-ahead can requeue in time.
"""

from __future__ import annotations

import asyncio
import time

from ledger import Ledger
from scheduler import SchedulerService

LEASE_TTL = 1.0


async def _wait_for_state(ledger: Ledger, work_id: str, state: str, timeout: float) -> float:
    """Seconds until ``work_id`` is in ``state``; fails after ``timeout``."""
    t0 = time.monotonic()
    while (await ledger.get_work(work_id)).state != state:
        assert time.monotonic() - t0 < timeout, f"{work_id} not {state} after {timeout}s"
        await asyncio.sleep(0.01)
    return time.monotonic() - t0


async def test_a_dead_lease_is_reaped_when_it_expires_not_at_the_next_sweep(
    ledger: Ledger,
) -> None:
    work, _ = await ledger.create_work("echo", None)
    [claim] = await ledger.claim_work("dead-worker", limit=1, lease_ttl=LEASE_TTL)
    claimed_at = time.monotonic()
    sched = SchedulerService(ledger, reaper_interval=60.0)
    task = asyncio.create_task(sched.run())
    try:
        await _wait_for_state(ledger, work.id, "queued", timeout=LEASE_TTL + 5)
        requeued_after = time.monotonic() - claimed_at
        # the lease ran out at LEASE_TTL; the periodic sweep would have come at 60 s
        assert LEASE_TTL - 0.05 <= requeued_after < LEASE_TTL + 1.0, requeued_after
        assert (await ledger.get_work(work.id)).attempt == claim.attempt + 1
        # a lease that a live worker keeps renewing is left alone by the look-ahead sweeps
        [live] = await ledger.claim_work("live-worker", limit=1, lease_ttl=LEASE_TTL)
        await sched.reap_expired_leases()  # looks ahead to the new lease
        for _ in range(6):
            await asyncio.sleep(LEASE_TTL / 3)
            await ledger.renew_leases("live-worker", lease_ttl=LEASE_TTL)
        assert (await ledger.get_work(work.id)).state == "running"
        assert sched.reaped == 1
        # ... and reaped once the renewals stop
        await _wait_for_state(ledger, live.work_id, "queued", timeout=LEASE_TTL + 5)
        assert sched.reaped == 2
    finally:
        sched.stop()
        await task
