"""Time-driven work: the lease reaper (and, with the waits issue, timers and cron schedules).

APScheduler 3 is only the in-process trigger; the ledger stays the source of truth and every
change is a conditional update, so any number of scheduler processes may run side by side.
Imports the ledger; never the worker or the gateway.
"""

from scheduler.service import SchedulerService

__all__ = ["SchedulerService"]
