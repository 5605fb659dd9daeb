"""Group commit at the ledger: ``record_steps`` writes many items' step records in one
transaction, fenced per item, with one outcome per entry.

Every test runs on SQLite and on PostgreSQL (the ``ledger`` fixture).
"""

from __future__ import annotations

from dataclasses import replace

import sqlalchemy as sa

from ledger import Claim, IllegalTransition, LeaseLost, Ledger, StepWrite, utcnow


async def claim_items(ledger: Ledger, n: int) -> list[Claim]:
    for i in range(n):
        await ledger.create_work("echo", {"i": i})
    return await ledger.claim_work("w", limit=n, lease_ttl=30)


def done(claim: Claim, seq: int, output: object = None, **kw: object) -> StepWrite:
    return StepWrite(
        seq,
        f"step{seq}",
        1,
        f"{claim.work_id}:{seq}",
        utcnow(),
        status=kw.pop("status", "succeeded"),  # type: ignore[arg-type]
        output=output,
        finished_at=utcnow(),
        **kw,  # type: ignore[arg-type]
    )


async def step_rows(ledger: Ledger) -> list[tuple[str, int, str, object]]:
    async with ledger.engines.read.connect() as conn:
        rows = await conn.execute(sa.text("SELECT work_id, seq, status, output FROM step"))
        return sorted((r[0], r[1], r[2], r[3]) for r in rows)


async def test_a_batch_of_several_items_commits_together(ledger: Ledger) -> None:
    claims = await claim_items(ledger, 3)
    batch = [(c, done(c, seq, {"seq": seq})) for seq in (1, 2) for c in claims]
    assert await ledger.record_steps(batch) == [None] * 6

    steps = {c.work_id: await ledger.load_steps(c.work_id) for c in claims}
    for c in claims:
        assert sorted(steps[c.work_id]) == [1, 2]
        assert steps[c.work_id][2].output == {"seq": 2}
        assert steps[c.work_id][1].status == "succeeded"


async def test_a_lost_lease_refuses_only_that_items_records(ledger: Ledger) -> None:
    a, b = await claim_items(ledger, 2)
    stale = replace(a, epoch=a.epoch - 1)
    outcomes = await ledger.record_steps([(stale, done(a, 1)), (b, done(b, 1, "ok"))])
    assert isinstance(outcomes[0], LeaseLost)
    assert outcomes[1] is None
    assert [(w, s) for w, s, _, _ in await step_rows(ledger)] == [(b.work_id, 1)]


async def test_a_succeeded_record_is_never_overwritten_by_a_batch(ledger: Ledger) -> None:
    [c] = await claim_items(ledger, 1)
    await ledger.record_step(c, done(c, 1, "first"))
    outcomes = await ledger.record_steps([(c, done(c, 1, "second")), (c, done(c, 2, "next"))])
    assert isinstance(outcomes[0], IllegalTransition)
    assert outcomes[1] is None
    steps = await ledger.load_steps(c.work_id)
    assert steps[1].output == "first"
    assert steps[2].output == "next"


async def test_a_failed_attempt_is_overwritten_by_a_later_success(ledger: Ledger) -> None:
    [c] = await claim_items(ledger, 1)
    failed = done(c, 1, status="failed", error={"type": "ValueError", "message": "boom"})
    assert await ledger.record_steps([(c, failed)]) == [None]
    retry = StepWrite(1, "step1", 2, f"{c.work_id}:1", utcnow(), status="succeeded",
                      output=7, finished_at=utcnow())  # fmt: skip
    assert await ledger.record_steps([(c, retry)]) == [None]
    [rec] = (await ledger.load_steps(c.work_id)).values()
    assert (rec.status, rec.attempt, rec.output) == ("succeeded", 2, 7)


async def test_batched_records_write_history_events(ledger: Ledger) -> None:
    claims = await claim_items(ledger, 2)
    await ledger.record_steps([(c, done(c, 1)) for c in claims])
    async with ledger.engines.read.connect() as conn:
        n = (
            await conn.execute(sa.text("SELECT count(*) FROM event WHERE type = 'step_completed'"))
        ).scalar_one()
    assert n == 2


async def test_an_empty_batch_writes_nothing(ledger: Ledger) -> None:
    assert await ledger.record_steps([]) == []
