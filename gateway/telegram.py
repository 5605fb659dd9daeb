"""``POST /channels/telegram/webhook``: Telegram's updates, persisted before they are acked.

Order of checks, so that nothing is written for a bad request: ``X-Telegram-Bot-Api-Secret-Token``
compared in constant time with ``settings.telegram_webhook_secret`` (401 otherwise); body over
the app's limit → 413; malformed JSON → 400 ``invalid_json``; no integer ``update_id`` → 400.
Then, answering 200 ``{}`` only after the ledger call returned:

* a message (or edited message, channel post) → ``ledger.accept_message`` with message id
  ``{bot id}:{update_id}``: a redelivered update changes nothing;
* an Approve/Deny click → ``ledger.resolve_wait`` (first click wins, ``by`` =
  ``telegram:<user>``); then, best effort and in the background, the callback query is answered
  and the prompt edited to show who decided (a later click is told "Already decided by …"). A
  failure there is logged; the decision is already committed;
* anything else is acked and ignored.

A ledger that cannot be reached answers 503 (the app's error middleware): Telegram redelivers.
Imports adapters, ledger and the gateway's own modules.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Coroutine, Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web

from adapters.telegram import (
    CHANNEL,
    CallbackClick,
    TelegramSender,
    bot_id_of,
    build_sender,
    update_to_inbound,
)
from gateway.api import LEDGER_KEY, SETTINGS_KEY, ApiError, read_json_object
from gateway.http_chat import CHAT_POLICIES_KEY
from ledger import Ledger
from ledger.errors import InvalidResolution, WaitAlreadyResolved, WaitNotFound

if TYPE_CHECKING:
    from config.settings import Settings

log = logging.getLogger(__name__)

SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
#: how long one best-effort Bot API call (answer, edit) may take
NOTIFY_TIMEOUT = 10.0
_VERBS = {"approve": "Approved", "deny": "Denied"}


class TelegramState:
    """The route's state: secret, bot id, and a lazily built sender for the best-effort
    calls (answering callback queries, editing prompts)."""

    def __init__(self, settings: Settings) -> None:
        assert settings.telegram_token is not None
        secret = settings.telegram_webhook_secret
        self.secret = secret.get_secret_value().encode("utf-8") if secret is not None else b""
        self.bot_id = bot_id_of(settings.telegram_token.get_secret_value())
        self.settings = settings
        self._sender: TelegramSender | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    @property
    def sender(self) -> TelegramSender:
        if self._sender is None:
            self._sender = build_sender(self.settings)
        return self._sender

    def later(self, what: str, call: Coroutine[Any, Any, None]) -> None:
        async def run() -> None:
            try:
                await self.sender.warm()
                async with asyncio.timeout(NOTIFY_TIMEOUT):
                    await call
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("telegram: %s failed: %s: %s", what, type(exc).__name__, exc)
            finally:
                call.close()  # never awaited if the warm-up failed; a no-op once done

        task = asyncio.create_task(run(), name=f"telegram:{what}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def close(self) -> None:
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=NOTIFY_TIMEOUT)
        for task in list(self.tasks):
            task.cancel()
        if self._sender is not None:
            await self._sender.close()


TELEGRAM_KEY: web.AppKey[TelegramState] = web.AppKey("tether.telegram", TelegramState)


def _check_secret(request: web.Request, expected: bytes) -> None:
    given = request.headers.get(SECRET_HEADER, "").encode("utf-8")
    if not expected or not hmac.compare_digest(given, expected):
        raise ApiError(401, "unauthorized", f"missing or wrong {SECRET_HEADER}")


async def webhook(request: web.Request) -> web.Response:
    tg = request.app[TELEGRAM_KEY]
    _check_secret(request, tg.secret)
    update = await read_json_object(request)  # 413 past the limit, 400 on malformed JSON
    update_id = update.get("update_id")
    if isinstance(update_id, bool) or not isinstance(update_id, int):
        raise ApiError(400, "bad_request", "the update has no integer update_id")
    await handle_update(
        request.app[LEDGER_KEY], tg, update, policies=request.app[CHAT_POLICIES_KEY]
    )
    return web.json_response({})


async def handle_update(
    ledger: Ledger,
    tg: TelegramState,
    update: dict[str, Any],
    *,
    policies: Mapping[str, tuple[str, float]] | None = None,
) -> None:
    """Commit one update (webhook or polling): a message → ``accept_message`` (dedup on
    ``{bot id}:{update_id}``), a click → the decision. Returns once the ledger call returned."""
    item = update_to_inbound(update, tg.bot_id)
    if isinstance(item, CallbackClick):
        await _click(ledger, tg, item)
    elif item is not None:
        agent = tg.settings.default_agent
        on_busy, window = (policies or {}).get(agent, ("enqueue", 2.0))
        payload: dict[str, Any] = dict(item.payload() or {})
        if "edited_message" in update or "edited_channel_post" in update:
            payload["edited"] = True
        await ledger.accept_message(
            channel=CHANNEL,
            chat_id=item.chat_id,
            thread_id=item.thread_id,
            text=item.text,
            message_id=item.message_id,
            sender=item.sender,
            payload=payload or None,
            agent=agent,
            on_busy=on_busy,
            collect_window=window,
        )


def _shown(by: str | None) -> str:
    if not by:
        return "someone"
    return by.removeprefix("telegram:")


async def _click(ledger: Ledger, tg: TelegramState, click: CallbackClick) -> None:
    by = f"telegram:{click.user}"
    try:
        await ledger.resolve_wait(click.wait_id, {"decision": click.decision}, by=by)
        decision = click.decision
    except WaitAlreadyResolved as exc:
        first = exc.resolution.get("decision") if isinstance(exc.resolution, dict) else None
        if exc.resolved_by != by or first is None:
            what = "Already decided" if exc.state == "resolved" else f"Already {exc.state}"
            text = f"{what} by {_shown(exc.resolved_by)}" if exc.resolved_by else what
            tg.later(
                "answering a callback query", tg.sender.answer_callback(click.callback_id, text)
            )
            return
        decision = first  # this person's own decision, redelivered or clicked again: repeat it
    except WaitNotFound:
        _answer(tg, click, "This request no longer exists.")
        return
    except InvalidResolution as exc:
        tg.later(
            "answering a callback query", tg.sender.answer_callback(click.callback_id, str(exc))
        )
        return
    shown = f"{_VERBS.get(decision, decision)} by {click.user}"
    _answer(tg, click, shown)
    if click.chat_id is not None and click.message_id is not None:
        text = f"{click.message_text}\n\n{shown}" if click.message_text else shown
        tg.later("editing the prompt", tg.sender.edit_text(click.chat_id, click.message_id, text))


def _answer(tg: TelegramState, click: CallbackClick, text: str) -> None:
    tg.later("answering a callback query", tg.sender.answer_callback(click.callback_id, text))


def setup_telegram(app: web.Application) -> None:
    """Serve the webhook when ``settings.telegram_token`` is set (webhook mode). Raises
    ``ValueError`` when the token is set but ``telegram_webhook_secret`` is not: an unsigned
    webhook would take updates from anyone."""
    settings = app[SETTINGS_KEY]
    if settings.telegram_token is None:
        return
    if settings.telegram_mode != "webhook":
        log.warning("telegram: polling mode is not served by the gateway's webhook route")
        return
    secret = settings.telegram_webhook_secret
    if secret is None or not secret.get_secret_value():
        raise ValueError(
            "TETHER_TELEGRAM_TOKEN is set but TETHER_TELEGRAM_WEBHOOK_SECRET is not: the "
            "Telegram webhook refuses to run unauthenticated; set the secret (and register it "
            "with setWebhook's secret_token)"
        )
    tg = TelegramState(settings)
    app[TELEGRAM_KEY] = tg

    async def close(_: web.Application) -> None:
        await tg.close()

    app.on_cleanup.append(close)
    app.router.add_post("/channels/telegram/webhook", webhook)
