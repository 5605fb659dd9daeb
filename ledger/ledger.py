"""The work ledger: the one class through which Tether reads and writes its database.

Its parts live beside it, one concern each: :mod:`ledger.work` (creation, claims, leases,
worker-side transitions), :mod:`ledger.steps` (fenced step records), :mod:`ledger.waits`
(durable waits), :mod:`ledger.conversations` (chat messages in and out),
:mod:`ledger.control` (operator actions), :mod:`ledger.maintenance`
(worker rows, retention) and :mod:`ledger.usage` (model-call spend and totals). Every state
change is a conditional ``UPDATE`` built from :mod:`ledger.states`; the database's history
triggers append the matching ``event`` in the same transaction.
"""

from __future__ import annotations

from ledger.channel_state import ChannelStateQueries
from ledger.control import ControlQueries
from ledger.conversations import ConversationQueries
from ledger.maintenance import MaintenanceQueries
from ledger.observability import ObservabilityQueries
from ledger.outbox import OutboxQueries
from ledger.steps import StepQueries
from ledger.usage import UsageQueries
from ledger.waits import WaitQueries
from ledger.work import WorkQueries


class Ledger(
    WorkQueries,
    StepQueries,
    WaitQueries,
    ConversationQueries,
    ControlQueries,
    MaintenanceQueries,
    ObservabilityQueries,
    OutboxQueries,
    ChannelStateQueries,
    UsageQueries,
):
    """Async access to the work ledger. One instance per process; safe to share between tasks."""
