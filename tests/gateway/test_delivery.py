"""The outbound delivery loop and the ledger's outbox claims, on SQLite and on PostgreSQL.

The sender is a fake in-process :class:`Sender` (the platform boundary); everything on Tether's
side (ledger rows, claims, the loop) is real.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest

from adapters.outbound import (
    Delivered,
    DeliveryFailed,
    DeliveryUnknown,
    OutboundMessage,
    RetryLater,
)
from gateway.delivery import DeliveryLoop, backoff, senders_from_settings
from ledger import Ledger

_ids = itertools.count(1)


@dataclass
class Call:
    text: str
    chat_id: str
    started: float
    finished: float = 0.0


class FakeSender:
    """Records every send; ``script[text]`` is a list of outcomes to raise (or ``None`` =
    deliver), consumed one per attempt."""

    def __init__(self, channel: str = "fake", delay: float = 0.0) -> None:
        self.channel = channel
        self.delay = delay
        self.script: dict[str, list[BaseException | None]] = {}
        self.calls: list[Call] = []
        self.delivered: list[Call] = []
        self.active: dict[str, int] = {}
        self.max_parallel = 0
        self.max_parallel_per_chat = 0

    async def send(self, message: OutboundMessage) -> Delivered:
        call = Call(message.text, message.chat_id, time.monotonic())
        self.calls.append(call)
        self.active[message.chat_id] = self.active.get(message.chat_id, 0) + 1
        self.max_parallel = max(self.max_parallel, sum(self.active.values()))
        self.max_parallel_per_chat = max(self.max_parallel_per_chat, *self.active.values())
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            outcomes = self.script.get(message.text)
            outcome = outcomes.pop(0) if outcomes else None
            if outcome is not None:
                raise outcome
            call.finished = time.monotonic()
            self.delivered.append(call)
            return Delivered(external_id=f"ext-{message.outbox_id}")
        finally:
            self.active[message.chat_id] -= 1


async def conversation_with_replies(
    ledger: Ledger, texts: list[str], *, chat_id: str | None = None, channel: str = "fake"
) -> list[int]:
    """A conversation on ``channel`` whose work item replied ``texts`` (pending outbox rows)."""
    n = next(_ids)
    accepted = await ledger.accept_message(
        channel=channel,
        chat_id=chat_id or f"chat-{n}",
        text="hi",
        message_id=f"m-{n}",
        agent="echo",
    )
    [claim] = [
        c for c in await ledger.claim_work("w", limit=50, lease_ttl=30)
        if c.work_id == accepted.work_id
    ]  # fmt: skip
    ids = []
    for seq, text in enumerate(texts, start=1):
        outbox_id = await ledger.record_reply(claim, seq, f"reply{seq}", text)
        assert outbox_id is not None
        ids.append(outbox_id)
    return ids


async def states(ledger: Ledger) -> dict[int, str]:
    return {m.id: m.state for m in await ledger.list_outbox(limit=1000)}


async def wait_for(cond: Callable[[], Any], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = cond()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


@pytest.fixture
async def running() -> AsyncIterator[Callable[..., Any]]:
    """Start a delivery loop; stopped at the end of the test."""
    loops: list[tuple[DeliveryLoop, asyncio.Task[None]]] = []

    def start(ledger: Ledger, senders: dict[str, Any], **kw: Any) -> DeliveryLoop:
        kw.setdefault("poll_interval", 0.05)
        loop = DeliveryLoop(ledger, senders, **kw)
        loops.append((loop, asyncio.create_task(loop.run())))
        return loop

    yield start
    for loop, _task in loops:
        loop.stop()
    await asyncio.gather(*(t for _, t in loops))


# -- the ledger's claims ------------------------------------------------------------------------


async def test_claim_takes_the_oldest_row_per_conversation(ledger: Ledger) -> None:
    a = await conversation_with_replies(ledger, ["a1", "a2", "a3"])
    b = await conversation_with_replies(ledger, ["b1"])
    claimed = await ledger.claim_outbox("d", limit=10, lease_ttl=30)
    assert sorted(r.outbox_id for r in claimed) == [a[0], b[0]]
    first = next(r for r in claimed if r.outbox_id == a[0])
    assert (first.text, first.attempts, first.channel) == ("a1", 1, "fake")
    assert first.chat_id.startswith("chat-") and first.thread_id == ""
    # a1 is being sent: a2 waits for it
    assert await ledger.claim_outbox("d", limit=10, lease_ttl=30) == []
    assert await ledger.mark_outbox_sent(a[0], "x1", attempt=1)
    [nxt] = await ledger.claim_outbox("d", limit=10, lease_ttl=30)
    assert nxt.outbox_id == a[1]
    # an older row in doubt holds back the rest of its conversation
    assert await ledger.mark_outbox_unknown(a[1], "timeout")
    assert await ledger.claim_outbox("d", limit=10, lease_ttl=30) == []
    row = await ledger.get_outbox(a[0])
    assert (row.state, row.external_id, row.sent_at is not None) == ("sent", "x1", True)


async def test_claim_only_the_given_channels(ledger: Ledger) -> None:
    await conversation_with_replies(ledger, ["t1"], channel="telegram")
    assert await ledger.claim_outbox("d", limit=10, lease_ttl=30, channels=["slack"]) == []
    assert await ledger.claim_outbox("d", limit=10, lease_ttl=30, channels=[]) == []
    [row] = await ledger.claim_outbox("d", limit=10, lease_ttl=30, channels=["telegram"])
    assert row.channel == "telegram"


async def test_outcomes_apply_only_to_a_row_being_sent(ledger: Ledger) -> None:
    [a] = await conversation_with_replies(ledger, ["x"])
    assert not await ledger.mark_outbox_sent(a, "e")  # pending, not sending
    [row] = await ledger.claim_outbox("d", limit=1, lease_ttl=30)
    assert not await ledger.mark_outbox_sent(a, "e", attempt=row.attempts + 1)  # stale claim
    assert await ledger.mark_outbox_retry(a, 0, "busy", attempt=row.attempts)
    [row] = await ledger.claim_outbox("d", limit=1, lease_ttl=30)
    assert row.attempts == 2
    assert await ledger.mark_outbox_failed(a, "chat not found")
    assert not await ledger.mark_outbox_sent(a, "late")
    got = await ledger.get_outbox(a)
    assert (got.state, got.error, got.external_id) == ("failed", "chat not found", None)


async def test_a_killed_sender_is_reaped_as_unknown(ledger: Ledger) -> None:
    [a] = await conversation_with_replies(ledger, ["x"])
    [row] = await ledger.claim_outbox("dead", limit=1, lease_ttl=0.1)
    assert await ledger.reap_outbox() == []  # not yet past its deadline
    await asyncio.sleep(0.25)
    assert await ledger.reap_outbox() == [a]
    got = await ledger.get_outbox(a)
    assert (got.state, got.attempts) == ("unknown", 1)
    # the dead sender's late answer changes nothing
    assert not await ledger.mark_outbox_sent(a, "late", attempt=row.attempts)
    assert (await ledger.get_outbox(a)).state == "unknown"


async def test_an_abandoned_row_ignores_a_late_answer(ledger: Ledger) -> None:
    [a] = await conversation_with_replies(ledger, ["x"])
    await ledger.claim_outbox("d", limit=1, lease_ttl=0.05)
    await asyncio.sleep(0.1)
    await ledger.reap_outbox()
    await ledger.abandon_outbox(a, "ops")
    assert not await ledger.mark_outbox_sent(a, "late")
    assert (await ledger.get_outbox(a)).state == "abandoned"


# -- the loop -----------------------------------------------------------------------------------


async def test_in_order_per_conversation_and_parallel_across(ledger: Ledger, running: Any) -> None:
    convs = [
        await conversation_with_replies(ledger, [f"c{c}-{i}" for i in range(3)]) for c in range(3)
    ]
    sender = FakeSender(delay=0.15)
    running(ledger, {"fake": sender}, concurrency=8)
    all_ids = [i for ids in convs for i in ids]
    await wait_for(lambda: len(sender.delivered) == len(all_ids))
    await wait_for(lambda: _all_sent(ledger, all_ids))
    for c in range(3):
        got = [call.text for call in sender.delivered if call.text.startswith(f"c{c}-")]
        assert got == [f"c{c}-{i}" for i in range(3)]
    assert sender.max_parallel >= 2
    assert sender.max_parallel_per_chat == 1
    assert len(sender.calls) == len(all_ids)
    for i in all_ids:
        assert (await ledger.get_outbox(i)).external_id == f"ext-{i}"


async def _all_sent(ledger: Ledger, ids: list[int]) -> bool:
    s = await states(ledger)
    return all(s[i] == "sent" for i in ids)


async def test_retry_later_is_honoured(ledger: Ledger, running: Any) -> None:
    [a] = await conversation_with_replies(ledger, ["slow down"])
    sender = FakeSender()
    sender.script["slow down"] = [RetryLater("429", retry_after=2.0)]
    running(ledger, {"fake": sender})
    await wait_for(lambda: _all_sent(ledger, [a]), timeout=10)
    assert len(sender.calls) == 2 and len(sender.delivered) == 1
    assert sender.calls[1].started - sender.calls[0].started >= 2.0 - 0.05
    row = await ledger.get_outbox(a)
    assert (row.attempts, row.external_id) == (2, f"ext-{a}")


async def test_unknown_is_not_resent_until_an_operator_says_so(
    ledger: Ledger, running: Any
) -> None:
    [a] = await conversation_with_replies(ledger, ["maybe"])
    sender = FakeSender()
    sender.script["maybe"] = [DeliveryUnknown("timeout after the request left")]
    running(ledger, {"fake": sender})
    await wait_for(lambda: _state_is(ledger, a, "unknown"))
    await asyncio.sleep(0.5)
    assert len(sender.calls) == 1 and sender.delivered == []
    assert "timeout after the request left" in ((await ledger.get_outbox(a)).error or "")
    await ledger.resend_outbox(a, "ops")
    await wait_for(lambda: _all_sent(ledger, [a]))
    await asyncio.sleep(0.2)
    assert len(sender.calls) == 2 and len(sender.delivered) == 1


async def test_a_send_that_times_out_is_unknown(ledger: Ledger, running: Any) -> None:
    [a] = await conversation_with_replies(ledger, ["hang"])
    sender = FakeSender(delay=1.0)
    running(ledger, {"fake": sender}, send_timeout=0.2, lease_ttl=5)
    await wait_for(lambda: _state_is(ledger, a, "unknown"))
    assert len(sender.calls) == 1 and sender.delivered == []


async def test_failed_for_good(ledger: Ledger, running: Any) -> None:
    [a, b] = await conversation_with_replies(ledger, ["bad", "next"])
    sender = FakeSender()
    sender.script["bad"] = [DeliveryFailed("chat not found")]
    running(ledger, {"fake": sender})
    await wait_for(lambda: _all_sent(ledger, [b]))
    row = await ledger.get_outbox(a)
    assert row.state == "failed" and "chat not found" in (row.error or "")
    assert [c.text for c in sender.calls] == ["bad", "next"]


async def test_unexpected_errors_back_off(ledger: Ledger, running: Any) -> None:
    [a] = await conversation_with_replies(ledger, ["boom"])
    sender = FakeSender()
    sender.script["boom"] = [RuntimeError("bug")]
    running(ledger, {"fake": sender})
    await wait_for(lambda: _all_sent(ledger, [a]), timeout=10)
    assert len(sender.calls) == 2
    assert sender.calls[1].started - sender.calls[0].started >= backoff(1) - 0.05
    assert [backoff(n) for n in (1, 2, 3)] == [1, 2, 4] and backoff(50) == 300


async def test_a_retried_row_holds_back_the_rest_of_its_conversation(
    ledger: Ledger, running: Any
) -> None:
    texts = [f"r{i}" for i in range(1, 6)]
    ids = await conversation_with_replies(ledger, texts)
    sender = FakeSender()
    sender.script["r2"] = [RetryLater("429", retry_after=1.0)]
    running(ledger, {"fake": sender})
    await wait_for(lambda: _all_sent(ledger, ids), timeout=10)
    assert [c.text for c in sender.delivered] == texts
    assert [c.text for c in sender.calls] == ["r1", "r2", *texts[1:]]
    r1, r2_failed = sender.calls[0], sender.calls[1]
    assert sender.calls[2].started - r2_failed.started >= 1.0 - 0.05
    assert r1.finished <= r2_failed.started


async def test_rows_without_a_sender_stay_pending(ledger: Ledger, running: Any) -> None:
    [a] = await conversation_with_replies(ledger, ["nobody"], channel="nowhere")
    [b] = await conversation_with_replies(ledger, ["somebody"])
    sender = FakeSender()
    running(ledger, {"fake": sender})
    await wait_for(lambda: _all_sent(ledger, [b]))
    await asyncio.sleep(0.2)
    row = await ledger.get_outbox(a)
    assert (row.state, row.attempts) == ("pending", 0)


async def test_the_loop_reaps_rows_left_sending(ledger: Ledger, running: Any) -> None:
    [a] = await conversation_with_replies(ledger, ["orphan"])
    await ledger.claim_outbox("dead", limit=1, lease_ttl=0.1)
    sender = FakeSender()
    running(ledger, {"fake": sender}, reap_interval=0.05)
    await wait_for(lambda: _state_is(ledger, a, "unknown"))
    await asyncio.sleep(0.2)
    assert sender.calls == []


async def _state_is(ledger: Ledger, outbox_id: int, state: str) -> bool:
    return (await ledger.get_outbox(outbox_id)).state == state


def test_senders_from_settings_without_channels() -> None:
    assert senders_from_settings(SimpleNamespace(telegram_token=None)) == {}
