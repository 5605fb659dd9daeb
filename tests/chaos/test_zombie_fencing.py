"""A frozen worker (SIGSTOP) loses its lease, a new worker takes over, and when the zombie
thaws (SIGCONT) none of its writes land: fenced leases, with real processes.

Timeline: worker A (lease TTL 1 s) runs ``zombie_slow``; as soon as step 2 wrote its ``:start``
line A is frozen. Its lease expires, the scheduler requeues the item (``lease_expired``), worker
B claims it (epoch 2) and re-runs step 2, which A never recorded. While B is inside step 2, A is
resumed: its step 2 body finishes and it tries to record it with epoch 1 - it must be refused
(``LeaseLost``) and must never reach step 3.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path

from procs import ProcessGroup, wait_until

from ledger import Ledger

LEASE_TTL = 1.0
STEP2_SLEEP = 3.0


def ts(value: datetime) -> float:
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


def read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def test_thawed_zombie_worker_cannot_write_over_the_new_owner(
    ledger: Ledger, db_url: str, procs: ProcessGroup, tmp_path: Path
) -> None:
    effects = tmp_path / "effects.txt"
    scheduler = procs.scheduler(db_url, lease_ttl=LEASE_TTL, reaper_interval=0.2)
    a = procs.worker(db_url, lease_ttl=LEASE_TTL, default_agent="zombie_slow")
    await scheduler.wait_ready()
    await a.wait_ready()
    work, _ = await ledger.create_work(
        "zombie_slow", {"effects": str(effects), "sleep": STEP2_SLEEP}, max_attempts=5
    )
    k1, k2, k3 = (f"{work.id}:{i}" for i in (1, 2, 3))
    say = f"[{ledger.dialect} work={work.id}]"

    await wait_until(lambda: f"{k2}:start" in read_lines(effects), 30, f"A in step 2 {say}")
    a_step2_seen = time.monotonic()  # A's step-2 sleep ends STEP2_SLEEP after this, or before

    async def a_recorded_start() -> bool:
        events = await ledger.list_events(work.id)
        return any(e.type == "step_started" and e.data["seq"] == 2 for e in events)

    # A's "running" record of step 2 (attempt 1, written 0.25 s into the step), so that B's
    # re-run is attempt 2 and A's late write, if unfenced, would overwrite B's running record.
    await wait_until(a_recorded_start, 10, f"A's step_started for step 2 {say}")
    a.stop()
    frozen_at = time.time()  # A started step 2 before this; B can only start it after

    b = procs.worker(db_url, lease_ttl=LEASE_TTL, default_agent="zombie_slow")

    async def taken_over() -> bool:
        w = await ledger.get_work(work.id)
        return w.lease_epoch == 2 and w.state == "running"

    await wait_until(taken_over, 30, lambda: f"B's claim {say}\n{procs.tails()}")
    await wait_until(
        lambda: read_lines(effects).count(f"{k2}:start") == 2, 30, f"B inside step 2 {say}"
    )
    # Thaw A while B is inside step 2 (3 s long) but only once A's own step-2 sleep is over:
    # then A's step body completes and goes straight to recording its result (epoch 1) in
    # the same loop iteration as A's lease renewal, before the renewal can notice anything.
    await asyncio.sleep(max(0.0, a_step2_seen + STEP2_SLEEP + 0.3 - time.monotonic()))
    assert read_lines(effects).count(f"{k2}:end") == 0, f"B finished step 2 too soon {say}"
    assert (await ledger.get_work(work.id)).state == "running", say
    a.cont()  # the zombie wakes up in the middle of B's step 2
    await wait_until(lambda: "LeaseLost" in a.log(), 15, lambda: f"A's LeaseLost\n{a.tail()}")
    # A's step body finished while B owned the item: its (refused) write really was attempted
    await wait_until(lambda: f"{k2}:end" in read_lines(effects), 5, f"A's step-2 end {say}")

    async def finished() -> bool:
        return (await ledger.get_work(work.id)).state in {"succeeded", "failed"}

    await wait_until(finished, 30, lambda: f"the item to finish {say}\n{procs.tails()}", 0.05)

    final = await ledger.get_work(work.id)
    events = await ledger.list_events(work.id)
    history = [(e.id, e.type, e.data) for e in events]
    say = f"{say}\nhistory: {[(e.type, (e.data or {}).get('seq')) for e in events]}"
    assert final.state == "succeeded" and final.result == "done", f"{say} {final.error}"
    assert final.lease_epoch == 2, say  # claimed by A (1) and B (2), by no one else
    assert final.attempt == 2, say

    types = [t for _, t, _ in history]
    assert types.count("lease_expired") == 1, say
    assert types.count("succeeded") == 1, say
    claims = [(i, d) for i, t, d in history if t == "claimed"]
    assert [d["epoch"] for _, d in claims] == [1, 2], say
    expired_id = next(i for i, t, _ in history if t == "lease_expired")
    completed_2 = [(i, d) for i, t, d in history if t == "step_completed" and d["seq"] == 2]
    # Exactly one completion of step 2, recorded after A's lease expired and B claimed (so by
    # B); A's late attempt left no completion, no failure, nothing.
    assert len(completed_2) == 1, say
    assert completed_2[0][0] > claims[1][0] > expired_id, say
    assert completed_2[0][1]["attempt"] == 2, say
    assert not [t for t in types if t in {"step_failed", "failed", "retried"}], say
    started_2 = [(i, d["attempt"]) for i, t, d in history if t == "step_started" and d["seq"] == 2]
    assert [a for _, a in started_2] == [1, 2], say  # A's start, then B's
    assert started_2[0][0] < expired_id < claims[1][0] < started_2[1][0], say

    steps = {s.seq: s for s in await ledger.list_steps(work.id)}
    assert sorted(steps) == [1, 2, 3] and all(s.status == "succeeded" for s in steps.values())
    # The step-2 record is B's: attempt 2 (A's is attempt 1) and it started after A froze (A's
    # started before). Had A's write landed, B's would have been refused instead.
    assert steps[2].attempt == 2, say
    assert ts(steps[2].started_at) > frozen_at, say
    assert steps[2].output == k2, say

    lines = read_lines(effects)
    assert lines.count(k1) == 1, f"{say}\n{lines}"
    assert lines.count(f"{k2}:start") == 2, f"{say}\n{lines}"  # A's and B's
    assert lines.count(f"{k2}:end") == 2, f"{say}\n{lines}"  # A's (zombie) and B's
    # The zombie could only get to step 3 if its step-2 write had landed.
    assert lines.count(k3) == 1, f"{say}\n{lines}"

    assert "LeaseLost" in a.log(), a.tail()
    assert "LeaseLost" not in b.log(), b.tail()
    assert a.alive and b.alive and scheduler.alive, procs.tails()
