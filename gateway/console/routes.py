"""The operator web console under ``/console``: server-rendered pages (Jinja2, autoescaped) with
a little JavaScript for confirmations and live regions.

Pages: the work list (state filters, counts), a work item (state, error, lease, current wait,
steps, model usage, history, actions), pending approvals, model usage totals, and a chat box
on the HTTP chat channel talking to the default agent. The console is a sub-application with
its own middleware, so every route added here is protected by default: without a valid session
cookie a request is redirected to ``/console/login``; a POST without this session's CSRF token
answers 403 and changes nothing. Actions go through the ledger only; a refused one (an illegal
transition, a wait decided already) comes back as a flash message, never a 500.
Imports ledger, config and the gateway's own modules.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp_jinja2
import jinja2
from aiohttp import web
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from adapters.http_chat import CHANNEL, MAX_TEXT
from gateway.api import LEDGER_KEY, SETTINGS_KEY, TOKEN_KEY, _bad_text
from gateway.console import auth
from gateway.http_chat import CHAT_POLICIES_KEY
from ledger import TERMINAL, IllegalTransition, Ledger, LedgerUnavailable, WorkNotFound, WorkState
from ledger.errors import InvalidResolution, WaitAlreadyResolved, WaitNotFound
from ledger.usage import USAGE_GROUPS

log = logging.getLogger(__name__)

PREFIX = "/console"
LOGIN = f"{PREFIX}/login"
STATIC = f"{PREFIX}/static"
#: who the ledger records for actions taken here
ACTOR = "console"
LIST_LIMIT = 100
EVENT_LIMIT = 300
MESSAGE_LIMIT = 200
APPROVAL_LIMIT = 200
#: seconds between live updates of a page
POLL_SECONDS = {"work": 2, "list": 3, "approvals": 2, "chat": 1}
#: without JavaScript, pages without a text box reload themselves this often (seconds)
NOSCRIPT_REFRESH = 5
CHAT_COOKIE_AGE = 30 * 24 * 3600
ACTIONS = ("pause", "resume", "cancel", "retry")
STATES = tuple(s.value for s in WorkState)
_ID = re.compile(r"[A-Za-z0-9_-]{1,40}")
_CONVERSATION = re.compile(r"[A-Za-z0-9._:@-]{1,120}")
_MESSAGE_ID = re.compile(r"[A-Za-z0-9-]{8,64}")
_DB_DOWN = (LedgerUnavailable, OperationalError, DBAPIError, PoolTimeout, OSError, TimeoutError)
_HERE = Path(__file__).resolve().parent

JINJA_KEY = web.AppKey("tether.console.jinja", jinja2.Environment)
REVOKED_KEY = web.AppKey("tether.console.revoked", auth.Revoked)
#: the request's session (``web.RequestKey`` where aiohttp has it, 3.13+; a string before)
SESSION_KEY: Any = (
    web.RequestKey("tether.console.session", auth.Session)
    if hasattr(web, "RequestKey")
    else "tether.console.session"
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


# -- template helpers --------------------------------------------------------------------------


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def fmt_time(value: datetime | None) -> str:
    """``2025-01-31 12:34:56`` (UTC)."""
    if value is None:
        return "—"
    return _aware(value).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def fmt_iso(value: datetime | None) -> str:
    return _aware(value).isoformat() if value is not None else ""


def fmt_seconds(seconds: float) -> str:
    if seconds < 0:
        seconds = 0
    if seconds < 10:
        return f"{seconds:.2f}s" if seconds < 1 else f"{seconds:.1f}s"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds // 60:.0f}m {seconds % 60:.0f}s"
    if seconds < 172800:
        return f"{seconds // 3600:.0f}h {seconds % 3600 // 60:.0f}m"
    return f"{seconds // 86400:.0f}d {seconds % 86400 // 3600:.0f}h"


def fmt_ago(value: datetime | None) -> str:
    """``5s ago`` / ``in 25s``."""
    if value is None:
        return ""
    delta = (datetime.now(UTC) - _aware(value)).total_seconds()
    return f"{fmt_seconds(delta)} ago" if delta >= 0 else f"in {fmt_seconds(-delta)}"


def fmt_duration(start: datetime | None, end: datetime | None) -> str:
    if start is None:
        return "—"
    finish = _aware(end) if end is not None else datetime.now(UTC)
    return fmt_seconds((finish - _aware(start)).total_seconds())


def fmt_json(value: Any, limit: int = 4000) -> str:
    """A JSON value for a ``<pre>``: indented, cut at ``limit`` characters."""
    if isinstance(value, str):
        text = value
    else:
        text = json.dumps(value, indent=2, ensure_ascii=False, default=str, sort_keys=True)
    return text if len(text) <= limit else text[:limit] + "\n… (cut)"


def fmt_compact(value: Any, limit: int = 300) -> str:
    """A JSON value on one line, without null fields, cut at ``limit`` characters."""
    if value is None:
        return ""
    if isinstance(value, dict):
        value = {k: v for k, v in value.items() if v is not None}
        if not value:
            return ""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def progress_of(value: Any) -> tuple[float, float] | None:
    """``(done, of)`` when a step's progress has that shape (as the demo agent reports)."""
    if isinstance(value, dict):
        done, of = value.get("done"), value.get("of")
        if (
            isinstance(done, int | float)
            and isinstance(of, int | float)
            and not isinstance(done, bool)
            and not isinstance(of, bool)
            and of > 0
        ):
            return float(done), float(of)
    return None


def error_text(error: Any) -> str:
    """The headline of a work item's or step's error."""
    if isinstance(error, dict):
        kind = error.get("type") or error.get("error_type")
        message = error.get("message") or error.get("summary")
        if kind and message:
            return f"{kind}: {message}"
        if message or kind:
            return str(message or kind)
    return fmt_compact(error, 500)


# -- rendering -----------------------------------------------------------------------------------


def _token(request: web.Request) -> bytes:
    return request.config_dict[TOKEN_KEY]


def _ledger(request: web.Request) -> Ledger:
    return request.config_dict[LEDGER_KEY]


def _is_https(request: web.Request) -> bool:
    public = request.config_dict[SETTINGS_KEY].effective_public_url
    return (
        request.secure
        or request.headers.get("X-Forwarded-Proto", "").lower() == "https"
        or public.startswith("https://")
    )


def _set_cookie(
    request: web.Request, response: web.StreamResponse, name: str, value: str, max_age: int
) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=auth.COOKIE_PATH,
        httponly=True,
        samesite="Strict",
        secure=_is_https(request),
    )


def _clear_cookie(response: web.StreamResponse, name: str) -> None:
    response.del_cookie(name, path=auth.COOKIE_PATH, httponly=True, samesite="Strict")


def _csrf(request: web.Request) -> str:
    session = request.get(SESSION_KEY)
    return auth.csrf_token(_token(request), session) if session is not None else ""


async def _render(
    request: web.Request,
    template: str,
    context: dict[str, Any],
    *,
    status: int = 200,
    live: int | None = None,
    refresh: bool = False,
) -> web.Response:
    """A full page. Shows (and clears) the pending flash message. ``live`` is the polling
    interval of its live region; ``refresh`` reloads the whole page when JavaScript is off."""
    session = request.get(SESSION_KEY)
    flash = auth.unpack_flash(_token(request), request.cookies.get(auth.FLASH_COOKIE))
    pending = 0
    if session is not None:
        try:
            pending = len(
                await _ledger(request).list_waits(
                    state="pending", kind="approval", limit=APPROVAL_LIMIT
                )
            )
        except _DB_DOWN:
            pending = 0
    page = {
        "session": session,
        "csrf": _csrf(request),
        "flash": flash,
        "live": live,
        "refresh": NOSCRIPT_REFRESH if refresh and live else None,
        "pending_approvals": pending,
        "nav": "",
        **context,
    }
    text = aiohttp_jinja2.render_string(template, request, page, app_key=JINJA_KEY)
    response = web.Response(text=text, status=status, content_type="text/html")
    if auth.FLASH_COOKIE in request.cookies:
        _clear_cookie(response, auth.FLASH_COOKIE)
    return response


def _fragment(
    request: web.Request, template: str, context: dict[str, Any], *, done: bool = False
) -> web.Response:
    """A live region's new content; ``X-Console-Done: 1`` tells the page to stop polling."""
    page = {"csrf": _csrf(request), **context}
    text = aiohttp_jinja2.render_string(template, request, page, app_key=JINJA_KEY)
    response = web.Response(text=text, content_type="text/html")
    if done:
        response.headers["X-Console-Done"] = "1"
    return response


def _redirect(
    request: web.Request, location: str, flash: str | None = None, kind: str = "info"
) -> web.Response:
    """303 to ``location`` (POST, then GET), carrying a flash message."""
    response = web.Response(status=303, headers={"Location": location})
    if flash:
        _set_cookie(
            request, response, auth.FLASH_COOKIE, auth.pack_flash(_token(request), kind, flash), 60
        )
    return response


def _safe_next(value: Any, default: str) -> str:
    """A redirect target from a form or query: only a path inside the console."""
    if not isinstance(value, str) or not value or len(value) > 500:
        return default
    if not (value == PREFIX or value.startswith((PREFIX + "/", PREFIX + "?"))):
        return default
    if "//" in value or "\\" in value or not value.isprintable():
        return default
    return value


async def _error_page(request: web.Request, status: int, title: str, message: str) -> web.Response:
    return await _render(
        request, "error.html", {"status": status, "title": title, "message": message}, status=status
    )


# -- middleware ----------------------------------------------------------------------------------


def _public(path: str) -> bool:
    return path == LOGIN or path.startswith(STATIC + "/")


async def _guard(request: web.Request) -> web.StreamResponse | None:
    """``None`` when the request may proceed: a public path, or a valid session (and, for a
    POST, this session's CSRF token). Otherwise the answer: to the login page, or 403."""
    if _public(request.path):
        return None
    token = _token(request)
    session = auth.read_session(token, request.cookies.get(auth.COOKIE))
    if session is None or session in request.config_dict[REVOKED_KEY]:
        target = request.path_qs if request.method == "GET" else PREFIX
        if request.path.startswith(f"{PREFIX}/live/"):
            target = request.headers.get("X-Console-Page", PREFIX)
        response = web.Response(
            status=303, headers={"Location": f"{LOGIN}?{urlencode({'next': target})}"}
        )
        if auth.COOKIE in request.cookies:
            _clear_cookie(response, auth.COOKIE)
        return response
    request[SESSION_KEY] = session
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return None
    form = await request.post()
    given = form.get("csrf")
    if auth.csrf_ok(token, session, given if isinstance(given, str) else None):
        return None
    log.warning("console: %s %s without a valid CSRF token", request.method, request.path)
    return await _error_page(
        request,
        403,
        "Forbidden",
        "This form has no valid security token (CSRF); nothing was changed. "
        "Reload the page and try again.",
    )


@web.middleware
async def console_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Sessions, CSRF, HTML errors and security headers for everything under /console."""
    try:
        response = await _guard(request)
        if response is None:
            response = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        titles = {404: "Not found", 405: "Method not allowed", 413: "Too large"}
        response = await _error_page(
            request, exc.status, titles.get(exc.status, exc.reason), _http_message(exc)
        )
    except (WorkNotFound, WaitNotFound) as exc:
        response = await _error_page(request, 404, "Not found", str(exc))
    except _DB_DOWN as exc:
        log.warning("console: %s %s: ledger unavailable: %s", request.method, request.path, exc)
        response = web.Response(
            status=503,
            text="The ledger database is unavailable; nothing was changed. Retry in a moment.",
            headers={"Retry-After": "1"},
        )
    except Exception:
        ref = secrets.token_hex(6)
        log.exception("console: %s %s failed (ref %s)", request.method, request.path, ref)
        response = web.Response(
            status=500, text=f"Internal error; the server log has the details (ref {ref})."
        )
    return _secure(response)


def _http_message(exc: web.HTTPException) -> str:
    if exc.status == 404:
        return "There is no such page in the console."
    text = exc.text or exc.reason
    prefix = f"{exc.status}: "
    return text[len(prefix) :] if text.startswith(prefix) else text


def _secure(response: web.StreamResponse) -> web.StreamResponse:
    for name, value in _SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    response.headers.setdefault("Cache-Control", "no-store")
    return response


# -- login ---------------------------------------------------------------------------------------


async def login_form(request: web.Request) -> web.Response:
    nxt = _safe_next(request.query.get("next"), PREFIX)
    session = auth.read_session(_token(request), request.cookies.get(auth.COOKIE))
    if session is not None and session not in request.config_dict[REVOKED_KEY]:
        return _redirect(request, nxt)
    return await _render(request, "login.html", {"next": nxt, "error": None})


async def login(request: web.Request) -> web.Response:
    form = await request.post()
    given = form.get("token")
    nxt = _safe_next(form.get("next"), PREFIX)
    if not isinstance(given, str) or not auth.token_matches(given, _token(request)):
        log.warning("console: failed login from %s", request.remote)
        return await _render(
            request,
            "login.html",
            {"next": nxt, "error": "That is not the operator token."},
            status=401,
        )
    _, value = auth.new_session(_token(request))
    response = _redirect(request, nxt)
    _set_cookie(request, response, auth.COOKIE, value, auth.SESSION_TTL)
    return response


async def logout(request: web.Request) -> web.Response:
    request.config_dict[REVOKED_KEY].add(request[SESSION_KEY])
    response = _redirect(request, LOGIN)
    _clear_cookie(response, auth.COOKIE)
    return response


async def root_slash(request: web.Request) -> web.Response:
    return _redirect(request, PREFIX)


# -- work list -----------------------------------------------------------------------------------


async def _list_context(request: web.Request) -> dict[str, Any]:
    state = request.query.get("state") or None
    problem = None
    if state is not None and state not in STATES:
        problem = f"Unknown state {state!r}; showing every state."
        state = None
    ledger = _ledger(request)
    items = await ledger.list_work(state=state, limit=LIST_LIMIT)
    counts = await ledger.count_by_state()
    return {
        "items": items,
        "counts": counts,
        "total": sum(counts.get(s, 0) for s in STATES),
        "state": state,
        "states": STATES,
        "problem": problem,
        "limit": LIST_LIMIT,
        "poll_url": f"{PREFIX}/live/work" + (f"?state={state}" if state else ""),
    }


async def work_list(request: web.Request) -> web.Response:
    context = await _list_context(request)
    return await _render(
        request,
        "work_list.html",
        {"nav": "work", **context},
        live=POLL_SECONDS["list"],
        refresh=True,
    )


async def work_list_live(request: web.Request) -> web.Response:
    return _fragment(request, "_work_list.html", await _list_context(request))


# -- one work item -------------------------------------------------------------------------------


def _work_id(request: web.Request) -> str:
    work_id = request.match_info["id"]
    if not _ID.fullmatch(work_id):
        raise WorkNotFound(work_id[:60])
    return work_id


def available_actions(work: Any) -> list[str]:
    """The actions the state machine allows from the item's state right now."""
    state = WorkState(work.state)
    actions = []
    if state in (WorkState.QUEUED, WorkState.WAITING) or (
        state is WorkState.RUNNING and not work.control
    ):
        actions.append("pause")
    if state is WorkState.PAUSED:
        actions.append("resume")
    if state not in TERMINAL and work.control != "cancel":
        actions.append("cancel")
    if state in (WorkState.FAILED, WorkState.CANCELLED):
        actions.append("retry")
    return actions


async def _work_context(request: web.Request, work_id: str) -> dict[str, Any]:
    ledger = _ledger(request)
    work = await ledger.get_work(work_id)
    steps = await ledger.list_steps(work_id)
    events = await ledger.list_recent_events(work_id, limit=EVENT_LIMIT)
    waits = await ledger.list_waits(work_id=work_id, limit=100)
    children = await ledger.list_children(work_id)
    pending = [w for w in waits if w.state == "pending"]
    return {
        "work": work,
        "steps": steps,
        "events": list(reversed(events)),  # newest first
        "event_limit": EVENT_LIMIT,
        "waits": waits,
        "current_wait": pending[-1] if pending else None,
        "children": children,
        "usage": await ledger.work_usage(work_id),
        "actions": available_actions(work),
        "terminal": WorkState(work.state) in TERMINAL,
        "here": f"{PREFIX}/work/{work.id}",
    }


async def work_page(request: web.Request) -> web.Response:
    context = await _work_context(request, _work_id(request))
    return await _render(
        request,
        "work.html",
        {"nav": "work", **context},
        live=None if context["terminal"] else POLL_SECONDS["work"],
        refresh=True,
    )


async def work_live(request: web.Request) -> web.Response:
    context = await _work_context(request, _work_id(request))
    return _fragment(request, "_work.html", context, done=context["terminal"])


_DONE = {
    "pause": "Paused.",
    "resume": "Resumed; the work is queued again.",
    "cancel": "Cancelled.",
    "retry": "Queued for another attempt.",
}


async def work_action(request: web.Request) -> web.Response:
    work_id = _work_id(request)
    action = request.match_info["action"]
    if action not in ACTIONS:
        raise web.HTTPNotFound()
    here = f"{PREFIX}/work/{work_id}"
    form = await request.post()
    if action == "cancel" and form.get("confirmed") != "1":
        work = await _ledger(request).get_work(work_id)
        return await _render(
            request,
            "confirm.html",
            {"nav": "work", "work": work, "action": action, "back": here},
        )
    try:
        work = await getattr(_ledger(request), f"{action}_work")(work_id, actor=ACTOR)
    except IllegalTransition as exc:
        return _redirect(request, here, f"Not done: {exc}", "error")
    message = _DONE[action]
    if work.state == WorkState.RUNNING and work.control:
        message = f"{action.capitalize()} requested; the worker stops at the next step boundary."
    return _redirect(request, here, message)


# -- approvals -----------------------------------------------------------------------------------


async def _approvals_context(request: web.Request) -> dict[str, Any]:
    ledger = _ledger(request)
    waits = await ledger.list_waits(state="pending", kind="approval", limit=APPROVAL_LIMIT)
    works: dict[str, Any] = {}
    for wait in waits:
        if wait.work_id not in works:
            try:
                works[wait.work_id] = await ledger.get_work(wait.work_id)
            except WorkNotFound:
                works[wait.work_id] = None
    return {"waits": waits, "works": works, "here": f"{PREFIX}/approvals"}


async def approvals_page(request: web.Request) -> web.Response:
    context = await _approvals_context(request)
    return await _render(
        request, "approvals.html", {"nav": "approvals", **context}, live=POLL_SECONDS["approvals"]
    )


async def approvals_live(request: web.Request) -> web.Response:
    return _fragment(request, "_approvals.html", await _approvals_context(request))


def already_decided(exc: WaitAlreadyResolved) -> str:
    """The friendly form of a 409: who decided first, and what."""
    if exc.state != "resolved":
        return f"Not done: this approval is already {exc.state.replace('_', ' ')}."
    decision = exc.resolution.get("decision") if isinstance(exc.resolution, dict) else None
    what = f" ({decision})" if decision else ""
    return f"Not done: already decided by {exc.resolved_by or 'someone else'}{what}."


async def resolve_approval(request: web.Request) -> web.Response:
    wait_id = request.match_info["id"]
    form = await request.post()
    back = _safe_next(form.get("next"), f"{PREFIX}/approvals")
    decision = form.get("decision")
    if decision not in ("approve", "deny"):
        return _redirect(request, back, "Choose Approve or Deny.", "error")
    payload: dict[str, Any] = {"decision": decision}
    comment = form.get("comment")
    if isinstance(comment, str) and comment.strip():
        comment = comment.strip()
        why = _bad_text(comment)
        if why or len(comment) > 2000:
            problem = f"the comment {why}" if why else "the comment is over 2000 characters"
            return _redirect(request, back, f"Not done: {problem}.", "error")
        payload["comment"] = comment
    if not _ID.fullmatch(wait_id):
        return _redirect(request, back, "Not done: there is no such approval.", "error")
    try:
        wait = await _ledger(request).resolve_wait(wait_id, payload, by=ACTOR)
    except WaitAlreadyResolved as exc:
        return _redirect(request, back, already_decided(exc), "error")
    except WaitNotFound:
        return _redirect(request, back, "Not done: there is no such approval.", "error")
    except InvalidResolution as exc:
        return _redirect(request, back, f"Not done: {exc}", "error")
    verb = "Approved" if decision == "approve" else "Denied"
    return _redirect(request, back, f"{verb}: {wait.prompt or wait.name or wait.id}")


# -- model usage ---------------------------------------------------------------------------------


def fmt_usd(value: float | None) -> str:
    """``1.23``, ``0.0042``: cents, or up to 6 decimals for small amounts (``—`` for None)."""
    if value is None:
        return "—"
    if value >= 1 or value == 0:
        return f"{value:,.2f}"
    text = f"{value:.6f}".rstrip("0")
    return text if len(text.split(".")[1]) >= 2 else f"{value:.2f}"


async def usage_page(request: web.Request) -> web.Response:
    """Model calls, tokens and cost grouped by agent, model, conversation or work item."""
    by = request.query.get("by") or "agent"
    problem = None
    if by not in USAGE_GROUPS:
        problem = f"Unknown grouping {by!r}; showing usage by agent."
        by = "agent"
    items, total = await _ledger(request).usage_totals(by, limit=LIST_LIMIT)
    context = {
        "nav": "usage",
        "by": by,
        "groups": USAGE_GROUPS,
        "items": items,
        "total": total,
        "problem": problem,
        "limit": LIST_LIMIT,
    }
    return await _render(request, "usage.html", context)


# -- chat ----------------------------------------------------------------------------------------


def _conversation_id(request: web.Request) -> str | None:
    value = request.cookies.get(auth.CHAT_COOKIE)
    return value if value and _CONVERSATION.fullmatch(value) else None


def _new_conversation_id() -> str:
    return f"console-{secrets.token_hex(8)}"


async def _chat_context(request: web.Request, conversation: str) -> dict[str, Any]:
    ledger = _ledger(request)
    row = await ledger.find_conversation(CHANNEL, conversation)
    messages = await ledger.list_messages(row.id, limit=MESSAGE_LIMIT) if row is not None else []
    # Approval prompts get their buttons while the approval is still open.
    waits: dict[str, Any] = {}
    for m in reversed(messages):
        wait_id = m.get("wait_id")
        if m["direction"] == "out" and m.get("actions") and wait_id and wait_id not in waits:
            if len(waits) >= 20:
                break
            try:
                waits[wait_id] = await ledger.get_wait(wait_id)
            except WaitNotFound:
                continue
    return {
        "conversation": conversation,
        "messages": messages,
        "waits": waits,
        "agent": request.config_dict[SETTINGS_KEY].default_agent,
        "here": f"{PREFIX}/chat",
    }


async def chat_page(request: web.Request) -> web.Response:
    conversation = _conversation_id(request)
    fresh = conversation is None
    if conversation is None:
        conversation = _new_conversation_id()
    context = await _chat_context(request, conversation)
    context["message_id"] = str(uuid.uuid4())
    response = await _render(
        request, "chat.html", {"nav": "chat", **context}, live=POLL_SECONDS["chat"]
    )
    if fresh:
        _set_cookie(request, response, auth.CHAT_COOKIE, conversation, CHAT_COOKIE_AGE)
    return response


async def chat_live(request: web.Request) -> web.Response:
    conversation = _conversation_id(request)
    if conversation is None:
        return _fragment(request, "_chat.html", {"messages": [], "waits": {}, "here": ""})
    return _fragment(request, "_chat.html", await _chat_context(request, conversation))


async def chat_send(request: web.Request) -> web.Response:
    here = f"{PREFIX}/chat"
    form = await request.post()
    text = form.get("text")
    text = text.strip() if isinstance(text, str) else ""
    if not text:
        return _redirect(request, here, "Type a message first.", "error")
    why = _bad_text(text)
    if why or len(text) > MAX_TEXT:
        problem = f"it {why}" if why else f"it is over {MAX_TEXT} characters"
        return _redirect(request, here, f"Not sent: {problem}.", "error")
    conversation = _conversation_id(request)
    fresh = conversation is None
    if conversation is None:
        conversation = _new_conversation_id()
    # The form carries its own message id, so a double submit is delivered once.
    given = form.get("message_id")
    message_id = given if isinstance(given, str) and _MESSAGE_ID.fullmatch(given) else None
    agent = request.config_dict[SETTINGS_KEY].default_agent
    on_busy, window = request.config_dict[CHAT_POLICIES_KEY].get(agent, ("enqueue", 2.0))
    await _ledger(request).accept_message(
        channel=CHANNEL,
        chat_id=conversation,
        text=text,
        message_id=f"{conversation}:{message_id or uuid.uuid4()}",
        sender="console",
        agent=agent,
        on_busy=on_busy,
        collect_window=window,
    )
    response = _redirect(request, here)
    if fresh:
        _set_cookie(request, response, auth.CHAT_COOKIE, conversation, CHAT_COOKIE_AGE)
    return response


async def chat_new(request: web.Request) -> web.Response:
    response = _redirect(request, f"{PREFIX}/chat", "Started a new conversation.")
    _set_cookie(request, response, auth.CHAT_COOKIE, _new_conversation_id(), CHAT_COOKIE_AGE)
    return response


# -- setup ---------------------------------------------------------------------------------------


def setup_console(app: web.Application) -> None:
    """Mount the console at ``/console`` on the gateway's ``app`` (which provides the ledger,
    settings, operator token and chat policies)."""
    console = web.Application(middlewares=[console_middleware])
    env = aiohttp_jinja2.setup(
        console,
        app_key=JINJA_KEY,
        default_helpers=False,
        loader=jinja2.FileSystemLoader(str(_HERE / "templates")),
        autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals.pop("app", None)
    env.filters.update(
        {
            "time": fmt_time,
            "iso": fmt_iso,
            "ago": fmt_ago,
            "json": fmt_json,
            "compact": fmt_compact,
            "error_text": error_text,
            "usd": fmt_usd,
            "urlquote": lambda v: quote(str(v), safe=""),
        }
    )
    env.globals.update({"duration": fmt_duration, "progress_of": progress_of})
    console[REVOKED_KEY] = auth.Revoked()
    r = console.router
    r.add_get("", work_list)
    r.add_get("/", root_slash)
    r.add_get("/login", login_form)
    r.add_post("/login", login)
    r.add_get("/logout", logout)
    r.add_post("/logout", logout)
    r.add_get("/work/{id}", work_page)
    r.add_post("/work/{id}/{action}", work_action)
    r.add_get("/approvals", approvals_page)
    r.add_get("/usage", usage_page)
    r.add_post("/waits/{id}/resolve", resolve_approval)
    r.add_get("/chat", chat_page)
    r.add_post("/chat", chat_send)
    r.add_post("/chat/new", chat_new)
    r.add_get("/live/work", work_list_live)
    r.add_get("/live/work/{id}", work_live)
    r.add_get("/live/approvals", approvals_live)
    r.add_get("/live/chat", chat_live)
    r.add_static("/static", _HERE / "static", append_version=False)
    app.add_subapp(PREFIX, console)
