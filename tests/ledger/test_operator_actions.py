"""Operator control: pause, resume, cancel and retry, immediate or at the next step boundary,
and the illegal moves that must raise and change nothing.

Every test runs on SQLite and on PostgreSQL (the ``ledger`` fixture).
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from ledger import Claim, IllegalTransition, Ledger, StepWrite, WorkNotFound, WorkState, utcnow
from ledger.schema import Work


async def event_types(ledger: Ledger, work_id: str) -> list[str]:
    return [e.type for e in await ledger.list_events(work_id)]


async def count(ledger: Ledger, table: str) -> int:
    async with ledger.engines.read.connect() as conn:
        return (await conn.execute(sa.text(f"SELECT count(*) FROM {table}"))).scalar_one()


async def running(ledger: Ledger, **kw: object) -> Claim:
    await ledger.create_work("echo", **kw)  # type: ignore[arg-type]
    [claim] = await ledger.claim_work("w", limit=1, lease_ttl=30)
    return claim


async def succeeded(ledger: Ledger) -> Work:
    claim = await running(ledger)
    await ledger.complete_work(claim, "done")
    return await ledger.get_work(claim.work_id)


# ---- pause and resume -------------------------------------------------------------------------


async def test_pause_of_queued_work_is_immediate_and_resume_requeues_it(ledger: Ledger) -> None:
    work, _ = await ledger.create_work("echo")

    paused = await ledger.pause_work(work.id, actor="alice")

    assert (paused.state, paused.paused_from) == ("paused", "queued")
    assert (await ledger.get_work(work.id)).state == "paused"
    assert await ledger.claim_work("w", limit=1, lease_ttl=30) == []

    resumed = await ledger.resume_work(work.id, actor="bob")

    assert (resumed.state, resumed.paused_from) == ("queued", None)
    events = await ledger.list_events(work.id)
    assert [e.type for e in events] == ["created", "paused", "resumed"]
    assert [e.actor for e in events] == [None, "alice", "bob"]
    assert (events[1].data["from"], events[1].data["to"]) == ("queued", "paused")
    [claim] = await ledger.claim_work("w", limit=1, lease_ttl=30)
    assert (claim.work_id, claim.attempt, claim.epoch) == (work.id, 1, 1)


async def test_pause_of_running_work_is_a_request_the_worker_acknowledges(
    ledger: Ledger,
) -> None:
    claim = await running(ledger)

    requested = await ledger.pause_work(claim.work_id, actor="alice")

    assert (requested.state, requested.control) == ("running", "pause")
    assert requested.lease_owner == "w"
    events = await ledger.list_events(claim.work_id)
    assert [e.type for e in events] == ["created", "claimed", "pause_requested"]
    assert events[-1].actor == "alice"
    assert await ledger.renew_leases("w", lease_ttl=30) == {claim.work_id: (1, "pause")}

    assert await ledger.acknowledge_control(claim) is WorkState.PAUSED

    paused = await ledger.get_work(claim.work_id)
    assert (paused.state, paused.paused_from, paused.control) == ("paused", "running", None)
    assert paused.lease_owner is None and paused.lease_expires_at is None
    assert paused.finished_at is None
    assert await event_types(ledger, claim.work_id) == [
        "created",
        "claimed",
        "pause_requested",
        "paused",
    ]
    await ledger.resume_work(claim.work_id)
    [again] = await ledger.claim_work("w", limit=1, lease_ttl=30)
    assert (again.attempt, again.epoch, again.control) == (1, 2, None)


async def test_cancel_of_running_work_is_a_request_the_worker_acknowledges(
    ledger: Ledger,
) -> None:
    claim = await running(ledger)

    requested = await ledger.cancel_work(claim.work_id, actor="ops")

    assert (requested.state, requested.control) == ("running", "cancel")
    assert await ledger.acknowledge_control(claim) is WorkState.CANCELLED

    cancelled = await ledger.get_work(claim.work_id)
    assert (cancelled.state, cancelled.control, cancelled.lease_owner) == ("cancelled", None, None)
    assert cancelled.finished_at is not None and cancelled.finished_at.tzinfo is not None
    assert await event_types(ledger, claim.work_id) == [
        "created",
        "claimed",
        "cancel_requested",
        "cancelled",
    ]


async def test_acknowledge_without_a_request_raises_and_keeps_running(ledger: Ledger) -> None:
    claim = await running(ledger)

    with pytest.raises(IllegalTransition, match="no request pending"):
        await ledger.acknowledge_control(claim)

    assert (await ledger.get_work(claim.work_id)).state == "running"
    assert await event_types(ledger, claim.work_id) == ["created", "claimed"]


async def test_waiting_work_paused_and_resumed_runs_again(ledger: Ledger) -> None:
    """Resume queues the item: its replay goes back to waiting if the wait is still open, or
    carries on if it was resolved while paused (so a resume can never strand it)."""
    parent = await running(ledger)
    child_id = await ledger.spawn_child(parent, 1, "research", None, max_attempts=1)
    await ledger.suspend_for_child(parent, child_id)

    paused = await ledger.pause_work(parent.work_id)
    assert (paused.state, paused.paused_from) == ("paused", "waiting")

    resumed = await ledger.resume_work(parent.work_id)
    assert (resumed.state, resumed.wait_reason, resumed.paused_from) == ("queued", None, None)
    assert await event_types(ledger, parent.work_id) == [
        "created",
        "claimed",
        "waiting",
        "paused",
        "resumed",
    ]


# ---- cancel -----------------------------------------------------------------------------------


async def test_cancel_of_queued_work_is_immediate(ledger: Ledger) -> None:
    work, _ = await ledger.create_work("echo")

    cancelled = await ledger.cancel_work(work.id, actor="ops")

    assert cancelled.state == "cancelled"
    assert cancelled.finished_at is not None
    assert await ledger.claim_work("w", limit=1, lease_ttl=30) == []
    events = await ledger.list_events(work.id)
    assert [e.type for e in events] == ["created", "cancelled"]
    assert events[-1].actor == "ops"


async def test_cancel_of_paused_work_is_immediate(ledger: Ledger) -> None:
    work, _ = await ledger.create_work("echo")
    await ledger.pause_work(work.id)

    assert (await ledger.cancel_work(work.id)).state == "cancelled"
    assert await event_types(ledger, work.id) == ["created", "paused", "cancelled"]


# ---- retry ------------------------------------------------------------------------------------


async def test_retry_of_failed_work_requeues_it_and_keeps_its_steps(ledger: Ledger) -> None:
    claim = await running(ledger, max_attempts=3)
    now = utcnow()
    key = f"{claim.work_id}:0"
    await ledger.record_step(
        claim, StepWrite(0, "plan", 1, key, now, status="succeeded", output={"p": 1})
    )
    await ledger.record_step(
        claim,
        StepWrite(1, "act", 1, f"{claim.work_id}:1", now, status="failed", error={"type": "E"}),
    )
    await ledger.fail_work(claim, {"type": "E", "message": "boom"})

    retried = await ledger.retry_work(claim.work_id, actor="ops")

    assert (retried.state, retried.attempt, retried.max_attempts) == ("queued", 2, 3)
    assert retried.finished_at is None
    steps = await ledger.load_steps(claim.work_id)
    assert sorted(steps) == [0, 1]
    assert (steps[0].status, steps[0].output) == ("succeeded", {"p": 1})
    assert steps[1].status == "failed"
    events = await ledger.list_events(claim.work_id)
    assert [e.type for e in events][-2:] == ["failed", "retried"]
    assert events[-1].actor == "ops"
    [again] = await ledger.claim_work("w", limit=1, lease_ttl=30)
    assert (again.attempt, again.epoch) == (2, 2)


async def test_retry_grants_an_attempt_beyond_max_attempts(ledger: Ledger) -> None:
    claim = await running(ledger, max_attempts=1)
    await ledger.fail_work(claim, {"type": "E", "message": "boom"})

    retried = await ledger.retry_work(claim.work_id)

    assert (retried.state, retried.attempt, retried.max_attempts) == ("queued", 2, 2)


async def test_retry_of_cancelled_work_requeues_it(ledger: Ledger) -> None:
    work, _ = await ledger.create_work("echo")
    await ledger.cancel_work(work.id)

    retried = await ledger.retry_work(work.id)

    assert (retried.state, retried.attempt, retried.finished_at) == ("queued", 2, None)


# ---- illegal moves and unknown ids ------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "setup", "current", "target"),
    [
        ("resume_work", "succeeded", "succeeded", "queued"),
        ("cancel_work", "succeeded", "succeeded", "cancelled"),
        ("pause_work", "succeeded", "succeeded", "paused"),
        ("retry_work", "succeeded", "succeeded", "queued"),
        ("retry_work", "queued", "queued", "queued"),
        ("resume_work", "queued", "queued", "queued"),
        ("retry_work", "running", "running", "queued"),
        ("resume_work", "running", "running", "queued"),
    ],
)
async def test_an_illegal_operator_action_raises_and_changes_nothing(
    ledger: Ledger, action: str, setup: str, current: str, target: str
) -> None:
    if setup == "succeeded":
        work = await succeeded(ledger)
    elif setup == "running":
        work = await ledger.get_work((await running(ledger)).work_id)
    else:
        work, _ = await ledger.create_work("echo")
    events_before = await count(ledger, "event")

    with pytest.raises(IllegalTransition) as info:
        await getattr(ledger, action)(work.id, actor="ops")

    assert (info.value.current, info.value.target) == (current, target)
    assert f"is {current}; it cannot become {target}" in str(info.value)
    assert work.id in str(info.value)
    after = await ledger.get_work(work.id)
    assert (after.state, after.updated_at, after.attempt) == (current, work.updated_at, 1)
    assert after.control is None
    assert await count(ledger, "event") == events_before


@pytest.mark.parametrize("action", ["pause_work", "resume_work", "cancel_work", "retry_work"])
async def test_an_action_on_an_unknown_id_raises_work_not_found(
    ledger: Ledger, action: str
) -> None:
    with pytest.raises(WorkNotFound) as info:
        await getattr(ledger, action)("no-such-work")

    assert info.value.work_id == "no-such-work"
    assert await count(ledger, "event") == 0


async def test_a_pending_cancel_is_not_downgraded_to_a_pause(ledger: Ledger) -> None:
    claim = await running(ledger)
    await ledger.cancel_work(claim.work_id, actor="alice")

    with pytest.raises(IllegalTransition, match="cancel is already requested"):
        await ledger.pause_work(claim.work_id, actor="bob")

    work = await ledger.get_work(claim.work_id)
    assert (work.state, work.control) == ("running", "cancel")
    assert await ledger.acknowledge_control(claim) is WorkState.CANCELLED
