"""Agents for the process-level benchmarks (``bench/workers.py``).

``tether worker`` subprocesses import this module (``TETHER_AGENT_MODULES=bench_agents`` with
``bench/`` on ``PYTHONPATH``).

* ``bench_sleep``: one step that sleeps ``input["sleep"]`` seconds (a long tool call);
* ``bench_trivial3``: three trivial steps (``x + 1``), like ``bench_three`` of ``bench/run.py``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from worker import Context, agent


async def _sleep(seconds: float) -> float:
    await asyncio.sleep(seconds)
    return seconds


def _inc(x: int) -> int:
    return x + 1


@agent("bench_sleep")
async def bench_sleep(ctx: Context, input: dict[str, Any]) -> float:
    return await ctx.step("sleep", _sleep, float(input.get("sleep", 600)))


@agent("bench_trivial3")
async def bench_trivial3(ctx: Context, _input: Any) -> int:
    x = await ctx.step("a", _inc, 0)
    x = await ctx.step("b", _inc, x)
    return await ctx.step("c", _inc, x)
