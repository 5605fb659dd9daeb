"""A fake OpenAI-compatible chat-completions server on 127.0.0.1 (aiohttp), for the real
``openai`` client.

``POST /v1/chat/completions`` answers with the next scripted response (:meth:`FakeOpenAI.queue`):
:func:`text`, :func:`tool_calls`, :func:`rate_limited` (429 with ``Retry-After``),
:func:`server_error` (5xx), :func:`context_length_exceeded` (400 with OpenAI's error body) or
:func:`error`. With ``"stream": true`` in the request, a text or tool-call answer is sent as
Server-Sent Events chunks (with a usage chunk when ``stream_options.include_usage``). When the
script is empty it answers 400 ``fake: no scripted response left`` (not retried: a test that
runs out fails fast). Every request is recorded in :attr:`FakeOpenAI.requests` (time, JSON
body, headers), whatever it was answered.

``GET /pages/{name}`` serves the pages added with :meth:`FakeOpenAI.page` (for the llm agent's
``http_get`` tool), optionally slow the first time.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer


@dataclass
class Scripted:
    """One scripted answer: a completion (``content``/``calls``) or an error (``status``)."""

    content: str | None = None
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    finish_reason: str | None = None
    input_tokens: int | None = 10
    output_tokens: int | None = 5
    answered: str | None = None
    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    #: seconds to wait before answering
    delay: float = 0.0


def text(
    content: str,
    *,
    input_tokens: int | None = 10,
    output_tokens: int | None = 5,
    answered: str | None = None,
    finish_reason: str = "stop",
    delay: float = 0.0,
) -> Scripted:
    """A final text answer. ``answered`` defaults to the asked model + ``-2024-07-18``."""
    return Scripted(
        content=content,
        finish_reason=finish_reason,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        answered=answered,
        delay=delay,
    )


def tool_calls(
    *calls: tuple[str, dict[str, Any]],
    content: str | None = None,
    input_tokens: int | None = 10,
    output_tokens: int | None = 5,
    answered: str | None = None,
) -> Scripted:
    """An answer asking for tools: ``("name", {arguments})`` each."""
    return Scripted(
        content=content,
        calls=list(calls),
        finish_reason="tool_calls",
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        answered=answered,
    )


def error(status: int, message: str, *, code: str | None = None, type: str = "error",
          headers: dict[str, str] | None = None) -> Scripted:  # fmt: skip
    body = {"error": {"message": message, "type": type, "param": None, "code": code}}
    return Scripted(status=status, body=body, headers=headers or {})


def rate_limited(retry_after: float = 1.0) -> Scripted:
    """429 with ``Retry-After`` (whole seconds, as the header is usually sent)."""
    seconds = int(retry_after) if float(retry_after).is_integer() else retry_after
    return error(
        429,
        "Rate limit reached for requests",
        code="rate_limit_exceeded",
        type="requests",
        headers={"Retry-After": str(seconds)},
    )


def server_error(status: int = 500) -> Scripted:
    return error(status, "The server had an error while processing your request.",
                 type="server_error")  # fmt: skip


def context_length_exceeded(limit: int = 8192, asked: int = 9000) -> Scripted:
    """400 as OpenAI answers a prompt longer than the model's context."""
    return error(
        400,
        f"This model's maximum context length is {limit} tokens. However, your messages "
        f"resulted in {asked} tokens. Please reduce the length of the messages.",
        code="context_length_exceeded",
        type="invalid_request_error",
    )


@dataclass
class Seen:
    """One request as the fake received it."""

    at: float  # time.monotonic()
    body: Any
    headers: dict[str, str]
    status: int = 0


@dataclass
class Page:
    body: str
    status: int = 200
    content_type: str = "text/plain"
    first_delay: float = 0.0
    hits: int = 0


class FakeOpenAI:
    def __init__(self, *, model_suffix: str = "-2024-07-18") -> None:
        self.script: deque[Scripted] = deque()
        self.requests: list[Seen] = []
        self.pages: dict[str, Page] = {}
        self.model_suffix = model_suffix
        self._ids = itertools.count(1)
        self._server: TestServer | None = None
        self._seen = asyncio.Condition()

    # -- control ------------------------------------------------------------------------------

    def queue(self, *answers: Scripted) -> None:
        self.script.extend(answers)

    def page(self, name: str, body: str, *, status: int = 200,
             content_type: str = "text/plain", first_delay: float = 0.0) -> str:  # fmt: skip
        """Serve ``body`` at ``/pages/{name}``; returns its URL."""
        self.pages[name] = Page(body, status, content_type, first_delay)
        return self.url(f"/pages/{name}")

    @property
    def base_url(self) -> str:
        """What ``TETHER_MODEL_BASE_URL`` should be."""
        return self.url("/v1")

    def url(self, path: str) -> str:
        assert self._server is not None
        return str(self._server.make_url(path))

    @property
    def chat_bodies(self) -> list[Any]:
        return [r.body for r in self.requests]

    async def wait_for_requests(self, n: int, timeout: float = 10.0) -> None:
        async def enough() -> None:
            async with self._seen:
                await self._seen.wait_for(lambda: len(self.requests) >= n)

        await asyncio.wait_for(enough(), timeout)

    async def __aenter__(self) -> FakeOpenAI:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/pages/{name}", self._page)
        self._server = TestServer(app, host="127.0.0.1", port=0)
        await self._server.start_server()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        await self._server.close()

    # -- the API ------------------------------------------------------------------------------

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            body = None
        seen = Seen(time.monotonic(), body, dict(request.headers))
        async with self._seen:
            self.requests.append(seen)
            self._seen.notify_all()
        answer = self.script.popleft() if self.script else None
        if answer is None:
            answer = error(400, "fake: no scripted response left", code="script_exhausted")
        if answer.delay:
            await asyncio.sleep(answer.delay)
        seen.status = answer.status
        if answer.status != 200:
            return web.json_response(answer.body, status=answer.status, headers=answer.headers)
        asked = (body or {}).get("model", "unknown")
        model = answer.answered or f"{asked}{self.model_suffix}"
        if (body or {}).get("stream"):
            include_usage = bool(((body or {}).get("stream_options") or {}).get("include_usage"))
            return await self._stream(request, answer, model, include_usage)
        return web.json_response(self._completion(answer, model))

    def _tool_calls(self, answer: Scripted) -> list[dict[str, Any]]:
        return [
            {
                "id": f"call_{next(self._ids)}",
                "type": "function",
                "function": {"name": name, "arguments": json.dumps(args)},
            }
            for name, args in answer.calls
        ]

    def _usage(self, answer: Scripted) -> dict[str, Any] | None:
        if answer.input_tokens is None and answer.output_tokens is None:
            return None
        i, o = answer.input_tokens or 0, answer.output_tokens or 0
        return {"prompt_tokens": i, "completion_tokens": o, "total_tokens": i + o}

    def _completion(self, answer: Scripted, model: str) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": answer.content}
        if answer.calls:
            message["tool_calls"] = self._tool_calls(answer)
        return {
            "id": f"chatcmpl-{next(self._ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": answer.finish_reason}],
            "usage": self._usage(answer),
        }

    async def _stream(
        self, request: web.Request, answer: Scripted, model: str, include_usage: bool
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        cid = f"chatcmpl-{next(self._ids)}"

        def chunk(delta: dict[str, Any] | None, finish: str | None = None,
                  usage: Any = None) -> bytes:  # fmt: skip
            choices = [] if delta is None else [
                {"index": 0, "delta": delta, "finish_reason": finish}
            ]  # fmt: skip
            data = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
                    "model": model, "choices": choices}  # fmt: skip
            if usage is not None:
                data["usage"] = usage
            return f"data: {json.dumps(data)}\n\n".encode()

        await response.write(chunk({"role": "assistant", "content": ""}))
        content = answer.content or ""
        for i in range(0, len(content), 4):
            await response.write(chunk({"content": content[i : i + 4]}))
            await asyncio.sleep(0.005)
        for index, call in enumerate(self._tool_calls(answer)):
            args = call["function"]["arguments"]
            half = len(args) // 2
            first = {
                "index": index,
                "id": call["id"],
                "type": "function",
                "function": {"name": call["function"]["name"], "arguments": args[:half]},
            }
            await response.write(chunk({"tool_calls": [first]}))
            rest = {"index": index, "function": {"arguments": args[half:]}}
            await response.write(chunk({"tool_calls": [rest]}))
        await response.write(chunk({}, answer.finish_reason))
        if include_usage:
            await response.write(chunk(None, usage=self._usage(answer)))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _page(self, request: web.Request) -> web.Response:
        page = self.pages.get(request.match_info["name"])
        if page is None:
            return web.Response(status=404, text="no such page")
        page.hits += 1
        if page.hits == 1 and page.first_delay:
            await asyncio.sleep(page.first_delay)
        return web.Response(status=page.status, text=page.body, content_type=page.content_type)
