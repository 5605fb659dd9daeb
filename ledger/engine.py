"""Engines for the ledger's database: SQLite (embedded) or PostgreSQL (scale-out).

Every write the ledger makes is a plain function over a SQLAlchemy ``Connection``, run inside one
transaction by :meth:`Engines.run_write`:

* SQLite: on one dedicated writer thread with a synchronous ``pysqlite`` connection (one thread
  hop per transaction instead of one per statement, and in-process writers queue for the
  thread instead of colliding on the file lock);
* PostgreSQL: on a pooled asyncpg connection through ``AsyncConnection.run_sync``.

Reads go through the async engine. Imports only the ledger's dialect modules.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ledger import _sqlite

T = TypeVar("T")


@dataclass
class Engines:
    """The async engines (``write`` for migrations and tests, ``read`` for queries) and, on
    SQLite, the synchronous writer the ledger's transactions run on."""

    url: str
    dialect: str
    write: AsyncEngine
    read: AsyncEngine
    sync_write: sa.Engine | None = None
    _executor: ThreadPoolExecutor | None = field(default=None, repr=False)

    async def run_write(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(connection, *args)`` in one write transaction; commit if it returns."""
        if self.sync_write is not None:
            loop = asyncio.get_running_loop()
            call = functools.partial(self._sync_transaction, fn, args)
            return await loop.run_in_executor(self._executor, call)
        async with self.write.begin() as conn:
            return await conn.run_sync(fn, *args)

    def _sync_transaction(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        assert self.sync_write is not None
        with self.sync_write.begin() as conn:
            return fn(conn, *args)

    async def run_read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(connection, *args)`` on a read connection."""
        async with self.read.connect() as conn:
            return await conn.run_sync(fn, *args)

    async def dispose(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        if self.sync_write is not None:
            self.sync_write.dispose()
        await self.write.dispose()
        if self.read is not self.write:
            await self.read.dispose()


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
        _sqlite.configure(sync_write, synchronous=sqlite_synchronous)
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tether-sqlite-writer")
        return Engines(url, "sqlite", write, read, sync_write, executor)
    if parsed.get_backend_name() == "postgresql":
        engine = create_async_engine(
            url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True
        )
        return Engines(url=url, dialect="postgresql", write=engine, read=engine)
    raise ValueError(f"unsupported database URL {parsed.render_as_string()!r}")


__all__ = ["Connection", "Engines", "create_engines"]
