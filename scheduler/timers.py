"""Wait deadlines on APScheduler: durable timers fire, and other waits follow ``on_timeout``.

The ledger is the source of truth. This process loads only the deadlines due within a horizon,
groups them into short slots (one APScheduler ``date`` job per slot, not per wait, so a million
pending timers cost a few hundred jobs), and refills as time moves on or when a new wait is
opened. A slot job only kicks a firing loop, which asks the ledger to handle every wait that is
due, in batches, until none is left. At most ``parallel`` loops run at once (PostgreSQL: 2, so
one transaction's round trips overlap the next one's Python work; SQLite: 1, it has one writer);
a slot that comes due while they are busy makes a running loop go round once more instead of
piling up transactions that, under overload, only compete for the same CPU. The ledger's
conditional update makes sure each wait is handled once, however many schedulers run. Imports
the ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from datetime import UTC, datetime, timedelta

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from ledger import Ledger, utcnow

log = logging.getLogger(__name__)

#: Waits one ``fire_due_waits`` transaction handles at most.
BATCH = 1000
#: PostgreSQL: firing loops at once (``SKIP LOCKED`` hands each transaction its own waits), so
#: one transaction's round trips overlap another's Python work. SQLite has one writer: 1.
PG_PARALLEL = 2


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
        parallel: int | None = None,
    ) -> None:
        self.ledger = ledger
        self.scheduler = scheduler
        self.horizon = horizon
        self.refill_every = refill_every
        self.slot = slot
        self.max_loaded = max_loaded
        postgres = ledger.dialect == "postgresql"
        self.parallel = parallel if parallel is not None else (PG_PARALLEL if postgres else 1)
        self.batch = BATCH
        self._slots: set[int] = set()
        self._refill_soon: asyncio.TimerHandle | None = None
        self._firing: set[asyncio.Task[None]] = set()
        self._again = False
        self._refill_after_fire = False
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
        if len(deadlines) == self.max_loaded and deadlines[-1] <= utcnow():
            # Everything loaded is due already (firing lags behind): fire it, then load more.
            self._refill_after_fire = True
            self.kick()
        elif len(deadlines) == self.max_loaded:
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
        self.kick()

    def kick(self) -> None:
        """Something is due: start a firing loop, up to ``parallel`` at once; past that, the
        running loops go round once more when they finish their pass."""
        self._again = True
        if len(self._firing) < self.parallel:
            task = asyncio.get_running_loop().create_task(self._fire_loop())
            self._firing.add(task)
            task.add_done_callback(self._firing.discard)

    async def _fire_loop(self) -> None:
        while self._again or self._refill_after_fire:
            while self._again:
                self._again = False
                await self.fire_due()
            if self._refill_after_fire:
                self._refill_after_fire = False
                await self.refill()

    async def stop(self) -> None:
        if self._refill_soon is not None:
            self._refill_soon.cancel()
            self._refill_soon = None
        tasks = list(self._firing)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def fire_due(self) -> None:
        """Handle every wait that is due now, in batches."""
        while True:
            try:
                done = await self.ledger.fire_due_waits(limit=self.batch)
            except Exception as exc:
                log.warning("could not fire due waits: %s", exc)
                return
            self.fired += len(done)
            for wait_id, what in done:
                log.debug("wait %s %s", wait_id, what)
            if len(done) < self.batch:
                return

    @property
    def loaded_slots(self) -> int:
        return len(self._slots)
