"""The SQLite writer's group commit: transactions that queue up while the writer is busy
commit together, each in its own savepoint. One that raises is rolled back alone; a failed
``COMMIT`` fails every member and keeps nothing of any. SQLite only (PostgreSQL runs each
transaction on its own pooled connection)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ledger import Ledger


@pytest.fixture
async def sqlite_ledger(tmp_path: Path) -> AsyncIterator[Ledger]:
    led = await Ledger.open(f"sqlite+aiosqlite:///{tmp_path / 'groups.db'}", migrate=True)
    try:
        yield led
    finally:
        await led.close()


def _slow(conn: Connection) -> str:
    time.sleep(0.2)  # the writer is busy: what arrives now queues into one group
    return "slow"


def _insert(conn: Connection, name: str) -> str:
    conn.execute(
        sa.text(
            "INSERT INTO channel_state (channel, update_offset, updated_at) "
            "VALUES (:k, 1, '2026-01-01')"
        ),
        {"k": name},
    )
    return name


def _insert_then_raise(conn: Connection, name: str) -> None:
    _insert(conn, name)
    raise ValueError(f"{name} changed its mind")


def _fail_at_commit(conn: Connection, name: str) -> None:
    """Writes a row that breaks a foreign key, checked only at COMMIT."""
    _insert(conn, name)
    conn.exec_driver_sql("PRAGMA defer_foreign_keys = ON")
    conn.execute(
        sa.text(
            "INSERT INTO step (work_id, seq, name, status, attempt, idempotency_key, "
            "started_at) VALUES ('no-such-work', 1, 's', 'succeeded', 1, 'k', "
            "'2026-01-01')"
        )
    )


async def keys(led: Ledger) -> set[str]:
    async with led.engines.read.connect() as conn:
        rows = await conn.execute(sa.text("SELECT channel FROM channel_state"))
        return {r[0] for r in rows}


async def test_queued_transactions_commit_as_one_group(sqlite_ledger: Ledger) -> None:
    eng = sqlite_ledger.engines
    before = list(eng.groups)
    slow = asyncio.ensure_future(eng.run_write(_slow))
    await asyncio.sleep(0.05)
    names = [f"k{i}" for i in range(10)]
    results = await asyncio.gather(*(eng.run_write(_insert, n) for n in names))
    assert await slow == "slow"
    assert results == names
    assert await keys(sqlite_ledger) == set(names)
    transactions, groups = eng.groups[0] - before[0], eng.groups[1] - before[1]
    assert (transactions, groups) == (11, 2)  # the slow one, then the ten together


async def test_a_member_that_raises_is_rolled_back_alone(sqlite_ledger: Ledger) -> None:
    eng = sqlite_ledger.engines
    slow = asyncio.ensure_future(eng.run_write(_slow))
    await asyncio.sleep(0.05)
    outcomes = await asyncio.gather(
        eng.run_write(_insert, "a"),
        eng.run_write(_insert_then_raise, "b"),
        eng.run_write(_insert, "c"),
        return_exceptions=True,
    )
    await slow
    assert outcomes[0] == "a" and outcomes[2] == "c"
    assert isinstance(outcomes[1], ValueError)
    assert await keys(sqlite_ledger) == {"a", "c"}


async def test_a_failed_commit_fails_every_member_and_keeps_nothing(
    sqlite_ledger: Ledger,
) -> None:
    eng = sqlite_ledger.engines
    slow = asyncio.ensure_future(eng.run_write(_slow))
    await asyncio.sleep(0.05)
    outcomes = await asyncio.gather(
        eng.run_write(_insert, "x"),
        eng.run_write(_fail_at_commit, "y"),
        eng.run_write(_insert, "z"),
        return_exceptions=True,
    )
    await slow
    assert all(isinstance(o, sa.exc.IntegrityError) for o in outcomes), outcomes
    assert await keys(sqlite_ledger) == set()
    # and the writer goes on working afterwards
    assert await eng.run_write(_insert, "after") == "after"
    assert await keys(sqlite_ledger) == {"after"}


async def test_a_lone_transaction_that_raises_writes_nothing(sqlite_ledger: Ledger) -> None:
    with pytest.raises(ValueError, match="changed its mind"):
        await sqlite_ledger.engines.run_write(_insert_then_raise, "solo")
    assert await keys(sqlite_ledger) == set()


def _log_group(conn: Connection, name: str, log: list[tuple[str, int]], groups: list[int]) -> str:
    log.append((name, groups[1]))  # the number of groups committed before this one
    return name


async def test_urgent_transactions_commit_in_their_own_group_first(sqlite_ledger: Ledger) -> None:
    """An ack waits only for the urgent transactions, not for the workers' queued ones; and
    when both keep coming, they alternate, so urgent ones cannot starve the others."""
    eng = sqlite_ledger.engines
    log: list[tuple[str, int]] = []
    slow = asyncio.ensure_future(eng.run_write(_slow))
    await asyncio.sleep(0.05)
    queued = [eng.run_write(_log_group, f"q{i}", log, eng.groups) for i in range(3)]
    urgent = [eng.run_write(_log_group, f"u{i}", log, eng.groups, urgent=True) for i in range(2)]
    tasks = [asyncio.ensure_future(c) for c in [*queued, *urgent]]
    await asyncio.sleep(0)  # all five are queued while the slow one runs
    await asyncio.gather(slow, *tasks)
    group_of = dict(log)
    assert group_of["u0"] == group_of["u1"]  # together,
    assert {group_of[f"q{i}"] for i in range(3)} == {group_of["u0"] + 1}  # then the others

    # Urgent ones keep arriving: after an urgent group, the waiting queued ones go next.
    log.clear()
    slow = asyncio.ensure_future(eng.run_write(_slow))
    await asyncio.sleep(0.05)
    q = asyncio.ensure_future(eng.run_write(_log_group, "q", log, eng.groups))
    u = asyncio.ensure_future(eng.run_write(_slow_urgent, log, eng.groups, urgent=True))
    await asyncio.sleep(0.25)  # the slow one is done; the slow urgent one runs now
    later = asyncio.ensure_future(
        eng.run_write(_log_group, "u-later", log, eng.groups, urgent=True)
    )
    await asyncio.gather(slow, q, u, later)
    group_of = dict(log)
    assert group_of["u"] < group_of["q"] < group_of["u-later"]


def _slow_urgent(conn: Connection, log: list[tuple[str, int]], groups: list[int]) -> str:
    log.append(("u", groups[1]))
    time.sleep(0.2)
    return "u"


async def test_the_wal_is_checkpointed_off_the_writer_thread(sqlite_ledger: Ledger) -> None:
    """The writer never checkpoints inside a COMMIT (that stalled every queued transaction);
    the checkpointer thread copies the WAL into the database file instead."""
    eng = sqlite_ledger.engines
    assert eng.checkpointer is not None

    def autocheckpoint(conn: Connection) -> int:
        return conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar_one()

    assert await eng.run_write(autocheckpoint) == 0
    blob = "x" * 3000  # about a page a row: well past the default 1,000-page threshold
    for batch in range(30):
        await asyncio.gather(*(eng.run_write(_insert, f"b{batch}-{i}{blob}") for i in range(50)))
    passes = eng.checkpointer.passes
    for _ in range(100):  # a pass after the last commit
        if eng.checkpointer.passes > passes:
            break
        await asyncio.sleep(0.05)
    assert eng.checkpointer.passes > passes
    path = eng.url.split("///", 1)[1]
    conn = sqlite3.connect(path)
    try:
        busy, wal_frames, backfilled = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    finally:
        conn.close()
    assert busy == 0 and wal_frames > 1000 and backfilled == wal_frames
    assert len(await keys(sqlite_ledger)) == 1500
