"""The ledger's PostgreSQL pool across a server restart, on a throwaway cluster of its own.

Pooled connections are pinged only when they sat idle for ``PING_AFTER_IDLE`` seconds (a ping
per transaction would cost a busy worker a round trip per step). So: after an idle spell the
first write after a restart succeeds, and a restart under a busy pool costs at most the one
transaction that met the dead connection, never more.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from pg_cluster import PgCluster, PgUnavailable, find_pg_bin

from ledger import Ledger, StepWrite, utcnow
from ledger.engine import PING_AFTER_IDLE

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def cluster() -> Iterator[PgCluster]:
    try:
        find_pg_bin()
    except PgUnavailable as exc:
        pytest.fail(f"these tests need a PostgreSQL server installation: {exc}")
    with PgCluster() as pg:
        yield pg


def step(seq: int) -> StepWrite:
    now = utcnow()
    return StepWrite(seq, f"s{seq}", 1, f"k{seq}", now, "succeeded", output=seq, finished_at=now)


async def recorded(ledger: Ledger, work_id: str) -> list[int]:
    return sorted((await ledger.load_steps(work_id)).keys())


def restart(pg: PgCluster) -> None:
    pg.stop("fast")
    pg.start()


async def test_idle_connections_are_replaced_after_a_restart(cluster: PgCluster) -> None:
    ledger = await Ledger.open(cluster.url, migrate=True)
    try:
        work, _ = await ledger.create_work("echo", None)
        [claim] = await ledger.claim_work("w", limit=1, lease_ttl=60)
        await ledger.record_step(claim, step(1))
        await asyncio.to_thread(restart, cluster)
        await asyncio.sleep(PING_AFTER_IDLE + 0.2)
        # every pooled connection is dead now; the ping on checkout replaces them
        await ledger.record_step(claim, step(2))
        assert await recorded(ledger, work.id) == [1, 2]
    finally:
        await ledger.close()


async def test_a_busy_pool_loses_at_most_one_transaction_to_a_restart(cluster: PgCluster) -> None:
    ledger = await Ledger.open(cluster.url, migrate=True)
    try:
        work, _ = await ledger.create_work("echo", None)
        [claim] = await ledger.claim_work("w", limit=1, lease_ttl=60)
        await ledger.record_step(claim, step(1))
        await asyncio.to_thread(restart, cluster)  # well under PING_AFTER_IDLE: no ping
        failed: list[int] = []
        for seq in range(2, 6):
            try:
                await ledger.record_step(claim, step(seq))
            except sa.exc.DBAPIError as exc:
                assert exc.connection_invalidated, exc
                failed.append(seq)
        assert failed in ([], [2]), failed  # only the first transaction can meet a dead one
        # what failed was not written; everything after it was
        assert await recorded(ledger, work.id) == [s for s in range(1, 6) if s not in failed]
    finally:
        await ledger.close()
