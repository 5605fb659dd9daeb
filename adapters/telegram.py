"""The Telegram channel's platform side: updates in, messages out (aiogram 3).

* :func:`update_to_inbound` turns a Bot API update (plain dict, as the webhook receives it) into
  an :class:`InboundMessage` (messages, edited messages, channel posts) or a
  :class:`CallbackClick` (an Approve/Deny button pressed), or ``None`` for anything else;
* :func:`split_text` cuts a long text at Telegram's 4,096-character limit on paragraph, line,
  then word boundaries;
* :class:`TelegramSender` (the outbox's :class:`Sender` for channel ``telegram``) sends with
  aiogram's ``Bot`` against ``settings.telegram_api_base``, paced per chat and globally.

``import aiogram`` costs seconds (pydantic model building), so it happens lazily, inside the
functions that need it; parsing updates needs no aiogram at all. Imports nothing of Tether's but
the adapters' own modules and the settings type.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from adapters.inbound import InboundMessage
from adapters.outbound import (
    Delivered,
    DeliveryFailed,
    DeliveryUnknown,
    OutboundMessage,
    RetryLater,
)

if TYPE_CHECKING:
    from aiogram import Bot

    from config.settings import Settings

log = logging.getLogger(__name__)

CHANNEL = "telegram"
#: Telegram's limit for one message's text
MAX_TEXT = 4096
#: callback data of an approval button: ``w:<wait id>:a`` (approve) or ``w:<wait id>:d`` (deny)
_CALLBACK = re.compile(r"^w:([A-Za-z0-9_-]{1,40}):([ad])$")
_DECISIONS = {"a": "approve", "d": "deny"}
_CODES = {v: k for k, v in _DECISIONS.items()}
#: message kinds whose ``file_id`` is kept as an attachment reference
_MEDIA = ("document", "audio", "video", "voice", "video_note", "animation", "sticker")
_MESSAGE_KEYS = ("message", "edited_message", "channel_post", "edited_channel_post")


def bot_id_of(token: str) -> str:
    """The bot's numeric id: the part of the token before ``:``."""
    return token.split(":", 1)[0]


def callback_data(wait_id: str, decision: str) -> str:
    """The button payload for ``decision`` (``approve`` or ``deny``) on ``wait_id``."""
    return f"w:{wait_id}:{_CODES[decision]}"


@dataclass(frozen=True, slots=True)
class CallbackClick:
    """An Approve/Deny button pressed under an approval prompt."""

    callback_id: str
    wait_id: str
    decision: str  # "approve" | "deny"
    user: str
    chat_id: str | None
    message_id: int | None
    #: the prompt's text, to show who decided under it
    message_text: str | None = None
    update_id: int | None = None


def _user_name(user: Any) -> str | None:
    if not isinstance(user, dict):
        return None
    if user.get("username"):
        return str(user["username"])
    if user.get("id") is not None:
        return str(user["id"])
    return None


def _attachments(msg: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    photo = msg.get("photo")
    if isinstance(photo, list) and photo:
        biggest = photo[-1]  # Telegram lists sizes smallest first
        if isinstance(biggest, dict) and biggest.get("file_id"):
            out.append({"type": "photo", "file_id": biggest["file_id"]})
    for kind in _MEDIA:
        item = msg.get(kind)
        if isinstance(item, dict) and item.get("file_id"):
            ref: dict[str, Any] = {"type": kind, "file_id": item["file_id"]}
            for extra in ("file_name", "mime_type"):
                if item.get(extra):
                    ref[extra] = item[extra]
            out.append(ref)
    return out


def update_to_inbound(update: dict[str, Any], bot_id: str) -> InboundMessage | CallbackClick | None:
    """The canonical form of one update; ``None`` for updates Tether does not handle (and for
    callback data that is not an approval button). The message id is ``{bot_id}:{update_id}``,
    the deduplication key."""
    update_id = update.get("update_id")
    if isinstance(update_id, bool) or not isinstance(update_id, int):
        return None
    cq = update.get("callback_query")
    if isinstance(cq, dict):
        return _callback(cq, update_id)
    for key in _MESSAGE_KEYS:
        msg = update.get(key)
        if isinstance(msg, dict):
            return _message(msg, update_id, bot_id)
    return None


def _message(msg: dict[str, Any], update_id: int, bot_id: str) -> InboundMessage | None:
    chat = msg.get("chat")
    if not isinstance(chat, dict) or chat.get("id") is None:
        return None
    text = msg.get("text") or msg.get("caption") or ""
    attachments = _attachments(msg)
    if not text and not attachments:
        return None  # joins, pins, service messages: nothing for an agent
    thread = msg.get("message_thread_id")
    reply = msg.get("reply_to_message")
    reply_to = (
        str(reply["message_id"]) if isinstance(reply, dict) and "message_id" in reply else None
    )
    sender = _user_name(msg.get("from")) or _user_name(msg.get("sender_chat"))
    return InboundMessage(
        channel=CHANNEL,
        chat_id=str(chat["id"]),
        thread_id=str(thread) if thread is not None else "",
        message_id=f"{bot_id}:{update_id}",
        sender=sender,
        text=str(text),
        reply_to=reply_to,
        attachments=attachments,
    )


def _callback(cq: dict[str, Any], update_id: int) -> CallbackClick | None:
    m = _CALLBACK.match(str(cq.get("data") or ""))
    if m is None or not cq.get("id"):
        return None
    msg = cq.get("message") if isinstance(cq.get("message"), dict) else {}
    chat = msg.get("chat") if isinstance(msg.get("chat"), dict) else {}
    return CallbackClick(
        callback_id=str(cq["id"]),
        wait_id=m.group(1),
        decision=_DECISIONS[m.group(2)],
        user=_user_name(cq.get("from")) or "unknown",
        chat_id=str(chat["id"]) if chat.get("id") is not None else None,
        message_id=msg.get("message_id"),
        message_text=msg.get("text"),
        update_id=update_id,
    )


# -- splitting ---------------------------------------------------------------------------------


def split_text(text: str, limit: int = MAX_TEXT) -> list[str]:
    """``text`` in parts of at most ``limit`` characters, cut after the last paragraph break,
    else line break, else space that fits; a word longer than ``limit`` is cut hard. The
    parts joined back give the text (the separators stay at the end of their part)."""
    if limit < 1:
        raise ValueError("limit must be positive")
    parts: list[str] = []
    rest = text
    while len(rest) > limit:
        window = rest[:limit]
        cut = -1
        for sep in ("\n\n", "\n", " "):
            i = window.rfind(sep)
            if i > 0:
                cut = i + len(sep)
                break
        if cut <= 0:
            cut = limit
        parts.append(rest[:cut])
        rest = rest[cut:]
    if rest or not parts:
        parts.append(rest)
    return parts


# -- pacing ------------------------------------------------------------------------------------


class RateLimiter:
    """Reserve send slots: at most one per ``per_chat`` seconds in a chat and ``global_rate``
    per second in all. Waiters are served in the order they asked."""

    def __init__(self, per_chat: float = 1.0, global_rate: float = 30.0) -> None:
        self.per_chat = per_chat
        self.global_gap = 1.0 / global_rate if global_rate > 0 else 0.0
        self._next_global = 0.0
        self._next_chat: dict[str, float] = {}

    def _reserve(self, chat: str) -> float:
        now = time.monotonic()
        slot = max(now, self._next_global, self._next_chat.get(chat, 0.0))
        self._next_global = slot + self.global_gap
        self._next_chat[chat] = slot + self.per_chat
        if len(self._next_chat) > 10_000:  # forget chats that are free again
            self._next_chat = {c: t for c, t in self._next_chat.items() if t > now}
        return slot - now

    async def wait(self, chat: str) -> None:
        delay = self._reserve(chat)  # no await in between: atomic on the event loop
        if delay > 0:
            await asyncio.sleep(delay)

    def hold(self, chat: str, seconds: float) -> None:
        """Telegram said 429: nothing more to this chat for ``seconds``."""
        until = time.monotonic() + seconds
        self._next_chat[chat] = max(self._next_chat.get(chat, 0.0), until)


# -- sending -----------------------------------------------------------------------------------


#: aiogram's ``Response[T]`` models of the Bot API methods Tether calls, held here for good
_RESPONSE_MODELS: list[Any] = []


def import_client_library() -> None:
    """Import aiogram (6-8 s of CPU here: pydantic builds its models). The gateway does it
    before it listens, so the import never competes with requests for the interpreter.

    aiogram checks every answer with ``Response[method.__returning__]``, a pydantic generic
    model that pydantic caches only weakly: after a garbage collection it is built again, which
    takes about 5 ms of CPU per call on this machine. Building the ones we use once and keeping
    them referenced makes that a cache hit for the life of the process."""
    import aiogram.client.session.aiohttp
    import aiogram.exceptions
    import aiogram.types  # noqa: F401
    from aiogram import methods
    from aiogram.methods.base import Response

    if not _RESPONSE_MODELS:
        used = (
            methods.SendMessage,
            methods.EditMessageText,
            methods.AnswerCallbackQuery,
            methods.GetUpdates,
            methods.SetWebhook,
            methods.DeleteWebhook,
            methods.GetMe,
        )
        _RESPONSE_MODELS.extend(Response[m.__returning__] for m in used)  # type: ignore[name-defined]


def _chat_ref(chat_id: str) -> int | str:
    try:
        return int(chat_id)
    except ValueError:
        return chat_id  # "@channelname"


class TelegramSender:
    """Delivers outbox rows of channel ``telegram`` (implements :class:`Sender`).

    A text over 4,096 characters goes out as several messages, in order; the approval keyboard
    rides on the last. When a later part fails transiently, the parts already sent are
    remembered (in memory, per outbox id) and not sent again on the retry. Returns the id of the
    last message sent.
    """

    channel = CHANNEL

    def __init__(
        self,
        token: str,
        api_base: str = "https://api.telegram.org",
        *,
        per_chat_interval: float = 1.0,
        global_rate: float = 30.0,
        timeout: float = 30.0,
    ) -> None:
        self.token = token
        self.api_base = api_base
        self.timeout = timeout
        self.limiter = RateLimiter(per_chat_interval, global_rate)
        self._bot: Bot | None = None
        #: outbox id → (parts already delivered, id of the last one)
        self._progress: dict[int, tuple[int, str]] = {}

    @property
    def bot(self) -> Bot:
        if self._bot is None:
            from aiogram import Bot
            from aiogram.client.session.aiohttp import AiohttpSession
            from aiogram.client.telegram import TelegramAPIServer

            session = AiohttpSession(
                api=TelegramAPIServer.from_base(self.api_base), timeout=self.timeout
            )
            self._bot = Bot(self.token, session=session)
        return self._bot

    async def warm(self) -> None:
        """Import aiogram in a thread (it takes seconds), so that the first send does not
        stall the event loop. Cheap once imported."""
        await asyncio.to_thread(import_client_library)

    async def close(self) -> None:
        if self._bot is not None:
            await self._bot.session.close()
            self._bot = None

    def _keyboard(self, message: OutboundMessage) -> Any:
        if not (message.actions and message.wait_id):
            return None
        from aiogram.types import InlineKeyboardButton, InlineKeyboardMarkup

        buttons = []
        for action in message.actions:
            decision = action.get("id")
            if decision not in _CODES:
                continue
            label = str(action.get("label") or decision.title())
            buttons.append(
                InlineKeyboardButton(
                    text=label, callback_data=callback_data(message.wait_id, decision)
                )
            )
        return InlineKeyboardMarkup(inline_keyboard=[buttons]) if buttons else None

    async def send(self, message: OutboundMessage) -> Delivered:
        parts = split_text(message.text or " ")
        keyboard = self._keyboard(message)
        thread = int(message.thread_id) if message.thread_id.lstrip("-").isdigit() else None
        done, last_id = self._progress.get(message.outbox_id, (0, ""))
        for n in range(done, len(parts)):
            markup = keyboard if n == len(parts) - 1 else None
            sent = await self._call(
                message.chat_id,
                lambda n=n, markup=markup: self.bot.send_message(
                    chat_id=_chat_ref(message.chat_id),
                    text=parts[n],
                    message_thread_id=thread,
                    reply_markup=markup,
                ),
                partial=n > 0,
            )
            last_id = str(sent.message_id)
            if n < len(parts) - 1:
                self._progress[message.outbox_id] = (n + 1, last_id)
        self._progress.pop(message.outbox_id, None)
        return Delivered(external_id=last_id or None)

    async def answer_callback(self, callback_id: str, text: str) -> None:
        """Stop the button's spinner, with a short notice to the person who clicked."""
        await self.bot.answer_callback_query(callback_query_id=callback_id, text=text[:200])

    async def edit_text(self, chat_id: str, message_id: int, text: str) -> None:
        """Replace a message's text (and drop its keyboard)."""
        await self.limiter.wait(chat_id)
        await self.bot.edit_message_text(
            chat_id=_chat_ref(chat_id), message_id=message_id, text=text[:MAX_TEXT]
        )

    async def _call(self, chat_id: str, request: Any, *, partial: bool) -> Any:
        from aiogram.exceptions import (
            TelegramAPIError,
            TelegramNetworkError,
            TelegramRetryAfter,
            TelegramServerError,
            TelegramUnauthorizedError,
        )
        from aiohttp import ClientConnectorError

        await self.limiter.wait(chat_id)
        try:
            return await request()
        except TelegramRetryAfter as exc:
            self.limiter.hold(chat_id, exc.retry_after)
            raise RetryLater(f"telegram rate limit: {exc.message}", float(exc.retry_after)) from exc
        except TelegramNetworkError as exc:
            if isinstance(exc.__cause__, ClientConnectorError):  # the request never left
                raise RetryLater(f"telegram unreachable: {exc.message}", 5.0) from exc
            raise DeliveryUnknown(f"telegram: {exc.message}") from exc
        except TelegramServerError as exc:
            raise DeliveryUnknown(f"telegram server error: {exc.message}") from exc
        except TelegramUnauthorizedError as exc:  # a bad token: nothing was sent; fixable
            raise RetryLater(f"telegram refused the bot token: {exc.message}", 60.0) from exc
        except TelegramAPIError as exc:  # bad request, forbidden (blocked), not found, migrated
            what = "a later part of a split message" if partial else "the message"
            raise DeliveryFailed(f"telegram refused {what}: {exc.message}") from exc


def build_sender(settings: Settings, **kwargs: Any) -> TelegramSender:
    """The sender for ``settings`` (``telegram_token`` must be set)."""
    if settings.telegram_token is None:
        raise ValueError("TETHER_TELEGRAM_TOKEN is not set: the Telegram channel is off")
    return TelegramSender(
        settings.telegram_token.get_secret_value(), settings.telegram_api_base, **kwargs
    )
