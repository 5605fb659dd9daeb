"""Group commit of step records for one worker process.

Every finished step attempt of every work item this process runs goes through one
:class:`StepCommitter`. Records that are queued at the same moment share one transaction
(:meth:`ledger.Ledger.record_steps`), so several items committing at once pay for one commit,
not one each, and nobody is told a record is durable before its transaction committed:

* ``commit()`` (durability ``sync``): returns once the record is durable. When one item is
  stepping alone (nothing queued, nothing in flight, and the last transaction held only this
  item's records) it commits at once on the caller's task (no hand-off); otherwise it joins
  the queue and the next transaction takes it along with everything else queued, so items
  stepping at the same time keep sharing transactions.
* ``submit()`` (durability ``batched``): queues the record and returns a future at once; the
  queue is committed at the latest ``max_delay`` seconds after its oldest record, or as soon
  as it holds ``max_records``, or when someone needs it now (``kick()``, a ``sync`` record).

Records of one work item always commit in the order they were queued. Imports only the ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from ledger import Claim, Ledger, StepWrite

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Queued:
    claim: Claim
    write: StepWrite
    future: asyncio.Future[None]
    urgent: bool


@dataclass
class CommitStats:
    """What the committer did (for benchmarks and tests)."""

    transactions: int = 0
    records: int = 0
    largest: int = 0


class StepCommitter:
    """Commits step records for all work items of this process, in shared transactions."""

    def __init__(self, ledger: Ledger, *, max_delay: float = 0.005, max_records: int = 500) -> None:
        if max_delay < 0:
            raise ValueError("max_delay must not be negative")
        if max_records < 1:
            raise ValueError("max_records must be at least 1")
        self.ledger = ledger
        self.max_delay = max_delay
        self.max_records = max_records
        self.stats = CommitStats()
        self._queue: list[_Queued] = []
        self._urgent = 0
        self._first_at = 0.0
        self._busy = False
        #: the work item of the last record committed when it was the only one in its
        #: transaction, else None: a lone item commits on its own task; several items
        #: stepping at once go through the queue and share transactions
        self._last_work: str | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    # -- callers -----------------------------------------------------------------------------

    async def commit(self, claim: Claim, write: StepWrite) -> None:
        """Make ``write`` durable before returning (``sync``). Raises what the ledger refused
        it with (:class:`ledger.LeaseLost`, :class:`ledger.IllegalTransition`) or the error
        of the transaction it was part of."""
        if not self._busy and not self._queue and self._last_work == claim.work_id:
            self._busy = True
            try:
                [outcome] = await self.ledger.record_steps([(claim, write)])
            finally:
                self._busy = False
                self._count(1)
                if self._queue:
                    self._wake.set()
            if outcome is not None:
                raise outcome
            return
        await self.submit(claim, write, urgent=True)

    def submit(
        self, claim: Claim, write: StepWrite, *, urgent: bool = False
    ) -> asyncio.Future[None]:
        """Queue ``write``; the returned future resolves when it is durable (or fails with what
        refused it). ``urgent`` commits the queue without waiting for ``max_delay``."""
        if self._closed:
            raise RuntimeError("the step committer is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        # An item that ends without flushing (its lease was lost) never awaits its future.
        future.add_done_callback(_consume)
        if not self._queue:
            self._first_at = loop.time()
        self._queue.append(_Queued(claim, write, future, urgent))
        if urgent:
            self._urgent += 1
        if urgent or len(self._queue) >= self.max_records or self.max_delay == 0:
            self._wake.set()
        elif len(self._queue) == 1:
            self._wake.set()  # the loop starts the clock for the oldest record
        self._ensure_running()
        return future

    def kick(self) -> None:
        """Commit what is queued now rather than at its deadline (a flush is waiting)."""
        if self._queue:
            self._urgent += 1
            self._wake.set()

    async def close(self) -> None:
        """Commit what is queued, then stop."""
        self._closed = True
        if self._task is not None:
            self.kick()
            self._wake.set()
            while self._queue or self._busy:
                await asyncio.sleep(0.001)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # -- the loop ----------------------------------------------------------------------------

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="step-committer")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue or self._busy:
                self._wake.clear()
                await self._wake.wait()
                continue
            if not self._urgent and len(self._queue) < self.max_records:
                delay = self._first_at + self.max_delay - loop.time()
                if delay > 0:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), delay)
                    continue
            batch = self._queue[: self.max_records]
            del self._queue[: self.max_records]
            self._urgent = sum(1 for q in self._queue if q.urgent)
            self._first_at = loop.time()
            self._busy = True
            try:
                await self._commit(batch)
            finally:
                self._busy = False

    async def _commit(self, batch: list[_Queued]) -> None:
        try:
            outcomes = await self.ledger.record_steps([(q.claim, q.write) for q in batch])
        except asyncio.CancelledError:
            for q in batch:
                if not q.future.done():
                    q.future.cancel()
            raise
        except Exception as exc:
            log.warning("group commit of %d step record(s) failed: %s", len(batch), exc)
            for q in batch:
                if not q.future.done():
                    q.future.set_exception(exc)
            return
        self._count(len(batch))
        first = batch[0].claim.work_id
        self._last_work = first if all(q.claim.work_id == first for q in batch) else None
        for q, outcome in zip(batch, outcomes, strict=True):
            if q.future.done():
                continue
            if outcome is None:
                q.future.set_result(None)
            else:
                q.future.set_exception(outcome)

    def _count(self, n: int) -> None:
        s = self.stats
        s.transactions += 1
        s.records += n
        s.largest = max(s.largest, n)


def _consume(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()
