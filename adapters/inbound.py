"""The canonical inbound message every channel adapter produces. Imports nothing of Tether's."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class InboundMessage(BaseModel):
    """One message from a person, in the platform-neutral shape the ledger stores."""

    channel: str = Field(description="telegram, slack, webhook or http")
    chat_id: str = Field(description="the chat (Telegram chat, Slack channel, HTTP conversation)")
    thread_id: str = Field(default="", description="a thread within the chat, if any")
    message_id: str = Field(description="the platform's id of this message (deduplication)")
    sender: str | None = None
    text: str
    reply_to: str | None = None
    attachments: list[dict[str, Any]] = Field(default_factory=list)

    def payload(self) -> dict[str, Any] | None:
        """What is kept beside the text (reply-to and attachment references)."""
        extra: dict[str, Any] = {}
        if self.reply_to:
            extra["reply_to"] = self.reply_to
        if self.attachments:
            extra["attachments"] = self.attachments
        return extra or None
