"""The HTTP chat channel end to end: a real gateway, a real worker pool, SQLite and PostgreSQL.

Messages become work (or answer the question the conversation's work is waiting on); replies
and prompts come back through ``GET /channels/http/conversations/{id}/messages``.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from config import load_settings
from gateway import create_app
from ledger import Ledger
from worker import Context, agent
from worker.registry import chat_policies

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "worker"))
from helpers_worker import running_pool, wait_until

TOKEN = "chat-test-token"
SEEN: dict[str, list[str]] = {}
RUNNING: dict[str, int] = {"now": 0, "max": 0}


@agent("t_chat_echo")
async def echo(ctx: Context, msg: dict) -> None:
    await ctx.reply(f"You said: {msg['text']}")


@agent("t_chat_ask")
async def ask(ctx: Context, msg: dict) -> None:
    n = await ctx.wait_for_input("How many?", schema=int)
    await ctx.reply(f"Got {n}.")


async def _slow_record(conv: str, text: str) -> str:
    RUNNING["now"] += 1
    RUNNING["max"] = max(RUNNING["max"], RUNNING["now"])
    try:
        await asyncio.sleep(0.02)
        SEEN.setdefault(conv, []).append(text)
    finally:
        RUNNING["now"] -= 1
    return text


@agent("t_chat_ordered")
async def ordered(ctx: Context, msg: dict) -> None:
    await ctx.step("record", _slow_record, msg["chat_id"], msg["text"])


async def _long(text: str) -> str:
    await asyncio.sleep(0.5)
    return text


@agent("t_chat_reject", on_busy="reject")
async def rejecting(ctx: Context, msg: dict) -> None:
    await ctx.step("long", _long, msg["text"])
    await ctx.reply(f"done {msg['text']}")


@agent("t_chat_interrupt", on_busy="interrupt")
async def interrupting(ctx: Context, msg: dict) -> None:
    await ctx.step("long", _long, msg["text"])
    await ctx.step("long again", _long, msg["text"])
    await ctx.reply(f"done {msg['text']}")


@agent("t_chat_collect", on_busy="collect", collect_window=0.4)
async def collecting(ctx: Context, msg: dict) -> None:
    await ctx.reply(f"got {msg.get('texts')}")


@contextlib.asynccontextmanager
async def chat(ledger: Ledger, agent_name: str) -> AsyncIterator[aiohttp.ClientSession]:
    settings = load_settings(None, default_agent=agent_name, operator_token=TOKEN)
    app = create_app(ledger, settings, operator_token=TOKEN, chat_policies=chat_policies())
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    try:
        async with (
            aiohttp.ClientSession(str(server.make_url("/")), headers=headers) as http,
            running_pool(ledger, concurrency=4),
        ):
            yield http
    finally:
        await server.close()


async def post(http: aiohttp.ClientSession, conv: str, text: str, **extra: Any) -> dict:
    body = {"conversation_id": conv, "text": text, **extra}
    async with http.post("/channels/http/messages", json=body) as resp:
        data = await resp.json()
        assert resp.status == 202, data
        return data


async def messages(http: aiohttp.ClientSession, conv: str) -> list[dict]:
    async with http.get(f"/channels/http/conversations/{conv}/messages") as resp:
        assert resp.status == 200
        return (await resp.json())["messages"]


async def wait_for_out(http: aiohttp.ClientSession, conv: str, n: int) -> list[dict]:
    async def enough() -> bool:
        return len([m for m in await messages(http, conv) if m["direction"] == "out"]) >= n

    await wait_until(enough, what=f"{n} outbound message(s) in {conv}")
    return await messages(http, conv)


async def test_a_message_starts_work_and_the_reply_comes_back(ledger: Ledger) -> None:
    async with chat(ledger, "t_chat_echo") as http:
        first = await post(http, "c1", "hello", message_id="m1")
        assert first["disposition"] == "started" and first["duplicate"] is False
        again = await post(http, "c1", "hello", message_id="m1")
        assert again["duplicate"] is True and again["work_id"] == first["work_id"]
        convo = await wait_for_out(http, "c1", 1)
    assert [(m["direction"], m["text"]) for m in convo] == [
        ("in", "hello"),
        ("out", "You said: hello"),
    ]
    assert len(await ledger.list_work(agent="t_chat_echo")) == 1


async def test_the_http_channel_needs_the_token_and_valid_bodies(ledger: Ledger) -> None:
    settings = load_settings(None, default_agent="t_chat_echo", operator_token=TOKEN)
    app = create_app(ledger, settings, operator_token=TOKEN, chat_policies=chat_policies())
    async with TestServer(app, host="127.0.0.1") as server, aiohttp.ClientSession() as http:
        url = server.make_url("/channels/http/messages")
        async with http.post(url, json={"conversation_id": "c", "text": "x"}) as resp:
            assert resp.status == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        async with http.post(url, json={"conversation_id": "c"}, headers=auth) as resp:
            assert resp.status == 400
        async with http.post(url, data=b"{nope", headers=auth) as resp:
            assert resp.status == 400
        missing = server.make_url("/channels/http/conversations/none/messages")
        async with http.get(missing, headers=auth) as resp:
            assert resp.status == 404
    assert await ledger.list_work() == []


async def test_an_invalid_answer_is_reasked_and_a_valid_one_resumes(ledger: Ledger) -> None:
    async with chat(ledger, "t_chat_ask") as http:
        started = await post(http, "c2", "start")
        convo = await wait_for_out(http, "c2", 1)
        question = convo[-1]
        assert question["text"] == "How many?" and question["wait_id"]
        wait = await ledger.get_wait(question["wait_id"])
        assert (wait.channel, wait.kind) == ("http", "input") and wait.conversation_id
        bad = await post(http, "c2", "five")
        assert (bad["disposition"], bad["work_id"]) == ("reasked", started["work_id"])
        convo = await wait_for_out(http, "c2", 2)
        assert convo[-1]["text"] == "Please reply with an integer."
        good = await post(http, "c2", "5")
        assert (good["disposition"], good["wait_id"]) == ("resolved_wait", question["wait_id"])
        convo = await wait_for_out(http, "c2", 3)
    assert convo[-1]["text"] == "Got 5."
    assert len(await ledger.list_work()) == 1, "answers resolve the wait; they start nothing"


async def test_messages_of_one_conversation_run_one_at_a_time_in_order(ledger: Ledger) -> None:
    SEEN.clear()
    RUNNING.update(now=0, max=0)
    texts = [f"m{i:02d}" for i in range(20)]
    async with chat(ledger, "t_chat_ordered") as http:
        for text in texts:
            await post(http, "c3", text)
        await post(http, "other", "x")

        async def all_seen() -> bool:
            return len(SEEN.get("c3", [])) == 20 and len(SEEN.get("other", [])) == 1

        await wait_until(all_seen, what="20 messages handled")
    assert SEEN["c3"] == texts
    claims = [w for w in await ledger.list_work() if w.conversation_id]
    assert len(claims) == 21


async def test_reject_policy_answers_busy_and_starts_nothing(ledger: Ledger) -> None:
    async with chat(ledger, "t_chat_reject") as http:
        await post(http, "c4", "one")
        await wait_until(lambda: _has_state(ledger, "running"), what="the first message running")
        busy = await post(http, "c4", "two")
        assert busy["disposition"] == "rejected" and busy["work_id"] is None
        convo = await wait_for_out(http, "c4", 2)
    outs = [m["text"] for m in convo if m["direction"] == "out"]
    assert outs[0].startswith("I'm still working") and outs[1] == "done one"
    assert len(await ledger.list_work()) == 1


async def test_interrupt_policy_cancels_the_running_item(ledger: Ledger) -> None:
    async with chat(ledger, "t_chat_interrupt") as http:
        first = await post(http, "c5", "one")
        await wait_until(lambda: _has_state(ledger, "running"), what="the first running")
        second = await post(http, "c5", "two")
        assert second["disposition"] == "interrupted"
        convo = await wait_for_out(http, "c5", 1)
        await wait_until(
            lambda: _state_of(ledger, first["work_id"], "cancelled"), what="first cancelled"
        )
    assert [m["text"] for m in convo if m["direction"] == "out"] == ["done two"]


async def test_collect_policy_merges_messages_in_its_window(ledger: Ledger) -> None:
    async with chat(ledger, "t_chat_collect") as http:
        a = await post(http, "c6", "a")
        b = await post(http, "c6", "b")
        c = await post(http, "c6", "c")
        assert a["disposition"] == "started"
        assert b["disposition"] == c["disposition"] == "collected"
        assert a["work_id"] == b["work_id"] == c["work_id"]
        convo = await wait_for_out(http, "c6", 1)
    assert convo[-1]["text"] == "got ['a', 'b', 'c']"


async def _has_state(ledger: Ledger, state: str) -> bool:
    return bool(await ledger.list_work(state=state))


async def _state_of(ledger: Ledger, work_id: str, state: str) -> bool:
    return (await ledger.get_work(work_id)).state == state


@pytest.fixture(autouse=True)
def _fast_tests() -> None:
    """Keep the module honest about its own agents (registered at import)."""
    assert {"t_chat_echo", "t_chat_collect"} <= set(chat_policies())
