"""Steps: memoization and replay, idempotency keys, retries, heartbeats, timeouts, determinism.

Every test runs real ``WorkerPool`` instances against the real ledger (SQLite and PostgreSQL).
Step functions count their executions in ``CALLS``, keyed by idempotency key, so a test can tell
a step that ran from one that was replayed.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import helpers_worker as hw
import pytest
from pydantic import BaseModel

from ledger import Ledger
from worker import (
    Context,
    HeartbeatTimeout,
    RetryPolicy,
    StepTimeout,
    agent,
    current_step,
)

ONE_TRY = RetryPolicy(max_attempts=1)

#: executions per idempotency key (``{work_id}:{seq}``)
CALLS: dict[str, int] = {}
#: what the agent saw each step return, per (work_id, work attempt)
SEEN: dict[tuple[str, int], list[Any]] = {}
#: step attempts seen from inside the step, per idempotency key
ATTEMPTS: dict[str, list[int]] = {}


def _count() -> int:
    key = current_step().idempotency_key
    CALLS[key] = CALLS.get(key, 0) + 1
    return CALLS[key]


def calls(work_id: str, seq: int) -> int:
    return CALLS.get(f"{work_id}:{seq}", 0)


# ---- memoization and replay -------------------------------------------------------------------


class Summary(BaseModel):
    text: str
    n: int


async def make_summary(n: int) -> Summary:
    _count()
    return Summary(text=f"summary {n}", n=n)


def plain(n: int) -> dict[str, Any]:
    _count()
    return {"n": n, "seq": current_step().seq}


async def third(fail_first: bool) -> int:
    if _count() == 1 and fail_first:
        raise RuntimeError("step three breaks on its first execution")
    return 3


@agent("t_steps_five")
async def five_steps(ctx: Context, inp: Any) -> dict[str, Any]:
    seen = SEEN.setdefault((ctx.work_id, ctx.attempt), [])
    seen.append(await ctx.step("one", make_summary, 1))
    seen.append(await ctx.step("two", plain, 2))
    seen.append(await ctx.step("three", third, bool(inp and inp.get("fail3")), retry=ONE_TRY))
    seen.append(await ctx.step("four", plain, 4))
    seen.append(await ctx.step("five", make_summary, 5))
    s1, s2, s3, s4, s5 = seen
    return {"total": s1.n + s2["n"] + s3 + s4["n"] + s5.n, "first": s1}


async def test_five_steps_run_once_each_and_are_recorded(ledger: Ledger) -> None:
    work = await hw.run_work(ledger, "t_steps_five", {})

    assert work.state == "succeeded", work.error
    assert work.result == {"total": 15, "first": {"text": "summary 1", "n": 1}}
    assert [calls(work.id, seq) for seq in range(1, 6)] == [1, 1, 1, 1, 1]
    steps = await ledger.list_steps(work.id)
    assert [(s.seq, s.name, s.status, s.attempt) for s in steps] == [
        (1, "one", "succeeded", 1),
        (2, "two", "succeeded", 1),
        (3, "three", "succeeded", 1),
        (4, "four", "succeeded", 1),
        (5, "five", "succeeded", 1),
    ]
    assert [s.idempotency_key for s in steps] == [f"{work.id}:{i}" for i in range(1, 6)]
    assert steps[0].output == {"text": "summary 1", "n": 1}
    types = await hw.event_types(ledger, work.id)
    assert types[:2] == ["created", "claimed"]
    assert types.count("step_completed") == 5
    assert types[-1] == "succeeded"


async def test_retried_work_replays_recorded_steps_and_reruns_the_failed_one(
    ledger: Ledger,
) -> None:
    work = await hw.run_work(ledger, "t_steps_five", {"fail3": True})
    assert work.state == "failed"
    assert work.error["type"] == "StepFailed"
    assert [calls(work.id, seq) for seq in range(1, 6)] == [1, 1, 1, 0, 0]
    first_run = SEEN[(work.id, 1)]
    assert len(first_run) == 2

    await ledger.retry_work(work.id)
    work = await hw.run_until(ledger, work.id)

    assert work.state == "succeeded", work.error
    assert work.attempt == 2
    # steps 1-2 replayed (not executed), step 3 executed again, 4-5 once
    assert [calls(work.id, seq) for seq in range(1, 6)] == [1, 1, 2, 1, 1]
    second_run = SEEN[(work.id, 2)]
    assert second_run[:2] == first_run
    assert type(second_run[0]) is Summary  # the declared return type is restored on replay
    assert second_run[0] == Summary(text="summary 1", n=1)
    assert second_run[1] == {"n": 2, "seq": 2}
    steps = await hw.steps_by_seq(ledger, work.id)
    assert (steps[3].status, steps[3].attempt) == ("succeeded", 2)
    assert (steps[1].attempt, steps[2].attempt) == (1, 1)
    types = await hw.event_types(ledger, work.id)
    assert types.count("retried") == 1
    assert types.count("step_completed") == 5  # one per step: replay records nothing again


# ---- current_step() and the idempotency key ---------------------------------------------------


def whoami_sync() -> dict[str, Any]:
    h = current_step()
    return {
        "work_id": h.work_id,
        "seq": h.seq,
        "name": h.name,
        "attempt": h.attempt,
        "key": h.idempotency_key,
    }


async def whoami_async() -> dict[str, Any]:
    await asyncio.sleep(0)
    return whoami_sync()


def _outside() -> str:
    try:
        current_step()
    except RuntimeError as exc:
        return f"RuntimeError: {exc}"
    return "no error"


@agent("t_steps_whoami")
async def whoami(ctx: Context, _inp: Any) -> dict[str, Any]:
    before = _outside()
    a = await ctx.step("first", whoami_sync)
    b = await ctx.step("second", whoami_async)
    c = await ctx.step("third", whoami_sync, heartbeat_timeout=5)  # runs in a thread
    return {"before": before, "a": a, "b": b, "c": c, "after": _outside()}


def test_current_step_outside_a_step_raises_runtime_error() -> None:
    with pytest.raises(RuntimeError, match="only available inside"):
        current_step()


async def test_current_step_gives_work_id_seq_name_attempt_and_key(ledger: Ledger) -> None:
    work = await hw.run_work(ledger, "t_steps_whoami")

    assert work.state == "succeeded", work.error
    r = work.result
    for field, seq, name in (("a", 1, "first"), ("b", 2, "second"), ("c", 3, "third")):
        assert r[field] == {
            "work_id": work.id,
            "seq": seq,
            "name": name,
            "attempt": 1,
            "key": f"{work.id}:{seq}",
        }
    assert r["before"].startswith("RuntimeError")
    assert r["after"].startswith("RuntimeError")  # reset once the step is over


# ---- retries ----------------------------------------------------------------------------------


@agent("t_steps_flaky")
async def flaky(ctx: Context, inp: dict[str, Any]) -> Any:
    exc_type = {"ValueError": ValueError, "KeyError": KeyError}[inp.get("exc", "ValueError")]
    policy = RetryPolicy(
        max_attempts=inp["max_attempts"],
        initial_delay=0.01,
        no_retry_on=(KeyError,) if inp.get("no_retry_on_key") else (),
    )

    def fails_n_times() -> str:
        h = current_step()
        ATTEMPTS.setdefault(h.idempotency_key, []).append(h.attempt)
        if _count() <= inp["fail_times"]:
            raise exc_type(f"failure number {CALLS[h.idempotency_key]}")
        return f"ok on attempt {h.attempt}"

    return await ctx.step("flaky", fails_n_times, retry=policy)


async def test_step_failing_twice_then_succeeding_is_retried(ledger: Ledger) -> None:
    work = await hw.run_work(ledger, "t_steps_flaky", {"fail_times": 2, "max_attempts": 3})

    assert work.state == "succeeded", work.error
    assert work.result == "ok on attempt 3"
    assert ATTEMPTS[f"{work.id}:1"] == [1, 2, 3]
    assert work.attempt == 1  # step retries are not work retries
    [step] = await ledger.list_steps(work.id)
    assert (step.status, step.attempt, step.idempotency_key) == ("succeeded", 3, f"{work.id}:1")
    step_events = [
        (e.type, e.data["attempt"])
        for e in await hw.events(ledger, work.id)
        if e.type.startswith("step_")
    ]
    assert ("step_failed", 1) in step_events
    assert ("step_failed", 2) in step_events
    assert step_events[-1] == ("step_completed", 3)
    assert [t for t, _ in step_events].count("step_failed") == 2
    failed1 = next(e for e in await hw.events(ledger, work.id) if e.type == "step_failed")
    assert failed1.data["error"]["type"] == "ValueError"


async def test_exhausted_retries_fail_the_work_with_step_failed(ledger: Ledger) -> None:
    work = await hw.run_work(ledger, "t_steps_flaky", {"fail_times": 99, "max_attempts": 3})

    assert work.state == "failed"
    assert calls(work.id, 1) == 3
    assert work.error["type"] == "StepFailed"
    assert "after 3 attempt(s)" in work.error["message"]
    assert "ValueError" in work.error["message"]
    assert isinstance(work.error["traceback"], str)
    assert "Traceback" in work.error["traceback"]
    assert "failure number 3" in work.error["traceback"]
    [step] = await ledger.list_steps(work.id)
    assert (step.status, step.attempt, step.error_type) == ("failed", 3, "ValueError")
    types = await hw.event_types(ledger, work.id)
    assert types.count("step_failed") == 3
    assert types[-1] == "failed"


async def test_no_retry_on_exception_fails_at_once(ledger: Ledger) -> None:
    work = await hw.run_work(
        ledger,
        "t_steps_flaky",
        {"fail_times": 99, "max_attempts": 5, "exc": "KeyError", "no_retry_on_key": True},
    )

    assert work.state == "failed"
    assert calls(work.id, 1) == 1
    assert "after 1 attempt(s)" in work.error["message"]
    assert "KeyError" in work.error["message"]
    [step] = await ledger.list_steps(work.id)
    assert (step.status, step.attempt, step.error_type) == ("failed", 1, "KeyError")


async def test_exceptions_not_listed_in_no_retry_on_are_retried(ledger: Ledger) -> None:
    work = await hw.run_work(
        ledger,
        "t_steps_flaky",
        {"fail_times": 1, "max_attempts": 5, "exc": "ValueError", "no_retry_on_key": True},
    )
    assert work.state == "succeeded", work.error
    assert calls(work.id, 1) == 2


def test_retry_policy_delays_back_off_and_are_capped() -> None:
    policy = RetryPolicy(initial_delay=0.5, backoff=2, max_delay=3, jitter=0)
    assert [policy.delay(n) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    jittered = RetryPolicy(initial_delay=1, jitter=0.2)
    assert all(0.8 <= jittered.delay(1) <= 1.2 for _ in range(50))
    assert policy.should_retry(2, ValueError()) and not policy.should_retry(3, ValueError())
    for bad in ({"max_attempts": 0}, {"backoff": 0.5}, {"jitter": 2}, {"initial_delay": -1}):
        with pytest.raises(ValueError):
            RetryPolicy(**bad)


# ---- heartbeats and timeouts ------------------------------------------------------------------


async def heartbeat_step(mode: str, beats: int) -> str:
    h = current_step()
    if mode == "silent" or (mode == "silent_first" and h.attempt == 1):
        _count()
        await asyncio.sleep(2)
        return "slept through"
    _count()
    for i in range(beats):
        await asyncio.sleep(0.1)
        h.heartbeat({"done": i + 1, "of": beats})
    return f"beat {beats} times on attempt {h.attempt}"


def heartbeat_step_sync(beats: int) -> dict[str, Any]:
    h = current_step()
    for i in range(beats):
        time.sleep(0.1)
        current_step().heartbeat({"done": i + 1})
    return {"thread": threading.get_ident(), "key": h.idempotency_key}


@agent("t_steps_heartbeat")
async def heartbeat_agent(ctx: Context, inp: dict[str, Any]) -> Any:
    policy = RetryPolicy(max_attempts=inp["max_attempts"], initial_delay=0.01)
    if inp["mode"] == "sync":
        out = await ctx.step(
            "beat", heartbeat_step_sync, inp["beats"], heartbeat_timeout=0.3, retry=policy
        )
        return {**out, "loop_thread": threading.get_ident()}
    return await ctx.step(
        "beat", heartbeat_step, inp["mode"], inp["beats"], heartbeat_timeout=0.3, retry=policy
    )


async def test_silent_step_times_out_and_is_retried(ledger: Ledger) -> None:
    started = time.monotonic()
    work = await hw.run_work(
        ledger, "t_steps_heartbeat", {"mode": "silent_first", "beats": 3, "max_attempts": 2}
    )
    elapsed = time.monotonic() - started

    assert work.state == "succeeded", work.error
    assert work.result == "beat 3 times on attempt 2"
    assert elapsed < 1.8  # the silent attempt was cut at 0.3 s, not left to sleep 2 s
    assert calls(work.id, 1) == 2
    timeouts = [e for e in await hw.events(ledger, work.id) if e.type == "heartbeat_timeout"]
    assert len(timeouts) == 1
    assert timeouts[0].data["attempt"] == 1
    assert timeouts[0].data["error"]["type"] == "HeartbeatTimeout"
    [step] = await ledger.list_steps(work.id)
    assert (step.status, step.attempt) == ("succeeded", 2)


async def test_silent_step_exhausting_its_attempts_fails_the_work(ledger: Ledger) -> None:
    work = await hw.run_work(
        ledger, "t_steps_heartbeat", {"mode": "silent", "beats": 0, "max_attempts": 2}
    )

    assert work.state == "failed"
    assert work.error["type"] == "StepFailed"
    assert HeartbeatTimeout.__name__ in work.error["message"]
    [step] = await ledger.list_steps(work.id)
    assert (step.status, step.attempt, step.error_type) == ("failed", 2, "HeartbeatTimeout")
    assert "no heartbeat for 0.3s" in step.error["message"]
    types = await hw.event_types(ledger, work.id)
    assert types.count("heartbeat_timeout") == 2
    assert "step_failed" not in types


async def test_heartbeating_step_outlives_its_heartbeat_timeout_and_records_progress(
    ledger: Ledger,
) -> None:
    work = await hw.run_work(
        ledger, "t_steps_heartbeat", {"mode": "beat", "beats": 10, "max_attempts": 1}
    )

    assert work.state == "succeeded", work.error
    assert work.result == "beat 10 times on attempt 1"
    [step] = await ledger.list_steps(work.id)
    assert (step.status, step.attempt) == ("succeeded", 1)
    assert step.progress is not None
    assert step.progress["of"] == 10 and 1 <= step.progress["done"] <= 10
    assert step.last_heartbeat_at is not None
    assert "heartbeat_timeout" not in await hw.event_types(ledger, work.id)


async def test_sync_step_with_heartbeat_timeout_runs_in_a_thread_and_can_heartbeat(
    ledger: Ledger,
) -> None:
    work = await hw.run_work(
        ledger, "t_steps_heartbeat", {"mode": "sync", "beats": 8, "max_attempts": 1}
    )

    assert work.state == "succeeded", work.error
    assert work.result["thread"] != work.result["loop_thread"]
    assert work.result["key"] == f"{work.id}:1"
    [step] = await ledger.list_steps(work.id)
    assert (step.status, step.attempt) == ("succeeded", 1)
    assert step.progress is not None and 1 <= step.progress["done"] <= 8


async def test_retried_attempt_is_recorded_running_with_its_heartbeat_progress(
    ledger: Ledger,
) -> None:
    """The row of a failed attempt is taken over by the next attempt: running, then progress."""
    work = await hw.run_work(
        ledger, "t_steps_heartbeat", {"mode": "silent_first", "beats": 3, "max_attempts": 2}
    )
    assert work.state == "succeeded", work.error
    [step] = await ledger.list_steps(work.id)
    assert step.progress is not None
    history = await hw.events(ledger, work.id)
    assert 2 in [e.data["attempt"] for e in history if e.type == "step_started"]


async def sleeper(seconds: float) -> float:
    _count()
    await asyncio.sleep(seconds)
    return seconds


@agent("t_steps_timeout")
async def timeout_agent(ctx: Context, _inp: Any) -> float:
    await ctx.step("quick", sleeper, 0.01, timeout=1.0, retry=ONE_TRY)
    return await ctx.step("slow", sleeper, 2.0, timeout=0.2, retry=ONE_TRY)


async def test_step_exceeding_its_timeout_fails_with_step_timeout(ledger: Ledger) -> None:
    started = time.monotonic()
    work = await hw.run_work(ledger, "t_steps_timeout")

    assert time.monotonic() - started < 1.8
    assert work.state == "failed"
    assert work.error["type"] == "StepFailed"
    assert StepTimeout.__name__ in work.error["message"]
    steps = await hw.steps_by_seq(ledger, work.id)
    assert steps[1].status == "succeeded"
    assert (steps[2].status, steps[2].error_type) == ("failed", "StepTimeout")
    assert "ran past 0.2s" in steps[2].error["message"]


# ---- non-determinism --------------------------------------------------------------------------

#: the step names the next run of ``t_steps_names`` asks for (tests change it mid-flight)
STEP_NAMES: list[str] = ["a", "b", "c"]


def named(name: str) -> str:
    _count()
    if name == "c":
        raise RuntimeError("step c always fails")
    return name


@agent("t_steps_names")
async def names_agent(ctx: Context, _inp: Any) -> list[str]:
    return [await ctx.step(name, named, name, retry=ONE_TRY) for name in list(STEP_NAMES)]


@pytest.fixture
def step_names() -> Any:
    saved = list(STEP_NAMES)
    yield STEP_NAMES
    STEP_NAMES[:] = saved


async def test_changed_step_order_stops_replay_with_non_determinism_error(
    ledger: Ledger, step_names: list[str]
) -> None:
    step_names[:] = ["a", "b", "c"]
    work = await hw.run_work(ledger, "t_steps_names")
    assert work.state == "failed"
    assert work.error["type"] == "StepFailed"

    step_names[:] = ["a", "x"]
    await ledger.retry_work(work.id)
    work = await hw.run_until(ledger, work.id)

    assert work.state == "failed"
    assert work.error["type"] == "NonDeterminismError"
    assert "'b'" in work.error["message"] and "'x'" in work.error["message"]
    assert "step 2" in work.error["message"]
    steps = await ledger.list_steps(work.id)
    assert [(s.name, s.status) for s in steps] == [
        ("a", "succeeded"),
        ("b", "succeeded"),
        ("c", "failed"),
    ]
    assert [calls(work.id, seq) for seq in (1, 2, 3)] == [1, 1, 1]  # nothing ran on replay


def end_step() -> str:
    if _count() == 1:
        raise RuntimeError("the last step fails on its first execution")
    return "end"


@agent("t_steps_names_tolerant")
async def tolerant_names_agent(ctx: Context, _inp: Any) -> list[str]:
    """Agent code that tolerates failing steps with a broad ``except Exception``."""
    done = []
    for name in list(STEP_NAMES):
        try:
            done.append(await ctx.step(name, named, name, retry=ONE_TRY))
        except Exception as exc:
            done.append(f"{name} skipped ({type(exc).__name__})")
    done.append(await ctx.step("end", end_step, retry=ONE_TRY))
    return done


async def test_non_determinism_is_not_silenced_by_agent_code_catching_exception(
    ledger: Ledger, step_names: list[str]
) -> None:
    step_names[:] = ["a", "b"]
    work = await hw.run_work(ledger, "t_steps_names_tolerant")
    assert work.state == "failed"
    assert [calls(work.id, seq) for seq in (1, 2, 3)] == [1, 1, 1]

    step_names[:] = ["a", "x"]
    await ledger.retry_work(work.id)
    work = await hw.run_until(ledger, work.id)

    assert work.state == "failed", work.result
    assert work.error["type"] == "NonDeterminismError"
    assert "'b'" in work.error["message"] and "'x'" in work.error["message"]
    assert [calls(work.id, seq) for seq in (1, 2, 3)] == [1, 1, 1]  # "end" did not run again


# ---- results that are not JSON ----------------------------------------------------------------


NOT_JSON = {"object": object, "nan": lambda: float("nan"), "inf": lambda: float("inf")}


def returns_not_json(kind: str) -> object:
    _count()
    return NOT_JSON[kind]()


@agent("t_steps_not_json")
async def not_json_agent(ctx: Context, kind: str) -> Any:
    return await ctx.step("opaque", returns_not_json, kind)


@agent("t_steps_agent_not_json")
async def agent_not_json(ctx: Context, kind: str) -> Any:
    await ctx.step("fine", plain, 1)
    return NOT_JSON[kind]()


@pytest.mark.parametrize("kind", ["object", "nan"])
async def test_step_returning_a_non_json_value_fails_clearly_without_retries(
    ledger: Ledger, kind: str
) -> None:
    work = await hw.run_work(ledger, "t_steps_not_json", kind)

    assert work.state == "failed"
    assert work.error["type"] == "StepResultNotSerializable"
    assert "JSON" in work.error["message"]
    assert "'opaque'" in work.error["message"]
    assert calls(work.id, 1) == 1  # a result that cannot be stored is not worth retrying
    [step] = await ledger.list_steps(work.id)
    assert (step.status, step.error_type) == ("failed", "StepResultNotSerializable")


@pytest.mark.parametrize("kind", ["object", "inf"])
async def test_agent_returning_a_non_json_value_fails_the_work(ledger: Ledger, kind: str) -> None:
    work = await hw.run_work(ledger, "t_steps_agent_not_json", kind)

    assert work.state == "failed"  # not stuck in `running` after a refused write
    assert "not JSON" in work.error["message"]
    assert work.result is None
