"""Durable waiting from agent code: timers, approvals, typed input, signals and resume URLs.

Each wait is a step: the first time it is reached the ledger opens the wait and parks the work
item (the function stops here with :class:`Suspended` and the worker lets go of it); once the
wait is resolved the item runs again from the top and the step returns the recorded outcome.
Imports the ledger and the worker's own modules.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, TypeAdapter

from ledger import utcnow
from ledger.waits import WaitOutcome, WaitSpec
from worker.errors import Suspended, WaitTimeout

OnTimeout = Literal["fail", "continue", "escalate"]


class Decision(BaseModel):
    """The outcome of ``wait_for_approval``."""

    approved: bool
    decision: Literal["approve", "deny"] | None = None
    by: str | None = None
    comment: str | None = None
    timed_out: bool = False
    wait_id: str
    decided_at: str | None = None


def _seconds(value: timedelta | float | int) -> float:
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def _deadline(timeout: timedelta | float | None) -> datetime | None:
    return None if timeout is None else utcnow() + timedelta(seconds=_seconds(timeout))


class WaitingMixin:
    """The waiting half of :class:`worker.context.Context`."""

    # provided by Context
    _ledger: Any
    _claim: Any
    public_url: str
    parking: bool

    if TYPE_CHECKING:

        def _next(self, name: str) -> Any: ...

        async def step(self, name: str, fn: Any, *args: Any, **kwargs: Any) -> Any: ...

        async def flush(self) -> None: ...

    async def _wait(self, step_name: str, spec: dict[str, Any]) -> WaitOutcome:
        seq, rec = self._next(step_name)
        if rec is not None and rec.status == "succeeded":
            outcome = WaitOutcome.from_json(rec.output)
        else:
            await self.flush()
            self.parking = True
            result = await self._ledger.enter_wait(
                self._claim, WaitSpec(seq=seq, **spec), step_name
            )
            if isinstance(result, tuple):
                raise Suspended()
            self.parking = False
            outcome = result
        if outcome.state == "timed_out" and outcome.on_timeout == "fail":
            raise WaitTimeout(f"{step_name} wait {outcome.wait_id} timed out")
        return outcome

    async def sleep(self, delay: timedelta | float) -> None:
        """Sleep durably: the work item waits in the ledger, holding no worker, and wakes after
        ``delay`` (a ``timedelta`` or seconds) even across restarts."""
        await self._wait("sleep", {"kind": "timer", "deadline": _deadline(delay)})

    async def sleep_until(self, when: datetime) -> None:
        """Sleep durably until ``when`` (timezone-aware)."""
        if when.tzinfo is None:
            raise ValueError("sleep_until needs a timezone-aware datetime")
        await self._wait("sleep", {"kind": "timer", "deadline": when})

    async def wait_for_approval(
        self,
        prompt: str,
        *,
        timeout: timedelta | float | None = None,
        on_timeout: OnTimeout = "fail",
    ) -> Decision:
        """Ask for a yes/no decision; the first decision wins. At the deadline, ``fail`` raises
        :class:`WaitTimeout`, ``continue`` returns a denied ``Decision`` with ``timed_out``,
        ``escalate`` keeps waiting and flags the wait for an operator."""
        outcome = await self._wait(
            "approval",
            {
                "kind": "approval",
                "prompt": prompt,
                "deadline": _deadline(timeout),
                "on_timeout": on_timeout,
            },
        )
        res = outcome.resolution or {}
        if outcome.state == "timed_out":
            return Decision(approved=False, timed_out=True, wait_id=outcome.wait_id)
        return Decision(
            approved=bool(res.get("approved")),
            decision=res.get("decision"),
            by=outcome.resolved_by,
            comment=res.get("comment"),
            wait_id=outcome.wait_id,
            decided_at=outcome.resolved_at,
        )

    async def wait_for_input(
        self,
        prompt: str,
        *,
        schema: Any = str,
        timeout: timedelta | float | None = None,
        on_timeout: OnTimeout = "fail",
    ) -> Any:
        """Ask for input of type ``schema`` (a pydantic model, ``int``, ``str`` …). The reply is
        checked against its JSON Schema when it arrives; an invalid one leaves the wait open.
        Returns the value validated into ``schema`` (``None`` after a ``continue`` timeout)."""
        adapter: TypeAdapter[Any] = TypeAdapter(schema)
        outcome = await self._wait(
            "input",
            {
                "kind": "input",
                "prompt": prompt,
                "payload_schema": adapter.json_schema(),
                "deadline": _deadline(timeout),
                "on_timeout": on_timeout,
            },
        )
        if outcome.state == "timed_out":
            return None
        return adapter.validate_python((outcome.resolution or {}).get("input"))

    async def wait_for_signal(
        self,
        name: str,
        *,
        key: str | None = None,
        timeout: timedelta | float | None = None,
        on_timeout: OnTimeout = "fail",
    ) -> Any:
        """Wait for ``signal name`` (with ``key``) from a webhook, ``tether signal`` or the
        API, or, without a key, for a call to the ``resume_url(name)`` made earlier. Returns
        the signal's data (``None`` after a ``continue`` timeout)."""
        outcome = await self._wait(
            f"signal:{name}",
            {
                "kind": "signal",
                "name": name,
                "key": key,
                "deadline": _deadline(timeout),
                "on_timeout": on_timeout,
                "adopt_resume_url": key is None,
            },
        )
        if outcome.state == "timed_out":
            return None
        return (outcome.resolution or {}).get("data")

    async def resume_url(self, name: str) -> str:
        """An unguessable URL that resumes this work item's ``wait_for_signal(name)`` once
        (``POST`` JSON to it). The same URL on every replay."""
        token = await self.step(f"resume_url:{name}", self._open_resume_url, name, side_effect=True)
        return f"{self.public_url.rstrip('/')}/resume/{token}"

    async def _open_resume_url(self, name: str) -> str:
        from worker.context import current_step

        return await self._ledger.open_resume_url(self._claim, current_step().seq, name)


__all__ = ["Decision", "Suspended", "WaitingMixin"]
