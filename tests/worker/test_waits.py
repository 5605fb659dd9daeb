"""Durable waits from agent code, on SQLite and PostgreSQL, with a real pool and scheduler.

Each wait parks the work item (``waiting``, no lease), is resolved through the ledger the way
the gateway or the scheduler does it, and the same item carries on with the recorded outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta

from helpers_worker import event_types, running_pool, wait_for_state, wait_until
from pydantic import BaseModel

from ledger import Ledger
from scheduler import SchedulerService
from worker import Context, WaitTimeout, agent

EFFECTS: dict[str, int] = {}


def _effect(key: str) -> str:
    EFFECTS[key] = EFFECTS.get(key, 0) + 1
    return key


@agent("t_wait_sleep")
async def sleeper(ctx: Context, seconds: float) -> str:
    await ctx.step("before", _effect, f"{ctx.work_id}:before")
    await ctx.sleep(timedelta(seconds=seconds))
    await ctx.step("after", _effect, f"{ctx.work_id}:after")
    return "awake"


@agent("t_wait_approval")
async def approver(ctx: Context, opts: dict) -> dict:
    decision = await ctx.wait_for_approval(
        "Delete 3 files?", timeout=opts.get("timeout"), on_timeout=opts.get("on_timeout", "fail")
    )
    return decision.model_dump()


class Count(BaseModel):
    n: int


@agent("t_wait_input")
async def asker(ctx: Context, _input: None) -> int:
    count = await ctx.wait_for_input("How many?", schema=Count)
    return count.n * 2


@agent("t_wait_signal")
async def payer(ctx: Context, order: str) -> object:
    return await ctx.wait_for_signal("payment", key=order)


@agent("t_wait_resume_url")
async def url_user(ctx: Context, _input: None) -> dict:
    url = await ctx.resume_url("callback")
    await ctx.step("hand out", _effect, url)
    data = await ctx.wait_for_signal("callback")
    return {"url": url, "data": data}


@agent("t_wait_catch_timeout")
async def catcher(ctx: Context, _input: None) -> str:
    try:
        await ctx.wait_for_signal("never", key="k", timeout=0.2)
    except WaitTimeout:
        return "gave up"
    return "signalled"


@contextlib.asynccontextmanager
async def scheduler(ledger: Ledger) -> AsyncIterator[SchedulerService]:
    service = SchedulerService(ledger, reaper_interval=5)
    task = asyncio.create_task(service.run())
    try:
        yield service
    finally:
        service.stop()
        await asyncio.wait_for(task, 5)


async def pending_wait(ledger: Ledger, work_id: str):
    await wait_for_state(ledger, work_id, {"waiting"})
    [wait] = await ledger.list_waits(work_id=work_id, state="pending")
    return wait


async def test_sleep_parks_the_item_and_the_scheduler_wakes_it(ledger: Ledger) -> None:
    work, _ = await ledger.create_work("t_wait_sleep", 0.3)
    async with running_pool(ledger), scheduler(ledger):
        waiting = await wait_for_state(ledger, work.id, {"waiting"})
        assert waiting.lease_owner is None and waiting.wait_reason.startswith("timer ")
        done = await wait_for_state(ledger, work.id)
    assert (done.state, done.result) == ("succeeded", "awake")
    # the step before the sleep ran once although the function ran twice
    assert EFFECTS[f"{work.id}:before"] == 1 and EFFECTS[f"{work.id}:after"] == 1
    types = await event_types(ledger, work.id)
    assert "waiting" in types and "timer_fired" in types
    [wait] = await ledger.list_waits(work_id=work.id)
    assert (wait.kind, wait.state, wait.resolved_by) == ("timer", "resolved", "scheduler")
    assert wait.channel is None  # started through the API: no conversation to resume on


async def test_an_overdue_timer_fires_when_the_scheduler_starts(ledger: Ledger) -> None:
    work, _ = await ledger.create_work("t_wait_sleep", 0.05)
    async with running_pool(ledger):
        await wait_for_state(ledger, work.id, {"waiting"})
        await asyncio.sleep(0.3)  # due while no scheduler runs
        assert (await ledger.get_work(work.id)).state == "waiting"
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with scheduler(ledger):
            done = await wait_for_state(ledger, work.id)
        assert loop.time() - started < 1.0
    assert done.state == "succeeded"


async def test_approval_resumes_the_same_item_with_the_decision(ledger: Ledger) -> None:
    work, _ = await ledger.create_work("t_wait_approval", {})
    async with running_pool(ledger):
        wait = await pending_wait(ledger, work.id)
        assert (wait.kind, wait.prompt) == ("approval", "Delete 3 files?")
        await ledger.resolve_wait(wait.id, {"decision": "approve", "comment": "ok"}, by="alice")
        done = await wait_for_state(ledger, work.id)
    assert done.state == "succeeded"
    assert done.result["approved"] is True and done.result["by"] == "alice"
    assert done.result["comment"] == "ok" and done.result["wait_id"] == wait.id


async def test_approval_timeout_policies(ledger: Ledger) -> None:
    failing, _ = await ledger.create_work("t_wait_approval", {"timeout": 0.2})
    going_on, _ = await ledger.create_work(
        "t_wait_approval", {"timeout": 0.2, "on_timeout": "continue"}
    )
    escalated, _ = await ledger.create_work(
        "t_wait_approval", {"timeout": 0.2, "on_timeout": "escalate"}
    )
    async with running_pool(ledger), scheduler(ledger):
        failed = await wait_for_state(ledger, failing.id)
        continued = await wait_for_state(ledger, going_on.id)
        await wait_until(
            lambda: event_types(ledger, escalated.id),
            what="escalation",
        )

        async def is_escalated() -> bool:
            return "escalated" in await event_types(ledger, escalated.id)

        await wait_until(is_escalated, what="escalated event")
        [wait] = await ledger.list_waits(work_id=escalated.id)
        assert (wait.state, wait.deadline, wait.escalated_at is not None) == (
            "pending",
            None,
            True,
        )
        await ledger.resolve_wait(wait.id, {"decision": "deny"}, by="operator")
        denied = await wait_for_state(ledger, escalated.id)
    assert (failed.state, failed.error["type"]) == ("failed", "WaitTimeout")
    assert continued.state == "succeeded"
    assert (continued.result["approved"], continued.result["timed_out"]) == (False, True)
    assert (denied.state, denied.result["approved"]) == ("succeeded", False)


async def test_typed_input_is_validated_and_returned_as_the_type(ledger: Ledger) -> None:
    from ledger import InvalidResolution

    work, _ = await ledger.create_work("t_wait_input", None)
    async with running_pool(ledger):
        wait = await pending_wait(ledger, work.id)
        assert wait.payload_schema["properties"]["n"]["type"] == "integer"
        try:
            await ledger.resolve_wait(wait.id, {"input": {"n": "many"}})
        except InvalidResolution:
            pass
        else:
            raise AssertionError("an invalid input was accepted")
        assert (await ledger.get_wait(wait.id)).state == "pending"
        await ledger.resolve_wait(wait.id, {"input": {"n": 21}})
        done = await wait_for_state(ledger, work.id)
    assert (done.state, done.result) == ("succeeded", 42)


async def test_a_signal_resolves_only_its_key(ledger: Ledger) -> None:
    a, _ = await ledger.create_work("t_wait_signal", "order-a")
    b, _ = await ledger.create_work("t_wait_signal", "order-b")
    async with running_pool(ledger):
        await pending_wait(ledger, a.id)
        await pending_wait(ledger, b.id)
        assert await ledger.resolve_signal("payment", "order-x", {"paid": 1}) == []
        [resolved] = await ledger.resolve_signal("payment", "order-a", {"paid": 5})
        assert resolved.work_id == a.id
        done = await wait_for_state(ledger, a.id)
        assert (await ledger.get_work(b.id)).state == "waiting"
    assert done.result == {"paid": 5}


async def test_a_resume_url_resumes_its_wait_once(ledger: Ledger) -> None:
    from ledger import WaitAlreadyResolved

    work, _ = await ledger.create_work("t_wait_resume_url", None)
    async with running_pool(ledger, public_url="https://tether.example"):
        wait = await pending_wait(ledger, work.id)
        token = wait.token
        url = f"https://tether.example/resume/{token}"
        assert len(token) >= 24 and EFFECTS[url] == 1
        await ledger.resolve_by_token(token, {"status": "paid"})
        done = await wait_for_state(ledger, work.id)
        try:
            await ledger.resolve_by_token(token, {"status": "again"})
        except WaitAlreadyResolved as exc:
            assert exc.resolution["data"] == {"status": "paid"}
        else:
            raise AssertionError("a resume URL worked twice")
    assert done.result == {"url": url, "data": {"status": "paid"}}
    assert EFFECTS[url] == 1  # the URL was handed out once, although the function ran twice


async def test_agent_code_can_catch_a_wait_timeout(ledger: Ledger) -> None:
    work, _ = await ledger.create_work("t_wait_catch_timeout", None)
    async with running_pool(ledger), scheduler(ledger):
        done = await wait_for_state(ledger, work.id)
    assert (done.state, done.result) == ("succeeded", "gave up")


async def test_cancelling_a_waiting_item_closes_its_wait(ledger: Ledger) -> None:
    work, _ = await ledger.create_work("t_wait_signal", "order-c")
    async with running_pool(ledger):
        wait = await pending_wait(ledger, work.id)
        await ledger.cancel_work(work.id)
    assert (await ledger.get_wait(wait.id)).state == "cancelled"
    assert await ledger.resolve_signal("payment", "order-c", 1) == []
