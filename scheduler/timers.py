"""Wait deadlines on APScheduler: durable timers fire, and other waits follow ``on_timeout``.

The ledger is the source of truth. This process loads only the deadlines due within a horizon,
groups them into short slots (one APScheduler ``date`` job per slot, not per wait, so a million
pending timers cost a few hundred jobs), and refills as time moves on or when a new wait is
opened. A job asks the ledger to handle every wait that is due; the ledger's conditional update
makes sure each wait is handled once, however many schedulers run. Imports the ledger.
"""

from __future__ import annotations

import asyncio
import logging
import math
from datetime import UTC, datetime, timedelta

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from ledger import Ledger, utcnow

log = logging.getLogger(__name__)

BATCH = 1000


class WaitTimers:
    """Keeps APScheduler jobs for the wait deadlines due within ``horizon`` seconds."""

    def __init__(
        self,
        ledger: Ledger,
        scheduler: AsyncIOScheduler,
        *,
        horizon: float = 30.0,
        refill_every: float = 5.0,
        slot: float = 0.05,
        max_loaded: int = 20_000,
    ) -> None:
        self.ledger = ledger
        self.scheduler = scheduler
        self.horizon = horizon
        self.refill_every = refill_every
        self.slot = slot
        self.max_loaded = max_loaded
        self._slots: set[int] = set()
        self._refill_soon: asyncio.TimerHandle | None = None
        self.fired = 0

    async def start(self) -> None:
        self.scheduler.add_job(
            self.refill,
            "interval",
            seconds=self.refill_every,
            id="wait-deadlines-refill",
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
        )
        self.ledger.on_wait_deadline(self._on_new_wait)
        await self.fire_due()  # overdue work first, right after a restart
        await self.refill()

    def _on_new_wait(self, _wait_id: str) -> None:
        """A wait with a deadline was opened somewhere: refill shortly (debounced)."""
        if self._refill_soon is None:
            loop = asyncio.get_running_loop()
            self._refill_soon = loop.call_later(self.slot, self._refill_now)

    def _refill_now(self) -> None:
        self._refill_soon = None
        asyncio.get_running_loop().create_task(self.refill())

    async def refill(self) -> None:
        until = utcnow() + timedelta(seconds=self.horizon)
        try:
            deadlines = await self.ledger.next_deadlines(until=until, limit=self.max_loaded)
        except Exception as exc:  # the database may be away; the next refill retries
            log.warning("could not load wait deadlines: %s", exc)
            return
        for deadline in deadlines:
            self._schedule(deadline)
        if len(deadlines) == self.max_loaded:
            # More are due within the horizon than we load at once: come back before the last.
            self.scheduler.add_job(
                self.refill,
                "date",
                run_date=deadlines[-1],
                id="wait-deadlines-refill-early",
                replace_existing=True,
                misfire_grace_time=None,
            )

    def _schedule(self, deadline: datetime) -> None:
        slot = math.ceil(deadline.timestamp() / self.slot)
        if slot in self._slots:
            return
        self._slots.add(slot)
        self.scheduler.add_job(
            self._fire_slot,
            "date",
            run_date=datetime.fromtimestamp(slot * self.slot, UTC),
            args=[slot],
            id=f"due-{slot}",
            replace_existing=True,
            misfire_grace_time=None,
        )

    async def _fire_slot(self, slot: int) -> None:
        self._slots.discard(slot)
        await self.fire_due()

    async def fire_due(self) -> None:
        """Handle every wait that is due now, in batches."""
        while True:
            try:
                done = await self.ledger.fire_due_waits(limit=BATCH)
            except Exception as exc:
                log.warning("could not fire due waits: %s", exc)
                return
            self.fired += len(done)
            for wait_id, what in done:
                log.debug("wait %s %s", wait_id, what)
            if len(done) < BATCH:
                return

    @property
    def loaded_slots(self) -> int:
        return len(self._slots)
