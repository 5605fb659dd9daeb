"""Agents for the durability-mode crash tests (``tests/chaos/test_durability_modes.py``).

Worker subprocesses import this module (``TETHER_AGENT_MODULES=durability_agents``). Every step
body appends a line to the item's effects file (one ``O_APPEND`` write, fsync'd), so the test
can count how often each body really ran, independently of the ledger: ``pure:<key>`` for pure
steps, ``effect:<key>`` for ``side_effect=True`` steps. ``sync_witness`` also appends
``returned:<key>`` right after a step returned, to prove the record was durable by then.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from crash_agents import append_line

from worker import Context, agent, current_step


async def _pure(path: str, i: int, sleep: float) -> int:
    append_line(path, f"pure:{current_step().idempotency_key}")
    if sleep:
        await asyncio.sleep(sleep)
    return i * i


def _effect(path: str) -> str:
    key = current_step().idempotency_key
    append_line(path, f"effect:{key}")
    return key


async def _mixed(ctx: Context, input: dict[str, Any]) -> dict[str, Any]:
    """``n`` pure steps, a side effect, a reply, ``n`` more pure steps, another side effect,
    a second reply. The result depends on every step's output. Input ``{effects, n, sleep}``,
    or a chat message whose text is that JSON."""
    if "effects" not in input:  # a chat message: its text is the JSON configuration
        input = json.loads(input["text"])
    path, n, sleep = input["effects"], int(input.get("n", 10)), float(input.get("sleep", 0.02))
    total = 0
    for i in range(n):
        total += await ctx.step(f"a{i}", _pure, path, i, sleep)
    charged = await ctx.step("charge", _effect, path, side_effect=True)
    await ctx.reply(f"charged {charged}")
    for i in range(n, 2 * n):
        total += await ctx.step(f"b{i}", _pure, path, i, sleep)
    notified = await ctx.step("notify", _effect, path, side_effect=True)
    await ctx.reply(f"total {total}")
    return {"total": total, "charged": charged, "notified": notified}


@agent("mixed_batched", durability="batched")
async def mixed_batched(ctx: Context, input: dict[str, Any]) -> dict[str, Any]:
    return await _mixed(ctx, input)


@agent("mixed_exit", durability="exit")
async def mixed_exit(ctx: Context, input: dict[str, Any]) -> dict[str, Any]:
    return await _mixed(ctx, input)


@agent("mixed_sync")
async def mixed_sync(ctx: Context, input: dict[str, Any]) -> dict[str, Any]:
    return await _mixed(ctx, input)


def _quick(i: int) -> int:
    return i


@agent("sync_witness")
async def sync_witness(ctx: Context, input: dict[str, Any]) -> int:
    """``n`` quick sync steps; after each returns, ``returned:<work_id>:<seq>`` is appended."""
    path, n = input["effects"], int(input.get("n", 200))
    for i in range(1, n + 1):
        await ctx.step(f"s{i}", _quick, i)
        append_line(path, f"returned:{ctx.work_id}:{i}")
    return n
