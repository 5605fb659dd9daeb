"""A fake Slack Web API on 127.0.0.1 (aiohttp), for slack_sdk's real ``AsyncWebClient``.

Serves ``POST /api/{method}`` for ``auth.test``, ``chat.postMessage``, ``chat.update`` and
``chat.postEphemeral``; slack_sdk sends JSON bodies for the ``chat.*`` methods and form or
query parameters for others, all accepted. The token must arrive as ``Authorization: Bearer``.
Every call is recorded in :attr:`FakeSlack.calls` as ``(method, params)`` (when, in
:attr:`FakeSlack.times`), and the ones answered ``ok: true`` in :attr:`FakeSlack.accepted`.

Switches, each for the next ``n`` calls of ``method`` (``chat.postMessage`` unless told), after
``after`` good ones:

* :meth:`FakeSlack.rate_limit` — HTTP 429 ``{"ok": false, "error": "ratelimited"}`` with
  ``Retry-After``;
* :meth:`FakeSlack.server_error` — HTTP 503 with an HTML body;
* :meth:`FakeSlack.refuse` — HTTP 200 ``{"ok": false, "error": <error>}``;
* :meth:`FakeSlack.stall` — hold the answer for ``seconds`` (a timeout after sending).

Channels in :attr:`unknown_channels` answer ``channel_not_found``. A refused call is recorded
like any other.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

TEAM_ID = "T0TETHER"
BOT_USER_ID = "U0BOT"
BOT_ID = "B0BOT"
POST = "chat.postMessage"


class FakeSlack:
    def __init__(self, token: str) -> None:
        self.token = token
        self.calls: list[tuple[str, dict[str, Any]]] = []
        #: when each call arrived (``time.monotonic()``), in the order of :attr:`calls`
        self.times: list[float] = []
        #: the calls answered ``ok: true``
        self.accepted: list[tuple[str, dict[str, Any]]] = []
        self.unknown_channels: set[str] = set()
        self._faults: dict[str, list[tuple[str, Any] | None]] = {}
        self._ts = itertools.count(1)
        self._server: TestServer | None = None

    # -- control ------------------------------------------------------------------------------

    def _queue(self, fault: tuple[str, Any], n: int, after: int, method: str) -> None:
        self._faults.setdefault(method, []).extend([None] * after + [fault] * n)

    def rate_limit(
        self, n: int = 1, retry_after: int = 1, *, after: int = 0, method: str = POST
    ) -> None:
        self._queue(("429", retry_after), n, after, method)

    def server_error(self, n: int = 1, *, after: int = 0, method: str = POST) -> None:
        self._queue(("5xx", 503), n, after, method)

    def refuse(self, error: str, n: int = 1, *, after: int = 0, method: str = POST) -> None:
        self._queue(("error", error), n, after, method)

    def stall(self, seconds: float, n: int = 1, *, after: int = 0, method: str = POST) -> None:
        self._queue(("stall", seconds), n, after, method)

    def sent(self, method: str = "chat.postMessage") -> list[dict[str, Any]]:
        """Every call of ``method``, refused ones included."""
        return [params for m, params in self.calls if m == method]

    def ok(self, method: str = "chat.postMessage") -> list[dict[str, Any]]:
        """The calls of ``method`` that were answered ``ok: true``."""
        return [params for m, params in self.accepted if m == method]

    @property
    def base_url(self) -> str:
        """The API base for ``AsyncWebClient(base_url=...)`` (with its trailing slash)."""
        assert self._server is not None
        return str(self._server.make_url("/api/"))

    async def __aenter__(self) -> FakeSlack:
        app = web.Application()
        app.router.add_post("/api/{method}", self._handle)
        self._server = TestServer(app, host="127.0.0.1")
        await self._server.start_server()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        await self._server.close()

    # -- the API ------------------------------------------------------------------------------

    async def _params(self, request: web.Request) -> dict[str, Any]:
        params: dict[str, Any] = dict(request.query)
        if request.content_type == "application/json":
            body = await request.json()
            if isinstance(body, dict):
                params.update(body)
        else:
            form = await request.post()
            params.update({k: v for k, v in form.items() if isinstance(v, str)})
        for key in ("blocks",):
            if isinstance(params.get(key), str):
                params[key] = json.loads(params[key])
        return params

    async def _handle(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        params = await self._params(request)
        self.calls.append((method, params))
        self.times.append(time.monotonic())
        response = await self._answer(request, method, params)
        if response.status == 200 and response.text and json.loads(response.text).get("ok"):
            self.accepted.append((method, params))
        return response

    async def _answer(
        self, request: web.Request, method: str, params: dict[str, Any]
    ) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return _error("invalid_auth" if "Authorization" in request.headers else "not_authed")
        queue = self._faults.get(method)
        fault = queue.pop(0) if queue else None
        if fault is not None:
            kind, value = fault
            if kind == "429":
                return web.json_response(
                    {"ok": False, "error": "ratelimited"},
                    status=429,
                    headers={"Retry-After": str(value)},
                )
            if kind == "5xx":
                return web.Response(
                    status=value, text="<html>service unavailable</html>", content_type="text/html"
                )
            if kind == "error":
                return _error(value)
            if kind == "stall":
                await asyncio.sleep(value)
        if method == "auth.test":
            return _ok(
                {
                    "url": "https://tether-test.slack.com/",
                    "team": "Tether Test",
                    "user": "tether",
                    "team_id": TEAM_ID,
                    "user_id": BOT_USER_ID,
                    "bot_id": BOT_ID,
                }
            )
        channel = str(params.get("channel", ""))
        if method in ("chat.postMessage", "chat.update", "chat.postEphemeral"):
            if not channel or channel in self.unknown_channels:
                return _error("channel_not_found")
            if not params.get("text") and not params.get("blocks"):
                return _error("no_text")
        if method == "chat.postMessage":
            n = next(self._ts)
            ts = f"{1_700_000_000 + n}.{n:06d}"
            message = {"type": "message", "text": params.get("text", ""), "ts": ts}
            message["user"], message["bot_id"] = BOT_USER_ID, BOT_ID
            if params.get("thread_ts"):
                message["thread_ts"] = params["thread_ts"]
            if params.get("blocks"):
                message["blocks"] = params["blocks"]
            return _ok({"channel": channel, "ts": ts, "message": message})
        if method == "chat.update":
            return _ok({"channel": channel, "ts": params.get("ts"), "text": params.get("text")})
        if method == "chat.postEphemeral":
            return _ok({"message_ts": f"{1_700_000_000 + next(self._ts)}.000000"})
        return _error("unknown_method")


def _ok(result: dict[str, Any]) -> web.Response:
    return web.json_response({"ok": True, **result})


def _error(error: str) -> web.Response:
    return web.json_response({"ok": False, "error": error})
