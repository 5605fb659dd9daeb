"""The operator side of durable waits over a real HTTP server, on SQLite and PostgreSQL:
listing and resolving waits, signals, resume URLs, and the CLI commands that drive them.

Waits are entered through the ledger the way a worker does (claim, then ``enter_wait``)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from config import Settings
from gateway import create_app
from gateway.openapi import OPENAPI
from ledger import Claim, Ledger
from ledger.waits import WaitSpec

TOKEN = "waits-operator-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
WAIT_KEYS = {
    "id",
    "work_id",
    "step_seq",
    "kind",
    "name",
    "key",
    "prompt",
    "payload_schema",
    "channel",
    "conversation_id",
    "deadline",
    "on_timeout",
    "state",
    "resolution",
    "resolved_by",
    "resolved_at",
    "escalated_at",
    "created_at",
}


class Api:
    def __init__(self, server: TestServer, session: aiohttp.ClientSession) -> None:
        self.server = server
        self.session = session

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    async def call(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        data: bytes | None = None,
        auth: bool = True,
    ) -> tuple[int, Any]:
        kwargs: dict[str, Any] = {"headers": AUTH if auth else {}}
        if json_body is not None:
            kwargs["json"] = json_body
        elif data is not None:
            kwargs["data"] = data
        async with self.session.request(method, self.server.make_url(path), **kwargs) as resp:
            assert resp.content_type == "application/json", await resp.text()
            return resp.status, await resp.json()

    async def resolve(self, wait_id: str, body: Any) -> tuple[int, Any]:
        return await self.call("POST", f"/api/v1/waits/{wait_id}/resolve", json_body=body)


@pytest.fixture
async def api(ledger: Ledger) -> AsyncIterator[Api]:
    app = create_app(ledger, Settings(max_attempts=3), operator_token=TOKEN)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    session = aiohttp.ClientSession()
    try:
        yield Api(server, session)
    finally:
        await session.close()
        await server.close()


def error_of(body: Any, code: str) -> dict[str, Any]:
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


async def running(ledger: Ledger, agent: str = "a") -> Claim:
    """A fresh work item, claimed as a worker would."""
    await ledger.create_work(agent, None)
    [claim] = await ledger.claim_work("w", limit=1, lease_ttl=30)
    return claim


async def waiting(ledger: Ledger, spec: WaitSpec, step: str = "step") -> tuple[str, str]:
    """A work item parked on ``spec``: ``(work_id, wait_id)``."""
    claim = await running(ledger)
    entered = await ledger.enter_wait(claim, spec, step)
    assert isinstance(entered, tuple)
    _, wait_id = entered
    assert (await ledger.get_work(claim.work_id)).state == "waiting"
    return claim.work_id, wait_id


def approval(prompt: str = "Delete?") -> WaitSpec:
    return WaitSpec(seq=1, kind="approval", prompt=prompt)


async def event_log(ledger: Ledger, work_id: str) -> list[tuple[str, str | None]]:
    return [(e.type, e.actor) for e in await ledger.list_recent_events(work_id, limit=100)]


# ---- listing and reading ----------------------------------------------------------------------


async def test_list_pending_and_filters(api: Api, ledger: Ledger) -> None:
    work_a, wait_a = await waiting(ledger, approval())
    work_b, wait_b = await waiting(
        ledger,
        WaitSpec(seq=1, kind="input", prompt="How many?", payload_schema={"type": "integer"}),
    )
    await ledger.resolve_wait(wait_b, {"input": 3}, by="operator")

    status, data = await api.call("GET", "/api/v1/waits?state=pending")
    assert status == 200
    [item] = data["items"]
    assert set(item) == WAIT_KEYS
    assert item["id"] == wait_a and item["work_id"] == work_a
    assert (item["kind"], item["prompt"], item["state"]) == ("approval", "Delete?", "pending")
    assert item["resolution"] is None and item["resolved_by"] is None

    _, data = await api.call("GET", "/api/v1/waits")
    assert [w["id"] for w in data["items"]] == [wait_a, wait_b]  # oldest first
    _, data = await api.call("GET", "/api/v1/waits?state=resolved&kind=input")
    [item] = data["items"]
    assert item["id"] == wait_b and item["payload_schema"] == {"type": "integer"}
    assert item["resolution"]["input"] == 3
    _, data = await api.call("GET", f"/api/v1/waits?work_id={work_b}&limit=1")
    assert [w["id"] for w in data["items"]] == [wait_b]
    _, data = await api.call("GET", "/api/v1/waits?kind=timer")
    assert data["items"] == []

    status, one = await api.call("GET", f"/api/v1/waits/{wait_a}")
    assert (
        status == 200
        and one == (await api.call("GET", "/api/v1/waits?state=pending"))[1]["items"][0]
    )


@pytest.mark.parametrize(
    ("query", "needle"),
    [
        ("state=open", "state"),
        ("state=PENDING", "state"),
        ("kind=timerz", "kind"),
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=ten", "limit"),
        ("work_id=a%20b", "work_id"),
        ("status=pending", "status"),
        ("state=pending&state=resolved", "state"),
    ],
)
async def test_list_rejects_bad_filters(api: Api, query: str, needle: str) -> None:
    status, data = await api.call("GET", f"/api/v1/waits?{query}")
    assert status == 400, data
    assert needle in error_of(data, "bad_request")["message"]


@pytest.mark.parametrize("wait_id", ["0" * 28, "nope", "x" * 41])
async def test_unknown_wait(api: Api, wait_id: str) -> None:
    status, data = await api.call("GET", f"/api/v1/waits/{wait_id}")
    assert status == 404
    error_of(data, "not_found")
    status, data = await api.resolve(wait_id, {"decision": "approve"})
    assert status == 404
    error_of(data, "not_found")


async def test_operator_token_required(api: Api, ledger: Ledger) -> None:
    _, wait_id = await waiting(ledger, approval())
    for method, path, body in [
        ("GET", "/api/v1/waits?state=pending", None),
        ("GET", f"/api/v1/waits/{wait_id}", None),
        ("POST", f"/api/v1/waits/{wait_id}/resolve", {"decision": "approve"}),
        ("POST", "/api/v1/signals/payment", {"key": "k", "data": 1}),
    ]:
        status, data = await api.call(method, path, json_body=body, auth=False)
        assert status == 401, path
        error_of(data, "unauthorized")
    assert (await ledger.get_wait(wait_id)).state == "pending"


# ---- approvals --------------------------------------------------------------------------------


async def test_approve_resumes_the_work(api: Api, ledger: Ledger) -> None:
    work_id, wait_id = await waiting(ledger, approval())
    status, data = await api.resolve(wait_id, {"decision": "approve", "comment": "fine"})
    assert status == 200, data
    assert set(data) == WAIT_KEYS
    assert data["state"] == "resolved" and data["resolved_by"] == "operator"
    assert data["resolution"]["decision"] == "approve"
    assert data["resolution"]["approved"] is True
    assert data["resolution"]["comment"] == "fine"
    assert data["resolved_at"] is not None

    assert (await ledger.get_work(work_id)).state == "queued"
    assert (await event_log(ledger, work_id))[-1] == ("resumed", "operator")


async def test_deny_with_a_named_operator(api: Api, ledger: Ledger) -> None:
    work_id, wait_id = await waiting(ledger, approval())
    status, data = await api.resolve(wait_id, {"decision": "deny", "by": "alice"})
    assert status == 200, data
    assert data["resolved_by"] == "operator:alice"
    assert data["resolution"]["approved"] is False
    assert (await event_log(ledger, work_id))[-1] == ("resumed", "operator:alice")


@pytest.mark.parametrize("second", ["approve", "deny"])
async def test_second_decision_is_409_with_the_first(api: Api, ledger: Ledger, second: str) -> None:
    work_id, wait_id = await waiting(ledger, approval())
    status, first = await api.resolve(wait_id, {"decision": "approve", "by": "bob"})
    assert status == 200
    before = await ledger.get_wait(wait_id)
    events = await event_log(ledger, work_id)

    status, data = await api.resolve(wait_id, {"decision": second, "comment": "late"})
    assert status == 409
    error = error_of({"error": data["error"]}, "already_resolved")
    assert set(error) == {"code", "message", "state", "resolution", "resolved_by"}
    assert error["state"] == "resolved"
    assert error["resolved_by"] == "operator:bob"
    assert error["resolution"] == first["resolution"]
    assert error["resolution"]["decision"] == "approve"

    # even a body that does not fit the wait learns the first decision
    status, data = await api.resolve(wait_id, {"input": 1})
    assert status == 409 and data["error"]["resolved_by"] == "operator:bob"

    assert await ledger.get_wait(wait_id) == before
    assert await event_log(ledger, work_id) == events
    assert (await ledger.get_work(work_id)).state == "queued"


async def test_concurrent_resolves_exactly_one_wins(api: Api, ledger: Ledger) -> None:
    for _ in range(3):
        work_id, wait_id = await waiting(ledger, approval())
        results = await asyncio.gather(
            api.resolve(wait_id, {"decision": "approve", "by": "one"}),
            api.resolve(wait_id, {"decision": "deny", "by": "two"}),
        )
        statuses = sorted(status for status, _ in results)
        assert statuses == [200, 409], results
        [winner] = [body for status, body in results if status == 200]
        [loser] = [body for status, body in results if status == 409]
        assert loser["error"]["code"] == "already_resolved"
        assert loser["error"]["resolution"] == winner["resolution"]
        assert loser["error"]["resolved_by"] == winner["resolved_by"]
        stored = await ledger.get_wait(wait_id)
        assert stored.resolution == winner["resolution"]
        resumed = [e for e in await event_log(ledger, work_id) if e[0] == "resumed"]
        assert resumed == [("resumed", winner["resolved_by"])]
        assert (await ledger.get_work(work_id)).state == "queued"
        # take it off the queue so the next round claims a new item
        await ledger.cancel_work(work_id)


@pytest.mark.parametrize(
    ("body", "code", "needle"),
    [
        ({"decision": "maybe"}, "invalid_resolution", "decision"),
        ({"decision": None}, "invalid_resolution", "decision"),
        ({}, "invalid_resolution", "decision"),
        ({"decision": "approve", "comment": 5}, "invalid_resolution", "comment"),
        ({"decision": "approve", "extra": 1}, "bad_request", "extra"),
        ({"decision": "approve", "input": 1}, "bad_request", "input"),
        ({"data": 1}, "bad_request", "data"),
        ({"decision": "approve", "by": ""}, "bad_request", "by"),
        ({"decision": "approve", "by": "x" * 101}, "bad_request", "by"),
        ({"decision": "approve", "by": 7}, "bad_request", "by"),
        ({"decision": "approve", "by": "a\nb"}, "bad_request", "by"),
        (["approve"], "bad_request", "object"),
    ],
)
async def test_invalid_resolution_changes_nothing(
    api: Api, ledger: Ledger, body: Any, code: str, needle: str
) -> None:
    work_id, wait_id = await waiting(ledger, approval())
    status, data = await api.resolve(wait_id, body)
    assert status == 400, data
    assert needle in error_of(data, code)["message"]
    assert (await ledger.get_wait(wait_id)).state == "pending"
    assert (await ledger.get_work(work_id)).state == "waiting"


async def test_malformed_json_changes_nothing(api: Api, ledger: Ledger) -> None:
    _, wait_id = await waiting(ledger, approval())
    for raw in (b'{"decision": "approve"', b'{"decision": "a\\u0000"}', b"\xff"):
        status, data = await api.call("POST", f"/api/v1/waits/{wait_id}/resolve", data=raw)
        assert status == 400
        error_of(data, "invalid_json")
    assert (await ledger.get_wait(wait_id)).state == "pending"


# ---- input and timer waits --------------------------------------------------------------------


async def test_input_wait_checks_the_schema(api: Api, ledger: Ledger) -> None:
    spec = WaitSpec(seq=1, kind="input", prompt="How many?", payload_schema={"type": "integer"})
    work_id, wait_id = await waiting(ledger, spec)
    status, data = await api.resolve(wait_id, {"input": "five"})
    assert status == 400
    assert "schema" in error_of(data, "invalid_resolution")["message"]
    status, data = await api.resolve(wait_id, {"decision": "approve"})
    assert status == 400
    assert "input" in error_of(data, "bad_request")["message"]
    assert (await ledger.get_wait(wait_id)).state == "pending"

    status, data = await api.resolve(wait_id, {"input": 5})
    assert status == 200, data
    assert data["resolution"]["input"] == 5
    assert (await ledger.get_work(work_id)).state == "queued"


async def test_timer_can_be_fired_early(api: Api, ledger: Ledger) -> None:
    work_id, wait_id = await waiting(ledger, WaitSpec(seq=1, kind="timer"))
    status, data = await api.resolve(wait_id, {"decision": "approve"})
    assert status == 400
    status, data = await api.call("POST", f"/api/v1/waits/{wait_id}/resolve")
    assert status == 200, data
    assert data["resolution"]["fired"] == "early"
    assert (await ledger.get_work(work_id)).state == "queued"


# ---- signals ----------------------------------------------------------------------------------


async def test_signal_resolves_the_matching_waiter(api: Api, ledger: Ledger) -> None:
    spec = WaitSpec(seq=1, kind="signal", name="payment", key="order-1")
    work_id, wait_id = await waiting(ledger, spec)
    events = await event_log(ledger, work_id)

    for name, key in [("payment", "order-2"), ("payment", None), ("refund", "order-1")]:
        status, data = await api.call(
            "POST", f"/api/v1/signals/{name}", json_body={"key": key, "data": {"paid": 1}}
        )
        assert status == 404, (name, key)
        error_of(data, "no_waiter")
    assert (await ledger.get_wait(wait_id)).state == "pending"
    assert await event_log(ledger, work_id) == events

    status, data = await api.call(
        "POST", "/api/v1/signals/payment", json_body={"key": "order-1", "data": {"paid": 10}}
    )
    assert (status, data) == (200, {"resolved": [wait_id]})
    wait = await ledger.get_wait(wait_id)
    assert wait.resolution["data"] == {"paid": 10}
    assert wait.resolved_by == "operator"
    assert (await ledger.get_work(work_id)).state == "queued"
    assert (await event_log(ledger, work_id))[-1] == ("resumed", "operator")

    status, data = await api.call(
        "POST", "/api/v1/signals/payment", json_body={"key": "order-1", "data": 2}
    )
    assert status == 404  # nothing waits any more
    assert (await ledger.get_wait(wait_id)).resolution["data"] == {"paid": 10}


async def test_signal_rejects_bad_bodies(api: Api, ledger: Ledger) -> None:
    _, wait_id = await waiting(ledger, WaitSpec(seq=1, kind="signal", name="s", key="k"))
    for body in ({"key": "k", "payload": 1}, {"key": 5, "data": 1}, {"key": "x" * 401}):
        status, data = await api.call("POST", "/api/v1/signals/s", json_body=body)
        assert status == 400, body
        error_of(data, "bad_request")
    status, data = await api.call("POST", "/api/v1/signals/s", data=b"{nope")
    assert status == 400
    assert (await ledger.get_wait(wait_id)).state == "pending"


# ---- resume URLs ------------------------------------------------------------------------------


async def parked_on_resume_url(ledger: Ledger) -> tuple[str, str]:
    """A work item that handed out a resume URL and waits on it: ``(work_id, token)``."""
    claim = await running(ledger)
    token = await ledger.open_resume_url(claim, 1, "cb")
    entered = await ledger.enter_wait(
        claim, WaitSpec(seq=2, kind="signal", name="cb", adopt_resume_url=True), "signal:cb"
    )
    assert isinstance(entered, tuple)
    assert (await ledger.get_work(claim.work_id)).state == "waiting"
    return claim.work_id, token


async def test_resume_url(api: Api, ledger: Ledger, caplog: pytest.LogCaptureFixture) -> None:
    work_id, token = await parked_on_resume_url(ledger)
    [wait] = await ledger.list_waits(work_id=work_id)
    with caplog.at_level(logging.DEBUG, logger="gateway"):
        status, data = await api.call(
            "POST", f"/resume/{token}", data=b'{"status": "ok"', auth=False
        )
        assert status == 400
        error_of(data, "invalid_json")
        assert (await ledger.get_wait(wait.id)).state == "pending"

        status, data = await api.call(
            "POST", f"/resume/{token}", json_body={"status": "ok", "n": [1]}, auth=False
        )
        assert (status, data) == (200, {"wait_id": wait.id, "state": "resolved"})
        stored = await ledger.get_wait(wait.id)
        assert stored.resolution["data"] == {"status": "ok", "n": [1]}
        assert stored.resolved_by == "resume-url"
        assert (await ledger.get_work(work_id)).state == "queued"
        assert (await event_log(ledger, work_id))[-1] == ("resumed", "resume-url")

        status, data = await api.call("POST", f"/resume/{token}", json_body={"x": 1}, auth=False)
        assert status == 409
        assert data["error"]["code"] == "already_resolved"
        assert data["error"]["resolution"] == stored.resolution
        assert data["error"]["resolved_by"] == "resume-url"
        assert (await ledger.get_wait(wait.id)).resolution == stored.resolution

        for bad in ("x" * 32, token[:-1] + ("A" if token[-1] != "A" else "B"), "short"):
            status, data = await api.call("POST", f"/resume/{bad}", json_body={}, auth=False)
            assert status == 404, bad
            error_of(data, "not_found")
    assert any(
        "POST /resume/<token> 200" in r.getMessage()
        for r in caplog.records
        if r.name == "gateway.access"
    )
    # (aiohttp's own access log belongs to the test server; `tether` runs without it)
    ours = [r.getMessage() for r in caplog.records if r.name != "aiohttp.access"]
    assert not any(token in m for m in ours)


async def test_resume_url_with_an_empty_body_and_before_the_wait(api: Api, ledger: Ledger) -> None:
    claim = await running(ledger)
    token = await ledger.open_resume_url(claim, 1, "cb")
    # the third party answers before the agent got to wait_for_signal
    status, data = await api.call("POST", f"/resume/{token}", auth=False)
    assert status == 200 and data["state"] == "resolved"
    assert (await ledger.get_wait(data["wait_id"])).resolution["data"] is None
    outcome = await ledger.enter_wait(
        claim, WaitSpec(seq=2, kind="signal", name="cb", adopt_resume_url=True), "signal:cb"
    )
    assert not isinstance(outcome, tuple)
    assert outcome.state == "resolved" and outcome.resolution["data"] is None
    assert (await ledger.get_work(claim.work_id)).state == "running"


async def test_resume_needs_no_operator_token_and_ignores_one(api: Api, ledger: Ledger) -> None:
    work_id, token = await parked_on_resume_url(ledger)
    async with api.session.post(
        api.server.make_url(f"/resume/{token}"),
        json=[1, 2],
        headers={"Authorization": "Bearer wrong"},
    ) as resp:
        assert resp.status == 200
    assert (await ledger.list_waits(work_id=work_id))[0].resolution["data"] == [1, 2]


# ---- the work detail --------------------------------------------------------------------------


async def test_work_detail_lists_waits_without_the_token(api: Api, ledger: Ledger) -> None:
    work_id, token = await parked_on_resume_url(ledger)
    status, detail = await api.call("GET", f"/api/v1/work/{work_id}")
    assert status == 200
    [wait] = detail["waits"]
    assert set(wait) == WAIT_KEYS
    assert (wait["kind"], wait["name"], wait["state"]) == ("signal", "cb", "pending")
    assert token not in json.dumps(detail)
    _, listed = await api.call("GET", f"/api/v1/waits?work_id={work_id}")
    assert token not in json.dumps(listed)
    _, one = await api.call("GET", f"/api/v1/waits/{wait['id']}")
    assert one == wait and token not in json.dumps(one)


async def test_openapi_documents_waits(api: Api) -> None:
    paths = OPENAPI["paths"]
    assert "409" in paths["/api/v1/waits/{id}/resolve"]["post"]["responses"]
    assert paths["/resume/{token}"]["post"]["security"] == []
    shape = OPENAPI["components"]["schemas"]["AlreadyResolved"]["properties"]["error"]
    assert set(shape["required"]) == {"code", "message", "state", "resolution", "resolved_by"}
    assert set(OPENAPI["components"]["schemas"]["Wait"]["properties"]) == WAIT_KEYS


# ---- the CLI ----------------------------------------------------------------------------------


async def cli(api: Api, tmp_path: Path, *args: str) -> tuple[int, str, str]:
    """Run ``python -m tether.cli`` against the test server without blocking its loop."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    env["TETHER_OPERATOR_TOKEN"] = TOKEN
    env["COLUMNS"] = "200"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tether.cli",
        *args,
        "--url",
        api.url,
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_approve_waits_and_signal(api: Api, ledger: Ledger, tmp_path: Path) -> None:
    work_id, wait_id = await waiting(ledger, approval("Ship it?"))

    code, out, err = await cli(api, tmp_path, "waits", "--json")
    assert code == 0, err
    assert [w["id"] for w in json.loads(out)] == [wait_id]
    code, out, err = await cli(api, tmp_path, "waits")
    assert code == 0, err
    assert wait_id in out and "Ship it?" in out

    code, out, err = await cli(api, tmp_path, "approve", wait_id, "--comment", "go")
    assert code == 0, err
    assert wait_id in out and "approved" in out
    assert (await ledger.get_work(work_id)).state == "queued"
    assert (await ledger.get_wait(wait_id)).resolution["comment"] == "go"

    code, out, err = await cli(api, tmp_path, "approve", wait_id, "--deny")
    assert code == 1
    assert "approved" in err and "operator" in err and "go" in err
    assert (await ledger.get_wait(wait_id)).resolution["decision"] == "approve"

    code, _, err = await cli(api, tmp_path, "approve", "0" * 28)
    assert code == 3, err

    code, _, err = await cli(api, tmp_path, "signal", "payment", "--key", "k", "--data", "{}")
    assert code == 3
    assert "nothing waits" in err

    await ledger.cancel_work(work_id)  # off the queue: the next claim takes a new item
    _, signal_wait = await waiting(ledger, WaitSpec(seq=1, kind="signal", name="pay", key="o/1"))
    code, out, err = await cli(
        api, tmp_path, "signal", "pay", "--key", "o/1", "--data", '{"ok": true}', "--json"
    )
    assert code == 0, err
    assert json.loads(out) == {"resolved": [signal_wait]}
    assert (await ledger.get_wait(signal_wait)).resolution["data"] == {"ok": True}
