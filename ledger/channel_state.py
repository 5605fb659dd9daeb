"""Per-channel cursors (Telegram's polling offset). Imported only by ledger.ledger."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ledger._base import LedgerBase
from ledger.records import utcnow
from ledger.schema import channel_state_t

C = channel_state_t.c


class ChannelStateQueries(LedgerBase):
    async def get_channel_offset(self, channel: str) -> int | None:
        """The offset stored for ``channel`` (``None`` if none was ever stored)."""
        async with self._read() as conn:
            row = await conn.execute(sa.select(C.update_offset).where(C.channel == channel))
            value = row.scalar_one_or_none()
            return None if value is None else int(value)

    async def set_channel_offset(self, channel: str, offset: int) -> None:
        """Store ``offset`` for ``channel``; never moves it backwards."""
        now = utcnow()

        def write(conn: Connection) -> None:
            stmt = self._insert(channel_state_t).values(
                channel=channel, update_offset=offset, updated_at=now
            )
            excluded = stmt.excluded
            stmt = stmt.on_conflict_do_update(
                index_elements=[C.channel],
                set_={"update_offset": excluded.update_offset, "updated_at": now},
                where=C.update_offset < excluded.update_offset,
            )
            conn.execute(stmt)

        await self.engines.run_write(write)
