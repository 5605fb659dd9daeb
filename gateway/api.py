"""The operator API under ``/api/v1``: start, list, inspect and steer work (pause, resume,
cancel, retry, restart from a step); re-send or abandon outbound messages; list workers; model
usage totals.

Every route but ``/api/v1/openapi.json`` needs ``Authorization: Bearer <operator token>``
(checked by :func:`operator_auth` for everything under ``/api/``, so a route added later is
protected by default). Handlers validate all input before touching the ledger and answer only
after the ledger call returned, i.e. after its transaction committed. Errors are raised as
:class:`ApiError` (or ledger errors) and rendered by the app's error middleware. Every action
records who did it: ``operator``, or ``operator:<name>`` with an ``X-Tether-Operator: <name>``
header. Imports ledger and config.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from adapters.json_body import InvalidJson, parse_json_body, unstorable_reason
from config.settings import Settings
from gateway.openapi import OPENAPI
from gateway.serialize import (
    outbox_json,
    usage_list_json,
    wait_json,
    work_detail,
    work_json,
    worker_json,
)
from ledger import Ledger, WorkState
from ledger.control import InvalidRestartStep
from ledger.conversations import OUTBOX_STATES, OutboxNotFound
from ledger.usage import USAGE_GROUPS

PREFIX = "/api/v1"
#: paths under /api/ that need no token
PUBLIC_PATHS = frozenset({f"{PREFIX}/openapi.json"})
ACTOR = "operator"
#: events shown in the detail view (the most recent ones)
DETAIL_EVENTS = 500
MAX_LIST_LIMIT = 500
DEFAULT_LIST_LIMIT = 100
_INT32 = 2**31 - 1
# ids the ledger hands out are 28 hex characters; anything else cannot name a work item
_WORK_ID = re.compile(r"[A-Za-z0-9_-]{1,40}")
#: outbox ids are positive integers (32-bit in the database)
_OUTBOX_ID = re.compile(r"[1-9][0-9]{0,9}")
#: names the operator (``X-Tether-Operator``): printable, no control characters
OPERATOR_HEADER = "X-Tether-Operator"
MAX_OPERATOR_NAME = 100
_PRINTABLE = re.compile(r"[^\x00-\x1f\x7f]+")
#: ISO 8601 with its "+" offset sent unencoded: the query string turned "+" into " "
_SPACED_OFFSET = re.compile(r" (\d{2}(?::?\d{2})?)$")

LEDGER_KEY = web.AppKey("tether.ledger", Ledger)
SETTINGS_KEY = web.AppKey("tether.settings", Settings)
#: the agents POST /api/v1/work accepts; None accepts any name
KNOWN_AGENTS_KEY: web.AppKey[frozenset[str] | None] = web.AppKey("tether.known_agents")
TOKEN_KEY = web.AppKey("tether.operator_token", bytes)


class ApiError(Exception):
    """An error answer: ``{"error": {"code": code, "message": message, **extra}}`` with
    ``status``. ``extra`` carries machine-readable details some errors add (e.g. the first
    resolution of a wait that was already resolved)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.extra = extra or {}


def error_response(
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> web.Response:
    return web.json_response(
        {"error": {"code": code, "message": message, **(extra or {})}},
        status=status,
        headers=headers,
    )


def bad_request(message: str, code: str = "bad_request") -> ApiError:
    return ApiError(400, code, message)


# -- authentication ----------------------------------------------------------------------------


def _needs_token(path: str) -> bool:
    return (path == "/api" or path.startswith("/api/")) and path not in PUBLIC_PATHS


@web.middleware
async def operator_auth(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Refuse every ``/api/`` request without the operator's bearer token (401). The token is
    compared in constant time and never logged or echoed."""
    if _needs_token(request.path):
        _check_bearer(request, request.app[TOKEN_KEY])
    return await handler(request)


def _check_bearer(request: web.Request, expected: bytes) -> None:
    header = request.headers.get("Authorization")
    if not header:
        raise ApiError(
            401,
            "unauthorized",
            "missing operator token: send 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": 'Bearer realm="tether"'},
        )
    scheme, _, presented = header.strip().partition(" ")
    try:
        given = presented.strip().encode("utf-8", "surrogateescape")
    except UnicodeError:
        given = b""
    # Compare even on a wrong scheme so the timing says nothing about which part was wrong.
    ok = hmac.compare_digest(given, expected)
    if scheme.lower() != "bearer" or not ok:
        raise ApiError(
            401,
            "unauthorized",
            "invalid operator token",
            headers={"WWW-Authenticate": 'Bearer realm="tether", error="invalid_token"'},
        )


# -- input -------------------------------------------------------------------------------------


#: why a string cannot be stored, or None (shared with the console and the waits API)
_bad_text = unstorable_reason


_REQUIRED = object()  # read_json: an empty body is an error
_EMPTY = object()  # read_json_object: marks an empty body


async def read_json(request: web.Request, *, empty: Any = _REQUIRED) -> Any:
    """The request body as any JSON value. Raises 413 past the app's size limit, 400
    ``invalid_json`` when it is not JSON (or holds strings the databases cannot store). An
    empty body gives ``empty`` when one is passed, else 400 ``invalid_json``."""
    raw = await request.read()  # raises HTTPRequestEntityTooLarge past client_max_size
    if not raw.strip():
        if empty is not _REQUIRED:
            return empty
        raise bad_request("the request body is empty; expected JSON", "invalid_json")
    try:
        return parse_json_body(raw, what="the request body", where="the request body")
    except InvalidJson as exc:
        raise bad_request(str(exc), "invalid_json") from None


async def read_json_object(request: web.Request, *, allow_empty: bool = False) -> dict[str, Any]:
    """The request body as a JSON object. Raises 413 past the app's size limit, 400
    ``invalid_json`` when it is not JSON, 400 ``bad_request`` when it is not an object."""
    data = await read_json(request, empty=_EMPTY)
    if data is _EMPTY:
        if allow_empty:
            return {}
        raise bad_request("the request body is empty; expected a JSON object", "invalid_json")
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, not {_json_kind(data)}")
    return data


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array"


def _describe_validation(exc: ValidationError, allowed: list[str]) -> str:
    unknown: list[str] = []
    problems: list[str] = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = ".".join(str(p) for p in err["loc"]) or "body"
        if err["type"] == "extra_forbidden":
            unknown.append(loc)
        else:
            problems.append(f"{loc}: {err['msg']}")
    if unknown:
        problems.insert(
            0, f"unknown field(s): {', '.join(unknown)} (allowed: {', '.join(allowed)})"
        )
    return "; ".join(problems)


M = TypeVar("M", bound=BaseModel)


def parse_body(model: type[M], data: dict[str, Any]) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise bad_request(_describe_validation(exc, list(model.model_fields))) from None


class CreateWorkBody(BaseModel):
    """``POST /api/v1/work``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    agent: str = Field(min_length=1, max_length=200)
    input: Any = None
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)
    max_attempts: int | None = Field(default=None, ge=1, le=100)
    priority: int = Field(default=0, ge=-_INT32 - 1, le=_INT32)


class EmptyBody(BaseModel):
    """Actions take no parameters (an empty body or ``{}``)."""

    model_config = ConfigDict(extra="forbid")


def _query(request: web.Request, allowed: tuple[str, ...]) -> dict[str, str]:
    """Single-valued query parameters; unknown or repeated ones are refused."""
    unknown = sorted({k for k in request.query if k not in allowed})
    if unknown:
        raise bad_request(
            f"unknown query parameter(s): {', '.join(unknown)} (allowed: {', '.join(allowed)})"
        )
    out: dict[str, str] = {}
    for key in allowed:
        values = request.query.getall(key, [])
        if len(values) > 1:
            raise bad_request(f"query parameter {key!r} given more than once")
        if values:
            why = _bad_text(values[0])
            if why:
                raise bad_request(f"query parameter {key!r} {why}")
            out[key] = values[0]
    return out


def _work_id(request: web.Request) -> str:
    work_id = request.match_info["id"]
    if not _WORK_ID.fullmatch(work_id):
        raise ApiError(404, "not_found", "no work item with that id")
    return work_id


def actor_of(request: web.Request) -> str:
    """Who acts: ``operator``, or ``operator:<name>`` from the ``X-Tether-Operator`` header."""
    values = request.headers.getall(OPERATOR_HEADER, [])
    if not values:
        return ACTOR
    if len(values) > 1:
        raise bad_request(f"header {OPERATOR_HEADER} given more than once")
    name = values[0].strip()
    if (
        not name
        or len(name) > MAX_OPERATOR_NAME
        or not _PRINTABLE.fullmatch(name)
        or _bad_text(name)
    ):
        raise bad_request(
            f"header {OPERATOR_HEADER} must be 1 to {MAX_OPERATOR_NAME} printable characters"
        )
    return f"{ACTOR}:{name}"


def _limit(params: dict[str, str]) -> int:
    if "limit" not in params:
        return DEFAULT_LIST_LIMIT
    raw = params["limit"]
    if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= MAX_LIST_LIMIT:
        raise bad_request(f"limit must be an integer from 1 to {MAX_LIST_LIMIT}")
    return int(raw)


def _timestamp(params: dict[str, str], name: str) -> datetime | None:
    """An ISO 8601 date-time (a date alone is midnight; no offset means UTC)."""
    raw = params.get(name)
    if raw is None:
        return None
    text = raw.strip().upper()
    for candidate in (text, _SPACED_OFFSET.sub(r"+\1", text)):
        try:
            value = datetime.fromisoformat(candidate)
            if value.tzinfo is None:
                value = value.replace(tzinfo=UTC)
            return value.astimezone(UTC)
        except (ValueError, OverflowError):
            continue
    raise bad_request(
        f"{name} must be an ISO 8601 date-time such as 2025-01-31T09:30:00Z, not {raw!r}"
    )


def _text_param(params: dict[str, str], name: str, max_length: int) -> str | None:
    value = params.get(name)
    if value is not None and not 1 <= len(value) <= max_length:
        raise bad_request(f"{name} must be 1 to {max_length} characters")
    return value


def encode_cursor(work: Any) -> str:
    """The opaque cursor after ``work``: its ``(created_at, id)``, base64url-encoded."""
    created = work.created_at
    if created.tzinfo is None:
        created = created.replace(tzinfo=UTC)
    raw = json.dumps([created.astimezone(UTC).isoformat(), work.id], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The ``(created_at, id)`` a cursor from :func:`encode_cursor` names; 400 otherwise."""
    invalid = bad_request("cursor is not valid: pass the next_cursor of a previous page as is")
    if not 1 <= len(cursor) <= 200 or not cursor.isascii():
        raise invalid
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_raw, work_id = json.loads(raw.decode("utf-8"))
        created = datetime.fromisoformat(created_raw)
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError):
        raise invalid from None
    if created.tzinfo is None or not isinstance(work_id, str) or not _WORK_ID.fullmatch(work_id):
        raise invalid
    return created, work_id


# -- handlers ----------------------------------------------------------------------------------


async def create_work(request: web.Request) -> web.Response:
    app = request.app
    body = parse_body(CreateWorkBody, await read_json_object(request))
    known = app[KNOWN_AGENTS_KEY]
    if known is not None and body.agent not in known:
        names = ", ".join(sorted(known)) or "(none)"
        raise bad_request(f"unknown agent {body.agent!r}; known agents: {names}")
    key = body.idempotency_key
    work, created = await app[LEDGER_KEY].create_work(
        body.agent,
        body.input,
        source="api" if key is not None else None,
        source_event_id=key,
        max_attempts=body.max_attempts or app[SETTINGS_KEY].max_attempts,
        priority=body.priority,
        actor=actor_of(request),
    )
    if not created and (work.agent != body.agent or work.input != body.input):
        # The key names an earlier, different request: refuse rather than pretend.
        raise ApiError(
            409,
            "idempotency_conflict",
            f"idempotency_key {key!r} was already used for work {work.id} "
            "with a different agent or input",
        )
    return web.json_response(
        work_json(work),
        status=201 if created else 200,
        headers={"Location": f"{PREFIX}/work/{work.id}"},
    )


#: query parameters of GET /api/v1/work
LIST_PARAMS = (
    "state",
    "agent",
    "conversation_id",
    "source",
    "created_after",
    "created_before",
    "updated_after",
    "updated_before",
    "q",
    "limit",
    "cursor",
)


async def list_work(request: web.Request) -> web.Response:
    """Work items matching the filters, newest first, a page at a time, with counts."""
    params = _query(request, LIST_PARAMS)
    state = params.get("state")
    valid = [s.value for s in WorkState]
    if state is not None and state not in valid:
        raise bad_request(f"unknown state {state!r}; valid states: {', '.join(valid)}")
    conversation_id = params.get("conversation_id")
    if conversation_id is not None and not _WORK_ID.fullmatch(conversation_id):
        raise bad_request("conversation_id is not a conversation id")
    limit = _limit(params)
    cursor = params.get("cursor")
    filters: dict[str, Any] = {
        "state": state,
        "agent": _text_param(params, "agent", 200),
        "conversation_id": conversation_id,
        "source": _text_param(params, "source", 200),
        "text": _text_param(params, "q", 200),
        "before": decode_cursor(cursor) if cursor is not None else None,
    }
    for name in ("created_after", "created_before", "updated_after", "updated_before"):
        filters[name] = _timestamp(params, name)
    ledger = request.app[LEDGER_KEY]
    items = await ledger.search_work(**filters, limit=limit + 1)
    next_cursor = encode_cursor(items[limit - 1]) if len(items) > limit else None
    counts = await ledger.work_overview()
    return web.json_response(
        {
            "items": [work_json(w) for w in items[:limit]],
            "next_cursor": next_cursor,
            "counts": counts,
        }
    )


async def get_work(request: web.Request) -> web.Response:
    work_id = _work_id(request)
    ledger = request.app[LEDGER_KEY]
    work = await ledger.get_work(work_id)
    steps = await ledger.list_steps(work_id)
    events = await ledger.list_recent_events(work_id, limit=DETAIL_EVENTS)
    children = await ledger.list_children(work_id)
    waits = [wait_json(w) for w in await ledger.list_waits(work_id=work_id, limit=100)]
    current_wait = await ledger.get_current_wait(work_id)
    messages = await ledger.list_messages(work.conversation_id) if work.conversation_id else []
    usage = await ledger.work_usage(work_id)
    return web.json_response(
        work_detail(
            work,
            steps=steps,
            waits=waits,
            events=events,
            children=children,
            current_wait=current_wait,
            messages=messages,
            usage=usage,
        )
    )


async def list_usage(request: web.Request) -> web.Response:
    """Model calls, tokens and cost grouped by agent, model, conversation or work item."""
    params = _query(request, ("by", "agent", "conversation_id", "since", "limit"))
    by = params.get("by", "agent")
    if by not in USAGE_GROUPS:
        raise bad_request(f"by must be one of {', '.join(USAGE_GROUPS)}, not {by!r}")
    conversation_id = params.get("conversation_id")
    if conversation_id is not None and not _WORK_ID.fullmatch(conversation_id):
        raise bad_request("conversation_id is not a conversation id")
    groups, total = await request.app[LEDGER_KEY].usage_totals(
        by,
        agent=_text_param(params, "agent", 200),
        conversation_id=conversation_id,
        since=_timestamp(params, "since"),
        limit=_limit(params),
    )
    return web.json_response(usage_list_json(by, groups, total))


def _action(name: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        work_id = _work_id(request)
        parse_body(EmptyBody, await read_json_object(request, allow_empty=True))
        ledger = request.app[LEDGER_KEY]
        actor = actor_of(request)
        work = await getattr(ledger, f"{name}_work")(work_id, actor=actor)
        return web.json_response(work_json(work))

    handler.__name__ = f"{name}_work"
    return handler


class RestartBody(BaseModel):
    """``POST /api/v1/work/{id}/restart``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    from_step: int = Field(ge=1, le=_INT32)


async def restart_work(request: web.Request) -> web.Response:
    """Fork the work item into a new one that keeps steps 1..from_step-1 (201, the fork)."""
    work_id = _work_id(request)
    body = parse_body(RestartBody, await read_json_object(request))
    actor = actor_of(request)
    try:
        fork = await request.app[LEDGER_KEY].restart_from_step(work_id, body.from_step, actor)
    except InvalidRestartStep as exc:
        raise bad_request(str(exc), "invalid_step") from None
    return web.json_response(
        work_json(fork), status=201, headers={"Location": f"{PREFIX}/work/{fork.id}"}
    )


async def list_workers(request: web.Request) -> web.Response:
    ledger = request.app[LEDGER_KEY]
    workers = await ledger.list_workers()
    leases = await ledger.count_leases_by_owner()
    return web.json_response([worker_json(w, leases_held=leases.get(w.id, 0)) for w in workers])


# -- outbound messages -------------------------------------------------------------------------


def _outbox_id(request: web.Request) -> int:
    raw = request.match_info["id"]
    if not _OUTBOX_ID.fullmatch(raw) or int(raw) > _INT32:
        raise ApiError(404, "not_found", "no outbound message with that id")
    return int(raw)


async def list_outbox(request: web.Request) -> web.Response:
    """Outbound messages, newest first (``?state=unknown``: the ones whose delivery is in
    doubt)."""
    params = _query(request, ("state", "work_id", "conversation_id", "limit"))
    state = params.get("state")
    if state is not None and state not in OUTBOX_STATES:
        raise bad_request(f"unknown state {state!r}; valid states: {', '.join(OUTBOX_STATES)}")
    for name in ("work_id", "conversation_id"):
        if name in params and not _WORK_ID.fullmatch(params[name]):
            raise bad_request(f"{name} is not an id")
    messages = await request.app[LEDGER_KEY].list_outbox(
        state=state,
        work_id=params.get("work_id"),
        conversation_id=params.get("conversation_id"),
        limit=_limit(params),
    )
    return web.json_response({"items": [outbox_json(m) for m in messages]})


def _outbox_action(name: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        outbox_id = _outbox_id(request)
        parse_body(EmptyBody, await read_json_object(request, allow_empty=True))
        actor = actor_of(request)
        ledger = request.app[LEDGER_KEY]
        try:
            message = await getattr(ledger, f"{name}_outbox")(outbox_id, actor)
        except OutboxNotFound as exc:
            raise ApiError(404, "not_found", str(exc)) from None
        return web.json_response(outbox_json(message))

    handler.__name__ = f"{name}_outbox"
    return handler


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(OPENAPI)


ACTIONS = ("pause", "resume", "cancel", "retry")
OUTBOX_ACTIONS = ("resend", "abandon")


def setup_api(app: web.Application) -> None:
    """Add the operator API's routes to ``app`` (the app provides the keys and middlewares)."""
    r = app.router
    r.add_post(f"{PREFIX}/work", create_work)
    r.add_get(f"{PREFIX}/work", list_work)
    r.add_get(f"{PREFIX}/work/{{id}}", get_work)
    for name in ACTIONS:
        r.add_post(f"{PREFIX}/work/{{id}}/{name}", _action(name))
    r.add_post(f"{PREFIX}/work/{{id}}/restart", restart_work)
    r.add_get(f"{PREFIX}/outbox", list_outbox)
    for name in OUTBOX_ACTIONS:
        r.add_post(f"{PREFIX}/outbox/{{id}}/{name}", _outbox_action(name))
    r.add_get(f"{PREFIX}/workers", list_workers)
    r.add_get(f"{PREFIX}/usage", list_usage)
    r.add_get(f"{PREFIX}/openapi.json", openapi)
