"""Step records: JSON round trips, the never-overwrite rule for succeeded steps, attempts,
heartbeats and progress, and the history events the step triggers write.

Every test runs on SQLite and on PostgreSQL (the ``ledger`` fixture).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from ledger import Claim, IllegalTransition, LeaseLost, Ledger, StepRecord, StepWrite, utcnow


async def count(ledger: Ledger, table: str) -> int:
    async with ledger.engines.read.connect() as conn:
        return (await conn.execute(sa.text(f"SELECT count(*) FROM {table}"))).scalar_one()


async def claimed(ledger: Ledger) -> Claim:
    await ledger.create_work("echo", {"text": "hi"})
    [claim] = await ledger.claim_work("w", limit=1, lease_ttl=30)
    return claim


def write(
    claim: Claim, seq: int, status: str = "running", attempt: int = 1, **kw: Any
) -> StepWrite:
    if status != "running":
        kw.setdefault("finished_at", utcnow())
    return StepWrite(
        seq,
        kw.pop("name", f"step{seq}"),
        attempt,
        f"{claim.work_id}:{seq}",
        kw.pop("started_at", utcnow()),
        status=status,
        **kw,
    )


OUTPUTS: list[Any] = [
    {"text": "hello", "n": 3, "ok": True, "none": None},
    [1, "two", 3.5, None, False],
    "héllo wörld — 你好 👋",
    {"nested": {"list": [{"a": [1, 2, {"b": "ü"}]}], "empty": {}, "blank": []}},
    42,
    None,
]


async def test_succeeded_steps_return_their_json_output(ledger: Ledger) -> None:
    claim = await claimed(ledger)
    for seq, output in enumerate(OUTPUTS):
        await ledger.record_step(claim, write(claim, seq, "succeeded", output=output))

    steps = await ledger.load_steps(claim.work_id)

    assert steps == {
        seq: StepRecord(seq, f"step{seq}", "succeeded", 1, output, None)
        for seq, output in enumerate(OUTPUTS)
    }
    rows = await ledger.list_steps(claim.work_id)
    assert [r.seq for r in rows] == list(range(len(OUTPUTS)))
    assert rows[0].idempotency_key == f"{claim.work_id}:0"
    assert all(r.started_at.tzinfo is not None for r in rows)
    assert all(r.finished_at is not None and r.finished_at.tzinfo is not None for r in rows)
    assert await ledger.load_steps("unknown") == {}


async def test_a_succeeded_step_is_never_overwritten(ledger: Ledger) -> None:
    claim = await claimed(ledger)
    await ledger.record_step(claim, write(claim, 0, "succeeded", output={"v": 1}))
    original = await ledger.list_steps(claim.work_id)
    events_before = await count(ledger, "event")

    with pytest.raises(IllegalTransition, match="step 0 exists"):
        await ledger.record_step(claim, write(claim, 0, "succeeded", output={"v": 2}))
    with pytest.raises(IllegalTransition):
        await ledger.record_step(
            claim, write(claim, 0, "failed", attempt=2, error={"type": "E"}, error_type="E")
        )
    # a late start or heartbeat record of a finished step is ignored, not an error
    await ledger.record_step_running(claim, write(claim, 0, progress={"pct": 1}))
    await ledger.record_step_running(claim, write(claim, 0), heartbeat_at=utcnow())

    assert await ledger.load_steps(claim.work_id) == {
        0: StepRecord(0, "step0", "succeeded", 1, {"v": 1}, None)
    }
    assert await ledger.list_steps(claim.work_id) == original
    assert await count(ledger, "event") == events_before
    assert (await ledger.get_work(claim.work_id)).state == "running"


async def test_a_running_record_is_upgraded_to_succeeded(ledger: Ledger) -> None:
    claim = await claimed(ledger)
    started = utcnow() - timedelta(seconds=2)
    await ledger.record_step_running(claim, write(claim, 0, name="plan", started_at=started))
    running = await ledger.load_steps(claim.work_id)
    assert running == {0: StepRecord(0, "plan", "running", 1, None, None)}
    [row] = await ledger.list_steps(claim.work_id)
    assert row.started_at == started
    assert row.last_heartbeat_at == started
    assert row.finished_at is None

    finished = utcnow()
    await ledger.record_step(
        claim,
        write(
            claim,
            0,
            "succeeded",
            name="plan",
            started_at=started,
            output=["a"],
            finished_at=finished,
        ),
    )

    assert await ledger.load_steps(claim.work_id) == {
        0: StepRecord(0, "plan", "succeeded", 1, ["a"], None)
    }
    [row] = await ledger.list_steps(claim.work_id)
    assert (row.started_at, row.finished_at) == (started, finished)
    events = await ledger.list_events(claim.work_id)
    assert [e.type for e in events] == ["created", "claimed", "step_started", "step_completed"]
    assert events[-1].data["seq"] == 0 and events[-1].data["name"] == "plan"
    assert events[-1].created_at == finished


async def test_a_failed_attempt_then_a_succeeded_attempt_leaves_the_success(
    ledger: Ledger,
) -> None:
    claim = await claimed(ledger)
    error = {"type": "ConnectionError", "message": "reset"}
    await ledger.record_step(
        claim, write(claim, 0, "failed", error=error, error_type="ConnectionError")
    )
    assert await ledger.load_steps(claim.work_id) == {
        0: StepRecord(0, "step0", "failed", 1, None, error)
    }

    await ledger.record_step(claim, write(claim, 0, "succeeded", attempt=2, output="fine"))

    assert await ledger.load_steps(claim.work_id) == {
        0: StepRecord(0, "step0", "succeeded", 2, "fine", None)
    }
    [row] = await ledger.list_steps(claim.work_id)
    assert (row.attempt, row.error_type) == (2, None)
    events = await ledger.list_events(claim.work_id)
    assert [e.type for e in events][2:] == ["step_failed", "step_completed"]
    assert [e.data["attempt"] for e in events[2:]] == [1, 2]
    assert events[2].data["error"] == error


async def test_heartbeats_update_progress_and_last_heartbeat(ledger: Ledger) -> None:
    claim = await claimed(ledger)
    started = utcnow()
    await ledger.record_step_running(claim, write(claim, 0, started_at=started))
    events_before = await count(ledger, "event")

    beat1 = started + timedelta(seconds=5)
    await ledger.record_step_running(
        claim, write(claim, 0, started_at=started, progress={"pct": 50}), heartbeat_at=beat1
    )
    [row] = await ledger.list_steps(claim.work_id)
    assert (row.status, row.progress, row.last_heartbeat_at) == ("running", {"pct": 50}, beat1)
    assert row.last_heartbeat_at.tzinfo is not None

    # a heartbeat without progress keeps the last reported progress
    beat2 = started + timedelta(seconds=10)
    await ledger.record_step_running(claim, write(claim, 0, started_at=started), heartbeat_at=beat2)
    [row] = await ledger.list_steps(claim.work_id)
    assert (row.progress, row.last_heartbeat_at) == ({"pct": 50}, beat2)

    beat3 = started + timedelta(seconds=15)
    await ledger.record_step_running(
        claim, write(claim, 0, started_at=started, progress="almost"), heartbeat_at=beat3
    )
    [row] = await ledger.list_steps(claim.work_id)
    assert (row.progress, row.last_heartbeat_at, row.started_at) == ("almost", beat3, started)
    assert await count(ledger, "event") == events_before  # heartbeats are not transitions


async def test_a_later_attempt_replaces_a_running_one_and_an_older_heartbeat_is_ignored(
    ledger: Ledger,
) -> None:
    claim = await claimed(ledger)
    started = utcnow()
    await ledger.record_step_running(claim, write(claim, 0, started_at=started, progress=1))

    second = utcnow()
    await ledger.record_step_running(
        claim, write(claim, 0, attempt=2, started_at=second, progress=2), heartbeat_at=second
    )
    [row] = await ledger.list_steps(claim.work_id)
    assert (row.attempt, row.progress, row.started_at) == (2, 2, second)

    # A late heartbeat from the interrupted first attempt changes nothing.
    await ledger.record_step_running(
        claim, write(claim, 0, attempt=1, started_at=started, progress=9), heartbeat_at=utcnow()
    )
    [row] = await ledger.list_steps(claim.work_id)
    assert (row.attempt, row.progress, row.last_heartbeat_at) == (2, 2, second)


async def test_a_heartbeat_timeout_is_recorded_as_its_own_event(ledger: Ledger) -> None:
    claim = await claimed(ledger)
    await ledger.record_step_running(claim, write(claim, 0, name="slow_tool"))
    error = {"type": "HeartbeatTimeout", "message": "no heartbeat for 30s"}

    await ledger.record_step(
        claim,
        write(claim, 0, "failed", name="slow_tool", error=error, error_type="HeartbeatTimeout"),
    )
    await ledger.record_step(
        claim, write(claim, 1, "failed", error={"type": "KeyError"}, error_type="KeyError")
    )

    events = await ledger.list_events(claim.work_id)
    assert [e.type for e in events] == [
        "created",
        "claimed",
        "step_started",
        "heartbeat_timeout",
        "step_failed",
    ]
    assert events[3].data == {"seq": 0, "name": "slow_tool", "attempt": 1, "error": error}
    assert events[4].data["error"] == {"type": "KeyError"}
    steps = await ledger.load_steps(claim.work_id)
    assert (steps[0].status, steps[0].error) == ("failed", error)
    [row, _] = await ledger.list_steps(claim.work_id)
    assert row.error_type == "HeartbeatTimeout"


async def test_steps_are_recorded_only_while_the_work_is_running(ledger: Ledger) -> None:
    claim = await claimed(ledger)
    await ledger.complete_work(claim, "done")
    events_before = await count(ledger, "event")

    with pytest.raises(LeaseLost):
        await ledger.record_step(claim, write(claim, 0, "succeeded", output=1))
    with pytest.raises(LeaseLost):
        await ledger.record_step_running(claim, write(claim, 0))

    assert await ledger.load_steps(claim.work_id) == {}
    assert await count(ledger, "step") == 0
    assert await count(ledger, "event") == events_before


async def test_a_retry_after_a_failed_attempt_is_recorded_as_running(ledger: Ledger) -> None:
    claim = await claimed(ledger)
    first = utcnow()
    await ledger.record_step(
        claim,
        write(claim, 0, started_at=first, status="failed", error={"type": "E", "message": "x"},
              error_type="E", finished_at=utcnow()),
    )  # fmt: skip
    second = utcnow()
    await ledger.record_step_running(claim, write(claim, 0, attempt=2, started_at=second))

    [row] = await ledger.list_steps(claim.work_id)
    assert (row.status, row.attempt, row.started_at, row.error) == ("running", 2, second, None)
    types = [e.type for e in await ledger.list_events(claim.work_id)]
    assert types[-2:] == ["step_failed", "step_started"]
