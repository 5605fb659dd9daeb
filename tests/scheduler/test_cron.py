"""Cron schedules start one work item per fire time, however many schedulers run (both DBs).

Production schedules are 5-field crontabs (minute resolution); to see many fire times in a few
seconds these tests hand :class:`CronSchedule` a seconds trigger (``CronTrigger(second="*")``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger

from config.settings import ScheduleConfig
from ledger import Ledger, utcnow
from ledger.schema import work_t
from scheduler import SchedulerService
from scheduler.cron import CronSchedule, CronSchedules, run_key

W = work_t.c


async def scheduled_runs(ledger: Ledger, name: str) -> list[tuple[str, str, object, str]]:
    """(source_event_id, agent, input, state) of every run of schedule ``name``."""
    q = (
        sa.select(W.source_event_id, W.agent, W.input, W.state)
        .where(W.source == f"schedule:{name}")
        .order_by(W.source_event_id)
    )
    async with ledger.engines.read.connect() as conn:
        return [tuple(r) for r in (await conn.execute(q)).all()]


def every_second(name: str = "tick") -> CronSchedule:
    return CronSchedule(
        name=name,
        agent="ticker",
        trigger=CronTrigger(second="*", timezone="UTC"),
        input={"from": "cron"},
    )


async def test_two_schedulers_start_each_fire_time_once(
    ledger: Ledger, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="scheduler.cron")
    other = await Ledger.open(db_url)  # a second process, as far as the database can tell
    grace = 2.0
    services = [
        SchedulerService(led, reaper_interval=5.0, schedules=[every_second()], schedule_grace=grace)
        for led in (ledger, other)
    ]
    started = utcnow()
    tasks = [asyncio.create_task(s.run()) for s in services]
    try:
        await asyncio.sleep(3.3)
    finally:
        for s in services:
            s.stop()
        await asyncio.gather(*tasks)
        stopped = utcnow()
        await other.close()

    runs = await scheduled_runs(ledger, "tick")
    times = [datetime.fromisoformat(key) for key, *_ in runs]
    # The dedup keys are the fire times: whole UTC seconds, one run each, none missing ...
    assert all(t.microsecond == 0 and t.utcoffset() == timedelta(0) for t in times)
    assert [key for key, *_ in runs] == [run_key(t) for t in times]
    assert all(b - a == timedelta(seconds=1) for a, b in itertools.pairwise(times))
    # ... from the catch-up at start (fire times missed within the grace period still run)
    # up to the last fire time before the schedulers stopped.
    assert started - timedelta(seconds=grace + 1) <= times[0] <= started
    assert stopped - timedelta(seconds=1.6) <= times[-1] <= stopped
    assert len(times) >= 4
    assert {(agent, str(inp), state) for _, agent, inp, state in runs} == {
        ("ticker", str({"from": "cron"}), "queued")
    }
    # Both schedulers tried (nearly) every fire time; the ledger let exactly one create it.
    crons = [s.cron for s in services]
    assert all(c is not None for c in crons)
    created = sum(c.created for c in crons if c is not None)
    duplicates = sum(c.duplicates for c in crons if c is not None)
    assert created == len(runs)
    assert duplicates >= len(runs) - 2
    # Each run is logged once, by the scheduler that started it.
    started_lines = [r for r in caplog.records if "started work" in r.getMessage()]
    assert len(started_lines) == len(runs)


async def test_five_field_schedule_dedups_on_the_minute(ledger: Ledger, db_url: str) -> None:
    """The production path: a crontab from the settings; every minute boundary within the grace
    period is one run, whichever of two schedulers gets there first."""
    config = ScheduleConfig(name="minutely", cron="* * * * *", agent="report", input=[1, 2])
    other = await Ledger.open(db_url)
    try:
        for led in (ledger, other, ledger):
            aps = AsyncIOScheduler(timezone="UTC")
            cron = CronSchedules(led, aps, [config], grace=60.0)
            await cron.start()  # runs the catch-up; the APScheduler job itself never fires here
    finally:
        await other.close()
    ((key, agent, inp, state),) = await scheduled_runs(ledger, "minutely")
    minute = datetime.fromisoformat(key)
    assert (minute.second, minute.microsecond, minute.utcoffset()) == (0, 0, timedelta(0))
    assert utcnow() - timedelta(seconds=61) < minute <= utcnow()
    assert (agent, inp, state) == ("report", [1, 2], "queued")


async def test_misfires_older_than_the_grace_period_are_skipped(ledger: Ledger) -> None:
    aps = AsyncIOScheduler(timezone="UTC")
    cron = CronSchedules(ledger, aps, [every_second("late")], grace=1.5)
    await cron.start()
    first = await scheduled_runs(ledger, "late")
    assert 1 <= len(first) <= 2
    # The process stalls for 10 s: only the fire times of the last 1.5 s still run (they
    # were started already, above), the 8 or so before are skipped, not started late.
    cron._state["late"].cursor = utcnow() - timedelta(seconds=10)
    stalled_at = utcnow()
    await cron.run_due("late")
    runs = await scheduled_runs(ledger, "late")
    assert len(runs) - len(first) <= 1  # a fire time that came due meanwhile
    assert all(stalled_at - datetime.fromisoformat(k) < timedelta(seconds=2) for k, *_ in runs)
    assert cron.duplicates >= 1
    assert cron.skipped == 1


async def test_a_failed_start_is_retried(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    """The database is away when a run is due: the fire time is retried, not lost."""
    create = ledger.create_work
    failures = [RuntimeError("database away")]

    async def flaky(*args: object, **kwargs: object) -> object:
        if failures:
            raise failures.pop()
        return await create(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ledger, "create_work", flaky)
    aps = AsyncIOScheduler(timezone="UTC")
    aps.start()
    try:
        cron = CronSchedules(ledger, aps, [every_second("flaky")], grace=30, retry_after=0.2)
        await cron.start()
        assert await scheduled_runs(ledger, "flaky") == []
        assert aps.get_job("schedule:flaky:retry") is not None
        # every fire time of the last 30 s, the failed one included (given time on a busy box)
        for _ in range(200):
            if len(await scheduled_runs(ledger, "flaky")) >= 30:
                break
            await asyncio.sleep(0.05)
    finally:
        aps.shutdown(wait=False)
    runs = await scheduled_runs(ledger, "flaky")
    assert len(runs) >= 30


def test_fire_times_follow_the_schedule_time_zone() -> None:
    config = ScheduleConfig(name="b", cron="30 8 * * *", agent="a", timezone="Europe/Berlin")
    schedule = CronSchedule.from_config(config)
    winter = list(
        schedule.fire_times(
            datetime(2026, 1, 14, 0, 0, tzinfo=UTC), datetime(2026, 1, 16, 0, 0, tzinfo=UTC)
        )
    )
    assert [run_key(t) for t in winter] == [
        "2026-01-14T07:30:00+00:00",
        "2026-01-15T07:30:00+00:00",
    ]
    summer = list(
        schedule.fire_times(
            datetime(2026, 7, 1, 7, 0, tzinfo=UTC), datetime(2026, 7, 1, 7, 0, tzinfo=UTC)
        )
    )
    assert summer == []  # 08:30 CEST is 06:30 UTC: already past
    assert schedule.source == "schedule:b"


async def test_stopping_lets_a_start_in_flight_finish(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stop arrives while a run is being created: the run is created, counted and logged, not
    cancelled halfway (committed in the ledger, unknown to the scheduler that made it)."""
    create = ledger.create_work
    armed = False
    in_flight = asyncio.Event()

    async def slow(*args: object, **kwargs: object) -> object:
        made = await create(*args, **kwargs)  # type: ignore[arg-type]
        if armed:  # a start by the APScheduler job, not the catch-up at start-up:
            in_flight.set()  # committed, and the answer is on its way back
            await asyncio.sleep(0.3)
        return made

    monkeypatch.setattr(ledger, "create_work", slow)
    service = SchedulerService(
        ledger, reaper_interval=5.0, schedules=[every_second("slow")], schedule_grace=1.0
    )
    task = asyncio.create_task(service.run())
    await asyncio.sleep(0.5)  # the catch-up is done
    armed = True
    await asyncio.wait_for(in_flight.wait(), 5)
    service.stop()
    await task
    runs = await scheduled_runs(ledger, "slow")
    assert service.cron is not None
    assert len(runs) >= 1
    assert service.cron.created == len(runs)
