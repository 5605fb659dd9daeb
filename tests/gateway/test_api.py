"""The operator API over a real HTTP server, on SQLite and PostgreSQL (no mocks of the ledger)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from config import Settings
from gateway import create_app
from gateway.openapi import OPENAPI
from ledger import Claim, Ledger, StepWrite, utcnow

TOKEN = "test-operator-token-\u00e9"  # non-ASCII on purpose: compared as bytes
AUTH = {"Authorization": f"Bearer {TOKEN}"}
AGENTS = frozenset({"demo", "echo"})


class Api:
    """A client bound to one running test server."""

    def __init__(self, server: TestServer, session: aiohttp.ClientSession) -> None:
        self.server = server
        self.session = session

    async def call(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        data: bytes | str | io.BytesIO | None = None,
        headers: dict[str, str] | None = None,
        auth: bool = True,
    ) -> tuple[int, Any, aiohttp.typedefs.LooseHeaders]:
        hdrs = {**(AUTH if auth else {}), **(headers or {})}
        kwargs: dict[str, Any] = {"headers": hdrs}
        if json_body is not None:
            kwargs["json"] = json_body
        elif data is not None:
            kwargs["data"] = data
        async with self.session.request(method, self.server.make_url(path), **kwargs) as resp:
            assert resp.content_type == "application/json", await resp.text()
            return resp.status, await resp.json(), resp.headers

    async def create(self, **body: Any) -> dict[str, Any]:
        status, data, _ = await self.call("POST", "/api/v1/work", json_body=body)
        assert status == 201, data
        return data


async def serve(
    ledger: Ledger, *, known_agents: frozenset[str] | None = AGENTS
) -> AsyncIterator[Api]:
    app = create_app(
        ledger, Settings(max_attempts=3), operator_token=TOKEN, known_agents=known_agents
    )
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    session = aiohttp.ClientSession()
    try:
        yield Api(server, session)
    finally:
        await session.close()
        await server.close()


@pytest.fixture
async def api(ledger: Ledger) -> AsyncIterator[Api]:
    async for client in serve(ledger):
        yield client


def error_code(body: Any) -> str:
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]["code"]


async def claim_one(ledger: Ledger) -> Claim:
    claims = await ledger.claim_work("worker-1", limit=1, lease_ttl=30)
    assert len(claims) == 1
    return claims[0]


# ---- authentication ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Bearer "},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"Bearer {TOKEN}x"},
    ],
    ids=["missing", "wrong", "empty", "wrong-scheme", "prefix"],
)
async def test_token_required(api: Api, ledger: Ledger, headers: dict[str, str]) -> None:
    for method, path, body in [
        ("GET", "/api/v1/work", None),
        ("POST", "/api/v1/work", {"agent": "demo"}),
        ("GET", "/api/v1/workers", None),
        ("GET", "/api/v1/no-such-route", None),  # no hint about which routes exist
    ]:
        status, data, hdrs = await api.call(
            method, path, json_body=body, headers=headers, auth=False
        )
        assert status == 401, (path, data)
        assert error_code(data) == "unauthorized"
        assert hdrs["WWW-Authenticate"].startswith("Bearer")
        assert TOKEN not in json.dumps(data)
    assert await ledger.list_work() == []


async def test_bearer_scheme_is_case_insensitive(api: Api) -> None:
    status, _, _ = await api.call(
        "GET", "/api/v1/work", headers={"Authorization": f"bearer {TOKEN}"}, auth=False
    )
    assert status == 200


async def test_access_log_never_contains_the_token(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        await api.call("GET", "/api/v1/work?state=queued")
        await api.call("GET", "/api/v1/work", headers={"Authorization": "Bearer guess"}, auth=False)
    assert any(
        r.name == "gateway.access" and "GET /api/v1/work 200" in r.getMessage()
        for r in caplog.records
    )
    assert any("GET /api/v1/work 401" in r.getMessage() for r in caplog.records)
    assert TOKEN not in caplog.text
    assert "guess" not in caplog.text


# ---- creating work ----------------------------------------------------------------------------


async def test_create_then_idempotent_repeat(api: Api, ledger: Ledger) -> None:
    body = {"agent": "demo", "input": {"text": "hi", "n": [1, 2.5]}, "idempotency_key": "k-1"}
    status, first, headers = await api.call("POST", "/api/v1/work", json_body=body)
    assert status == 201
    assert headers["Location"] == f"/api/v1/work/{first['id']}"
    assert first["agent"] == "demo"
    assert first["state"] == "queued"
    assert first["input"] == body["input"]
    assert first["attempt"] == 1
    assert first["max_attempts"] == 3  # the settings' default
    assert first["source"] == "api" and first["source_event_id"] == "k-1"
    assert datetime.fromisoformat(first["created_at"]).utcoffset() is not None

    status, again, _ = await api.call("POST", "/api/v1/work", json_body=body)
    assert status == 200
    assert again["id"] == first["id"]
    assert again["input"] == body["input"]

    rows = await ledger.list_work()
    assert [w.id for w in rows] == [first["id"]]
    assert rows[0].state_detail == {"actor": "operator"}


async def test_same_key_different_request_is_a_conflict(api: Api, ledger: Ledger) -> None:
    await api.create(agent="demo", input=1, idempotency_key="k")
    for body in [
        {"agent": "demo", "input": 2, "idempotency_key": "k"},
        {"agent": "echo", "input": 1, "idempotency_key": "k"},
    ]:
        status, data, _ = await api.call("POST", "/api/v1/work", json_body=body)
        assert status == 409
        assert error_code(data) == "idempotency_conflict"
    assert len(await ledger.list_work()) == 1


async def test_create_without_key_creates_each_time(api: Api, ledger: Ledger) -> None:
    a = await api.create(agent="echo")
    b = await api.create(agent="echo", input=None, max_attempts=7, priority=-3)
    assert a["id"] != b["id"]
    assert a["input"] is None and a["source"] is None
    assert (b["max_attempts"], b["priority"]) == (7, -3)
    assert len(await ledger.list_work()) == 2


async def test_unknown_agent(api: Api, ledger: Ledger) -> None:
    status, data, _ = await api.call("POST", "/api/v1/work", json_body={"agent": "nope"})
    assert status == 400
    assert error_code(data) == "bad_request"
    assert "'nope'" in data["error"]["message"]
    assert "demo" in data["error"]["message"] and "echo" in data["error"]["message"]
    assert await ledger.list_work() == []


async def test_any_agent_when_none_are_known(ledger: Ledger) -> None:
    async for client in serve(ledger, known_agents=None):
        created = await client.create(agent="anything")
        assert created["agent"] == "anything"


@pytest.mark.parametrize(
    "raw",
    [
        b"{",
        b"",
        b"   ",
        b'{"agent": "demo",}',
        b'{"agent": "demo", "input": NaN}',
        b'{"agent": "demo", "input": Infinity}',
        b'{"agent": "demo", "input": "\xff\xfe"}',
        b'{"agent": "demo", "input": "a\\u0000b"}',
        b'{"agent": "demo", "input": {"k\\u0000": 1}}',
        b'{"agent": "demo", "input": "\\ud800"}',
        b"[" * 100_000 + b"]" * 100_000,
    ],
    ids=[
        "truncated",
        "empty",
        "blank",
        "trailing-comma",
        "nan",
        "infinity",
        "not-utf8",
        "nul",
        "nul-in-key",
        "lone-surrogate",
        "deep",
    ],
)
async def test_malformed_json(api: Api, ledger: Ledger, raw: bytes) -> None:
    status, data, _ = await api.call(
        "POST", "/api/v1/work", data=raw, headers={"Content-Type": "application/json"}
    )
    assert status == 400, data
    assert error_code(data) == "invalid_json"
    assert await ledger.list_work() == []


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"agent": "demo", "extra": 1, "other": 2}, "extra, other"),
        ({"input": 1}, "agent"),
        ({"agent": ""}, "agent"),
        ({"agent": 5}, "agent"),
        ({"agent": "x" * 201}, "agent"),
        ({"agent": "demo", "idempotency_key": "k" * 201}, "idempotency_key"),
        ({"agent": "demo", "idempotency_key": 12}, "idempotency_key"),
        ({"agent": "demo", "max_attempts": 0}, "max_attempts"),
        ({"agent": "demo", "max_attempts": 101}, "max_attempts"),
        ({"agent": "demo", "max_attempts": True}, "max_attempts"),
        ({"agent": "demo", "max_attempts": "3"}, "max_attempts"),
        ({"agent": "demo", "priority": 2**40}, "priority"),
        ({"agent": "demo", "priority": 1.5}, "priority"),
        ([{"agent": "demo"}], "object"),
        ("demo", "object"),
    ],
)
async def test_invalid_body(api: Api, ledger: Ledger, body: Any, needle: str) -> None:
    status, data, _ = await api.call("POST", "/api/v1/work", json_body=body)
    assert status == 400, data
    assert error_code(data) == "bad_request"
    assert needle in data["error"]["message"]
    assert await ledger.list_work() == []


async def test_body_over_one_mib(api: Api, ledger: Ledger) -> None:
    body = json.dumps({"agent": "demo", "input": "x" * (1024 * 1024)}).encode()
    status, data, _ = await api.call(
        "POST", "/api/v1/work", data=io.BytesIO(body), headers={"Content-Type": "application/json"}
    )
    assert status == 413
    assert error_code(data) == "payload_too_large"
    assert await ledger.list_work() == []
    # just under the limit is fine
    await api.create(agent="demo", input="x" * (1024 * 1024 - 100))


# ---- reading work -----------------------------------------------------------------------------


@pytest.mark.parametrize("work_id", ["0" * 28, "no-such-id", "x" * 41, "a%00b", "%F0%9F%98%80"])
async def test_get_unknown_id(api: Api, work_id: str) -> None:
    status, data, _ = await api.call("GET", f"/api/v1/work/{work_id}")
    assert status == 404
    assert error_code(data) == "not_found"


async def test_unknown_route_and_method(api: Api) -> None:
    status, data, _ = await api.call("GET", "/api/v1/nothing-here")
    assert (status, error_code(data)) == (404, "not_found")
    status, data, _ = await api.call("GET", "/nothing-here", auth=False)
    assert (status, error_code(data)) == (404, "not_found")
    status, data, headers = await api.call("DELETE", "/api/v1/work")
    assert (status, error_code(data)) == (405, "method_not_allowed")
    assert "GET" in headers["Allow"] and "POST" in headers["Allow"]


async def test_detail_has_steps_events_and_children(api: Api, ledger: Ledger) -> None:
    created = await api.create(agent="demo", input={"q": 1})
    claim = await claim_one(ledger)
    assert claim.work_id == created["id"]
    started = utcnow()
    await ledger.record_step(
        claim,
        StepWrite(
            seq=1,
            name="plan",
            attempt=1,
            idempotency_key=f"{claim.work_id}:1",
            started_at=started,
            status="succeeded",
            output={"plan": ["a", "b"]},
            finished_at=utcnow(),
        ),
    )
    child_id = await ledger.spawn_child(claim, 2, "echo", {"c": True}, max_attempts=2)
    await ledger.complete_work(claim, {"answer": 42})

    status, detail, _ = await api.call("GET", f"/api/v1/work/{created['id']}")
    assert status == 200
    assert detail["state"] == "succeeded"
    assert detail["result"] == {"answer": 42}
    assert detail["lease_epoch"] == 1
    assert detail["finished_at"] is not None
    for key in ("created_at", "updated_at", "finished_at"):
        assert datetime.fromisoformat(detail[key]).utcoffset() is not None

    [step] = detail["steps"]
    assert step["seq"] == 1 and step["name"] == "plan" and step["status"] == "succeeded"
    assert step["output"] == {"plan": ["a", "b"]}
    assert step["idempotency_key"] == f"{claim.work_id}:1"
    assert datetime.fromisoformat(step["started_at"]) == started
    assert set(step) == {
        "seq",
        "name",
        "status",
        "attempt",
        "output",
        "error",
        "error_type",
        "idempotency_key",
        "started_at",
        "finished_at",
        "last_heartbeat_at",
        "progress",
        # model-call metadata (null for other steps)
        "model",
        "model_answered",
        "prompt_fingerprint",
        "input_tokens",
        "output_tokens",
        "total_tokens",
        "cost",
        "finish_reason",
        "latency_ms",
        "tool_calls",
        # when the record became durable
        "durability",
        "committed_at",
    }
    assert step["durability"] == "sync" and step["committed_at"] is not None

    types = [e["type"] for e in detail["events"]]
    assert types[0] == "created" and "claimed" in types and types[-1] == "succeeded"
    ids = [e["id"] for e in detail["events"]]
    assert ids == sorted(ids)
    assert set(detail["events"][0]) == {"id", "type", "data", "actor", "created_at"}

    assert detail["waits"] == []
    [child] = detail["children"]
    assert child["id"] == child_id and child["agent"] == "echo" and child["state"] == "queued"

    status, child_detail, _ = await api.call("GET", f"/api/v1/work/{child_id}")
    assert status == 200 and child_detail["parent_id"] == created["id"]


# ---- operator actions -------------------------------------------------------------------------


async def state_of(ledger: Ledger, work_id: str) -> str:
    return (await ledger.get_work(work_id)).state


async def test_pause_resume_cancel_retry(api: Api, ledger: Ledger) -> None:
    work_id = (await api.create(agent="demo"))["id"]

    async def act(action: str) -> dict[str, Any]:
        status, data, _ = await api.call("POST", f"/api/v1/work/{work_id}/{action}")
        assert status == 200, data
        assert data["state"] == await state_of(ledger, work_id)
        return data

    assert (await act("pause"))["state"] == "paused"
    assert (await act("resume"))["state"] == "queued"
    assert (await act("cancel"))["state"] == "cancelled"
    retried = await act("retry")
    assert (retried["state"], retried["attempt"]) == ("queued", 2)

    _, detail, _ = await api.call("GET", f"/api/v1/work/{work_id}")
    operator_events = [e["type"] for e in detail["events"] if e["actor"] == "operator"]
    assert operator_events == ["created", "paused", "resumed", "cancelled", "retried"]


async def test_action_accepts_an_empty_object(api: Api) -> None:
    work_id = (await api.create(agent="demo"))["id"]
    status, data, _ = await api.call("POST", f"/api/v1/work/{work_id}/pause", json_body={})
    assert (status, data["state"]) == (200, "paused")


@pytest.mark.parametrize(
    ("action", "state"), [("resume", "queued"), ("retry", "queued"), ("pause", "paused")]
)
async def test_illegal_action_is_409_and_changes_nothing(
    api: Api, ledger: Ledger, action: str, state: str
) -> None:
    work_id = (await api.create(agent="demo"))["id"]
    if state == "paused":
        await ledger.pause_work(work_id)
    before = await ledger.get_work(work_id)
    status, data, _ = await api.call("POST", f"/api/v1/work/{work_id}/{action}")
    assert status == 409
    assert error_code(data) == "illegal_transition"
    assert state in data["error"]["message"]
    after = await ledger.get_work(work_id)
    assert after.state == state
    assert after.updated_at == before.updated_at


async def test_actions_on_finished_work(api: Api, ledger: Ledger) -> None:
    work_id = (await api.create(agent="demo"))["id"]
    await ledger.complete_work(await claim_one(ledger), "done")
    for action in ("pause", "resume", "cancel", "retry"):
        status, data, _ = await api.call("POST", f"/api/v1/work/{work_id}/{action}")
        assert (status, error_code(data)) == (409, "illegal_transition"), action
    assert await state_of(ledger, work_id) == "succeeded"


async def test_pause_running_work_is_requested(api: Api, ledger: Ledger) -> None:
    work_id = (await api.create(agent="demo"))["id"]
    await claim_one(ledger)
    status, data, _ = await api.call("POST", f"/api/v1/work/{work_id}/pause")
    assert status == 200
    assert (data["state"], data["control"]) == ("running", "pause")


async def test_action_on_unknown_id(api: Api) -> None:
    for action in ("pause", "resume", "cancel", "retry"):
        status, data, _ = await api.call("POST", f"/api/v1/work/{'0' * 28}/{action}")
        assert (status, error_code(data)) == (404, "not_found"), action


async def test_action_with_unexpected_body(api: Api, ledger: Ledger) -> None:
    work_id = (await api.create(agent="demo"))["id"]
    status, data, _ = await api.call(
        "POST", f"/api/v1/work/{work_id}/pause", json_body={"force": True}
    )
    assert (status, error_code(data)) == (400, "bad_request")
    assert "force" in data["error"]["message"]
    status, data, _ = await api.call("POST", f"/api/v1/work/{work_id}/cancel", data=b"{oops")
    assert (status, error_code(data)) == (400, "invalid_json")
    assert await state_of(ledger, work_id) == "queued"


# ---- listing ----------------------------------------------------------------------------------


async def test_list_and_filters(api: Api, ledger: Ledger) -> None:
    a = await api.create(agent="demo")
    b = await api.create(agent="echo")
    c = await api.create(agent="demo")
    await ledger.pause_work(b["id"])

    status, data, _ = await api.call("GET", "/api/v1/work")
    assert status == 200
    assert [w["id"] for w in data["items"]] == [c["id"], b["id"], a["id"]]  # newest first
    assert data["counts"]["queued"] == 2 and data["counts"]["paused"] == 1
    assert set(data["counts"]) == {
        "queued",
        "running",
        "waiting",
        "paused",
        "succeeded",
        "failed",
        "cancelled",
        "expired_leases",
        "retrying",
    }

    _, data, _ = await api.call("GET", "/api/v1/work?state=paused")
    assert [w["id"] for w in data["items"]] == [b["id"]]
    _, data, _ = await api.call("GET", "/api/v1/work?state=queued&agent=demo&limit=1")
    assert [w["id"] for w in data["items"]] == [c["id"]]
    _, data, _ = await api.call("GET", "/api/v1/work?agent=nobody")
    assert data["items"] == []


@pytest.mark.parametrize(
    ("query", "needle"),
    [
        ("state=done", "queued"),
        ("state=QUEUED", "state"),
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=ten", "limit"),
        ("limit=-1", "limit"),
        ("status=queued", "status"),
        ("state=queued&state=paused", "state"),
        ("agent=a%00b", "agent"),
    ],
)
async def test_list_rejects_bad_queries(api: Api, query: str, needle: str) -> None:
    status, data, _ = await api.call("GET", f"/api/v1/work?{query}")
    assert status == 400, data
    assert error_code(data) == "bad_request"
    assert needle in data["error"]["message"]


async def test_workers(api: Api, ledger: Ledger) -> None:
    status, data, _ = await api.call("GET", "/api/v1/workers")
    assert (status, data) == (200, [])
    await ledger.register_worker("w-1", host="box", pid=123, concurrency=4)
    await ledger.register_worker("w-2", host="box", pid=124, concurrency=2)
    await ledger.stop_worker("w-2")
    _, data, _ = await api.call("GET", "/api/v1/workers")
    by_id = {w["id"]: w for w in data}
    assert set(by_id) == {"w-1", "w-2"}
    assert by_id["w-1"]["state"] == "running" and by_id["w-1"]["concurrency"] == 4
    assert by_id["w-2"]["state"] == "stopped"
    assert datetime.fromisoformat(by_id["w-2"]["stopped_at"]).utcoffset() is not None
    assert set(by_id["w-1"]) == {
        "id",
        "host",
        "pid",
        "concurrency",
        "state",
        "started_at",
        "last_seen_at",
        "stopped_at",
        "leases_held",
    }


# ---- OpenAPI ----------------------------------------------------------------------------------


async def test_openapi_served_without_token_and_matches_routes(api: Api) -> None:
    status, doc, _ = await api.call("GET", "/api/v1/openapi.json", auth=False)
    assert status == 200
    assert doc == json.loads(json.dumps(OPENAPI))
    assert doc["openapi"].startswith("3.1")
    assert doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert "Error" in doc["components"]["schemas"]

    routes: set[tuple[str, str]] = set()
    for route in api.server.app.router.routes():
        path = route.resource.canonical if route.resource else ""
        documented_area = path.startswith(("/api/", "/resume/")) or path == "/metrics"
        if documented_area and route.method != "HEAD":
            routes.add((path, route.method.lower()))
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    assert documented == routes
    assert ("/api/v1/work/{id}/retry", "post") in documented


# ---- failures ---------------------------------------------------------------------------------


class BrokenLedger(Ledger):
    """A real ledger whose count query hits a bug."""

    async def count_by_state(self) -> dict[str, int]:
        raise RuntimeError("secret internal detail")


async def test_unexpected_error_is_500_without_details(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    real = await Ledger.open(db_url)
    broken = BrokenLedger(real.engines)
    try:
        async for client in serve(broken):
            status, data, _ = await client.call("GET", "/api/v1/work")
    finally:
        await real.close()
    assert status == 500
    assert error_code(data) == "internal"
    assert "secret" not in data["error"]["message"]
    assert "Traceback" not in json.dumps(data)
    assert "secret internal detail" in caplog.text  # logged for the operator


async def test_unreachable_database_is_503_and_writes_nothing() -> None:
    dead = await Ledger.open("postgresql+asyncpg://postgres@127.0.0.1:1/nope")
    try:
        async for client in serve(dead):
            status, data, headers = await client.call(
                "POST", "/api/v1/work", json_body={"agent": "demo", "idempotency_key": "k"}
            )
            assert status == 503
            assert error_code(data) == "ledger_unavailable"
            assert headers["Retry-After"]
            assert "127.0.0.1" not in data["error"]["message"]
            for method, path in [
                ("GET", "/api/v1/work"),
                ("GET", f"/api/v1/work/{'0' * 28}"),
                ("POST", f"/api/v1/work/{'0' * 28}/pause"),
                ("GET", "/api/v1/workers"),
            ]:
                status, data, _ = await client.call(method, path)
                assert (status, error_code(data)) == (503, "ledger_unavailable"), path
            # validation still answers before the database is touched
            status, data, _ = await client.call("POST", "/api/v1/work", json_body={"agent": 1})
            assert status == 400
    finally:
        await dead.close()
