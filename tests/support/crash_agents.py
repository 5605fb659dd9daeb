"""Agents for the process-level recovery tests (``tests/chaos``).

Worker subprocesses import this module (``TETHER_AGENT_MODULES=crash_agents`` with
``tests/support`` on ``PYTHONPATH``). Every step appends a line to the work item's effects file
(append mode, one ``write``, flush, ``fsync``) so the test can count how often each step's body
really ran, independently of the ledger.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from worker import Context, agent, current_step


def append_line(path: str, line: str) -> None:
    """Append ``line`` + newline durably; one short ``O_APPEND`` write is atomic."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


async def _effect(path: str, sleep: float) -> str:
    key = current_step().idempotency_key
    append_line(path, key)
    if sleep:
        # After the effect, before the result is recorded: a kill here is "mid-step".
        await asyncio.sleep(sleep)
    return key


@agent("crash_twenty")
async def crash_twenty(ctx: Context, input: dict[str, Any]) -> int:
    """``n`` steps (default 20), each appends its idempotency key then sleeps ``step_sleep``."""
    n = int(input.get("n", 20))
    sleep = float(input.get("step_sleep", 0.05))
    for i in range(1, n + 1):
        await ctx.step(f"s{i}", _effect, input["effects"], sleep)
    return n


@agent("crash_three")
async def crash_three(ctx: Context, input: dict[str, Any]) -> int:
    """Three steps, each appends its idempotency key (no sleep): the load test's agent."""
    for i in range(1, 4):
        await ctx.step(f"s{i}", _effect, input["effects"], 0.0)
    return 3


async def _slow_effect(path: str, sleep: float) -> str:
    key = current_step().idempotency_key
    append_line(path, key + ":start")
    await asyncio.sleep(sleep)
    append_line(path, key + ":end")
    return key


@agent("zombie_slow")
async def zombie_slow(ctx: Context, input: dict[str, Any]) -> str:
    """Step 2 is slow (``input["sleep"]`` seconds between its ``:start`` and ``:end`` lines),
    so a worker can be frozen in the middle of it."""
    path = input["effects"]
    await ctx.step("first", _effect, path, 0.0)
    await ctx.step("slow", _slow_effect, path, float(input["sleep"]))
    await ctx.step("last", _effect, path, 0.0)
    return "done"
