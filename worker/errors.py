"""Errors agent code and operators see from the workflow runtime. Imports only ledger."""

from __future__ import annotations

from typing import Any

from ledger import LeaseLost


class WorkflowError(Exception):
    """Base of the runtime's own errors."""


class NonDeterminismError(WorkflowError):
    """On replay, the code asked for a different step than the one recorded at that position."""

    def __init__(self, work_id: str, seq: int, recorded: str, requested: str) -> None:
        super().__init__(
            f"work {work_id}: step {seq} was recorded as {recorded!r} but the code now runs "
            f"{requested!r}; the agent's step order changed while this work was in flight "
            "(guard the change with ctx.patched(...))"
        )
        self.seq = seq
        self.recorded = recorded
        self.requested = requested


class StepFailed(WorkflowError):
    """A step failed on its last allowed attempt."""

    def __init__(self, name: str, seq: int, attempts: int, cause: BaseException) -> None:
        super().__init__(
            f"step {seq} {name!r} failed after {attempts} attempt(s): "
            f"{type(cause).__name__}: {cause}"
        )
        self.name = name
        self.seq = seq
        self.attempts = attempts


class HeartbeatTimeout(WorkflowError):
    """A step stayed silent (no ``heartbeat()``) longer than its ``heartbeat_timeout``."""


class StepTimeout(WorkflowError):
    """A step attempt ran longer than its ``timeout``."""


class StepResultNotSerializable(WorkflowError):
    """A step returned a value that cannot be stored as JSON."""


class UnknownAgent(WorkflowError):
    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"no agent named {name!r} is registered (known: {', '.join(known)})")


class ChildFailed(WorkflowError):
    """A joined child work item did not succeed."""

    def __init__(self, child_id: str, state: str, error: Any) -> None:
        msg = error.get("message") if isinstance(error, dict) else error
        super().__init__(f"child work {child_id} ended {state}: {msg}")
        self.child_id = child_id
        self.state = state
        self.error = error


class WorkInterrupted(BaseException):
    """Raised at a step boundary when an operator paused or cancelled the running item.

    A ``BaseException`` so that ``except Exception`` in agent code does not swallow it.
    """

    def __init__(self, control: str) -> None:
        super().__init__(control)
        self.control = control


class Suspended(BaseException):
    """The work item is now waiting in the ledger; its function stops here and runs again from
    the top when the wait is resolved."""


__all__ = [
    "ChildFailed",
    "HeartbeatTimeout",
    "LeaseLost",
    "NonDeterminismError",
    "StepFailed",
    "StepResultNotSerializable",
    "StepTimeout",
    "Suspended",
    "UnknownAgent",
    "WaitTimeout",
    "WorkInterrupted",
    "WorkflowError",
]


class WaitTimeout(WorkflowError):
    """A wait reached its deadline with ``on_timeout="fail"``."""
