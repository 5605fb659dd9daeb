"""The scheduler role: APScheduler jobs over the ledger: the lease reaper, wait deadlines and
cron schedules."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from ledger import Ledger
from scheduler.cron import DEFAULT_GRACE, CronSchedule, CronSchedules, ScheduleLike
from scheduler.timers import WaitTimers

log = logging.getLogger(__name__)

#: how long after the soonest lease's expiry the extra sweep runs (clock resolution, commit lag)
EXPIRY_MARGIN = 0.02
#: seconds a stopping scheduler waits for a cron start in flight (the database may be away)
STOP_TIMEOUT = 5.0


class SchedulerService:
    """Runs the periodic jobs of one scheduler process until :meth:`stop`."""

    def __init__(
        self,
        ledger: Ledger,
        *,
        reaper_interval: float = 2.0,
        schedules: Iterable[CronSchedule | ScheduleLike] = (),
        schedule_grace: float = DEFAULT_GRACE,
    ) -> None:
        self.ledger = ledger
        self.reaper_interval = reaper_interval
        # Built here, so a bad cron expression fails at start-up rather than at run().
        self.schedules = [
            s if isinstance(s, CronSchedule) else CronSchedule.from_config(s) for s in schedules
        ]
        self.schedule_grace = schedule_grace
        self._stopping = asyncio.Event()
        self._scheduler: AsyncIOScheduler | None = None
        self.timers: WaitTimers | None = None
        self.cron: CronSchedules | None = None
        self.reaped = 0

    async def reap_expired_leases(self) -> None:
        """Expired leases → queued (attempt + 1), failed (attempts spent), or the state an
        operator asked for; each with its event in the history."""
        try:
            reaped = await self.ledger.reap_expired_leases()
        except Exception as exc:  # the database may be briefly away; the next run retries
            log.warning("lease reaper failed: %s", exc)
            return
        for work_id, state in reaped:
            log.info("lease expired on work %s: now %s", work_id, state)
        self.reaped += len(reaped)
        await self._sweep_at_next_expiry()

    async def _sweep_at_next_expiry(self) -> None:
        """Sweep again right when the soonest lease runs out, if that comes before the next
        periodic sweep: a crashed worker's items are requeued at its lease's end, not up to
        ``reaper_interval`` later. (Leases of live workers are renewed before then; that sweep
        finds nothing and looks ahead again.)"""
        if self._scheduler is None or self._stopping.is_set():
            return
        try:
            soonest = await self.ledger.next_lease_expiry()
        except Exception as exc:
            log.debug("could not read the next lease expiry: %s", exc)
            return
        if soonest is None:
            return
        at = max(soonest, datetime.now(UTC)) + timedelta(seconds=EXPIRY_MARGIN)
        if at - datetime.now(UTC) >= timedelta(seconds=self.reaper_interval):
            return  # the periodic sweep comes first
        self._scheduler.add_job(
            self.reap_expired_leases,
            "date",
            run_date=at,
            id="lease-reaper-next",
            replace_existing=True,
            misfire_grace_time=None,
        )

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        self._scheduler = AsyncIOScheduler(timezone="UTC")
        self._scheduler.add_job(
            self.reap_expired_leases,
            "interval",
            seconds=self.reaper_interval,
            id="lease-reaper",
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
        )
        self._scheduler.start()
        await self.ledger.listen()
        self.timers = WaitTimers(self.ledger, self._scheduler)
        await self.timers.start()
        self.cron = CronSchedules(
            self.ledger, self._scheduler, self.schedules, grace=self.schedule_grace
        )
        await self.cron.start()
        log.info(
            "scheduler running: lease reaper every %.1fs, wait deadlines within %.0fs loaded, "
            "%d cron schedule(s)",
            self.reaper_interval,
            self.timers.horizon,
            len(self.schedules),
        )
        await self.reap_expired_leases()  # overdue work right away after a restart
        try:
            await self._stopping.wait()
        finally:
            if self.cron is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.cron.stop(), STOP_TIMEOUT)
            self._scheduler.shutdown(wait=False)
            await self.timers.stop()
            log.info("scheduler stopped")
