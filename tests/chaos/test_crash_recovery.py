"""Crash tests crash: SIGKILLed worker processes, recovered by the lease reaper.

A ``tether worker`` subprocess runs ``crash_twenty`` (20 steps, each appends its idempotency key
to an effects file and sleeps 50 ms); the test SIGKILLs it a random 0.1-0.6 s after it claimed
the item (kills land inside steps and around their records; the summary line printed with
``-s`` counts where), starts a fresh worker, and repeats; a
``tether scheduler`` subprocess requeues each dead lease (TTL 1 s, reaper every 0.2 s). After the
last kill a worker runs the item to completion. Items are created until ``KILLS`` kills have
landed while a worker held the item's lease, on SQLite and on PostgreSQL.

Knobs (environment): ``TETHER_CHAOS_KILLS`` (mid-lease kills per database, default 10),
``TETHER_CHAOS_KILLS_PER_ITEM`` (default 5), ``TETHER_CHAOS_SEED`` (default: a fresh seed; it is
printed in every assertion message). A longer run::

    TETHER_CHAOS_KILLS=200 TETHER_CHAOS_ITEMS=2000 python -m pytest tests/chaos -q
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from procs import ProcessGroup, TetherProcess, wait_until

from ledger import Ledger
from ledger.schema import Work

KILLS = int(os.environ.get("TETHER_CHAOS_KILLS", "10"))
KILLS_PER_ITEM = int(os.environ.get("TETHER_CHAOS_KILLS_PER_ITEM", "5"))
SEED = int(os.environ.get("TETHER_CHAOS_SEED") or random.SystemRandom().randrange(2**32))
N_STEPS = 20
STEP_SLEEP = 0.05
LEASE_TTL = 1.0
REAPER_INTERVAL = 0.2
KILL_DELAY = (0.1, 0.6)
#: a worker that holds the item must finish it within this (20 x 50 ms of work)
COMPLETION_TIMEOUT = 60.0
FINISHED = {"succeeded", "failed", "cancelled"}


def ts(value: datetime) -> float:
    """A ledger timestamp as ``time.time()`` seconds (naive values are UTC)."""
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


@dataclass
class Run:
    """One worker process's turn at a work item, and the effects-file lines it wrote.

    The file is cut at its size after the process was reaped and before the next one was
    spawned, so every line belongs to exactly the process that wrote it.
    """

    spawned_at: float
    ended_at: float
    lines: list[str]
    killed: bool
    mid_lease: bool = False


@dataclass
class Recorded:
    """A step's recorded (succeeded) execution: when it started and finished, per the ledger."""

    started_at: float
    finished_at: float


def at_most_once_violations(runs: list[Run], recorded: dict[str, Recorded]) -> list[str]:
    """Everything in the effects history that contradicts "a recorded step never runs again".

    Criterion. The recorded execution of a step was timed (``started_at``/``finished_at``) by
    the process that committed it; processes never overlap, so exactly one run ``r`` contains
    both timestamps: that run executed the step and committed its result. Then:

    * in run ``r`` the key appears exactly once (the recorded execution);
    * in every later run it must not appear at all: those runs started after ``r`` was reaped,
      i.e. after the commit, so they had to replay the recorded result. **A single appearance
      there is a recorded step that ran again** - the failure this test exists to catch;
    * in an earlier run ``j`` it may appear once, and only as run ``j``'s last line with run
      ``j`` killed: the step was in flight when the process died, before any record committed
      (interrupted mid-flight; re-running it with the same key is allowed). Had run ``j`` gone
      on to a later step, it would have committed this step first, and that record would have
      to be the one we find.
    """
    problems: list[str] = []
    for key, rec in recorded.items():
        owners = [
            i
            for i, run in enumerate(runs)
            if run.spawned_at <= rec.started_at <= rec.finished_at <= run.ended_at
        ]
        if len(owners) != 1:
            problems.append(f"{key}: its recorded execution lies in runs {owners}, not in one")
            continue
        r = owners[0]
        for j, run in enumerate(runs):
            n = run.lines.count(key)
            if j == r and n != 1:
                problems.append(f"{key}: ran {n} times in run {j}, which recorded it")
            elif j > r and n:
                problems.append(f"{key}: recorded by run {r} and ran AGAIN in run {j} ({n}x)")
            elif j < r and n and (n > 1 or run.lines[-1] != key or not run.killed):
                problems.append(
                    f"{key}: ran {n}x in run {j} before run {r} recorded it, but was not "
                    f"the step in flight when run {j} was killed"
                )
    for j, run in enumerate(runs):
        problems += [f"run {j} wrote {line!r}, a key with no record" for line in
                     sorted(set(run.lines) - recorded.keys())]  # fmt: skip
    return problems


def _size(path: Path) -> int:
    path.touch()
    return path.stat().st_size


def _lines(path: Path, start: int, end: int) -> list[str]:
    with path.open("rb") as f:
        f.seek(start)
        return f.read(end - start).decode().splitlines()


async def _claimed_or_done(ledger: Ledger, work_id: str, after_epoch: int) -> Work | None:
    work = await ledger.get_work(work_id)
    claimed = work.state == "running" and work.lease_epoch > after_epoch
    return work if claimed or work.state in FINISHED else None


async def crash_one_item(
    ledger: Ledger,
    procs: ProcessGroup,
    db_url: str,
    effects: Path,
    kills_wanted: int,
    rng: random.Random,
    say: str,
) -> tuple[Work, list[Run]]:
    """Run one ``crash_twenty`` item through up to ``kills_wanted`` mid-lease SIGKILLs, then to
    completion; returns the finished item and the runs."""
    work, _ = await ledger.create_work(
        "crash_twenty",
        {"effects": str(effects), "n": N_STEPS, "step_sleep": STEP_SLEEP},
        max_attempts=100,
    )
    runs: list[Run] = []
    epoch = 0
    while True:
        start = _size(effects)
        worker: TetherProcess = procs.worker(db_url, lease_ttl=LEASE_TTL)
        seen = await wait_until(
            lambda after=epoch: _claimed_or_done(ledger, work.id, after),
            timeout=30,
            what=lambda: f"a claim of {work.id} ({say})\n{procs.tails()}",
        )
        epoch = seen.lease_epoch
        if seen.state not in FINISHED and sum(r.mid_lease for r in runs) < kills_wanted:
            await asyncio.sleep(rng.uniform(*KILL_DELAY))
            worker.kill()
            after = await ledger.get_work(work.id)
            # Still running under this worker's epoch: the kill landed while it held the lease.
            mid_lease = after.state == "running" and after.lease_epoch == epoch
            assert worker.ended_at is not None
            runs.append(
                Run(worker.spawned_at, worker.ended_at, _lines(effects, start, _size(effects)),
                    killed=True, mid_lease=mid_lease)
            )  # fmt: skip
            if after.state not in FINISHED:
                continue
        else:
            await wait_until(
                lambda: _done(ledger, work.id),
                timeout=COMPLETION_TIMEOUT,
                what=lambda: f"{work.id} to finish ({say})\n{procs.tails()}",
                interval=0.05,
            )
            worker.terminate()
            assert worker.ended_at is not None
            runs.append(
                Run(worker.spawned_at, worker.ended_at, _lines(effects, start, _size(effects)),
                    killed=False)
            )  # fmt: skip
        return await ledger.get_work(work.id), runs


async def _done(ledger: Ledger, work_id: str) -> bool:
    return (await ledger.get_work(work_id)).state in FINISHED


async def check_item(ledger: Ledger, work: Work, runs: list[Run], say: str) -> Counter[str]:
    kills = sum(r.mid_lease for r in runs)
    say = f"{say} work={work.id} runs={len(runs)} mid-lease kills={kills}"
    assert work.state == "succeeded", f"{say}: {work.state} {work.error}"
    assert work.result == N_STEPS, say
    # every mid-lease kill cost one attempt (reaped) and every run that held it one claim
    assert work.attempt == 1 + kills, say
    assert work.lease_epoch == len(runs), say

    events = await ledger.list_events(work.id)
    types = [e.type for e in events]
    assert types.count("lease_expired") == kills, f"{say}: {types}"
    assert types.count("succeeded") == 1, f"{say}: {types}"
    completed = [e.data["seq"] for e in events if e.type == "step_completed"]
    assert sorted(completed) == list(range(1, N_STEPS + 1)), f"{say}: step_completed {completed}"

    steps = await ledger.list_steps(work.id)
    keys = [f"{work.id}:{i}" for i in range(1, N_STEPS + 1)]
    assert [s.idempotency_key for s in steps] == keys, say
    assert all(s.status == "succeeded" and s.finished_at for s in steps), say
    recorded = {
        s.idempotency_key: Recorded(ts(s.started_at), ts(s.finished_at))  # type: ignore[arg-type]
        for s in steps
    }
    all_lines = [line for r in runs for line in r.lines]
    missing = [k for k in keys if k not in all_lines]
    assert not missing, f"{say}: effects never happened for {missing}"
    problems = at_most_once_violations(runs, recorded)
    layout = [(r.killed, r.mid_lease, [x.rsplit(":", 1)[1] for x in r.lines]) for r in runs]
    assert not problems, f"{say}:\n" + "\n".join(problems) + f"\nruns: {layout}"
    return kill_points(runs, recorded)


def kill_points(runs: list[Run], recorded: dict[str, Recorded]) -> Counter[str]:
    """Where the mid-lease kills landed: inside a step (its effect happened, its record had not
    committed), after a step's record committed, or before the run executed any step."""
    where: Counter[str] = Counter()
    for run in runs:
        if not run.mid_lease:
            continue
        if not run.lines:
            where["before any step"] += 1
        elif recorded[run.lines[-1]].finished_at > run.ended_at:
            where["mid-step"] += 1
        else:
            where["after a record"] += 1
    return where


async def test_sigkilled_workers_never_rerun_a_recorded_step(
    ledger: Ledger, db_url: str, procs: ProcessGroup, tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    say = f"[TETHER_CHAOS_SEED={SEED} {ledger.dialect}]"
    scheduler = procs.scheduler(db_url, lease_ttl=LEASE_TTL, reaper_interval=REAPER_INTERVAL)
    await scheduler.wait_ready()
    started = time.monotonic()
    kills = items = 0
    where: Counter[str] = Counter()
    while kills < KILLS:
        items += 1
        work, runs = await crash_one_item(
            ledger, procs, db_url, tmp_path / f"effects-{items}.txt",
            min(KILLS_PER_ITEM, KILLS - kills), rng, f"{say} item {items}",
        )  # fmt: skip
        where += await check_item(ledger, work, runs, f"{say} item {items}")
        kills += sum(r.mid_lease for r in runs)
        assert items < 10 * KILLS + 10, f"{say}: kills keep missing the lease ({kills} in {items})"
    assert scheduler.alive, f"{say}: the scheduler died\n{scheduler.tail()}"
    print(f"{say}: {kills} mid-lease SIGKILLs ({dict(where)}) over {items} items "
          f"in {time.monotonic() - started:.1f}s")  # fmt: skip


def test_checker_flags_a_recorded_step_that_ran_again() -> None:
    """The criterion above can fail: histories that break at-most-once are caught."""
    rec = {"w:1": Recorded(1.1, 1.2), "w:2": Recorded(3.1, 3.2)}
    ok = [Run(1.0, 2.0, ["w:1", "w:2"], killed=True), Run(3.0, 4.0, ["w:2"], killed=False)]
    assert at_most_once_violations(ok, rec) == []
    # w:1 was recorded in run 0 and its body ran again in run 1
    rerun = [Run(1.0, 2.0, ["w:1", "w:2"], killed=True), Run(3.0, 4.0, ["w:1", "w:2"], False)]
    assert any("AGAIN" in p for p in at_most_once_violations(rerun, rec))
    # run 0 went past w:2 without the record being run 0's: its record was lost or overwritten
    lost = [Run(1.0, 2.0, ["w:1", "w:2", "w:3"], killed=True), Run(3.0, 4.0, ["w:2"], False)]
    assert any("not the step in flight" in p for p in at_most_once_violations(lost, rec))
    # twice within the run that recorded it
    twice = [Run(1.0, 2.0, ["w:1", "w:1", "w:2"], killed=False)]
    rec_once = {"w:1": Recorded(1.1, 1.2), "w:2": Recorded(1.3, 1.4)}
    assert any("ran 2 times" in p for p in at_most_once_violations(twice, rec_once))
