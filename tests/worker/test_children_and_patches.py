"""Child work (``ctx.spawn`` / ``ctx.join``) and code patches (``ctx.patched``).

Real ``WorkerPool`` instances against the real ledger (SQLite and PostgreSQL). Step executions
are counted per idempotency key in ``CALLS``; agent runs (replays included) in ``RUNS``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import helpers_worker as hw
import pytest

from ledger import Ledger
from worker import ChildFailed, Context, RetryPolicy, agent, current_step

ONE_TRY = RetryPolicy(max_attempts=1)

CALLS: dict[str, int] = {}
RUNS: dict[str, int] = {}
#: gates children wait on, by a token the test puts in their input
GATES: dict[str, asyncio.Event] = {}


def _count() -> int:
    key = current_step().idempotency_key
    CALLS[key] = CALLS.get(key, 0) + 1
    return CALLS[key]


def calls(work_id: str, seq: int) -> int:
    return CALLS.get(f"{work_id}:{seq}", 0)


def in_order(types: list[str], *expected: str) -> bool:
    it = iter(types)
    return all(any(t == e for t in it) for e in expected)


# ---- spawn and join ---------------------------------------------------------------------------


async def child_work(n: int, gate: str | None) -> int:
    _count()
    if gate is not None:
        await GATES[gate].wait()
    return n * 10


def boom() -> None:
    _count()
    raise RuntimeError("the child breaks")


@agent("t_children_child")
async def child_agent(ctx: Context, inp: dict[str, Any]) -> int:
    RUNS[ctx.work_id] = RUNS.get(ctx.work_id, 0) + 1
    if inp.get("fail"):
        await ctx.step("boom", boom, retry=ONE_TRY)
    return await ctx.step("work", child_work, inp["n"], inp.get("gate"))


@agent("t_children_parent")
async def parent_agent(ctx: Context, inp: dict[str, Any]) -> Any:
    RUNS[ctx.work_id] = RUNS.get(ctx.work_id, 0) + 1
    gate = inp.get("gate")
    a = await ctx.spawn("t_children_child", {"n": 1, "gate": gate})
    b = await ctx.spawn("t_children_child", {"n": 2, "gate": gate, "fail": inp.get("fail")})
    ra = await ctx.join(a)
    if inp.get("catch"):
        try:
            await ctx.join(b)
        except ChildFailed as exc:
            return {"caught": exc.state, "child": exc.child_id, "a": ra}
    rb = await ctx.join(b.work_id)  # a plain id works too
    return ra + rb


@pytest.fixture
def gate() -> Any:
    token = f"gate-{len(GATES)}"
    GATES[token] = asyncio.Event()
    yield token
    GATES.pop(token).set()


async def test_parent_spawns_and_joins_two_children(ledger: Ledger, gate: str) -> None:
    parent, _ = await ledger.create_work("t_children_parent", {"gate": gate})
    async with hw.running_pool(ledger) as pool:
        waiting = await hw.wait_for_state(ledger, parent.id, {"waiting"}, pool=pool)
        children = await ledger.list_children(parent.id)
        assert len(children) == 2
        assert all(c.parent_id == parent.id for c in children)
        assert waiting.wait_reason == f"join {children[0].id}"
        assert waiting.lease_owner is None  # a waiting parent holds no lease

        GATES[gate].set()
        done = await hw.wait_for_state(ledger, parent.id, pool=pool)

    assert done.state == "succeeded", done.error
    assert done.result == 10 + 20
    assert done.wait_reason is None
    children = await ledger.list_children(parent.id)
    assert len(children) == 2  # replaying the parent created no new children
    assert sorted(c.result for c in children) == [10, 20]
    assert all(c.state == "succeeded" for c in children)
    assert RUNS[parent.id] >= 2  # it did replay from the top after waiting
    assert all(calls(c.id, 1) == 1 for c in children)
    types = await hw.event_types(ledger, parent.id)
    assert in_order(types, "claimed", "waiting", "resumed", "claimed", "succeeded")
    waiting_event = next(e for e in await hw.events(ledger, parent.id) if e.type == "waiting")
    assert waiting_event.data["detail"]["child_id"] == children[0].id
    steps = await ledger.list_steps(parent.id)
    assert [s.name for s in steps] == [
        "spawn:t_children_child",
        "spawn:t_children_child",
        f"join:{children[0].id}",
        f"join:{children[1].id}",
    ]
    assert steps[0].output == {"work_id": children[0].id}
    assert [(s.status, s.attempt) for s in steps] == [("succeeded", 1)] * 4


async def test_joining_a_failed_child_raises_child_failed_and_fails_the_parent(
    ledger: Ledger,
) -> None:
    parent = await hw.run_work(ledger, "t_children_parent", {"fail": True})

    assert parent.state == "failed"
    assert parent.error["type"] == "ChildFailed"
    children = {c.result: c for c in await ledger.list_children(parent.id)}
    failed = children[None]
    assert failed.state == "failed"
    assert failed.parent_id == parent.id
    assert failed.id in parent.error["message"]
    assert "ended failed" in parent.error["message"]
    assert children[10].state == "succeeded"


async def test_parent_may_catch_child_failed(ledger: Ledger) -> None:
    parent = await hw.run_work(ledger, "t_children_parent", {"fail": True, "catch": True})

    assert parent.state == "succeeded", parent.error
    [failed] = [c for c in await ledger.list_children(parent.id) if c.state == "failed"]
    assert parent.result == {"caught": "failed", "child": failed.id, "a": 10}
    assert failed.error["type"] == "StepFailed"
    # the join's outcome is recorded: a replay raises the same ChildFailed without asking again
    join_b = (await ledger.list_steps(parent.id))[-1]
    assert join_b.name == f"join:{failed.id}"
    assert join_b.output["state"] == "failed"


# ---- patches ----------------------------------------------------------------------------------

#: whether ``t_patches_agent`` runs its new code (tests flip it while work is in flight)
NEW_CODE = {"on": False}


def plain(value: Any) -> Any:
    _count()
    return value


def fails_first(fail: bool) -> str:
    if _count() == 1 and fail:
        raise RuntimeError("the last step fails on its first execution")
    return "end"


@agent("t_patches_agent")
async def patched_agent(ctx: Context, inp: dict[str, Any]) -> list[Any]:
    one = await ctx.step("one", plain, 1)
    if NEW_CODE["on"] and await ctx.patched("v2"):
        mid = await ctx.step("new", plain, "new path")
    else:
        mid = await ctx.step("old", plain, "old path")
    end = await ctx.step("end", fails_first, bool(inp.get("fail_first")), retry=ONE_TRY)
    return [one, mid, end]


@pytest.fixture
def new_code() -> Any:
    yield NEW_CODE
    NEW_CODE["on"] = False


async def test_work_started_by_old_code_replays_the_old_path(
    ledger: Ledger, new_code: dict[str, bool]
) -> None:
    new_code["on"] = False
    work = await hw.run_work(ledger, "t_patches_agent", {"fail_first": True})
    assert work.state == "failed"

    new_code["on"] = True  # deploy the patched code, then retry the old work
    await ledger.retry_work(work.id)
    work = await hw.run_until(ledger, work.id)

    assert work.state == "succeeded", work.error
    assert work.result == [1, "old path", "end"]
    steps = await ledger.list_steps(work.id)
    assert [s.name for s in steps] == ["one", "old", "end"]  # no patch marker
    assert [calls(work.id, seq) for seq in (1, 2, 3)] == [1, 1, 2]


async def test_new_work_takes_the_patched_path_and_records_a_marker(
    ledger: Ledger, new_code: dict[str, bool]
) -> None:
    new_code["on"] = True
    work = await hw.run_work(ledger, "t_patches_agent", {"fail_first": True})
    assert work.state == "failed"
    steps = await ledger.list_steps(work.id)
    assert [(s.name, s.status) for s in steps] == [
        ("one", "succeeded"),
        ("patch:v2", "succeeded"),
        ("new", "succeeded"),
        ("end", "failed"),
    ]

    await ledger.retry_work(work.id)  # a replay that took the patch keeps taking it
    work = await hw.run_until(ledger, work.id)

    assert work.state == "succeeded", work.error
    assert work.result == [1, "new path", "end"]
    steps = await ledger.list_steps(work.id)
    assert [s.name for s in steps] == ["one", "patch:v2", "new", "end"]
    assert [calls(work.id, seq) for seq in (1, 3, 4)] == [1, 1, 2]  # seq 2 is the marker
