"""The operator side of durable waits, under ``/api/v1``: list and read waits, resolve one,
send a signal.

Protected by the operator token like every ``/api/`` route (:func:`gateway.api.operator_auth`).
A resolve is validated against the wait's kind before the ledger is asked; the ledger decides
in one transaction (first decision wins) and validates the payload again. Ledger errors
(:class:`~ledger.errors.WaitNotFound`, :class:`~ledger.errors.WaitAlreadyResolved`,
:class:`~ledger.errors.InvalidResolution`) are rendered by the app's error middleware.
Imports ledger and the gateway's API helpers.
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from gateway.api import (
    DEFAULT_LIST_LIMIT,
    LEDGER_KEY,
    MAX_LIST_LIMIT,
    PREFIX,
    ApiError,
    _bad_text,
    _query,
    bad_request,
    parse_body,
    read_json_object,
)
from gateway.serialize import wait_json
from ledger.errors import WaitAlreadyResolved
from ledger.waits import CANCELLED, KINDS, PENDING, RESOLVED, TIMED_OUT

ACTOR = "operator"
WAIT_STATES = (PENDING, RESOLVED, TIMED_OUT, CANCELLED)
# ids the ledger hands out are 28 hex characters; anything else cannot name a wait
_ID = re.compile(r"[A-Za-z0-9_-]{1,40}")
#: printable, no control characters; "operator:<by>" must fit resolved_by (200)
_BY = r"^[^\x00-\x1f\x7f]+$"
#: the body keys each kind of wait accepts (besides "by")
KIND_KEYS: dict[str, tuple[str, ...]] = {
    "approval": ("decision", "comment"),
    "input": ("input",),
    "signal": ("data",),
    "timer": (),
}
_KIND_SHAPES = {
    "approval": '{"decision": "approve"|"deny", "comment"?: string}',
    "input": '{"input": <value>}',
    "signal": '{"data": <value>}',
    "timer": "{} (fires the timer now)",
}


class ResolveBody(BaseModel):
    """``POST /api/v1/waits/{id}/resolve``; which keys fit depends on the wait's kind. Values
    are checked by the ledger (decision, comment, the input's JSON Schema)."""

    model_config = ConfigDict(extra="forbid")

    decision: Any = None
    comment: Any = None
    input: Any = None
    data: Any = None
    by: str | None = Field(default=None, min_length=1, max_length=100, pattern=_BY, strict=True)


class SignalBody(BaseModel):
    """``POST /api/v1/signals/{name}``."""

    model_config = ConfigDict(extra="forbid")

    key: str | None = Field(default=None, max_length=400, strict=True)
    data: Any = None
    by: str | None = Field(default=None, min_length=1, max_length=100, pattern=_BY, strict=True)


def resolver(by: str | None) -> str:
    return f"{ACTOR}:{by.strip()}" if by and by.strip() else ACTOR


def already_resolved(exc: WaitAlreadyResolved) -> ApiError:
    """409 with the first decision: who made it and what it was."""
    return ApiError(
        409,
        "already_resolved",
        str(exc),
        extra={
            "state": exc.state,
            "resolution": exc.resolution,
            "resolved_by": exc.resolved_by,
        },
    )


def _wait_id(request: web.Request) -> str:
    wait_id = request.match_info["id"]
    if not _ID.fullmatch(wait_id):
        raise ApiError(404, "not_found", "no wait with that id")
    return wait_id


def _one_of(params: dict[str, str], name: str, valid: tuple[str, ...]) -> str | None:
    value = params.get(name)
    if value is not None and value not in valid:
        raise bad_request(f"unknown {name} {value!r}; valid: {', '.join(valid)}")
    return value


# -- handlers ----------------------------------------------------------------------------------


async def list_waits(request: web.Request) -> web.Response:
    params = _query(request, ("state", "kind", "work_id", "limit"))
    state = _one_of(params, "state", WAIT_STATES)
    kind = _one_of(params, "kind", KINDS)
    work_id = params.get("work_id")
    if work_id is not None and not _ID.fullmatch(work_id):
        raise bad_request("work_id is not a work item id")
    limit = DEFAULT_LIST_LIMIT
    if "limit" in params:
        raw = params["limit"]
        if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= MAX_LIST_LIMIT:
            raise bad_request(f"limit must be an integer from 1 to {MAX_LIST_LIMIT}")
        limit = int(raw)
    waits = await request.app[LEDGER_KEY].list_waits(
        state=state, kind=kind, work_id=work_id, limit=limit
    )
    return web.json_response({"items": [wait_json(w) for w in waits]})


async def get_wait(request: web.Request) -> web.Response:
    wait = await request.app[LEDGER_KEY].get_wait(_wait_id(request))
    return web.json_response(wait_json(wait))


async def resolve_wait(request: web.Request) -> web.Response:
    wait_id = _wait_id(request)
    body = parse_body(ResolveBody, await read_json_object(request, allow_empty=True))
    ledger = request.app[LEDGER_KEY]
    wait = await ledger.get_wait(wait_id)
    if wait.state != PENDING:
        # The first decision stands; say which, whatever this body asked for.
        raise already_resolved(
            WaitAlreadyResolved(wait.id, wait.state, wait.resolution, wait.resolved_by)
        )
    given = body.model_fields_set - {"by"}
    allowed = KIND_KEYS.get(wait.kind, ())
    wrong = sorted(given - set(allowed))
    if wrong:
        raise bad_request(
            f"field(s) {', '.join(wrong)} do not fit a {wait.kind} wait; "
            f"it is resolved with {_KIND_SHAPES.get(wait.kind, '{}')}"
        )
    payload = {k: getattr(body, k) for k in given}
    try:
        resolved = await ledger.resolve_wait(wait_id, payload, by=resolver(body.by))
    except WaitAlreadyResolved as exc:  # another decision committed first
        raise already_resolved(exc) from None
    return web.json_response(wait_json(resolved))


async def send_signal(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if not 1 <= len(name) <= 200:
        raise bad_request("a signal name is 1 to 200 characters")
    why = _bad_text(name)
    if why:
        raise bad_request(f"the signal name {why}")
    body = parse_body(SignalBody, await read_json_object(request, allow_empty=True))
    waits = await request.app[LEDGER_KEY].resolve_signal(
        name, body.key, body.data, by=resolver(body.by)
    )
    if not waits:
        key = "no key" if body.key is None else f"key {body.key!r}"
        raise ApiError(
            404, "no_waiter", f"nothing waits for signal {name!r} with {key}; nothing was written"
        )
    return web.json_response({"resolved": [w.id for w in waits]})


def setup_waits_api(app: web.Application) -> None:
    """Add the wait routes to ``app`` (after :func:`gateway.api.setup_api`)."""
    r = app.router
    r.add_get(f"{PREFIX}/waits", list_waits)
    r.add_get(f"{PREFIX}/waits/{{id}}", get_wait)
    r.add_post(f"{PREFIX}/waits/{{id}}/resolve", resolve_wait)
    r.add_post(f"{PREFIX}/signals/{{name}}", send_signal)
