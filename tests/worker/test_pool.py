"""The worker pool: operator pause/cancel of running work, graceful stop, lease loss, agent-level
retries, typed input, concurrency and the agent registry.

Real ``WorkerPool`` instances against the real ledger (SQLite and PostgreSQL); nothing of
Tether's is mocked. Step executions are counted per idempotency key in ``CALLS``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import helpers_worker as hw
import pytest
from pydantic import BaseModel, Field

from ledger import Ledger
from worker import Context, RetryPolicy, UnknownAgent, WorkerPool, agent, current_step, get_agent

CALLS: dict[str, int] = {}
#: idempotency keys whose execution was cancelled mid-flight
CANCELLED: set[str] = set()
#: every idempotency key handed to a step, in order, per work item
KEYS: dict[str, list[str]] = {}


def _count() -> int:
    h = current_step()
    CALLS[h.idempotency_key] = CALLS.get(h.idempotency_key, 0) + 1
    KEYS.setdefault(h.work_id, []).append(h.idempotency_key)
    return CALLS[h.idempotency_key]


def calls(work_id: str, seq: int) -> int:
    return CALLS.get(f"{work_id}:{seq}", 0)


def executed(work_id: str) -> list[int]:
    return [calls(work_id, seq) for seq in range(1, 6)]


def in_order(types: list[str], *expected: str) -> bool:
    """``expected`` occur in ``types`` in this order (not necessarily adjacent)."""
    it = iter(types)
    return all(any(t == e for t in it) for e in expected)


# ---- pause and cancel of running work ---------------------------------------------------------


async def slow_step(i: int) -> int:
    _count()
    await asyncio.sleep(0.2)
    return i


@agent("t_pool_slow")
async def slow_agent(ctx: Context, inp: dict[str, Any]) -> int:
    total = 0
    for i in range(inp["steps"]):
        total += await ctx.step(f"s{i}", slow_step, i)
    return total


async def test_pause_stops_running_work_at_a_step_boundary_and_resume_finishes_it(
    ledger: Ledger,
) -> None:
    work, _ = await ledger.create_work("t_pool_slow", {"steps": 5})
    async with hw.running_pool(ledger) as pool:
        await hw.wait_until(lambda: calls(work.id, 1) == 1, what="the first step to start")
        requested = await ledger.pause_work(work.id, actor="tester")
        assert (requested.state, requested.control) == ("running", "pause")

        paused = await hw.wait_for_state(ledger, work.id, {"paused"}, pool=pool)
        ran_before_pause = sum(executed(work.id))
        assert 1 <= ran_before_pause <= 2  # it stopped at the next boundary, not at the end
        assert paused.lease_owner is None and paused.control is None
        assert paused.attempt == 1
        await asyncio.sleep(0.3)  # a paused item is not picked up again
        assert (await ledger.get_work(work.id)).state == "paused"
        assert sum(executed(work.id)) == ran_before_pause

        await ledger.resume_work(work.id, actor="tester")
        done = await hw.wait_for_state(ledger, work.id, pool=pool)

    assert done.state == "succeeded", done.error
    assert done.result == 0 + 1 + 2 + 3 + 4
    assert executed(work.id) == [1, 1, 1, 1, 1]  # no step ran twice
    types = await hw.event_types(ledger, work.id)
    assert in_order(types, "claimed", "pause_requested", "paused", "resumed", "claimed")
    assert types[-1] == "succeeded"
    assert types.count("step_completed") == 5


async def test_cancel_stops_running_work_at_a_step_boundary(ledger: Ledger) -> None:
    work, _ = await ledger.create_work("t_pool_slow", {"steps": 5})
    async with hw.running_pool(ledger) as pool:
        await hw.wait_until(lambda: calls(work.id, 1) == 1, what="the first step to start")
        await ledger.cancel_work(work.id)
        cancelled = await hw.wait_for_state(ledger, work.id, pool=pool)
        ran = sum(executed(work.id))
        await asyncio.sleep(0.3)

    assert cancelled.state == "cancelled"
    assert cancelled.finished_at is not None and cancelled.lease_owner is None
    assert 1 <= ran <= 2
    assert sum(executed(work.id)) == ran  # nothing ran after the cancel landed
    assert max(executed(work.id)) == 1
    types = await hw.event_types(ledger, work.id)
    assert in_order(types, "claimed", "cancel_requested", "cancelled")
    assert types[-1] == "cancelled"
    assert "succeeded" not in types


# ---- graceful stop ----------------------------------------------------------------------------


async def long_step(first_run_seconds: float) -> int:
    key = current_step().idempotency_key
    n = _count()
    if n == 1:
        try:
            await asyncio.sleep(first_run_seconds)
        except asyncio.CancelledError:
            CANCELLED.add(key)
            raise
    return n


@agent("t_pool_long")
async def long_agent(ctx: Context, inp: dict[str, Any]) -> int:
    await ctx.step("quick", slow_step, 0)
    return await ctx.step("long", long_step, inp["seconds"])


async def test_stop_releases_an_item_whose_step_outlasts_the_grace_period(
    ledger: Ledger,
) -> None:
    work, _ = await ledger.create_work("t_pool_long", {"seconds": 5})
    pool = WorkerPool(ledger, concurrency=2, poll_interval=0.05, shutdown_grace=0.3)
    task = asyncio.create_task(pool.run())
    try:
        await hw.wait_until(lambda: calls(work.id, 2) == 1, what="the long step to start")
    finally:
        started = time.monotonic()
        pool.stop()
        await asyncio.wait_for(task, timeout=5)
    assert time.monotonic() - started < 2.0  # grace 0.3 s, not the step's 5 s

    released = await ledger.get_work(work.id)
    assert released.state == "queued"
    assert released.attempt == 1  # a graceful release spends no attempt
    assert released.lease_owner is None
    assert f"{work.id}:2" in CANCELLED
    assert (await hw.event_types(ledger, work.id))[-1] == "released"
    assert [w.state for w in await ledger.list_workers() if w.id == pool.worker_id] == ["stopped"]

    done = await hw.run_until(ledger, work.id)
    assert done.state == "succeeded", done.error
    assert done.result == 2  # the interrupted step ran again ...
    assert done.attempt == 1
    assert calls(work.id, 1) == 1  # ... the finished one did not
    assert KEYS[work.id].count(f"{work.id}:2") == 2  # with the same idempotency key


async def test_stop_lets_a_step_that_ends_within_the_grace_period_finish(
    ledger: Ledger,
) -> None:
    work, _ = await ledger.create_work("t_pool_long", {"seconds": 0.4})
    async with hw.running_pool(ledger, shutdown_grace=3.0):
        await hw.wait_until(lambda: calls(work.id, 2) == 1, what="the long step to start")
    # leaving the block stopped the pool and waited for it

    done = await ledger.get_work(work.id)
    assert done.state == "succeeded", done.error
    assert done.result == 1
    assert "released" not in await hw.event_types(ledger, work.id)


# ---- lease loss -------------------------------------------------------------------------------


@pytest.mark.parametrize("concurrency", [1, 4])
async def test_lost_lease_stops_the_stale_run_and_the_item_runs_again(
    ledger: Ledger, concurrency: int
) -> None:
    """The item's lease expires under a running step (as after a stall) and the reaper takes it
    back. With one slot, the renewal notices the loss and cancels the run; with free slots, the
    same pool may claim the item again first: the stale run must still be stopped."""
    work, _ = await ledger.create_work("t_pool_long", {"seconds": 5})
    async with hw.running_pool(ledger, concurrency=concurrency, lease_ttl=0.6) as pool:
        await hw.wait_until(lambda: calls(work.id, 2) == 1, what="the long step to start")
        await hw.expire_lease_and_reap(ledger, work.id)
        done = await hw.wait_for_state(ledger, work.id, pool=pool)
        await hw.wait_until(
            lambda: f"{work.id}:2" in CANCELLED, timeout=2, what="the stale run to be cancelled"
        )
        await hw.wait_until(lambda: not pool._running, timeout=2, what="the pool to be idle")

    assert done.state == "succeeded", done.error
    assert done.attempt == 2
    assert done.lease_epoch == 2
    assert done.result == 2
    assert calls(work.id, 1) == 1
    types = await hw.event_types(ledger, work.id)
    assert in_order(types, "claimed", "lease_expired", "claimed", "succeeded")


# ---- agent-level retries ----------------------------------------------------------------------


@agent("t_pool_retrying", retry=RetryPolicy(max_attempts=3, initial_delay=0.01))
async def retrying_agent(ctx: Context, inp: dict[str, Any]) -> str:
    await ctx.step("before", slow_step, 1)
    if ctx.attempt <= inp["fail_attempts"]:
        raise RuntimeError(f"agent body fails on attempt {ctx.attempt}")
    return f"done on attempt {ctx.attempt}"


async def test_agent_retry_policy_reruns_the_work_item(ledger: Ledger) -> None:
    work = await hw.run_work(ledger, "t_pool_retrying", {"fail_attempts": 1})

    assert work.state == "succeeded", work.error
    assert work.result == "done on attempt 2"
    assert work.attempt == 2
    assert calls(work.id, 1) == 1  # the recorded step was replayed on attempt 2
    types = await hw.event_types(ledger, work.id)
    assert in_order(types, "claimed", "retried", "claimed", "succeeded")


async def test_agent_retry_policy_gives_up_after_its_attempts(ledger: Ledger) -> None:
    work = await hw.run_work(ledger, "t_pool_retrying", {"fail_attempts": 99})

    assert work.state == "failed"
    assert work.attempt == 3
    assert work.error["type"] == "RuntimeError"
    assert "attempt 3" in work.error["message"]
    assert (await hw.event_types(ledger, work.id)).count("retried") == 2


async def test_work_without_a_retry_policy_fails_on_the_first_exception(
    ledger: Ledger,
) -> None:
    work = await hw.run_work(ledger, "t_pool_body_fails")
    assert work.state == "failed"
    assert work.attempt == 1
    assert work.error["type"] == "ZeroDivisionError"
    assert "retried" not in await hw.event_types(ledger, work.id)


@agent("t_pool_body_fails")
async def body_fails(ctx: Context, _inp: Any) -> float:
    return 1 / 0


# ---- typed input ------------------------------------------------------------------------------


class Order(BaseModel):
    item: str
    qty: int = Field(gt=0)


@agent("t_pool_typed")
async def typed_agent(ctx: Context, order: Order) -> dict[str, Any]:
    return {"type": type(order).__name__, "item": order.item, "double": order.qty * 2}


async def test_agent_input_is_validated_into_its_pydantic_type(ledger: Ledger) -> None:
    work = await hw.run_work(ledger, "t_pool_typed", {"item": "tea", "qty": "3"})
    assert work.state == "succeeded", work.error
    assert work.result == {"type": "Order", "item": "tea", "double": 6}


async def test_invalid_agent_input_fails_the_work_with_a_validation_error(ledger: Ledger) -> None:
    work = await hw.run_work(ledger, "t_pool_typed", {"item": "tea", "qty": 0})

    assert work.state == "failed"
    assert work.error["type"] == "ValidationError"
    assert "qty" in work.error["message"]
    assert "greater than 0" in work.error["message"]
    assert await ledger.list_steps(work.id) == []


# ---- concurrency and worker liveness ----------------------------------------------------------

_ACTIVE = {"now": 0, "max": 0}


async def counted_step() -> None:
    _ACTIVE["now"] += 1
    _ACTIVE["max"] = max(_ACTIVE["max"], _ACTIVE["now"])
    try:
        await asyncio.sleep(0.15)
    finally:
        _ACTIVE["now"] -= 1


@agent("t_pool_counted")
async def counted_agent(ctx: Context, _inp: Any) -> None:
    await ctx.step("counted", counted_step)


async def test_pool_runs_at_most_concurrency_items_at_once(ledger: Ledger) -> None:
    _ACTIVE.update(now=0, max=0)
    ids = [(await ledger.create_work("t_pool_counted", i))[0].id for i in range(5)]
    async with hw.running_pool(ledger, concurrency=2) as pool:
        for work_id in ids:
            assert (await hw.wait_for_state(ledger, work_id, pool=pool)).state == "succeeded"
        [me] = [w for w in await ledger.list_workers() if w.id == pool.worker_id]
        assert (me.state, me.concurrency) == ("running", 2)
    assert _ACTIVE["max"] == 2
    assert pool.completed == 5


# ---- the registry -----------------------------------------------------------------------------


def test_agent_on_a_sync_function_raises_type_error() -> None:
    def not_async(ctx: Context, inp: Any) -> None:
        return None

    with pytest.raises(TypeError, match="must be an async function"):
        agent("t_pool_sync")(not_async)
    with pytest.raises(UnknownAgent):
        get_agent("t_pool_sync")


def test_agent_name_taken_by_another_function_raises() -> None:
    async def impostor(ctx: Context, inp: Any) -> None:
        return None

    with pytest.raises(ValueError, match="already taken"):
        agent("t_pool_slow")(impostor)
    assert get_agent("t_pool_slow").fn is slow_agent


def test_unknown_agent_name_lists_the_known_ones() -> None:
    with pytest.raises(UnknownAgent, match="t_pool_nobody") as info:
        get_agent("t_pool_nobody")
    assert "t_pool_slow" in str(info.value)


async def test_work_for_an_unregistered_agent_is_left_alone_by_default(ledger: Ledger) -> None:
    stranger, _ = await ledger.create_work("t_pool_nobody", {})
    known, _ = await ledger.create_work("t_pool_counted", {})
    async with hw.running_pool(ledger) as pool:
        assert (await hw.wait_for_state(ledger, known.id, pool=pool)).state == "succeeded"
        await asyncio.sleep(0.2)
        assert (await ledger.get_work(stranger.id)).state == "queued"
        assert not pool._running


async def test_pool_told_to_run_an_unregistered_agent_fails_its_work(ledger: Ledger) -> None:
    work = await hw.run_work(ledger, "t_pool_nobody", agents=frozenset({"t_pool_nobody"}))
    assert work.state == "failed"
    assert work.error["type"] == "UnknownAgent"
    assert "t_pool_nobody" in work.error["message"]


# ---- no false lease losses --------------------------------------------------------------------


def _plus_one(x: int) -> int:
    return x + 1


@agent("t_pool_quick")
async def quick_agent(ctx: Context, _inp: Any) -> int:
    x = await ctx.step("a", _plus_one, 0)
    x = await ctx.step("b", _plus_one, x)
    if x == 2:
        await ctx.sleep(0)  # parks and wakes: a second lease that ends on purpose
    return await ctx.step("c", _plus_one, x)


async def test_renewals_never_call_a_finishing_run_lost(
    ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    """Renewals every 50 ms race each item's own final write (and its parking in a wait):
    an item that lets go of its lease on purpose is not a lost lease."""
    from scheduler import SchedulerService

    ids = [(await ledger.create_work("t_pool_quick", None))[0].id for _ in range(60)]
    sched = SchedulerService(ledger, reaper_interval=60)
    sched_task = asyncio.create_task(sched.run())
    try:
        async with hw.running_pool(ledger, concurrency=8, lease_ttl=0.15) as pool:
            for work_id in ids:
                done = await hw.wait_for_state(ledger, work_id, pool=pool, timeout=30)
                assert (done.state, done.result) == ("succeeded", 3)
    finally:
        sched.stop()
        await sched_task
    lost = [r.getMessage() for r in caplog.records if "LeaseLost" in r.getMessage()]
    assert lost == []
