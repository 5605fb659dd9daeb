"""Model usage in the operator API (``GET /api/v1/usage``, the work detail's ``usage``) and in
the console's usage page, over a real HTTP server on SQLite and PostgreSQL.

The ledger is seeded with model-call steps the way a worker records them (their metadata as
step columns), plus a step that is no model call, a failed call and a restart's copies, none
of which may count.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import jsonschema
import pytest
from aiohttp.test_utils import TestServer

from config import Settings
from gateway import create_app
from gateway.openapi import OPENAPI
from ledger import Claim, Ledger, StepWrite, utcnow

TOKEN = "usage-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def schema(name: str) -> dict[str, Any]:
    """An OpenAPI component schema, with the document's components for its ``$ref``s."""
    return {**OPENAPI["components"]["schemas"][name], "components": OPENAPI["components"]}


async def record(
    ledger: Ledger,
    claim: Claim,
    seq: int,
    *,
    model: str | None = None,
    tokens: tuple[int, int] = (0, 0),
    cost: float | None = None,
    status: str = "succeeded",
) -> None:
    now = utcnow()
    extra: dict[str, Any] = {}
    if model is not None:
        extra = {
            "model": model,
            "model_answered": f"{model}-2024-07-18",
            "prompt_fingerprint": f"sha256:{seq:064x}",
            "input_tokens": tokens[0],
            "output_tokens": tokens[1],
            "total_tokens": sum(tokens),
            "cost": cost,
            "finish_reason": "stop",
            "latency_ms": 120,
            "tool_calls": [],
            "output_committed": True,
        }
    await ledger.record_step(
        claim,
        StepWrite(
            seq=seq,
            name="model_call" if model else "plan",
            attempt=1,
            idempotency_key=f"{claim.work_id}:{seq}",
            started_at=now,
            status=status,
            output={"content": "x"} if status == "succeeded" else None,
            error={"type": "E", "message": "x"} if status == "failed" else None,
            finished_at=now,
            extra=extra if status == "succeeded" else {},
        ),
    )


@pytest.fixture
async def seeded(ledger: Ledger) -> dict[str, str]:
    """Three work items: W1 (assistant, in a chat) with two calls, a plain step and a failed
    call, then forked by a restart; W2 (assistant) with an unpriced call; W3 (planner)."""
    chat = await ledger.accept_message(
        channel="http", chat_id="usage-chat", text="hi", message_id="u-1", agent="assistant"
    )
    w2, _ = await ledger.create_work("assistant", {"n": 2})
    w3, _ = await ledger.create_work("planner", {"n": 3})
    claims = {
        c.work_id: c
        for c in await ledger.claim_work(
            "worker-u", limit=5, lease_ttl=30, agents=["assistant", "planner"]
        )
    }
    w1 = claims[chat.work_id]
    await record(ledger, w1, 1, model="gpt-4o-mini", tokens=(10, 5), cost=0.002)
    await record(ledger, w1, 2)
    await record(ledger, w1, 3, model="gpt-4o", tokens=(100, 50), cost=0.01)
    await record(ledger, w1, 4, status="failed")
    await ledger.complete_work(w1, "done")
    await record(ledger, claims[w2.id], 1, model="llama3", tokens=(7, 3), cost=None)
    await record(ledger, claims[w3.id], 1, model="gpt-4o", tokens=(200, 100), cost=0.02)
    fork = await ledger.restart_from_step(chat.work_id, 4, "operator")
    return {
        "w1": chat.work_id,
        "w2": w2.id,
        "w3": w3.id,
        "fork": fork.id,
        "conversation": chat.conversation_id,
    }


@pytest.fixture
async def http(ledger: Ledger) -> AsyncIterator[tuple[TestServer, aiohttp.ClientSession]]:
    app = create_app(ledger, Settings(operator_token=TOKEN), operator_token=TOKEN)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
    try:
        yield server, session
    finally:
        await session.close()
        await server.close()


async def get(
    http: tuple[TestServer, aiohttp.ClientSession], path: str, *, auth: bool = True
) -> tuple[int, Any]:
    server, session = http
    async with session.get(server.make_url(path), headers=AUTH if auth else {}) as resp:
        return resp.status, await resp.json()


def totals(calls: int, tin: int, tout: int, cost: float, unpriced: int = 0) -> dict[str, Any]:
    return {
        "calls": calls,
        "input_tokens": tin,
        "output_tokens": tout,
        "total_tokens": tin + tout,
        "cost": pytest.approx(cost),
        "unpriced_calls": unpriced,
    }


async def test_usage_totals_by_agent_model_conversation_and_work(
    http: Any, seeded: dict[str, str]
) -> None:
    status, body = await get(http, "/api/v1/usage?by=agent")
    assert status == 200, body
    jsonschema.validate(body, schema("UsageList"))
    assert body["by"] == "agent"
    assert body["items"] == [
        {"key": "planner", **totals(1, 200, 100, 0.02)},
        {"key": "assistant", **totals(3, 117, 58, 0.012, unpriced=1)},
    ]
    assert body["total"] == totals(4, 317, 158, 0.032, unpriced=1)

    status, body = await get(http, "/api/v1/usage?by=model")
    assert [(i["key"], i["calls"], i["total_tokens"], i["cost"]) for i in body["items"]] == [
        ("gpt-4o", 2, 450, pytest.approx(0.03)),
        ("gpt-4o-mini", 1, 15, pytest.approx(0.002)),
        ("llama3", 1, 10, 0.0),
    ]
    assert body["items"][2]["unpriced_calls"] == 1

    status, body = await get(http, "/api/v1/usage?by=conversation")
    assert body["items"] == [
        {"key": None, **totals(2, 207, 103, 0.02, unpriced=1)},
        {"key": seeded["conversation"], **totals(2, 110, 55, 0.012)},
    ]

    status, body = await get(http, "/api/v1/usage?by=work")
    assert [(i["key"], i["calls"]) for i in body["items"]] == [
        (seeded["w3"], 1),
        (seeded["w1"], 2),
        (seeded["w2"], 1),
    ]  # the fork's copied steps are W1's calls, counted once

    # the default grouping, filters and the limit
    status, body = await get(http, "/api/v1/usage")
    assert status == 200 and body["by"] == "agent"
    status, body = await get(http, "/api/v1/usage?by=model&agent=planner")
    assert [(i["key"], i["calls"]) for i in body["items"]] == [("gpt-4o", 1)]
    assert body["total"] == totals(1, 200, 100, 0.02)
    status, body = await get(
        http, f"/api/v1/usage?by=work&conversation_id={seeded['conversation']}"
    )
    assert [i["key"] for i in body["items"]] == [seeded["w1"]]
    status, body = await get(http, "/api/v1/usage?by=model&limit=1")
    assert len(body["items"]) == 1 and body["total"]["calls"] == 4
    status, body = await get(http, "/api/v1/usage?since=2999-01-01T00:00:00Z")
    assert status == 200 and body["items"] == [] and body["total"] == totals(0, 0, 0, 0.0)


async def test_work_detail_carries_its_usage_and_model_step_metadata(
    http: Any, seeded: dict[str, str]
) -> None:
    status, body = await get(http, f"/api/v1/work/{seeded['w1']}")
    assert status == 200, body
    jsonschema.validate(body, schema("WorkDetail"))
    assert body["usage"] == totals(2, 110, 55, 0.012)
    call = body["steps"][0]
    assert (call["name"], call["model"], call["model_answered"]) == (
        "model_call", "gpt-4o-mini", "gpt-4o-mini-2024-07-18"
    )  # fmt: skip
    assert (call["input_tokens"], call["output_tokens"], call["total_tokens"]) == (10, 5, 15)
    assert (call["cost"], call["finish_reason"], call["latency_ms"]) == (0.002, "stop", 120)
    assert call["prompt_fingerprint"].startswith("sha256:") and call["tool_calls"] == []
    assert body["steps"][1]["model"] is None and body["steps"][1]["cost"] is None
    # the fork shows the copies, but its own usage is what it ran itself: nothing yet
    status, body = await get(http, f"/api/v1/work/{seeded['fork']}")
    assert [s["name"] for s in body["steps"]] == ["model_call", "plan", "model_call"]
    assert body["usage"] == totals(0, 0, 0, 0.0)
    status, body = await get(http, f"/api/v1/work/{seeded['w2']}")
    assert body["usage"] == totals(1, 7, 3, 0.0, unpriced=1)


async def test_usage_refuses_bad_queries(http: Any, ledger: Ledger) -> None:
    for query, fragment in [
        ("by=team", "by must be one of agent, model, conversation, work"),
        ("by=model&by=agent", "given more than once"),
        ("since=yesterday", "since must be an ISO 8601 date-time"),
        ("limit=0", "limit must be an integer"),
        ("conversation_id=a%20b", "not a conversation id"),
        ("colour=red", "unknown query parameter(s): colour"),
    ]:
        status, body = await get(http, f"/api/v1/usage?{query}")
        assert status == 400, (query, body)
        assert fragment in body["error"]["message"], (query, body)
    status, body = await get(http, "/api/v1/usage", auth=False)
    assert status == 401


async def test_console_usage_page_shows_the_totals(http: Any, seeded: dict[str, str]) -> None:
    server, session = http
    async with session.post(
        server.make_url("/console/login"),
        data={"token": TOKEN, "next": "/console"},
        allow_redirects=False,
    ) as resp:
        assert resp.status == 303
    async with session.get(server.make_url("/console/usage?by=model")) as resp:
        assert resp.status == 200
        page = await resp.text()
    assert 'href="/console/usage"' in page  # in the navigation
    assert 'data-usage="calls">4<' in page
    assert 'data-usage="total_tokens">475<' in page
    assert 'data-usage="cost">0.032<' in page
    assert 'data-usage="unpriced_calls">1<' in page
    for cell in ("gpt-4o-mini", "llama3", '<td class="num">450</td>', "0.03</td>"):
        assert cell in page, cell
    async with session.get(server.make_url("/console/usage?by=work")) as resp:
        page = await resp.text()
    assert f'href="/console/work/{seeded["w3"]}"' in page
    async with session.get(server.make_url("/console/usage?by=nonsense")) as resp:
        assert resp.status == 200
        assert "Unknown grouping" in await resp.text()
    async with session.get(server.make_url(f"/console/work/{seeded['w1']}")) as resp:
        page = await resp.text()
    assert "Model usage" in page and "110 in · 55 out · 165 total" in page
    assert "gpt-4o-mini-2024-07-18 · 15 tok · $0.002 · 120 ms" in page
