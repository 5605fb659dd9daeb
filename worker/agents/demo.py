"""The demo agent: a few durable steps over its input, to try ``tether serve`` with."""

from __future__ import annotations

import asyncio
import platform
from typing import Any

from worker import Context, agent, current_step


async def _think(text: str) -> dict[str, Any]:
    await asyncio.sleep(0.05)
    words = text.split()
    return {"words": len(words), "longest": max(words, key=len) if words else ""}


def _compose(text: str, analysis: dict[str, Any]) -> str:
    key = current_step().idempotency_key
    return (
        f"You said {text!r}: {analysis['words']} word(s), the longest is "
        f"{analysis['longest']!r}. (step {key} on {platform.node()})"
    )


@agent("demo")
async def demo(ctx: Context, input: Any) -> dict[str, Any]:
    """Echo a message back after two checkpointed steps.

    Input: ``{"text": "..."}`` or a plain string.
    """
    text = input.get("text", "") if isinstance(input, dict) else str(input or "")
    analysis = await ctx.step("analyse", _think, text)
    reply = await ctx.step("compose", _compose, text, analysis)
    return {"reply": reply, "analysis": analysis}
