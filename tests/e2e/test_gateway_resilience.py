"""The Telegram webhook of a real ``tether serve`` when the ledger is down and when every
worker is stuck (issue 4).

* SQLite locked (the test holds ``BEGIN EXCLUSIVE`` on the database file): what is true today
  is that the gateway does not answer 5xx at once; it waits on SQLite's busy timeout (30 s),
  so the client's 5 s timeout expires with no answer (a 5xx would also pass; a 200 fails).
  Nothing is acked while locked. After the lock is released, two redeliveries of the same
  update are acked 200 and the update is handled once (one inbox row, one work item), whether
  or not the stalled first request went on to commit server-side after the release.
* PostgreSQL unreachable (``ALLOW_CONNECTIONS false`` + ``pg_terminate_backend`` on a fresh
  database, the shared server stays up): 503 within a few seconds; after
  ``ALLOW_CONNECTIONS true`` the redelivery is 200 and handled once, a second redelivery too.
* Both worker slots stuck in a 10-second step: 20 more updates are each acked 200 in < 1 s.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "fakes"))
from telegram_api import FakeTelegram  # noqa: E402

from tests.conftest import ADMIN_URL  # noqa: E402

BOT_TOKEN = "123456:TEST-telegram-token"
BOT_ID = "123456"
SECRET = "resilience-secret"
WEBHOOK = "/channels/telegram/webhook"
HEADERS = {"X-Telegram-Bot-Api-Secret-Token": SECRET}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def update(update_id: int, chat: int, text: str = "hello") -> dict[str, Any]:
    return {
        "update_id": update_id,
        "message": {
            "message_id": update_id,
            "date": 1_700_000_000,
            "chat": {"id": chat, "type": "private"},
            "from": {"id": chat, "is_bot": False, "first_name": "u", "username": f"u{chat}"},
            "text": text,
        },
    }


def _env(database_url: str, port: int, api_base: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    env.update(
        TETHER_PORT=str(port),
        TETHER_DATABASE_URL=database_url,
        TETHER_OPERATOR_TOKEN="resilience-operator",
        TETHER_TELEGRAM_TOKEN=BOT_TOKEN,
        TETHER_TELEGRAM_WEBHOOK_SECRET=SECRET,
        TETHER_TELEGRAM_API_BASE=api_base,
        TETHER_LEASE_TTL="5",
        TETHER_POLL_INTERVAL="0.1",
        PYTHONUNBUFFERED="1",
        **extra,
    )
    path = [str(ROOT / "tests" / "support"), str(ROOT)]
    if env.get("PYTHONPATH"):
        path.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(path)
    return env


@asynccontextmanager
async def serve(cwd: Path, database_url: str, **extra: str) -> AsyncIterator[str]:
    """A real ``tether serve`` with Telegram against a fake Bot API; yields its base URL."""
    async with FakeTelegram(BOT_TOKEN) as fake:
        port = _free_port()
        log_path = cwd / "serve.log"
        with log_path.open("w") as log:
            proc = subprocess.Popen(  # noqa: ASYNC220 -- reaped in finally
                [sys.executable, "-m", "tether.cli", "serve"],
                cwd=cwd,
                env=_env(database_url, port, fake.base_url, **extra),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            base = f"http://127.0.0.1:{port}"
            try:
                deadline = time.monotonic() + 60
                async with aiohttp.ClientSession() as http:
                    while True:
                        with suppress(aiohttp.ClientError, asyncio.TimeoutError):
                            async with http.get(f"{base}/readyz", timeout=1) as r:
                                if r.status == 200:
                                    break
                        if proc.poll() is not None or time.monotonic() > deadline:
                            raise AssertionError(log_path.read_text())
                        await asyncio.sleep(0.2)
                yield base
            finally:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(timeout=15)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait(timeout=10)


async def post(http: aiohttp.ClientSession, base: str, body: dict[str, Any], timeout: float = 10):
    async with http.post(
        base + WEBHOOK, json=body, headers=HEADERS, timeout=aiohttp.ClientTimeout(total=timeout)
    ) as r:
        await r.read()
        return r.status


async def eventually(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


# -- SQLite ------------------------------------------------------------------------------------


def _sqlite_counts(path: Path, update_id: int) -> tuple[int, int]:
    event = f"{BOT_ID}:{update_id}"
    with sqlite3.connect(path, timeout=5) as conn:
        inbox = conn.execute(
            "SELECT count(*) FROM inbox WHERE source_event_id = ?", (event,)
        ).fetchone()[0]
        work = conn.execute(
            "SELECT count(*) FROM work WHERE source_event_id = ?", (event,)
        ).fetchone()[0]
    return inbox, work


async def test_sqlite_locked_is_not_acked_and_the_redelivery_is_handled_once(tmp_path: Path):
    db = tmp_path / "tether.db"
    async with (
        serve(tmp_path, f"sqlite+aiosqlite:///{db}") as base,
        aiohttp.ClientSession() as http,
    ):
        assert await post(http, base, update(1, 501)) == 200  # warm: the schema exists

        lock = sqlite3.connect(db, timeout=10, isolation_level=None)  # waits out a write in flight
        lock.execute("BEGIN EXCLUSIVE")
        try:
            started = time.monotonic()
            status: int | str
            try:
                status = await post(http, base, update(2, 502), timeout=5)
            except TimeoutError:
                status = "timeout"
            elapsed = time.monotonic() - started
            assert status != 200, "an update was acked while the ledger was locked"
            assert status == "timeout" or status >= 500, status
            print(f"\nlocked SQLite: {status} after {elapsed:.2f}s")
        finally:
            lock.execute("ROLLBACK")
            lock.close()

        # Telegram redelivers the unacked update, maybe more than once.
        assert await post(http, base, update(2, 502)) == 200
        assert await post(http, base, update(2, 502)) == 200
        await asyncio.sleep(1.0)  # let a stalled first request finish, if it will
        assert _sqlite_counts(db, 2) == (1, 1)
        assert _sqlite_counts(db, 1) == (1, 1)


# -- PostgreSQL --------------------------------------------------------------------------------


def _dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def _admin(*sql: str) -> None:
    conn = await asyncpg.connect(_dsn(ADMIN_URL), timeout=5)
    try:
        for s in sql:
            await conn.execute(s)
    finally:
        await conn.close()


@pytest.mark.postgres
async def test_postgres_unreachable_answers_503_and_the_redelivery_is_handled_once(
    postgres_url: str, tmp_path: Path
):
    name = f"tether_resil_{uuid.uuid4().hex[:10]}"
    url = make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    await _admin(f"CREATE DATABASE {name}")
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
        env["TETHER_DATABASE_URL"] = url
        up = subprocess.run(  # noqa: ASYNC221 -- a one-off migration before serving
            [sys.executable, "-m", "tether.cli", "db", "upgrade"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert up.returncode == 0, up.stdout + up.stderr

        async def counts(update_id: int) -> tuple[int, int]:
            conn = await asyncpg.connect(_dsn(url), timeout=5)
            try:
                event = f"{BOT_ID}:{update_id}"
                inbox = await conn.fetchval(
                    "SELECT count(*) FROM inbox WHERE source_event_id = $1", event
                )
                work = await conn.fetchval(
                    "SELECT count(*) FROM work WHERE source_event_id = $1", event
                )
                return inbox, work
            finally:
                await conn.close()

        async with serve(tmp_path, url) as base, aiohttp.ClientSession() as http:
            assert await post(http, base, update(1, 601)) == 200
            await _admin(
                f"ALTER DATABASE {name} ALLOW_CONNECTIONS false",
                f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'",
            )
            try:
                started = time.monotonic()
                status = await post(http, base, update(2, 602), timeout=15)
                elapsed = time.monotonic() - started
                print(f"\nunreachable PostgreSQL: {status} after {elapsed:.2f}s")
                assert status == 503
                assert elapsed < 5, elapsed
            finally:
                await _admin(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")

            assert await post(http, base, update(2, 602)) == 200
            assert await counts(2) == (1, 1)
            assert await post(http, base, update(2, 602)) == 200
            assert await counts(2) == (1, 1)
            assert await counts(1) == (1, 1)
    finally:
        await _admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


# -- stuck workers -----------------------------------------------------------------------------


async def test_webhook_answers_fast_while_every_worker_is_stuck(tmp_path: Path):
    db = tmp_path / "tether.db"
    async with (
        serve(
            tmp_path,
            f"sqlite+aiosqlite:///{db}",
            TETHER_AGENT_MODULES="stuck_agents,worker.agents",
            TETHER_DEFAULT_AGENT="stuck",
            TETHER_WORKER_CONCURRENCY="2",
        ) as base,
        aiohttp.ClientSession() as http,
    ):
        assert await post(http, base, update(1, 701)) == 200
        assert await post(http, base, update(2, 702)) == 200

        def running() -> bool:
            with sqlite3.connect(db, timeout=5) as conn:
                n = conn.execute("SELECT count(*) FROM work WHERE state = 'running'")
                return n.fetchone()[0] == 2

        await eventually(running, 10, "both worker slots running the stuck step")

        times = []
        for i in range(20):
            started = time.monotonic()
            status = await post(http, base, update(100 + i, 800 + i), timeout=5)
            times.append(time.monotonic() - started)
            assert status == 200
        print(f"\nack while stuck: max {max(times) * 1000:.1f} ms")
        assert max(times) < 1.0, times
        assert running(), "the workers were still stuck throughout"
