"""Leases: concurrent claims, fencing of a zombie worker's writes, renewal and reaping.

Every test runs on SQLite and on PostgreSQL (the ``ledger`` fixture). An expired lease is made
the honest way: claim with a tiny ``lease_ttl``, sleep past it, run ``reap_expired_leases``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta

import pytest
import sqlalchemy as sa

from ledger import Claim, LeaseLost, Ledger, StepWrite, utcnow

TINY_TTL = 0.01


async def event_types(ledger: Ledger, work_id: str) -> list[str]:
    return [e.type for e in await ledger.list_events(work_id)]


async def count(ledger: Ledger, table: str) -> int:
    async with ledger.engines.read.connect() as conn:
        return (await conn.execute(sa.text(f"SELECT count(*) FROM {table}"))).scalar_one()


async def claim_and_expire(ledger: Ledger, owner: str = "zombie") -> Claim:
    """Claim one item with a lease that is already over when this returns."""
    [claim] = await ledger.claim_work(owner, limit=1, lease_ttl=TINY_TTL)
    await asyncio.sleep(TINY_TTL * 5)
    return claim


def step(claim: Claim, seq: int, status: str = "running", **kw: object) -> StepWrite:
    return StepWrite(
        seq, f"step{seq}", claim.attempt, f"{claim.work_id}:{seq}", utcnow(), status=status, **kw
    )


# ---- concurrent claims ------------------------------------------------------------------------


async def test_two_ledgers_claiming_concurrently_never_share_an_item(
    ledger: Ledger, db_url: str
) -> None:
    ids = {(await ledger.create_work("echo", i))[0].id for i in range(50)}
    other = await Ledger.open(db_url)
    try:
        by_owner: dict[str, list[str]] = {"a": [], "b": []}
        for _ in range(60):
            got_a, got_b = await asyncio.gather(
                ledger.claim_work("a", limit=2, lease_ttl=30),
                other.claim_work("b", limit=2, lease_ttl=30),
            )
            by_owner["a"] += [c.work_id for c in got_a]
            by_owner["b"] += [c.work_id for c in got_b]
            assert all(c.epoch == 1 for c in [*got_a, *got_b])
            if not got_a and not got_b:
                break
    finally:
        await other.close()

    claimed = by_owner["a"] + by_owner["b"]
    assert len(claimed) == len(set(claimed)) == 50
    assert set(claimed) == ids
    assert by_owner["a"] and by_owner["b"]
    counts = await ledger.count_by_state()
    assert (counts["running"], counts["queued"]) == (50, 0)
    async with ledger.engines.read.connect() as conn:
        rows = await conn.execute(sa.text("SELECT id, lease_owner FROM work"))
        owners = {work_id: owner for work_id, owner in rows}
    assert {i for i, o in owners.items() if o == "a"} == set(by_owner["a"])
    assert await count(ledger, "event") == 100  # one created + one claimed each


# ---- fencing ----------------------------------------------------------------------------------


async def test_a_zombie_claim_cannot_write_after_its_lease_was_reclaimed(ledger: Ledger) -> None:
    work, _ = await ledger.create_work("echo", max_attempts=3)
    zombie = await claim_and_expire(ledger, "zombie")
    await ledger.record_step(zombie, step(zombie, 0, "succeeded", output="before expiry"))
    assert await ledger.reap_expired_leases() == [(work.id, "queued")]
    [fresh] = await ledger.claim_work("fresh", limit=1, lease_ttl=30)
    assert (fresh.work_id, fresh.epoch, fresh.attempt) == (work.id, 2, 2)
    before = await ledger.get_work(work.id)
    events_before = await count(ledger, "event")

    zombie_writes: dict[str, Callable[[], Awaitable[object]]] = {
        "complete": lambda: ledger.complete_work(zombie, "zombie result"),
        "fail": lambda: ledger.fail_work(zombie, {"type": "E", "message": "zombie"}),
        "retry": lambda: ledger.fail_work(zombie, {"type": "E"}, retry_at=utcnow()),
        "step": lambda: ledger.record_step(zombie, step(zombie, 1, "succeeded", output="z")),
        "failed step": lambda: ledger.record_step(zombie, step(zombie, 1, "failed")),
        "running step": lambda: ledger.record_step_running(zombie, step(zombie, 1)),
        "heartbeat": lambda: ledger.record_step_running(
            zombie, step(zombie, 0), heartbeat_at=utcnow()
        ),
        "release": lambda: ledger.release_work(zombie),
        "acknowledge": lambda: ledger.acknowledge_control(zombie),
        "spawn": lambda: ledger.spawn_child(zombie, 5, "child", None, max_attempts=1),
        "suspend": lambda: ledger.suspend_for_child(zombie, work.id),
    }
    for name, write in zombie_writes.items():
        with pytest.raises(LeaseLost) as info:
            await write()
        assert (info.value.work_id, info.value.epoch) == (work.id, 1), name

    after = await ledger.get_work(work.id)
    assert after.state == "running"
    assert (after.lease_owner, after.lease_epoch, after.attempt) == ("fresh", 2, 2)
    assert after.updated_at == before.updated_at
    assert after.result is None and after.error is None
    assert await count(ledger, "event") == events_before
    assert await count(ledger, "work") == 1  # no child spawned
    steps = await ledger.load_steps(work.id)
    assert list(steps) == [0]
    assert (steps[0].status, steps[0].output) == ("succeeded", "before expiry")

    # the new owner's writes still land
    await ledger.record_step(fresh, step(fresh, 1, "succeeded", output="fresh"))
    await ledger.complete_work(fresh, "fresh result")
    done = await ledger.get_work(work.id)
    assert (done.state, done.result) == ("succeeded", "fresh result")
    assert (await ledger.load_steps(work.id))[1].output == "fresh"


async def test_a_zombie_cannot_acknowledge_the_new_owners_control_request(
    ledger: Ledger,
) -> None:
    work, _ = await ledger.create_work("echo", max_attempts=3)
    zombie = await claim_and_expire(ledger)
    await ledger.reap_expired_leases()
    [fresh] = await ledger.claim_work("fresh", limit=1, lease_ttl=30)
    await ledger.pause_work(work.id)

    with pytest.raises(LeaseLost):
        await ledger.acknowledge_control(zombie)
    pending = await ledger.get_work(work.id)
    assert (pending.state, pending.control, pending.lease_owner) == ("running", "pause", "fresh")

    assert await ledger.acknowledge_control(fresh) == "paused"
    assert (await ledger.get_work(work.id)).state == "paused"


async def test_a_zombie_claim_cannot_write_to_a_requeued_item(ledger: Ledger) -> None:
    work, _ = await ledger.create_work("echo", max_attempts=3)
    zombie = await claim_and_expire(ledger)
    await ledger.reap_expired_leases()
    events_before = await count(ledger, "event")

    with pytest.raises(LeaseLost):
        await ledger.record_step(zombie, step(zombie, 0, "succeeded", output=1))
    with pytest.raises(LeaseLost):
        await ledger.complete_work(zombie, "late")

    after = await ledger.get_work(work.id)
    assert (after.state, after.attempt, after.result) == ("queued", 2, None)
    assert await ledger.load_steps(work.id) == {}
    assert await count(ledger, "event") == events_before


async def test_a_finished_claim_cannot_write_again(ledger: Ledger) -> None:
    work, _ = await ledger.create_work("echo")
    [claim] = await ledger.claim_work("w", limit=1, lease_ttl=30)
    await ledger.complete_work(claim, "first")

    with pytest.raises(LeaseLost):
        await ledger.complete_work(claim, "second")
    with pytest.raises(LeaseLost):
        await ledger.record_step(claim, step(claim, 0, "succeeded"))
    assert (await ledger.get_work(work.id)).result == "first"
    assert await event_types(ledger, work.id) == ["created", "claimed", "succeeded"]


# ---- renew_leases -----------------------------------------------------------------------------


async def test_renew_leases_extends_only_the_leases_still_held(ledger: Ledger) -> None:
    await ledger.register_worker("w1", host="h1", pid=11, concurrency=4)
    await ledger.register_worker("w2", host="h2", pid=22, concurrency=4)
    seen_before = {w.id: w.last_seen_at for w in await ledger.list_workers()}
    lost, _ = await ledger.create_work("echo", "lost")
    kept, _ = await ledger.create_work("echo", "kept")
    theirs, _ = await ledger.create_work("echo", "theirs")
    await claim_and_expire(ledger, "w1")  # `lost`
    [kept_claim] = await ledger.claim_work("w1", limit=1, lease_ttl=30)
    [theirs_claim] = await ledger.claim_work("w2", limit=1, lease_ttl=30)
    assert (kept_claim.work_id, theirs_claim.work_id) == (kept.id, theirs.id)
    assert await ledger.reap_expired_leases() == [(lost.id, "queued")]
    [reclaimed] = await ledger.claim_work("w2", limit=1, lease_ttl=30)
    assert (reclaimed.work_id, reclaimed.epoch) == (lost.id, 2)
    await ledger.pause_work(kept.id)  # a pending control request rides along
    events_before = await count(ledger, "event")

    before = utcnow()
    renewed = await ledger.renew_leases("w1", lease_ttl=120)

    assert renewed == {kept.id: (1, "pause")}
    held = await ledger.get_work(kept.id)
    assert held.lease_expires_at >= before + timedelta(seconds=120)
    assert held.lease_expires_at.tzinfo is not None
    assert held.last_heartbeat_at >= before
    workers = {w.id: w for w in await ledger.list_workers()}
    assert workers["w1"].last_seen_at > seen_before["w1"]
    assert workers["w1"].last_seen_at.tzinfo is not None
    assert workers["w2"].last_seen_at == seen_before["w2"]
    # lost's lease (now w2's) was not touched by w1's renewal
    assert (await ledger.get_work(lost.id)).lease_expires_at < before + timedelta(seconds=60)
    assert await count(ledger, "event") == events_before  # renewal is not a transition

    assert await ledger.renew_leases("w2", lease_ttl=30) == {
        theirs.id: (1, None),
        lost.id: (2, None),
    }
    assert await ledger.renew_leases("nobody", lease_ttl=30) == {}


# ---- reap_expired_leases ----------------------------------------------------------------------


async def test_reap_requeues_an_expired_lease_on_the_next_attempt(ledger: Ledger) -> None:
    work, _ = await ledger.create_work("echo", max_attempts=3)
    await claim_and_expire(ledger)

    assert await ledger.reap_expired_leases() == [(work.id, "queued")]

    again = await ledger.get_work(work.id)
    assert (again.state, again.attempt, again.lease_epoch) == ("queued", 2, 1)
    assert again.lease_owner is None and again.lease_expires_at is None
    assert again.finished_at is None
    events = await ledger.list_events(work.id)
    assert [e.type for e in events] == ["created", "claimed", "lease_expired"]
    assert events[-1].data["detail"] == {"expired_epoch": 1}
    assert (events[-1].data["from"], events[-1].data["to"]) == ("running", "queued")
    assert await ledger.reap_expired_leases() == []  # nothing left to reap
    [claim] = await ledger.claim_work("w", limit=1, lease_ttl=30)
    assert (claim.attempt, claim.epoch) == (2, 2)


async def test_reap_fails_the_item_when_its_attempts_are_spent(ledger: Ledger) -> None:
    work, _ = await ledger.create_work("echo", max_attempts=2)
    await claim_and_expire(ledger)
    assert await ledger.reap_expired_leases() == [(work.id, "queued")]
    await claim_and_expire(ledger)

    assert await ledger.reap_expired_leases() == [(work.id, "failed")]

    failed = await ledger.get_work(work.id)
    assert (failed.state, failed.attempt, failed.lease_epoch) == ("failed", 2, 2)
    assert failed.error == {
        "type": "LeaseExpired",
        "message": "lease expired on attempt 2 of 2",
    }
    assert failed.finished_at is not None and failed.lease_owner is None
    assert await event_types(ledger, work.id) == [
        "created",
        "claimed",
        "lease_expired",
        "claimed",
        "failed",
    ]


@pytest.mark.parametrize(
    ("request_control", "state"), [("pause_work", "paused"), ("cancel_work", "cancelled")]
)
async def test_reap_honours_a_pending_control_request(
    ledger: Ledger, request_control: str, state: str
) -> None:
    work, _ = await ledger.create_work("echo", max_attempts=1)  # would fail if not honoured
    [claim] = await ledger.claim_work("w", limit=1, lease_ttl=TINY_TTL)
    await getattr(ledger, request_control)(work.id, actor="ops")
    assert (await ledger.get_work(work.id)).state == "running"
    await asyncio.sleep(TINY_TTL * 5)

    assert await ledger.reap_expired_leases() == [(work.id, state)]

    after = await ledger.get_work(work.id)
    assert (after.state, after.control, after.attempt, after.error) == (state, None, 1, None)
    assert after.lease_owner is None
    if state == "paused":
        assert after.paused_from == "running" and after.finished_at is None
    else:
        assert after.finished_at is not None
    requested = "pause_requested" if state == "paused" else "cancel_requested"
    assert await event_types(ledger, work.id) == ["created", "claimed", requested, state]
    with pytest.raises(LeaseLost):
        await ledger.complete_work(claim, "too late")


async def test_reap_leaves_unexpired_leases_alone(ledger: Ledger) -> None:
    expired, _ = await ledger.create_work("echo", "expired")
    live, _ = await ledger.create_work("echo", "live")
    await claim_and_expire(ledger, "w")
    [live_claim] = await ledger.claim_work("w", limit=1, lease_ttl=30)
    assert live_claim.work_id == live.id
    before = await ledger.get_work(live.id)

    assert await ledger.reap_expired_leases() == [(expired.id, "queued")]

    after = await ledger.get_work(live.id)
    assert (after.state, after.lease_owner, after.attempt) == ("running", "w", 1)
    assert after.lease_expires_at == before.lease_expires_at
    assert after.updated_at == before.updated_at
    assert await event_types(ledger, live.id) == ["created", "claimed"]
    await ledger.complete_work(live_claim, "ok")  # its claim is intact


async def test_reap_respects_its_limit(ledger: Ledger) -> None:
    for i in range(3):
        await ledger.create_work("echo", i)
    await ledger.claim_work("w", limit=3, lease_ttl=TINY_TTL)
    await asyncio.sleep(TINY_TTL * 5)

    first = await ledger.reap_expired_leases(limit=2)
    rest = await ledger.reap_expired_leases(limit=2)

    assert (len(first), len(rest)) == (2, 1)
    assert {s for _, s in first + rest} == {"queued"}
    assert (await ledger.count_by_state())["queued"] == 3


async def test_reaping_a_child_to_failure_wakes_its_parent(ledger: Ledger) -> None:
    parent, _ = await ledger.create_work("planner")
    [claim] = await ledger.claim_work("w", limit=1, lease_ttl=30)
    child_id = await ledger.spawn_child(claim, 1, "research", None, max_attempts=1)
    assert await ledger.suspend_for_child(claim, child_id) is None
    await claim_and_expire(ledger)

    assert await ledger.reap_expired_leases() == [(child_id, "failed")]

    woken = await ledger.get_work(parent.id)
    assert (woken.state, woken.wait_reason) == ("queued", None)
    assert (await event_types(ledger, parent.id))[-1] == "resumed"
