"""Cron schedules: start work on a timetable, once per fire time, however many schedulers run.

Each schedule is an APScheduler ``CronTrigger`` job in the scheduler's ``AsyncIOScheduler``, used
only as a wake-up. When it runs, the job works out which fire times of the trigger are due from
the trigger itself (never from the clock's "now"), and for each fire time ``T`` calls
``ledger.create_work(agent, input, source="schedule:NAME", source_event_id=T)``. Every
scheduler process computes the same ``T`` from the same cron expression, and the ledger's unique
``(source, source_event_id)`` makes the second create a no-op: two schedulers never start the
same run twice. APScheduler 3 does not hand a job its scheduled run time, hence the trigger.

A fire time missed by less than ``grace`` seconds (a busy loop, a database outage, a restart)
still runs, late; older ones are skipped with a warning. Imports the ledger.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger

from ledger import Ledger, utcnow

log = logging.getLogger(__name__)

#: Seconds a fire time may be missed by and still run.
DEFAULT_GRACE = 60.0
#: Seconds before a failed start (database away) is tried again, within the grace period.
RETRY_AFTER = 2.0
_TICK = timedelta(microseconds=1)


class ScheduleLike(Protocol):
    """What :class:`config.settings.ScheduleConfig` provides."""

    name: str
    cron: str
    agent: str
    input: Any
    timezone: str


@dataclass(frozen=True)
class CronSchedule:
    """One schedule with its trigger. Production builds it from a 5-field crontab
    (:meth:`from_config`); tests may pass any trigger, e.g. ``CronTrigger(second="*")``."""

    name: str
    agent: str
    trigger: BaseTrigger
    input: Any = None
    #: how the timetable reads in logs (the crontab and its time zone)
    label: str = ""

    @classmethod
    def from_config(cls, config: ScheduleLike) -> CronSchedule:
        trigger = CronTrigger.from_crontab(config.cron, timezone=config.timezone)
        label = f"'{config.cron}' ({config.timezone})"
        return cls(config.name, config.agent, trigger, config.input, label)

    @property
    def source(self) -> str:
        return f"schedule:{self.name}"

    def fire_times(self, after: datetime, until: datetime) -> Iterator[datetime]:
        """The trigger's fire times ``t`` with ``after < t <= until``, oldest first."""
        t = self.trigger.get_next_fire_time(None, after + _TICK)
        while t is not None and t <= until:
            yield t
            t = self.trigger.get_next_fire_time(t, t + _TICK)


def run_key(fire_time: datetime) -> str:
    """The dedup key of the run for ``fire_time``: the same in every scheduler process."""
    return fire_time.astimezone(UTC).isoformat()


@dataclass
class _State:
    schedule: CronSchedule
    #: every fire time up to here has been started (or skipped) by this process
    cursor: datetime
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class CronSchedules:
    """Starts one work item per fire time of each schedule (see the module docstring)."""

    def __init__(
        self,
        ledger: Ledger,
        scheduler: AsyncIOScheduler,
        schedules: Iterable[CronSchedule | ScheduleLike],
        *,
        grace: float = DEFAULT_GRACE,
        retry_after: float = RETRY_AFTER,
    ) -> None:
        self.ledger = ledger
        self.scheduler = scheduler
        self.grace = grace
        self.retry_after = retry_after
        self.schedules = [
            s if isinstance(s, CronSchedule) else CronSchedule.from_config(s) for s in schedules
        ]
        names = [s.name for s in self.schedules]
        if len(set(names)) != len(names):
            raise ValueError(f"schedule names must be unique: {names}")
        self._state: dict[str, _State] = {}
        #: runs this process created, and fire times it found already started elsewhere
        self.created = 0
        self.duplicates = 0
        self.skipped = 0
        self._stopped = False

    async def start(self) -> None:
        # Fire times missed within the grace period (this process was down) still run.
        since = utcnow() - timedelta(seconds=self.grace)
        for schedule in self.schedules:
            self._state[schedule.name] = _State(schedule, since)
            self.scheduler.add_job(
                self.run_due,
                trigger=schedule.trigger,
                args=[schedule.name],
                id=schedule.source,
                name=schedule.source,
                max_instances=1,
                coalesce=True,
                misfire_grace_time=None,  # run_due applies the grace period itself
            )
            log.info(
                "schedule %s: %s, agent %s, next run at %s",
                schedule.name,
                schedule.label or schedule.trigger,
                schedule.agent,
                schedule.trigger.get_next_fire_time(None, utcnow()),
            )
        for schedule in self.schedules:
            await self.run_due(schedule.name)

    async def run_due(self, name: str) -> None:
        """Start the run of every fire time of ``name`` that is due and not started yet."""
        state = self._state[name]
        schedule = state.schedule
        async with state.lock:
            if self._stopped:
                return
            now = utcnow()
            floor = now - timedelta(seconds=self.grace)
            if state.cursor < floor:
                missed = next(schedule.fire_times(state.cursor, floor), None)
                if missed is not None:
                    log.warning(
                        "schedule %s: fire times from %s to %s were missed by more than %gs "
                        "and are skipped",
                        name,
                        run_key(missed),
                        run_key(floor),
                        self.grace,
                    )
                    self.skipped += 1
                state.cursor = floor
            for fire_time in schedule.fire_times(state.cursor, now):
                if self._stopped:
                    return
                key = run_key(fire_time)
                try:
                    work, created = await self.ledger.create_work(
                        schedule.agent,
                        schedule.input,
                        source=schedule.source,
                        source_event_id=key,
                    )
                except Exception as exc:  # the database may be away: retry within the grace
                    log.warning(
                        "schedule %s: could not start the run for %s (%s); retrying in %gs",
                        name,
                        key,
                        exc,
                        self.retry_after,
                    )
                    self._retry(name, now)
                    return
                state.cursor = fire_time
                if created:
                    self.created += 1
                    late = (utcnow() - fire_time).total_seconds()
                    log.info(
                        "schedule %s: started work %s (agent %s) for %s (%.3fs late)",
                        name,
                        work.id,
                        schedule.agent,
                        key,
                        late,
                    )
                else:
                    self.duplicates += 1
                    log.debug("schedule %s: run for %s already started: %s", name, key, work.id)

    async def stop(self) -> None:
        """Start no more runs, and wait for a start in flight to finish, so that a run the
        ledger created is also counted and logged (APScheduler's shutdown would cancel it)."""
        self._stopped = True
        for state in self._state.values():
            async with state.lock:
                pass

    def _retry(self, name: str, now: datetime) -> None:
        self.scheduler.add_job(
            self.run_due,
            "date",
            run_date=now + timedelta(seconds=self.retry_after),
            args=[name],
            id=f"schedule:{name}:retry",
            replace_existing=True,
            misfire_grace_time=None,
        )


__all__ = ["DEFAULT_GRACE", "CronSchedule", "CronSchedules", "run_key"]
