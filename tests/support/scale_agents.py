"""The agent of the scale-out chaos test (``tests/chaos/test_scale_out.py``).

Worker subprocesses import this module (``TETHER_AGENT_MODULES=scale_agents`` with
``tests/support`` on ``PYTHONPATH``). Every chat message starts one ``scale`` work item; each
command runs one *effect* step first, which appends ``<idempotency key> <time.time()> <pid>`` to
the file named by ``SCALE_EFFECTS_FILE`` (one short ``O_APPEND`` write), so the test can see how
often, and when, each step's body really ran, independently of the ledger.

Commands (``<tag>`` names the message, e.g. ``t17-4``; every reply carries it, so a reply's text
is unique in its conversation):

* ``echo <tag>`` → ``echo <tag>``;
* ``/approve <tag>`` → an approval prompt ``Approve <tag>?`` (buttons), then ``Approved: <tag>``
  or ``Denied: <tag>``;
* ``/hook <tag>`` → ``hook <tag> ready``, then waits for the signal ``scale`` with key
  ``<tag>`` (a signed webhook) and replies ``hook <tag> got <data.n>``;
* ``/remind <tag>`` → ``remind <tag> set``, a durable 1-second sleep, ``remind <tag> fired``.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from typing import Any

from worker import Context, agent, current_step

EFFECTS_ENV = "SCALE_EFFECTS_FILE"
SIGNAL = "scale"
APPROVAL_TIMEOUT = timedelta(hours=1)


def append_line(path: str, line: str) -> None:
    """Append ``line`` + newline; one short ``O_APPEND`` write is atomic, and once ``write``
    returned the line survives a SIGKILL of this process (no ``fsync``: the machine does not
    crash here, and a slow disk must not stretch the step)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def effect(tag: str) -> str:
    """The side effect: ``<key> <time> <pid>`` appended to the effects file."""
    key = current_step().idempotency_key
    append_line(os.environ[EFFECTS_ENV], f"{key} {time.time():.6f} {os.getpid()}")
    return key


def expected_replies(text: str, n: int | None = None) -> list[str]:
    """What the agent answers to ``text`` (the approval is approved; ``n`` is the hook's
    signal number). The test's checker and load generator use this."""
    command, _, tag = text.partition(" ")
    if command == "echo":
        return [f"echo {tag}"]
    if command == "/approve":
        return [f"Approve {tag}?", f"Approved: {tag}"]
    if command == "/hook":
        return [f"hook {tag} ready", f"hook {tag} got {n}"]
    if command == "/remind":
        return [f"remind {tag} set", f"remind {tag} fired"]
    raise ValueError(f"unknown command {text!r}")


@agent("scale")
async def scale(ctx: Context, input: Any) -> str:
    text = str(input.get("text", "") if isinstance(input, dict) else input).strip()
    command, _, tag = text.partition(" ")
    await ctx.step("effect", effect, tag)
    if command == "/approve":
        decision = await ctx.wait_for_approval(
            f"Approve {tag}?", timeout=APPROVAL_TIMEOUT, on_timeout="continue"
        )
        verb = "Timed out" if decision.timed_out else "Approved" if decision.approved else "Denied"
        await ctx.reply(f"{verb}: {tag}")
    elif command == "/hook":
        await ctx.reply(f"hook {tag} ready")
        data = await ctx.wait_for_signal(SIGNAL, key=tag)
        n = (data or {}).get("data", {}).get("n") if isinstance(data, dict) else None
        await ctx.reply(f"hook {tag} got {n}")
    elif command == "/remind":
        await ctx.reply(f"remind {tag} set")
        await ctx.sleep(timedelta(seconds=1))
        await ctx.reply(f"remind {tag} fired")
    else:
        await ctx.reply(f"echo {tag}")
    return tag
