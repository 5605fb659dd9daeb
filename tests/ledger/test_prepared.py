"""Prepared statements store and return exactly what SQLAlchemy's own execution does (both DBs).

On SQLite :class:`ledger.prepared.Prepared` bypasses SQLAlchemy's execution for the raw cursor;
these tests write the same row both ways into the real ledger file and compare the stored
values byte for byte, and read them back both ways.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from ledger import Ledger
from ledger.prepared import Prepared
from ledger.schema import work_t

W = work_t.c
WHEN = datetime(2026, 11, 26, 13, 4, 5, 678901, tzinfo=UTC)


def _insert() -> sa.Insert:
    bp = sa.bindparam
    return sa.insert(work_t).values(
        id=bp("id"),
        agent="agent-a",  # a constant, bound by the statement itself
        state="queued",
        input=bp("input", type_=W.input.type),
        attempt=1,
        max_attempts=5,
        priority=bp("priority"),
        lease_epoch=0,
        not_before=bp("not_before", type_=W.not_before.type),
        state_reason="created",
        state_detail=bp("detail", type_=W.state_detail.type),
        created_at=bp("now"),
        updated_at=bp("now"),
    )


async def test_a_prepared_insert_stores_what_sqlalchemy_stores(ledger: Ledger) -> None:
    stmt = _insert()
    prepared = Prepared(stmt, ledger.engines.write_dialect)
    values = {
        "input": {"text": "héllo", "n": [1, 2.5, None]},
        "priority": 3,
        "not_before": None,
        "detail": {"actor": "u1"},
        "now": WHEN,
    }

    def write(conn: sa.Connection) -> None:
        conn.execute(stmt, {**values, "id": "by-sqlalchemy"})
        prepared.run(conn, {**values, "id": "by-prepared"})

    await ledger.engines.run_write(write)
    columns = [c for c in work_t.c if c.key != "id"]
    cast = [sa.cast(c, sa.Text) for c in columns]  # the stored text, not the decoded value
    async with ledger.engines.read.connect() as conn:
        rows = (await conn.execute(sa.select(W.id, *cast).order_by(W.id))).all()
    stored = {r[0]: r[1:] for r in rows}
    assert stored["by-prepared"] == stored["by-sqlalchemy"]
    assert any("13:04:05.678901" in str(v) for v in stored["by-prepared"])


async def test_prepared_rows_read_like_sqlalchemy_rows(ledger: Ledger) -> None:
    stmt = _insert()

    def write(conn: sa.Connection) -> None:
        conn.execute(
            stmt,
            {"id": "w1", "input": {"a": 1}, "priority": 0, "not_before": WHEN, "detail": None,
             "now": WHEN},
        )  # fmt: skip

    await ledger.engines.run_write(write)
    query = sa.select(W.id, W.input, W.not_before, W.created_at, W.state_detail).where(
        W.id == sa.bindparam("id")
    )
    prepared = Prepared(query, ledger.engines.write_dialect)

    def read(conn: sa.Connection) -> tuple[object, object, object]:
        plain = conn.execute(query, {"id": "w1"}).one()
        fast = prepared.first(conn, {"id": "w1"})
        missing = prepared.first(conn, {"id": "nope"})
        return plain, fast, missing

    plain, fast, missing = await ledger.engines.run_write(read)
    assert tuple(fast) == tuple(plain) == ("w1", {"a": 1}, WHEN, WHEN, None)
    assert fast.not_before == WHEN and fast.not_before.tzinfo is not None
    assert missing is None


async def test_prepared_statement_returning_and_scalar(ledger: Ledger) -> None:
    stmt = _insert().returning(W.id, W.created_at)
    prepared = Prepared(stmt, ledger.engines.write_dialect)
    values = {"input": None, "priority": 0, "not_before": None, "detail": None, "now": WHEN}

    def write(conn: sa.Connection) -> tuple[object, object]:
        row = prepared.first(conn, {**values, "id": "r1"})
        return row, prepared.scalar(conn, {**values, "id": "r2"})

    row, second = await ledger.engines.run_write(write)
    assert (row.id, row.created_at, second) == ("r1", WHEN, "r2")


def test_expanding_parameters_are_refused() -> None:
    engine = sa.create_engine("sqlite://")
    with pytest.raises(ValueError, match="expands per call"):
        Prepared(sa.select(W.id).where(W.state.in_(["queued", "running"])), engine.dialect)
    engine.dispose()
