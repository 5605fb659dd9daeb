"""The ledger side of the operator plane: searching work a page at a time, the overview counts,
the current wait, restart from a step (a fork that keeps steps 1..N-1), the outbox actions
(re-send, abandon) and leases per worker.

Every test runs on SQLite and on PostgreSQL (the ``ledger`` fixture).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa

from ledger import Claim, IllegalTransition, Ledger, StepWrite, WaitSpec, WorkNotFound, utcnow
from ledger.control import InvalidRestartStep, RestartRefused
from ledger.conversations import OutboxActionRefused, OutboxNotFound
from ledger.schema import outbox_t, work_t


async def claim(ledger: Ledger, owner: str = "w") -> Claim:
    [c] = await ledger.claim_work(owner, limit=1, lease_ttl=30)
    return c


async def record(ledger: Ledger, c: Claim, seq: int, name: str, output: Any, **kw: Any) -> None:
    now = utcnow()
    await ledger.record_step(
        c,
        StepWrite(
            seq=seq,
            name=name,
            attempt=1,
            idempotency_key=f"{c.work_id}:{seq}",
            started_at=now,
            status=kw.pop("status", "succeeded"),
            output=output,
            finished_at=now,
            **kw,
        ),
    )


async def set_work(ledger: Ledger, work_id: str, **values: Any) -> None:
    """Change columns without a history event (``updated_at`` untouched unless given)."""
    stmt = sa.update(work_t).where(work_t.c.id == work_id).values(**values)
    await ledger.engines.run_write(lambda conn: conn.execute(stmt))


async def add_outbox(ledger: Ledger, state: str, work_id: str | None = None, **kw: Any) -> int:
    row = {
        "work_id": work_id,
        "conversation_id": kw.pop("conversation_id", None),
        "channel": kw.pop("channel", "telegram"),
        "payload": {"text": kw.pop("text", "hello")},
        "state": state,
        "attempts": kw.pop("attempts", 2),
        "error": kw.pop("error", None),
        "created_at": utcnow(),
        **kw,
    }
    stmt = sa.insert(outbox_t).values(row).returning(outbox_t.c.id)
    return await ledger.engines.run_write(lambda conn: conn.execute(stmt).scalar_one())


# ---- search and overview ----------------------------------------------------------------------


async def test_search_filters_combine(ledger: Ledger) -> None:
    a, _ = await ledger.create_work("alpha", {"n": 1}, source="api", source_event_id="k1")
    b, _ = await ledger.create_work("beta", {"n": 2})
    c, _ = await ledger.create_work("alpha", {"n": 3})
    await set_work(ledger, b.id, conversation_id="conv-1", wait_reason="approval x: Deploy 50%?")
    await ledger.pause_work(c.id)

    async def ids(**kw: Any) -> list[str]:
        return [w.id for w in await ledger.search_work(**kw)]

    assert await ids() == [c.id, b.id, a.id]
    assert await ids(agent="alpha") == [c.id, a.id]
    assert await ids(state="paused") == [c.id]
    assert await ids(agent="alpha", state="queued") == [a.id]
    assert await ids(source="api") == [a.id]
    assert await ids(conversation_id="conv-1") == [b.id]
    assert await ids(text="DEPLOY") == [b.id]  # case-insensitive
    assert await ids(text="50%") == [b.id]  # LIKE wildcards are escaped
    assert await ids(text="5_%") == []
    assert await ids(created_after=b.created_at) == [c.id, b.id]  # inclusive
    assert await ids(created_before=b.created_at) == [a.id]  # exclusive
    paused = await ledger.get_work(c.id)
    assert await ids(updated_after=paused.updated_at) == [c.id]
    assert await ids(updated_before=paused.updated_at, agent="alpha") == [a.id]
    # an offset other than UTC means the same instant; a naive value is taken as UTC
    plus2 = b.created_at.astimezone(timezone(timedelta(hours=2)))
    assert await ids(created_after=plus2) == [c.id, b.id]
    naive = b.created_at.astimezone(UTC).replace(tzinfo=None)
    assert await ids(created_after=naive) == [c.id, b.id]
    assert await ids(limit=2) == [c.id, b.id]


async def test_search_pages_by_keyset_without_gaps_or_repeats(ledger: Ledger) -> None:
    created = [(await ledger.create_work("echo", i))[0] for i in range(7)]
    # two items with the very same creation time: the id breaks the tie
    same = created[3].created_at
    await set_work(ledger, created[4].id, created_at=same)
    seen: list[str] = []
    before = None
    while True:
        page = await ledger.search_work(limit=3, before=before)
        seen += [w.id for w in page]
        await ledger.create_work("echo", "new")  # newer than the walk: never in it
        if len(page) < 3:
            break
        before = (page[-1].created_at, page[-1].id)
    assert sorted(seen) == sorted(w.id for w in created)
    assert len(seen) == len(set(seen)) == 7


async def test_overview_counts_expired_leases_and_retries(ledger: Ledger) -> None:
    for _ in range(4):
        await ledger.create_work("echo")
    first = await claim(ledger)
    second = await claim(ledger)
    await set_work(ledger, first.work_id, lease_expires_at=utcnow() - timedelta(seconds=5))
    await ledger.fail_work(
        second, {"type": "Boom", "message": "x"}, retry_at=utcnow() + timedelta(minutes=5)
    )
    overview = await ledger.work_overview()
    assert overview["running"] == 1 and overview["queued"] == 3
    assert overview["expired_leases"] == 1
    assert overview["retrying"] == 1
    assert set(overview) == {
        "queued",
        "running",
        "waiting",
        "paused",
        "succeeded",
        "failed",
        "cancelled",
        "expired_leases",
        "retrying",
    }
    # a retry that is due is just queued work
    await set_work(ledger, second.work_id, not_before=utcnow() - timedelta(seconds=1))
    assert (await ledger.work_overview())["retrying"] == 0


async def test_current_wait_is_the_pending_one(ledger: Ledger) -> None:
    work, _ = await ledger.create_work("echo")
    assert await ledger.get_current_wait(work.id) is None
    c = await claim(ledger)
    _, wait_id = await ledger.enter_wait(
        c, WaitSpec(seq=1, kind="approval", prompt="Ship it?"), "approve"
    )
    current = await ledger.get_current_wait(work.id)
    assert current is not None and (current.id, current.prompt) == (wait_id, "Ship it?")
    await ledger.resolve_wait(wait_id, {"decision": "approve"}, by="operator")
    assert await ledger.get_current_wait(work.id) is None


async def test_leases_by_owner(ledger: Ledger) -> None:
    for _ in range(3):
        await ledger.create_work("echo")
    await claim(ledger, "w-a")
    await claim(ledger, "w-a")
    done = await claim(ledger, "w-b")
    assert await ledger.count_leases_by_owner() == {"w-a": 2, "w-b": 1}
    await ledger.complete_work(done, None)
    assert await ledger.count_leases_by_owner() == {"w-a": 2}


# ---- restart from a step ----------------------------------------------------------------------


async def finished_with_steps(ledger: Ledger, n: int, **create: Any) -> str:
    work, _ = await ledger.create_work("echo", {"q": "input"}, **create)
    c = await claim(ledger)
    for seq in range(1, n + 1):
        await record(ledger, c, seq, f"s{seq}", {"out": seq})
    await ledger.complete_work(c, {"result": n})
    return work.id


async def test_restart_forks_with_the_steps_before_n(ledger: Ledger) -> None:
    parent, _ = await ledger.create_work("boss")
    old_id = await finished_with_steps(ledger, 3, parent_id=parent.id, priority=4, max_attempts=2)
    old_before = await ledger.get_work(old_id)
    old_steps = await ledger.list_steps(old_id)

    fork = await ledger.restart_from_step(old_id, 3, "operator:ann")

    assert fork.id != old_id
    assert (fork.state, fork.agent, fork.input) == ("queued", "echo", {"q": "input"})
    assert (fork.parent_id, fork.priority, fork.max_attempts, fork.attempt) == (
        parent.id,
        4,
        2,
        1,
    )
    assert fork.source == "restart"
    prefix = f"{old_id}:3:"
    assert fork.source_event_id.startswith(prefix) and len(fork.source_event_id) > len(prefix)
    assert fork.result is None and fork.finished_at is None

    steps = await ledger.list_steps(fork.id)
    assert [(s.seq, s.name, s.status, s.output) for s in steps] == [
        (1, "s1", "succeeded", {"out": 1}),
        (2, "s2", "succeeded", {"out": 2}),
    ]
    assert [s.idempotency_key for s in steps] == [f"{fork.id}:1", f"{fork.id}:2"]
    assert [s.started_at for s in steps] == [s.started_at for s in old_steps[:2]]
    replay = await ledger.load_steps(fork.id)
    assert sorted(replay) == [1, 2] and replay[2].output == {"out": 2}

    # the original is untouched but for a history event
    old_after = await ledger.get_work(old_id)
    assert (old_after.state, old_after.result) == ("succeeded", {"result": 3})
    assert old_after.finished_at == old_before.finished_at
    assert [s.idempotency_key for s in await ledger.list_steps(old_id)] == [
        f"{old_id}:{n}" for n in (1, 2, 3)
    ]
    last = (await ledger.list_events(old_id))[-1]
    assert (last.type, last.actor) == ("restarted_as", "operator:ann")
    assert last.data["from"] == last.data["to"] == "succeeded"
    assert last.data["detail"]["restarted_as"] == fork.id
    assert last.data["detail"]["from_step"] == 3

    events = await ledger.list_events(fork.id)
    assert [e.type for e in events] == ["created", "step_completed", "step_completed"]
    assert events[0].actor == "operator:ann"
    assert events[0].data["detail"]["restarted_from"] == old_id
    assert events[0].data["detail"]["from_step"] == 3

    # and the fork is claimable like any queued work
    fresh = await claim(ledger)
    assert fresh.work_id in {fork.id, parent.id}


@pytest.mark.parametrize("from_step", [1, 4])
async def test_restart_bounds_keep_nothing_or_everything(ledger: Ledger, from_step: int) -> None:
    old_id = await finished_with_steps(ledger, 3)
    fork = await ledger.restart_from_step(old_id, from_step)
    assert len(await ledger.list_steps(fork.id)) == from_step - 1


async def test_restart_refuses_bad_steps_running_work_and_unknown_ids(ledger: Ledger) -> None:
    old_id = await finished_with_steps(ledger, 2)
    for bad in (0, -1, 4, 10**6):
        with pytest.raises(InvalidRestartStep) as err:
            await ledger.restart_from_step(old_id, bad)
        assert "1 to 3" in str(err.value)
    empty, _ = await ledger.create_work("echo")
    with pytest.raises(InvalidRestartStep):
        await ledger.restart_from_step(empty.id, 2)

    running_work, _ = await ledger.create_work("echo")
    await ledger.pause_work(empty.id)  # keep the claim for running_work
    c = await claim(ledger)
    assert c.work_id == running_work.id
    with pytest.raises(RestartRefused) as refused:
        await ledger.restart_from_step(c.work_id, 1)
    assert isinstance(refused.value, IllegalTransition)
    assert "running" in str(refused.value)
    with pytest.raises(WorkNotFound):
        await ledger.restart_from_step("0" * 28, 1)
    # nothing was written by any of them
    assert len(await ledger.list_work()) == 3
    assert (await ledger.list_events(old_id))[-1].type == "succeeded"


@pytest.mark.parametrize("state", ["queued", "waiting", "paused", "failed", "cancelled"])
async def test_restart_from_any_state_but_running(ledger: Ledger, state: str) -> None:
    work, _ = await ledger.create_work("echo", max_attempts=1)
    c = await claim(ledger)
    await record(ledger, c, 1, "first", 1)
    if state == "queued":
        await ledger.release_work(c)
    elif state == "waiting":
        await ledger.enter_wait(c, WaitSpec(seq=2, kind="input", prompt="n?"), "ask")
    elif state == "paused":
        await ledger.pause_work(work.id)
        await ledger.acknowledge_control(c)
    elif state == "failed":
        await ledger.fail_work(c, {"type": "Boom", "message": "x", "traceback": "tb"})
    else:
        await ledger.cancel_work(work.id)
        await ledger.acknowledge_control(c)
    assert (await ledger.get_work(work.id)).state == state
    fork = await ledger.restart_from_step(work.id, 2)
    assert (await ledger.get_work(work.id)).state == state
    assert [s.name for s in await ledger.list_steps(fork.id)] == ["first"]


async def test_restart_copies_failed_step_records_as_they_are(ledger: Ledger) -> None:
    work, _ = await ledger.create_work("echo", max_attempts=1)
    c = await claim(ledger)
    await record(ledger, c, 1, "ok", "fine")
    await record(ledger, c, 2, "flaky", None, status="failed", error={"type": "E"}, error_type="E")
    await ledger.fail_work(c, {"type": "E", "message": "x"})
    fork = await ledger.restart_from_step(work.id, 3)
    steps = await ledger.list_steps(fork.id)
    assert [(s.seq, s.status, s.error_type) for s in steps] == [
        (1, "succeeded", None),
        (2, "failed", "E"),
    ]


# ---- the outbox -------------------------------------------------------------------------------


async def test_resend_unknown_keeps_attempts_and_records_the_operator(ledger: Ledger) -> None:
    work, _ = await ledger.create_work("echo")
    msg = await add_outbox(ledger, "unknown", work.id, attempts=3, error="timeout")

    resent = await ledger.resend_outbox(msg, "operator:bob")

    assert (resent.state, resent.attempts, resent.error) == ("pending", 3, "timeout")
    assert resent.next_attempt_at is not None
    assert (await ledger.get_outbox(msg)).state == "pending"
    last = (await ledger.list_events(work.id))[-1]
    assert (last.type, last.actor) == ("outbox_resent", "operator:bob")
    assert last.data["outbox_id"] == msg
    assert (last.data["from"], last.data["to"]) == ("unknown", "pending")
    assert (await ledger.get_work(work.id)).state == "queued"  # the work item is not touched

    with pytest.raises(OutboxActionRefused) as refused:
        await ledger.resend_outbox(msg, "operator")
    assert isinstance(refused.value, IllegalTransition)
    assert "pending" in str(refused.value) and "unknown" in str(refused.value)


@pytest.mark.parametrize("state", ["unknown", "pending", "failed"])
async def test_abandon(ledger: Ledger, state: str) -> None:
    work, _ = await ledger.create_work("echo")
    msg = await add_outbox(ledger, state, work.id)
    abandoned = await ledger.abandon_outbox(msg, "operator")
    assert (abandoned.state, abandoned.next_attempt_at) == ("abandoned", None)
    last = (await ledger.list_events(work.id))[-1]
    assert (last.type, last.actor, last.data["from"]) == ("outbox_abandoned", "operator", state)


@pytest.mark.parametrize("state", ["sent", "abandoned"])
async def test_outbox_actions_refused_for_settled_messages(ledger: Ledger, state: str) -> None:
    work, _ = await ledger.create_work("echo")
    msg = await add_outbox(ledger, state, work.id)
    events_before = len(await ledger.list_events(work.id))
    for action in (ledger.resend_outbox, ledger.abandon_outbox):
        with pytest.raises(OutboxActionRefused):
            await action(msg, "operator")
    assert (await ledger.get_outbox(msg)).state == state
    assert len(await ledger.list_events(work.id)) == events_before


async def test_outbox_unknown_ids_and_messages_without_work(ledger: Ledger) -> None:
    for action in (ledger.resend_outbox, ledger.abandon_outbox, ledger.get_outbox):
        with pytest.raises(OutboxNotFound):
            await action(424242)  # type: ignore[operator]
    orphan = await add_outbox(ledger, "unknown", None)
    await ledger.abandon_outbox(orphan, "operator")
    [event] = await ledger.list_events(f"outbox:{orphan}")
    assert event.type == "outbox_abandoned"


async def test_list_outbox_filters_newest_first(ledger: Ledger) -> None:
    work, _ = await ledger.create_work("echo")
    a = await add_outbox(ledger, "unknown", work.id)
    b = await add_outbox(ledger, "sent", None, conversation_id="conv-x")
    c = await add_outbox(ledger, "unknown", None)
    assert [m.id for m in await ledger.list_outbox()] == [c, b, a]
    assert [m.id for m in await ledger.list_outbox(state="unknown")] == [c, a]
    assert [m.id for m in await ledger.list_outbox(work_id=work.id)] == [a]
    assert [m.id for m in await ledger.list_outbox(conversation_id="conv-x")] == [b]
    assert [m.id for m in await ledger.list_outbox(limit=1)] == [c]


async def test_messages_show_outbound_delivery_state(ledger: Ledger) -> None:
    accepted = await ledger.accept_message(
        channel="telegram", chat_id="42", text="hi", message_id="m1", agent="echo"
    )
    msg = await add_outbox(
        ledger, "unknown", accepted.work_id, conversation_id=accepted.conversation_id, text="yo"
    )
    messages = await ledger.list_messages(accepted.conversation_id)
    assert [(m["direction"], m["text"]) for m in messages] == [("in", "hi"), ("out", "yo")]
    assert (messages[1]["outbox_id"], messages[1]["state"]) == (msg, "unknown")
    assert isinstance(messages[0]["created_at"], datetime)
