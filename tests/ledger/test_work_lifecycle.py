"""Work items from creation to a finished state: dedup, claims and their order, completion,
failure and retry scheduling, child work and joins, and the history every transition writes.

Every test runs on SQLite and on PostgreSQL (the ``ledger`` fixture).
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa

from ledger import Ledger, StepWrite, WorkNotFound, WorkState, utcnow


async def event_types(ledger: Ledger, work_id: str) -> list[str]:
    return [e.type for e in await ledger.list_events(work_id)]


async def count(ledger: Ledger, table: str) -> int:
    async with ledger.engines.read.connect() as conn:
        return (await conn.execute(sa.text(f"SELECT count(*) FROM {table}"))).scalar_one()


# ---- create_work ------------------------------------------------------------------------------


async def test_create_work_returns_a_queued_item_on_attempt_one(ledger: Ledger) -> None:
    work, created = await ledger.create_work(
        "echo", {"text": "hi"}, conversation_id="c1", priority=3, max_attempts=4, actor="alice"
    )

    assert created is True
    assert (work.state, work.attempt, work.max_attempts, work.lease_epoch) == ("queued", 1, 4, 0)
    stored = await ledger.get_work(work.id)
    assert stored.state == "queued"
    assert stored.agent == "echo"
    assert stored.input == {"text": "hi"}
    assert (stored.attempt, stored.max_attempts, stored.priority) == (1, 4, 3)
    assert stored.conversation_id == "c1"
    assert stored.lease_owner is None and stored.lease_expires_at is None
    assert stored.created_at.tzinfo is not None and stored.updated_at.tzinfo is not None
    assert stored.created_at == work.created_at
    events = await ledger.list_events(work.id)
    assert [e.type for e in events] == ["created"]
    assert events[0].data["to"] == "queued"
    assert events[0].data["agent"] == "echo"
    assert events[0].actor == "alice"
    assert events[0].created_at.tzinfo is not None


async def test_create_work_deduplicates_on_source_and_event_id(ledger: Ledger) -> None:
    first, created1 = await ledger.create_work(
        "echo", {"n": 1}, source="telegram", source_event_id="42"
    )
    second, created2 = await ledger.create_work(
        "echo", {"n": 2}, source="telegram", source_event_id="42"
    )

    assert (created1, created2) == (True, False)
    assert second.id == first.id
    assert second.input == {"n": 1}
    assert second.state == "queued"
    assert await count(ledger, "work") == 1
    assert await event_types(ledger, first.id) == ["created"]
    assert await count(ledger, "event") == 1

    # the same event id from another source is a different item
    other, created3 = await ledger.create_work(
        "echo", {"n": 3}, source="slack", source_event_id="42"
    )
    assert created3 is True and other.id != first.id
    assert await count(ledger, "work") == 2


async def test_create_work_rejects_half_a_dedup_key(ledger: Ledger) -> None:
    with pytest.raises(ValueError, match="source and source_event_id"):
        await ledger.create_work("echo", source="telegram")
    with pytest.raises(ValueError, match="source and source_event_id"):
        await ledger.create_work("echo", source_event_id="42")
    with pytest.raises(ValueError, match="max_attempts"):
        await ledger.create_work("echo", max_attempts=0)
    assert await count(ledger, "work") == 0
    assert await count(ledger, "event") == 0


async def test_get_work_of_an_unknown_id_raises(ledger: Ledger) -> None:
    with pytest.raises(WorkNotFound) as info:
        await ledger.get_work("nope")
    assert info.value.work_id == "nope"


# ---- claim_work -------------------------------------------------------------------------------


async def test_claim_sets_the_lease_and_each_claim_bumps_the_epoch(ledger: Ledger) -> None:
    work, _ = await ledger.create_work("echo", {"x": 1}, conversation_id="c9")
    before = utcnow()
    [claim] = await ledger.claim_work("w1", limit=1, lease_ttl=30)
    after = utcnow()

    assert claim.work_id == work.id
    assert (claim.agent, claim.input, claim.conversation_id) == ("echo", {"x": 1}, "c9")
    assert (claim.epoch, claim.attempt, claim.owner, claim.control) == (1, 1, "w1", None)
    stored = await ledger.get_work(work.id)
    assert stored.state == "running"
    assert (stored.lease_owner, stored.lease_epoch) == ("w1", 1)
    assert stored.lease_expires_at.tzinfo is not None
    assert before + timedelta(seconds=30) <= stored.lease_expires_at
    assert stored.lease_expires_at <= after + timedelta(seconds=30)

    await ledger.release_work(claim)
    released = await ledger.get_work(work.id)
    assert (released.state, released.attempt, released.lease_owner) == ("queued", 1, None)
    assert released.lease_expires_at is None

    [again] = await ledger.claim_work("w2", limit=1, lease_ttl=30)
    assert (again.work_id, again.epoch, again.attempt, again.owner) == (work.id, 2, 1, "w2")
    assert (await ledger.get_work(work.id)).lease_epoch == 2
    assert await event_types(ledger, work.id) == ["created", "claimed", "released", "claimed"]


async def test_claim_respects_limit(ledger: Ledger) -> None:
    ids = {(await ledger.create_work("echo", i))[0].id for i in range(5)}

    assert await ledger.claim_work("w", limit=0, lease_ttl=30) == []
    first = await ledger.claim_work("w", limit=2, lease_ttl=30)
    rest = await ledger.claim_work("w", limit=10, lease_ttl=30)
    assert (len(first), len(rest)) == (2, 3)
    assert {c.work_id for c in first} | {c.work_id for c in rest} == ids
    assert await ledger.claim_work("w", limit=10, lease_ttl=30) == []
    assert (await ledger.count_by_state())["running"] == 5


async def test_claim_filters_by_agent(ledger: Ledger) -> None:
    a, _ = await ledger.create_work("alpha")
    b1, _ = await ledger.create_work("beta")
    b2, _ = await ledger.create_work("beta")

    claims = await ledger.claim_work("w", limit=10, lease_ttl=30, agents=["beta"])
    assert sorted(c.work_id for c in claims) == sorted([b1.id, b2.id])
    assert {c.agent for c in claims} == {"beta"}
    assert await ledger.claim_work("w", limit=10, lease_ttl=30, agents=["gamma"]) == []
    assert await ledger.claim_work("w", limit=10, lease_ttl=30, agents=[]) == []
    assert (await ledger.get_work(a.id)).state == "queued"
    [last] = await ledger.claim_work("w", limit=10, lease_ttl=30, agents=["alpha", "gamma"])
    assert last.work_id == a.id


async def test_claim_skips_items_not_due_yet(ledger: Ledger) -> None:
    later = utcnow() + timedelta(hours=1)
    future, _ = await ledger.create_work("echo", "later", not_before=later)
    due, _ = await ledger.create_work("echo", "now", not_before=utcnow() - timedelta(seconds=1))

    claims = await ledger.claim_work("w", limit=10, lease_ttl=30)
    assert [c.work_id for c in claims] == [due.id]
    waiting = await ledger.get_work(future.id)
    assert waiting.state == "queued"
    assert waiting.not_before == later
    assert waiting.not_before.tzinfo is not None
    assert (await ledger.get_work(due.id)).not_before is None  # cleared by the claim


async def test_claim_orders_by_priority_then_age(ledger: Ledger) -> None:
    low, _ = await ledger.create_work("echo", "low", priority=0)
    high_old, _ = await ledger.create_work("echo", "high-old", priority=5)
    mid, _ = await ledger.create_work("echo", "mid", priority=1)
    high_new, _ = await ledger.create_work("echo", "high-new", priority=5)

    order = []
    for _ in range(4):
        [claim] = await ledger.claim_work("w", limit=1, lease_ttl=30)
        order.append(claim.work_id)
    assert order == [high_old.id, high_new.id, mid.id, low.id]


# ---- complete_work and fail_work --------------------------------------------------------------


async def test_complete_work_stores_the_result_and_releases_the_lease(ledger: Ledger) -> None:
    work, _ = await ledger.create_work("echo")
    [claim] = await ledger.claim_work("w", limit=1, lease_ttl=30)

    await ledger.complete_work(claim, {"answer": 42, "words": ["ünïcode", "✓"]})

    done = await ledger.get_work(work.id)
    assert done.state == "succeeded"
    assert done.result == {"answer": 42, "words": ["ünïcode", "✓"]}
    assert done.lease_owner is None and done.lease_expires_at is None
    assert done.finished_at is not None and done.finished_at.tzinfo is not None
    assert done.lease_epoch == 1
    assert await event_types(ledger, work.id) == ["created", "claimed", "succeeded"]
    assert await ledger.claim_work("w", limit=1, lease_ttl=30) == []


async def test_fail_work_with_retry_at_requeues_for_the_next_attempt(ledger: Ledger) -> None:
    work, _ = await ledger.create_work("echo", max_attempts=3)
    [claim] = await ledger.claim_work("w", limit=1, lease_ttl=30)
    retry_at = utcnow() + timedelta(hours=1)
    error = {"type": "TimeoutError", "message": "model did not answer"}

    state = await ledger.fail_work(claim, error, retry_at=retry_at)

    assert state is WorkState.QUEUED
    again = await ledger.get_work(work.id)
    assert (again.state, again.attempt, again.max_attempts) == ("queued", 2, 3)
    assert again.not_before == retry_at
    assert again.error == error
    assert again.finished_at is None and again.lease_owner is None
    events = await ledger.list_events(work.id)
    assert [e.type for e in events] == ["created", "claimed", "retried"]
    assert events[-1].data["detail"]["error"] == "TimeoutError: model did not answer"
    assert events[-1].data["attempt"] == 2
    # not due before retry_at
    assert await ledger.claim_work("w", limit=1, lease_ttl=30) == []


async def test_fail_work_without_retry_at_fails_and_keeps_the_error(ledger: Ledger) -> None:
    work, _ = await ledger.create_work("echo", max_attempts=3)
    [claim] = await ledger.claim_work("w", limit=1, lease_ttl=30)
    error = {"type": "ValueError", "message": "bad input", "traceback": ["a", "b"]}

    state = await ledger.fail_work(claim, error)

    assert state is WorkState.FAILED
    failed = await ledger.get_work(work.id)
    assert (failed.state, failed.attempt) == ("failed", 1)
    assert failed.error == error
    assert failed.finished_at is not None and failed.finished_at.tzinfo is not None
    assert failed.lease_owner is None
    events = await ledger.list_events(work.id)
    assert [e.type for e in events] == ["created", "claimed", "failed"]
    assert events[-1].data["detail"]["error"] == "ValueError: bad input"


async def test_fail_work_on_the_last_attempt_fails_even_with_retry_at(ledger: Ledger) -> None:
    work, _ = await ledger.create_work("echo", max_attempts=1)
    [claim] = await ledger.claim_work("w", limit=1, lease_ttl=30)

    state = await ledger.fail_work(
        claim, {"type": "E", "message": "m"}, retry_at=utcnow() + timedelta(seconds=5)
    )

    assert state is WorkState.FAILED
    failed = await ledger.get_work(work.id)
    assert (failed.state, failed.attempt, failed.not_before) == ("failed", 1, None)
    assert await event_types(ledger, work.id) == ["created", "claimed", "failed"]


# ---- children ---------------------------------------------------------------------------------


async def test_spawn_child_creates_the_child_once_per_step(ledger: Ledger) -> None:
    parent, _ = await ledger.create_work("planner")
    [claim] = await ledger.claim_work("w", limit=1, lease_ttl=30)

    child_id = await ledger.spawn_child(claim, 3, "research", {"q": "x"}, max_attempts=2)
    again = await ledger.spawn_child(claim, 3, "research", {"q": "other"}, max_attempts=2)
    other = await ledger.spawn_child(claim, 4, "research", {"q": "y"}, max_attempts=2)

    assert again == child_id
    assert other != child_id
    children = await ledger.list_children(parent.id)
    assert [c.id for c in children] == [child_id, other]
    child = await ledger.get_work(child_id)
    assert (child.parent_id, child.agent, child.input) == (parent.id, "research", {"q": "x"})
    assert (child.state, child.attempt, child.max_attempts) == ("queued", 1, 2)
    assert await event_types(ledger, child_id) == ["created"]
    assert await event_types(ledger, parent.id) == ["created", "claimed"]


async def test_suspend_for_child_waits_and_the_child_finishing_wakes_the_parent(
    ledger: Ledger,
) -> None:
    parent, _ = await ledger.create_work("planner")
    [claim] = await ledger.claim_work("w", limit=1, lease_ttl=30, agents=["planner"])
    child_id = await ledger.spawn_child(claim, 1, "research", None, max_attempts=1)

    assert await ledger.suspend_for_child(claim, child_id) is None
    waiting = await ledger.get_work(parent.id)
    assert waiting.state == "waiting"
    assert waiting.wait_reason == f"join {child_id}"
    assert waiting.lease_owner is None

    [child_claim] = await ledger.claim_work("w", limit=5, lease_ttl=30)
    assert (child_claim.work_id, child_claim.parent_id) == (child_id, parent.id)
    await ledger.complete_work(child_claim, {"found": 7})

    woken = await ledger.get_work(parent.id)
    assert (woken.state, woken.wait_reason, woken.attempt) == ("queued", None, 1)
    events = await ledger.list_events(parent.id)
    assert [e.type for e in events] == ["created", "claimed", "waiting", "resumed"]
    assert events[-1].data["detail"]["child_id"] == child_id
    [resumed] = await ledger.claim_work("w", limit=1, lease_ttl=30)
    assert (resumed.work_id, resumed.epoch) == (parent.id, 2)


async def test_a_failed_child_wakes_the_parent_too(ledger: Ledger) -> None:
    parent, _ = await ledger.create_work("planner")
    [claim] = await ledger.claim_work("w", limit=1, lease_ttl=30)
    child_id = await ledger.spawn_child(claim, 1, "research", None, max_attempts=1)
    await ledger.suspend_for_child(claim, child_id)
    [child_claim] = await ledger.claim_work("w", limit=1, lease_ttl=30)

    await ledger.fail_work(child_claim, {"type": "E", "message": "no"})

    assert (await ledger.get_work(parent.id)).state == "queued"
    assert (await event_types(ledger, parent.id))[-1] == "resumed"


async def test_suspend_for_a_finished_child_returns_it_and_writes_nothing(ledger: Ledger) -> None:
    parent, _ = await ledger.create_work("planner")
    [claim] = await ledger.claim_work("w", limit=1, lease_ttl=30, agents=["planner"])
    child_id = await ledger.spawn_child(claim, 1, "research", None, max_attempts=1)
    [child_claim] = await ledger.claim_work("w", limit=1, lease_ttl=30, agents=["research"])
    await ledger.complete_work(child_claim, "done")
    before = await ledger.get_work(parent.id)
    events_before = await count(ledger, "event")

    child = await ledger.suspend_for_child(claim, child_id)

    assert child is not None
    assert (child.id, child.state, child.result) == (child_id, "succeeded", "done")
    after = await ledger.get_work(parent.id)
    assert (after.state, after.updated_at, after.lease_owner) == ("running", before.updated_at, "w")
    assert await count(ledger, "event") == events_before


async def test_suspend_for_an_unknown_child_raises(ledger: Ledger) -> None:
    await ledger.create_work("planner")
    [claim] = await ledger.claim_work("w", limit=1, lease_ttl=30)
    with pytest.raises(WorkNotFound):
        await ledger.suspend_for_child(claim, "missing")
    assert (await ledger.get_work(claim.work_id)).state == "running"


# ---- history ----------------------------------------------------------------------------------


async def test_a_full_run_appends_exactly_one_event_per_transition(ledger: Ledger) -> None:
    work, _ = await ledger.create_work("echo", {"text": "hi"})
    [claim] = await ledger.claim_work("w", limit=1, lease_ttl=30)
    for seq, name in enumerate(["plan", "act"]):
        start = utcnow()
        key = f"{work.id}:{seq}"
        await ledger.record_step_running(claim, StepWrite(seq, name, 1, key, start))
        await ledger.record_step_running(  # a heartbeat is not a transition
            claim, StepWrite(seq, name, 1, key, start, progress=0.5), heartbeat_at=utcnow()
        )
        await ledger.record_step(
            claim,
            StepWrite(
                seq, name, 1, key, start, status="succeeded", output=seq, finished_at=utcnow()
            ),
        )
    await ledger.renew_leases("w", lease_ttl=30)  # neither is a lease renewal
    await ledger.complete_work(claim, "ok")

    events = await ledger.list_events(work.id)
    assert [e.type for e in events] == [
        "created",
        "claimed",
        "step_started",
        "step_completed",
        "step_started",
        "step_completed",
        "succeeded",
    ]
    assert [e.data.get("to") for e in events] == [
        "queued",
        "running",
        None,
        None,
        None,
        None,
        "succeeded",
    ]
    assert [e.data.get("seq") for e in events[2:6]] == [0, 0, 1, 1]
    assert events[1].data["epoch"] == 1 and events[1].data["owner"] == "w"
    assert events[-1].data["from"] == "running"
    ids = [e.id for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(e.created_at.tzinfo is not None for e in events)
    assert [e.id for e in await ledger.list_events(work.id, after=ids[3])] == ids[4:]
    assert await count(ledger, "event") == 7
