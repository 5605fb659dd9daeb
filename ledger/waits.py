"""Durable waits: timers, approvals, typed input and signals, as rows in the ledger.

A wait is entered by the worker (fenced), which parks the work item in ``waiting`` and releases
its lease; it is resolved by a person, a third party or the scheduler, first decision wins, in
one transaction that also queues the work item again. On replay the recorded outcome is the
step's result. Imported only by :mod:`ledger.ledger`.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jsonschema
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ledger._base import RELEASE, LedgerBase, W, check_lease, fenced_transition
from ledger.errors import InvalidResolution, WaitAlreadyResolved, WaitNotFound
from ledger.records import Claim, StepWrite, new_id, utcnow
from ledger.schema import Wait, conversation_t, wait_t, work_t
from ledger.states import WorkState

A = wait_t.c

KINDS = ("timer", "approval", "input", "signal")
ON_TIMEOUT = ("fail", "continue", "escalate")
PENDING, RESOLVED, TIMED_OUT, CANCELLED = "pending", "resolved", "timed_out", "cancelled"


@dataclass(frozen=True, slots=True)
class WaitSpec:
    """What a worker asks to wait for at step ``seq``."""

    seq: int
    kind: str
    name: str | None = None
    key: str | None = None
    prompt: str | None = None
    payload_schema: Any = None
    deadline: datetime | None = None
    on_timeout: str = "fail"
    channel: str | None = None
    conversation_id: str | None = None
    #: wait_for_signal adopting the wait a resume URL of the same name created earlier
    adopt_resume_url: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"wait kind must be one of {KINDS}")
        if self.on_timeout not in ON_TIMEOUT:
            raise ValueError(f"on_timeout must be one of {ON_TIMEOUT}")


@dataclass(frozen=True, slots=True)
class WaitOutcome:
    """How a wait ended: ``state`` is ``resolved`` or ``timed_out``."""

    wait_id: str
    kind: str
    state: str
    resolution: Any
    resolved_by: str | None
    resolved_at: str | None
    on_timeout: str

    def as_json(self) -> dict[str, Any]:
        return {
            "wait_id": self.wait_id,
            "kind": self.kind,
            "state": self.state,
            "resolution": self.resolution,
            "resolved_by": self.resolved_by,
            "resolved_at": self.resolved_at,
            "on_timeout": self.on_timeout,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WaitOutcome:
        return cls(**data)


def _outcome(row: Any) -> WaitOutcome:
    at = row.resolved_at.isoformat() if row.resolved_at else None
    return WaitOutcome(
        row.id, row.kind, row.state, row.resolution, row.resolved_by, at, row.on_timeout
    )


def wait_reason(kind: str, wait_id: str, text: str | None) -> str:
    return f"{kind} {wait_id}" + (f": {text}" if text else "")


def _wake(conn: Connection, row: Any, reason: str, detail: dict[str, Any], now: datetime) -> bool:
    """waiting → queued for the item that waits on ``row`` right now."""
    woken = conn.execute(
        sa.update(work_t)
        .where(
            W.id == row.work_id,
            W.state == WorkState.WAITING.value,
            W.wait_reason.like(f"{row.kind} {row.id}%"),
        )
        .values(
            state=WorkState.QUEUED.value,
            wait_reason=None,
            state_reason=reason,
            state_detail=detail,
            updated_at=now,
        )
        .returning(W.id)
    ).first()
    return woken is not None


def check_resolution(kind: str, schema: Any, payload: dict[str, Any]) -> dict[str, Any]:
    """The stored resolution for ``payload`` (an API body), or :class:`InvalidResolution`."""
    if kind == "approval":
        decision = payload.get("decision")
        if decision not in ("approve", "deny"):
            raise InvalidResolution('an approval is resolved with {"decision": "approve"|"deny"}')
        comment = payload.get("comment")
        if comment is not None and not isinstance(comment, str):
            raise InvalidResolution("comment must be a string")
        return {"decision": decision, "approved": decision == "approve", "comment": comment}
    if kind == "input":
        if "input" not in payload:
            raise InvalidResolution('an input wait is resolved with {"input": ...}')
        if schema is not None:
            try:
                jsonschema.validate(payload["input"], schema)
            except jsonschema.ValidationError as exc:
                msg = f"input does not match the expected schema: {exc.message}"
                raise InvalidResolution(msg) from None
        return {"input": payload["input"]}
    if kind == "signal":
        return {"data": payload.get("data")}
    return {"fired": "early"}  # a timer an operator fires now


class WaitQueries(LedgerBase):
    async def enter_wait(
        self, claim: Claim, spec: WaitSpec, step_name: str
    ) -> WaitOutcome | tuple[None, str]:
        """Open the wait of step ``spec.seq`` (once) and park the item, or, if it was resolved
        already, record that as the step's result and return it. Fenced.

        Returns the outcome, or ``(None, wait_id)`` after running → waiting.
        """
        postgres = self.dialect == "postgresql"
        record = self._record_finished  # type: ignore[attr-defined]
        params_for = self._step_params  # type: ignore[attr-defined]

        def tx(conn: Connection) -> WaitOutcome | tuple[None, str]:
            now = utcnow()
            row = None
            if spec.adopt_resume_url:
                q = (
                    sa.select(wait_t)
                    .where(
                        A.work_id == claim.work_id,
                        A.kind == "signal",
                        A.name == spec.name,
                        A.token.is_not(None),
                        A.step_seq < spec.seq,
                    )
                    .order_by(A.step_seq.desc())
                    .limit(1)
                )
                row = conn.execute(q.with_for_update() if postgres else q).first()
            if row is None:
                created = conn.execute(
                    self._insert(wait_t)
                    .values(_new_wait_row(conn, claim, spec, now))
                    .on_conflict_do_nothing(index_elements=["work_id", "step_seq"])
                    .returning(A.id)
                ).first()
                q = sa.select(wait_t).where(A.work_id == claim.work_id, A.step_seq == spec.seq)
                row = conn.execute(q.with_for_update() if postgres else q).one()
                if created is not None:
                    self._send_prompt(conn, row)
            if row.state in (RESOLVED, TIMED_OUT):
                outcome = _outcome(row)
                params = params_for(
                    claim,
                    StepWrite(
                        seq=spec.seq,
                        name=step_name,
                        attempt=1,
                        idempotency_key=f"{claim.work_id}:{spec.seq}",
                        started_at=row.created_at,
                        status="succeeded",
                        output=outcome.as_json(),
                        finished_at=now,
                    ),
                )
                if record.first(conn, params) is None:
                    check_lease(conn, claim)
                return outcome
            values = {
                "wait_reason": wait_reason(row.kind, row.id, row.prompt or row.name),
                "state_detail": {"kind": row.kind, "wait_id": row.id},
                **RELEASE,
            }
            fenced_transition(conn, claim, WorkState.WAITING, "waiting", values, now)
            return (None, row.id)

        result = await self.engines.run_write(tx)
        if isinstance(result, tuple):
            self._fire(self._on_wait, result[1])
        return result

    def _send_prompt(self, conn: Connection, row: Any) -> None:
        """An approval or input wait asks its question in its conversation, once (with the
        wait it opens, in the same transaction). A wait on the ``operator`` channel (such as a
        budget approval) is for the operator only and is never posted in the conversation."""
        if row.kind not in ("approval", "input") or row.conversation_id is None or not row.prompt:
            return
        if row.channel == "operator":
            return
        channel = conn.execute(
            sa.select(conversation_t.c.channel).where(conversation_t.c.id == row.conversation_id)
        ).scalar_one_or_none()
        if channel is None:
            return
        extra: dict[str, Any] = {"wait_id": row.id}
        if row.kind == "approval":
            extra["actions"] = [
                {"id": "approve", "label": "Approve"},
                {"id": "deny", "label": "Deny"},
            ]
        self._outbox(  # type: ignore[attr-defined]
            conn, row.conversation_id, channel, row.work_id, row.prompt,
            step_seq=row.step_seq, extra=extra,
        )  # fmt: skip

    async def open_resume_url(self, claim: Claim, seq: int, name: str) -> str:
        """Create (once) the signal wait a resume URL resolves; returns its token."""

        def tx(conn: Connection) -> str:
            check_lease(conn, claim)
            now = utcnow()
            spec = WaitSpec(seq=seq, kind="signal", name=name)
            row = _new_wait_row(conn, claim, spec, now)
            row["token"] = secrets.token_urlsafe(24)
            conn.execute(
                self._insert(wait_t)
                .values(row)
                .on_conflict_do_nothing(index_elements=["work_id", "step_seq"])
            )
            return conn.execute(
                sa.select(A.token).where(A.work_id == claim.work_id, A.step_seq == seq)
            ).scalar_one()

        return await self.engines.run_write(tx)

    # -- resolving ---------------------------------------------------------------------------

    def _resolve_row(
        self, conn: Connection, row: Any, payload: dict[str, Any], by: str | None, now: datetime
    ) -> Wait:
        if row.state != PENDING:
            raise WaitAlreadyResolved(row.id, row.state, row.resolution, row.resolved_by)
        resolution = check_resolution(row.kind, row.payload_schema, payload)
        if by is not None:
            resolution["by"] = by
        updated = conn.execute(
            sa.update(wait_t)
            .where(A.id == row.id, A.state == PENDING)
            .values(state=RESOLVED, resolution=resolution, resolved_by=by, resolved_at=now)
            .returning(*wait_t.c)
        ).one()
        _wake(conn, row, "resumed", {"actor": by, "wait_id": row.id, "kind": row.kind}, now)
        return Wait(**updated._mapping)

    def _locked(self, q: Any) -> Any:
        return q.with_for_update() if self.dialect == "postgresql" else q

    async def resolve_wait(
        self, wait_id: str, payload: dict[str, Any], *, by: str | None = None
    ) -> Wait:
        """Resolve one wait (first decision wins). ``payload`` is ``{"decision", "comment"}``
        for an approval, ``{"input"}`` for input, ``{"data"}`` for a signal."""

        def tx(conn: Connection) -> Wait:
            row = conn.execute(self._locked(sa.select(wait_t).where(A.id == wait_id))).first()
            if row is None:
                raise WaitNotFound(f"with id {wait_id!r}")
            return self._resolve_row(conn, row, payload, by, utcnow())

        wait = await self.engines.run_write(tx, urgent=True)
        self._fire(self._on_queued, "")
        return wait

    async def resolve_by_token(self, token: str, data: Any, *, by: str | None = None) -> Wait:
        """Resolve the wait behind a resume URL, once."""

        def tx(conn: Connection) -> Wait:
            row = conn.execute(self._locked(sa.select(wait_t).where(A.token == token))).first()
            if row is None:
                raise WaitNotFound("for this resume URL")
            return self._resolve_row(conn, row, {"data": data}, by, utcnow())

        wait = await self.engines.run_write(tx, urgent=True)
        self._fire(self._on_queued, "")
        return wait

    async def resolve_signal(
        self, name: str, key: str | None, data: Any, *, by: str | None = None
    ) -> list[Wait]:
        """Resolve every pending ``wait_for_signal(name, key=key)``; ``[]`` if none waits."""

        def tx(conn: Connection) -> list[Wait]:
            q = sa.select(wait_t).where(
                A.kind == "signal",
                A.name == name,
                A.key.is_(None) if key is None else A.key == key,
                A.state == PENDING,
            )
            now = utcnow()
            return [
                self._resolve_row(conn, row, {"data": data}, by, now)
                for row in conn.execute(self._locked(q)).all()
            ]

        waits = await self.engines.run_write(tx, urgent=True)
        if waits:
            self._fire(self._on_queued, "")
        return waits

    async def fire_due_waits(self, *, limit: int = 1000) -> list[tuple[str, str]]:
        """Timers that are due fire; other waits past their deadline follow ``on_timeout``:
        ``continue``/``fail`` end the wait as timed out and queue the work (which then carries
        on with a timeout result, or fails with ``WaitTimeout``), ``escalate`` keeps it open for
        an operator. Each wait is handled once, whichever scheduler gets it.
        Returns ``[(wait_id, what_happened)]``."""
        postgres = self.dialect == "postgresql"

        def fire_timers(conn: Connection, now: datetime) -> list[tuple[str, str]]:
            """Due timers, set-based: one statement resolves the batch, one wakes its items."""
            pick = (
                sa.select(A.id)
                .where(A.state == PENDING, A.kind == "timer", A.deadline <= now)
                .order_by(A.deadline)
                .limit(limit)
            )
            picked: Any = pick.scalar_subquery()
            if postgres:  # lock the batch once (see WorkQueries.claim_work)
                cte = pick.with_for_update(skip_locked=True).cte("due").prefix_with("MATERIALIZED")
                picked = sa.select(cte.c.id)
            fired = conn.execute(
                sa.update(wait_t)
                .where(A.id.in_(picked), A.state == PENDING)
                .values(
                    state=RESOLVED,
                    resolution={"fired": "due"},
                    resolved_by="scheduler",
                    resolved_at=now,
                )
                .returning(A.id, A.work_id)
            ).all()
            if fired:
                ids = [r.id for r in fired]
                w = wait_t.alias("fired")
                waits_on_it = sa.exists().where(
                    w.c.id.in_(ids),
                    w.c.work_id == W.id,
                    W.wait_reason.like(w.c.kind + " " + w.c.id + "%"),
                )
                conn.execute(
                    sa.update(work_t)
                    .where(
                        W.id.in_([r.work_id for r in fired]),
                        W.state == WorkState.WAITING.value,
                        waits_on_it,
                    )
                    .values(
                        state=WorkState.QUEUED.value,
                        wait_reason=None,
                        state_reason="timer_fired",
                        state_detail={"kind": "timer"},
                        updated_at=now,
                    )
                )
            return [(r.id, "fired") for r in fired]

        def tx(conn: Connection) -> list[tuple[str, str]]:
            now = utcnow()
            done = fire_timers(conn, now)
            # Deadlines of approvals, input and signals are rare: one by one.
            q = (
                sa.select(wait_t)
                .where(A.state == PENDING, A.kind != "timer", A.deadline <= now)
                .order_by(A.deadline)
                .limit(limit)
            )
            if postgres:
                q = q.with_for_update(skip_locked=True)
            for row in conn.execute(q).all():
                if row.on_timeout == "escalate":
                    values: dict[str, Any] = {"deadline": None, "escalated_at": now}
                    what, reason = "escalated", "escalated"
                else:
                    values = {"state": TIMED_OUT, "resolution": {"timed_out": True}}
                    values |= {"resolved_by": "scheduler", "resolved_at": now}
                    what, reason = "timed_out", "wait_timed_out"
                changed = conn.execute(
                    sa.update(wait_t)
                    .where(A.id == row.id, A.state == PENDING)
                    .values(**values)
                    .returning(A.id)
                ).first()
                if changed is None:
                    continue
                detail = {"wait_id": row.id, "kind": row.kind}
                if what == "escalated":
                    conn.execute(
                        sa.update(work_t)
                        .where(W.id == row.work_id)
                        .values(state_reason="escalated", state_detail=detail, updated_at=now)
                    )
                else:
                    _wake(conn, row, reason, detail, now)
                done.append((row.id, what))
            return done

        done = await self.engines.run_write(tx)
        if any(what != "escalated" for _, what in done):
            self._fire(self._on_queued, "")
        return done

    # -- reading -----------------------------------------------------------------------------

    async def next_deadlines(self, *, until: datetime, limit: int = 10_000) -> list[datetime]:
        """Deadlines of pending waits up to ``until`` (the scheduler's horizon), soonest first."""
        q = (
            sa.select(A.deadline)
            .where(A.state == PENDING, A.deadline.is_not(None), A.deadline <= until)
            .order_by(A.deadline)
            .limit(limit)
        )
        async with self._read() as conn:
            return list((await conn.execute(q)).scalars())

    async def signal_waits_resolved_by(self, name: str, key: str | None, by: str) -> list[str]:
        """Ids of the ``name``/``key`` signal waits that ``by`` resolved (one delivery of a
        webhook: a redelivery is answered from them)."""
        q = (
            sa.select(A.id)
            .where(
                A.kind == "signal",
                A.name == name,
                A.key.is_(None) if key is None else A.key == key,
                A.state == RESOLVED,
                A.resolved_by == by,
            )
            .order_by(A.created_at, A.id)
        )
        async with self._read() as conn:
            return list((await conn.execute(q)).scalars())

    async def get_wait(self, wait_id: str) -> Wait:
        async with self._read() as conn:
            row = (await conn.execute(sa.select(wait_t).where(A.id == wait_id))).first()
        if row is None:
            raise WaitNotFound(f"with id {wait_id!r}")
        return Wait(**row._mapping)

    async def list_waits(
        self,
        *,
        state: str | None = None,
        work_id: str | None = None,
        kind: str | None = None,
        limit: int = 100,
    ) -> list[Wait]:
        q = sa.select(wait_t).order_by(A.created_at, A.id).limit(limit)
        if state is not None:
            q = q.where(A.state == state)
        if work_id is not None:
            q = q.where(A.work_id == work_id)
        if kind is not None:
            q = q.where(A.kind == kind)
        async with self._read() as conn:
            return [Wait(**r._mapping) for r in await conn.execute(q)]


def _new_wait_row(conn: Connection, claim: Claim, spec: WaitSpec, now: datetime) -> dict[str, Any]:
    """A pending wait; it resumes on the channel of the work item's conversation."""
    conversation_id = spec.conversation_id or claim.conversation_id
    channel = spec.channel
    if channel is None and conversation_id is not None:
        channel = conn.execute(
            sa.select(conversation_t.c.channel).where(conversation_t.c.id == conversation_id)
        ).scalar_one_or_none()
    return {
        "id": new_id(),
        "work_id": claim.work_id,
        "step_seq": spec.seq,
        "kind": spec.kind,
        "name": spec.name,
        "key": spec.key,
        "token": None,
        "prompt": spec.prompt,
        "payload_schema": spec.payload_schema,
        "channel": channel,
        "conversation_id": conversation_id,
        "deadline": spec.deadline,
        "on_timeout": spec.on_timeout,
        "state": PENDING,
        "created_at": now,
    }
