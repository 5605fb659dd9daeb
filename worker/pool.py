"""The worker pool: claims work, runs agents under fenced leases, keeps three liveness signals.

* worker liveness: the ``worker`` row's ``last_seen_at``, refreshed with every renewal;
* work liveness: all held leases are renewed in one statement every ``lease_ttl / 3`` seconds;
* step liveness: ``heartbeat()`` inside a step (see :mod:`worker.context`).

A lease the renewal no longer finds is lost: its task is cancelled and nothing it would write
can land (every write is fenced on the epoch). Wakes on PostgreSQL ``NOTIFY``, on in-process
commits, or by polling. On stop it finishes what it holds within a grace period, then releases
the rest back to the queue. Imports ledger and the worker's own modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from dataclasses import dataclass, field
from datetime import timedelta

from pydantic_core import PydanticSerializationError

from ledger import Claim, LeaseLost, Ledger, new_id, utcnow
from worker.commits import StepCommitter
from worker.context import Context, current_work_id, error_info, to_json_data
from worker.errors import NonDeterminismError, Suspended, UnknownAgent, WorkInterrupted
from worker.model_calls import ModelRuntime
from worker.registry import get_agent, registered_agents

log = logging.getLogger(__name__)


@dataclass
class _Running:
    claim: Claim
    task: asyncio.Task[None]
    ctx: Context | None = None
    #: a pause/cancel request seen before the Context existed
    control: str | None = None
    #: the run is writing its own final transition (the renewal must not call that a loss)
    settling: bool = False

    @property
    def letting_go(self) -> bool:
        return self.settling or (self.ctx is not None and self.ctx.parking)


@dataclass
class WorkerPool:
    """Runs up to ``concurrency`` work items at once in this process."""

    ledger: Ledger
    concurrency: int = 8
    lease_ttl: float = 30.0
    poll_interval: float = 1.0
    shutdown_grace: float = 10.0
    agents: frozenset[str] | None = None
    #: base of the resume URLs agents hand out (``TETHER_PUBLIC_URL``)
    public_url: str = "http://127.0.0.1:8080"
    #: the model endpoint, prices and budgets for ``ctx.model_call`` (None: from the settings)
    models: ModelRuntime | None = None
    #: group commit: the longest a ``batched`` step record waits, and the most records per
    #: transaction (``TETHER_GROUP_COMMIT_MS``, ``TETHER_GROUP_COMMIT_MAX``)
    group_commit_ms: float = 5.0
    group_commit_max: int = 500
    worker_id: str = field(
        default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{new_id()[-8:]}"
    )

    def __post_init__(self) -> None:
        self._running: dict[str, _Running] = {}
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._slot_free = asyncio.Event()
        self.completed = 0
        self.committer = StepCommitter(
            self.ledger, max_delay=self.group_commit_ms / 1000, max_records=self.group_commit_max
        )

    # -- public ------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the pool to stop claiming and wind down (safe from a signal handler)."""
        self._stopping.set()
        self._wake.set()

    async def run(self) -> None:
        """Claim and run work until :meth:`stop`; then finish or release what is held."""
        agents = self.agents if self.agents is not None else registered_agents()
        if not agents:
            raise RuntimeError("no agents are registered; nothing to run")
        await self.ledger.register_worker(
            self.worker_id, host=socket.gethostname(), pid=os.getpid(), concurrency=self.concurrency
        )
        self.ledger.on_work_queued(self._on_queued)
        self.ledger.on_control(self._on_control)
        await self.ledger.listen()
        renewer = asyncio.create_task(self._renew_loop(), name="tether-lease-renewal")
        log.info(
            "worker %s running %d slot(s) for agents %s",
            self.worker_id,
            self.concurrency,
            ", ".join(sorted(agents)),
        )
        try:
            await self._claim_loop(sorted(agents))
        finally:
            await self._wind_down()
            with contextlib.suppress(Exception):
                await self.committer.close()
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            with contextlib.suppress(Exception):
                await self.ledger.stop_worker(self.worker_id)
            log.info("worker %s stopped", self.worker_id)

    # -- claiming ----------------------------------------------------------------------------

    def _on_queued(self, _payload: str) -> None:
        self._wake.set()

    def _on_control(self, work_id: str) -> None:
        # The renewal reads the request (and a lost lease) for every held item.
        if not work_id or work_id in self._running:
            asyncio.get_running_loop().create_task(self._renew_once())

    async def _claim_loop(self, agents: list[str]) -> None:
        backoff = self.poll_interval
        while not self._stopping.is_set():
            free = self.concurrency - len(self._running)
            if free <= 0:
                self._slot_free.clear()
                await self._wait_for(self._slot_free, None)
                continue
            self._wake.clear()
            try:
                claims = await self.ledger.claim_work(
                    self.worker_id, limit=free, lease_ttl=self.lease_ttl, agents=agents
                )
                backoff = self.poll_interval
            except Exception as exc:
                log.warning("claim failed (%s); retrying in %.1fs", exc, backoff)
                await self._wait_for(self._stopping, backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            for claim in claims:
                self._start(claim)
            if len(claims) < free:
                await self._wait_for(self._wake, self.poll_interval)

    @staticmethod
    async def _wait_for(event: asyncio.Event, timeout: float | None) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)

    def _start(self, claim: Claim) -> None:
        stale = self._running.get(claim.work_id)
        if stale is not None:
            # Our earlier lease on it expired and was reaped before a renewal noticed: that run
            # is a zombie now (its writes are fenced off); stop it rather than run both.
            log.warning(
                "LeaseLost: work %s reclaimed at epoch %d; stopping its run at epoch %d",
                claim.work_id,
                claim.epoch,
                stale.claim.epoch,
            )
            stale.task.cancel()
        task = asyncio.create_task(self._execute(claim), name=f"work:{claim.work_id}")
        self._running[claim.work_id] = _Running(claim, task)
        task.add_done_callback(lambda t, wid=claim.work_id: self._finished(wid, t))

    def _finished(self, work_id: str, task: asyncio.Task[None]) -> None:
        running = self._running.get(work_id)
        if running is not None and running.task is task:
            del self._running[work_id]
        self.completed += 1
        self._slot_free.set()
        self._wake.set()

    # -- running one item --------------------------------------------------------------------

    async def _execute(self, claim: Claim) -> None:
        # This task's own context (copied at create_task): every log line it, the agent, its
        # steps and their threads emit carries the work id.
        current_work_id.set(claim.work_id)
        try:
            await self._run_claim(claim)
        except LeaseLost as exc:
            log.warning("LeaseLost: %s; abandoning work %s", exc, claim.work_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("worker could not record the outcome of work %s", claim.work_id)
            try:  # hand it back to run again (it replays); else its lease simply expires
                await self.ledger.release_work(claim, "released_after_error")
            except Exception as exc:
                log.warning("could not release work %s either: %s", claim.work_id, exc)

    async def _run_claim(self, claim: Claim) -> None:
        try:
            spec = get_agent(claim.agent)
        except UnknownAgent as exc:
            await self.ledger.fail_work(claim, error_info(exc))
            return
        recorded = {} if claim.fresh else await self.ledger.load_steps(claim.work_id)
        ctx = Context(
            self.ledger,
            claim,
            recorded,
            public_url=self.public_url,
            committer=self.committer,
            durability=spec.durability,
        )
        ctx.models = self.models
        running = self._running.get(claim.work_id)
        if running is not None:
            running.ctx = ctx
            if running.control:
                ctx.request_interrupt(running.control)
        try:
            try:
                result = await spec.fn(ctx, spec.parse_input(claim.input))
            finally:  # from here on, this run only writes its own outcome
                if running is not None:
                    running.settling = True
            if ctx.nondeterminism is not None:  # the agent caught it; the history is still wrong
                raise ctx.nondeterminism
        except Suspended:
            return
        except WorkInterrupted:
            await ctx.flush()
            state = await self.ledger.acknowledge_control(claim)
            log.info("work %s %s at a step boundary", claim.work_id, state)
            return
        except LeaseLost:
            raise
        except NonDeterminismError as exc:
            await ctx.flush()
            await self.ledger.fail_work(claim, error_info(exc))
            return
        except Exception as exc:
            await ctx.flush()
            if ctx.nondeterminism is not None:
                await self.ledger.fail_work(claim, error_info(ctx.nondeterminism))
                return
            retry_at = None
            if spec.retry.should_retry(claim.attempt, exc):
                retry_at = utcnow() + timedelta(seconds=spec.retry.delay(claim.attempt))
            state = await self.ledger.fail_work(claim, error_info(exc), retry_at=retry_at)
            log.info("work %s %s: %s: %s", claim.work_id, state, type(exc).__name__, exc)
            return
        try:
            output = to_json_data(result)
        except (PydanticSerializationError, ValueError) as exc:
            err = TypeError(f"agent {claim.agent!r} returned a value that is not JSON: {exc}")
            await ctx.flush()
            await self.ledger.fail_work(claim, error_info(err))
            return
        await ctx.flush()
        await self.ledger.complete_work(claim, output)

    # -- leases ------------------------------------------------------------------------------

    async def _renew_loop(self) -> None:
        interval = max(self.lease_ttl / 3, 0.05)
        while True:
            await asyncio.sleep(interval)
            await self._renew_once()

    async def _renew_once(self) -> None:
        try:
            held = await self.ledger.renew_leases(
                self.worker_id, lease_ttl=self.lease_ttl, work_ids=list(self._running)
            )
        except Exception as exc:
            log.warning("lease renewal failed: %s", exc)
            return
        for work_id, running in list(self._running.items()):
            now_held = held.get(work_id)
            if now_held is None or now_held[0] != running.claim.epoch:
                # A claim that committed while this renewal ran is still ours, and a run that
                # is writing its own final transition let go on purpose: check first.
                if running.task.done() or running.letting_go or await self._still_ours(running):
                    continue
                if running.letting_go:  # it started letting go while we looked
                    continue
                log.warning(
                    "LeaseLost: lease on work %s at epoch %d is gone; stopping it",
                    work_id,
                    running.claim.epoch,
                )
                running.task.cancel()
            elif now_held[1]:
                running.control = now_held[1]
                if running.ctx is not None:
                    running.ctx.request_interrupt(now_held[1])

    async def _still_ours(self, running: _Running) -> bool:
        try:
            work = await self.ledger.get_work(running.claim.work_id)
        except Exception:
            return True
        return (
            work.state == "running"
            and work.lease_epoch == running.claim.epoch
            and work.lease_owner == self.worker_id
        )

    async def _wind_down(self) -> None:
        if not self._running:
            return
        tasks = [r.task for r in self._running.values()]
        log.info("finishing %d item(s) (grace %.0fs)", len(tasks), self.shutdown_grace)
        _, pending = await asyncio.wait(tasks, timeout=self.shutdown_grace)
        for running in [r for r in self._running.values() if r.task in pending]:
            running.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await running.task
            try:
                await self.ledger.release_work(running.claim)
                log.info("released work %s back to the queue", running.claim.work_id)
            except LeaseLost:
                pass
            except Exception as exc:
                log.warning("could not release work %s: %s", running.claim.work_id, exc)
