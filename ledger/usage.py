"""Model-call usage: what agents spent, for budgets and for the operator's totals.

A model call is a succeeded step with a ``model`` (see :mod:`worker.model_calls`); its tokens
and cost are columns of that step. Step records a restart copied into a fork (their
``started_at`` lies before the fork was created) are the original's calls, not the fork's, so
they are counted once, under the original. Budget raises are the approved operator waits named
``budget:work`` / ``budget:conversation``. Imported only by :mod:`ledger.ledger`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from ledger._base import LedgerBase, W
from ledger.schema import step_t, wait_t, work_t

S = step_t.c
A = wait_t.c

#: how usage can be grouped (``GET /api/v1/usage?by=...``)
USAGE_GROUPS = ("agent", "model", "conversation", "work")
#: the names of the approval waits that raise a budget (one per scope)
BUDGET_WAIT_WORK = "budget:work"
BUDGET_WAIT_CONVERSATION = "budget:conversation"
#: the wait channel of questions for the operator only: never posted in the conversation
OPERATOR_CHANNEL = "operator"


@dataclass(frozen=True, slots=True)
class UsageTotals:
    """Model calls and what they used. ``cost`` sums the priced calls (USD);
    ``unpriced_calls`` counts calls whose model has no price (their cost is unknown)."""

    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    cost: float = 0.0
    unpriced_calls: int = 0

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["cost"] = round(self.cost, 9)
        return out


@dataclass(frozen=True, slots=True)
class BudgetUsage:
    """What a work item and its conversation spent so far, how often an operator raised each
    budget, and the name of the budget wait already opened at the asked step (if any)."""

    work_spent: float
    work_raises: int
    conversation_spent: float
    conversation_raises: int
    wait_at_seq: str | None = None


def _model_calls() -> Any:
    """Succeeded model-call steps, joined to their work item, without restart copies."""
    copied = sa.and_(W.source == "restart", S.started_at < W.created_at)
    return sa.and_(S.model.is_not(None), S.status == "succeeded", sa.not_(copied))


def _totals_columns() -> list[Any]:
    return [
        sa.func.count().label("calls"),
        sa.func.coalesce(sa.func.sum(S.input_tokens), 0).label("input_tokens"),
        sa.func.coalesce(sa.func.sum(S.output_tokens), 0).label("output_tokens"),
        sa.func.coalesce(sa.func.sum(S.total_tokens), 0).label("total_tokens"),
        sa.func.coalesce(sa.func.sum(S.cost), 0.0).label("cost"),
        sa.func.coalesce(sa.func.sum(sa.case((S.cost.is_(None), 1), else_=0)), 0).label(
            "unpriced_calls"
        ),
    ]


def _totals(row: Any) -> UsageTotals:
    return UsageTotals(
        calls=int(row.calls or 0),
        input_tokens=int(row.input_tokens or 0),
        output_tokens=int(row.output_tokens or 0),
        total_tokens=int(row.total_tokens or 0),
        cost=float(row.cost or 0.0),
        unpriced_calls=int(row.unpriced_calls or 0),
    )


class UsageQueries(LedgerBase):
    async def budget_usage(
        self, work_id: str, conversation_id: str | None, *, seq: int | None = None
    ) -> BudgetUsage:
        """Spend so far (USD, priced calls only) of ``work_id`` and of its conversation, the
        budget raises operators approved for each, and which budget wait (if any) step ``seq``
        of ``work_id`` opened already."""
        base = sa.select(sa.func.coalesce(sa.func.sum(S.cost), 0.0)).select_from(
            step_t.join(work_t, W.id == S.work_id)
        )
        work_q = base.where(_model_calls(), S.work_id == work_id)
        raises_q = sa.select(A.work_id, A.step_seq, A.name, A.state, A.resolution).where(
            A.kind == "approval",
            A.name.in_([BUDGET_WAIT_WORK, BUDGET_WAIT_CONVERSATION]),
        )
        if conversation_id is not None:
            raises_q = raises_q.where(
                sa.or_(A.work_id == work_id, A.conversation_id == conversation_id)
            )
        else:
            raises_q = raises_q.where(A.work_id == work_id)
        async with self._read() as conn:
            work_spent = float((await conn.execute(work_q)).scalar_one() or 0.0)
            conversation_spent = 0.0
            if conversation_id is not None:
                conv_q = base.where(_model_calls(), W.conversation_id == conversation_id)
                conversation_spent = float((await conn.execute(conv_q)).scalar_one() or 0.0)
            rows = (await conn.execute(raises_q)).all()
        work_raises = conversation_raises = 0
        wait_at_seq = None
        for row in rows:
            if seq is not None and row.work_id == work_id and row.step_seq == seq:
                wait_at_seq = row.name
            approved = isinstance(row.resolution, dict) and row.resolution.get("approved") is True
            if row.state != "resolved" or not approved:
                continue
            if row.name == BUDGET_WAIT_WORK and row.work_id == work_id:
                work_raises += 1
            elif row.name == BUDGET_WAIT_CONVERSATION:
                conversation_raises += 1
        return BudgetUsage(
            work_spent, work_raises, conversation_spent, conversation_raises, wait_at_seq
        )

    async def work_usage(self, work_id: str) -> UsageTotals:
        """The model calls of one work item, totalled."""
        q = (
            sa.select(*_totals_columns())
            .select_from(step_t.join(work_t, W.id == S.work_id))
            .where(_model_calls(), S.work_id == work_id)
        )
        async with self._read() as conn:
            return _totals((await conn.execute(q)).one())

    async def usage_totals(
        self,
        by: str,
        *,
        agent: str | None = None,
        conversation_id: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
    ) -> tuple[list[tuple[str | None, UsageTotals]], UsageTotals]:
        """Model calls grouped ``by`` agent, model (the one asked), conversation or work item,
        the most expensive first, and the grand total over every group. Filters: ``agent``,
        ``conversation_id``, calls finished at or after ``since``."""
        if by not in USAGE_GROUPS:
            raise ValueError(f"usage is grouped by one of {USAGE_GROUPS}, not {by!r}")
        key = {
            "agent": W.agent,
            "model": S.model,
            "conversation": W.conversation_id,
            "work": S.work_id,
        }[by]
        where = [_model_calls()]
        if agent is not None:
            where.append(W.agent == agent)
        if conversation_id is not None:
            where.append(W.conversation_id == conversation_id)
        if since is not None:
            where.append(S.finished_at >= since)
        joined = step_t.join(work_t, W.id == S.work_id)
        cost = sa.func.coalesce(sa.func.sum(S.cost), 0.0)
        grouped = (
            sa.select(key.label("key"), *_totals_columns())
            .select_from(joined)
            .where(*where)
            .group_by(key)
            .order_by(cost.desc(), sa.func.count().desc(), key)
            .limit(limit)
        )
        total = sa.select(*_totals_columns()).select_from(joined).where(*where)
        async with self._read() as conn:
            rows = (await conn.execute(grouped)).all()
            overall = _totals((await conn.execute(total)).one())
        return [(r.key, _totals(r)) for r in rows], overall


__all__ = [
    "BUDGET_WAIT_CONVERSATION",
    "BUDGET_WAIT_WORK",
    "OPERATOR_CHANNEL",
    "USAGE_GROUPS",
    "BudgetUsage",
    "UsageQueries",
    "UsageTotals",
]
