"""The ``Context`` agents receive: memoized steps, patches, child work.

Execution is step memoization with re-execution: a resumed work item runs its function from the
top; each ``ctx.step`` whose result is recorded returns it at once; the first unrecorded step
runs for real and its result is recorded (fenced on the lease epoch).

When a result becomes durable is the step's *durability* (the agent's default, or per step):
``sync`` commits it before ``step`` returns; ``batched`` queues it for the process's next group
commit (:mod:`worker.commits`); ``exit`` keeps it in memory until the item finishes, fails or
waits. Semantic boundaries always flush what is pending first: before a ``side_effect=True``
step runs (whose own record is then always ``sync``), before a reply is sent, before a wait,
before a child is spawned, and before the item's outcome is written. So a crash can only re-run
pure steps whose records were still pending, never an external effect.
Imports ledger and the worker's own modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import json
import logging
import time
import traceback
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter
from pydantic_core import PydanticSerializationError, to_jsonable_python

from ledger import Claim, LeaseLost, Ledger, StepRecord, StepWrite, utcnow
from worker.commits import StepCommitter
from worker.errors import (
    ChildFailed,
    HeartbeatTimeout,
    NonDeterminismError,
    StepFailed,
    StepResultNotSerializable,
    StepTimeout,
    Suspended,
    WorkInterrupted,
)
from worker.model_calls import ModelCallsMixin
from worker.registry import DURABILITY_MODES
from worker.retry import DEFAULT_STEP_RETRY, RetryPolicy
from worker.waiting import WaitingMixin

log = logging.getLogger(__name__)

#: A step still running after this long gets a ``running`` record (and a ``step_started``
#: event); faster steps are recorded once, when they finish.
START_RECORD_DELAY = 0.25
#: At most one progress write per step per this many seconds; the latest progress wins.
HEARTBEAT_WRITE_INTERVAL = 1.0


def check_durability(value: str) -> str:
    if value not in DURABILITY_MODES:
        raise ValueError(f"durability must be one of {DURABILITY_MODES}, not {value!r}")
    return value


_current_step: contextvars.ContextVar[StepHandle | None] = contextvars.ContextVar(
    "tether_current_step", default=None
)
#: the id of the work item this task (or its thread) runs, for log lines; set by the pool
current_work_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "tether_current_work_id", default=None
)


def current_step() -> StepHandle:
    """The step running in this task (or its thread): ``work_id``, ``seq``, ``name``,
    ``attempt``, ``idempotency_key`` and ``heartbeat(progress=None)``."""
    handle = _current_step.get()
    if handle is None:
        raise RuntimeError("current_step() is only available inside ctx.step(...)")
    return handle


def error_info(exc: BaseException) -> dict[str, Any]:
    """How an exception is stored in the ledger: type, message and traceback."""
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(exc))[-8000:],
    }


def to_json_data(value: Any) -> Any:
    """``value`` as the JSON data the ledger stores. Raises ``PydanticSerializationError`` or
    ``ValueError`` for what strict JSON cannot hold (an arbitrary object, NaN, infinity), which
    one database would reject and the other store as invalid JSON."""
    data = to_jsonable_python(value)
    json.dumps(data, allow_nan=False)
    return data


class StepHandle:
    """What a running step knows about itself; ``heartbeat`` is safe from threads too."""

    __slots__ = (
        "_ctx",
        "_last_beat",
        "_loop",
        "_pending_progress",
        "_started_at",
        "_write_task",
        "_written_at",
        "attempt",
        "idempotency_key",
        "name",
        "seq",
        "work_id",
    )

    def __init__(self, ctx: Context, seq: int, name: str, attempt: int, started_at: Any) -> None:
        self._ctx = ctx
        self.work_id = ctx.work_id
        self.seq = seq
        self.name = name
        self.attempt = attempt
        self.idempotency_key = f"{ctx.work_id}:{seq}"
        self._started_at = started_at
        self._loop = asyncio.get_running_loop()
        self._last_beat = time.monotonic()
        self._pending_progress: Any = None
        self._written_at = 0.0
        self._write_task: asyncio.Task[None] | None = None

    def heartbeat(self, progress: Any = None) -> None:
        """Tell Tether this step is alive (and how far it got). Silence longer than the step's
        ``heartbeat_timeout`` fails the attempt with ``HeartbeatTimeout``."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._beat(progress)
        else:
            self._loop.call_soon_threadsafe(self._beat, progress)

    def _beat(self, progress: Any) -> None:
        self._last_beat = time.monotonic()
        self._pending_progress = to_jsonable_python(progress) if progress is not None else None
        if self._write_task is None or self._write_task.done():
            self._write_task = self._loop.create_task(self._write_progress())

    async def _write_progress(self) -> None:
        wait = self._written_at + HEARTBEAT_WRITE_INTERVAL - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        self._written_at = time.monotonic()
        try:
            await self._ctx._ledger.record_step_running(
                self._ctx._claim, self._running_write(), heartbeat_at=utcnow()
            )
        except LeaseLost:
            self._ctx._lease_lost = True
        except Exception:
            log.exception("could not record heartbeat of step %s", self.idempotency_key)

    def _running_write(self) -> StepWrite:
        return StepWrite(
            seq=self.seq,
            name=self.name,
            attempt=self.attempt,
            idempotency_key=self.idempotency_key,
            started_at=self._started_at,
            progress=self._pending_progress,
        )

    def _stop(self) -> None:
        if self._write_task is not None and not self._write_task.done():
            self._write_task.cancel()


@dataclass(frozen=True, slots=True)
class ChildHandle:
    """A child work item spawned by ``ctx.spawn``; pass it to ``ctx.join``."""

    work_id: str
    agent: str


_return_adapters: dict[Any, TypeAdapter[Any] | None] = {}


def _return_adapter(fn: Callable[..., Any]) -> TypeAdapter[Any] | None:
    """Replay returns a recorded result as the type the step function declares, if any."""
    key = getattr(fn, "__func__", fn)
    try:
        return _return_adapters[key]
    except (KeyError, TypeError):
        pass
    adapter = None
    try:
        hint = typing.get_type_hints(fn).get("return")
        if hint is not None and hint is not Any and hint is not type(None):
            adapter = TypeAdapter(hint)
    except Exception:
        adapter = None
    with contextlib.suppress(TypeError):
        _return_adapters[key] = adapter
    return adapter


class Context(WaitingMixin, ModelCallsMixin):
    """Handed to every agent call: the API agent code uses to be durable."""

    def __init__(
        self,
        ledger: Ledger,
        claim: Claim,
        recorded: dict[int, StepRecord],
        *,
        public_url: str = "http://127.0.0.1:8080",
        committer: StepCommitter | None = None,
        durability: str = "sync",
    ) -> None:
        self._ledger = ledger
        self._committer = committer if committer is not None else StepCommitter(ledger)
        self.durability = check_durability(durability)
        #: ``exit``-mode records, kept in memory until the next flush
        self._held: list[StepWrite] = []
        #: ``batched`` records queued with the committer and not yet known to be durable
        self._queued: list[asyncio.Future[None]] = []
        self.public_url = public_url
        self._claim = claim
        self._recorded = recorded
        self._seq = 0
        self._interrupt: str | None = claim.control
        self._lease_lost = False
        #: set while the item parks itself (enters a wait): its lease ends on purpose
        self.parking = False
        #: a replay mismatch, kept so agent code that catches it cannot carry on regardless
        self.nondeterminism: NonDeterminismError | None = None
        self.work_id = claim.work_id
        self.agent = claim.agent
        self.attempt = claim.attempt
        self.log = logging.getLogger(f"tether.agent.{claim.agent}")

    # -- control -----------------------------------------------------------------------------

    def request_interrupt(self, control: str) -> None:
        """Called by the worker pool when an operator pauses or cancels this item."""
        self._interrupt = control

    def _boundary(self) -> None:
        if self.nondeterminism is not None:
            raise self.nondeterminism
        if self._lease_lost:
            raise LeaseLost(self.work_id, self._claim.epoch, "noticed at a step boundary")
        if self._interrupt is not None:
            raise WorkInterrupted(self._interrupt)

    def _next(self, name: str) -> tuple[int, StepRecord | None]:
        self._boundary()
        self._seq += 1
        seq = self._seq
        rec = self._recorded.get(seq)
        if rec is not None and rec.name != name:
            self.nondeterminism = NonDeterminismError(self.work_id, seq, rec.name, name)
            raise self.nondeterminism
        return seq, rec

    # -- steps -------------------------------------------------------------------------------

    async def step(
        self,
        name: str,
        fn: Callable[..., Any],
        *args: Any,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
        heartbeat_timeout: float | None = None,
        record_meta: Callable[[Any], dict[str, Any]] | None = None,
        durability: str | None = None,
        side_effect: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Run ``fn(*args, **kwargs)`` once, durably: its JSON result is recorded and returned
        again on replay. ``current_step()`` inside ``fn`` gives its idempotency key
        ``{work_id}:{seq}``. Failed attempts are retried per ``retry``; ``timeout`` bounds each
        attempt; ``heartbeat_timeout`` fails an attempt that stops calling ``heartbeat()``.
        ``record_meta(result)`` (for the runtime's own steps, such as model calls) returns
        step columns to record beside the output (see ``ledger.steps.STEP_META_COLUMNS``).
        ``durability`` overrides the agent's for this step; ``side_effect=True`` declares that
        ``fn`` acts on the world: everything pending is made durable before it runs, and its
        own record is committed before ``step`` returns."""
        seq, rec = self._next(name)
        if rec is not None and rec.status == "succeeded":
            adapter = _return_adapter(fn)
            return rec.output if adapter is None else adapter.validate_python(rec.output)
        mode = "sync" if side_effect else check_durability(durability or self.durability)
        if side_effect:
            await self.flush()
        policy = retry or DEFAULT_STEP_RETRY
        first = rec.attempt + 1 if rec is not None else 1
        tries = 0
        while True:
            tries += 1
            attempt = first + tries - 1
            try:
                return await self._attempt(
                    seq,
                    name,
                    attempt,
                    fn,
                    args,
                    kwargs,
                    timeout,
                    heartbeat_timeout,
                    record_meta,
                    mode,
                )
            except (LeaseLost, WorkInterrupted, StepResultNotSerializable):
                raise
            except Exception as exc:
                if not policy.should_retry(tries, exc):
                    raise StepFailed(name, seq, tries, exc) from exc
                delay = policy.delay(tries)
                self.log.info(
                    "step %s %r attempt %d failed (%s); retrying in %.2fs",
                    seq, name, attempt, exc, delay,
                )  # fmt: skip
                await asyncio.sleep(delay)
                self._boundary()

    async def _attempt(
        self,
        seq: int,
        name: str,
        attempt: int,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
        heartbeat_timeout: float | None,
        record_meta: Callable[[Any], dict[str, Any]] | None = None,
        mode: str = "sync",
    ) -> Any:
        started = utcnow()
        handle = StepHandle(self, seq, name, attempt, started)
        token = _current_step.set(handle)
        timer: asyncio.TimerHandle | None = None
        watched = timeout is not None or heartbeat_timeout is not None
        try:
            if watched or attempt > 1:
                await self._ledger.record_step_running(self._claim, handle._running_write())
            else:
                timer = asyncio.get_running_loop().call_later(
                    START_RECORD_DELAY, self._record_start_late, handle
                )
            try:
                if watched:
                    result = await self._run_watched(
                        fn, args, kwargs, handle, timeout, heartbeat_timeout
                    )
                else:
                    result = fn(*args, **kwargs)
                    if inspect.isawaitable(result):
                        result = await result
            except (LeaseLost, WorkInterrupted, asyncio.CancelledError):
                raise
            except Exception as exc:
                await self._record(handle, started, status="failed", exc=exc, mode=mode)
                raise
            try:
                output = to_json_data(result)
            except (PydanticSerializationError, ValueError) as exc:
                err = StepResultNotSerializable(
                    f"step {seq} {name!r} returned a {type(result).__name__}, which cannot be "
                    f"stored as JSON ({exc}); return JSON-compatible data or a pydantic model"
                )
                await self._record(handle, started, status="failed", exc=err, mode=mode)
                raise err from None
            if timer is not None:
                timer.cancel()
                timer = None
            extra = record_meta(result) if record_meta is not None else None
            await self._record(
                handle, started, status="succeeded", output=output, extra=extra, mode=mode
            )
            return result
        finally:
            if timer is not None:
                timer.cancel()
            handle._stop()
            _current_step.reset(token)

    def _record_start_late(self, handle: StepHandle) -> None:
        task = asyncio.get_running_loop().create_task(
            self._ledger.record_step_running(self._claim, handle._running_write())
        )
        task.add_done_callback(_ignore_result)

    async def _record(
        self,
        handle: StepHandle,
        started: Any,
        *,
        status: str,
        output: Any = None,
        exc: BaseException | None = None,
        extra: dict[str, Any] | None = None,
        mode: str = "sync",
    ) -> None:
        write = StepWrite(
            seq=handle.seq,
            name=handle.name,
            attempt=handle.attempt,
            idempotency_key=handle.idempotency_key,
            started_at=started,
            status=status,
            output=output,
            error=error_info(exc) if exc is not None else None,
            error_type=type(exc).__name__ if exc is not None else None,
            finished_at=utcnow(),
            progress=handle._pending_progress,  # the last heartbeat's, not yet written
            extra=extra or {},
            durability=mode,
        )
        if mode == "exit":
            self._held.append(write)
            await asyncio.sleep(0)  # a loop of quick steps must not starve lease renewal
        elif mode == "batched":
            self._release_held()
            self._queued.append(self._committer.submit(self._claim, write))
            await asyncio.sleep(0)  # let the group commit run when it is due
        else:
            self._release_held()
            await self._committer.commit(self._claim, write)

    # -- durability --------------------------------------------------------------------------

    def _release_held(self) -> None:
        """Hand the ``exit``-mode records to the committer (they commit before what follows)."""
        for write in self._held:
            self._queued.append(self._committer.submit(self._claim, write, urgent=True))
        self._held.clear()

    @property
    def pending_records(self) -> int:
        """Step records of this item not yet known to be durable."""
        return len(self._held) + sum(1 for f in self._queued if not f.done())

    async def flush(self) -> None:
        """Make every step record of this item durable (a semantic boundary). Raises
        :class:`ledger.LeaseLost` if the lease was lost meanwhile, or the commit's error."""
        self._release_held()
        if not self._queued:
            return
        queued, self._queued = self._queued, []
        if not all(f.done() for f in queued):
            self._committer.kick()
        errors = [e for e in await asyncio.gather(*queued, return_exceptions=True) if e]
        if errors:
            lost = [e for e in errors if isinstance(e, LeaseLost)]
            raise (lost or errors)[0]

    async def _run_watched(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        handle: StepHandle,
        timeout: float | None,
        heartbeat_timeout: float | None,
    ) -> Any:
        if inspect.iscoroutinefunction(fn):
            coro = fn(*args, **kwargs)
        else:
            ctx = contextvars.copy_context()
            call = functools.partial(ctx.run, fn, *args, **kwargs)
            coro = asyncio.to_thread(call)
        task = asyncio.ensure_future(coro)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                now = time.monotonic()
                waits = []
                if deadline is not None:
                    waits.append(deadline - now)
                if heartbeat_timeout is not None:
                    waits.append(handle._last_beat + heartbeat_timeout - now)
                wait = max(min(waits), 0.0)
                done, _ = await asyncio.wait({task}, timeout=wait)
                if done:
                    return task.result()
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    raise StepTimeout(f"step {handle.seq} {handle.name!r} ran past {timeout}s")
                if heartbeat_timeout is not None and now >= handle._last_beat + heartbeat_timeout:
                    raise HeartbeatTimeout(
                        f"step {handle.seq} {handle.name!r} sent no heartbeat for "
                        f"{heartbeat_timeout}s"
                    )
        finally:
            if not task.done():
                task.cancel()

    async def patched(self, patch_id: str) -> bool:
        """``True`` where the new code path should run: for work that reaches this point for
        the first time (a marker step is recorded), or that took the patched path before.
        ``False`` for work whose history was written by the old code here (no marker), which
        then replays the old path unchanged. Use as ``if await ctx.patched("v2"): ...``."""
        name = f"patch:{patch_id}"
        rec = self._recorded.get(self._seq + 1)
        if rec is not None and rec.name != name:
            return False
        await self.step(name, _marker)
        return True

    # -- conversation ------------------------------------------------------------------------

    async def reply(self, text: str) -> None:
        """Say ``text`` in this work item's conversation, once, however often the work
        replays (the outbound message and the step record commit together)."""
        seq, rec = self._next("reply")
        if rec is not None and rec.status == "succeeded":
            return
        await self.flush()
        await self._ledger.record_reply(self._claim, seq, "reply", str(text))

    # -- child work --------------------------------------------------------------------------

    async def spawn(self, agent: str, input: Any = None, *, max_attempts: int = 5) -> ChildHandle:
        """Start child work (once, however often this work replays)."""
        payload = to_jsonable_python(input)
        out = await self.step(
            f"spawn:{agent}", self._spawn_child, agent, payload, max_attempts, side_effect=True
        )
        return ChildHandle(work_id=out["work_id"], agent=agent)

    async def _spawn_child(self, agent: str, payload: Any, max_attempts: int) -> dict[str, str]:
        seq = current_step().seq
        child_id = await self._ledger.spawn_child(
            self._claim, seq, agent, payload, max_attempts=max_attempts
        )
        return {"work_id": child_id}

    async def join(self, child: ChildHandle | str) -> Any:
        """Wait (durably) for a child to finish; return its result or raise ``ChildFailed``."""
        child_id = child.work_id if isinstance(child, ChildHandle) else child
        name = f"join:{child_id}"
        seq, rec = self._next(name)
        if rec is None or rec.status != "succeeded":
            await self.flush()
            self.parking = True
            finished = await self._ledger.suspend_for_child(self._claim, child_id)
            if finished is None:
                raise Suspended()
            self.parking = False
            outcome = {"state": finished.state, "result": finished.result, "error": finished.error}
            handle = StepHandle(self, seq, name, 1 if rec is None else rec.attempt + 1, utcnow())
            await self._record(handle, utcnow(), status="succeeded", output=outcome)
        else:
            outcome = rec.output
        if outcome["state"] != "succeeded":
            raise ChildFailed(child_id, outcome["state"], outcome["error"])
        return outcome["result"]


def _marker() -> bool:
    return True


def _ignore_result(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        exc = task.exception()
        if not isinstance(exc, LeaseLost):
            log.debug("late step-start record failed: %s", exc)
