"""What is different on PostgreSQL: history triggers with ``NOTIFY`` wake-ups, and ``LISTEN``.

Imported only by :mod:`ledger.engine`, :mod:`ledger.ledger` and the migrations.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

log = logging.getLogger(__name__)

#: Channel that wakes idle workers when work becomes queued.
WORK_CHANNEL = "tether_work"
#: Channel that tells the owning worker of a pause or cancel request (payload: work id).
CONTROL_CHANNEL = "tether_control"
#: Channel that tells schedulers a wait with a deadline was opened (payload: wait id).
WAIT_CHANNEL = "tether_wait"
#: seconds :meth:`Listener.start` waits for its first connection
FIRST_CONNECT_WAIT = 5.0

TRIGGERS: list[str] = [
    """
    CREATE OR REPLACE FUNCTION tether_work_event() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      IF TG_OP = 'INSERT' THEN
        INSERT INTO event (work_id, type, data, actor, created_at)
        VALUES (NEW.id, NEW.state_reason,
                jsonb_build_object('to', NEW.state, 'agent', NEW.agent, 'attempt', NEW.attempt,
                                   'parent_id', NEW.parent_id, 'detail', NEW.state_detail),
                NEW.state_detail->>'actor', NEW.created_at);
      ELSE
        INSERT INTO event (work_id, type, data, actor, created_at)
        VALUES (NEW.id, NEW.state_reason,
                jsonb_build_object('from', OLD.state, 'to', NEW.state, 'attempt', NEW.attempt,
                                   'epoch', NEW.lease_epoch, 'owner', NEW.lease_owner,
                                   'detail', NEW.state_detail),
                NEW.state_detail->>'actor', NEW.updated_at);
        IF NEW.control IS DISTINCT FROM OLD.control AND NEW.control IS NOT NULL THEN
          PERFORM pg_notify('tether_control', NEW.id);
        END IF;
      END IF;
      IF NEW.state = 'queued' THEN
        PERFORM pg_notify('tether_work', '');
      END IF;
      RETURN NULL;
    END $$
    """,
    """
    CREATE TRIGGER work_created_event AFTER INSERT ON work
    FOR EACH ROW EXECUTE FUNCTION tether_work_event()
    """,
    """
    CREATE TRIGGER work_transition_event AFTER UPDATE ON work
    FOR EACH ROW WHEN (NEW.updated_at IS DISTINCT FROM OLD.updated_at)
    EXECUTE FUNCTION tether_work_event()
    """,
    """
    CREATE OR REPLACE FUNCTION tether_step_event() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      INSERT INTO event (work_id, type, data, actor, created_at)
      VALUES (NEW.work_id,
              CASE NEW.status WHEN 'running' THEN 'step_started'
                              WHEN 'succeeded' THEN 'step_completed'
                              ELSE CASE WHEN NEW.error_type = 'HeartbeatTimeout'
                                        THEN 'heartbeat_timeout' ELSE 'step_failed' END END,
              jsonb_build_object('seq', NEW.seq, 'name', NEW.name, 'attempt', NEW.attempt,
                                 'error', NEW.error),
              NULL, COALESCE(NEW.finished_at, NEW.started_at));
      RETURN NULL;
    END $$
    """,
    """
    CREATE TRIGGER step_recorded_event AFTER INSERT ON step
    FOR EACH ROW EXECUTE FUNCTION tether_step_event()
    """,
    """
    CREATE TRIGGER step_changed_event AFTER UPDATE ON step
    FOR EACH ROW WHEN (NEW.status IS DISTINCT FROM OLD.status
                       OR NEW.attempt IS DISTINCT FROM OLD.attempt)
    EXECUTE FUNCTION tether_step_event()
    """,
]

DROP_TRIGGERS: list[str] = [
    "DROP TRIGGER IF EXISTS work_created_event ON work",
    "DROP TRIGGER IF EXISTS work_transition_event ON work",
    "DROP TRIGGER IF EXISTS step_recorded_event ON step",
    "DROP TRIGGER IF EXISTS step_changed_event ON step",
    "DROP FUNCTION IF EXISTS tether_work_event()",
    "DROP FUNCTION IF EXISTS tether_step_event()",
]


def asyncpg_dsn(url: str) -> str:
    """The plain ``postgresql://`` DSN asyncpg wants, from a SQLAlchemy URL."""
    u = make_url(url).set(drivername="postgresql")
    return u.render_as_string(hide_password=False)


class Listener:
    """One dedicated asyncpg connection that ``LISTEN``s and calls back on each notification.

    Reconnects with backoff when the connection drops; callers fall back to polling meanwhile.
    """

    def __init__(self, url: str, handlers: dict[str, Callable[[str], None]]) -> None:
        self._dsn = asyncpg_dsn(url)
        self._handlers = handlers
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._first_attempt = asyncio.Event()

    async def start(self, wait: float = FIRST_CONNECT_WAIT) -> None:
        """Start listening; return once the first connection attempt is over (``LISTEN`` is
        active, or it failed and retries in the background), or after ``wait`` seconds. So a
        worker that starts claiming right after is already told of what happens next (a lease
        renewal woken by the catch-up of a late connection raced a test's expired lease)."""
        self._task = asyncio.create_task(self._run(), name="tether-pg-listen")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._first_attempt.wait(), wait)

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _run(self) -> None:
        delay = 0.5
        while not self._stopping.is_set():
            conn: Any = None
            try:
                conn = await asyncpg.connect(self._dsn)
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _c, ev=lost: ev.set())
                for channel, handler in self._handlers.items():
                    await conn.add_listener(
                        channel, lambda _c, _pid, _ch, payload, h=handler: h(payload)
                    )
                delay = 0.5
                # A missed notification during reconnect is covered by the caller's poll.
                for handler in self._handlers.values():
                    handler("")
                self._first_attempt.set()
                await lost.wait()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database went away: retry, callers poll meanwhile
                log.warning("LISTEN connection failed (%s); retrying in %.1fs", exc, delay)
                self._first_attempt.set()
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
