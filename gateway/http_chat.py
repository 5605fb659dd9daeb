"""Routes of the plain HTTP chat channel (bearer token, like the operator API):

* ``POST /channels/http/messages`` ``{conversation_id, text, message_id?, sender?}`` → 202 with
  what the message became (new work, the answer to a waiting question, queued, …), only after
  it is committed; a repeated ``message_id`` is acknowledged and creates nothing;
* ``GET /channels/http/conversations/{id}/messages`` → both directions, in order.

Imports adapters, ledger and the gateway's own modules.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from adapters.http_chat import CHANNEL, PostedMessage
from gateway.api import (
    LEDGER_KEY,
    SETTINGS_KEY,
    TOKEN_KEY,
    ApiError,
    _check_bearer,
    parse_body,
    read_json_object,
)
from gateway.serialize import iso

#: {agent: (on_busy, collect_window)}
CHAT_POLICIES_KEY: web.AppKey[Mapping[str, tuple[str, float]]] = web.AppKey("tether.chat_policies")


async def post_message(request: web.Request) -> web.Response:
    _check_bearer(request, request.app[TOKEN_KEY])
    body = parse_body(PostedMessage, await read_json_object(request))
    msg = body.to_inbound()
    settings = request.app[SETTINGS_KEY]
    agent = settings.default_agent
    on_busy, window = request.app[CHAT_POLICIES_KEY].get(agent, ("enqueue", 2.0))
    accepted = await request.app[LEDGER_KEY].accept_message(
        channel=msg.channel,
        chat_id=msg.chat_id,
        thread_id=msg.thread_id,
        text=msg.text,
        message_id=msg.message_id,
        sender=msg.sender,
        payload=msg.payload(),
        agent=agent,
        on_busy=on_busy,
        collect_window=window,
    )
    return web.json_response(
        {
            "conversation_id": body.conversation_id,
            "message_id": f"in-{accepted.inbox_id}",
            "disposition": accepted.disposition,
            "work_id": accepted.work_id,
            "wait_id": accepted.wait_id,
            "duplicate": accepted.duplicate,
        },
        status=202,
    )


async def get_messages(request: web.Request) -> web.Response:
    _check_bearer(request, request.app[TOKEN_KEY])
    chat_id = request.match_info["id"]
    ledger = request.app[LEDGER_KEY]
    conversation = await ledger.find_conversation(CHANNEL, chat_id)
    if conversation is None:
        raise ApiError(404, "not_found", f"no HTTP conversation {chat_id!r}")
    messages = await ledger.list_messages(conversation.id)
    return web.json_response(
        {"conversation_id": chat_id, "messages": [_message_json(chat_id, m) for m in messages]}
    )


def _message_json(chat_id: str, m: dict[str, Any]) -> dict[str, Any]:
    out = {
        "id": m["id"],
        "conversation_id": chat_id,
        "direction": m["direction"],
        "text": m["text"],
        "created_at": iso(m["created_at"]),
        "work_id": m.get("work_id"),
    }
    if m.get("wait_id"):
        out["wait_id"] = m["wait_id"]
    if m.get("actions"):
        out["actions"] = m["actions"]
    return out


def setup_http_chat(app: web.Application, policies: Mapping[str, tuple[str, float]]) -> None:
    app[CHAT_POLICIES_KEY] = dict(policies)
    app.router.add_post("/channels/http/messages", post_message)
    app.router.add_get("/channels/http/conversations/{id}/messages", get_messages)
