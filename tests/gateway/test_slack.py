"""The Slack channel end to end: a real gateway (slack-bolt's ``AsyncApp`` on the aiohttp app),
worker pool and delivery loop on SQLite and PostgreSQL, slack_sdk's real ``AsyncWebClient``
against a fake Web API (``tests/fakes/slack_api.py``). Requests to the endpoint are signed with
``slack_sdk.signature.SignatureVerifier`` as Slack signs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import asyncpg
import pytest
import sqlalchemy as sa
from aiohttp.test_utils import TestServer
from slack_sdk.signature import SignatureVerifier
from sqlalchemy.engine import make_url

import worker.agents  # noqa: F401  (registers the demo agent)
from adapters.outbound import (
    Delivered,
    DeliveryFailed,
    DeliveryUnknown,
    OutboundMessage,
    RetryLater,
)
from adapters.slack import (
    SlackSender,
    action_to_click,
    event_to_inbound,
    split_message,
)
from config import SettingsError, load_settings
from gateway import create_app
from gateway.delivery import DeliveryLoop, senders_from_settings
from ledger import Ledger, LedgerUnavailable
from worker.registry import chat_policies

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "worker"))
sys.path.insert(0, str(ROOT / "tests" / "fakes"))
from helpers_worker import running_pool, wait_until  # noqa: E402
from slack_api import BOT_ID, BOT_USER_ID, TEAM_ID, FakeSlack  # noqa: E402

from tests.conftest import ADMIN_URL  # noqa: E402

BOT_TOKEN = "xoxb-test-slack-token"
SECRET = "slack-signing-secret-1"
OPERATOR = "slack-operator-token"
PATH = "/channels/slack/events"
CHAN = "C0GENERAL"
DM = "D0ALICE"
ALICE, BOB = "U0ALICE", "U0BOB"
TABLES = ("work", "step", "wait", "event", "conversation", "inbox", "outbox")


@pytest.fixture
async def fake() -> AsyncIterator[FakeSlack]:
    async with FakeSlack(BOT_TOKEN) as server:
        yield server


@pytest.fixture
async def sender(fake: FakeSlack) -> AsyncIterator[SlackSender]:
    s = SlackSender(BOT_TOKEN, fake.base_url, per_channel_interval=0.01, timeout=2.0)
    try:
        yield s
    finally:
        await s.close()


def _settings(fake: FakeSlack, **extra: Any) -> Any:
    values: dict[str, Any] = {
        "default_agent": "demo",
        "operator_token": OPERATOR,
        "slack_bot_token": BOT_TOKEN,
        "slack_signing_secret": SECRET,
        "slack_api_base": fake.base_url,
        **extra,
    }
    return load_settings(None, **values)


# -- requests as Slack sends them ----------------------------------------------------------------


def signed(body: bytes, *, timestamp: int | None = None, secret: str = SECRET) -> dict[str, str]:
    ts = str(timestamp if timestamp is not None else int(time.time()))
    signature = SignatureVerifier(secret).generate_signature(timestamp=ts, body=body)
    assert signature is not None
    return {"X-Slack-Request-Timestamp": ts, "X-Slack-Signature": signature}


_seq = itertools.count(1)


def new_ts() -> str:
    return f"{1_700_000_100 + next(_seq)}.{next(_seq):06d}"


def envelope(event: dict[str, Any], *, event_id: str | None = None) -> dict[str, Any]:
    return {
        "token": "legacy-verification-token",
        "team_id": TEAM_ID,
        "api_app_id": "A0TETHER",
        "event": event,
        "type": "event_callback",
        "event_id": event_id or f"Ev{uuid.uuid4().hex[:10].upper()}",
        "event_time": 1_700_000_000,
        "authorizations": [
            {"team_id": TEAM_ID, "user_id": BOT_USER_ID, "is_bot": True, "enterprise_id": None}
        ],
        "is_ext_shared_channel": False,
    }


def message(
    text: str,
    *,
    channel: str = CHAN,
    user: str | None = ALICE,
    ts: str | None = None,
    thread_ts: str | None = None,
    channel_type: str | None = None,
    event_id: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    event: dict[str, Any] = {
        "type": "message",
        "channel": channel,
        "text": text,
        "ts": ts or new_ts(),
        "event_ts": "1700000000.000001",
        "channel_type": channel_type or ("im" if channel.startswith("D") else "channel"),
        "team": TEAM_ID,
        **extra,
    }
    if user is not None:
        event["user"] = user
    if thread_ts is not None:
        event["thread_ts"] = thread_ts
    return envelope(event, event_id=event_id)


def app_mention(text: str, *, ts: str, channel: str = CHAN, user: str = ALICE) -> dict[str, Any]:
    event = {"type": "app_mention", "user": user, "text": text, "ts": ts, "channel": channel}
    return envelope({**event, "event_ts": ts, "team": TEAM_ID})


def click(decision: str, user: str, prompt: dict[str, Any]) -> dict[str, Any]:
    wait_id = prompt["wait_id"]
    code = {"approve": "a", "deny": "d"}[decision]
    return {
        "type": "block_actions",
        "user": {"id": user, "username": user.lower(), "name": user.lower(), "team_id": TEAM_ID},
        "api_app_id": "A0TETHER",
        "token": "legacy-verification-token",
        "container": {
            "type": "message",
            "message_ts": prompt["ts"],
            "channel_id": prompt["channel"],
            "is_ephemeral": False,
            "thread_ts": prompt.get("thread_ts"),
        },
        "trigger_id": f"{next(_seq)}.trigger",
        "team": {"id": TEAM_ID, "domain": "tether-test"},
        "channel": {"id": prompt["channel"], "name": "general"},
        "message": {
            "type": "message",
            "user": BOT_USER_ID,
            "bot_id": BOT_ID,
            "ts": prompt["ts"],
            "thread_ts": prompt.get("thread_ts"),
            "text": prompt["text"],
            "blocks": prompt["blocks"],
        },
        "response_url": "https://hooks.slack.com/actions/T0/1/x",
        "actions": [
            {
                "action_id": f"w:{wait_id}:{code}",
                "block_id": f"tether:{wait_id}",
                "text": {"type": "plain_text", "text": decision.title()},
                "value": decision,
                "type": "button",
                "action_ts": "1700000000.000002",
            }
        ],
    }


# -- the gateway under test -----------------------------------------------------------------------


@dataclass
class Gateway:
    http: aiohttp.ClientSession
    ledger: Ledger
    fake: FakeSlack

    async def send(
        self, body: bytes, headers: dict[str, str], content_type: str = "application/json"
    ) -> tuple[int, Any]:
        async with self.http.post(
            PATH, data=body, headers={"Content-Type": content_type, **headers}
        ) as resp:
            text = await resp.text()
            try:
                return resp.status, json.loads(text) if text else None
            except ValueError:
                return resp.status, text

    async def event(self, env: dict[str, Any], *, retry: int | None = None) -> tuple[int, Any]:
        body = json.dumps(env).encode()
        headers = signed(body)
        if retry is not None:
            headers |= {"X-Slack-Retry-Num": str(retry), "X-Slack-Retry-Reason": "http_timeout"}
        return await self.send(body, headers)

    async def action(self, payload: dict[str, Any]) -> tuple[int, Any]:
        body = urlencode({"payload": json.dumps(payload)}).encode()
        return await self.send(body, signed(body), "application/x-www-form-urlencoded")

    async def replies(self, n: int, *, what: str = "replies") -> list[dict[str, Any]]:
        """Wait until the fake has ``n`` accepted ``chat.postMessage`` calls; return them."""
        await wait_until(lambda: len(self.posted()) >= n, what=f"{n} {what}")
        return self.posted()

    def posted(self) -> list[dict[str, Any]]:
        """The ``chat.postMessage`` calls the fake accepted (not the refused ones)."""
        return self.fake.ok()

    async def sent_row(self, wait_id: str | None = None) -> Any:
        """The outbox row (of the approval ``wait_id``, else the only one), once it is sent."""
        found: list[Any] = []

        async def sent() -> bool:
            rows = await self.ledger.list_outbox(state="sent")
            found[:] = [
                r for r in rows if wait_id is None or (r.payload or {}).get("wait_id") == wait_id
            ]
            return bool(found)

        await wait_until(sent, what="the outbox row marked sent")
        (row,) = found
        return row


@contextlib.asynccontextmanager
async def gateway(
    ledger: Ledger, fake: FakeSlack, sender: SlackSender, *, workers: bool = True
) -> AsyncIterator[Gateway]:
    """The app on a test server, the delivery loop and (unless ``workers=False``) a pool."""
    app = create_app(
        ledger, _settings(fake), operator_token=OPERATOR, chat_policies=chat_policies()
    )
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    loop = DeliveryLoop(ledger, {"slack": sender} if workers else {}, poll_interval=0.05)
    task = asyncio.create_task(loop.run())
    try:
        async with contextlib.AsyncExitStack() as stack:
            http = await stack.enter_async_context(aiohttp.ClientSession(server.make_url("/")))
            if workers:
                await stack.enter_async_context(running_pool(ledger, concurrency=4))
            yield Gateway(http, ledger, fake)
    finally:
        loop.stop()
        await asyncio.wait_for(task, 10)
        await server.close()


async def row_counts(ledger: Ledger) -> dict[str, int]:
    async with ledger._read() as conn:
        return {
            t: (await conn.execute(sa.text(f"SELECT count(*) FROM {t}"))).scalar_one()
            for t in TABLES
        }


async def inbox_ids(ledger: Ledger) -> list[str]:
    async with ledger._read() as conn:
        rows = await conn.execute(sa.text("SELECT source_event_id FROM inbox ORDER BY id"))
        return [r[0] for r in rows]


async def ask_approval(gw: Gateway) -> dict[str, Any]:
    """``/approve deploy`` in a channel: the prompt goes out in its thread with two buttons."""
    ts = new_ts()
    assert (await gw.event(message("/approve deploy", ts=ts)))[0] == 200
    (prompt,) = await gw.replies(1, what="approval prompt")
    assert prompt["channel"] == CHAN and prompt["thread_ts"] == ts
    assert prompt["text"] == "Approve deploy?"
    section, actions = prompt["blocks"]
    assert section["type"] == "section" and section["text"]["text"] == "Approve deploy?"
    assert actions["type"] == "actions"
    buttons = actions["elements"]
    assert [b["text"]["text"] for b in buttons] == ["Approve", "Deny"]
    wait_id = buttons[0]["action_id"].split(":")[1]
    assert [b["action_id"] for b in buttons] == [f"w:{wait_id}:a", f"w:{wait_id}:d"]
    row = await gw.sent_row(wait_id)
    return {**prompt, "wait_id": wait_id, "ts": row.external_id}


# -- end to end ----------------------------------------------------------------------------------


async def test_a_channel_message_is_answered_in_its_thread(
    ledger: Ledger, fake: FakeSlack, sender: SlackSender
) -> None:
    async with gateway(ledger, fake, sender) as gw:
        ts = new_ts()
        env = message("hello &lt;there&gt;", ts=ts)
        assert await gw.event(env) == (200, {})
        # committed before the ack: the message is in the ledger the moment the 200 arrives
        assert await inbox_ids(ledger) == [f"{TEAM_ID}:{env['event_id']}"]
        conv = await ledger.find_conversation("slack", CHAN, ts)
        assert conv is not None
        (reply,) = await gw.replies(1)
        assert (reply["channel"], reply["thread_ts"]) == (CHAN, ts)
        assert reply["text"] == "You said: hello &lt;there&gt;"  # "<there>", escaped for Slack
        assert "blocks" not in reply
        row = await gw.sent_row()
    assert row.external_id and row.conversation_id == conv.id
    assert [m for m, _ in fake.calls if m == "auth.test"] == ["auth.test"]  # once, at start


async def test_an_event_delivered_five_times_is_handled_once(
    ledger: Ledger, fake: FakeSlack, sender: SlackSender
) -> None:
    async with gateway(ledger, fake, sender) as gw:
        env = message("once please")
        answers = await asyncio.gather(
            gw.event(env), *(gw.event(env, retry=n) for n in (1, 2, 3, 4))
        )
        assert answers == [(200, {})] * 5
        await gw.replies(1)
        assert (await gw.event(env, retry=5))[0] == 200  # after the reply, too
        await asyncio.sleep(0.3)  # nothing else turns up
    assert len(await ledger.list_work(agent="demo")) == 1
    assert await inbox_ids(ledger) == [f"{TEAM_ID}:{env['event_id']}"]
    assert [p["text"] for p in fake.sent()] == ["You said: once please"]


async def test_bad_requests_are_refused_and_write_nothing(
    ledger: Ledger, fake: FakeSlack, sender: SlackSender
) -> None:
    async with gateway(ledger, fake, sender) as gw:
        before = await row_counts(ledger)
        body = json.dumps(message("sneaky")).encode()
        stale = int(time.time()) - 600  # well outside the 5-minute window
        cases = [
            ({}, body, 401),  # unsigned
            (signed(body, secret="not-the-secret"), body, 401),
            (signed(body) | {"X-Slack-Signature": "v0=" + "0" * 64}, body, 401),
            (signed(body, timestamp=stale), body, 401),  # correctly signed, but stale
            (signed(body, timestamp=int(time.time()) + 600), body, 401),
            (signed(body) | {"X-Slack-Request-Timestamp": "soon"}, body, 401),
            (signed(body + b" "), body, 401),  # the body was changed after signing
        ]
        oversize = b'{"type": "event_callback", "pad": "' + b"x" * (1024 * 1024) + b'"}'
        cases.append((signed(oversize), oversize, 413))
        for bad in (b'{"type": "event_callback", "ev', b"[1, 2]", b'{"text": "\\u0000"}'):
            cases.append((signed(bad), bad, 400))
        for status_wanted_headers, raw, wanted in cases:
            status, answer = await gw.send(raw, status_wanted_headers)
            assert status == wanted, (raw[:40], status, answer)
            assert "error" in answer
        form = urlencode({"payload": '{"type": "block_actions", "act'}).encode()
        status, answer = await gw.send(
            form, signed(form), content_type="application/x-www-form-urlencoded"
        )
        assert (status, answer["error"]["code"]) == (400, "invalid_json")
        await asyncio.sleep(0.1)
        assert await row_counts(ledger) == before
    assert fake.sent() == []


async def test_url_verification_is_answered_with_the_challenge(
    ledger: Ledger, fake: FakeSlack, sender: SlackSender
) -> None:
    async with gateway(ledger, fake, sender, workers=False) as gw:
        before = await row_counts(ledger)
        body = json.dumps(
            {"token": "t", "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P",
             "type": "url_verification"}
        ).encode()  # fmt: skip
        status, answer = await gw.send(body, signed(body))
        assert status == 200
        assert answer == {"challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"}
        assert (await gw.send(body, {}))[0] == 401  # unsigned: no challenge answered
        assert await row_counts(ledger) == before


async def test_events_tether_does_not_handle_are_acked_and_ignored(
    ledger: Ledger, fake: FakeSlack, sender: SlackSender
) -> None:
    async with gateway(ledger, fake, sender, workers=False) as gw:
        before = await row_counts(ledger)
        parent = new_ts()
        ignored = [
            message("from another bot", user=None, bot_id="B0OTHER", subtype="bot_message"),
            message("an integration", user="U0INTEG", bot_id="B0OTHER"),
            message("my own reply", user=BOT_USER_ID),  # our bot user (bolt drops it)
            message("my own post", user=BOT_USER_ID, bot_id=BOT_ID),
            message("edited", subtype="message_changed", message={"text": "x", "ts": parent}),
            message("", subtype="message_deleted", deleted_ts=parent),
            message("<@U0ALICE> has joined the channel", subtype="channel_join"),
            message("   "),  # nothing to say
            # a message that mentions the bot comes again as app_mention: handled there
            message(f"<@{BOT_USER_ID}> hi", ts=parent),
            envelope({"type": "reaction_added", "user": ALICE, "reaction": "+1"}),
            envelope({"type": "app_home_opened", "user": ALICE, "channel": DM}),
        ]
        for env in ignored:
            assert await gw.event(env) == (200, {}), env["event"]
        # interactivity Tether has no part in: a shortcut, another app's button
        shortcut = {"type": "shortcut", "callback_id": "x", "trigger_id": "t", "team": {"id": "T"}}
        assert (await gw.action(shortcut))[0] == 200
        other = click("approve", ALICE, {"wait_id": "w", "ts": parent, "channel": CHAN,
                                         "text": "x", "blocks": []})  # fmt: skip
        other["actions"][0]["action_id"] = "someone-elses-button"
        assert (await gw.action(other))[0] == 200
        assert await row_counts(ledger) == before


async def test_dms_threads_and_mentions_map_to_conversations(
    ledger: Ledger, fake: FakeSlack, sender: SlackSender
) -> None:
    async with gateway(ledger, fake, sender) as gw:
        # a direct message: the DM is one conversation, the reply goes into the DM itself
        assert (await gw.event(message("in my DM", channel=DM)))[0] == 200
        (dm_reply,) = await gw.replies(1)
        assert dm_reply["channel"] == DM and "thread_ts" not in dm_reply
        assert await ledger.find_conversation("slack", DM, "") is not None

        # a top-level channel message opens a thread; a reply in that thread continues it
        parent = new_ts()
        assert (await gw.event(message("first", ts=parent)))[0] == 200
        await gw.replies(2)
        assert (await gw.event(message("second", thread_ts=parent)))[0] == 200
        third = (await gw.replies(3))[2]
        assert (third["channel"], third["thread_ts"], third["text"]) == (
            CHAN,
            parent,
            "You said: second",
        )
        conv = await ledger.find_conversation("slack", CHAN, parent)
        work = await ledger.list_work(agent="demo")
        assert sum(1 for w in work if w.conversation_id == conv.id) == 2

        # a mention: the message event is skipped, the app_mention answered once, in a thread
        ts = new_ts()
        text = f"<@{BOT_USER_ID}> what's up &amp; more"
        assert (await gw.event(message(text, ts=ts)))[0] == 200
        assert (await gw.event(app_mention(text, ts=ts)))[0] == 200
        fourth = (await gw.replies(4))[3]
        assert (fourth["thread_ts"], fourth["text"]) == (ts, "You said: what's up &amp; more")

        # a mention inside an existing thread stays in that thread
        inner = app_mention(f"<@{BOT_USER_ID}> and this", ts=new_ts())
        inner["event"]["thread_ts"] = parent
        assert (await gw.event(inner))[0] == 200
        fifth = (await gw.replies(5))[4]
        assert (fifth["thread_ts"], fifth["text"]) == (parent, "You said: and this")
        await asyncio.sleep(0.3)
    assert len(fake.sent()) == 5
    assert len(await ledger.list_work(agent="demo")) == 5


async def test_an_approval_clicked_by_two_people_is_decided_once(
    ledger: Ledger, fake: FakeSlack, sender: SlackSender
) -> None:
    async with gateway(ledger, fake, sender) as gw:
        prompt = await ask_approval(gw)
        wait_id = prompt["wait_id"]
        assert await gw.action(click("approve", ALICE, prompt)) == (200, {})
        # the decision is committed when the click is acked
        wait = await ledger.get_wait(wait_id)
        assert (wait.state, wait.resolved_by) == ("resolved", f"slack:{ALICE}")
        assert wait.resolution["decision"] == "approve"
        assert await gw.action(click("deny", BOB, prompt)) == (200, {})
        before = await row_counts(ledger)
        assert await gw.action(click("approve", ALICE, prompt)) == (200, {})  # redelivered
        wait = await ledger.get_wait(wait_id)
        assert wait.resolution["decision"] == "approve" and wait.resolved_by == f"slack:{ALICE}"

        def told() -> bool:
            return bool(fake.sent("chat.postEphemeral")) and len(fake.sent("chat.update")) >= 3

        await wait_until(told, what="the prompt replaced and bob told")
        (ephemeral,) = fake.sent("chat.postEphemeral")
        assert ephemeral["user"] == BOB and ephemeral["channel"] == CHAN
        assert ephemeral["text"] == f"Already decided by <@{ALICE}>"
        assert ephemeral["thread_ts"] == prompt["thread_ts"]
        for update in fake.sent("chat.update"):
            assert (update["channel"], update["ts"]) == (CHAN, prompt["ts"])
            assert update["text"] == f"Approve deploy?\n\nApproved by <@{ALICE}>"
            assert [b["type"] for b in update["blocks"]] == ["section", "context"]  # no buttons
        replies = await gw.replies(2)
        assert replies[-1]["text"] == "Approved: deploy"
        assert replies[-1]["thread_ts"] == prompt["thread_ts"]
        await asyncio.sleep(0.2)
        after = await row_counts(ledger)
    # the redelivered click created nothing (the reply that follows the decision aside)
    assert after["wait"] == before["wait"] and after["inbox"] == before["inbox"]
    assert len(await ledger.list_work()) == 1


async def test_a_ledger_that_cannot_commit_answers_503_and_the_redelivery_counts_once(
    ledger: Ledger, fake: FakeSlack, sender: SlackSender, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def down(*_: Any, **__: Any) -> None:
        raise LedgerUnavailable("database is down")

    async with gateway(ledger, fake, sender) as gw:
        env = message("after the outage")
        with monkeypatch.context() as m:
            m.setattr(ledger, "accept_message", down)
            status, body = await gw.event(env)
            assert status == 503 and body["error"]["code"] == "ledger_unavailable"
            status, _ = await gw.event(env, retry=1)
            assert status == 503
        assert await gw.event(env, retry=2) == (200, {})  # Slack retries
        assert await gw.event(env, retry=3) == (200, {})
        await gw.replies(1)

        prompt = await ask_approval_after(gw, 1)
        with monkeypatch.context() as m:
            m.setattr(ledger, "resolve_wait", down)
            status, body = await gw.action(click("approve", ALICE, prompt))
            assert status == 503 and body["error"]["code"] == "ledger_unavailable"
        assert (await ledger.get_wait(prompt["wait_id"])).state == "pending"
        assert await gw.action(click("approve", ALICE, prompt)) == (200, {})
        assert (await ledger.get_wait(prompt["wait_id"])).state == "resolved"

        async def boom(*_: Any, **__: Any) -> None:
            raise RuntimeError("a bug")

        with monkeypatch.context() as m:
            m.setattr(ledger, "accept_message", boom)
            status, body = await gw.event(message("unlucky"))
        assert status == 500 and body["error"]["code"] == "internal"  # never a silent 200
    work = await ledger.list_work(agent="demo")
    assert len(work) == 2
    assert fake.sent()[0]["text"] == "You said: after the outage"


async def ask_approval_after(gw: Gateway, replies_before: int) -> dict[str, Any]:
    ts = new_ts()
    assert (await gw.event(message("/approve rollback", ts=ts)))[0] == 200
    prompt = (await gw.replies(replies_before + 1))[-1]
    wait_id = prompt["blocks"][1]["elements"][0]["action_id"].split(":")[1]
    row = await gw.sent_row(wait_id)
    return {**prompt, "wait_id": wait_id, "ts": row.external_id}


async def test_a_429_delays_the_reply_without_losing_or_doubling_it(
    ledger: Ledger, fake: FakeSlack, sender: SlackSender
) -> None:
    fake.rate_limit(1, retry_after=1)
    async with gateway(ledger, fake, sender) as gw:
        assert (await gw.event(message("patience")))[0] == 200
        await gw.replies(1, what="reply after the 429")
        row = await gw.sent_row()
        await asyncio.sleep(0.3)
    first, second = fake.sent()
    assert first == second and first["text"] == "You said: patience"
    times = [t for (m, _), t in zip(fake.calls, fake.times, strict=True) if m == "chat.postMessage"]
    assert times[1] - times[0] >= 0.9  # Retry-After honoured
    assert (row.state, row.attempts) == ("sent", 2) and row.external_id
    assert [r.id for r in await ledger.list_outbox()] == [row.id]


@pytest.mark.postgres
async def test_postgres_unreachable_answers_503_and_the_redelivery_is_handled_once(
    postgres_url: str, fake: FakeSlack, sender: SlackSender
) -> None:
    """A real outage: the ledger's database refuses connections (ALLOW_CONNECTIONS false and
    its sessions terminated), then comes back."""
    name = f"tether_slack_{uuid.uuid4().hex[:10]}"
    url = make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    admin_dsn = make_url(ADMIN_URL).set(drivername="postgresql")
    admin = await asyncpg.connect(admin_dsn.render_as_string(hide_password=False), timeout=5)
    await admin.execute(f"CREATE DATABASE {name}")
    try:
        led = await Ledger.open(url, migrate=True)
        try:
            async with gateway(led, fake, sender, workers=False) as gw:
                env = message("through the outage")
                assert (await gw.event(message("warm up")))[0] == 200
                await admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
                await admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    f"WHERE datname = '{name}'"
                )
                try:
                    started = time.monotonic()
                    status, body = await gw.event(env)
                    assert status == 503, body
                    assert time.monotonic() - started < 5
                finally:
                    await admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
                assert await gw.event(env, retry=1) == (200, {})
                assert await gw.event(env, retry=2) == (200, {})
            ids = await inbox_ids(led)
            assert ids.count(f"{TEAM_ID}:{env['event_id']}") == 1 and len(ids) == 2
            assert len(await led.list_work(agent="demo")) == 2
        finally:
            await led.close()
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


# -- configuration ---------------------------------------------------------------------------------


async def test_slack_is_off_unless_both_credentials_are_set(ledger: Ledger) -> None:
    off = create_app(ledger, load_settings(None, operator_token=OPERATOR), operator_token=OPERATOR)
    assert not any(r.resource.canonical == PATH for r in off.router.routes() if r.resource)
    assert "slack" not in senders_from_settings(load_settings(None))
    with pytest.raises(SettingsError, match="TETHER_SLACK_SIGNING_SECRET is not"):
        load_settings(None, slack_bot_token=BOT_TOKEN)
    settings = load_settings(None, slack_bot_token=BOT_TOKEN, slack_signing_secret=SECRET)
    sender = senders_from_settings(settings)["slack"]
    assert isinstance(sender, SlackSender) and sender.api_base == "https://slack.com/api/"


def test_the_gateway_starts_without_importing_slack_bolt_when_slack_is_off() -> None:
    code = (
        "import sys\n"
        "from config import load_settings\n"
        "from gateway import create_app\n"
        "from gateway.delivery import senders_from_settings\n"
        "from ledger import Ledger\n"
        "s = load_settings(None, operator_token='x')\n"
        "create_app(object.__new__(Ledger), s, operator_token='x')\n"
        "senders_from_settings(s)\n"
        "print(sorted(m for m in sys.modules if m.startswith(('slack_bolt', 'slack_sdk'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# -- the sender on its own -------------------------------------------------------------------------


def _out(text: str, *, thread: str = "", **extra: Any) -> OutboundMessage:
    return OutboundMessage(
        outbox_id=1, channel="slack", chat_id=CHAN, thread_id=thread, text=text, **extra
    )


async def test_the_sender_classifies_slack_answers(fake: FakeSlack, sender: SlackSender) -> None:
    fake.rate_limit(1, retry_after=7)
    with pytest.raises(RetryLater) as caught:
        await sender.send(_out("hi"))
    assert caught.value.retry_after == 7
    sender.limiter._next_chat.clear()  # the test does not wait the 7 s out

    fake.server_error()
    with pytest.raises(DeliveryUnknown, match="503"):
        await sender.send(_out("hi"))
    for error in ("internal_error", "fatal_error"):
        fake.refuse(error)
        with pytest.raises(DeliveryUnknown, match=error):
            await sender.send(_out("hi"))
    for error in ("channel_not_found", "not_in_channel", "invalid_auth", "is_archived"):
        fake.refuse(error)
        with pytest.raises(DeliveryFailed, match=error):
            await sender.send(_out("hi"))
    fake.unknown_channels.add("C0GONE")
    with pytest.raises(DeliveryFailed, match="channel_not_found"):
        await sender.send(OutboundMessage(1, "slack", "C0GONE", "", "hi"))

    delivered = await sender.send(_out("hi", thread="1700000000.000100"))
    assert isinstance(delivered, Delivered) and delivered.external_id
    last = fake.sent()[-1]
    assert (last["text"], last["thread_ts"]) == ("hi", "1700000000.000100")


async def test_a_timeout_after_sending_is_unknown_and_a_refused_connection_retries(
    fake: FakeSlack,
) -> None:
    slow = SlackSender(BOT_TOKEN, fake.base_url, per_channel_interval=0, timeout=0.3)
    try:
        fake.stall(2.0)
        with pytest.raises(DeliveryUnknown):
            await slow.send(_out("hi"))
    finally:
        await slow.close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    gone = SlackSender(BOT_TOKEN, f"http://127.0.0.1:{port}/api/", per_channel_interval=0)
    try:
        with pytest.raises(RetryLater, match="unreachable"):
            await gone.send(_out("hi"))
    finally:
        await gone.close()


async def test_a_long_reply_is_split_in_order_with_the_buttons_on_the_last_part(
    fake: FakeSlack, sender: SlackSender
) -> None:
    text = "\n\n".join(f"paragraph {i} " + "x" * 4_980 for i in range(9))
    assert len(text) > 40_000
    actions = [{"id": "approve", "label": "Approve"}, {"id": "deny", "label": "Deny"}]
    delivered = await sender.send(
        _out(text, thread="1700000000.000200", wait_id="w1", actions=actions)
    )
    parts = fake.sent()
    assert "".join(p["text"] for p in parts) == text
    assert all(len(p["text"]) <= 40_000 for p in parts) and len(parts[-1]["text"]) <= 3_000
    assert all(p["thread_ts"] == "1700000000.000200" for p in parts)
    assert [("blocks" in p) for p in parts] == [False] * (len(parts) - 1) + [True]
    buttons = parts[-1]["blocks"][-1]["elements"]
    assert [(b["action_id"], b["style"]) for b in buttons] == [
        ("w:w1:a", "primary"),
        ("w:w1:d", "danger"),
    ]
    assert delivered.external_id is not None


async def test_a_later_part_rate_limited_is_not_sent_twice(
    fake: FakeSlack, sender: SlackSender
) -> None:
    text = "a" * 40_000 + "b" * 10
    fake.rate_limit(1, retry_after=1, after=1)  # the second part is refused
    with pytest.raises(RetryLater):
        await sender.send(_out(text))
    sender.limiter._next_chat.clear()
    await sender.send(_out(text))
    assert [p["text"][0] for p in fake.sent()] == ["a", "b", "b"]


# -- parsing ---------------------------------------------------------------------------------------


def test_events_become_inbound_messages() -> None:
    parent = "1700000000.000300"
    env = message(
        "look &amp; see",
        ts="1700000000.000400",
        thread_ts=parent,
        subtype="file_share",
        files=[{"id": "F1", "name": "a.png", "mimetype": "image/png"}],
        event_id="Ev1",
    )
    msg = event_to_inbound(env)
    assert msg is not None
    assert (msg.channel, msg.chat_id, msg.thread_id, msg.message_id) == (
        "slack",
        CHAN,
        parent,
        f"{TEAM_ID}:Ev1",
    )
    assert (msg.sender, msg.text, msg.reply_to) == (ALICE, "look & see", parent)
    assert msg.attachments == [
        {"type": "file", "file_id": "F1", "file_name": "a.png", "mime_type": "image/png"}
    ]
    top = event_to_inbound(message("hi", ts="1700000000.000500", channel="G0PRIVATE"))
    assert top is not None and top.thread_id == "1700000000.000500" and top.reply_to is None
    dm = event_to_inbound(message("hi", channel=DM))
    assert dm is not None and (dm.chat_id, dm.thread_id) == (DM, "")
    mention = event_to_inbound(app_mention(f"<@{BOT_USER_ID}>: do it", ts="1.2"))
    assert mention is not None and (mention.text, mention.thread_id) == ("do it", "1.2")
    assert event_to_inbound(message(f"<@{BOT_USER_ID}> hi")) is None  # via app_mention
    assert event_to_inbound(message(f"<@{BOT_USER_ID}> hi", channel=DM)) is not None
    assert event_to_inbound(message("hi", user=BOT_USER_ID)) is None
    assert event_to_inbound({"type": "url_verification", "challenge": "x"}) is None


def test_clicks_are_parsed_from_block_actions() -> None:
    prompt = {"wait_id": "abc_123", "ts": "1.5", "channel": CHAN, "text": "Approve x?",
              "blocks": [], "thread_ts": "1.4"}  # fmt: skip
    got = action_to_click(click("deny", BOB, prompt))
    assert got is not None
    assert (got.wait_id, got.decision, got.user, got.channel_id, got.message_ts) == (
        "abc_123",
        "deny",
        BOB,
        CHAN,
        "1.5",
    )
    assert (got.thread_ts, got.message_text, got.team_id) == ("1.4", "Approve x?", TEAM_ID)
    other = click("deny", BOB, prompt)
    other["actions"][0]["action_id"] = "w:abc:x"
    assert action_to_click(other) is None
    assert action_to_click({"type": "view_submission"}) is None


def test_split_message_escapes_and_never_cuts_an_escape() -> None:
    assert split_message("a < b & c") == ["a &lt; b &amp; c"]
    parts = split_message("<" * 30, limit=16)
    assert all(len(p) <= 16 for p in parts)
    assert all(p == "&lt;" * (len(p) // 4) for p in parts)
    assert "".join(parts) == "&lt;" * 30
