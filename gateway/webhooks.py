"""``POST /webhooks/{name}``: configured inbound webhooks (``settings.webhooks``).

Order of checks, so that nothing is written for a bad request: unknown name → 404; body over
the app's limit → 413; signature (checked on the raw body, before parsing) bad, missing or
stale → 401 ``invalid_signature``; malformed JSON → 400 ``invalid_json``; no delivery id →
400 ``missing_delivery_id``. Then, answering only after the ledger call returned:

* a hook with ``agent`` starts work with the payload as input, deduplicated on
  ``(webhook:{name}, delivery id)`` → 202 ``{"work_id", "duplicate"}``;
* a hook with ``signal`` takes the key from the payload's ``key_field`` (dotted path) and
  resolves ``wait_for_signal(signal, key=...)`` with the payload as data, ``by`` =
  ``webhook:{name}:{delivery id}`` → 200 ``{"resolved": [wait ids], "duplicate": false}``; a
  redelivery of a delivery that already resolved its wait → 200 with ``"duplicate": true``;
  nothing waiting → 404 ``no_waiter`` (the sender retries later).

A ledger that cannot be reached answers 503 (the app's error middleware). Imports adapters,
ledger and the gateway's own modules.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from adapters.webhooks import (
    MAX_DELIVERY_ID,
    Verifier,
    WebhookError,
    make_verifier,
    verify_delivery,
)
from config.settings import WebhookConfig
from gateway.api import LEDGER_KEY, SETTINGS_KEY, ApiError

#: ``resolved_by`` holds at most this many characters
_MAX_BY = 200


@dataclass(frozen=True, slots=True)
class _Hook:
    config: WebhookConfig
    verifier: Verifier
    max_id_length: int

    @property
    def source(self) -> str:
        return f"webhook:{self.config.name}"


HOOKS_KEY: web.AppKey[Mapping[str, _Hook]] = web.AppKey("tether.webhooks")


async def receive(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    hook = request.app[HOOKS_KEY].get(name)
    if hook is None:
        raise ApiError(404, "not_found", f"no webhook named {name!r} is configured")
    body = await request.read()  # 413 past the app's client_max_size
    try:
        delivery = verify_delivery(
            hook.verifier, body, request.headers, max_id_length=hook.max_id_length
        )
    except WebhookError as exc:
        raise ApiError(exc.status, exc.code, exc.message) from None
    ledger = request.app[LEDGER_KEY]
    config = hook.config
    if config.agent is not None:
        work, created = await ledger.create_work(
            config.agent, delivery.payload, source=hook.source, source_event_id=delivery.id
        )
        return web.json_response({"work_id": work.id, "duplicate": not created}, status=202)

    assert config.signal is not None and config.key_field is not None
    key = signal_key(delivery.payload, config.key_field)
    by = f"{hook.source}:{delivery.id}"
    # A redelivery is answered from the first resolution, even if the agent has since parked
    # on the same signal and key again (that new wait is not this delivery's to resolve).
    done = await ledger.signal_waits_resolved_by(config.signal, key, by)
    if not done:
        waits = await ledger.resolve_signal(config.signal, key, delivery.payload, by=by)
        if waits:
            return web.json_response({"resolved": [w.id for w in waits], "duplicate": False})
        # a concurrent copy of this delivery may have won the race
        done = await ledger.signal_waits_resolved_by(config.signal, key, by)
    if done:
        return web.json_response({"resolved": done, "duplicate": True})
    raise ApiError(
        404,
        "no_waiter",
        f"nothing is waiting for signal {config.signal!r} with key {key!r}; retry later",
    )


def signal_key(payload: Any, key_field: str) -> str:
    """The signal key at ``key_field`` (a top-level field, else a dotted path such as
    ``data.order_id``): a string, or an integer turned into one. 400 naming the field
    otherwise."""
    if isinstance(payload, dict) and key_field in payload:
        value = payload[key_field]
    else:
        value = payload
        for part in key_field.split("."):
            if not isinstance(value, dict) or part not in value:
                raise ApiError(
                    400,
                    "missing_key_field",
                    f"the payload has no field {key_field!r} (the signal key)",
                )
            value = value[part]
    if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
        raise ApiError(
            400,
            "invalid_key_field",
            f"the payload field {key_field!r} (the signal key) must be a non-empty string "
            "or an integer",
        )
    return str(value)


def setup_webhooks(app: web.Application) -> None:
    """Serve ``settings.webhooks``. Raises ``ValueError`` on a hook whose secret the scheme
    cannot use (a Standard Webhooks secret must be base64)."""
    hooks: dict[str, _Hook] = {}
    for config in app[SETTINGS_KEY].webhooks:
        try:
            verifier = make_verifier(config.scheme, config.secret.get_secret_value())
        except ValueError as exc:
            raise ValueError(f"webhook {config.name!r}: {exc}") from None
        room = _MAX_BY - len(f"webhook:{config.name}:")
        if room < 1:
            raise ValueError(f"webhook {config.name!r}: the name is too long")
        hooks[config.name] = _Hook(config, verifier, min(MAX_DELIVERY_ID, room))
    app[HOOKS_KEY] = hooks
    app.router.add_post("/webhooks/{name}", receive)
