"""The operator API's OpenAPI 3.1 document, served at ``/api/v1/openapi.json``.

Written by hand next to :mod:`gateway.api`, :mod:`gateway.waits_api`, :mod:`gateway.resume`,
:mod:`gateway.events` (Server-Sent Events) and :mod:`gateway.metrics` (``/metrics``, outside
``/api``); tests check that its paths and methods are exactly those routes, that it validates
as OpenAPI 3.1, and (schemathesis) that the live API answers as it says. Imports nothing.
"""

from __future__ import annotations

from typing import Any

_STATES = ["queued", "running", "waiting", "paused", "succeeded", "failed", "cancelled"]
_WAIT_STATES = ["pending", "resolved", "timed_out", "cancelled"]
_WAIT_KINDS = ["timer", "approval", "input", "signal"]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


_TS = {"type": ["string", "null"], "format": "date-time"}
_TS_REQUIRED = {"type": "string", "format": "date-time"}
_STR_OR_NULL = {"type": ["string", "null"]}
_ANY: dict[str, Any] = {"description": "any JSON value"}

_WORK_PROPERTIES: dict[str, Any] = {
    "id": {"type": "string"},
    "agent": {"type": "string"},
    "state": {"type": "string", "enum": _STATES},
    "input": _ANY,
    "result": _ANY,
    "error": _ANY,
    "attempt": {"type": "integer"},
    "max_attempts": {"type": "integer"},
    "priority": {"type": "integer"},
    "created_at": _TS_REQUIRED,
    "updated_at": _TS_REQUIRED,
    "finished_at": _TS,
    "parent_id": _STR_OR_NULL,
    "conversation_id": _STR_OR_NULL,
    "source": _STR_OR_NULL,
    "source_event_id": _STR_OR_NULL,
    "lease_owner": _STR_OR_NULL,
    "lease_epoch": {"type": "integer"},
    "lease_expires_at": _TS,
    "last_heartbeat_at": _TS,
    "not_before": _TS,
    "wait_reason": _STR_OR_NULL,
    "control": {
        "type": ["string", "null"],
        "enum": ["pause", "cancel", None],
        "description": "a pause or cancel requested of running work, applied at its next "
        "step boundary",
    },
    "state_reason": {"type": "string", "description": "the event that set the current state"},
}

_OUTBOX_STATES = ["pending", "sending", "sent", "failed", "unknown", "abandoned"]
_USAGE_GROUPS = ["agent", "model", "conversation", "work"]
_COUNT = {"type": "integer", "minimum": 0}
_USAGE_PROPERTIES: dict[str, Any] = {
    "calls": {**_COUNT, "description": "recorded model calls"},
    "input_tokens": _COUNT,
    "output_tokens": _COUNT,
    "total_tokens": _COUNT,
    "cost": {"type": "number", "minimum": 0, "description": "USD, over the priced calls"},
    "unpriced_calls": {**_COUNT, "description": "calls whose model has no price"},
}
_INT_OR_NULL = {"type": ["integer", "null"]}
_LIMIT_PARAM = {
    "name": "limit",
    "in": "query",
    "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 100},
}
_OPERATOR_HEADER = {
    "name": "X-Tether-Operator",
    "in": "header",
    "required": False,
    "description": "who acts: recorded as `operator:<name>` in the history (default `operator`)",
    "schema": {
        "type": "string",
        "minLength": 1,
        "maxLength": 100,
        "pattern": "^[^\\x00-\\x1f\\x7f]+$",
    },
}

_ERRORS_AUTH = {
    "401": {"$ref": "#/components/responses/Unauthorized"},
    "503": {"$ref": "#/components/responses/LedgerUnavailable"},
}
_ID_PARAM = {
    "name": "id",
    "in": "path",
    "required": True,
    "description": "work item id",
    "schema": {"type": "string"},
}


_WAIT_ID_PARAM = {
    "name": "id",
    "in": "path",
    "required": True,
    "description": "wait id",
    "schema": {"type": "string"},
}
_BY = {
    "type": "string",
    "minLength": 1,
    "maxLength": 100,
    "description": "who decides; recorded as `operator:<by>` (default `operator`)",
}
_ALREADY_RESOLVED = _json(
    _ref("AlreadyResolved"),
    "the wait was decided before (`already_resolved`): the first decision stands, nothing "
    "was written; the answer carries that decision",
)

_WAIT_PROPERTIES: dict[str, Any] = {
    "id": {"type": "string"},
    "work_id": {"type": "string"},
    "step_seq": {"type": "integer"},
    "kind": {"type": "string", "enum": _WAIT_KINDS},
    "name": {**_STR_OR_NULL, "description": "the signal's name, or a label"},
    "key": {**_STR_OR_NULL, "description": "the signal's key"},
    "prompt": {**_STR_OR_NULL, "description": "the question put to a person"},
    "payload_schema": {"description": "JSON Schema the input must match (input waits)"},
    "channel": _STR_OR_NULL,
    "conversation_id": _STR_OR_NULL,
    "deadline": _TS,
    "on_timeout": {"type": "string", "enum": ["fail", "continue", "escalate"]},
    "state": {"type": "string", "enum": _WAIT_STATES},
    "resolution": {
        "description": "how it was decided, e.g. `{decision, approved, comment, by}` for an "
        "approval, `{input, by}`, `{data, by}`, `{fired}` or `{timed_out: true}`"
    },
    "resolved_by": {
        **_STR_OR_NULL,
        "description": "`operator`, `operator:<name>`, `resume-url`, `scheduler`, …",
    },
    "resolved_at": _TS,
    "escalated_at": _TS,
    "created_at": _TS_REQUIRED,
}


_MESSAGE_PROPERTIES: dict[str, Any] = {
    "id": {"type": "string", "description": "`in-<n>` or `out-<n>`"},
    "direction": {"type": "string", "enum": ["in", "out"]},
    "text": {"type": "string"},
    "created_at": _TS_REQUIRED,
    "work_id": _STR_OR_NULL,
    "wait_id": _STR_OR_NULL,
    "actions": {
        "type": ["array", "null"],
        "description": "buttons offered with an approval prompt",
        "items": {"type": "object"},
    },
    "disposition": {**_STR_OR_NULL, "description": "what an inbound message became"},
    "outbox_id": {"type": ["integer", "null"], "description": "an outbound message's id"},
    "state": {
        "type": ["string", "null"],
        "enum": [*_OUTBOX_STATES, None],
        "description": "an outbound message's delivery state",
    },
}

_OUTBOX_PROPERTIES: dict[str, Any] = {
    "id": {"type": "integer"},
    "work_id": _STR_OR_NULL,
    "step_seq": {"type": ["integer", "null"]},
    "conversation_id": _STR_OR_NULL,
    "channel": {"type": "string"},
    "payload": {**_ANY, "description": "what is sent: `{text, ...}`"},
    "state": {"type": "string", "enum": _OUTBOX_STATES},
    "attempts": {"type": "integer"},
    "next_attempt_at": _TS,
    "external_id": {**_STR_OR_NULL, "description": "the platform's message id, once sent"},
    "error": {**_STR_OR_NULL, "description": "the last delivery error"},
    "created_at": _TS_REQUIRED,
    "sent_at": _TS,
}


def _action(verb: str, summary: str, allowed_from: str) -> dict[str, Any]:
    return {
        "post": {
            "operationId": f"{verb}Work",
            "summary": summary,
            "description": f"Allowed from: {allowed_from}. Takes no body (empty or `{{}}`).",
            "parameters": [_ID_PARAM, _OPERATOR_HEADER],
            "responses": {
                "200": _json(_ref("Work"), "the work item after the action"),
                "400": {"$ref": "#/components/responses/BadRequest"},
                "404": {"$ref": "#/components/responses/NotFound"},
                "409": _error(
                    "the action is not allowed in the item's current state "
                    "(`illegal_transition`); nothing changed"
                ),
                **_ERRORS_AUTH,
            },
        }
    }


_OUTBOX_ID_PARAM = {
    "name": "id",
    "in": "path",
    "required": True,
    "description": "outbound message id",
    "schema": {"type": "integer", "minimum": 1},
}


def _outbox_action(verb: str, summary: str, allowed_from: str) -> dict[str, Any]:
    return {
        "post": {
            "operationId": f"{verb}Outbox",
            "summary": summary,
            "description": f"Allowed from: {allowed_from}. Takes no body (empty or `{{}}`). "
            "The message's work item gets an event naming the operator.",
            "parameters": [_OUTBOX_ID_PARAM, _OPERATOR_HEADER],
            "responses": {
                "200": _json(_ref("OutboxMessage"), "the message after the action"),
                "400": {"$ref": "#/components/responses/BadRequest"},
                "404": _error("no such outbound message (`not_found`)"),
                "409": _error(
                    "the message is not in a state the action applies to "
                    "(`illegal_transition`); nothing changed"
                ),
                **_ERRORS_AUTH,
            },
        }
    }


OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "Tether operator API",
        "version": "1",
        "description": "Start, inspect and steer durable agent work. Every route except this "
        "document needs `Authorization: Bearer <operator token>`. A 2xx answer means the "
        "change is committed to the ledger; 503 means nothing was written: retry. Errors are "
        '`{"error": {"code", "message"}}`, except a request whose URL (request line) is longer '
        "than 8190 bytes: the HTTP server refuses it with a plain-text 400 before the API "
        "sees it.",
    },
    "servers": [{"url": "/"}],
    "security": [{"bearerAuth": []}],
    "paths": {
        "/api/v1/work": {
            "post": {
                "operationId": "createWork",
                "summary": "Start a work item",
                "parameters": [_OPERATOR_HEADER],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("CreateWork")}},
                },
                "responses": {
                    "201": _json(_ref("Work"), "created and queued"),
                    "200": _json(
                        _ref("Work"), "an earlier request with this idempotency_key created it"
                    ),
                    "400": {"$ref": "#/components/responses/BadRequest"},
                    "409": _error(
                        "the idempotency_key was used for a different agent or input "
                        "(`idempotency_conflict`)"
                    ),
                    "413": _error("the body is larger than 1 MiB (`payload_too_large`)"),
                    **_ERRORS_AUTH,
                },
            },
            "get": {
                "operationId": "listWork",
                "summary": "List work items, newest first, a page at a time, with counts",
                "description": "Filters combine (AND). Date-times are ISO 8601 (`Z` or an "
                "offset; none means UTC); `*_after` is inclusive, `*_before` exclusive. Pages: "
                "pass the answer's `next_cursor` as `cursor` for the next (older) page; a walk "
                "neither repeats nor skips an item while new work is created. A bad filter "
                "is 400.",
                "parameters": [
                    {
                        "name": "state",
                        "in": "query",
                        "schema": {"type": "string", "enum": _STATES},
                    },
                    {
                        "name": "agent",
                        "in": "query",
                        "schema": {"type": "string", "minLength": 1, "maxLength": 200},
                    },
                    {
                        "name": "conversation_id",
                        "in": "query",
                        "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,40}$"},
                    },
                    {
                        "name": "source",
                        "in": "query",
                        "description": "where the work came from: `api`, `http`, `telegram`, "
                        "`child`, `restart`, …",
                        "schema": {"type": "string", "minLength": 1, "maxLength": 200},
                    },
                    *(
                        {
                            "name": f"{column}_{side}",
                            "in": "query",
                            "schema": {"type": "string", "format": "date-time"},
                        }
                        for column in ("created", "updated")
                        for side in ("after", "before")
                    ),
                    {
                        "name": "q",
                        "in": "query",
                        "description": "text found in the wait reason (case-insensitive)",
                        "schema": {"type": "string", "minLength": 1, "maxLength": 200},
                    },
                    _LIMIT_PARAM,
                    {
                        "name": "cursor",
                        "in": "query",
                        "description": "the `next_cursor` of the previous page (opaque)",
                        "schema": {
                            "type": "string",
                            "minLength": 1,
                            "maxLength": 200,
                            "pattern": "^[A-Za-z0-9_-]+$",
                        },
                    },
                ],
                "responses": {
                    "200": _json(_ref("WorkList"), "matching work items"),
                    "400": {"$ref": "#/components/responses/BadRequest"},
                    **_ERRORS_AUTH,
                },
            },
        },
        "/api/v1/work/{id}": {
            "get": {
                "operationId": "getWork",
                "summary": "A work item with its steps, last checkpoint, waits (and the pending "
                "one), recent events, parent and children, its conversation's messages and its "
                "model usage",
                "parameters": [_ID_PARAM],
                "responses": {
                    "200": _json(_ref("WorkDetail"), "the work item"),
                    "404": {"$ref": "#/components/responses/NotFound"},
                    **_ERRORS_AUTH,
                },
            }
        },
        "/api/v1/work/{id}/pause": _action(
            "pause",
            "Pause: at once when queued or waiting, at the next step boundary when running",
            "queued, waiting, running",
        ),
        "/api/v1/work/{id}/resume": _action(
            "resume", "Resume paused work where it was paused", "paused"
        ),
        "/api/v1/work/{id}/cancel": _action(
            "cancel",
            "Cancel: at once when queued, waiting or paused, at the next step boundary "
            "when running",
            "queued, waiting, paused, running",
        ),
        "/api/v1/work/{id}/retry": _action(
            "retry",
            "Queue failed or cancelled work for one more attempt; recorded steps are kept",
            "failed, cancelled",
        ),
        "/api/v1/work/{id}/restart": {
            "post": {
                "operationId": "restartWork",
                "summary": "Fork the work item into a new one that keeps steps 1..from_step-1",
                "description": "The new item (201) has the original's agent, input, "
                "conversation and parent, source `restart`, and copies of the original's step "
                "records before `from_step` (replayed, not run again; idempotency keys "
                "`{new_id}:{seq}`); it runs `from_step` onward. The original is not changed; "
                "its history gets a `restarted_as` event, the new item's `created` event "
                "carries `{restarted_from, from_step}`. Any state but running.",
                "parameters": [_ID_PARAM, _OPERATOR_HEADER],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("RestartWork")}},
                },
                "responses": {
                    "201": _json(_ref("Work"), "the new work item, queued"),
                    "400": _error(
                        "a bad body, or `from_step` is not from 1 to the last recorded step + 1 "
                        "(`bad_request`, `invalid_json`, `invalid_step`); nothing was written"
                    ),
                    "404": {"$ref": "#/components/responses/NotFound"},
                    "409": _error(
                        "the work item is running (`illegal_transition`); pause or cancel it "
                        "first; nothing was written"
                    ),
                    **_ERRORS_AUTH,
                },
            }
        },
        "/api/v1/work/{id}/events": {
            "get": {
                "operationId": "followWorkEvents",
                "summary": "Follow a work item's history live (Server-Sent Events, attach)",
                "description": "A `text/event-stream`: first the history after `after` (or the "
                "`Last-Event-ID` header, which wins), then new events as they happen, until "
                "the item is finished (with `follow=false`: the history only). Each event is "
                "`id: <event id>`, `event: <type>`, `data: <the event as JSON, like the detail "
                "view's events>`. When the item is finished, a last `event: end` (no `id`) with "
                '`data: {"work_id", "state", "last_event_id"}` ends the stream. Errors before '
                "the stream starts are JSON.",
                "parameters": [
                    _ID_PARAM,
                    {
                        "name": "after",
                        "in": "query",
                        "description": "send only events with a larger id (default 0)",
                        "schema": {"type": "integer", "minimum": 0},
                    },
                    {
                        "name": "follow",
                        "in": "query",
                        "description": "keep following after the history (default true)",
                        "schema": {"type": "boolean", "default": True},
                    },
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "required": False,
                        "description": "resume after this event id (sent by an EventSource "
                        "when it reconnects)",
                        "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"},
                    },
                ],
                "responses": {
                    "200": {
                        "description": "the event stream",
                        "content": {
                            "text/event-stream": {
                                "schema": {"type": "string"},
                                "example": 'id: 42\nevent: claimed\ndata: {"id": 42, '
                                '"type": "claimed", "data": {}, "actor": null, '
                                '"created_at": "2025-01-31T09:30:00+00:00"}\n\n',
                            }
                        },
                    },
                    "400": {"$ref": "#/components/responses/BadRequest"},
                    "404": {"$ref": "#/components/responses/NotFound"},
                    **_ERRORS_AUTH,
                },
            }
        },
        "/api/v1/outbox": {
            "get": {
                "operationId": "listOutbox",
                "summary": "Outbound messages, newest first (`?state=unknown`: delivery in doubt)",
                "parameters": [
                    {
                        "name": "state",
                        "in": "query",
                        "schema": {"type": "string", "enum": _OUTBOX_STATES},
                    },
                    {
                        "name": "work_id",
                        "in": "query",
                        "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,40}$"},
                    },
                    {
                        "name": "conversation_id",
                        "in": "query",
                        "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,40}$"},
                    },
                    _LIMIT_PARAM,
                ],
                "responses": {
                    "200": _json(_ref("OutboxList"), "matching outbound messages"),
                    "400": {"$ref": "#/components/responses/BadRequest"},
                    **_ERRORS_AUTH,
                },
            }
        },
        "/api/v1/outbox/{id}/resend": _outbox_action(
            "resend",
            "Send an outbound message again: unknown → pending (its attempts are kept)",
            "unknown",
        ),
        "/api/v1/outbox/{id}/abandon": _outbox_action(
            "abandon",
            "Give up on an outbound message: → abandoned, never delivered (again)",
            "unknown, pending, failed",
        ),
        "/api/v1/workers": {
            "get": {
                "operationId": "listWorkers",
                "summary": "Worker processes, their liveness and the leases they hold",
                "responses": {
                    "200": _json({"type": "array", "items": _ref("Worker")}, "all workers"),
                    **_ERRORS_AUTH,
                },
            }
        },
        "/api/v1/usage": {
            "get": {
                "operationId": "listUsage",
                "summary": "Model calls, tokens and cost, grouped by agent, model, conversation "
                "or work item",
                "description": "Totals over the recorded (succeeded) model-call steps, the most "
                "expensive group first, and the total over every group. `cost` is USD over the "
                "calls whose model has a price (`TETHER_MODEL_PRICES`); `unpriced_calls` counts "
                "the others. `since` counts calls finished at or after it (ISO 8601).",
                "parameters": [
                    {
                        "name": "by",
                        "in": "query",
                        "schema": {"type": "string", "enum": _USAGE_GROUPS, "default": "agent"},
                    },
                    {
                        "name": "agent",
                        "in": "query",
                        "schema": {"type": "string", "minLength": 1, "maxLength": 200},
                    },
                    {
                        "name": "conversation_id",
                        "in": "query",
                        "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,40}$"},
                    },
                    {
                        "name": "since",
                        "in": "query",
                        "schema": {"type": "string", "format": "date-time"},
                    },
                    _LIMIT_PARAM,
                ],
                "responses": {
                    "200": _json(_ref("UsageList"), "the totals"),
                    "400": {"$ref": "#/components/responses/BadRequest"},
                    **_ERRORS_AUTH,
                },
            }
        },
        "/api/v1/waits": {
            "get": {
                "operationId": "listWaits",
                "summary": "List waits, oldest first (e.g. `?state=pending`: what needs a "
                "decision)",
                "parameters": [
                    {
                        "name": "state",
                        "in": "query",
                        "schema": {"type": "string", "enum": _WAIT_STATES},
                    },
                    {
                        "name": "kind",
                        "in": "query",
                        "schema": {"type": "string", "enum": _WAIT_KINDS},
                    },
                    {"name": "work_id", "in": "query", "schema": {"type": "string"}},
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 100},
                    },
                ],
                "responses": {
                    "200": _json(_ref("WaitList"), "matching waits"),
                    "400": {"$ref": "#/components/responses/BadRequest"},
                    **_ERRORS_AUTH,
                },
            }
        },
        "/api/v1/waits/{id}": {
            "get": {
                "operationId": "getWait",
                "summary": "One wait",
                "parameters": [_WAIT_ID_PARAM],
                "responses": {
                    "200": _json(_ref("Wait"), "the wait"),
                    "404": _error("no such wait (`not_found`)"),
                    **_ERRORS_AUTH,
                },
            }
        },
        "/api/v1/waits/{id}/resolve": {
            "post": {
                "operationId": "resolveWait",
                "summary": "Decide a pending wait (first decision wins) and queue its work again",
                "description": "The body depends on the wait's kind: approval "
                '`{"decision": "approve"|"deny", "comment"?}`, input `{"input": ...}` (checked '
                'against the wait\'s `payload_schema`), signal `{"data": ...}`, timer `{}` '
                '(fires it now). Any of them may add `"by"`.',
                "parameters": [_WAIT_ID_PARAM],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("ResolveWait")}},
                },
                "responses": {
                    "200": _json(_ref("Wait"), "resolved; the work item is queued again"),
                    "400": _error(
                        "the body does not fit the wait (`bad_request`, `invalid_json`, "
                        "`invalid_resolution`); nothing was written"
                    ),
                    "404": _error("no such wait (`not_found`)"),
                    "409": _ALREADY_RESOLVED,
                    "413": _error("the body is larger than 1 MiB (`payload_too_large`)"),
                    **_ERRORS_AUTH,
                },
            }
        },
        "/api/v1/signals/{name}": {
            "post": {
                "operationId": "sendSignal",
                "summary": "Resolve every pending `wait_for_signal(name, key=key)`",
                "parameters": [
                    {
                        "name": "name",
                        "in": "path",
                        "required": True,
                        "description": "signal name",
                        "schema": {"type": "string"},
                    }
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("Signal")}},
                },
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["resolved"],
                            "properties": {
                                "resolved": {
                                    "type": "array",
                                    "items": {"type": "string"},
                                    "description": "ids of the waits resolved",
                                }
                            },
                        },
                        "delivered",
                    ),
                    "400": {"$ref": "#/components/responses/BadRequest"},
                    "404": _error(
                        "nothing waits for this signal and key (`no_waiter`); nothing was written"
                    ),
                    **_ERRORS_AUTH,
                },
            }
        },
        "/resume/{token}": {
            "post": {
                "operationId": "resumeByUrl",
                "summary": "Resume the work item waiting behind a resume URL",
                "description": "For third parties: no operator token, the unguessable `token` "
                "is the credential. The body is any JSON value (empty = `null`) and becomes "
                "the signal's data.",
                "security": [],
                "parameters": [
                    {
                        "name": "token",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    }
                ],
                "requestBody": {
                    "required": False,
                    "content": {"application/json": {"schema": _ANY}},
                },
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["wait_id", "state"],
                            "properties": {
                                "wait_id": {"type": "string"},
                                "state": {"type": "string", "enum": ["resolved"]},
                            },
                        },
                        "resolved; the work item is queued again",
                    ),
                    "400": _error("the body is not JSON (`invalid_json`); nothing was written"),
                    "404": _error("no wait for this resume URL (`not_found`)"),
                    "409": _ALREADY_RESOLVED,
                    "413": _error("the body is larger than 1 MiB (`payload_too_large`)"),
                    "503": {"$ref": "#/components/responses/LedgerUnavailable"},
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "getMetrics",
                "summary": "Prometheus metrics of the whole deployment (no token; not under /api)",
                "description": "The Prometheus text format (`text/plain; version=0.0.4`), or "
                "OpenMetrics when the `Accept` header asks for `application/openmetrics-text`: "
                "work by state, expired leases, claims, lease expiries, step latency, wait "
                "resolutions, inbound and outbound messages.",
                "security": [],
                "responses": {
                    "200": {
                        "description": "the metrics",
                        "content": {
                            "text/plain": {"schema": {"type": "string"}},
                            "application/openmetrics-text": {"schema": {"type": "string"}},
                        },
                    }
                },
            }
        },
        "/api/v1/openapi.json": {
            "get": {
                "operationId": "getOpenAPI",
                "summary": "This document (no token needed)",
                "security": [],
                "responses": {
                    "200": {
                        "description": "the OpenAPI document",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        },
    },
    "components": {
        "securitySchemes": {
            "bearerAuth": {
                "type": "http",
                "scheme": "bearer",
                "description": "The operator token (TETHER_OPERATOR_TOKEN, or the generated "
                "one kept beside the database).",
            }
        },
        "responses": {
            "BadRequest": _error(
                "invalid input (`bad_request`, `invalid_json`); nothing was written"
            ),
            "Unauthorized": _error("missing or wrong operator token (`unauthorized`)"),
            "NotFound": _error("no such work item (`not_found`)"),
            "LedgerUnavailable": _error(
                "the database is unreachable (`ledger_unavailable`); nothing was written, "
                "retry later"
            ),
        },
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error"],
                "properties": {
                    "error": {
                        "type": "object",
                        "required": ["code", "message"],
                        "properties": {
                            "code": {
                                "type": "string",
                                "description": "stable, machine-readable",
                                "examples": [
                                    "bad_request",
                                    "invalid_json",
                                    "unauthorized",
                                    "not_found",
                                    "method_not_allowed",
                                    "illegal_transition",
                                    "idempotency_conflict",
                                    "already_resolved",
                                    "invalid_resolution",
                                    "no_waiter",
                                    "payload_too_large",
                                    "ledger_unavailable",
                                    "internal",
                                ],
                            },
                            "message": {"type": "string", "description": "for humans"},
                        },
                    }
                },
            },
            "AlreadyResolved": {
                "type": "object",
                "required": ["error"],
                "properties": {
                    "error": {
                        "type": "object",
                        "required": ["code", "message", "state", "resolution", "resolved_by"],
                        "properties": {
                            "code": {"type": "string", "const": "already_resolved"},
                            "message": {"type": "string"},
                            "state": {
                                "type": "string",
                                "enum": ["resolved", "timed_out", "cancelled"],
                            },
                            "resolution": _WAIT_PROPERTIES["resolution"],
                            "resolved_by": _WAIT_PROPERTIES["resolved_by"],
                        },
                    }
                },
            },
            "Wait": {
                "type": "object",
                "required": list(_WAIT_PROPERTIES),
                "properties": _WAIT_PROPERTIES,
                "description": "a durable wait (its resume-URL token is never shown)",
            },
            "WaitList": {
                "type": "object",
                "properties": {"items": {"type": "array", "items": _ref("Wait")}},
            },
            "ResolveWait": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "decision": {"type": "string", "enum": ["approve", "deny"]},
                    "comment": {"type": ["string", "null"]},
                    "input": _ANY,
                    "data": _ANY,
                    "by": _BY,
                },
            },
            "Signal": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "key": {"type": ["string", "null"], "maxLength": 400, "default": None},
                    "data": {**_ANY, "default": None},
                    "by": _BY,
                },
            },
            "CreateWork": {
                "type": "object",
                "additionalProperties": False,
                "required": ["agent"],
                "properties": {
                    "agent": {"type": "string", "minLength": 1, "maxLength": 200},
                    "input": {**_ANY, "default": None},
                    "idempotency_key": {
                        "type": "string",
                        "minLength": 1,
                        "maxLength": 200,
                        "description": "a repeat with the same key returns the first item "
                        "(200) and creates nothing",
                    },
                    "max_attempts": {"type": "integer", "minimum": 1, "maximum": 100},
                    "priority": {
                        "type": "integer",
                        "default": 0,
                        "minimum": -(2**31),
                        "maximum": 2**31 - 1,
                        "description": "higher is claimed first",
                    },
                },
            },
            "Work": {
                "type": "object",
                "required": list(_WORK_PROPERTIES),
                "properties": _WORK_PROPERTIES,
            },
            "WorkSummary": {
                "type": "object",
                "properties": {
                    k: _WORK_PROPERTIES[k]
                    for k in (
                        "id",
                        "agent",
                        "state",
                        "state_reason",
                        "attempt",
                        "created_at",
                        "updated_at",
                        "finished_at",
                    )
                },
            },
            "Step": {
                "type": "object",
                "properties": {
                    "seq": {"type": "integer"},
                    "name": {"type": "string"},
                    "status": {"type": "string", "enum": ["running", "succeeded", "failed"]},
                    "attempt": {"type": "integer"},
                    "output": _ANY,
                    "error": _ANY,
                    "error_type": _STR_OR_NULL,
                    "idempotency_key": {"type": "string"},
                    "started_at": _TS_REQUIRED,
                    "finished_at": _TS,
                    "last_heartbeat_at": _TS,
                    "progress": _ANY,
                    "durability": {
                        "type": ["string", "null"],
                        "enum": ["sync", "batched", "exit", None],
                        "description": "how the record was made durable: before the step "
                        "returned (`sync`), in a group commit (`batched`), or when the item "
                        "finished, failed or waited (`exit`)",
                    },
                    "committed_at": {
                        **_TS,
                        "description": "when the finished attempt's record committed",
                    },
                    "model": {**_STR_OR_NULL, "description": "model calls: the model asked"},
                    "model_answered": {
                        **_STR_OR_NULL,
                        "description": "the model the endpoint says answered",
                    },
                    "prompt_fingerprint": {
                        **_STR_OR_NULL,
                        "description": "`sha256:<hex>` of the canonical JSON of the model, "
                        "messages, tools and parameters",
                    },
                    "input_tokens": _INT_OR_NULL,
                    "output_tokens": _INT_OR_NULL,
                    "total_tokens": _INT_OR_NULL,
                    "cost": {
                        "type": ["number", "null"],
                        "description": "USD; null when the model has no price",
                    },
                    "finish_reason": _STR_OR_NULL,
                    "latency_ms": _INT_OR_NULL,
                    "tool_calls": {
                        "description": "the tool calls the model asked for: "
                        "`[{id, name, arguments}]` (null for other steps)"
                    },
                },
            },
            "Usage": {
                "type": "object",
                "required": list(_USAGE_PROPERTIES),
                "properties": _USAGE_PROPERTIES,
            },
            "UsageList": {
                "type": "object",
                "required": ["by", "items", "total"],
                "properties": {
                    "by": {"type": "string", "enum": _USAGE_GROUPS},
                    "items": {
                        "type": "array",
                        "items": {
                            "allOf": [
                                _ref("Usage"),
                                {
                                    "type": "object",
                                    "required": ["key"],
                                    "properties": {
                                        "key": {
                                            **_STR_OR_NULL,
                                            "description": "the agent, model, conversation id "
                                            "or work id",
                                        }
                                    },
                                },
                            ]
                        },
                    },
                    "total": _ref("Usage"),
                },
            },
            "Event": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer"},
                    "type": {"type": "string"},
                    "data": _ANY,
                    "actor": _STR_OR_NULL,
                    "created_at": _TS_REQUIRED,
                },
            },
            "Checkpoint": {
                "type": "object",
                "required": ["seq", "name", "finished_at"],
                "properties": {
                    "seq": {"type": "integer"},
                    "name": {"type": "string"},
                    "finished_at": _TS,
                },
                "description": "the last succeeded step: where a resumed run picks up",
            },
            "Message": {
                "type": "object",
                "required": list(_MESSAGE_PROPERTIES),
                "properties": _MESSAGE_PROPERTIES,
            },
            "WorkDetail": {
                "allOf": [
                    _ref("Work"),
                    {
                        "type": "object",
                        "required": [
                            "current_wait",
                            "last_checkpoint",
                            "steps",
                            "waits",
                            "events",
                            "children",
                            "messages",
                            "usage",
                        ],
                        "properties": {
                            "current_wait": {
                                "anyOf": [_ref("Wait"), {"type": "null"}],
                                "description": "the pending wait, if the item waits on one",
                            },
                            "last_checkpoint": {"anyOf": [_ref("Checkpoint"), {"type": "null"}]},
                            "steps": {"type": "array", "items": _ref("Step")},
                            "waits": {"type": "array", "items": _ref("Wait")},
                            "events": {
                                "type": "array",
                                "items": _ref("Event"),
                                "description": "the most recent 500, oldest first",
                            },
                            "children": {"type": "array", "items": _ref("WorkSummary")},
                            "messages": {
                                "type": "array",
                                "items": _ref("Message"),
                                "description": "the conversation's messages, both directions, "
                                "in order ([] for work without a conversation)",
                            },
                            "usage": {
                                "allOf": [_ref("Usage")],
                                "description": "the work item's model calls, totalled",
                            },
                        },
                    },
                ]
            },
            "WorkList": {
                "type": "object",
                "required": ["items", "next_cursor", "counts"],
                "properties": {
                    "items": {"type": "array", "items": _ref("Work")},
                    "next_cursor": {
                        "type": ["string", "null"],
                        "description": "pass as `cursor` for the next page; null on the last",
                    },
                    "counts": _ref("Counts"),
                },
            },
            "Counts": {
                "type": "object",
                "description": "work items in each state (all of them, not only this page), "
                "plus `expired_leases` (running, lease expired: the worker is gone or stuck) "
                "and `retrying` (queued again after a failure, waiting for `not_before`)",
                "required": [*_STATES, "expired_leases", "retrying"],
                "additionalProperties": {"type": "integer", "minimum": 0},
            },
            "RestartWork": {
                "type": "object",
                "additionalProperties": False,
                "required": ["from_step"],
                "properties": {
                    "from_step": {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": 2**31 - 1,
                        "description": "the first step to run again (1 to the last recorded "
                        "step + 1); the steps before it are kept",
                    }
                },
            },
            "OutboxMessage": {
                "type": "object",
                "required": list(_OUTBOX_PROPERTIES),
                "properties": _OUTBOX_PROPERTIES,
            },
            "OutboxList": {
                "type": "object",
                "required": ["items"],
                "properties": {"items": {"type": "array", "items": _ref("OutboxMessage")}},
            },
            "Worker": {
                "type": "object",
                "properties": {
                    "id": {"type": "string"},
                    "host": {"type": "string"},
                    "pid": {"type": "integer"},
                    "concurrency": {"type": "integer"},
                    "state": {"type": "string"},
                    "started_at": _TS_REQUIRED,
                    "last_seen_at": _TS_REQUIRED,
                    "stopped_at": _TS,
                    "leases_held": {
                        "type": "integer",
                        "minimum": 0,
                        "description": "running work items this worker holds a lease on",
                    },
                },
            },
        },
    },
}
