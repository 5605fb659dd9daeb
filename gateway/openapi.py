"""The operator API's OpenAPI 3.1 document, served at ``/api/v1/openapi.json``.

Written by hand next to :mod:`gateway.api`, :mod:`gateway.waits_api` and :mod:`gateway.resume`;
a test checks that its paths and methods are exactly the routes under ``/api/`` and
``/resume/``. Imports nothing.
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


def _action(verb: str, summary: str, allowed_from: str) -> dict[str, Any]:
    return {
        "post": {
            "operationId": f"{verb}Work",
            "summary": summary,
            "description": f"Allowed from: {allowed_from}. Takes no body (empty or `{{}}`).",
            "parameters": [_ID_PARAM],
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


OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "Tether operator API",
        "version": "1",
        "description": "Start, inspect and steer durable agent work. Every route except this "
        "document needs `Authorization: Bearer <operator token>`. A 2xx answer means the "
        "change is committed to the ledger; 503 means nothing was written: retry.",
    },
    "servers": [{"url": "/"}],
    "security": [{"bearerAuth": []}],
    "paths": {
        "/api/v1/work": {
            "post": {
                "operationId": "createWork",
                "summary": "Start a work item",
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
                "summary": "List work items, newest first, with counts by state",
                "parameters": [
                    {
                        "name": "state",
                        "in": "query",
                        "schema": {"type": "string", "enum": _STATES},
                    },
                    {"name": "agent", "in": "query", "schema": {"type": "string"}},
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 100},
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
                "summary": "A work item with its steps, waits, recent events and children",
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
        "/api/v1/workers": {
            "get": {
                "operationId": "listWorkers",
                "summary": "Worker processes and their liveness",
                "responses": {
                    "200": _json({"type": "array", "items": _ref("Worker")}, "all workers"),
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
            "WorkDetail": {
                "allOf": [
                    _ref("Work"),
                    {
                        "type": "object",
                        "properties": {
                            "steps": {"type": "array", "items": _ref("Step")},
                            "waits": {"type": "array", "items": _ref("Wait")},
                            "events": {
                                "type": "array",
                                "items": _ref("Event"),
                                "description": "the most recent 500, oldest first",
                            },
                            "children": {"type": "array", "items": _ref("WorkSummary")},
                        },
                    },
                ]
            },
            "WorkList": {
                "type": "object",
                "properties": {
                    "items": {"type": "array", "items": _ref("Work")},
                    "counts": {
                        "type": "object",
                        "description": "number of work items in each state",
                        "additionalProperties": {"type": "integer"},
                    },
                },
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
                },
            },
        },
    },
}
