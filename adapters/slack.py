"""The Slack channel's platform side: events in, messages out (slack_sdk's ``AsyncWebClient``).

* :func:`event_to_inbound` turns an Events API envelope (``event_callback``, as the endpoint
  receives it) into an :class:`InboundMessage`, or ``None`` for anything Tether does not handle;
* :func:`action_to_click` turns an interactivity payload (``block_actions``) into a
  :class:`SlackClick` when an Approve/Deny button of an approval prompt was pressed;
* :func:`split_message` cuts a long text at Slack's 40,000-character limit (after escaping);
* :class:`SlackSender` (the outbox's :class:`Sender` for channel ``slack``) posts with
  ``chat.postMessage`` against ``settings.slack_api_base``, paced per channel and globally.

How Slack conversations map onto Tether's (``chat_id`` = the Slack channel id, ``thread_id``):

* a message in a thread → ``thread_ts``: the whole thread is one conversation;
* a top-level message in a channel (public, private, group DM) or an ``app_mention`` → its own
  ``ts``: the reply opens a thread under it, and later messages in that thread continue the
  same conversation;
* a top-level message in a direct message with the bot (``channel_type`` ``im``) → ``""``: the
  DM is one conversation, replies go into the DM itself (as in a Telegram private chat), so an
  answer to a question is just the next message.

Ignored: messages from bots (``bot_id`` set, subtype ``bot_message``, or our own bot user),
edits, deletions, joins and the other message subtypes (``message_changed`` also fires for link
unfurls: it would start work for nothing), hidden events, and messages without text or files.
A message in a channel that mentions the bot is handled once, through its ``app_mention`` event:
Slack sends both a ``message`` and an ``app_mention`` event (different ``event_id``) for it.

The message id (the deduplication key) is ``{team_id}:{event_id}``: a redelivered event
(``X-Slack-Retry-Num``) changes nothing.

``slack_sdk`` is imported lazily (``import slack_sdk`` costs a few hundred milliseconds);
parsing events needs none of it. Imports nothing of Tether's but the adapters' own modules and
the settings type.
"""

from __future__ import annotations

import asyncio
import logging
import re
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
from adapters.telegram import RateLimiter, split_text

if TYPE_CHECKING:
    import aiohttp
    from slack_sdk.web.async_client import AsyncWebClient

    from config.settings import Settings

log = logging.getLogger(__name__)

CHANNEL = "slack"
DEFAULT_API_BASE = "https://slack.com/api/"
#: Slack truncates a message's ``text`` after 40,000 characters
MAX_TEXT = 40_000
#: the text of a ``section`` block holds at most 3,000 characters
MAX_SECTION = 3_000
#: action id of an approval button: ``w:<wait id>:a`` (approve) or ``w:<wait id>:d`` (deny)
_ACTION = re.compile(r"^w:([A-Za-z0-9_-]{1,40}):([ad])$")
_DECISIONS = {"a": "approve", "d": "deny"}
_CODES = {v: k for k, v in _DECISIONS.items()}
_STYLES = {"approve": "primary", "deny": "danger"}
#: message subtypes that carry a person's new message; every other subtype is ignored
_MESSAGE_SUBTYPES = frozenset({"", "file_share", "thread_broadcast", "me_message"})
_LEADING_MENTION = re.compile(r"^\s*<@([A-Z0-9]+)(?:\|[^>]*)?>[\s:,]*")
#: ``chat.postMessage`` errors after which the message may have been posted
_MAYBE_POSTED = frozenset({"internal_error", "fatal_error", "request_timeout"})
#: errors that refuse the request before anything happened, worth retrying later
_TRANSIENT = {"ratelimited": 1.0, "service_unavailable": 5.0, "team_added_to_org": 30.0}


def action_id(wait_id: str, decision: str) -> str:
    """The button's action id for ``decision`` (``approve`` or ``deny``) on ``wait_id``."""
    return f"w:{wait_id}:{_CODES[decision]}"


def escape(text: str) -> str:
    """``text`` as Slack shows it literally (``&``, ``<`` and ``>`` are control characters)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def unescape(text: str) -> str:
    """The text a person typed: Slack sends ``&``, ``<`` and ``>`` escaped."""
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def mention(user: str) -> str:
    """How Slack shows a user by id (``<@U123>`` renders as their name)."""
    return f"<@{user}>"


@dataclass(frozen=True, slots=True)
class SlackClick:
    """An Approve/Deny button pressed under an approval prompt."""

    wait_id: str
    decision: str  # "approve" | "deny"
    #: the Slack user id of the person who clicked
    user: str
    team_id: str | None
    channel_id: str | None
    #: the prompt message's ``ts`` (to replace it) and its thread, if any
    message_ts: str | None
    thread_ts: str | None
    #: the prompt's text, to show who decided under it
    message_text: str | None = None
    response_url: str | None = None


# -- inbound -----------------------------------------------------------------------------------


def bot_user_of(envelope: dict[str, Any]) -> str | None:
    """The bot user this event was delivered to (``authorizations[0].user_id`` of a bot), if
    the envelope says so: Slack adds it to every Events API request."""
    auths = envelope.get("authorizations")
    if isinstance(auths, list) and auths and isinstance(auths[0], dict):
        first = auths[0]
        if first.get("is_bot") and isinstance(first.get("user_id"), str):
            return first["user_id"]
    return None


def _team_of(envelope: dict[str, Any], event: dict[str, Any]) -> str | None:
    for value in (envelope.get("team_id"), event.get("team")):
        if isinstance(value, str) and value:
            return value
    return None


def _files(event: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    files = event.get("files")
    if not isinstance(files, list):
        return out
    for f in files:
        if isinstance(f, dict) and isinstance(f.get("id"), str):
            ref: dict[str, Any] = {"type": "file", "file_id": f["id"]}
            for key, name in (("name", "file_name"), ("mimetype", "mime_type")):
                if isinstance(f.get(key), str) and f[key]:
                    ref[name] = f[key]
            out.append(ref)
    return out


def _clean_text(text: str, bot_user: str | None, *, mentioned: bool) -> str:
    """The text without the leading mention of the bot, unescaped."""
    m = _LEADING_MENTION.match(text)
    if m is not None and (m.group(1) == bot_user or (bot_user is None and mentioned)):
        text = text[m.end() :]
    return unescape(text).strip()


def event_to_inbound(
    envelope: dict[str, Any], bot_user_id: str | None = None
) -> InboundMessage | None:
    """The canonical form of one ``event_callback``; ``None`` for events Tether does not handle.
    ``bot_user_id`` is the bot's own user (default: from the envelope's ``authorizations``)."""
    if envelope.get("type") != "event_callback":
        return None
    event = envelope.get("event")
    event_id = envelope.get("event_id")
    if not isinstance(event, dict) or not isinstance(event_id, str) or not event_id:
        return None
    kind = event.get("type")
    if kind not in ("message", "app_mention"):
        return None
    bot_user = bot_user_id or bot_user_of(envelope)
    subtype = event.get("subtype") or ""
    user = event.get("user")
    channel = event.get("channel")
    ts = event.get("ts")
    if (
        subtype not in _MESSAGE_SUBTYPES
        or event.get("bot_id")
        or event.get("hidden")
        or not isinstance(user, str)
        or not user
        or user == bot_user
        or not isinstance(channel, str)
        or not channel
        or not isinstance(ts, str)
        or not ts
    ):
        return None
    raw_text = event.get("text") if isinstance(event.get("text"), str) else ""
    is_dm = event.get("channel_type") == "im" or (
        kind == "message" and "channel_type" not in event and channel.startswith("D")
    )
    if (
        kind == "message"
        and not is_dm
        and bot_user is not None
        and re.search(rf"<@{re.escape(bot_user)}(?:\|[^>]*)?>", raw_text)
    ):
        return None  # its app_mention event carries it
    text = _clean_text(raw_text, bot_user, mentioned=kind == "app_mention")
    attachments = _files(event)
    if not text and not attachments:
        return None
    team = _team_of(envelope, event)
    thread_ts = event.get("thread_ts") if isinstance(event.get("thread_ts"), str) else None
    if thread_ts:
        thread = thread_ts
    elif is_dm:
        thread = ""
    else:
        thread = ts
    return InboundMessage(
        channel=CHANNEL,
        chat_id=channel,
        thread_id=thread,
        message_id=f"{team or '-'}:{event_id}",
        sender=user,
        text=text,
        reply_to=thread_ts if thread_ts and thread_ts != ts else None,
        attachments=attachments,
    )


def action_to_click(payload: dict[str, Any]) -> SlackClick | None:
    """The approval button pressed in a ``block_actions`` payload; ``None`` for anything else."""
    if payload.get("type") != "block_actions":
        return None
    actions = payload.get("actions")
    if not isinstance(actions, list) or not actions or not isinstance(actions[0], dict):
        return None
    m = _ACTION.match(str(actions[0].get("action_id") or ""))
    user = payload.get("user") if isinstance(payload.get("user"), dict) else {}
    if m is None or not isinstance(user.get("id"), str) or not user["id"]:
        return None
    team = payload.get("team") if isinstance(payload.get("team"), dict) else {}
    container = payload.get("container") if isinstance(payload.get("container"), dict) else {}
    channel = payload.get("channel") if isinstance(payload.get("channel"), dict) else {}
    message = payload.get("message") if isinstance(payload.get("message"), dict) else {}

    def text(value: Any) -> str | None:
        return value if isinstance(value, str) and value else None

    return SlackClick(
        wait_id=m.group(1),
        decision=_DECISIONS[m.group(2)],
        user=user["id"],
        team_id=text(team.get("id")) or text(user.get("team_id")),
        channel_id=text(container.get("channel_id")) or text(channel.get("id")),
        message_ts=text(container.get("message_ts")) or text(message.get("ts")),
        thread_ts=text(container.get("thread_ts")) or text(message.get("thread_ts")),
        message_text=text(message.get("text")),
        response_url=text(payload.get("response_url")),
    )


# -- outbound ----------------------------------------------------------------------------------


def split_message(text: str, limit: int = MAX_TEXT) -> list[str]:
    """``text`` escaped for Slack, in parts of at most ``limit`` characters each, cut on
    paragraph, line, then word boundaries (never inside an escape such as ``&amp;``)."""
    out: list[str] = []

    def cut(raw: str, raw_limit: int) -> None:
        for part in split_text(raw, raw_limit):
            escaped = escape(part)
            if len(escaped) <= limit or len(part) <= 1:
                out.append(escaped)
            else:  # escaping made it longer: cut the raw part finer
                cut(part, max(1, len(part) * limit // len(escaped)))

    cut(text, limit)
    return out


def approval_blocks(text: str, wait_id: str, actions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The prompt (already escaped) and its buttons, as Block Kit blocks; no buttons when no
    action is an approval decision."""
    buttons = []
    for action in actions:
        decision = action.get("id")
        if decision not in _CODES:
            continue
        buttons.append(
            {
                "type": "button",
                "action_id": action_id(wait_id, decision),
                "text": {"type": "plain_text", "text": str(action.get("label") or decision)[:75]},
                "value": decision,
                "style": _STYLES[decision],
            }
        )
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": text[:MAX_SECTION] or " "}}
    ]
    if buttons:
        blocks.append({"type": "actions", "block_id": f"tether:{wait_id}", "elements": buttons})
    return blocks


def decided_blocks(prompt: str, outcome: str) -> list[dict[str, Any]]:
    """A decided prompt: its text and who decided, without buttons (both already escaped)."""
    return [
        {"type": "section", "text": {"type": "mrkdwn", "text": prompt[:MAX_SECTION] or " "}},
        {"type": "context", "elements": [{"type": "mrkdwn", "text": outcome[:MAX_SECTION]}]},
    ]


def _import_slack_sdk() -> None:
    import slack_sdk.errors
    import slack_sdk.web.async_client  # noqa: F401


class SlackSender:
    """Delivers outbox rows of channel ``slack`` (implements :class:`Sender`).

    A text over 40,000 characters goes out as several messages in the same thread, in order;
    the approval buttons ride on the last (whose text is cut at 3,000 characters, the limit of
    a section block). When a later part fails transiently, the parts already sent are
    remembered (in memory, per outbox id) and not sent again on the retry. Returns the ``ts``
    of the last message sent.

    Answers: a 429 → :class:`RetryLater` with its ``Retry-After``; a connection refused before
    the request left → :class:`RetryLater`; a timeout after sending, a 5xx, ``internal_error``
    or ``fatal_error`` → :class:`DeliveryUnknown`; any other ``ok: false`` (``channel_not_found``,
    ``not_in_channel``, ``invalid_auth``, ``msg_too_long`` …) → :class:`DeliveryFailed`.
    slack_sdk's own retries are off: the outbox decides what is retried.
    """

    channel = CHANNEL

    def __init__(
        self,
        token: str,
        api_base: str = DEFAULT_API_BASE,
        *,
        per_channel_interval: float = 1.0,
        global_rate: float = 20.0,
        timeout: float = 30.0,
    ) -> None:
        self.token = token
        self.api_base = api_base if api_base.endswith("/") else api_base + "/"
        self.timeout = timeout
        self.limiter = RateLimiter(per_channel_interval, global_rate)
        self._client: AsyncWebClient | None = None
        self._session: aiohttp.ClientSession | None = None
        #: outbox id → (parts already delivered, ts of the last one)
        self._progress: dict[int, tuple[int, str]] = {}

    @property
    def client(self) -> AsyncWebClient:
        if self._client is None:
            import aiohttp
            from slack_sdk.web.async_client import AsyncWebClient

            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
            self._client = AsyncWebClient(
                token=self.token,
                base_url=self.api_base,
                timeout=int(max(1, self.timeout)),
                session=self._session,
                retry_handlers=[],
            )
        return self._client

    async def warm(self) -> None:
        """Import slack_sdk in a thread, so that the first send does not stall the loop."""
        await asyncio.to_thread(_import_slack_sdk)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        self._session = None
        self._client = None

    async def send(self, message: OutboundMessage) -> Delivered:
        parts = split_message(message.text or " ")
        blocks = None
        if message.actions and message.wait_id:
            # the buttons ride on the last part, whose text must fit in a section block
            parts = parts[:-1] + split_message(unescape(parts[-1]), MAX_SECTION)
            blocks = approval_blocks(parts[-1], message.wait_id, message.actions)
        thread = message.thread_id or None
        done, last_ts = self._progress.get(message.outbox_id, (0, ""))
        for n in range(done, len(parts)):
            args: dict[str, Any] = {"channel": message.chat_id, "text": parts[n]}
            if thread:
                args["thread_ts"] = thread
            if blocks is not None and n == len(parts) - 1:
                args["blocks"] = blocks
            response = await self._call(
                message.chat_id, "chat_postMessage", args, partial=n > 0, may_repeat=False
            )
            last_ts = str(response.get("ts") or "")
            if n < len(parts) - 1:
                self._progress[message.outbox_id] = (n + 1, last_ts)
        self._progress.pop(message.outbox_id, None)
        return Delivered(external_id=last_ts or None)

    async def update_message(
        self, channel: str, ts: str, text: str, blocks: list[dict[str, Any]] | None = None
    ) -> None:
        """Replace a message (``chat.update``); ``blocks=[]`` removes its buttons."""
        args: dict[str, Any] = {"channel": channel, "ts": ts, "text": text[:MAX_TEXT]}
        args["blocks"] = blocks if blocks is not None else []
        await self._call(channel, "chat_update", args, partial=False, may_repeat=True)

    async def post_ephemeral(
        self, channel: str, user: str, text: str, thread_ts: str | None = None
    ) -> None:
        """A message only ``user`` sees (``chat.postEphemeral``)."""
        args: dict[str, Any] = {"channel": channel, "user": user, "text": text[:MAX_TEXT]}
        if thread_ts:
            args["thread_ts"] = thread_ts
        await self._call(channel, "chat_postEphemeral", args, partial=False, may_repeat=True)

    async def auth_test(self) -> dict[str, Any]:
        """Who the token belongs to: ``user_id`` (the bot user), ``bot_id``, ``team_id``."""
        response = await self.client.auth_test()
        return dict(response.data) if isinstance(response.data, dict) else {}

    async def _call(
        self, channel: str, method: str, args: dict[str, Any], *, partial: bool, may_repeat: bool
    ) -> Any:
        import aiohttp
        from slack_sdk.errors import SlackApiError

        await self.limiter.wait(channel)
        try:
            return await getattr(self.client, method)(**args)
        except SlackApiError as exc:
            raise self._classify(channel, method, exc, partial=partial) from exc
        except aiohttp.ClientConnectorError as exc:  # the request never left
            raise RetryLater(f"slack unreachable: {exc}", 5.0) from exc
        except (TimeoutError, aiohttp.ClientError) as exc:
            what = f"{type(exc).__name__}: {exc}".rstrip(": ")
            raise DeliveryUnknown(f"slack {method}: {what}") from exc

    def _classify(
        self, channel: str, method: str, exc: Any, *, partial: bool
    ) -> RetryLater | DeliveryUnknown | DeliveryFailed:
        response = exc.response
        status = int(getattr(response, "status_code", 0) or 0)
        data = response.data if isinstance(getattr(response, "data", None), dict) else {}
        error = str(data.get("error") or f"HTTP {status}")
        if status == 429 or error == "ratelimited":
            retry_after = _retry_after(getattr(response, "headers", None) or {})
            self.limiter.hold(channel, retry_after)
            return RetryLater(
                f"slack rate limit on {method}: retry after {retry_after:g}s", retry_after
            )
        if status >= 500 or error in _MAYBE_POSTED:
            return DeliveryUnknown(f"slack {method}: {error}")
        if error in _TRANSIENT:
            return RetryLater(f"slack {method}: {error}", _TRANSIENT[error])
        what = "a later part of a split message" if partial else "the message"
        return DeliveryFailed(f"slack refused {what} ({method}): {error}")


def _retry_after(headers: Any) -> float:
    value = None
    for key in ("Retry-After", "retry-after"):
        try:
            value = headers.get(key)
        except AttributeError:
            value = None
        if value:
            break
    if isinstance(value, list | tuple):
        value = value[0] if value else None
    try:
        seconds = float(value) if value is not None else 1.0
    except ValueError:
        seconds = 1.0
    return seconds if seconds > 0 else 1.0


def build_sender(settings: Settings, **kwargs: Any) -> SlackSender:
    """The sender for ``settings`` (``slack_bot_token`` must be set)."""
    if settings.slack_bot_token is None:
        raise ValueError("TETHER_SLACK_BOT_TOKEN is not set: the Slack channel is off")
    return SlackSender(
        settings.slack_bot_token.get_secret_value(), settings.slack_api_base, **kwargs
    )
