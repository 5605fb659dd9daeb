"""The LLM agent (``llm``; ``TETHER_DEFAULT_AGENT=llm``): a model with tools, every step durable.

Each chat message (or ``{"text": ...}`` / a string as work input) starts a tool-calling loop
on ``TETHER_MODEL`` at ``TETHER_MODEL_BASE_URL``. The prompt is the conversation so far (read
from the ledger once, as the ``history`` step). Every model call is a metered ``model_call``
step and every tool call is its own step, so a crash or a restart never asks the model twice
for an answer it already gave, nor repeats a tool's effect:

* ``reply(text)`` — say something in the conversation now;
* ``remind(seconds, text)`` — sleep durably, then say ``text``;
* ``ask_approval(question)`` — ask for an Approve/Deny decision (durable approval wait);
* ``ask_user(question, type)`` — ask for typed input (``string``, ``integer``, ``number``,
  ``boolean``); the next chat message answers it;
* ``http_get(url)`` — fetch a web page (http/https, 10 s timeout, the first 64 KiB).

When the model answers without tool calls, its text is the final reply. The result is
``{"replies": [...], "turns": n}``.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from worker import Context, RetryPolicy, agent
from worker.model_calls import ToolCall

SYSTEM_PROMPT = (
    "You are a helpful assistant in a chat. Your final message (without tool calls) is sent "
    "to the user as your answer. Use the tools when they help: reply to say something before "
    "you carry on (for example before a reminder's wait), remind to message the user later, "
    "ask_approval before doing anything consequential, ask_user when you need information "
    "from the user, http_get to read a web page. Be brief."
)
#: model calls per work item before the agent gives up
MAX_TURNS = 12
#: conversation messages in the prompt
HISTORY_LIMIT = 50
HTTP_TIMEOUT = 10.0
HTTP_MAX_BYTES = 64 * 1024
MAX_REMIND_SECONDS = 31 * 24 * 3600
APPROVAL_TIMEOUT = timedelta(days=1)
INPUT_TIMEOUT = timedelta(days=1)
GAVE_UP = "Sorry, I could not finish that (too many steps)."
_INPUT_TYPES: dict[str, Any] = {"string": str, "integer": int, "number": float, "boolean": bool}


def _tool(name: str, description: str, properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": properties,
                "required": list(properties),
                "additionalProperties": False,
            },
        },
    }


TOOLS: list[dict[str, Any]] = [
    _tool("reply", "Send a message to the user now.", {"text": {"type": "string"}}),
    _tool(
        "remind",
        "Wait the given number of seconds (durably), then send the text to the user.",
        {
            "seconds": {"type": "integer", "minimum": 1, "maximum": MAX_REMIND_SECONDS},
            "text": {"type": "string"},
        },
    ),
    _tool(
        "ask_approval",
        "Ask for an approve/deny decision; returns whether it was approved.",
        {"question": {"type": "string"}},
    ),
    _tool(
        "ask_user",
        "Ask the user a question and wait for the answer, of the given type.",
        {
            "question": {"type": "string"},
            "type": {"type": "string", "enum": list(_INPUT_TYPES)},
        },
    ),
    _tool(
        "http_get",
        f"Fetch a web page by URL (http or https); returns its status and the first "
        f"{HTTP_MAX_BYTES // 1024} KiB of text.",
        {"url": {"type": "string"}},
    ),
]


def _text_of(input: Any) -> str:
    if isinstance(input, dict):
        return str(input.get("text", "")).strip()
    return str(input or "").strip()


async def http_get(
    url: str, timeout: float = HTTP_TIMEOUT, max_bytes: int = HTTP_MAX_BYTES
) -> dict[str, Any]:
    """GET ``url``: ``{url, status, content_type, text, truncated}`` with at most ``max_bytes``
    of the body, or ``{"error": ...}`` (never raises: the model reads what went wrong)."""
    if urlsplit(url).scheme not in ("http", "https"):
        return {"error": "only http:// and https:// URLs can be fetched"}
    try:
        client_timeout = aiohttp.ClientTimeout(total=timeout)
        async with (
            aiohttp.ClientSession(timeout=client_timeout) as session,
            session.get(url, max_redirects=5) as response,
        ):
            body = bytearray()
            async for chunk in response.content.iter_chunked(16 * 1024):
                body += chunk
                if len(body) > max_bytes:
                    break
            truncated = len(body) > max_bytes
            text = bytes(body[:max_bytes]).decode(response.charset or "utf-8", errors="replace")
            return {
                "url": str(response.url),
                "status": response.status,
                "content_type": response.content_type,
                "text": text,
                "truncated": truncated,
            }
    except TimeoutError:
        return {"error": f"timed out after {timeout:g}s"}
    except (aiohttp.ClientError, ValueError, LookupError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


async def run_tool(ctx: Context, call: ToolCall, replies: list[str]) -> Any:
    """Run one tool call as its own step(s); what it returns goes back to the model."""
    try:
        args = call.args()
    except ValueError as exc:
        return {"error": f"the arguments are not a JSON object: {exc}"}
    try:
        if call.name == "reply":
            text = str(args["text"])
            await ctx.reply(text)
            replies.append(text)
            return {"sent": True}
        if call.name == "remind":
            seconds = int(args["seconds"])
            if not 1 <= seconds <= MAX_REMIND_SECONDS:
                return {"error": f"seconds must be from 1 to {MAX_REMIND_SECONDS}"}
            text = str(args["text"])
            await ctx.sleep(timedelta(seconds=seconds))
            await ctx.reply(text)
            replies.append(text)
            return {"reminded": True}
        if call.name == "ask_approval":
            decision = await ctx.wait_for_approval(
                str(args["question"]), timeout=APPROVAL_TIMEOUT, on_timeout="continue"
            )
            return {
                "approved": decision.approved,
                "comment": decision.comment,
                "timed_out": decision.timed_out,
            }
        if call.name == "ask_user":
            kind = str(args.get("type") or "string")
            if kind not in _INPUT_TYPES:
                return {"error": f"type must be one of {', '.join(_INPUT_TYPES)}"}
            answer = await ctx.wait_for_input(
                str(args["question"]),
                schema=_INPUT_TYPES[kind],
                timeout=INPUT_TIMEOUT,
                on_timeout="continue",
            )
            return {"timed_out": True} if answer is None else {"answer": answer}
        if call.name == "http_get":
            return await ctx.step(
                "http_get",
                http_get,
                str(args["url"]),
                timeout=HTTP_TIMEOUT + 5,
                retry=RetryPolicy(max_attempts=1),
                side_effect=True,
            )
    except (KeyError, TypeError, ValueError) as exc:
        return {"error": f"bad arguments for {call.name}: {type(exc).__name__}: {exc}"}
    return {"error": f"there is no tool named {call.name!r}"}


@agent("llm")
async def llm(ctx: Context, input: Any) -> dict[str, Any]:
    """Answer one chat message with the model and its tools (see the module docstring)."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM_PROMPT}]
    history = await ctx.chat_history(limit=HISTORY_LIMIT)
    messages += history or [{"role": "user", "content": _text_of(input)}]
    replies: list[str] = []
    for turn in range(1, MAX_TURNS + 1):
        out = await ctx.model_call(messages=messages, tools=TOOLS)
        messages.append(out.message)
        if not out.tool_calls:
            if out.content and out.content.strip():
                await ctx.reply(out.content.strip())
                replies.append(out.content.strip())
            return {"replies": replies, "turns": turn}
        for call in out.tool_calls:
            result = await run_tool(ctx, call, replies)
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": call.id,
                    "content": json.dumps(result, ensure_ascii=False, default=str),
                }
            )
    await ctx.reply(GAVE_UP)
    replies.append(GAVE_UP)
    return {"replies": replies, "turns": MAX_TURNS, "stopped": "max_turns"}
