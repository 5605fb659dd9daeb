"""The outbox, for the delivery loop: claims of pending outbound messages and their outcomes.

A claim moves a ``pending`` row to ``sending`` (attempts + 1) and, while it is ``sending``, its
``next_attempt_at`` is the claim's deadline: past it, :meth:`OutboxQueries.reap_outbox` marks the
row ``unknown`` (the sender died mid-send; the message may or may not have gone out). Per
conversation, rows go out in order: a row is claimable only when no older row of its
conversation is ``pending``, ``sending`` or ``unknown``. Every outcome is conditional on the row
still being ``sending`` (and, when given, on the claim's attempt), so a late answer for a row an
operator already abandoned, or that was reaped and claimed again, changes nothing. Imported only
by :mod:`ledger.ledger`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ledger._base import LedgerBase
from ledger.prepared import Prepared, PreparedCache
from ledger.records import utcnow
from ledger.schema import conversation_t, outbox_t

O = outbox_t.c  # noqa: E741
C = conversation_t.c

#: outbox states that hold back the younger rows of their conversation
BLOCKING_STATES = ("pending", "sending", "unknown")


@dataclass(frozen=True, slots=True)
class ClaimedOutbound:
    """One claimed outbox row with its conversation's address (see ``OutboundMessage``)."""

    outbox_id: int
    channel: str
    chat_id: str
    thread_id: str
    text: str
    attempts: int
    conversation_id: str | None = None
    work_id: str | None = None
    wait_id: str | None = None
    actions: list[dict[str, Any]] = field(default_factory=list)
    payload: dict[str, Any] = field(default_factory=dict)


def _older_blocking() -> Any:
    """An older row of the same conversation is still pending, being sent, or in doubt."""
    other = outbox_t.alias("older")
    return (
        sa.exists()
        .where(
            other.c.conversation_id == O.conversation_id,
            other.c.id < O.id,
            sa.or_(*(other.c.state == s for s in BLOCKING_STATES)),  # no per-call IN list
        )
        .correlate(outbox_t)
    )


def _outbox_claim_statement(dialect: str, channels: tuple[str, ...] | None) -> Prepared:
    """``UPDATE outbox … RETURNING id`` that claims up to ``:limit`` due rows (see
    :meth:`OutboxQueries.claim_outbox`). Bound: ``now``, ``limit``, ``due`` and one
    ``channel_<i>`` per channel."""
    now = sa.bindparam("now", type_=O.next_attempt_at.type)
    pick = (
        sa.select(O.id)
        .where(
            O.state == "pending",
            sa.or_(O.next_attempt_at.is_(None), O.next_attempt_at <= now),
            sa.or_(O.conversation_id.is_(None), ~_older_blocking()),
        )
        .order_by(O.id)
        .limit(sa.bindparam("limit", type_=sa.Integer))
    )
    if channels is not None:
        pick = pick.where(
            sa.or_(*(O.channel == sa.bindparam(f"channel_{i}") for i in range(len(channels))))
        )
    picked: Any = pick.scalar_subquery()
    where = [O.id.in_(picked)]
    if dialect == "postgresql":
        # materialized: the pick is locked once, not rescanned per updated row (see
        # ``claim_work``); a row picked and locked may have changed meanwhile: check again
        cte = pick.with_for_update(skip_locked=True).cte("picked").prefix_with("MATERIALIZED")
        where = [O.id.in_(sa.select(cte.c.id)), O.state == "pending"]
    return Prepared(
        sa.update(outbox_t)
        .where(*where)
        .values(
            state="sending",
            attempts=O.attempts + 1,
            next_attempt_at=sa.bindparam("due", type_=O.next_attempt_at.type),
        )
        .returning(O.id)
    )


def _finish_statement(key: tuple[tuple[str, ...], bool]) -> Prepared:
    """``sending`` → the columns ``key[0]`` (bound as ``v_<column>``) of row ``p_id``, and
    only while its attempt is ``p_attempt`` if ``key[1]``."""
    columns, by_attempt = key
    cond = [O.id == sa.bindparam("p_id"), O.state == "sending"]
    if by_attempt:
        cond.append(O.attempts == sa.bindparam("p_attempt"))
    sets = {k: sa.bindparam(f"v_{k}", type_=outbox_t.c[k].type) for k in columns}
    return Prepared(sa.update(outbox_t).where(*cond).values(**sets).returning(O.id))


#: claimed rows with their conversation's address
_CLAIMED = sa.select(outbox_t, C.chat_id, C.thread_id).select_from(
    outbox_t.outerjoin(conversation_t, C.id == O.conversation_id)
)
_CLAIMED_ROW = Prepared(_CLAIMED.where(O.id == sa.bindparam("outbox_id")))


class OutboxQueries(LedgerBase):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._outbox_claims = PreparedCache(partial(_outbox_claim_statement, self.dialect))
        self._finishes = PreparedCache(_finish_statement)

    async def claim_outbox(
        self,
        owner: str,
        *,
        limit: int,
        lease_ttl: float,
        channels: Sequence[str] | None = None,
    ) -> list[ClaimedOutbound]:
        """Move up to ``limit`` due ``pending`` rows (of ``channels``, when given) to
        ``sending`` with attempts + 1: at most one per conversation, its oldest undelivered one.
        ``owner`` names the claimer in logs only. The claim's deadline (``next_attempt_at``
        while ``sending``) is ``lease_ttl`` seconds away."""
        if limit <= 0 or (channels is not None and not channels):
            return []
        now = utcnow()
        key = None if channels is None else tuple(channels)
        stmt = self._outbox_claims.get(key)
        params: dict[str, Any] = {
            "now": now,
            "limit": limit,
            "due": now + timedelta(seconds=lease_ttl),
            **{f"channel_{i}": c for i, c in enumerate(key or ())},
        }

        def tx(conn: Connection) -> list[Any]:
            ids = [r.id for r in stmt.run(conn, params)]
            if not ids:
                return []
            if len(ids) == 1:
                return _CLAIMED_ROW.run(conn, {"outbox_id": ids[0]})
            return list(conn.execute(_CLAIMED.where(O.id.in_(ids)).order_by(O.id)).all())

        rows = await self.engines.run_write(tx)
        claimed = []
        for r in rows:
            payload = dict(r.payload or {})
            claimed.append(
                ClaimedOutbound(
                    outbox_id=r.id,
                    channel=r.channel,
                    chat_id=r.chat_id or "",
                    thread_id=r.thread_id or "",
                    text=str(payload.get("text", "")),
                    attempts=r.attempts,
                    conversation_id=r.conversation_id,
                    work_id=r.work_id,
                    wait_id=payload.get("wait_id"),
                    actions=list(payload.get("actions") or []),
                    payload=payload,
                )
            )
        return claimed

    async def _finish_sending(
        self, outbox_id: int, attempt: int | None, values: dict[str, Any]
    ) -> bool:
        stmt = self._finishes.get((tuple(values), attempt is not None))
        params = {
            "p_id": outbox_id,
            "p_attempt": attempt,
            **{f"v_{k}": v for k, v in values.items()},
        }
        row = await self.engines.run_write(lambda conn: stmt.first(conn, params))
        return row is not None

    async def mark_outbox_sent(
        self, outbox_id: int, external_id: str | None, *, attempt: int | None = None
    ) -> bool:
        """``sending`` → ``sent`` with the platform's message id. ``False``: nothing changed
        (the row is no longer ``sending`` or, with ``attempt``, was claimed again since)."""
        return await self._finish_sending(
            outbox_id,
            attempt,
            {
                "state": "sent",
                "external_id": external_id,
                "sent_at": utcnow(),
                "next_attempt_at": None,
                "error": None,
            },
        )

    async def mark_outbox_retry(
        self,
        outbox_id: int,
        after_seconds: float,
        error: str | None,
        *,
        attempt: int | None = None,
    ) -> bool:
        """``sending`` → ``pending``, due again in ``after_seconds``."""
        due = utcnow() + timedelta(seconds=max(0.0, after_seconds))
        return await self._finish_sending(
            outbox_id,
            attempt,
            {"state": "pending", "next_attempt_at": due, "error": _clip(error)},
        )

    async def mark_outbox_unknown(
        self, outbox_id: int, error: str | None, *, attempt: int | None = None
    ) -> bool:
        """``sending`` → ``unknown``: it may have been delivered; an operator decides."""
        return await self._finish_sending(
            outbox_id,
            attempt,
            {"state": "unknown", "next_attempt_at": None, "error": _clip(error)},
        )

    async def mark_outbox_failed(
        self, outbox_id: int, error: str | None, *, attempt: int | None = None
    ) -> bool:
        """``sending`` → ``failed``: the platform refused it for good."""
        return await self._finish_sending(
            outbox_id,
            attempt,
            {"state": "failed", "next_attempt_at": None, "error": _clip(error)},
        )

    async def reap_outbox(self, *, limit: int = 500) -> list[int]:
        """``sending`` rows past their claim's deadline → ``unknown`` (whoever sent them died
        or hung mid-send). Returns their ids."""
        postgres = self.dialect == "postgresql"

        def tx(conn: Connection) -> list[int]:
            now = utcnow()
            pick = (
                sa.select(O.id)
                .where(O.state == "sending", O.next_attempt_at < now)
                .order_by(O.id)
                .limit(limit)
            )
            picked: Any = pick.scalar_subquery()
            if postgres:
                cte = (
                    pick.with_for_update(skip_locked=True).cte("stale").prefix_with("MATERIALIZED")
                )
                picked = sa.select(cte.c.id)
            stmt = (
                sa.update(outbox_t)
                .where(O.id.in_(picked), O.state == "sending")
                .values(
                    state="unknown",
                    next_attempt_at=None,
                    error="delivery interrupted: the sender stopped before it answered",
                )
                .returning(O.id)
            )
            return sorted(r.id for r in conn.execute(stmt).all())

        return await self.engines.run_write(tx)

    async def pending_outbox_channels(self) -> list[str]:
        """The channels that have ``pending`` outbound messages."""
        q = sa.select(O.channel).where(O.state == "pending").distinct()
        async with self._read() as conn:
            return sorted(r.channel for r in await conn.execute(q))


def _clip(error: str | None) -> str | None:
    return None if error is None else error[:2000]


__all__ = ["BLOCKING_STATES", "ClaimedOutbound", "OutboxQueries"]
