"""Engines for the ledger's database: SQLite (embedded) or PostgreSQL (scale-out).

Creates the async SQLAlchemy engines and applies the dialect's connection settings. Imports only
the ledger's dialect modules.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ledger import _sqlite


@dataclass(frozen=True)
class Engines:
    """The write engine, and the engine reads use (the same one on PostgreSQL)."""

    url: str
    dialect: str
    write: AsyncEngine
    read: AsyncEngine

    async def dispose(self) -> None:
        await self.write.dispose()
        if self.read is not self.write:
            await self.read.dispose()


def create_engines(url: str, *, sqlite_synchronous: str = "FULL", pool_size: int = 10) -> Engines:
    """Build the engines for ``url`` (``sqlite+aiosqlite://`` or ``postgresql+asyncpg://``)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        # One writer connection per process: in-process writers queue for it instead of
        # colliding on the file lock and sleeping in SQLite's busy handler. Every transaction
        # ends in an explicit commit or rollback, so the pool's extra rollback is skipped.
        write = create_async_engine(
            url, pool_size=1, max_overflow=0, pool_timeout=60, pool_reset_on_return=None
        )
        _sqlite.configure(write, synchronous=sqlite_synchronous)
        read = create_async_engine(url, pool_reset_on_return=None)
        _sqlite.configure(read, synchronous=sqlite_synchronous, readonly=True)
        return Engines(url=url, dialect="sqlite", write=write, read=read)
    if parsed.get_backend_name() == "postgresql":
        engine = create_async_engine(
            url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True
        )
        return Engines(url=url, dialect="postgresql", write=engine, read=engine)
    raise ValueError(f"unsupported database URL {parsed.render_as_string()!r}")
