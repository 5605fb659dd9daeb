"""``GET /api/v1/work/{id}/events``: a work item's history as Server-Sent Events (attach).

Bearer token like the rest of ``/api/`` (checked by the app's middleware). Query parameters:

* ``after`` — send only events with a larger id (default 0: the whole history); the
  ``Last-Event-ID`` header, which an ``EventSource`` sends when it reconnects, wins over it;
* ``follow`` — ``true`` (default): after the backlog, keep following new events until the work
  item is finished; ``false``: send the backlog and close.

An unknown id answers 404 (JSON, like every error) before the stream starts; a bad parameter
400. Each event is::

    id: <event id>
    event: <type>
    data: {"id": ..., "type": ..., "data": ..., "actor": ..., "created_at": ...}

followed by a blank line. A ``: keep-alive`` comment goes out after 15 seconds of silence.
When the item is in a terminal state (succeeded, failed, cancelled) and every event up to it
was sent, one last ``event: end`` with ``data: {"work_id": ..., "state": ...}`` (and no
``id``, so a reconnect resumes after the last real event) tells the client to stop, and the
stream closes. An ``EventSource`` should ``close()`` on ``end``; otherwise it reconnects and
gets an ``end`` again at once.

New events are found by polling the ledger (two indexed reads every 0.2 s per stream), which
works across processes on both databases. On PostgreSQL an event id is allocated before its
transaction commits, so an event may become visible after one with a larger id: the stream
re-reads a short trailing window and sends such a late event when it shows up (ids then
arrive slightly out of order, never missing within the window). The handler creates no tasks;
a client that goes away ends it at its next poll, and app shutdown ends every stream.
Imports ledger and the gateway's own modules.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from aiohttp import web

from gateway.api import LEDGER_KEY, PREFIX, _query, _work_id, bad_request
from gateway.serialize import event_json
from ledger import TERMINAL, WorkNotFound
from ledger.schema import Event

log = logging.getLogger(__name__)

#: seconds between polls of the ledger for new events
POLL_INTERVAL = 0.2
#: seconds of silence before a keep-alive comment
KEEPALIVE = 15.0
#: events read per query (a longer backlog is read in pages)
PAGE = 500
#: PostgreSQL: seconds an event id stays in the re-read window (longer than any transaction
#: that writes history should take)
SETTLE = 5.0
#: seconds the client should wait before reconnecting
RETRY_MS = 2000

_TERMINAL = frozenset(s.value for s in TERMINAL)
_TRUE, _FALSE = {"true", "1", "yes"}, {"false", "0", "no"}

#: set on app shutdown: every open stream ends
STREAMS_CLOSING_KEY = web.AppKey("tether.events_closing", asyncio.Event)


def _event_id(value: str, what: str) -> int:
    value = value.strip()
    if not value.isascii() or not value.isdigit() or len(value) > 18:
        raise bad_request(f"{what} must be a non-negative integer event id")
    return int(value)


def _frame(event: Event) -> bytes:
    body = json.dumps(event_json(event), separators=(",", ":"), default=str)
    return f"id: {event.id}\nevent: {event.type}\ndata: {body}\n\n".encode()


class _Cursor:
    """Which events were sent. Everything at or below ``floor`` was; above it, ``sent`` says.

    On SQLite ids become visible in order, so ``floor`` simply follows the last sent id. On
    PostgreSQL ``floor`` trails by :data:`SETTLE` seconds, so an event that commits late with a
    smaller id is still found by the next read."""

    def __init__(self, after: int, settle: float) -> None:
        self.floor = after
        self.settle = settle
        self.sent: dict[int, float] = {}

    def fresh(self, events: list[Event]) -> list[Event]:
        return [
            e for e in events if e.id is not None and e.id > self.floor and e.id not in self.sent
        ]

    def mark(self, event_id: int) -> None:
        if self.settle <= 0:
            self.floor = max(self.floor, event_id)
        else:
            self.sent[event_id] = time.monotonic()

    def advance(self) -> None:
        """Move ``floor`` up to the newest id sent more than ``settle`` seconds ago."""
        if not self.sent:
            return
        cutoff = time.monotonic() - self.settle
        settled = [i for i, at in self.sent.items() if at <= cutoff]
        if settled:
            self.floor = max(self.floor, *settled)
            self.sent = {i: at for i, at in self.sent.items() if i > self.floor}

    @property
    def last(self) -> int:
        return max([self.floor, *self.sent])


async def work_events(request: web.Request) -> web.StreamResponse:
    work_id = _work_id(request)
    params = _query(request, ("after", "follow"))
    after = _event_id(params["after"], "after") if "after" in params else 0
    if "Last-Event-ID" in request.headers:
        after = _event_id(request.headers["Last-Event-ID"], "Last-Event-ID")
    follow = True
    if "follow" in params:
        flag = params["follow"].lower()
        if flag not in _TRUE | _FALSE:
            raise bad_request("follow must be true or false")
        follow = flag in _TRUE
    ledger = request.app[LEDGER_KEY]
    await ledger.get_work(work_id)  # 404 before the stream starts

    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache, no-store",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    closing = request.app[STREAMS_CLOSING_KEY]
    settle = SETTLE if ledger.dialect == "postgresql" else 0.0
    try:
        await response.write(f"retry: {RETRY_MS}\n\n".encode())
        await _stream(request, response, ledger, work_id, _Cursor(after, settle), follow, closing)
    except (ConnectionResetError, ConnectionError):
        pass  # the client went away
    return response


async def _stream(
    request: web.Request,
    response: web.StreamResponse,
    ledger: Any,
    work_id: str,
    cursor: _Cursor,
    follow: bool,
    closing: asyncio.Event,
) -> None:
    last_write = time.monotonic()
    failing = False
    while not closing.is_set():
        if _gone(request):
            return
        try:
            # State first, then events: a terminal state read here has its final event
            # committed already, so the read below sees it.
            state = (await ledger.get_work(work_id)).state
            events = await ledger.list_events(work_id, after=cursor.floor, limit=PAGE)
        except WorkNotFound:
            return  # pruned while attached
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the database is away: keep the stream, try again
            if not failing:
                log.warning("events of %s: ledger read failed: %s", work_id, exc)
            failing = True
            events, state = [], None
        else:
            failing = False
        fresh = cursor.fresh(events)
        if fresh:
            await response.write(b"".join(_frame(e) for e in fresh))
            for e in fresh:
                cursor.mark(e.id)  # type: ignore[arg-type]
            last_write = time.monotonic()
        if len(events) >= PAGE:
            if cursor.settle > 0:
                cursor.floor = max(cursor.floor, max(e.id for e in events))  # type: ignore[type-var]
            continue  # more backlog: read on without waiting
        cursor.advance()
        if not follow or state in _TERMINAL:
            if state in _TERMINAL:
                end = {"work_id": work_id, "state": state, "last_event_id": cursor.last}
                await response.write(f"event: end\ndata: {json.dumps(end)}\n\n".encode())
            return
        if time.monotonic() - last_write >= KEEPALIVE:
            await response.write(b": keep-alive\n\n")
            last_write = time.monotonic()
        await asyncio.sleep(POLL_INTERVAL)


def _gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _close_streams(app: web.Application) -> None:
    app[STREAMS_CLOSING_KEY].set()


def setup_events(app: web.Application) -> None:
    """Add ``GET /api/v1/work/{id}/events`` (the token is checked by the app's middleware)."""
    app[STREAMS_CLOSING_KEY] = asyncio.Event()
    app.on_shutdown.append(_close_streams)
    app.router.add_get(f"{PREFIX}/work/{{id}}/events", work_events)
