"""Read-only aggregates for ``/metrics``: one consistent snapshot per scrape.

Every number is computed from the ledger (shared by all gateway, worker and scheduler
processes), so any process answers for the whole deployment. Each query stays cheap on a large
history:

* ``work`` is read through its ``state`` indexes (``ix_work_claim``, ``ix_work_lease``,
  ``ix_work_updated``) or in one grouped pass;
* claims are ``SUM(work.lease_epoch)``: every claim bumps its item's epoch by one, and nothing
  else does, so the sum equals the number of ``claimed`` events (of items not pruned);
* lease expiries count ``lease_expired`` events only of items whose ``attempt`` is above 1
  (an expiry always spends an attempt and attempts never go down), one ``ix_event_work`` lookup
  per such item, never a scan of ``event``;
* step durations cover steps finished in the last ``window``: only steps of items that are
  running now or changed since the window began (a step is recorded while its item runs, and
  leaving ``running`` stamps ``updated_at``), looked up by the ``step`` primary key; steps that
  record a wait (their duration is the human's, not the code's) are left out.

Imported only by :mod:`ledger.ledger`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import sqlalchemy as sa

from ledger._base import LedgerBase, W
from ledger.records import utcnow
from ledger.schema import event_t, inbox_t, outbox_t, step_t, wait_t, work_t
from ledger.states import WorkState

#: upper bounds (seconds) of the step duration buckets; +Inf is implied
STEP_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    1800.0,
)
#: clock skew tolerated between the worker that records a step and the one that moves its item
_SKEW = timedelta(minutes=1)

S = step_t.c
E = event_t.c


@dataclass(frozen=True, slots=True)
class DurationHistogram:
    """Cumulative bucket counts (one per :data:`STEP_BUCKETS` bound, then +Inf), and the sum."""

    buckets: tuple[int, ...]
    count: int
    total: float


@dataclass(frozen=True, slots=True)
class LedgerMetrics:
    """What ``/metrics`` reports about the ledger at one moment."""

    work_by_state: dict[str, int]
    leases_expired: int
    claims: int
    lease_expiries: int
    #: {(kind, state): n} of waits no longer pending
    wait_resolutions: dict[tuple[str, str], int]
    #: {(channel, disposition): n} of inbound messages
    inbound: dict[tuple[str, str], int]
    #: {(channel, state): n} of outbound messages
    outbound: dict[tuple[str, str], int]
    #: {status: histogram} of steps finished within ``window``
    step_durations: dict[str, DurationHistogram] = field(default_factory=dict)
    window: timedelta = timedelta(minutes=10)


class ObservabilityQueries(LedgerBase):
    async def metrics_snapshot(self, *, window: timedelta = timedelta(minutes=10)) -> LedgerMetrics:
        """Aggregate counts for ``/metrics`` (see the module docstring for what each costs)."""
        now = utcnow()
        since = now - window
        all_states = [s.value for s in WorkState]
        async with self._read() as conn:
            work_by_state = {s: 0 for s in all_states}
            claims = 0
            rows = await conn.execute(
                sa.select(W.state, sa.func.count(), sa.func.sum(W.lease_epoch)).group_by(W.state)
            )
            for state, n, epochs in rows:
                work_by_state[state] = int(n)
                claims += int(epochs or 0)

            leases_expired = (
                await conn.execute(
                    sa.select(sa.func.count())
                    .select_from(work_t)
                    .where(W.state == WorkState.RUNNING.value, W.lease_expires_at < now)
                )
            ).scalar_one()

            per_item = (
                sa.select(sa.func.count())
                .select_from(event_t)
                .where(E.work_id == W.id, E.type == "lease_expired")
                .correlate(work_t)
                .scalar_subquery()
            )
            lease_expiries = (
                await conn.execute(sa.select(sa.func.sum(per_item)).where(W.attempt > 1))
            ).scalar_one()

            waits = await conn.execute(
                sa.select(wait_t.c.kind, wait_t.c.state, sa.func.count())
                .where(wait_t.c.state != "pending")
                .group_by(wait_t.c.kind, wait_t.c.state)
            )
            wait_resolutions = {(k, s): int(n) for k, s, n in waits}

            inbox = await conn.execute(
                sa.select(inbox_t.c.channel, inbox_t.c.disposition, sa.func.count()).group_by(
                    inbox_t.c.channel, inbox_t.c.disposition
                )
            )
            inbound = {(c, d): int(n) for c, d, n in inbox}

            outbox = await conn.execute(
                sa.select(outbox_t.c.channel, outbox_t.c.state, sa.func.count()).group_by(
                    outbox_t.c.channel, outbox_t.c.state
                )
            )
            outbound = {(c, s): int(n) for c, s, n in outbox}

            step_durations = await self._step_durations(conn, since, all_states)

        return LedgerMetrics(
            work_by_state=work_by_state,
            leases_expired=int(leases_expired or 0),
            claims=claims,
            lease_expiries=int(lease_expiries or 0),
            wait_resolutions=wait_resolutions,
            inbound=inbound,
            outbound=outbound,
            step_durations=step_durations,
            window=window,
        )

    async def _step_durations(
        self, conn: Any, since: Any, all_states: list[str]
    ) -> dict[str, DurationHistogram]:
        # Items that can hold a step finished since ``since``: running now, or moved since.
        recent = sa.union(
            sa.select(W.id).where(W.state.in_(all_states), W.updated_at >= since - _SKEW),
            sa.select(W.id).where(W.state == WorkState.RUNNING.value),
        )
        if self.dialect == "postgresql":
            seconds: Any = sa.extract("epoch", S.finished_at - S.started_at)
        else:
            seconds = (sa.func.julianday(S.finished_at) - sa.func.julianday(S.started_at)) * 86400.0
        is_wait = (
            sa.exists()
            .where(wait_t.c.work_id == S.work_id, wait_t.c.step_seq == S.seq)
            .correlate(step_t)
        )
        finished = (
            sa.select(S.status.label("status"), sa.cast(seconds, sa.Float).label("d"))
            .where(
                S.work_id.in_(recent),
                S.status != "running",
                S.finished_at.is_not(None),
                S.finished_at >= since,
                ~is_wait,
            )
            .subquery()
        )
        d = finished.c.d
        cols = [sa.func.sum(sa.case((d <= bound, 1), else_=0)) for bound in STEP_BUCKETS]
        q = sa.select(
            finished.c.status, sa.func.count(), sa.func.coalesce(sa.func.sum(d), 0.0), *cols
        ).group_by(finished.c.status)
        out: dict[str, DurationHistogram] = {}
        for row in await conn.execute(q):
            status, count, total, *below = row
            out[status] = DurationHistogram(
                buckets=(*(int(b or 0) for b in below), int(count)),
                count=int(count),
                total=float(total or 0.0),
            )
        return out


__all__ = ["STEP_BUCKETS", "DurationHistogram", "LedgerMetrics", "ObservabilityQueries"]
