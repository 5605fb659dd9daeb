"""Engines for the ledger's database: SQLite (embedded) or PostgreSQL (scale-out).

Every write the ledger makes is a plain function over a SQLAlchemy ``Connection``, run inside one
transaction by :meth:`Engines.run_write`:

* SQLite: on one dedicated writer thread with a synchronous ``pysqlite`` connection (one thread
  hop per transaction instead of one per statement, and in-process writers queue for the
  thread instead of colliding on the file lock). The writer commits in groups: whatever
  transactions queued up while it was busy run together in one ``BEGIN IMMEDIATE … COMMIT``,
  each inside its own savepoint, so one that raises is rolled back alone and the others commit
  (one commit and one fsync for the group). Every caller is answered only after the group's
  ``COMMIT``; a failed ``COMMIT`` fails them all, and nothing of theirs is written. Urgent
  transactions (a platform waits for the ack) form groups of their own, taken first and
  alternating with the others' groups when both wait;
* PostgreSQL: on a pooled asyncpg connection through ``AsyncConnection.run_sync``.

Reads go through the async engine. Imports only the ledger's dialect modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ledger import _sqlite

T = TypeVar("T")

#: the most transactions the SQLite writer runs in one group commit
MAX_GROUP = 64
#: a pooled PostgreSQL connection idle longer than this is pinged before it is handed out
PING_AFTER_IDLE = 1.0


@dataclass(slots=True)
class _Job:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


def _end_open_transaction(conn: Connection) -> None:
    """A ``COMMIT`` that SQLite refused (a deferred constraint, a full disk) leaves the
    transaction open: roll it back, so the next ``BEGIN`` starts clean."""
    dbapi = conn.connection.dbapi_connection
    if dbapi is not None and dbapi.in_transaction:  # type: ignore[attr-defined]
        dbapi.execute("ROLLBACK")  # type: ignore[attr-defined]


def _settle(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.done():  # the caller was cancelled; the transaction's outcome stands
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


@dataclass
class Engines:
    """The async engines (``write`` for migrations and tests, ``read`` for queries) and, on
    SQLite, the synchronous writer the ledger's transactions run on."""

    url: str
    dialect: str
    write: AsyncEngine
    read: AsyncEngine
    sync_write: sa.Engine | None = None
    #: PostgreSQL: ``write`` with ``AUTOCOMMIT`` (same pool), for :meth:`run_single`
    autocommit: AsyncEngine | None = None
    _executor: ThreadPoolExecutor | None = field(default=None, repr=False)
    _queue: deque[_Job] = field(default_factory=deque, repr=False)
    #: transactions someone outside is waiting on (an inbound request to ack): they go first
    _urgent: deque[_Job] = field(default_factory=deque, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _draining: bool = field(default=False, repr=False)
    #: the last group was urgent transactions: if others wait, they go next
    _after_urgent: bool = field(default=False, repr=False)
    #: SQLite: checkpoints the WAL off the writer thread (``None`` for in-memory databases)
    checkpointer: _sqlite.Checkpointer | None = field(default=None, repr=False)
    #: SQLite group commits so far: (transactions committed, groups); for benchmarks
    groups: list[int] = field(default_factory=lambda: [0, 0], repr=False)

    @property
    def write_dialect(self) -> sa.Dialect:
        """The dialect the ledger's write transactions run with."""
        return (self.sync_write or self.write).dialect

    async def run_write(self, fn: Callable[..., T], *args: Any, urgent: bool = False) -> T:
        """Run ``fn(connection, *args)`` in a write transaction; return once it committed.
        If ``fn`` raises, nothing it wrote is kept and the exception is raised here. On SQLite,
        ``urgent`` transactions (a platform waits for the ack) commit in groups of their own,
        taken before the others (alternating with them when both keep coming)."""
        if self.sync_write is not None:
            loop = asyncio.get_running_loop()
            future: asyncio.Future[T] = loop.create_future()
            with self._lock:
                (self._urgent if urgent else self._queue).append(_Job(fn, args, future, loop))
                start = not self._draining
                self._draining = True
            if start:
                assert self._executor is not None
                self._executor.submit(self._drain)
            return await future
        async with self.write.begin() as conn:
            return await conn.run_sync(fn, *args)

    def _drain(self) -> None:
        """The writer thread: commit queued transactions, in groups, until none is left."""
        while True:
            with self._lock:
                if not self._queue and not self._urgent:
                    self._draining = False
                    return
                # Someone outside waits on an urgent transaction (an ack): commit those in a
                # group of their own, not behind the queued ones in the same group; alternate
                # when both wait, so a flood of urgent ones cannot starve the workers.
                urgent = bool(self._urgent) and not (self._queue and self._after_urgent)
                queue = self._urgent if urgent else self._queue
                self._after_urgent = urgent
                group = [queue.popleft() for _ in range(min(len(queue), MAX_GROUP))]
            self._commit_group(group)

    def _commit_group(self, group: list[_Job]) -> None:
        assert self.sync_write is not None
        outcomes: list[tuple[bool, Any]] = []
        with self.sync_write.connect() as conn:
            try:
                with conn.begin():
                    if len(group) == 1:
                        outcomes.append((True, group[0].fn(conn, *group[0].args)))
                    else:
                        for job in group:
                            savepoint = conn.begin_nested()
                            try:
                                value = job.fn(conn, *job.args)
                            except Exception as exc:
                                savepoint.rollback()
                                outcomes.append((False, exc))
                            else:
                                savepoint.commit()
                                outcomes.append((True, value))
            except Exception as exc:  # the lone transaction raised, or BEGIN / COMMIT failed
                outcomes = [(False, exc)] * len(group)
                _end_open_transaction(conn)
        self.groups[0] += len(group)
        self.groups[1] += 1
        if self.checkpointer is not None:
            self.checkpointer.wrote()
        for job, (ok, value) in zip(group, outcomes, strict=True):
            with contextlib.suppress(RuntimeError):  # that caller's event loop is closed
                job.loop.call_soon_threadsafe(_settle, job.future, ok, value)

    async def run_single(self, fn: Callable[..., T], *args: Any, urgent: bool = False) -> T:
        """Like :meth:`run_write`, for ``fn`` that writes with ONE statement (and at most reads
        besides, whose atomicity with it does not matter). On PostgreSQL the statement runs in
        its own implicit transaction, without ``BEGIN`` and ``COMMIT``: one round trip instead
        of three. Returns once it committed; if it fails, nothing was written."""
        if self.autocommit is None:
            return await self.run_write(fn, *args, urgent=urgent)
        async with self.autocommit.connect() as conn:
            return await conn.run_sync(fn, *args)

    async def run_read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(connection, *args)`` on a read connection."""
        async with self.read.connect() as conn:
            return await conn.run_sync(fn, *args)

    async def dispose(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        if self.checkpointer is not None:
            self.checkpointer.stop()
        if self.sync_write is not None:
            self.sync_write.dispose()
        await self.write.dispose()
        if self.read is not self.write:
            await self.read.dispose()


def _ping_when_idle(engine: sa.Engine, idle: float) -> None:
    """Like ``pool_pre_ping``, but only for connections that sat in the pool for ``idle``
    seconds: a busy worker reuses its connections within milliseconds, and a ping per
    transaction would cost it a round trip per step. A connection that fails its ping is
    replaced (the pool retries the checkout); one that breaks in use invalidates the pool."""

    @sa.event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_conn: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @sa.event.listens_for(engine, "checkout")
    def _checked_out(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("idle_since")
        if since is None or time.monotonic() - since < idle:
            return
        try:
            alive = engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:
            raise sa.exc.DisconnectionError(f"stale pooled connection: {exc}") from exc
        if not alive:
            raise sa.exc.DisconnectionError("stale pooled connection")


def create_engines(url: str, *, sqlite_synchronous: str = "FULL", pool_size: int = 10) -> Engines:
    """Build the engines for ``url`` (``sqlite+aiosqlite://`` or ``postgresql+asyncpg://``)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        # Every transaction ends in an explicit commit or rollback: skip the pool's extra one.
        write = create_async_engine(url, pool_reset_on_return=None)
        _sqlite.configure(write.sync_engine, synchronous=sqlite_synchronous)
        read = create_async_engine(url, pool_reset_on_return=None)
        _sqlite.configure(read.sync_engine, synchronous=sqlite_synchronous, readonly=True)
        sync_write = sa.create_engine(
            parsed.set(drivername="sqlite+pysqlite"),
            pool_size=1,
            max_overflow=0,
            pool_reset_on_return=None,
        )
        checkpointer = None
        if parsed.database and parsed.database != ":memory:":
            checkpointer = _sqlite.Checkpointer(parsed.database)
            checkpointer.start()
        _sqlite.configure(
            sync_write, synchronous=sqlite_synchronous, autocheckpoint=checkpointer is None
        )
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tether-sqlite-writer")
        return Engines(
            url,
            "sqlite",
            write,
            read,
            sync_write=sync_write,
            checkpointer=checkpointer,
            _executor=executor,
        )
    if parsed.get_backend_name() == "postgresql":
        # LIFO: the connections in use stay hot and skip the idle ping; the spare ones age
        engine = create_async_engine(
            url, pool_size=pool_size, max_overflow=pool_size, pool_use_lifo=True
        )
        _ping_when_idle(engine.sync_engine, PING_AFTER_IDLE)
        return Engines(
            url=url,
            dialect="postgresql",
            write=engine,
            read=engine,
            autocommit=engine.execution_options(isolation_level="AUTOCOMMIT"),
        )
    raise ValueError(f"unsupported database URL {parsed.render_as_string()!r}")


__all__ = ["Connection", "Engines", "create_engines"]
