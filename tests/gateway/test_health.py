"""Liveness and readiness over a real HTTP server, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from config import Settings
from gateway import create_app
from ledger import Ledger

DEAD_URL = "postgresql+asyncpg://postgres@127.0.0.1:1/nope"  # nothing listens on port 1


async def running(ledger: Ledger) -> AsyncIterator[tuple[TestServer, aiohttp.ClientSession]]:
    app = create_app(ledger, Settings(), operator_token="t0ken")
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    session = aiohttp.ClientSession()
    try:
        yield server, session
    finally:
        await session.close()
        await server.close()


@pytest.fixture
async def dead_ledger() -> AsyncIterator[Ledger]:
    led = await Ledger.open(DEAD_URL)
    try:
        yield led
    finally:
        await led.close()


async def get(
    server: TestServer, session: aiohttp.ClientSession, path: str
) -> tuple[int, dict[str, object]]:
    async with session.get(server.make_url(path)) as resp:
        assert resp.content_type == "application/json"
        return resp.status, await resp.json()


async def test_healthz_and_readyz(ledger: Ledger) -> None:
    async for server, session in running(ledger):
        assert await get(server, session, "/healthz") == (200, {"status": "ok"})
        assert await get(server, session, "/readyz") == (200, {"status": "ready"})


async def test_not_ready_when_the_database_is_unreachable(dead_ledger: Ledger) -> None:
    async for server, session in running(dead_ledger):
        status, body = await get(server, session, "/readyz")
        assert status == 503
        assert body["error"]["code"] == "ledger_unavailable"  # type: ignore[index]
        assert "127.0.0.1" not in body["error"]["message"]  # type: ignore[index]
        # liveness does not depend on the database
        assert await get(server, session, "/healthz") == (200, {"status": "ok"})
        async with session.post(
            server.make_url("/api/v1/work"),
            json={"agent": "demo"},
            headers={"Authorization": "Bearer t0ken"},
        ) as resp:
            assert resp.status == 503
            assert (await resp.json())["error"]["code"] == "ledger_unavailable"


async def test_health_needs_no_token(ledger: Ledger) -> None:
    async for server, session in running(ledger):
        async with session.get(server.make_url("/healthz")) as resp:
            assert resp.status == 200


def test_an_empty_token_is_refused(tmp_path) -> None:
    ledger = Ledger.__new__(Ledger)  # never used: create_app refuses first
    with pytest.raises(ValueError, match="operator token"):
        create_app(ledger, Settings(), operator_token="  ")
