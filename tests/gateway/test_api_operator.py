"""The operator API's deeper routes over a real HTTP server, on SQLite and PostgreSQL: the work
list's filters, counts and cursor pages; the detail view's wait, checkpoint and messages;
restart from a step (with a real worker pool replaying the kept steps); outbound messages to
re-send or abandon; workers' leases; the operator's name on every action.
"""

from __future__ import annotations

import base64
import sys
from collections.abc import AsyncIterator
from datetime import timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
import sqlalchemy as sa
from aiohttp.test_utils import TestServer

from config import Settings
from gateway import create_app
from ledger import Claim, Ledger, StepWrite, WaitSpec, utcnow
from ledger.schema import outbox_t, work_t
from worker import Context, agent, current_step

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "worker"))
from helpers_worker import running_pool, wait_for_state

TOKEN = "operator-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
STATES = {"queued", "running", "waiting", "paused", "succeeded", "failed", "cancelled"}

#: (work id, step name) -> how many times the step's function ran, and the keys it saw
RUNS: dict[tuple[str, str], int] = {}
KEYS: dict[tuple[str, str], str] = {}


async def _count(name: str) -> int:
    step = current_step()
    key = (step.work_id, name)
    RUNS[key] = RUNS.get(key, 0) + 1
    KEYS[key] = step.idempotency_key
    return sum(n for (_, step_name), n in RUNS.items() if step_name == name)


@agent("t_op_counter")
async def counter(ctx: Context, data: Any) -> list[int]:
    return [await ctx.step(name, _count, name) for name in ("one", "two", "three")]


class Api:
    def __init__(self, server: TestServer, session: aiohttp.ClientSession) -> None:
        self.server = server
        self.session = session

    async def call(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        headers: dict[str, str] | None = None,
        auth: bool = True,
    ) -> tuple[int, Any, Any]:
        hdrs = {**(AUTH if auth else {}), **(headers or {})}
        kwargs: dict[str, Any] = {"headers": hdrs}
        if json_body is not None:
            kwargs["json"] = json_body
        async with self.session.request(method, self.server.make_url(path), **kwargs) as resp:
            assert resp.content_type == "application/json", await resp.text()
            return resp.status, await resp.json(), resp.headers

    async def ok(self, method: str, path: str, **kw: Any) -> Any:
        status, data, _ = await self.call(method, path, **kw)
        assert 200 <= status < 300, (status, data)
        return data


@pytest.fixture
async def api(ledger: Ledger) -> AsyncIterator[Api]:
    app = create_app(ledger, Settings(max_attempts=3), operator_token=TOKEN, known_agents=None)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    session = aiohttp.ClientSession()
    try:
        yield Api(server, session)
    finally:
        await session.close()
        await server.close()


def error_code(body: Any) -> str:
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    assert body["error"]["message"]
    return body["error"]["code"]


async def claim(ledger: Ledger, owner: str = "w-1") -> Claim:
    [c] = await ledger.claim_work(owner, limit=1, lease_ttl=30)
    return c


async def set_work(ledger: Ledger, work_id: str, **values: Any) -> None:
    stmt = sa.update(work_t).where(work_t.c.id == work_id).values(**values)
    await ledger.engines.run_write(lambda conn: conn.execute(stmt))


async def add_outbox(ledger: Ledger, state: str, work_id: str | None) -> int:
    stmt = (
        sa.insert(outbox_t)
        .values(
            work_id=work_id,
            channel="slack",
            payload={"text": "Deployed."},
            state=state,
            attempts=1,
            created_at=utcnow(),
        )
        .returning(outbox_t.c.id)
    )
    return await ledger.engines.run_write(lambda conn: conn.execute(stmt).scalar_one())


# ---- authentication on every new route --------------------------------------------------------


async def test_new_routes_need_the_token(api: Api, ledger: Ledger) -> None:
    work, _ = await ledger.create_work("echo")
    msg = await add_outbox(ledger, "unknown", work.id)
    for method, path, body in [
        ("GET", "/api/v1/work?state=queued&cursor=x", None),
        ("POST", f"/api/v1/work/{work.id}/restart", {"from_step": 1}),
        ("GET", "/api/v1/outbox?state=unknown", None),
        ("POST", f"/api/v1/outbox/{msg}/resend", None),
        ("POST", f"/api/v1/outbox/{msg}/abandon", None),
    ]:
        for headers in ({}, {"Authorization": "Bearer nope"}):
            status, data, hdrs = await api.call(
                method, path, json_body=body, headers=headers, auth=False
            )
            assert (status, error_code(data)) == (401, "unauthorized"), path
            assert hdrs["WWW-Authenticate"].startswith("Bearer")
    assert len(await ledger.list_work()) == 1
    assert (await ledger.get_outbox(msg)).state == "unknown"


# ---- listing: filters, counts, pages ----------------------------------------------------------


async def test_list_filters(api: Api, ledger: Ledger) -> None:
    a, _ = await ledger.create_work("alpha", source="api", source_event_id="key-1")
    b, _ = await ledger.create_work("beta")
    c, _ = await ledger.create_work("alpha")
    await set_work(ledger, b.id, conversation_id="conv-9", wait_reason="input w1: How many?")
    await ledger.pause_work(c.id)
    c = await ledger.get_work(c.id)

    async def ids(query: str) -> list[str]:
        data = await api.ok("GET", f"/api/v1/work?{query}")
        assert set(data) == {"items", "next_cursor", "counts"}
        return [w["id"] for w in data["items"]]

    assert await ids("") == [c.id, b.id, a.id]
    assert await ids("agent=alpha") == [c.id, a.id]
    assert await ids("state=paused") == [c.id]
    assert await ids("source=api") == [a.id]
    assert await ids("conversation_id=conv-9") == [b.id]
    assert await ids("q=how%20MANY") == [b.id]
    assert await ids("q=nothing") == []
    at = quote(b.created_at.isoformat())
    assert await ids(f"created_after={at}") == [c.id, b.id]
    assert await ids(f"created_before={at}") == [a.id]
    # an unencoded "+" offset arrives as a space; "Z" and other offsets work too
    plus = b.created_at.isoformat()
    assert "+00:00" in plus
    assert await ids(f"created_after={plus}") == [c.id, b.id]
    assert await ids(f"created_after={plus.replace('+', '%20')}") == [c.id, b.id]
    two_hours_ahead = quote(b.created_at.astimezone(timezone(timedelta(hours=2))).isoformat())
    assert await ids(f"created_after={two_hours_ahead}") == [c.id, b.id]
    zulu = b.created_at.isoformat().replace("+00:00", "Z")
    assert await ids(f"created_before={zulu}&agent=alpha") == [a.id]
    assert await ids(f"updated_after={quote(c.updated_at.isoformat())}") == [c.id]
    assert await ids(f"updated_before={quote(c.updated_at.isoformat())}&state=paused") == []
    assert await ids("created_after=2999-01-01") == []
    assert await ids("created_before=2000-01-01T00:00:00") == []


async def test_counts_include_expired_leases_and_retrying(api: Api, ledger: Ledger) -> None:
    for _ in range(3):
        await ledger.create_work("echo")
    stuck = await claim(ledger)
    failing = await claim(ledger)
    await set_work(ledger, stuck.work_id, lease_expires_at=utcnow() - timedelta(seconds=1))
    retry_at = utcnow() + timedelta(minutes=10)
    await ledger.fail_work(failing, {"type": "Boom", "message": "no"}, retry_at=retry_at)

    data = await api.ok("GET", "/api/v1/work?state=succeeded")
    assert data["items"] == []  # the counts are of everything, not of the page
    assert set(data["counts"]) == STATES | {"expired_leases", "retrying"}
    counts = data["counts"]
    assert (counts["queued"], counts["running"]) == (2, 1)
    assert (counts["expired_leases"], counts["retrying"]) == (1, 1)
    data = await api.ok("GET", "/api/v1/work?state=queued")
    retrying = next(w for w in data["items"] if w["id"] == failing.work_id)
    assert retrying["attempt"] == 2 and retrying["not_before"] is not None


async def test_pages_walk_every_item_once_while_new_ones_arrive(api: Api, ledger: Ledger) -> None:
    originals = [(await ledger.create_work("echo", i))[0].id for i in range(25)]
    seen: list[str] = []
    pages = 0
    path = "/api/v1/work?limit=10"
    while True:
        data = await api.ok("GET", path)
        pages += 1
        seen += [w["id"] for w in data["items"]]
        for _ in range(3):  # new work between pages sorts before the walk: not in it
            await api.ok("POST", "/api/v1/work", json_body={"agent": "echo", "input": "late"})
        if data["next_cursor"] is None:
            break
        path = f"/api/v1/work?limit=10&cursor={data['next_cursor']}"
    assert pages == 3
    assert seen == list(reversed(originals))  # newest first, no gaps, no repeats
    # the last page ends exactly at the end
    data = await api.ok("GET", "/api/v1/work?limit=31&agent=echo")
    assert len(data["items"]) == 31 and data["next_cursor"] is not None


async def test_pages_with_filters(api: Api, ledger: Ledger) -> None:
    for i in range(5):
        await ledger.create_work("alpha" if i % 2 else "beta", i)
    data = await api.ok("GET", "/api/v1/work?agent=beta&limit=2")
    assert [w["input"] for w in data["items"]] == [4, 2]
    cursor = data["next_cursor"]
    data = await api.ok("GET", f"/api/v1/work?agent=beta&limit=2&cursor={cursor}")
    assert [w["input"] for w in data["items"]] == [0]
    assert data["next_cursor"] is None


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    ("query", "needle"),
    [
        ("state=stuck", "state"),
        ("created_after=yesterday", "created_after"),
        ("created_before=2025-13-01", "created_before"),
        ("updated_after=2025-01-01T25:00", "updated_after"),
        ("updated_before=", "updated_before"),
        ("cursor=%25%25%25", "cursor"),
        ("cursor=" + _b64(b"not json"), "cursor"),
        ("cursor=" + _b64(b'["yesterday", "abc"]'), "cursor"),
        ("cursor=" + _b64(b'["2025-01-01T00:00:00", "abc"]'), "cursor"),  # no offset
        ("cursor=" + _b64(b'["2025-01-01T00:00:00+00:00", "a b"]'), "cursor"),
        ("cursor=" + _b64(b'{"a": 1}'), "cursor"),
        ("cursor=" + "A" * 201, "cursor"),
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=1.5", "limit"),
        ("agent=", "agent"),
        ("q=" + "x" * 201, "q"),
        ("source=" + "s" * 201, "source"),
        ("conversation_id=a/b", "conversation_id"),
        ("order=asc", "order"),
        ("q=a&q=b", "q"),
    ],
)
async def test_bad_filters_are_400(api: Api, query: str, needle: str) -> None:
    status, data, _ = await api.call("GET", f"/api/v1/work?{query}")
    assert (status, error_code(data)) == (400, "bad_request"), data
    assert needle in data["error"]["message"]


# ---- detail -----------------------------------------------------------------------------------


async def test_detail_shows_wait_checkpoint_messages_and_family(api: Api, ledger: Ledger) -> None:
    accepted = await ledger.accept_message(
        channel="http", chat_id="c-1", text="deploy please", message_id="m-1", agent="echo"
    )
    work_id = accepted.work_id
    assert work_id is not None
    c = await claim(ledger)
    now = utcnow()
    await ledger.record_step(
        c,
        StepWrite(
            seq=1,
            name="plan",
            attempt=1,
            idempotency_key=f"{work_id}:1",
            started_at=now,
            status="succeeded",
            output="the plan",
            finished_at=now,
        ),
    )
    child_id = await ledger.spawn_child(c, 2, "echo", {"sub": 1}, max_attempts=1)
    await ledger.record_step(
        c,
        StepWrite(
            seq=2,
            name="spawn:echo",
            attempt=1,
            idempotency_key=f"{work_id}:2",
            started_at=now,
            status="succeeded",
            output={"child_id": child_id},
            finished_at=now,
        ),
    )
    _, wait_id = await ledger.enter_wait(
        c, WaitSpec(seq=3, kind="approval", prompt="Deploy to prod?"), "approve"
    )

    detail = await api.ok("GET", f"/api/v1/work/{work_id}")
    assert detail["state"] == "waiting"
    assert detail["current_wait"]["id"] == wait_id
    assert detail["current_wait"]["prompt"] == "Deploy to prod?"
    assert detail["current_wait"]["kind"] == "approval"
    assert "token" not in detail["current_wait"]
    assert detail["last_checkpoint"]["seq"] == 2
    assert detail["last_checkpoint"]["name"] == "spawn:echo"
    assert detail["last_checkpoint"]["finished_at"]
    assert [m["direction"] for m in detail["messages"]] == ["in", "out"]
    assert detail["messages"][0]["text"] == "deploy please"
    prompt = detail["messages"][1]
    assert (prompt["text"], prompt["wait_id"], prompt["state"]) == (
        "Deploy to prod?",
        wait_id,
        "sent",
    )
    assert [a["id"] for a in prompt["actions"]] == ["approve", "deny"]
    assert [ch["id"] for ch in detail["children"]] == [child_id]
    assert detail["parent_id"] is None

    child = await api.ok("GET", f"/api/v1/work/{child_id}")
    assert child["parent_id"] == work_id
    assert child["messages"] == [] and child["current_wait"] is None
    assert child["last_checkpoint"] is None and child["children"] == []


async def test_detail_of_failed_work_has_the_traceback(api: Api, ledger: Ledger) -> None:
    work, _ = await ledger.create_work("echo", max_attempts=1)
    c = await claim(ledger)
    error = {"type": "ValueError", "message": "bad", "traceback": "Traceback (most recent...)"}
    await ledger.fail_work(c, error)
    detail = await api.ok("GET", f"/api/v1/work/{work.id}")
    assert detail["state"] == "failed"
    assert detail["error"] == error
    assert detail["current_wait"] is None


# ---- restart from a step ----------------------------------------------------------------------


async def test_restart_replays_kept_steps_and_runs_the_rest(api: Api, ledger: Ledger) -> None:
    RUNS.clear()
    KEYS.clear()
    created = await api.ok("POST", "/api/v1/work", json_body={"agent": "t_op_counter"})
    old_id = created["id"]
    async with running_pool(ledger, concurrency=2) as pool:
        done = await wait_for_state(ledger, old_id, pool=pool)
        assert (done.state, done.result) == ("succeeded", [1, 1, 1])

        status, fork, headers = await api.call(
            "POST",
            f"/api/v1/work/{old_id}/restart",
            json_body={"from_step": 2},
            headers={"X-Tether-Operator": "ann"},
        )
        assert status == 201, fork
        assert headers["Location"] == f"/api/v1/work/{fork['id']}"
        assert (fork["state"], fork["source"]) == ("queued", "restart")
        assert fork["agent"] == "t_op_counter"
        assert fork["source_event_id"].startswith(f"{old_id}:2:")

        finished = await wait_for_state(ledger, fork["id"], pool=pool)
    # step one was replayed from its copied record, two and three ran again
    assert (finished.state, finished.result) == ("succeeded", [1, 2, 2])
    expected_runs = {
        (old_id, "one"): 1,
        (old_id, "two"): 1,
        (old_id, "three"): 1,
        (fork["id"], "two"): 1,
        (fork["id"], "three"): 1,
    }
    assert expected_runs == RUNS
    assert KEYS[(fork["id"], "two")] == f"{fork['id']}:2"

    detail = await api.ok("GET", f"/api/v1/work/{fork['id']}")
    assert [(s["seq"], s["idempotency_key"]) for s in detail["steps"]] == [
        (n, f"{fork['id']}:{n}") for n in (1, 2, 3)
    ]
    created_event = detail["events"][0]
    assert created_event["type"] == "created" and created_event["actor"] == "operator:ann"
    assert created_event["data"]["detail"]["restarted_from"] == old_id
    assert created_event["data"]["detail"]["from_step"] == 2

    original = await api.ok("GET", f"/api/v1/work/{old_id}")
    assert (original["state"], original["result"]) == ("succeeded", [1, 1, 1])
    restarted = [e for e in original["events"] if e["type"] == "restarted_as"]
    assert [(e["actor"], e["data"]["detail"]["restarted_as"]) for e in restarted] == [
        ("operator:ann", fork["id"])
    ]


async def test_restart_refusals(api: Api, ledger: Ledger) -> None:
    work, _ = await ledger.create_work("echo")
    c = await claim(ledger)
    now = utcnow()
    await ledger.record_step(
        c,
        StepWrite(1, "a", 1, f"{work.id}:1", now, "succeeded", 1, finished_at=now),
    )
    # running: 409, nothing written
    status, data, _ = await api.call(
        "POST", f"/api/v1/work/{work.id}/restart", json_body={"from_step": 1}
    )
    assert (status, error_code(data)) == (409, "illegal_transition")
    assert "running" in data["error"]["message"]
    await ledger.complete_work(c, None)

    for body, code in [
        ({"from_step": 3}, "invalid_step"),
        ({"from_step": 0}, "bad_request"),
        ({"from_step": "2"}, "bad_request"),
        ({"from_step": 2**31}, "bad_request"),
        ({}, "bad_request"),
        ({"from_step": 1, "force": True}, "bad_request"),
    ]:
        status, data, _ = await api.call("POST", f"/api/v1/work/{work.id}/restart", json_body=body)
        assert (status, error_code(data)) == (400, code), body
    status, data, _ = await api.call("POST", f"/api/v1/work/{work.id}/restart")
    assert (status, error_code(data)) == (400, "invalid_json")
    assert (
        "1 to 2"
        in (await api.call("POST", f"/api/v1/work/{work.id}/restart", json_body={"from_step": 9}))[
            1
        ]["error"]["message"]
    )

    for bad_id in ("0" * 28, "no/such"):
        status, data, _ = await api.call(
            "POST", f"/api/v1/work/{bad_id}/restart", json_body={"from_step": 1}
        )
        assert (status, error_code(data)) == (404, "not_found")
    assert len(await ledger.list_work()) == 1

    fork = await api.ok("POST", f"/api/v1/work/{work.id}/restart", json_body={"from_step": 2})
    assert fork["id"] != work.id and len(await ledger.list_work()) == 2


# ---- outbound messages ------------------------------------------------------------------------


async def test_outbox_list_resend_and_abandon(api: Api, ledger: Ledger) -> None:
    work, _ = await ledger.create_work("echo")
    unknown = await add_outbox(ledger, "unknown", work.id)
    sent = await add_outbox(ledger, "sent", work.id)
    failed = await add_outbox(ledger, "failed", None)

    data = await api.ok("GET", "/api/v1/outbox")
    assert [m["id"] for m in data["items"]] == [failed, sent, unknown]
    data = await api.ok("GET", "/api/v1/outbox?state=unknown")
    [item] = data["items"]
    assert (item["id"], item["state"], item["work_id"]) == (unknown, "unknown", work.id)
    assert item["payload"] == {"text": "Deployed."}
    by_work = await api.ok("GET", f"/api/v1/outbox?work_id={work.id}")
    assert [m["id"] for m in by_work["items"]] == [sent, unknown]

    resent = await api.ok(
        "POST", f"/api/v1/outbox/{unknown}/resend", headers={"X-Tether-Operator": "bob"}
    )
    assert (resent["state"], resent["attempts"]) == ("pending", 1)
    status, data, _ = await api.call("POST", f"/api/v1/outbox/{unknown}/resend")
    assert (status, error_code(data)) == (409, "illegal_transition")
    assert "pending" in data["error"]["message"]

    abandoned = await api.ok("POST", f"/api/v1/outbox/{unknown}/abandon", json_body={})
    assert abandoned["state"] == "abandoned"
    assert (await api.ok("POST", f"/api/v1/outbox/{failed}/abandon"))["state"] == "abandoned"
    for msg, action in [(sent, "resend"), (sent, "abandon"), (unknown, "abandon")]:
        status, data, _ = await api.call("POST", f"/api/v1/outbox/{msg}/{action}")
        assert (status, error_code(data)) == (409, "illegal_transition"), (msg, action)

    detail = await api.ok("GET", f"/api/v1/work/{work.id}")
    actions = [(e["type"], e["actor"]) for e in detail["events"] if e["type"].startswith("outbox")]
    assert actions == [("outbox_resent", "operator:bob"), ("outbox_abandoned", "operator")]
    assert detail["state"] == "queued"


async def test_outbox_errors(api: Api, ledger: Ledger) -> None:
    msg = await add_outbox(ledger, "unknown", None)
    for path in ("424242", "0", "-1", "abc", "1.0", str(2**31), "9" * 30):
        for action in ("resend", "abandon"):
            status, data, _ = await api.call("POST", f"/api/v1/outbox/{path}/{action}")
            assert (status, error_code(data)) == (404, "not_found"), path
    status, data, _ = await api.call("POST", f"/api/v1/outbox/{msg}/resend", json_body={"x": 1})
    assert (status, error_code(data)) == (400, "bad_request")
    for query in ("state=lost", "limit=0", "work_id=a%20b", "channel=slack"):
        status, data, _ = await api.call("GET", f"/api/v1/outbox?{query}")
        assert (status, error_code(data)) == (400, "bad_request"), query
    assert (await ledger.get_outbox(msg)).state == "unknown"


# ---- workers ----------------------------------------------------------------------------------


async def test_workers_show_leases_held(api: Api, ledger: Ledger) -> None:
    await ledger.register_worker("w-1", host="box", pid=1, concurrency=4)
    await ledger.register_worker("w-2", host="box", pid=2, concurrency=4)
    for _ in range(3):
        await ledger.create_work("echo")
    await claim(ledger, "w-1")
    await claim(ledger, "w-1")
    finished = await claim(ledger, "w-2")
    await ledger.complete_work(finished, None)
    data = await api.ok("GET", "/api/v1/workers")
    assert isinstance(data, list)
    assert {w["id"]: w["leases_held"] for w in data} == {"w-1": 2, "w-2": 0}


# ---- the operator's name ----------------------------------------------------------------------


async def test_operator_header_names_the_actor_of_every_action(api: Api, ledger: Ledger) -> None:
    who = {"X-Tether-Operator": "  Ann Smith  "}
    created = await api.ok("POST", "/api/v1/work", json_body={"agent": "echo"}, headers=who)
    work_id = created["id"]
    for action in ("pause", "resume", "cancel", "retry"):
        await api.ok("POST", f"/api/v1/work/{work_id}/{action}", headers=who)
    events = await ledger.list_events(work_id)
    assert [(e.type, e.actor) for e in events] == [
        (t, "operator:Ann Smith") for t in ("created", "paused", "resumed", "cancelled", "retried")
    ]


@pytest.mark.parametrize("name", ["", "   ", "x" * 101, "a\tb"])
async def test_bad_operator_header_is_400_and_changes_nothing(
    api: Api, ledger: Ledger, name: str
) -> None:
    work, _ = await ledger.create_work("echo")
    msg = await add_outbox(ledger, "unknown", work.id)
    for path, body in [
        (f"/api/v1/work/{work.id}/pause", None),
        (f"/api/v1/work/{work.id}/restart", {"from_step": 1}),
        (f"/api/v1/outbox/{msg}/abandon", None),
        ("/api/v1/work", {"agent": "echo"}),
    ]:
        status, data, _ = await api.call(
            "POST", path, json_body=body, headers={"X-Tether-Operator": name}
        )
        assert (status, error_code(data)) == (400, "bad_request"), path
        assert "X-Tether-Operator" in data["error"]["message"]
    assert (await ledger.get_work(work.id)).state == "queued"
    assert len(await ledger.list_work()) == 1
    assert (await ledger.get_outbox(msg)).state == "unknown"
