"""Errors the ledger raises. Imports nothing of Tether's."""

from __future__ import annotations


class LedgerError(Exception):
    """Base class of every error the ledger raises on purpose."""

    code = "ledger_error"


class WorkNotFound(LedgerError):
    code = "not_found"

    def __init__(self, work_id: str) -> None:
        super().__init__(f"no work item with id {work_id!r}")
        self.work_id = work_id


class IllegalTransition(LedgerError):
    """A state change the state machine does not allow; nothing was written."""

    code = "illegal_transition"

    def __init__(self, work_id: str, current: str, target: str, reason: str = "") -> None:
        why = f": {reason}" if reason else ""
        super().__init__(f"work {work_id} is {current}; it cannot become {target}{why}")
        self.work_id = work_id
        self.current = current
        self.target = target


class LeaseLost(LedgerError):
    """The worker's lease on a work item is gone (expired and re-claimed, or the item was
    paused or cancelled); the write it attempted did not land."""

    code = "lease_lost"

    def __init__(self, work_id: str, epoch: int, detail: str = "") -> None:
        extra = f" ({detail})" if detail else ""
        super().__init__(f"lease on work {work_id} at epoch {epoch} is lost{extra}")
        self.work_id = work_id
        self.epoch = epoch


class LedgerUnavailable(LedgerError):
    """The database could not be reached; callers answer 503 and retry later."""

    code = "ledger_unavailable"


class WaitNotFound(LedgerError):
    code = "not_found"

    def __init__(self, what: str) -> None:
        super().__init__(f"no wait {what}")


class WaitAlreadyResolved(LedgerError):
    """The wait was decided before; the first decision stands and nothing was written."""

    code = "already_resolved"

    def __init__(self, wait_id: str, state: str, resolution: object, resolved_by: str | None):
        by = f" by {resolved_by}" if resolved_by else ""
        super().__init__(f"wait {wait_id} is already {state}{by}")
        self.wait_id = wait_id
        self.state = state
        self.resolution = resolution
        self.resolved_by = resolved_by


class InvalidResolution(LedgerError):
    """The payload does not fit the wait (wrong shape, or not valid for its schema)."""

    code = "invalid_resolution"
