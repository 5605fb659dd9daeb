"""Two worker processes share one queue: every step of every item runs exactly once.

Two ``tether worker --concurrency 4`` processes run ``ITEMS`` ``crash_three`` items (three
steps, each appends its idempotency key to one shared effects file; short ``O_APPEND`` writes
do not interleave). Nothing is killed here: this is the baseline that claims are disjoint under
load (PostgreSQL ``FOR UPDATE SKIP LOCKED``; SQLite ``BEGIN IMMEDIATE``) and no item is run by
both workers. A bigger run (knobs: ``TETHER_CHAOS_ITEMS`` for PostgreSQL, default 300,
``TETHER_CHAOS_SQLITE_ITEMS``, default 60)::

    TETHER_CHAOS_ITEMS=3000 TETHER_CHAOS_SQLITE_ITEMS=600 python -m pytest tests/chaos -q
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from pathlib import Path

import pytest
import sqlalchemy as sa
from procs import ProcessGroup, wait_until

from ledger import Ledger
from ledger.schema import event_t, work_t

PG_ITEMS = int(os.environ.get("TETHER_CHAOS_ITEMS", "300"))
SQLITE_ITEMS = int(os.environ.get("TETHER_CHAOS_SQLITE_ITEMS", "60"))
WORKERS = 2
CONCURRENCY = 4
TIMEOUT = float(os.environ.get("TETHER_CHAOS_TIMEOUT", "90"))


def read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


async def run_shared_queue(
    ledger: Ledger, db_url: str, procs: ProcessGroup, tmp_path: Path, items: int
) -> None:
    effects = tmp_path / "effects.txt"
    effects.write_text("")
    scheduler = procs.scheduler(db_url, lease_ttl=10, reaper_interval=1.0)
    workers = [
        # polling (SQLite has no NOTIFY) often enough that both workers find queued items
        procs.worker(
            db_url,
            concurrency=CONCURRENCY,
            lease_ttl=10,
            poll_interval=0.05,
            default_agent="crash_three",
        )
        for _ in range(WORKERS)
    ]
    for p in [scheduler, *workers]:
        await p.wait_ready()  # both workers are up before there is work: both get some

    started = time.monotonic()
    # All at once (on SQLite they commit in a few groups): created one by one, a single worker
    # could keep up with the trickle, claiming each the moment its slot freed, while the other
    # only ever polled an empty queue.
    made = await asyncio.gather(
        *(
            ledger.create_work("crash_three", {"effects": str(effects)}, max_attempts=3)
            for _ in range(items)
        )
    )
    ids = [work.id for work, _ in made]
    created = time.monotonic() - started

    async def all_finished() -> bool:
        counts = await ledger.count_by_state()
        return counts["succeeded"] + counts["failed"] + counts["cancelled"] == items

    await wait_until(
        all_finished, TIMEOUT,
        lambda: f"{items} items to finish\n{procs.tails()}", interval=0.1,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    say = f"[{ledger.dialect} {items} items, {WORKERS}x{CONCURRENCY} slots]"

    counts = await ledger.count_by_state()
    assert counts["succeeded"] == items, f"{say}: {counts}"
    async with ledger.engines.read.connect() as conn:
        rows = (await conn.execute(sa.select(work_t.c.id, work_t.c.lease_epoch, work_t.c.attempt,
                                             work_t.c.result))).all()  # fmt: skip
        claims = (
            await conn.execute(
                sa.select(event_t.c.work_id, event_t.c.data).where(event_t.c.type == "claimed")
            )
        ).all()
    assert sorted(r.id for r in rows) == sorted(ids), say
    # each item claimed exactly once, by one worker, on its first attempt
    assert all(r.lease_epoch == 1 and r.attempt == 1 and r.result == 3 for r in rows), say
    assert Counter(c.work_id for c in claims) == Counter(ids), f"{say}: claimed events"
    owners = Counter(c.data["owner"] for c in claims)
    assert len(owners) == WORKERS, f"{say}: claims by owner {owners}"

    lines = read_lines(effects)
    expected = {f"{i}:{seq}" for i in ids for seq in (1, 2, 3)}
    seen = Counter(lines)
    assert set(seen) == expected, f"{say}: missing {len(expected - set(seen))}, " \
        f"unknown {sorted(set(seen) - expected)[:5]}"  # fmt: skip
    twice = {k: n for k, n in seen.items() if n != 1}
    assert not twice, f"{say}: steps that ran more than once: {list(twice.items())[:10]}"
    assert len(lines) == 3 * items, say
    for p in [scheduler, *workers]:
        assert p.alive, p.tail()
        assert "LeaseLost" not in p.log() and "Traceback" not in p.log(), p.tail()
    print(f"{say}: created in {created:.1f}s, all done in {elapsed:.1f}s, by owner {owners}")


@pytest.mark.parametrize(
    "db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
async def test_two_workers_postgres_run_every_step_exactly_once(
    ledger: Ledger, db_url: str, procs: ProcessGroup, tmp_path: Path
) -> None:
    await run_shared_queue(ledger, db_url, procs, tmp_path, PG_ITEMS)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_two_workers_sqlite_run_every_step_exactly_once(
    ledger: Ledger, db_url: str, procs: ProcessGroup, tmp_path: Path
) -> None:
    await run_shared_queue(ledger, db_url, procs, tmp_path, SQLITE_ITEMS)
