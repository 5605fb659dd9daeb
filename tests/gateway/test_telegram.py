"""The Telegram channel end to end: a real gateway and worker pool on SQLite and PostgreSQL,
aiogram's real ``Bot`` against a fake Bot API server (``tests/fakes/telegram_api.py``).

Outbound delivery is driven here by hand (pending outbox rows → ``TelegramSender.send``), so
these tests do not depend on the gateway's delivery loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

import worker.agents  # noqa: F401  (registers the demo agent)
from adapters.outbound import Delivered, DeliveryFailed, OutboundMessage, RetryLater
from adapters.telegram import (
    CallbackClick,
    TelegramSender,
    split_text,
    update_to_inbound,
)
from config import load_settings
from gateway import create_app
from ledger import Ledger
from worker.registry import chat_policies

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "worker"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fakes"))
from helpers_worker import running_pool, wait_until
from telegram_api import FakeTelegram

BOT_TOKEN = "123456:TEST-telegram-token"
SECRET = "hook-secret-1"
OPERATOR = "tg-operator-token"
CHAT = "4242"
WEBHOOK = "/channels/telegram/webhook"


@pytest.fixture
async def fake() -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram(BOT_TOKEN) as server:
        yield server


@pytest.fixture
async def sender(fake: FakeTelegram) -> AsyncIterator[TelegramSender]:
    s = TelegramSender(BOT_TOKEN, fake.base_url, per_chat_interval=0.01)
    try:
        yield s
    finally:
        await s.close()


def _settings(fake: FakeTelegram, **extra: Any) -> Any:
    values: dict[str, Any] = {
        "default_agent": "demo",
        "operator_token": OPERATOR,
        "telegram_token": BOT_TOKEN,
        "telegram_webhook_secret": SECRET,
        "telegram_api_base": fake.base_url,
        **extra,
    }
    return load_settings(None, **values)


@dataclass
class Gateway:
    http: aiohttp.ClientSession
    ledger: Ledger
    sender: TelegramSender
    delivered: set[int] = field(default_factory=set)

    async def post(self, update: Any, *, secret: str | None = SECRET, raw: bytes | None = None):
        headers = {} if secret is None else {"X-Telegram-Bot-Api-Secret-Token": secret}
        if raw is not None:
            headers["Content-Type"] = "application/json"
            resp = await self.http.post(WEBHOOK, data=raw, headers=headers)
        else:
            resp = await self.http.post(WEBHOOK, json=update, headers=headers)
        async with resp:
            return resp.status, await resp.json()

    async def pending(self) -> list[Any]:
        rows = await self.ledger.list_outbox(state="pending")
        return sorted(
            (r for r in rows if r.channel == "telegram" and r.id not in self.delivered),
            key=lambda r: r.id,
        )

    async def deliver(self, n: int) -> list[Delivered]:
        """Wait for ``n`` new pending telegram rows and send them, oldest first."""

        async def enough() -> bool:
            return len(await self.pending()) >= n

        await wait_until(enough, what=f"{n} pending telegram message(s)")
        conv = await self.ledger.find_conversation("telegram", CHAT)
        out = []
        for row in await self.pending():
            assert row.conversation_id == conv.id
            out.append(await self.sender.send(outbound(row, CHAT)))
            self.delivered.add(row.id)
        return out


def outbound(row: Any, chat_id: str, thread_id: str = "") -> OutboundMessage:
    payload = row.payload or {}
    return OutboundMessage(
        outbox_id=row.id,
        channel=row.channel,
        chat_id=chat_id,
        thread_id=thread_id,
        text=payload.get("text", ""),
        work_id=row.work_id,
        wait_id=payload.get("wait_id"),
        actions=payload.get("actions") or [],
    )


@contextlib.asynccontextmanager
async def gateway(
    ledger: Ledger, fake: FakeTelegram, sender: TelegramSender
) -> AsyncIterator[Gateway]:
    app = create_app(
        ledger, _settings(fake), operator_token=OPERATOR, chat_policies=chat_policies()
    )
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with (
            aiohttp.ClientSession(str(server.make_url("/"))) as http,
            running_pool(ledger, concurrency=4),
        ):
            yield Gateway(http, ledger, sender)
    finally:
        await server.close()


_ids = iter(range(10_000, 1_000_000))


def message(text: str, *, update_id: int | None = None, user: str = "alice") -> dict[str, Any]:
    uid = update_id if update_id is not None else next(_ids)
    return {
        "update_id": uid,
        "message": {
            "message_id": uid,
            "date": 1_700_000_000,
            "chat": {"id": int(CHAT), "type": "private"},
            "from": {"id": 7, "is_bot": False, "first_name": user, "username": user},
            "text": text,
        },
    }


def click(data: str, user: str, prompt: dict[str, Any]) -> dict[str, Any]:
    return {
        "update_id": next(_ids),
        "callback_query": {
            "id": f"cq-{user}-{next(_ids)}",
            "from": {"id": 8, "is_bot": False, "first_name": user, "username": user},
            "chat_instance": "ci",
            "data": data,
            "message": {
                "message_id": int(prompt["message_id"]),
                "date": 1_700_000_000,
                "chat": {"id": int(CHAT), "type": "private"},
                "text": prompt["text"],
            },
        },
    }


async def ask_approval(gw: Gateway, fake: FakeTelegram) -> tuple[str, dict[str, Any]]:
    """``/approve deploy`` on Telegram: the prompt goes out with an inline keyboard."""
    status, _ = await gw.post(message("/approve deploy"))
    assert status == 200
    (delivered,) = await gw.deliver(1)
    prompt = fake.sent()[-1]
    assert prompt["text"] == "Approve deploy?" and prompt["chat_id"] == CHAT
    buttons = prompt["reply_markup"]["inline_keyboard"][0]
    assert [b["text"] for b in buttons] == ["Approve", "Deny"]
    wait_id = buttons[0]["callback_data"].split(":")[1]
    assert [b["callback_data"] for b in buttons] == [f"w:{wait_id}:a", f"w:{wait_id}:d"]
    return wait_id, {"message_id": delivered.external_id, "text": prompt["text"]}


# -- end to end ----------------------------------------------------------------------------------


async def test_a_message_delivered_five_times_gets_one_reply(
    ledger: Ledger, fake: FakeTelegram, sender: TelegramSender
) -> None:
    async with gateway(ledger, fake, sender) as gw:
        update = message("hello", update_id=1)
        answers = await asyncio.gather(*(gw.post(update) for _ in range(5)))
        assert answers == [(200, {})] * 5
        await gw.deliver(1)
        await asyncio.sleep(0.3)  # nothing else turns up
        assert await gw.pending() == []
    work = await ledger.list_work(agent="demo")
    assert len(work) == 1
    assert [(p["chat_id"], p["text"]) for p in fake.sent()] == [(CHAT, "You said: hello")]


async def test_bad_secret_and_bad_bodies_write_nothing(
    ledger: Ledger, fake: FakeTelegram, sender: TelegramSender
) -> None:
    async with gateway(ledger, fake, sender) as gw:
        assert (await gw.post(message("x"), secret=None))[0] == 401
        assert (await gw.post(message("x"), secret="wrong"))[0] == 401
        assert (await gw.post(None, raw=b'{"update_id": 1, "mess'))[0] == 400
        assert (await gw.post({"message": {}}))[0] == 400
    assert await ledger.list_work() == []
    assert await ledger.find_conversation("telegram", CHAT) is None


async def test_an_approval_clicked_twice_is_decided_once(
    ledger: Ledger, fake: FakeTelegram, sender: TelegramSender
) -> None:
    async with gateway(ledger, fake, sender) as gw:
        wait_id, prompt = await ask_approval(gw, fake)
        assert await gw.post(click(f"w:{wait_id}:a", "alice", prompt)) == (200, {})
        assert await gw.post(click(f"w:{wait_id}:d", "bob", prompt)) == (200, {})
        wait = await ledger.get_wait(wait_id)
        assert wait.resolved_by == "telegram:alice"
        assert wait.resolution["decision"] == "approve"

        async def answered() -> bool:
            return len(fake.sent("answerCallbackQuery")) == 2 and bool(fake.sent("editMessageText"))

        await wait_until(answered, what="both clicks answered and the prompt edited")
        first, second = fake.sent("answerCallbackQuery")
        assert first["text"] == "Approved by alice"
        assert second["text"] == "Already decided by alice"
        (edit,) = fake.sent("editMessageText")
        assert edit["text"] == "Approve deploy?\n\nApproved by alice"
        assert edit["message_id"] == prompt["message_id"] and "reply_markup" not in edit
        await gw.deliver(1)
    assert fake.sent()[-1]["text"] == "Approved: deploy"


async def test_ask_on_telegram_approve_from_the_operator_api(
    ledger: Ledger, fake: FakeTelegram, sender: TelegramSender
) -> None:
    async with gateway(ledger, fake, sender) as gw:
        wait_id, _ = await ask_approval(gw, fake)
        async with gw.http.post(
            f"/api/v1/waits/{wait_id}/resolve",
            json={"decision": "approve"},
            headers={"Authorization": f"Bearer {OPERATOR}"},
        ) as resp:
            assert resp.status == 200, await resp.text()
        await gw.deliver(1)
    assert [p["text"] for p in fake.sent()] == ["Approve deploy?", "Approved: deploy"]


async def test_a_ledger_that_cannot_commit_answers_503_and_the_redelivery_counts_once(
    ledger: Ledger, fake: FakeTelegram, sender: TelegramSender, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ledger import LedgerUnavailable

    async def down(**_: Any) -> None:
        raise LedgerUnavailable("database is down")

    async with gateway(ledger, fake, sender) as gw:
        update = message("after the outage", update_id=77)
        with monkeypatch.context() as m:
            m.setattr(ledger, "accept_message", down)
            status, body = await gw.post(update)
        assert status == 503 and body["error"]["code"] == "ledger_unavailable"
        assert (await gw.post(update))[0] == 200  # Telegram redelivers
        assert (await gw.post(update))[0] == 200
        await gw.deliver(1)
    assert len(await ledger.list_work()) == 1
    assert [p["text"] for p in fake.sent()] == ["You said: after the outage"]


async def test_the_webhook_refuses_to_run_without_a_secret(ledger: Ledger) -> None:
    settings = load_settings(None, operator_token=OPERATOR, telegram_token=BOT_TOKEN)
    with pytest.raises(ValueError, match="TETHER_TELEGRAM_WEBHOOK_SECRET"):
        create_app(ledger, settings, operator_token=OPERATOR)
    off = create_app(ledger, load_settings(None, operator_token=OPERATOR), operator_token=OPERATOR)
    assert not any(r.resource.canonical == WEBHOOK for r in off.router.routes() if r.resource)


# -- the sender on its own -----------------------------------------------------------------------


def _out(text: str, **extra: Any) -> OutboundMessage:
    return OutboundMessage(
        outbox_id=1, channel="telegram", chat_id=CHAT, thread_id="", text=text, **extra
    )


async def test_a_429_becomes_retry_later_with_its_delay(
    fake: FakeTelegram, sender: TelegramSender
) -> None:
    fake.fail_next(1, retry_after=7)
    with pytest.raises(RetryLater) as caught:
        await sender.send(_out("hi"))
    assert caught.value.retry_after == 7
    sender.limiter.hold(CHAT, 0)  # the test does not wait the 7 s out
    sender.limiter._next_chat.pop(CHAT)
    delivered = await sender.send(_out("hi"))
    assert delivered.external_id and [p["text"] for p in fake.sent()] == ["hi", "hi"]


async def test_a_5000_character_reply_goes_out_as_two_messages_in_order(
    fake: FakeTelegram, sender: TelegramSender
) -> None:
    text = "\n\n".join(f"paragraph {i} " + "x" * 480 for i in range(10))
    assert len(text) > 4096
    actions = [{"id": "approve", "label": "Approve"}, {"id": "deny", "label": "Deny"}]
    delivered = await sender.send(_out(text, wait_id="w1", actions=actions))
    first, second = fake.sent()
    assert first["text"] + second["text"] == text
    assert first["text"].endswith("\n\n") and second["text"].startswith("paragraph")
    assert "reply_markup" not in first and "inline_keyboard" in second["reply_markup"]
    assert int(delivered.external_id) > 0


async def test_a_later_part_rate_limited_is_not_sent_twice(
    fake: FakeTelegram, sender: TelegramSender
) -> None:
    text = "a" * 4096 + "b" * 10
    fake.fail_next(1, retry_after=1, after=1)  # the second part is refused
    with pytest.raises(RetryLater):
        await sender.send(_out(text))
    sender.limiter._next_chat.clear()
    await sender.send(_out(text))
    assert [p["text"][0] for p in fake.sent()] == ["a", "b", "b"]


async def test_a_refused_chat_is_a_failed_delivery(
    fake: FakeTelegram, sender: TelegramSender
) -> None:
    fake.unknown_chats.add(CHAT)
    with pytest.raises(DeliveryFailed, match="chat not found"):
        await sender.send(_out("hi"))


# -- parsing ---------------------------------------------------------------------------------------


def test_updates_become_inbound_messages_and_clicks() -> None:
    photo = {
        "update_id": 5,
        "edited_message": {
            "message_id": 9,
            "date": 0,
            "chat": {"id": -100, "type": "supergroup"},
            "message_thread_id": 77,
            "from": {"id": 31, "is_bot": False, "first_name": "N"},
            "caption": "look",
            "photo": [{"file_id": "small"}, {"file_id": "big"}],
            "reply_to_message": {"message_id": 3, "date": 0, "chat": {"id": -100}},
        },
    }
    msg = update_to_inbound(photo, "123456")
    assert msg is not None and not isinstance(msg, CallbackClick)
    assert (msg.chat_id, msg.thread_id, msg.message_id) == ("-100", "77", "123456:5")
    assert (msg.sender, msg.text, msg.reply_to) == ("31", "look", "3")
    assert msg.attachments == [{"type": "photo", "file_id": "big"}]
    cb = click("w:abc_123:d", "bob", {"message_id": 11, "text": "Approve x?"})
    got = update_to_inbound(cb, "123456")
    assert isinstance(got, CallbackClick)
    assert (got.wait_id, got.decision, got.user, got.chat_id, got.message_id) == (
        "abc_123",
        "deny",
        "bob",
        CHAT,
        11,
    )
    assert update_to_inbound(click("other", "bob", {"message_id": 1, "text": ""}), "1") is None
    assert update_to_inbound({"update_id": 1, "poll": {}}, "1") is None


def test_split_text_prefers_paragraphs_then_lines_then_words() -> None:
    assert split_text("short") == ["short"]
    assert split_text("aaa\n\nbbb\nccc", limit=9) == ["aaa\n\n", "bbb\nccc"]
    assert split_text("aaa bbb\nccc", limit=8) == ["aaa bbb\n", "ccc"]
    assert split_text("aaa bbb ccc", limit=8) == ["aaa bbb ", "ccc"]
    assert split_text("abcdefghij", limit=4) == ["abcd", "efgh", "ij"]


# -- through the delivery loop --------------------------------------------------------------------


async def test_the_delivery_loop_sends_the_reply_in_order_through_a_429(
    ledger: Ledger, fake: FakeTelegram, sender: TelegramSender
) -> None:
    """The whole path: webhook → ledger → worker → outbox → DeliveryLoop → Bot API. A 429 on
    the first send delays it (nothing lost, nothing sent twice) and the replies keep order."""
    from gateway.delivery import DeliveryLoop
    from scheduler import SchedulerService

    fake.fail_next(1, retry_after=1)
    loop = DeliveryLoop(ledger, {"telegram": sender}, poll_interval=0.05)
    sched = SchedulerService(ledger, reaper_interval=5)  # fires the reminder's timer
    task = asyncio.create_task(loop.run())
    sched_task = asyncio.create_task(sched.run())
    try:
        async with gateway(ledger, fake, sender) as gw:
            status, _ = await gw.post(message("/remind 1s stretch"))
            assert status == 200

            def texts() -> list[str]:
                return [m["text"] for m in fake.sent()]

            # the fake records every call: the refused first one, then the accepted ones
            await wait_until(lambda: len(texts()) >= 3, timeout=15, what="two replies")
            await asyncio.sleep(0.3)  # nothing more arrives
    finally:
        loop.stop()
        sched.stop()
        await asyncio.wait_for(asyncio.gather(task, sched_task), 10)
    assert texts() == ["Reminder set for 1s.", "Reminder set for 1s.", "stretch"]
    rows = [r for r in await ledger.list_outbox() if r.channel == "telegram"]
    assert sorted(r.state for r in rows) == ["sent", "sent"]
    assert all(r.external_id for r in rows)
