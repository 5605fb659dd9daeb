"""``POST /channels/slack/events``: Slack's Events API and interactivity, persisted before they
are acked, through slack-bolt's ``AsyncApp`` (``process_before_response=True``).

Order of checks, so that nothing is written for a bad request: ``X-Slack-Signature`` and
``X-Slack-Request-Timestamp`` present and the timestamp within 5 minutes (401 otherwise, before
the body is read); body over the app's limit → 413; the v0 signature over the raw body (401);
malformed JSON (the body, or the ``payload=`` field of a form-encoded interactivity request) →
400 ``invalid_json``. Then bolt verifies the signature once more, answers ``url_verification``
with the challenge and dispatches to one of two listeners, which only write the ledger and ack
once the write has committed:

* an event (``message`` in a channel, DM or thread, ``app_mention``) → ``ledger.accept_message``
  with message id ``{team_id}:{event_id}`` (see :mod:`adapters.slack` for what is ignored and
  how conversations map): a redelivery (``X-Slack-Retry-Num``) changes nothing;
* an Approve/Deny click (``block_actions``) → ``ledger.resolve_wait`` (first click wins, ``by`` =
  ``slack:<user id>``); then, best effort and in the background, the prompt is replaced with
  ``chat.update`` (who decided, no buttons: works hours later, unlike ``response_url``), and a
  later clicker is told who decided with ``chat.postEphemeral``. A failure there is logged; the
  decision is already committed;
* anything else that is signed is acked and ignored (a 404 would make Slack retry it).

An exception inside bolt (a listener or a middleware) is not left to bolt's error handler,
which would answer 500 with an empty body: it is raised again here, so that a ledger that
cannot be reached answers 503 (the app's error middleware) and Slack redelivers.

Bolt never calls ``auth.test`` on a request: ``authorize`` builds the result from the
settings' token and the bot user named in the request's ``authorizations`` (or found by one
``auth.test`` in the background at start-up). ``slack_bolt`` is imported (in a thread) when the
app starts, and only when Slack is configured. Imports adapters, ledger and the gateway's own
modules.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import time
from collections.abc import Coroutine, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from aiohttp import web

from adapters.json_body import InvalidJson, parse_json_body
from adapters.slack import (
    CHANNEL,
    SlackClick,
    SlackSender,
    action_to_click,
    bot_user_of,
    build_sender,
    decided_blocks,
    escape,
    event_to_inbound,
    mention,
)
from gateway.api import LEDGER_KEY, SETTINGS_KEY, ApiError
from gateway.http_chat import CHAT_POLICIES_KEY
from ledger import Ledger
from ledger.errors import InvalidResolution, WaitAlreadyResolved, WaitNotFound

if TYPE_CHECKING:
    from config.settings import Settings

log = logging.getLogger(__name__)

PATH = "/channels/slack/events"
SIGNATURE_HEADER = "X-Slack-Signature"
TIMESTAMP_HEADER = "X-Slack-Request-Timestamp"
RETRY_HEADER = "X-Slack-Retry-Num"
#: how far a request's timestamp may be from now (Slack's replay window), seconds
MAX_SKEW = 300
#: how long one best-effort Web API call (update, ephemeral, auth.test) may take
NOTIFY_TIMEOUT = 10.0
_VERBS = {"approve": "Approved", "deny": "Denied"}
#: keys of bolt's request context this module uses
_FAILURE = "tether_failure"
_BOT_USER = "tether_bot_user_id"


class SlackState:
    """The route's state: the signing secret, the bolt app (built at start-up), what
    ``auth.test`` said, and a lazily built sender for the best-effort calls."""

    def __init__(
        self, settings: Settings, ledger: Ledger, policies: Mapping[str, tuple[str, float]]
    ) -> None:
        assert settings.slack_bot_token is not None and settings.slack_signing_secret is not None
        self.settings = settings
        self.ledger = ledger
        self.policies = policies
        self.token = settings.slack_bot_token.get_secret_value()
        self.secret = settings.slack_signing_secret.get_secret_value()
        self.bolt: Any = None
        #: ``user_id``, ``bot_id``, ``team_id`` of the token, once ``auth.test`` answered
        self.identity: dict[str, str] = {}
        self._sender: SlackSender | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    @property
    def sender(self) -> SlackSender:
        if self._sender is None:
            self._sender = build_sender(self.settings, per_channel_interval=0.0)
        return self._sender

    async def start(self) -> None:
        await asyncio.to_thread(_import_bolt)  # a few hundred ms: off the event loop
        self.bolt = build_bolt(self)
        self.later("auth.test", self._who_am_i())

    async def _who_am_i(self) -> None:
        data = await self.sender.auth_test()
        self.identity = {
            k: str(data[k]) for k in ("user_id", "bot_id", "team_id") if data.get(k) is not None
        }
        log.info(
            "slack: bot user %s (bot %s) in team %s",
            self.identity.get("user_id"),
            self.identity.get("bot_id"),
            self.identity.get("team_id"),
        )

    def later(self, what: str, call: Coroutine[Any, Any, None]) -> None:
        """Run ``call`` in the background; log (never raise) a failure."""

        async def run() -> None:
            try:
                async with asyncio.timeout(NOTIFY_TIMEOUT):
                    await call
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("slack: %s failed: %s: %s", what, type(exc).__name__, exc)
            finally:
                call.close()  # a no-op once it ran

        task = asyncio.create_task(run(), name=f"slack:{what}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def close(self) -> None:
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=NOTIFY_TIMEOUT)
        for task in list(self.tasks):
            task.cancel()
        if self._sender is not None:
            await self._sender.close()


SLACK_KEY: web.AppKey[SlackState] = web.AppKey("tether.slack", SlackState)


# -- the bolt app ------------------------------------------------------------------------------


def _import_bolt() -> None:
    import slack_bolt.async_app
    import slack_bolt.authorization
    import slack_bolt.request.async_request  # noqa: F401


def build_bolt(st: SlackState) -> Any:
    """The ``AsyncApp`` that verifies, routes and acks; its listeners only write the ledger."""
    from slack_bolt.async_app import AsyncApp
    from slack_bolt.authorization import AuthorizeResult
    from slack_sdk.web.async_client import AsyncWebClient

    async def authorize(
        enterprise_id: str | None, team_id: str | None, context: Any
    ) -> AuthorizeResult:
        return AuthorizeResult(
            enterprise_id=enterprise_id,
            team_id=team_id or st.identity.get("team_id"),
            bot_token=st.token,
            bot_user_id=context.get(_BOT_USER) or st.identity.get("user_id"),
            bot_id=st.identity.get("bot_id"),
        )

    app = AsyncApp(
        name="tether",
        signing_secret=st.secret,
        # The token comes from authorize(): a client with a token would make bolt warn that
        # it is ignored. slack_sdk's retries are off; nothing here sends from the listeners.
        client=AsyncWebClient(base_url=st.settings.slack_api_base, retry_handlers=[]),
        authorize=authorize,
        process_before_response=True,
        raise_error_for_unhandled_request=False,
        logger=logging.getLogger("gateway.slack.bolt"),
    )

    async def on_event(body: dict[str, Any], ack: Any, context: Any) -> None:
        await handle_event(st, body, bot_user_id=context.get("bot_user_id"))
        await ack()

    async def on_action(body: dict[str, Any], ack: Any) -> None:
        await handle_action(st, body)
        await ack()

    async def on_error(error: Exception, request: Any) -> None:
        request.context[_FAILURE] = error  # raised again by the route

    app.event(re.compile(r".*"))(on_event)
    app.action(re.compile(r".*"))(on_action)
    app.error(on_error)
    return app


# -- the route ---------------------------------------------------------------------------------


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message)


def _signature_headers(request: web.Request) -> tuple[str, str]:
    """The signature and its timestamp, present and fresh (checked before reading the body)."""
    timestamp = request.headers.get(TIMESTAMP_HEADER, "")
    signature = request.headers.get(SIGNATURE_HEADER, "")
    if not timestamp or not signature:
        raise _unauthorized(f"missing {SIGNATURE_HEADER} or {TIMESTAMP_HEADER}")
    try:
        sent = int(timestamp)
    except ValueError:
        raise _unauthorized(f"{TIMESTAMP_HEADER} is not a Unix time") from None
    if abs(time.time() - sent) > MAX_SKEW:
        raise _unauthorized(f"{TIMESTAMP_HEADER} is more than 5 minutes away from now")
    return timestamp, signature


def _check_signature(secret: str, timestamp: str, signature: str, body: bytes) -> None:
    base = b"v0:" + timestamp.encode("ascii") + b":" + body
    expected = "v0=" + hmac.new(secret.encode("utf-8"), base, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected.encode("ascii"), signature.encode("utf-8", "replace")):
        raise _unauthorized(f"wrong {SIGNATURE_HEADER}")


def _parse(text: str, content_type: str) -> dict[str, Any]:
    """The request as bolt will read it (the same rules), strictly: 400 on malformed JSON."""
    try:
        if content_type == "application/json" or text.startswith("{"):
            data = parse_json_body(text.encode("utf-8"), what="the request body", where="it")
        else:
            form = dict(parse_qsl(text, keep_blank_values=True))
            if "payload" not in form:
                return form  # e.g. ssl_check: bolt answers it
            data = parse_json_body(
                form["payload"].encode("utf-8"), what="the payload field", where="it"
            )
    except InvalidJson as exc:
        raise ApiError(400, "invalid_json", str(exc)) from None
    if not isinstance(data, dict):
        raise ApiError(400, "bad_request", "the request must carry a JSON object")
    return data


async def events(request: web.Request) -> web.StreamResponse:
    st = request.app[SLACK_KEY]
    timestamp, signature = _signature_headers(request)
    body = await request.read()  # 413 past the app's limit
    _check_signature(st.secret, timestamp, signature, body)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_json", "the request body is not UTF-8") from None
    payload = _parse(text, request.content_type)
    if st.bolt is None:
        raise ApiError(
            503, "starting", "the Slack channel is starting", headers={"Retry-After": "1"}
        )
    if request.headers.get(RETRY_HEADER):
        log.debug(
            "slack: redelivery %s (%s) of %s",
            request.headers.get(RETRY_HEADER),
            request.headers.get("X-Slack-Retry-Reason", "?"),
            payload.get("event_id"),
        )
    return await dispatch(st, request, text, bot_user_of(payload))


async def dispatch(
    st: SlackState, request: web.Request, text: str, bot_user: str | None
) -> web.StreamResponse:
    """Hand a verified request to bolt and turn its answer into ours."""
    from slack_bolt.request.async_request import AsyncBoltRequest

    # bolt reads x-slack-bolt-* headers as its own (lazy listeners): never from outside
    headers = {k: v for k, v in request.headers.items() if not k.lower().startswith("x-slack-bolt")}
    try:
        bolt_request = AsyncBoltRequest(
            body=text,
            query=request.query_string,
            headers=headers,
            context={_BOT_USER: bot_user or st.identity.get("user_id")},
        )
    except ValueError as exc:  # what bolt cannot parse (our stricter parse let it through)
        raise ApiError(400, "invalid_json", f"the request body is not valid: {exc}") from None
    answer = await st.bolt.async_dispatch(bolt_request)
    failure = bolt_request.context.get(_FAILURE)
    if failure is not None:
        raise failure  # the app's error middleware: 503 for a ledger that is down
    if answer.status == 404:  # signed, but nothing Tether handles: ack, or Slack retries
        return web.json_response({})
    if answer.status >= 400:
        raise ApiError(answer.status, "rejected", str(answer.body or "rejected by slack-bolt"))
    body = answer.body or ""
    if not body:
        return web.json_response({})
    content_type = (answer.headers.get("content-type") or ["text/plain"])[0]
    return web.Response(
        status=answer.status, text=body, content_type=content_type.split(";")[0].strip()
    )


# -- what the listeners do ---------------------------------------------------------------------


async def handle_event(
    st: SlackState, envelope: dict[str, Any], *, bot_user_id: str | None
) -> None:
    """Commit one event: a message → ``accept_message`` (dedup on ``{team}:{event_id}``).
    Returns once the ledger call returned."""
    item = event_to_inbound(envelope, bot_user_id)
    if item is None:
        return
    agent = st.settings.default_agent
    on_busy, window = st.policies.get(agent, ("enqueue", 2.0))
    await st.ledger.accept_message(
        channel=CHANNEL,
        chat_id=item.chat_id,
        thread_id=item.thread_id,
        text=item.text,
        message_id=item.message_id,
        sender=item.sender,
        payload=item.payload(),
        agent=agent,
        on_busy=on_busy,
        collect_window=window,
    )


def _shown(by: str | None) -> str:
    """Who decided, for a Slack message (a Slack user as a mention that renders their name)."""
    if not by:
        return "someone"
    if by.startswith("slack:"):
        return mention(by.removeprefix("slack:"))
    return escape(by)


async def handle_action(st: SlackState, payload: dict[str, Any]) -> None:
    """Commit one click on an approval button; tell people about it in the background."""
    click = action_to_click(payload)
    if click is None:
        return
    by = f"slack:{click.user}"
    try:
        await st.ledger.resolve_wait(click.wait_id, {"decision": click.decision}, by=by)
        decision = click.decision
    except WaitAlreadyResolved as exc:
        first = exc.resolution.get("decision") if isinstance(exc.resolution, dict) else None
        if exc.resolved_by != by or first is None:
            state = "decided" if exc.state == "resolved" else exc.state.replace("_", " ")
            text = f"Already {state} by {_shown(exc.resolved_by)}" if exc.resolved_by else None
            _tell(st, click, text or f"Already {state}.")
            if first is not None:  # the prompt may still show buttons (decided elsewhere)
                _replace_prompt(
                    st, click, f"{_VERBS.get(first, first)} by {_shown(exc.resolved_by)}"
                )
            return
        decision = first  # this person's own decision, redelivered or clicked again: repeat it
    except WaitNotFound:
        _tell(st, click, "This request no longer exists.")
        return
    except InvalidResolution as exc:
        _tell(st, click, escape(str(exc)))
        return
    _replace_prompt(st, click, f"{_VERBS.get(decision, decision)} by {mention(click.user)}")


def _tell(st: SlackState, click: SlackClick, text: str) -> None:
    if click.channel_id is None:
        return
    st.later(
        "telling the clicker",
        st.sender.post_ephemeral(click.channel_id, click.user, text, click.thread_ts),
    )


def _replace_prompt(st: SlackState, click: SlackClick, outcome: str) -> None:
    if click.channel_id is None or click.message_ts is None:
        return
    prompt = click.message_text or ""
    text = f"{prompt}\n\n{outcome}" if prompt else outcome
    st.later(
        "replacing the prompt",
        st.sender.update_message(
            click.channel_id, click.message_ts, text, decided_blocks(prompt, outcome)
        ),
    )


def setup_slack(app: web.Application) -> None:
    """Serve the endpoint when ``slack_bot_token`` and ``slack_signing_secret`` are set (the
    settings refuse one without the other, and read a blank one as unset). The bolt app is
    built when the aiohttp app starts, after ``slack_bolt`` was imported in a thread."""
    settings = app[SETTINGS_KEY]
    if settings.slack_bot_token is None or settings.slack_signing_secret is None:
        return
    st = SlackState(settings, app[LEDGER_KEY], app[CHAT_POLICIES_KEY])
    app[SLACK_KEY] = st

    async def start(_: web.Application) -> None:
        await st.start()

    async def close(_: web.Application) -> None:
        await st.close()

    app.on_startup.append(start)
    app.on_cleanup.append(close)
    app.router.add_post(PATH, events)
