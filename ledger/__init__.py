"""The work ledger: schema, migrations, the state machine and every SQL statement.

The only package that talks to the database. Imports nothing of Tether's other packages;
``gateway``, ``adapters``, ``worker`` and ``scheduler`` import it.
"""

from ledger.errors import (
    IllegalTransition,
    InvalidResolution,
    LeaseLost,
    LedgerError,
    LedgerUnavailable,
    WaitAlreadyResolved,
    WaitNotFound,
    WorkNotFound,
)
from ledger.ledger import Ledger
from ledger.records import Claim, StepRecord, StepWrite, new_id, utcnow
from ledger.states import TERMINAL, StepStatus, WorkState
from ledger.waits import WaitOutcome, WaitSpec

__all__ = [
    "TERMINAL",
    "Claim",
    "IllegalTransition",
    "InvalidResolution",
    "LeaseLost",
    "Ledger",
    "LedgerError",
    "LedgerUnavailable",
    "StepRecord",
    "StepStatus",
    "StepWrite",
    "WaitAlreadyResolved",
    "WaitNotFound",
    "WaitOutcome",
    "WaitSpec",
    "WorkNotFound",
    "WorkState",
    "new_id",
    "utcnow",
]
