"""The work state machine, written down once.

Every change of a work item's ``state`` in the ledger goes through :func:`check_transition`
(and the conditional ``UPDATE`` built from :data:`ALLOWED`), so an illegal move raises
:class:`~ledger.errors.IllegalTransition` and changes nothing. Imports nothing of Tether's
but :mod:`ledger.errors`.
"""

from __future__ import annotations

from enum import StrEnum

from ledger.errors import IllegalTransition


class WorkState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    WAITING = "waiting"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class StepStatus(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


Q, R, W, P = WorkState.QUEUED, WorkState.RUNNING, WorkState.WAITING, WorkState.PAUSED
S, F, C = WorkState.SUCCEEDED, WorkState.FAILED, WorkState.CANCELLED

TERMINAL: frozenset[WorkState] = frozenset({S, F, C})
ACTIVE: frozenset[WorkState] = frozenset({Q, R, W, P})

#: target state -> the states it may be reached from, and why.
ALLOWED: dict[WorkState, frozenset[WorkState]] = {
    # claimed by a worker
    R: frozenset({Q}),
    # retried after a failure, lease expired, released at shutdown, woken, resumed, operator retry
    Q: frozenset({R, W, P, F, C}),
    W: frozenset({R, P}),
    P: frozenset({Q, R, W}),
    S: frozenset({R}),
    F: frozenset({R, W, Q}),
    C: frozenset({Q, R, W, P}),
}


def allowed_sources(target: WorkState) -> frozenset[WorkState]:
    """The states from which ``target`` may be entered."""
    return ALLOWED[target]


def check_transition(work_id: str, current: WorkState | str, target: WorkState) -> None:
    """Raise :class:`IllegalTransition` unless ``current -> target`` is in the table."""
    if WorkState(current) not in ALLOWED[target]:
        raise IllegalTransition(work_id, str(current), str(target))
