"""An agent that keeps its worker slot busy, for the gateway resilience tests and the
inbound benchmark (``TETHER_AGENT_MODULES=stuck_agents`` with ``tests/support`` on
``PYTHONPATH``).

``stuck``: one step that sleeps ``input["sleep"]`` seconds (default 10), then returns.
"""

from __future__ import annotations

import asyncio
from typing import Any

from worker import Context, agent

STUCK_SECONDS = 10.0


async def _sleep(seconds: float) -> float:
    await asyncio.sleep(seconds)
    return seconds


@agent("stuck")
async def stuck(ctx: Context, input: dict[str, Any]) -> float:
    """One step stuck for ``input["sleep"]`` seconds (default :data:`STUCK_SECONDS`)."""
    seconds = float(input.get("sleep", STUCK_SECONDS)) if isinstance(input, dict) else STUCK_SECONDS
    return await ctx.step("stuck", _sleep, seconds)
