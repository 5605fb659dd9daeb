"""A fake Telegram Bot API server on 127.0.0.1 (aiohttp), for aiogram's real ``Bot``.

Serves ``POST /bot{token}/{method}`` for ``sendMessage``, ``editMessageText``,
``answerCallbackQuery`` and ``getMe``; aiogram posts form fields (``reply_markup`` as a JSON
string). Every call is recorded in :attr:`FakeTelegram.calls` as ``(method, params)``.
``fail_next(n, retry_after)`` answers the next ``n`` calls with a 429 carrying ``retry_after``;
chats in :attr:`unknown_chats` answer 400 "chat not found".

``getUpdates`` serves the updates queued with :meth:`FakeTelegram.queue` (``offset`` confirms
and drops everything below it, as Telegram does; ``limit``; an empty answer waits up to
``min(timeout, max_poll)`` seconds for new ones). ``setWebhook`` / ``deleteWebhook`` answer true
and are recorded like every call.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

BOT_ID = 123456


class FakeTelegram:
    def __init__(self, token: str) -> None:
        self.token = token
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.unknown_chats: set[str] = set()
        self._fail: list[int | None] = []
        self._ids = itertools.count(1000)
        self._server: TestServer | None = None
        self.updates: list[dict[str, Any]] = []
        self._new_updates = asyncio.Event()
        #: the longest a ``getUpdates`` long poll is held open
        self.max_poll = 0.3

    # -- control ------------------------------------------------------------------------------

    def fail_next(self, n: int, retry_after: int = 3, *, after: int = 0) -> None:
        """Answer the next ``n`` calls (after ``after`` good ones) with 429 and
        ``retry_after`` seconds."""
        self._fail.extend([None] * after + [retry_after] * n)

    def queue(self, *updates: dict[str, Any]) -> None:
        """Updates for ``getUpdates`` to serve."""
        self.updates.extend(updates)
        self._new_updates.set()

    def sent(self, method: str = "sendMessage") -> list[dict[str, Any]]:
        return [params for m, params in self.calls if m == method]

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return str(self._server.make_url("")).rstrip("/")

    async def __aenter__(self) -> FakeTelegram:
        app = web.Application()
        app.router.add_post("/bot{token}/{method}", self._handle)
        self._server = TestServer(app, host="127.0.0.1")
        await self._server.start_server()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        await self._server.close()

    # -- the API ------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return _error(401, "Unauthorized")
        method = request.match_info["method"]
        form = await request.post()
        params: dict[str, Any] = {k: v for k, v in form.items() if isinstance(v, str)}
        if "reply_markup" in params:
            params["reply_markup"] = json.loads(params["reply_markup"])
        self.calls.append((method, params))
        retry_after = self._fail.pop(0) if self._fail else None
        if retry_after is not None:
            return web.json_response(
                {
                    "ok": False,
                    "error_code": 429,
                    "description": f"Too Many Requests: retry after {retry_after}",
                    "parameters": {"retry_after": retry_after},
                },
                status=429,
            )
        if method == "getMe":
            return _ok(
                {"id": BOT_ID, "is_bot": True, "first_name": "Tether", "username": "tether_bot"}
            )
        if method == "getUpdates":
            return _ok(await self._get_updates(params))
        if method in ("setWebhook", "deleteWebhook"):
            return _ok(True)
        if method == "answerCallbackQuery":
            return _ok(True)
        if method in ("sendMessage", "editMessageText"):
            chat = params.get("chat_id", "")
            if chat in self.unknown_chats:
                return _error(400, "Bad Request: chat not found")
            message_id = (
                int(params["message_id"]) if method == "editMessageText" else next(self._ids)
            )
            message: dict[str, Any] = {
                "message_id": message_id,
                "date": int(time.time()),
                "chat": {"id": int(chat) if chat.lstrip("-").isdigit() else 0, "type": "private"},
                "text": params.get("text", ""),
            }
            if "reply_markup" in params:
                message["reply_markup"] = params["reply_markup"]
            return _ok(message)
        return _error(404, "Not Found")

    async def _get_updates(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        offset = int(params["offset"]) if params.get("offset") else None
        limit = int(params.get("limit") or 100)
        timeout = float(params.get("timeout") or 0)
        if offset is not None:
            self.updates = [u for u in self.updates if u["update_id"] >= offset]
        if not self.updates and timeout > 0:
            self._new_updates.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._new_updates.wait(), min(timeout, self.max_poll))
        return sorted(self.updates, key=lambda u: u["update_id"])[:limit]


def _ok(result: Any) -> web.Response:
    return web.json_response({"ok": True, "result": result})


def _error(code: int, description: str) -> web.Response:
    return web.json_response(
        {"ok": False, "error_code": code, "description": description}, status=code
    )
