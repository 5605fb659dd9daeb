"""Durability modes in a real worker pool: when step records become durable.

``exit`` records stay in memory until the item finishes, fails or waits; ``batched`` records go
to the process's group commit; ``sync`` records are durable before ``step`` returns, and
several items committing at once share transactions. Semantic boundaries (a ``side_effect``
step, a reply, a wait, a spawn) flush first. Every test runs on SQLite and PostgreSQL; the
crash behaviour is in ``tests/chaos/test_durability_modes.py``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import helpers_worker as hw
import pytest

from ledger import Ledger
from worker import Context, agent

#: per work id: released by the test to let a blocked agent go on
GATES: dict[str, asyncio.Event] = {}
#: per work id: how many step records the ledger held when a side effect ran
SEEN_AT_EFFECT: dict[str, int] = {}
LEDGERS: dict[str, Ledger] = {}


def _inc(x: int) -> int:
    return x + 1


async def _gate(work_id: str) -> None:
    await GATES.setdefault(work_id, asyncio.Event()).wait()


async def _count_records(work_id: str) -> int:
    n = len(await LEDGERS[work_id].list_steps(work_id))
    SEEN_AT_EFFECT[work_id] = n
    return n


async def five_then_gate(ctx: Context, _: Any) -> int:
    x = 0
    for _i in range(5):
        x = await ctx.step("inc", _inc, x)
    await _gate(ctx.work_id)  # not a step: the records of the five are what they are
    for _i in range(5):
        x = await ctx.step("inc", _inc, x)
    return x


agent("dur_exit_gate", durability="exit")(five_then_gate)
agent("dur_batched_gate", durability="batched")(five_then_gate)


@agent("dur_exit_effect", durability="exit")
async def exit_effect(ctx: Context, _: Any) -> int:
    x = 0
    for _i in range(4):
        x = await ctx.step("inc", _inc, x)
    seen = await ctx.step("effect", _count_records, ctx.work_id, side_effect=True)
    x = await ctx.step("inc", _inc, x)
    await ctx.reply(f"x={x}")
    await _gate(ctx.work_id)
    return seen


@agent("dur_exit_wait", durability="exit")
async def exit_wait(ctx: Context, _: Any) -> Any:
    x = 0
    for _i in range(3):
        x = await ctx.step("inc", _inc, x)
    data = await ctx.wait_for_signal("go", key=ctx.work_id)
    return {"x": x, "data": data}


@agent("dur_exit_fails", durability="exit")
async def exit_fails(ctx: Context, _: Any) -> None:
    for _i in range(3):
        await ctx.step("inc", _inc, 0)
    raise RuntimeError("boom after three steps")


@agent("dur_sync_step_exit")
async def sync_agent_exit_step(ctx: Context, _: Any) -> int:
    x = await ctx.step("inc", _inc, 0)
    x = await ctx.step("held", _inc, x, durability="exit")
    await _gate(ctx.work_id)
    return await ctx.step("inc", _inc, x)


@agent("dur_sync_many")
async def sync_many(ctx: Context, n: int) -> int:
    x = 0
    for _i in range(n):
        x = await ctx.step("inc", _inc, x)
    return x


agent("dur_batched_many", durability="batched")(sync_many)


async def start(ledger: Ledger, name: str) -> str:
    work, _ = await ledger.create_work(name, None)
    LEDGERS[work.id] = ledger
    GATES[work.id] = asyncio.Event()
    return work.id


async def n_steps(ledger: Ledger, work_id: str) -> int:
    return len(await ledger.list_steps(work_id))


async def test_exit_mode_keeps_records_in_memory_until_the_item_finishes(ledger: Ledger) -> None:
    work_id = await start(ledger, "dur_exit_gate")
    async with hw.running_pool(ledger) as pool:
        await hw.wait_for_state(ledger, work_id, {"running"}, pool=pool)
        await asyncio.sleep(0.3)  # five steps done and blocked at the gate
        assert await n_steps(ledger, work_id) == 0
        GATES[work_id].set()
        work = await hw.wait_for_state(ledger, work_id, pool=pool)
    assert (work.state, work.result) == ("succeeded", 10)
    steps = await hw.steps_by_seq(ledger, work_id)
    assert sorted(steps) == list(range(1, 11))
    assert {s.durability for s in steps.values()} == {"exit"}
    assert all(s.committed_at is not None and s.committed_at >= s.finished_at
               for s in steps.values())  # fmt: skip


async def test_batched_records_commit_within_the_group_commit_window(ledger: Ledger) -> None:
    work_id = await start(ledger, "dur_batched_gate")
    async with hw.running_pool(ledger, group_commit_ms=20) as pool:
        await hw.wait_for_state(ledger, work_id, {"running"}, pool=pool)
        # blocked at the gate: the five records commit within the window, with no boundary
        await hw.wait_until(lambda: _has(ledger, work_id, 5), timeout=5, what="5 records")
        GATES[work_id].set()
        work = await hw.wait_for_state(ledger, work_id, pool=pool)
    assert work.result == 10
    steps = await hw.steps_by_seq(ledger, work_id)
    assert {s.durability for s in steps.values()} == {"batched"}


async def _has(ledger: Ledger, work_id: str, n: int) -> bool:
    return await n_steps(ledger, work_id) >= n


async def test_a_side_effect_step_and_a_reply_flush_what_is_pending(ledger: Ledger) -> None:
    work_id = await start(ledger, "dur_exit_effect")
    async with hw.running_pool(ledger) as pool:
        await hw.wait_for_state(ledger, work_id, {"running"}, pool=pool)
        await hw.wait_until(lambda: work_id in SEEN_AT_EFFECT, what="the side effect")
        await asyncio.sleep(0.2)  # reply sent, blocked at the gate
        # the four pure steps were durable when the effect ran; the effect's own record,
        # the fifth pure step and the reply's record are durable now (the reply flushed)
        assert SEEN_AT_EFFECT[work_id] == 4
        steps = await hw.steps_by_seq(ledger, work_id)
        assert sorted(steps) == [1, 2, 3, 4, 5, 6, 7]
        assert steps[5].name == "effect" and steps[5].durability == "sync"
        assert steps[6].durability == "exit" and steps[7].name == "reply"
        GATES[work_id].set()
        work = await hw.wait_for_state(ledger, work_id, pool=pool)
    assert (work.state, work.result) == ("succeeded", 4)


async def test_entering_a_wait_flushes_and_the_item_resumes_from_the_records(
    ledger: Ledger,
) -> None:
    work, _ = await ledger.create_work("dur_exit_wait", None)
    async with hw.running_pool(ledger) as pool:
        await hw.wait_for_state(ledger, work.id, {"waiting"}, pool=pool)
        steps = await hw.steps_by_seq(ledger, work.id)
        assert [steps[s].durability for s in (1, 2, 3)] == ["exit"] * 3
        await ledger.resolve_signal("go", work.id, {"ok": True})
        done = await hw.wait_for_state(ledger, work.id, pool=pool)
    assert done.result == {"x": 3, "data": {"ok": True}}


async def test_a_failing_item_still_records_its_exit_mode_steps(ledger: Ledger) -> None:
    work = await hw.run_work(ledger, "dur_exit_fails")
    assert work.state == "failed" and "boom" in str(work.error)
    assert await n_steps(ledger, work.id) == 3


async def test_a_step_can_override_its_agents_durability(ledger: Ledger) -> None:
    work_id = await start(ledger, "dur_sync_step_exit")
    async with hw.running_pool(ledger) as pool:
        await hw.wait_for_state(ledger, work_id, {"running"}, pool=pool)
        await asyncio.sleep(0.3)
        steps = await hw.steps_by_seq(ledger, work_id)
        assert sorted(steps) == [1]  # the held step is still in memory
        GATES[work_id].set()
        await hw.wait_for_state(ledger, work_id, pool=pool)
    steps = await hw.steps_by_seq(ledger, work_id)
    assert [steps[s].durability for s in (1, 2, 3)] == ["sync", "exit", "sync"]


@pytest.mark.parametrize("name", ["dur_sync_many", "dur_batched_many"])
async def test_concurrent_items_share_group_commits(ledger: Ledger, name: str) -> None:
    ids = [(await ledger.create_work(name, 60))[0].id for _ in range(8)]
    async with hw.running_pool(ledger, concurrency=8) as pool:
        for work_id in ids:
            work = await hw.wait_for_state(ledger, work_id, pool=pool)
            assert (work.state, work.result) == ("succeeded", 60)
        stats = pool.committer.stats
    assert stats.records == 8 * 60
    # sharing happened: fewer transactions than records, and some carried several items
    assert stats.transactions < stats.records and stats.largest > 1, stats


def test_an_unknown_durability_is_refused() -> None:
    with pytest.raises(ValueError, match="durability must be one of"):
        agent("dur_bad", durability="eventually")(sync_many)


@agent("dur_bad_step")
async def bad_step(ctx: Context, _: Any) -> int:
    return await ctx.step("inc", _inc, 0, durability="never")


async def test_an_unknown_step_durability_fails_the_item_clearly(ledger: Ledger) -> None:
    work = await hw.run_work(ledger, "dur_bad_step")
    assert work.state == "failed"
    assert "durability must be one of" in str(work.error)
