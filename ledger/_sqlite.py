"""What is different on SQLite: connection pragmas, ``BEGIN IMMEDIATE`` and the history triggers.

Imported only by :mod:`ledger.engine` and the migrations.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

BUSY_TIMEOUT_MS = 30_000


def configure(engine: sa.Engine, *, synchronous: str = "FULL", readonly: bool = False) -> None:
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
