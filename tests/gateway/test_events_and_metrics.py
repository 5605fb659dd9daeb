"""Live observation over a real HTTP server and a real worker pool, on SQLite and PostgreSQL:
``GET /api/v1/work/{id}/events`` (Server-Sent Events), ``GET /metrics`` and the work id on log
lines emitted while a work item runs."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import sys
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from config import load_settings
from gateway import create_app
from ledger import Ledger, LedgerUnavailable
from tether.roles import log_handler
from worker import Context, agent
from worker.registry import chat_policies

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "worker"))
from helpers_worker import (
    _expire_lease,
    running_pool,
    wait_for_state,
    wait_until,
)

TOKEN = "observe-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EVENT_KEYS = {"id", "type", "data", "actor", "created_at"}
STREAM_TIMEOUT = 15.0

log = logging.getLogger("tests.observe")
#: released by the test that blocks ``t_obs_block`` in its step
RELEASE = threading.Event()


async def _add(a: int, b: int) -> int:
    return a + b


def _shout(text: str) -> str:
    log.info("inside a step thread: %s", text)
    return text.upper()


@agent("t_obs_steps")
async def steps_agent(ctx: Context, input: Any) -> dict[str, Any]:
    log.info("inside the agent")
    total = await ctx.step("add", _add, 1, 2)
    # with a timeout, a plain function runs in a thread (which must still know the work id)
    loud = await ctx.step("shout", _shout, "hi", timeout=5)
    return {"total": total, "loud": loud}


@agent("t_obs_gate")
async def gate_agent(ctx: Context, input: Any) -> str:
    await ctx.step("before", _add, 0, 1)
    data = await ctx.wait_for_signal("obs-go", key=input["key"])
    await ctx.step("after", _add, 1, 1)
    return f"went with {data}"


@agent("t_obs_echo")
async def echo_agent(ctx: Context, msg: dict) -> None:
    await ctx.reply(f"echo: {msg['text']}")


async def _blocking() -> str:
    for _ in range(500):
        if RELEASE.is_set():
            break
        await asyncio.sleep(0.02)
    return "released"


@agent("t_obs_block")
async def block_agent(ctx: Context, input: Any) -> str:
    return await ctx.step("block", _blocking)


# -- helpers -----------------------------------------------------------------------------------


@dataclass
class Frame:
    event: str = "message"
    id: str | None = None
    data: str = ""
    comments: list[str] = field(default_factory=list)

    @property
    def json(self) -> Any:
        return json.loads(self.data)


async def read_frames(resp: aiohttp.ClientResponse, *, until: str | None = None) -> list[Frame]:
    """Parse SSE frames until the server closes the stream (or a frame of type ``until``)."""
    frames: list[Frame] = []
    current = Frame()
    data: list[str] = []
    async with asyncio.timeout(STREAM_TIMEOUT):
        while True:
            raw = await resp.content.readline()
            if not raw:
                return frames
            line = raw.decode().rstrip("\r\n")
            if not line:
                if data or current.comments or current.id:
                    current.data = "\n".join(data)
                    frames.append(current)
                    if until is not None and current.event == until:
                        return frames
                current, data = Frame(), []
            elif line.startswith(":"):
                current.comments.append(line[1:].strip())
            else:
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "data":
                    data.append(value)
                elif name == "event":
                    current.event = value
                elif name == "id":
                    current.id = value


def events_of(frames: list[Frame]) -> list[Frame]:
    return [f for f in frames if f.id is not None]


@contextlib.asynccontextmanager
async def observed(
    ledger: Ledger,
    *,
    pool: bool = True,
    default_agent: str = "t_obs_echo",
    lease_ttl: float = 30.0,
) -> AsyncIterator[tuple[TestServer, aiohttp.ClientSession]]:
    settings = load_settings(None, default_agent=default_agent, operator_token=TOKEN)
    app = create_app(ledger, settings, operator_token=TOKEN, chat_policies=chat_policies())
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession(str(server.make_url("/")), headers=AUTH) as http:
            if pool:
                async with running_pool(ledger, concurrency=4, lease_ttl=lease_ttl):
                    yield server, http
            else:
                yield server, http
    finally:
        await server.close()


async def scrape(http: aiohttp.ClientSession) -> dict[str, dict[tuple, float]]:
    """``{sample name: {sorted label items: value}}`` from a plain (unauthenticated) scrape."""
    async with (
        aiohttp.ClientSession() as anonymous,
        anonymous.get(f"{http._base_url}metrics") as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


# -- live events -------------------------------------------------------------------------------


async def test_attach_sends_the_backlog_then_follows_until_the_item_finishes(
    ledger: Ledger,
) -> None:
    async with observed(ledger) as (_, http):
        work, _ = await ledger.create_work("t_obs_gate", {"key": "k1"})
        await wait_for_state(ledger, work.id, {"waiting"})
        async with http.get(f"/api/v1/work/{work.id}/events") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            backlog = await read_frames(resp, until="waiting")
            assert [f.event for f in events_of(backlog)][:2] == ["created", "claimed"]
            assert backlog[-1].event == "waiting"
            # The stream now follows: the signal wakes the item, it runs to the end.
            assert await ledger.resolve_signal("obs-go", "k1", {"n": 1}, by="test")
            rest = await read_frames(resp)
        frames = backlog + rest

    seen = events_of(frames)
    types = [f.event for f in seen]
    assert "resumed" in types and types[-1] == "succeeded", types
    assert types.count("claimed") == 2
    assert frames[-1].event == "end" and frames[-1].id is None
    assert frames[-1].json["state"] == "succeeded"
    assert frames[-1].json["work_id"] == work.id
    stored = await ledger.list_events(work.id)
    assert sorted(int(f.id) for f in seen) == [e.id for e in stored], "every event, once"
    for f in seen:
        body = f.json
        assert set(body) == EVENT_KEYS and str(body["id"]) == f.id and body["type"] == f.event
    assert seen[0].json["data"]["agent"] == "t_obs_gate"


async def test_resume_with_last_event_id_gets_only_newer_events(ledger: Ledger) -> None:
    async with observed(ledger) as (_, http):
        work, _ = await ledger.create_work("t_obs_steps", None)
        await wait_for_state(ledger, work.id)
        ids = [e.id for e in await ledger.list_events(work.id)]
        assert len(ids) >= 5
        middle = ids[len(ids) // 2]

        headers = {"Last-Event-ID": str(middle)}
        async with http.get(f"/api/v1/work/{work.id}/events", headers=headers) as resp:
            frames = await read_frames(resp)
        assert [int(f.id) for f in events_of(frames)] == [i for i in ids if i > middle]
        assert frames[-1].event == "end"

        # ?after= does the same; the header wins over it (an EventSource reconnecting).
        async with http.get(f"/api/v1/work/{work.id}/events?after={ids[0]}") as resp:
            frames = await read_frames(resp)
        assert [int(f.id) for f in events_of(frames)] == ids[1:]
        url = f"/api/v1/work/{work.id}/events?after=0"
        async with http.get(url, headers={"Last-Event-ID": str(ids[-1])}) as resp:
            frames = await read_frames(resp)
        assert events_of(frames) == [] and [f.event for f in frames] == ["end"]


async def test_follow_false_returns_the_backlog_of_unfinished_work_and_closes(
    ledger: Ledger,
) -> None:
    async with observed(ledger) as (_, http):
        work, _ = await ledger.create_work("t_obs_gate", {"key": "k2"})
        await wait_for_state(ledger, work.id, {"waiting"})
        async with http.get(f"/api/v1/work/{work.id}/events?follow=false") as resp:
            frames = await read_frames(resp)
        assert [f.event for f in frames][-1] == "waiting", "no end: the item is not finished"
        assert len(events_of(frames)) == len(await ledger.list_events(work.id))
        await ledger.cancel_work(work.id, actor="test")


async def test_events_need_the_token_and_a_known_id(ledger: Ledger) -> None:
    work, _ = await ledger.create_work("t_obs_steps", None)
    async with observed(ledger, pool=False) as (server, http):
        async with aiohttp.ClientSession() as anonymous:
            url = server.make_url(f"/api/v1/work/{work.id}/events")
            async with anonymous.get(url) as resp:
                assert resp.status == 401
                assert (await resp.json())["error"]["code"] == "unauthorized"
            async with anonymous.get(url, headers={"Authorization": "Bearer nope"}) as resp:
                assert resp.status == 401
        async with http.get("/api/v1/work/0000000000000000000000000000/events") as resp:
            assert resp.status == 404
            assert resp.headers["Content-Type"].startswith("application/json")
            assert (await resp.json())["error"]["code"] == "not_found"
        for query in ("after=-1", "after=x", "follow=maybe", "since=3"):
            async with http.get(f"/api/v1/work/{work.id}/events?{query}") as resp:
                assert resp.status == 400, query
        bad = {"Last-Event-ID": "abc"}
        async with http.get(f"/api/v1/work/{work.id}/events", headers=bad) as resp:
            assert resp.status == 400


async def test_a_client_that_goes_away_leaves_no_task_behind(ledger: Ledger) -> None:
    async with observed(ledger) as (server, _):
        work, _ = await ledger.create_work("t_obs_gate", {"key": "k3"})
        await wait_for_state(ledger, work.id, {"waiting"})
        await asyncio.sleep(0.3)  # let the pool settle into its idle loop
        baseline = len(asyncio.all_tasks())
        async with aiohttp.ClientSession(headers=AUTH) as client:
            resp = await client.get(server.make_url(f"/api/v1/work/{work.id}/events"))
            await read_frames(resp, until="waiting")
            assert len(asyncio.all_tasks()) > baseline, "the stream's connection is served"
            resp.close()
        await wait_until(
            lambda: len(asyncio.all_tasks()) <= baseline,
            timeout=5,
            what="the stream's handler to end after the client left",
        )
        await ledger.cancel_work(work.id, actor="test")


async def test_a_quiet_stream_sends_keep_alive_comments(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("gateway.events.KEEPALIVE", 0.3)
    work, _ = await ledger.create_work("t_obs_gate", {"key": "k5"})
    async with (
        observed(ledger, pool=False) as (_, http),
        http.get(f"/api/v1/work/{work.id}/events") as resp,
    ):
        frames = await read_frames(resp, until="created")
        more: list[Frame] = []
        async with asyncio.timeout(5):
            while not any(f.comments for f in more):
                line = await resp.content.readline()
                if line.startswith(b":"):
                    more.append(Frame(comments=[line[1:].decode().strip()]))
    assert frames[0].comments == [] and [f.event for f in events_of(frames)] == ["created"]
    assert more[-1].comments == ["keep-alive"]


async def test_an_open_stream_does_not_hold_up_shutdown(ledger: Ledger) -> None:
    work, _ = await ledger.create_work("t_obs_gate", {"key": "k4"})
    settings = load_settings(None, operator_token=TOKEN)
    app = create_app(ledger, settings, operator_token=TOKEN)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    async with aiohttp.ClientSession(headers=AUTH) as client:
        resp = await client.get(server.make_url(f"/api/v1/work/{work.id}/events"))
        await read_frames(resp, until="created")
        async with asyncio.timeout(5):
            await server.close()
        resp.close()


# -- metrics -----------------------------------------------------------------------------------


async def test_metrics_match_the_ledger(ledger: Ledger) -> None:
    async with observed(ledger) as (_, http):
        items = [(await ledger.create_work("t_obs_steps", {"n": i}))[0] for i in range(3)]
        for w in items:
            await wait_for_state(ledger, w.id)
        gate, _ = await ledger.create_work("t_obs_gate", {"key": "m1"})
        await wait_for_state(ledger, gate.id, {"waiting"})
        await ledger.resolve_signal("obs-go", "m1", 1, by="test")
        await wait_for_state(ledger, gate.id)
        async with http.post(
            "/channels/http/messages", json={"conversation_id": "obs", "text": "hello"}
        ) as resp:
            assert resp.status == 202
            chat_work = (await resp.json())["work_id"]
        await wait_for_state(ledger, chat_work)
        m = await scrape(http)

    counts = await ledger.count_by_state()
    assert counts["succeeded"] == 5
    for state, n in counts.items():
        assert m["tether_work"][(("state", state),)] == n
    assert m["tether_work"][(("state", "succeeded"),)] == 5
    claimed = 0
    for w in await ledger.list_work(limit=100):
        claimed += sum(1 for e in await ledger.list_events(w.id) if e.type == "claimed")
    assert m["tether_claims_total"][()] == claimed >= 6
    assert m["tether_lease_expiries_total"][()] == 0
    assert m["tether_leases_expired"][()] == 0
    assert m["tether_wait_resolutions_total"] == {(("kind", "signal"), ("state", "resolved")): 1}
    inbound = m["tether_inbound_messages_total"]
    assert inbound == {(("channel", "http"), ("disposition", "started")): 1}
    assert m["tether_outbound_messages_total"] == {(("channel", "http"), ("state", "sent")): 1}
    assert m["tether_ledger_up"][()] == 1

    # 3 x (add, shout) + gate's before/after (its wait's step is not a step's latency) + reply
    ok = (("status", "succeeded"),)
    assert m["tether_step_duration_seconds_gcount"][ok] == 9
    buckets = {
        dict(k)["le"]: v
        for k, v in m["tether_step_duration_seconds_bucket"].items()
        if dict(k)["status"] == "succeeded"
    }
    assert buckets["+Inf"] == 9 and buckets["60.0"] == 9
    values = [buckets[b] for b in sorted(buckets, key=float)]
    assert values == sorted(values), "cumulative buckets"
    assert 0 <= m["tether_step_duration_seconds_gsum"][ok] < 60
    assert any(name.startswith("process_") for name in m), "default collectors"
    assert any(name.startswith("python_") for name in m)


async def test_lease_metrics_count_expired_and_reaped_leases(ledger: Ledger) -> None:
    RELEASE.clear()
    # A renewal between expiring the lease by hand and the scrape would extend it again:
    # renew rarely (every lease_ttl / 3) so the expired lease stays expired.
    async with observed(ledger, lease_ttl=600) as (_, http):
        work, _ = await ledger.create_work("t_obs_block", None, max_attempts=5)
        await wait_until(
            lambda: _state_is(ledger, work.id, "running"), what="the blocking item to run"
        )
        await ledger.engines.run_write(_expire_lease, work.id)
        m = await scrape(http)
        assert m["tether_leases_expired"][()] == 1
        assert m["tether_lease_expiries_total"][()] == 0
        reaped = await ledger.reap_expired_leases()
        assert (work.id, "queued") in reaped
        RELEASE.set()
        await wait_for_state(ledger, work.id)
        m = await scrape(http)
    assert m["tether_leases_expired"][()] == 0
    assert m["tether_lease_expiries_total"][()] == 1
    assert m["tether_claims_total"][()] == 2


async def _state_is(ledger: Ledger, work_id: str, state: str) -> bool:
    return (await ledger.get_work(work_id)).state == state


async def test_metrics_speak_openmetrics_and_survive_a_ledger_outage(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with observed(ledger, pool=False) as (server, _):
        url = server.make_url("/metrics")
        async with aiohttp.ClientSession() as anonymous:
            accept = {"Accept": "application/openmetrics-text; version=1.0.0"}
            async with anonymous.get(url, headers=accept) as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
                text = await resp.text()
            types = {f.name: f.type for f in openmetrics_families(text)}
            assert types["tether_step_duration_seconds"] == "gaugehistogram"
            assert types["tether_claims"] == "counter" and types["tether_work"] == "gauge"

            async def down(**_: Any) -> None:
                raise LedgerUnavailable("the database went away")

            monkeypatch.setattr(ledger, "metrics_snapshot", down)
            async with anonymous.get(url) as resp:
                assert resp.status == 200
                names = {f.name for f in text_string_to_metric_families(await resp.text())}
        assert "tether_ledger_up" in names and "tether_work" not in names
        assert any(n.startswith("process_") for n in names)


# -- logs --------------------------------------------------------------------------------------


async def test_log_lines_emitted_while_an_item_runs_carry_its_id(ledger: Ledger) -> None:
    stream, as_json = io.StringIO(), io.StringIO()
    handlers = [log_handler(stream), log_handler(as_json, json_format=True)]
    for handler in handlers:
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        log.info("outside any work")
        async with running_pool(ledger, concurrency=2):
            work, _ = await ledger.create_work("t_obs_steps", None)
            done = await wait_for_state(ledger, work.id)
        assert done.state == "succeeded"
    finally:
        for handler in handlers:
            log.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    outside = next(line for line in lines if "outside any work" in line)
    assert "work=- " in outside or "work=-:" in outside
    inside = [line for line in lines if "inside" in line]
    assert len(inside) == 2, lines
    assert all(f"work={work.id}:" in line for line in inside), inside
    records = [json.loads(line) for line in as_json.getvalue().splitlines()]
    assert [r["work"] for r in records] == [None, work.id, work.id]
    assert records[1] == {
        "time": records[1]["time"],
        "level": "INFO",
        "logger": "tests.observe",
        "work": work.id,
        "message": "inside the agent",
    }
