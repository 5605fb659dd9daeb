"""Telegram polling mode (``TETHER_TELEGRAM_MODE=polling``), for machines without a public URL.

:class:`TelegramPoller` loops on ``getUpdates(offset=stored + 1, timeout=…)``. Each update is
committed exactly as the webhook commits it (:func:`gateway.telegram.handle_update`, dedup on
``{bot id}:{update_id}``); only after the whole batch is committed is the highest ``update_id``
stored in the ledger (``channel_state``) and thus confirmed to Telegram on the next call. A crash
between fetching and storing re-fetches the batch, and the dedup makes that harmless; a restart
resumes from the stored offset. A ledger or Bot API failure backs off and retries the same
offset. Imports adapters, ledger and the gateway's own modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import aiohttp

from gateway.telegram import TelegramState, handle_update

if TYPE_CHECKING:
    from config.settings import Settings
    from ledger import Ledger

log = logging.getLogger(__name__)

#: the ``channel_state`` key of the offset
OFFSET_KEY = "telegram:polling"
ALLOWED_UPDATES = ["message", "edited_message", "callback_query"]


class TelegramPoller:
    def __init__(
        self,
        ledger: Ledger,
        settings: Settings,
        *,
        policies: Mapping[str, tuple[str, float]] | None = None,
        timeout: int = 25,
        limit: int = 100,
        retry_delay: float = 1.0,
    ) -> None:
        assert settings.telegram_token is not None
        self.ledger = ledger
        self.settings = settings
        self.policies = policies
        self.timeout = timeout
        self.limit = limit
        self.retry_delay = retry_delay
        self.tg = TelegramState(settings)
        token = settings.telegram_token.get_secret_value()
        self.url = f"{settings.telegram_api_base.rstrip('/')}/bot{token}/getUpdates"
        self._stopped = asyncio.Event()
        self._http: aiohttp.ClientSession | None = None

    def stop(self) -> None:
        self._stopped.set()

    async def fetch(self, offset: int | None) -> list[dict[str, Any]]:
        """One ``getUpdates`` call; raises on a transport or API error."""
        if self._http is None:
            self._http = aiohttp.ClientSession()
        form: dict[str, str] = {
            "timeout": str(self.timeout),
            "limit": str(self.limit),
            "allowed_updates": json.dumps(ALLOWED_UPDATES),
        }
        if offset is not None:
            form["offset"] = str(offset)
        client_timeout = aiohttp.ClientTimeout(total=self.timeout + 10)
        async with self._http.post(self.url, data=form, timeout=client_timeout) as resp:
            body = await resp.json(content_type=None)
        if not isinstance(body, dict) or not body.get("ok"):
            raise RuntimeError(f"getUpdates failed: HTTP {resp.status}: {body!r}")
        result = body.get("result") or []
        return [u for u in result if isinstance(u, dict)]

    async def poll_once(self) -> int:
        """Fetch one batch, commit every update, then store the offset. Returns how many
        updates the batch had."""
        stored = await self.ledger.get_channel_offset(OFFSET_KEY)
        updates = await self.fetch(None if stored is None else stored + 1)
        highest = stored
        for update in updates:
            update_id = update.get("update_id")
            if isinstance(update_id, bool) or not isinstance(update_id, int):
                continue
            if stored is not None and update_id <= stored:
                continue  # already confirmed
            await handle_update(self.ledger, self.tg, update, policies=self.policies)
            highest = update_id if highest is None else max(highest, update_id)
        if highest is not None and highest != stored:
            await self.ledger.set_channel_offset(OFFSET_KEY, highest)
        return len(updates)

    async def run(self) -> None:
        """Poll until :meth:`stop`; errors back off and retry from the stored offset."""
        log.info("telegram: polling %s", self.settings.telegram_api_base)
        try:
            while not self._stopped.is_set():
                poll = asyncio.create_task(self.poll_once())
                stopper = asyncio.create_task(self._stopped.wait())
                done, _ = await asyncio.wait([poll, stopper], return_when=asyncio.FIRST_COMPLETED)
                if poll not in done:
                    poll.cancel()
                    await asyncio.gather(poll, return_exceptions=True)
                    break
                stopper.cancel()
                exc = poll.exception()
                if exc is not None:
                    log.warning("telegram: polling failed: %s: %s", type(exc).__name__, exc)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopped.wait(), self.retry_delay)
        finally:
            await self.close()

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None
        await self.tg.close()
