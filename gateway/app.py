"""The aiohttp application: health, the operator API (work, waits, signals), resume URLs, JSON
errors and the access log.

Every error answer, from any route (unknown paths and methods included), is
``{"error": {"code": "<stable code>", "message": "<text>"}}``. A database that cannot be reached
answers 503 ``ledger_unavailable`` (the caller retries; nothing was acknowledged). Unexpected
exceptions answer 500 ``internal`` without a traceback and are logged with a reference.
Imports ledger and config.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from config.settings import Settings
from gateway.api import (
    KNOWN_AGENTS_KEY,
    LEDGER_KEY,
    SETTINGS_KEY,
    TOKEN_KEY,
    ApiError,
    error_response,
    operator_auth,
    setup_api,
)
from gateway.console import setup_console
from gateway.events import setup_events
from gateway.http_chat import setup_http_chat
from gateway.metrics import setup_metrics
from gateway.resume import setup_resume
from gateway.slack import setup_slack
from gateway.telegram import setup_telegram
from gateway.waits_api import already_resolved, setup_waits_api
from gateway.webhooks import setup_webhooks
from ledger import IllegalTransition, Ledger, LedgerUnavailable, WorkNotFound
from ledger.errors import InvalidResolution, WaitAlreadyResolved, WaitNotFound

log = logging.getLogger(__name__)
access_log = logging.getLogger("gateway.access")

#: largest request body accepted (413 beyond)
MAX_BODY = 1024 * 1024
#: how long /readyz waits for the database
READY_TIMEOUT = 5.0
#: Retry-After on 503 answers (seconds)
RETRY_AFTER = "1"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    411: "length_required",
    413: "payload_too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    429: "too_many_requests",
    431: "headers_too_large",
}
#: response headers of an aiohttp HTTPException worth keeping on the JSON answer
_KEEP_HEADERS = ("Allow", "WWW-Authenticate", "Retry-After", "Location")
#: errors raised when the database cannot be reached or used right now
_DB_DOWN = (LedgerUnavailable, OperationalError, DBAPIError, PoolTimeout, OSError, TimeoutError)


def _unavailable() -> web.Response:
    return error_response(
        503,
        "ledger_unavailable",
        "the ledger database is unavailable; nothing was written, retry later",
        {"Retry-After": RETRY_AFTER},
    )


def _from_http_exception(exc: web.HTTPException) -> web.Response:
    code = _HTTP_CODES.get(exc.status, f"http_{exc.status}")
    if exc.status == 404:
        message = "no such resource"
    elif exc.status == 405:
        message = f"method not allowed; allowed: {exc.headers.get('Allow', '')}".rstrip("; ")
    else:
        message = exc.text or exc.reason
        if message.startswith(f"{exc.status}: "):
            message = message[len(f"{exc.status}: ") :]
    headers = {h: exc.headers[h] for h in _KEEP_HEADERS if h in exc.headers}
    return error_response(exc.status, code, message, headers)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render every error as the JSON error shape."""
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.code, exc.message, exc.headers, exc.extra)
    except (WorkNotFound, WaitNotFound) as exc:
        return error_response(404, "not_found", str(exc))
    except WaitAlreadyResolved as exc:
        err = already_resolved(exc)
        return error_response(err.status, err.code, err.message, extra=err.extra)
    except InvalidResolution as exc:
        return error_response(400, "invalid_resolution", str(exc))
    except IllegalTransition as exc:
        return error_response(409, "illegal_transition", str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # redirects and the like
        return _from_http_exception(exc)
    except asyncio.CancelledError:
        raise
    except _DB_DOWN as exc:
        log.warning(
            "%s %s: ledger unavailable: %s: %s",
            request.method,
            _loggable_path(request.path),
            type(exc).__name__,
            str(exc).splitlines()[0] if str(exc) else "",
        )
        return _unavailable()
    except Exception:
        ref = secrets.token_hex(6)
        log.exception("%s %s failed (ref %s)", request.method, _loggable_path(request.path), ref)
        return error_response(
            500, "internal", f"internal error; the server log has the details (ref {ref})"
        )


def _loggable_path(path: str) -> str:
    # A resume URL's token is a credential: keep it out of the log.
    if path.startswith("/resume/"):
        return "/resume/<token>"
    return path


@web.middleware
async def access_logger(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One DEBUG line per request: method, path, status, duration. Never headers (the
    Authorization header carries the operator token) nor the query string."""
    if not access_log.isEnabledFor(logging.DEBUG):
        return await handler(request)
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        access_log.debug(
            "%s %s %d %.1fms",
            request.method,
            _loggable_path(request.path),
            status,
            (time.perf_counter() - started) * 1000,
        )


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers. Never touches the database."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: the database answers (and is migrated) within a few seconds."""
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            await request.app[LEDGER_KEY].ping()
    except _DB_DOWN as exc:
        log.warning("not ready: %s: %s", type(exc).__name__, exc)
        return _unavailable()
    return web.json_response({"status": "ready"})


def create_app(
    ledger: Ledger,
    settings: Settings,
    *,
    operator_token: str,
    known_agents: frozenset[str] | None = None,
    chat_policies: Mapping[str, tuple[str, float]] | None = None,
) -> web.Application:
    """The gateway's aiohttp application.

    ``operator_token`` guards ``/api/*`` (see :func:`config.load_or_create_operator_token`);
    ``known_agents``, when given, is the set of agents ``POST /api/v1/work`` accepts;
    ``chat_policies`` is ``{agent: (on_busy, collect_window)}`` for chat messages.
    """
    if not operator_token or not operator_token.strip():
        raise ValueError("the operator API never runs without an operator token")
    app = web.Application(
        client_max_size=MAX_BODY,
        middlewares=[access_logger, json_errors, operator_auth],
    )
    app[LEDGER_KEY] = ledger
    app[SETTINGS_KEY] = settings
    app[KNOWN_AGENTS_KEY] = frozenset(known_agents) if known_agents is not None else None
    app[TOKEN_KEY] = operator_token.strip().encode("utf-8")
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    setup_api(app)
    setup_waits_api(app)
    setup_resume(app)
    setup_http_chat(app, chat_policies or {})
    setup_telegram(app)
    setup_slack(app)
    setup_webhooks(app)
    setup_console(app)
    setup_events(app)
    setup_metrics(app)
    return app
