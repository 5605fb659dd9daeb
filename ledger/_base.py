"""What every part of the ledger shares: engines, wake-up callbacks, lease checks, helpers.

Imported only by the ledger's own modules.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, OperationalError

from ledger import _postgres
from ledger.engine import Engines, create_engines
from ledger.errors import LeaseLost, LedgerUnavailable
from ledger.prepared import Prepared
from ledger.records import Claim
from ledger.schema import wait_t, work_t, worker_t
from ledger.states import WorkState

log = logging.getLogger("ledger")

W = work_t.c

#: Clears a work item's lease when it leaves ``running``.
RELEASE: dict[str, Any] = {"lease_owner": None, "lease_expires_at": None}


class LedgerBase:
    """Connection handling and wake-ups; the query mixins build on it."""

    def __init__(self, engines: Engines) -> None:
        self.engines = engines
        self.dialect = engines.dialect
        self._insert = sqlite_dialect.insert if self.dialect == "sqlite" else pg_dialect.insert
        #: in-process wake-ups (SQLite, and the embedded `serve`): called after commits
        self._on_queued: list[Callable[[str], None]] = []
        self._on_control: list[Callable[[str], None]] = []
        self._on_wait: list[Callable[[str], None]] = []
        self._listener: _postgres.Listener | None = None

    @classmethod
    async def open(
        cls, url: str, *, migrate: bool = False, sqlite_synchronous: str = "FULL"
    ) -> Any:
        """Connect to ``url``; with ``migrate`` apply pending migrations first."""
        engines = create_engines(url, sqlite_synchronous=sqlite_synchronous)
        if migrate:
            from ledger.migrate import upgrade

            try:
                await upgrade(engines)
            except (OperationalError, DBAPIError, OSError) as exc:
                await engines.dispose()
                raise LedgerUnavailable(f"cannot migrate the database: {exc}") from exc
        return cls(engines)

    async def close(self) -> None:
        if self._listener is not None:
            await self._listener.stop()
            self._listener = None
        await self.engines.dispose()

    async def ping(self) -> None:
        """Raise :class:`LedgerUnavailable` unless the database answers and is migrated."""
        try:
            async with self.engines.read.connect() as conn:
                await conn.execute(sa.select(sa.func.count()).select_from(worker_t))
        except (OperationalError, DBAPIError, OSError) as exc:
            raise LedgerUnavailable(str(exc).splitlines()[0]) from exc

    # -- wake-ups ----------------------------------------------------------------------------

    def on_work_queued(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(agent_or_empty)`` when work may be claimable (this process or, on
        PostgreSQL after :meth:`listen`, any process)."""
        self._on_queued.append(callback)

    def on_control(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(work_id)`` when a pause or cancel is requested ('' = check all)."""
        self._on_control.append(callback)

    def on_wait_deadline(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(wait_id)`` when a wait with a deadline may have been opened."""
        self._on_wait.append(callback)

    async def listen(self) -> None:
        """On PostgreSQL, start ``LISTEN`` for wake-ups from other processes (no-op on SQLite)."""
        if self.dialect != "postgresql" or self._listener is not None:
            return
        self._listener = _postgres.Listener(
            self.engines.url,
            {
                _postgres.WORK_CHANNEL: lambda p: self._fire(self._on_queued, p),
                _postgres.CONTROL_CHANNEL: lambda p: self._fire(self._on_control, p),
                _postgres.WAIT_CHANNEL: lambda p: self._fire(self._on_wait, p),
            },
        )
        await self._listener.start()

    @staticmethod
    def _fire(callbacks: Iterable[Callable[[str], None]], payload: str) -> None:
        for cb in list(callbacks):
            try:
                cb(payload)
            except Exception:  # a broken subscriber must not break a commit path
                log.exception("wake-up callback failed")

    def _read(self) -> Any:
        return self.engines.read.connect()

    # -- shared pieces of write transactions -------------------------------------------------

    def greatest(self, a: Any, b: Any) -> Any:
        return sa.func.max(a, b) if self.dialect == "sqlite" else sa.func.greatest(a, b)


_LEASE = Prepared(sa.select(W.state, W.lease_epoch).where(W.id == sa.bindparam("work_id")))
_CLOSE_WAITS = Prepared(
    sa.update(wait_t)
    .where(wait_t.c.work_id == sa.bindparam("of_work"), wait_t.c.state == "pending")
    .values(state="cancelled", resolved_at=sa.bindparam("now"), resolved_by="system")
)


def check_lease(conn: Connection, claim: Claim) -> None:
    """Raise :class:`LeaseLost` unless ``claim`` still holds its item's lease."""
    row = _LEASE.first(conn, {"work_id": claim.work_id})
    if row is None or row.lease_epoch != claim.epoch or row.state != WorkState.RUNNING.value:
        raise LeaseLost(claim.work_id, claim.epoch)


def fenced_transition(
    conn: Connection,
    claim: Claim,
    target: WorkState,
    reason: str,
    values: dict[str, Any],
    now: Any,
) -> None:
    """running → ``target`` only while ``claim``'s epoch is current, else :class:`LeaseLost`."""
    values = {"state_detail": None, **values}
    done = conn.execute(
        sa.update(work_t)
        .where(
            W.id == claim.work_id,
            W.lease_epoch == claim.epoch,
            W.state == WorkState.RUNNING.value,
        )
        .values(state=target.value, state_reason=reason, updated_at=now, **values)
        .returning(W.id)
    ).first()
    if done is None:
        raise LeaseLost(claim.work_id, claim.epoch, f"could not record {reason}")


def wake_joined_parent(conn: Connection, parent_id: str | None, child_id: str, now: Any) -> None:
    """A finished child wakes the parent that waits in ``join`` on it."""
    if parent_id is None:
        return
    conn.execute(
        sa.update(work_t)
        .where(
            W.id == parent_id,
            W.state == WorkState.WAITING.value,
            W.wait_reason == f"join {child_id}",
        )
        .values(
            state=WorkState.QUEUED.value,
            wait_reason=None,
            state_reason="resumed",
            state_detail={"child_id": child_id},
            updated_at=now,
        )
    )


def close_open_waits(conn: Connection, work_id: str, now: Any) -> None:
    """A finished work item's pending waits (e.g. an unused resume URL) are cancelled."""
    _CLOSE_WAITS.run(conn, {"of_work": work_id, "now": now})


def error_summary(error: dict[str, Any]) -> str:
    return f"{error.get('type', 'Error')}: {error.get('message', '')}"[:500]
