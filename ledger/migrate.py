"""Apply the ledger's Alembic migrations programmatically (``tether db upgrade``)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection

from ledger.engine import Engines

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


async def upgrade(engines: Engines, revision: str = "head") -> None:
    """Bring the database to ``revision``; safe to run when it is already there."""

    def _run(conn: Connection) -> None:
        command.upgrade(alembic_config(conn), revision)

    async with engines.write.connect() as conn:
        await conn.run_sync(_run)
        await conn.commit()


async def current_revision(engines: Engines) -> str | None:
    from alembic.runtime.migration import MigrationContext

    def _cur(conn: Connection) -> str | None:
        return MigrationContext.configure(conn).get_current_revision()

    async with engines.read.connect() as conn:
        return await conn.run_sync(_cur)
