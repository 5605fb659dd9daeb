"""What is different on SQLite: connection pragmas, ``BEGIN IMMEDIATE``, the history triggers
and the WAL checkpointer.

Imported only by :mod:`ledger.engine` and the migrations.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from typing import Any

import sqlalchemy as sa

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 30_000
#: seconds between the checkpointer's passes (while there are new commits)
CHECKPOINT_INTERVAL = 0.5


def configure(
    engine: sa.Engine,
    *,
    synchronous: str = "FULL",
    readonly: bool = False,
    autocheckpoint: bool = True,
) -> None:
    """WAL, busy timeout and foreign keys on every connection; writers take the lock at BEGIN.

    With the driver's own transaction handling switched off, SQLAlchemy's ``begin`` emits
    ``BEGIN IMMEDIATE`` (``BEGIN`` for the read-only engine), so two writers never deadlock on a
    lock upgrade ("database is locked") and claims are serialised.
    """

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute(f"PRAGMA synchronous = {synchronous}")
        cur.execute("PRAGMA foreign_keys = ON")
        if not autocheckpoint:  # a Checkpointer does it, off the committing thread
            cur.execute("PRAGMA wal_autocheckpoint = 0")
        cur.close()

    begin_sql = "BEGIN" if readonly else "BEGIN IMMEDIATE"

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql(begin_sql)


#: Every work transition and every step record appends to ``event`` in the same transaction.
TRIGGERS: list[str] = [
    """
    CREATE TRIGGER IF NOT EXISTS work_created_event AFTER INSERT ON work BEGIN
      INSERT INTO event (work_id, type, data, actor, created_at)
      VALUES (NEW.id, NEW.state_reason,
              json_object('to', NEW.state, 'agent', NEW.agent, 'attempt', NEW.attempt,
                          'parent_id', NEW.parent_id, 'detail', json(NEW.state_detail)),
              json_extract(NEW.state_detail, '$.actor'), NEW.created_at);
    END
    """,
    """
    CREATE TRIGGER IF NOT EXISTS work_transition_event AFTER UPDATE ON work
    WHEN NEW.updated_at IS NOT OLD.updated_at BEGIN
      INSERT INTO event (work_id, type, data, actor, created_at)
      VALUES (NEW.id, NEW.state_reason,
              json_object('from', OLD.state, 'to', NEW.state, 'attempt', NEW.attempt,
                          'epoch', NEW.lease_epoch, 'owner', NEW.lease_owner,
                          'detail', json(NEW.state_detail)),
              json_extract(NEW.state_detail, '$.actor'), NEW.updated_at);
    END
    """,
    """
    CREATE TRIGGER IF NOT EXISTS step_recorded_event AFTER INSERT ON step BEGIN
      INSERT INTO event (work_id, type, data, actor, created_at)
      VALUES (NEW.work_id,
              CASE NEW.status WHEN 'running' THEN 'step_started'
                              WHEN 'succeeded' THEN 'step_completed'
                              ELSE CASE WHEN NEW.error_type = 'HeartbeatTimeout'
                                        THEN 'heartbeat_timeout' ELSE 'step_failed' END END,
              json_object('seq', NEW.seq, 'name', NEW.name, 'attempt', NEW.attempt,
                          'error', json(NEW.error)),
              NULL, COALESCE(NEW.finished_at, NEW.started_at));
    END
    """,
    """
    CREATE TRIGGER IF NOT EXISTS step_changed_event AFTER UPDATE ON step
    WHEN NEW.status IS NOT OLD.status OR NEW.attempt IS NOT OLD.attempt BEGIN
      INSERT INTO event (work_id, type, data, actor, created_at)
      VALUES (NEW.work_id,
              CASE NEW.status WHEN 'running' THEN 'step_started'
                              WHEN 'succeeded' THEN 'step_completed'
                              ELSE CASE WHEN NEW.error_type = 'HeartbeatTimeout'
                                        THEN 'heartbeat_timeout' ELSE 'step_failed' END END,
              json_object('seq', NEW.seq, 'name', NEW.name, 'attempt', NEW.attempt,
                          'error', json(NEW.error)),
              NULL, COALESCE(NEW.finished_at, NEW.started_at));
    END
    """,
]

DROP_TRIGGERS: list[str] = [
    "DROP TRIGGER IF EXISTS work_created_event",
    "DROP TRIGGER IF EXISTS work_transition_event",
    "DROP TRIGGER IF EXISTS step_recorded_event",
    "DROP TRIGGER IF EXISTS step_changed_event",
]


class Checkpointer:
    """Copies the WAL back into the database file on its own thread and connection.

    By default SQLite checkpoints inside the ``COMMIT`` that grows the WAL past 1,000 pages:
    that commit then also writes those pages to the database file and fsyncs it, and every
    transaction queued behind it waits (40-215 ms on this project's shared disk, several times
    a second at 200 messages/s). The ledger's writer connection turns that off
    (``wal_autocheckpoint = 0``) and this thread runs ``PRAGMA wal_checkpoint(PASSIVE)`` every
    ``interval`` seconds while there are new commits: a passive checkpoint never blocks the
    writer, which keeps appending to the WAL meanwhile.
    """

    def __init__(self, path: str, interval: float = CHECKPOINT_INTERVAL) -> None:
        self._path = path
        self._interval = interval
        self._stop = threading.Event()
        self._dirty = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="tether-sqlite-checkpoint", daemon=True
        )
        #: checkpoint passes run so far
        self.passes = 0

    def start(self) -> None:
        self._thread.start()

    def wrote(self) -> None:
        """The writer committed: the next pass has work to do."""
        self._dirty.set()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            while not self._stop.wait(self._interval):
                if not self._dirty.is_set():
                    continue
                self._dirty.clear()
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    self.passes += 1
                except sqlite3.Error as exc:  # busy or the file is gone: the next pass retries
                    log.warning("WAL checkpoint failed: %s", exc)
                    self._dirty.set()
        finally:
            conn.close()
