"""The operator API under ``/api/v1``: start, list, inspect and steer work; list workers.

Every route but ``/api/v1/openapi.json`` needs ``Authorization: Bearer <operator token>``
(checked by :func:`operator_auth` for everything under ``/api/``, so a route added later is
protected by default). Handlers validate all input before touching the ledger and answer only
after the ledger call returned, i.e. after its transaction committed. Errors are raised as
:class:`ApiError` (or ledger errors) and rendered by the app's error middleware.
Imports ledger and config.
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from config.settings import Settings
from gateway.openapi import OPENAPI
from gateway.serialize import wait_json, work_detail, work_json, worker_json
from ledger import Ledger, WorkState

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


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _bad_text(value: str) -> str | None:
    """Why a string cannot be stored (PostgreSQL rejects NUL; lone surrogates are not UTF-8)."""
    if "\x00" in value:
        return "contains a NUL character (\\u0000)"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "contains an unpaired surrogate"
    return None


def _check_storable(value: Any) -> None:
    """Walk a parsed JSON value (iteratively) and refuse strings the databases cannot store."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            texts = [item]
        elif isinstance(item, dict):
            texts = list(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
            continue
        else:
            continue
        for text in texts:
            why = _bad_text(text)
            if why:
                raise bad_request(f"a string in the request body {why}", "invalid_json")


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
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise bad_request(f"the request body is not UTF-8 ({exc.reason})", "invalid_json") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}", "invalid_json") from None
    except ValueError as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}", "invalid_json") from None
    except RecursionError:
        raise bad_request("the request body is nested too deeply", "invalid_json") from None
    _check_storable(data)
    return data


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
        actor=ACTOR,
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


async def list_work(request: web.Request) -> web.Response:
    params = _query(request, ("state", "agent", "limit"))
    state = params.get("state")
    valid = [s.value for s in WorkState]
    if state is not None and state not in valid:
        raise bad_request(f"unknown state {state!r}; valid states: {', '.join(valid)}")
    agent = params.get("agent")
    if agent is not None and not 1 <= len(agent) <= 200:
        raise bad_request("agent must be 1 to 200 characters")
    limit = DEFAULT_LIST_LIMIT
    if "limit" in params:
        raw = params["limit"]
        if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= MAX_LIST_LIMIT:
            raise bad_request(f"limit must be an integer from 1 to {MAX_LIST_LIMIT}")
        limit = int(raw)
    ledger = request.app[LEDGER_KEY]
    items = await ledger.list_work(state=state, agent=agent, limit=limit)
    counts = await ledger.count_by_state()
    return web.json_response({"items": [work_json(w) for w in items], "counts": counts})


async def get_work(request: web.Request) -> web.Response:
    work_id = _work_id(request)
    ledger = request.app[LEDGER_KEY]
    work = await ledger.get_work(work_id)
    steps = await ledger.list_steps(work_id)
    events = await ledger.list_recent_events(work_id, limit=DETAIL_EVENTS)
    children = await ledger.list_children(work_id)
    waits = [wait_json(w) for w in await ledger.list_waits(work_id=work_id, limit=100)]
    return web.json_response(
        work_detail(work, steps=steps, waits=waits, events=events, children=children)
    )


def _action(name: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        work_id = _work_id(request)
        parse_body(EmptyBody, await read_json_object(request, allow_empty=True))
        ledger = request.app[LEDGER_KEY]
        work = await getattr(ledger, f"{name}_work")(work_id, actor=ACTOR)
        return web.json_response(work_json(work))

    handler.__name__ = f"{name}_work"
    return handler


async def list_workers(request: web.Request) -> web.Response:
    workers = await request.app[LEDGER_KEY].list_workers()
    return web.json_response([worker_json(w) for w in workers])


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(OPENAPI)


ACTIONS = ("pause", "resume", "cancel", "retry")


def setup_api(app: web.Application) -> None:
    """Add the operator API's routes to ``app`` (the app provides the keys and middlewares)."""
    r = app.router
    r.add_post(f"{PREFIX}/work", create_work)
    r.add_get(f"{PREFIX}/work", list_work)
    r.add_get(f"{PREFIX}/work/{{id}}", get_work)
    for name in ACTIONS:
        r.add_post(f"{PREFIX}/work/{{id}}/{name}", _action(name))
    r.add_get(f"{PREFIX}/workers", list_workers)
    r.add_get(f"{PREFIX}/openapi.json", openapi)
