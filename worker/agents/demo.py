"""The demo agent (``demo``, the default of ``tether serve``): every primitive, no credentials.

Commands, as a chat message (or ``{"text": ...}`` as work input):

* ``/remind <N>s <text>`` — replies ``Reminder set for <N>s.``, sleeps durably, replies ``<text>``;
* ``/approve <action>`` — asks ``Approve <action>?``; replies ``Approved: <action>`` or
  ``Denied: <action>``; after 10 minutes without a decision, ``Timed out: <action>``;
* ``/ask`` — asks ``How many?`` expecting an integer; replies ``Got <n>.``;
* ``/webhook`` — replies with a resume URL; when it is called with JSON, replies
  ``Resumed with <json>``;
* ``/work <N>`` — a step of N seconds that heartbeats every second; replies ``Done after <N>s.``;
* anything else — replies ``You said: <text>``.
"""

from __future__ import annotations

import asyncio
import json
import re
from datetime import timedelta
from typing import Any

from worker import Context, agent, current_step

APPROVAL_TIMEOUT = timedelta(minutes=10)
_REMIND = re.compile(r"^/remind\s+(\d+)s\s+(.+)$", re.DOTALL)
_WORK = re.compile(r"^/work\s+(\d+)$")


async def _busy_for(seconds: int) -> int:
    """A long step that tells Tether it is alive every second."""
    step = current_step()
    for done in range(seconds):
        step.heartbeat({"done": done, "of": seconds})
        await asyncio.sleep(1)
    step.heartbeat({"done": seconds, "of": seconds})
    return seconds


def _text_of(input: Any) -> str:
    if isinstance(input, dict):
        return str(input.get("text", "")).strip()
    return str(input or "").strip()


@agent("demo")
async def demo(ctx: Context, input: Any) -> dict[str, Any]:
    """Answer one chat message (see the module docstring)."""
    text = _text_of(input)
    said: list[str] = []

    async def say(line: str) -> None:
        said.append(line)
        await ctx.reply(line)

    if m := _REMIND.match(text):
        seconds, reminder = int(m.group(1)), m.group(2).strip()
        await say(f"Reminder set for {seconds}s.")
        await ctx.sleep(timedelta(seconds=seconds))
        await say(reminder)
    elif text.startswith("/approve"):
        action = text.removeprefix("/approve").strip() or "this"
        decision = await ctx.wait_for_approval(
            f"Approve {action}?", timeout=APPROVAL_TIMEOUT, on_timeout="continue"
        )
        if decision.timed_out:
            await say(f"Timed out: {action}")
        elif decision.approved:
            await say(f"Approved: {action}")
        else:
            await say(f"Denied: {action}")
    elif text == "/ask":
        n = await ctx.wait_for_input("How many?", schema=int)
        await say(f"Got {n}.")
    elif text == "/webhook":
        url = await ctx.resume_url("webhook")
        await say(f"POST JSON to {url} to resume me.")
        data = await ctx.wait_for_signal("webhook")
        await say(f"Resumed with {json.dumps(data)}")
    elif m := _WORK.match(text):
        seconds = await ctx.step("work", _busy_for, int(m.group(1)), heartbeat_timeout=5)
        await say(f"Done after {seconds}s.")
    else:
        await say(f"You said: {text}")
    return {"replies": said}
