"""Shared fixtures: a fresh ledger database per test on SQLite and on PostgreSQL.

PostgreSQL tests need a reachable server (``TETHER_TEST_POSTGRES_URL``, default
``postgresql+asyncpg://postgres@127.0.0.1:5432/postgres``). Outside CI they are skipped with a
notice when it is down; with ``TETHER_REQUIRE_POSTGRES=1`` (set by ``.ci/run``) or ``CI=true``
the run fails instead.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from ledger import Ledger

ADMIN_URL = os.environ.get(
    "TETHER_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
)
REQUIRE_POSTGRES = os.environ.get("TETHER_REQUIRE_POSTGRES") == "1" or (
    os.environ.get("CI", "").lower() in {"1", "true", "yes"}
)
TABLES = "work, step, wait, event, conversation, inbox, outbox, worker, channel_state"

_pg_skip_reason: list[str] = []


def _dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def _pg_admin(sql: list[str]) -> None:
    import asyncpg

    conn = await asyncpg.connect(_dsn(ADMIN_URL), timeout=5)
    try:
        for s in sql:
            await conn.execute(s)
    finally:
        await conn.close()


async def _migrate(url: str) -> None:
    led = await Ledger.open(url, migrate=True)
    await led.close()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL database for this test session, migrated once."""
    name = f"tether_test_{os.getpid()}"
    try:
        asyncio.run(_pg_admin([f"DROP DATABASE IF EXISTS {name}", f"CREATE DATABASE {name}"]))
    except Exception as exc:
        msg = (
            f"PostgreSQL unreachable at {make_url(ADMIN_URL).render_as_string()} ({exc}). "
            "Start it (pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start) "
            "or point TETHER_TEST_POSTGRES_URL at a server."
        )
        if REQUIRE_POSTGRES:
            pytest.fail(f"PostgreSQL is required here (TETHER_REQUIRE_POSTGRES/CI): {msg}")
        _pg_skip_reason.append(msg)
        pytest.skip(msg)
    url = make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    asyncio.run(_migrate(url))
    yield url
    asyncio.run(_pg_admin([f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"]))


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file that each test copies (migrating once is the slow part)."""
    path = tmp_path_factory.mktemp("template") / "template.db"
    asyncio.run(_migrate(f"sqlite+aiosqlite:///{path}"))
    return path


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A freshly emptied, migrated ledger database URL: SQLite file or PostgreSQL."""
    if request.param == "sqlite":
        path = tmp_path / "tether.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite+aiosqlite:///{path}"
        return
    url = request.getfixturevalue("postgres_url")
    asyncio.run(_pg_admin_on(url, [f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE"]))
    yield url


async def _pg_admin_on(url: str, sql: list[str]) -> None:
    import asyncpg

    conn = await asyncpg.connect(_dsn(url), timeout=5)
    try:
        for s in sql:
            await conn.execute(s)
    finally:
        await conn.close()


@pytest.fixture
async def ledger(db_url: str) -> AsyncIterator[Ledger]:
    """An open :class:`Ledger` on the test's database."""
    led = await Ledger.open(db_url)
    try:
        yield led
    finally:
        await led.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _pg_skip_reason:
        terminalreporter.section("PostgreSQL tests skipped", sep="!", yellow=True, bold=True)
        terminalreporter.write_line(_pg_skip_reason[0], yellow=True)
        terminalreporter.write_line(
            "The PostgreSQL half of the suite did not run. CI (.ci/run) requires it.", yellow=True
        )
