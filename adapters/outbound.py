"""What outbound delivery hands a channel, and what a channel answers.

The gateway's delivery loop (``gateway/delivery.py``) takes pending outbox rows from the ledger
and gives each to the :class:`Sender` of its channel. A sender knows its platform and nothing
about the ledger. Imports nothing of Tether's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class OutboundMessage:
    """One outbox row to deliver."""

    outbox_id: int
    channel: str
    chat_id: str
    thread_id: str
    text: str
    work_id: str | None = None
    #: set when the message asks for an approval: the wait its buttons resolve
    wait_id: str | None = None
    #: ``[{"id": "approve", "label": "Approve"}, {"id": "deny", "label": "Deny"}]``
    actions: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Delivered:
    """The platform accepted the message; ``external_id`` is its message id (for edits)."""

    external_id: str | None


class RetryLater(Exception):
    """A transient refusal (rate limit, connection refused before the request left): try again
    after ``retry_after`` seconds. Nothing was delivered."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DeliveryUnknown(Exception):
    """The request may have reached the platform (timeout after sending, 5xx): the message is
    marked ``unknown`` and is not resent blindly; an operator decides."""


class DeliveryFailed(Exception):
    """The platform refused the message for good (bad chat id, message too long, …)."""


class Sender(Protocol):
    """A channel's outbound side."""

    channel: str

    async def send(self, message: OutboundMessage) -> Delivered: ...
