"""The outbound delivery loop: pending outbox rows → each channel's :class:`Sender`.

Every outbound message was recorded in the outbox before anything is sent. The loop claims due
rows (``pending`` → ``sending``; at most one per conversation, so one conversation's messages
go out strictly in order while different conversations go out in parallel), hands each to its
channel's sender and records the answer:

* :class:`Delivered` → ``sent`` with the platform's message id;
* :class:`RetryLater` → ``pending`` again, due after exactly its ``retry_after``;
* :class:`DeliveryUnknown` or a send that outlives ``send_timeout`` → ``unknown`` (never resent
  blindly; an operator re-sends or abandons it);
* :class:`DeliveryFailed` → ``failed``;
* any other exception → ``pending`` again with a doubling backoff (at most 5 minutes), logged.

Rows of a channel without a sender stay ``pending``. A row left ``sending`` by a process that
died mid-send is turned ``unknown`` by :meth:`Ledger.reap_outbox`, which the loop runs
periodically.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import socket
from typing import Any

from adapters.outbound import (
    Delivered,
    DeliveryFailed,
    DeliveryUnknown,
    OutboundMessage,
    RetryLater,
    Sender,
)

log = logging.getLogger("tether.delivery")

#: cap of the backoff after unexpected send errors, seconds
MAX_BACKOFF = 300.0
#: attempts to record one outcome while the ledger is unreachable
_MARK_TRIES = 5


def backoff(attempts: int, base: float = 1.0) -> float:
    """Seconds before the next try after ``attempts`` failed ones: 1, 2, 4, … capped."""
    return min(MAX_BACKOFF, base * 2 ** max(0, min(attempts - 1, 30)))


def senders_from_settings(settings: Any) -> dict[str, Sender]:
    """The senders of the configured channels. Telegram: when ``telegram_token`` is set and
    :mod:`adapters.telegram` offers ``build_sender(settings)``. Slack: when
    ``slack_bot_token`` is set."""
    senders: dict[str, Sender] = {}
    if getattr(settings, "telegram_token", None):
        try:
            module = importlib.import_module("adapters.telegram")
        except ImportError:
            log.warning("TETHER_TELEGRAM_TOKEN is set but the Telegram adapter is not available")
        else:
            build = getattr(module, "build_sender", None)
            if build is None:
                log.warning("adapters.telegram offers no build_sender(); Telegram replies wait")
            else:
                sender = build(settings)
                senders[getattr(sender, "channel", "telegram")] = sender
    if getattr(settings, "slack_bot_token", None):
        from adapters.slack import build_sender as build_slack  # slack_sdk is imported lazily

        slack = build_slack(settings)
        senders[slack.channel] = slack
    return senders


class DeliveryLoop:
    """Delivers the outbox through ``senders`` (channel name → sender) until :meth:`stop`."""

    def __init__(
        self,
        ledger: Any,
        senders: dict[str, Sender],
        *,
        concurrency: int = 8,
        poll_interval: float = 0.5,
        lease_ttl: float = 60.0,
        send_timeout: float | None = None,
        reap_interval: float | None = None,
        owner: str | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.ledger = ledger
        self.senders = dict(senders)
        self.concurrency = concurrency
        self.poll_interval = poll_interval
        self.lease_ttl = lease_ttl
        #: a send must answer well within the claim's deadline, or it is reaped as unknown
        self.send_timeout = send_timeout if send_timeout is not None else lease_ttl / 2
        self.reap_interval = (
            reap_interval if reap_interval is not None else max(poll_interval, lease_ttl / 4)
        )
        self.owner = owner or f"delivery:{socket.gethostname()}:{os.getpid()}"
        self._stopping = False
        self._wake = asyncio.Event()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._warned_channels: set[str] = set()

    # -- control -----------------------------------------------------------------------------

    def wake(self, *_: Any) -> None:
        """Look for due rows now (e.g. after a new outbox row was written in this process)."""
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        """Claim and deliver until stopped; then let the sends in flight finish (a send cut
        short leaves its row ``sending``, reaped later as ``unknown``)."""
        loop = asyncio.get_running_loop()
        next_reap = 0.0
        for sender in self.senders.values():  # e.g. load a slow client library off the loop
            warm = getattr(sender, "warm", None)
            if warm is not None:
                await warm()
        try:
            while not self._stopping:
                if loop.time() >= next_reap:
                    next_reap = loop.time() + self.reap_interval
                    await self._housekeeping()
                self._wake.clear()
                claimed = await self._claim()
                for row in claimed:
                    task = asyncio.create_task(self._deliver(row))
                    self._in_flight.add(task)
                    task.add_done_callback(self._in_flight.discard)
                if claimed and len(self._in_flight) < self.concurrency:
                    continue  # more may be due right away
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_interval)
        finally:
            if self._in_flight:
                _, pending = await asyncio.wait(set(self._in_flight), timeout=self.send_timeout)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
            for sender in self.senders.values():
                close = getattr(sender, "close", None)
                if close is not None:
                    with contextlib.suppress(Exception):
                        await close()

    # -- one round ---------------------------------------------------------------------------

    async def _claim(self) -> list[Any]:
        free = self.concurrency - len(self._in_flight)
        if free <= 0 or not self.senders:
            return []
        try:
            return await self.ledger.claim_outbox(
                self.owner, limit=free, lease_ttl=self.lease_ttl, channels=list(self.senders)
            )
        except Exception:
            log.exception("cannot claim outbound messages (retrying)")
            return []

    async def _housekeeping(self) -> None:
        try:
            reaped = await self.ledger.reap_outbox()
            if reaped:
                log.warning(
                    "outbound messages %s were interrupted mid-send: marked unknown", reaped
                )
            for channel in await self.ledger.pending_outbox_channels():
                if channel not in self.senders and channel not in self._warned_channels:
                    self._warned_channels.add(channel)
                    log.warning(
                        "outbound messages for channel %r wait: no sender is configured", channel
                    )
        except Exception:
            log.exception("outbox housekeeping failed (retrying)")

    async def _deliver(self, row: Any) -> None:
        sender = self.senders[row.channel]
        message = OutboundMessage(
            outbox_id=row.outbox_id,
            channel=row.channel,
            chat_id=row.chat_id,
            thread_id=row.thread_id,
            text=row.text,
            work_id=row.work_id,
            wait_id=row.wait_id,
            actions=list(row.actions),
        )
        mark: str
        args: tuple[Any, ...]
        try:
            result = await asyncio.wait_for(sender.send(message), self.send_timeout)
        except RetryLater as exc:
            mark, args = "retry", (max(0.0, float(exc.retry_after)), _describe(exc))
        except DeliveryUnknown as exc:
            mark, args = "unknown", (_describe(exc),)
        except TimeoutError:
            mark, args = "unknown", (f"no answer within {self.send_timeout:g} s",)
        except DeliveryFailed as exc:
            mark, args = "failed", (_describe(exc),)
        except asyncio.CancelledError:
            raise  # shutting down mid-send: the row stays sending, reaped as unknown later
        except Exception as exc:
            log.exception("sending outbound message %s failed unexpectedly", row.outbox_id)
            mark, args = "retry", (backoff(row.attempts), _describe(exc))
        else:
            external = result.external_id if isinstance(result, Delivered) else None
            mark, args = "sent", (external,)
        if mark != "sent":
            log.info("outbound message %s: %s (%s)", row.outbox_id, mark, args[-1])
        await self._record(mark, row, args)
        self._wake.set()  # the conversation's next message may be due now

    async def _record(self, mark: str, row: Any, args: tuple[Any, ...]) -> None:
        method = getattr(self.ledger, f"mark_outbox_{mark}")
        for attempt in range(_MARK_TRIES):
            try:
                await method(row.outbox_id, *args, attempt=row.attempts)
                return
            except Exception:
                if attempt == _MARK_TRIES - 1:
                    log.exception(
                        "cannot record outbound message %s as %s; it will be reaped as unknown",
                        row.outbox_id,
                        mark,
                    )
                    return
                await asyncio.sleep(min(5.0, 0.2 * 2**attempt))


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


__all__ = ["MAX_BACKOFF", "DeliveryLoop", "backoff", "senders_from_settings"]
