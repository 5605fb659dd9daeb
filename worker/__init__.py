"""The worker: the agent registry, the durable ``Context`` agents use, and the worker pool.

Agent code imports from here (``from worker import agent, Context, current_step``). Imports the
ledger; never the gateway or adapters.
"""

from worker.context import ChildHandle, Context, StepHandle, current_step
from worker.errors import (
    ChildFailed,
    HeartbeatTimeout,
    LeaseLost,
    NonDeterminismError,
    StepFailed,
    StepResultNotSerializable,
    StepTimeout,
    UnknownAgent,
    WaitTimeout,
    WorkInterrupted,
)
from worker.pool import WorkerPool
from worker.registry import agent, get_agent, load_agent_modules, registered_agents
from worker.retry import RetryPolicy
from worker.waiting import Decision

__all__ = [
    "ChildFailed",
    "ChildHandle",
    "Context",
    "Decision",
    "HeartbeatTimeout",
    "LeaseLost",
    "NonDeterminismError",
    "RetryPolicy",
    "StepFailed",
    "StepHandle",
    "StepResultNotSerializable",
    "StepTimeout",
    "UnknownAgent",
    "WaitTimeout",
    "WorkInterrupted",
    "WorkerPool",
    "agent",
    "current_step",
    "get_agent",
    "load_agent_modules",
    "registered_agents",
]
