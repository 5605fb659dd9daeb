"""Retention (``prune``) and the Alembic migrations: upgrade, downgrade to base, upgrade again.

Prune tests run on SQLite and on PostgreSQL (the ``ledger`` fixture). The migration tests start
from a brand-new database: a new SQLite file, or a new PostgreSQL database on the test server.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import Connection
from sqlalchemy.engine import make_url

from ledger import Ledger, StepWrite, utcnow
from ledger.engine import create_engines
from ledger.migrate import alembic_config, current_revision, upgrade
from ledger.schema import outbox_t, wait_t, work_t

TABLES = {
    "channel_state",
    "conversation",
    "event",
    "inbox",
    "outbox",
    "step",
    "wait",
    "work",
    "worker",
}


async def count(ledger: Ledger, table: str, work_ids: list[str] | None = None) -> int:
    q = f"SELECT count(*) FROM {table}"
    params: dict[str, object] = {}
    if work_ids is not None:
        column = "id" if table == "work" else "work_id"
        q += f" WHERE {column} IN ({', '.join(f':p{i}' for i in range(len(work_ids)))})"
        params = {f"p{i}": w for i, w in enumerate(work_ids)}
    async with ledger.engines.read.connect() as conn:
        return (await conn.execute(sa.text(q), params)).scalar_one()


async def finished_work(ledger: Ledger, how: str) -> str:
    """One finished item (succeeded, failed or cancelled) with two steps, a wait and a message."""
    work, _ = await ledger.create_work("echo", how)
    if how == "cancelled":
        await ledger.cancel_work(work.id)
    else:
        [claim] = await ledger.claim_work("w", limit=1, lease_ttl=30)
        assert claim.work_id == work.id
        for seq in range(2):
            await ledger.record_step(
                claim,
                StepWrite(seq, "s", 1, f"{work.id}:{seq}", utcnow(), status="succeeded"),
            )
        if how == "succeeded":
            await ledger.complete_work(claim, "ok")
        else:
            await ledger.fail_work(claim, {"type": "E", "message": "no"})
    now = utcnow()
    async with ledger.engines.write.begin() as conn:
        await conn.execute(
            sa.insert(wait_t).values(
                id=f"w-{work.id}",
                work_id=work.id,
                step_seq=9,
                kind="approval",
                on_timeout="fail",
                state="resolved",
                created_at=now,
            )
        )
        await conn.execute(
            sa.insert(outbox_t).values(
                work_id=work.id,
                step_seq=9,
                channel="http",
                state="sent",
                attempts=1,
                created_at=now,
            )
        )
    return work.id


async def age(ledger: Ledger, work_ids: list[str], days: int) -> None:
    """Pretend these items finished ``days`` ago (a plain column write; no transition)."""
    async with ledger.engines.write.begin() as conn:
        await conn.execute(
            sa.update(work_t)
            .where(work_t.c.id.in_(work_ids))
            .values(finished_at=utcnow() - timedelta(days=days))
        )


# ---- prune ------------------------------------------------------------------------------------


async def test_prune_deletes_old_finished_work_with_its_history(ledger: Ledger) -> None:
    old = [await finished_work(ledger, how) for how in ("succeeded", "failed", "cancelled")]
    recent = await finished_work(ledger, "succeeded")
    queued, _ = await ledger.create_work("echo", "queued")
    paused, _ = await ledger.create_work("echo", "paused")
    await ledger.pause_work(paused.id)
    [claim] = await ledger.claim_work("w", limit=1, lease_ttl=30)
    assert claim.work_id == queued.id
    await age(ledger, old, days=3)
    kept = [recent, queued.id, paused.id]
    assert await count(ledger, "step", old) == 4
    # created, claimed, two steps, finished; created, cancelled
    assert await count(ledger, "event", old) == 5 + 5 + 2
    kept_events = await count(ledger, "event", kept)

    deleted = await ledger.prune(timedelta(days=1))

    assert deleted == 3
    for table in ("work", "step", "event", "wait", "outbox"):
        assert await count(ledger, table, old) == 0, table
    assert await count(ledger, "work") == 3
    assert await count(ledger, "step") == 2  # the recent item's
    assert await count(ledger, "wait") == await count(ledger, "outbox") == 1
    assert await count(ledger, "event", kept) == kept_events
    assert {w.id: w.state for w in await ledger.list_work()} == {
        recent: "succeeded",
        queued.id: "running",
        paused.id: "paused",
    }
    assert await ledger.prune(timedelta(days=1)) == 0


async def test_prune_in_small_batches_deletes_everything_due(ledger: Ledger) -> None:
    ids = []
    for i in range(7):
        work, _ = await ledger.create_work("echo", i)
        await ledger.cancel_work(work.id)
        ids.append(work.id)
    await age(ledger, ids, days=2)

    assert await ledger.prune(timedelta(days=1), batch=3) == 7

    assert await count(ledger, "work") == 0
    assert await count(ledger, "event") == 0


async def test_prune_keeps_work_finished_after_the_cutoff(ledger: Ledger) -> None:
    work_id = await finished_work(ledger, "failed")
    await age(ledger, [work_id], days=2)

    assert await ledger.prune(timedelta(days=3)) == 0

    assert (await ledger.get_work(work_id)).state == "failed"
    assert await count(ledger, "step") == 2


# ---- migrations -------------------------------------------------------------------------------


@pytest.fixture
async def fresh_url(db_url: str, tmp_path: Path) -> AsyncIterator[str]:
    """A brand-new, never migrated database on the same backend as ``db_url``."""
    if db_url.startswith("sqlite"):
        yield f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}"
        return
    name = f"tether_migrate_{os.getpid()}"
    admin = make_url(db_url).set(drivername="postgresql").render_as_string(hide_password=False)
    conn = await asyncpg.connect(admin, timeout=5)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name}")
        await conn.execute(f"CREATE DATABASE {name}")
        yield make_url(db_url).set(database=name).render_as_string(hide_password=False)
    finally:
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await conn.close()


async def schema_objects(url: str) -> tuple[set[str], set[str]]:
    """The tables and the history triggers that exist in the database at ``url``."""
    engines = create_engines(url)

    def _inspect(conn: Connection) -> tuple[set[str], set[str]]:
        tables = set(sa.inspect(conn).get_table_names())
        if conn.dialect.name == "sqlite":
            q = "SELECT name FROM sqlite_master WHERE type = 'trigger'"
        else:
            q = "SELECT tgname FROM pg_trigger WHERE NOT tgisinternal"
        # the scheduler wake-up trigger exists on PostgreSQL only (NOTIFY)
        names = set(conn.execute(sa.text(q)).scalars()) - {"wait_deadline_notify"}
        return tables, names

    try:
        async with engines.read.connect() as conn:
            return await conn.run_sync(_inspect)
    finally:
        await engines.dispose()


HEAD = ScriptDirectory.from_config(alembic_config()).get_current_head()

TRIGGERS = {
    "work_created_event",
    "work_transition_event",
    "step_recorded_event",
    "step_changed_event",
}


async def test_upgrade_downgrade_to_base_and_upgrade_again(fresh_url: str) -> None:
    engines = create_engines(fresh_url)
    try:
        assert await current_revision(engines) is None
        await upgrade(engines)
        assert await current_revision(engines) == HEAD
        assert await schema_objects(fresh_url) == (TABLES | {"alembic_version"}, TRIGGERS)

        def _downgrade(conn: Connection) -> None:
            command.downgrade(alembic_config(conn), "base")

        async with engines.write.connect() as conn:
            await conn.run_sync(_downgrade)
            await conn.commit()
        assert await current_revision(engines) is None
        assert await schema_objects(fresh_url) == ({"alembic_version"}, set())

        await upgrade(engines)
        assert await current_revision(engines) == HEAD
        assert await schema_objects(fresh_url) == (TABLES | {"alembic_version"}, TRIGGERS)
    finally:
        await engines.dispose()

    # the re-created schema works, history triggers included
    ledger = await Ledger.open(fresh_url)
    try:
        work, created = await ledger.create_work("echo", {"n": 1})
        assert created
        assert [e.type for e in await ledger.list_events(work.id)] == ["created"]
    finally:
        await ledger.close()


async def test_upgrading_twice_is_a_no_op(fresh_url: str) -> None:
    ledger = await Ledger.open(fresh_url, migrate=True)
    try:
        work, _ = await ledger.create_work("echo", {"keep": "me"})
        await ledger.close()
        ledger = await Ledger.open(fresh_url, migrate=True)
        await upgrade(ledger.engines)

        assert await current_revision(ledger.engines) == HEAD
        assert await schema_objects(fresh_url) == (TABLES | {"alembic_version"}, TRIGGERS)
        kept = await ledger.get_work(work.id)
        assert (kept.state, kept.input) == ("queued", {"keep": "me"})
        assert [e.type for e in await ledger.list_events(work.id)] == ["created"]
        async with ledger.engines.read.connect() as conn:
            versions = (
                await conn.execute(sa.text("SELECT version_num FROM alembic_version"))
            ).all()
        assert [v for (v,) in versions] == [HEAD]
    finally:
        await ledger.close()


async def test_the_migrations_create_exactly_the_models(fresh_url: str) -> None:
    """Autogenerate finds nothing to do: schema.py and the migrations agree."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from ledger.schema import metadata

    engines = create_engines(fresh_url)
    try:
        await upgrade(engines)

        def _diff(conn: Connection) -> list[object]:
            return compare_metadata(MigrationContext.configure(conn), metadata)

        async with engines.read.connect() as conn:
            assert await conn.run_sync(_diff) == []
    finally:
        await engines.dispose()
