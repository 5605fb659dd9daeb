"""The plain HTTP chat channel: the console's chat box and apps post messages and read the
conversation back. Normalises a request body into an :class:`InboundMessage`.
Imports nothing of Tether's but the adapters' own modules.
"""

from __future__ import annotations

import secrets

from pydantic import BaseModel, ConfigDict, Field

from adapters.inbound import InboundMessage

CHANNEL = "http"
MAX_TEXT = 16_000


class PostedMessage(BaseModel):
    """``POST /channels/http/messages``."""

    model_config = ConfigDict(extra="forbid")

    conversation_id: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:@-]+$")
    text: str = Field(min_length=1, max_length=MAX_TEXT)
    message_id: str | None = Field(default=None, min_length=1, max_length=200)
    sender: str | None = Field(default=None, max_length=200)

    def to_inbound(self) -> InboundMessage:
        # Without a message id there is nothing to deduplicate on: each post is new.
        message_id = self.message_id or f"auto-{secrets.token_hex(12)}"
        return InboundMessage(
            channel=CHANNEL,
            chat_id=self.conversation_id,
            message_id=f"{self.conversation_id}:{message_id}",
            sender=self.sender or "http",
            text=self.text,
        )
