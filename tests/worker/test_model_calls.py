"""Model calls as metered steps, budgets and the ``llm`` agent, on SQLite and PostgreSQL.

Everything talks to the fake OpenAI-compatible server of ``tests/fakes/openai_api.py`` through
the real ``openai`` client; nothing calls a real provider. Prices in these tests are 100 USD
per 1M input tokens and 200 USD per 1M output tokens, and the fake answers with 10 input and 5
output tokens, so every call costs exactly $0.002.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai  # noqa: F401  (imported up front, not by the first model call of a test)
import pytest
from helpers_worker import running_pool, steps_by_seq, wait_until
from helpers_worker import wait_for_state as _wait_for_state

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fakes"))

from openai_api import (
    FakeOpenAI,
    context_length_exceeded,
    rate_limited,
    server_error,
    text,
    tool_calls,
)

import worker.agents  # noqa: F401  (registers the llm agent)
from config import SettingsError, load_settings
from ledger import Ledger
from worker import Context, agent
from worker import model_calls as mc
from worker.agents.llm import TOOLS
from worker.model_calls import ModelRuntime, PartialOutput, listen_partial_output

#: generous: these tests share the machine with the rest of the suite
TIMEOUT = 30.0
MODEL = "gpt-4o-mini"
ANSWERED = "gpt-4o-mini-2024-07-18"
PRICES = {MODEL: {"input": 100.0, "output": 200.0}}
CALL_COST = 0.002


async def wait_for_state(ledger: Ledger, work_id: str, *args: Any, **kwargs: Any) -> Any:
    kwargs.setdefault("timeout", TIMEOUT)
    return await _wait_for_state(ledger, work_id, *args, **kwargs)


def ask(content: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": content}]


@agent("mc_once")
async def once(ctx: Context, input: dict[str, Any]) -> str | None:
    out = await ctx.model_call(messages=ask(input["text"]), stream=bool(input.get("stream")))
    return out.content


@agent("mc_twice")
async def twice(ctx: Context, input: Any) -> list[str | None]:
    first = await ctx.model_call(messages=ask("one"))
    second = await ctx.model_call(messages=[*ask("one"), first.message, *ask("two")])
    return [first.content, second.content]


@agent("mc_budgeted", budget_per_work=0.002)
async def budgeted(ctx: Context, input: Any) -> list[str | None]:
    return await twice(ctx, input)


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as server:
        yield server


def runtime(fake: FakeOpenAI, **overrides: Any) -> ModelRuntime:
    settings: dict[str, Any] = {
        "base_url": fake.base_url,
        "api_key": "test-key",
        "model": MODEL,
        "prices": PRICES,
        "backoff_initial": 0.05,
        **overrides,
    }
    return ModelRuntime(**settings)


async def chat(ledger: Ledger, chat_id: str, text_: str, n: int) -> str:
    accepted = await ledger.accept_message(
        channel="http", chat_id=chat_id, text=text_, message_id=f"{chat_id}-{n}", agent="llm"
    )
    assert accepted.work_id is not None
    return accepted.work_id


# -- the llm agent -------------------------------------------------------------------------------


async def test_two_turn_tool_calling_conversation_records_every_model_call(
    ledger: Ledger, fake: FakeOpenAI
) -> None:
    page = fake.page("hello", "hello from the page")
    fake.queue(
        tool_calls(("http_get", {"url": page})),
        text("The page says hello."),
        tool_calls(("reply", {"text": "You're welcome!"})),
        text(""),
    )
    async with running_pool(ledger, models=runtime(fake)) as pool:
        first = await chat(ledger, "c-two-turn", "What does the page say?", 1)
        done = await wait_for_state(ledger, first, pool=pool)
        assert done.state == "succeeded", done.error
        assert done.result == {"replies": ["The page says hello."], "turns": 2}
        second = await chat(ledger, "c-two-turn", "thanks", 2)
        done = await wait_for_state(ledger, second, pool=pool)
        assert done.state == "succeeded", done.error
        assert done.result == {"replies": ["You're welcome!"], "turns": 2}

    assert len(fake.requests) == 4
    bodies = fake.chat_bodies
    assert all(b["model"] == MODEL for b in bodies)
    assert [t["function"]["name"] for t in bodies[0]["tools"]] == [
        t["function"]["name"] for t in TOOLS
    ]
    # turn 1: the tool's result went back to the model
    tool_msg = bodies[1]["messages"][-1]
    assert tool_msg["role"] == "tool" and "hello from the page" in tool_msg["content"]
    assert bodies[1]["messages"][-2]["tool_calls"][0]["function"]["name"] == "http_get"
    # turn 2: the conversation so far came from the ledger
    history = [(m["role"], m.get("content")) for m in bodies[2]["messages"][1:]]
    assert history == [
        ("user", "What does the page say?"),
        ("assistant", "The page says hello."),
        ("user", "thanks"),
    ]

    steps = await steps_by_seq(ledger, first)
    assert [s.name for s in steps.values()] == [
        "history", "model_call", "http_get", "model_call", "reply"
    ]  # fmt: skip
    calls = [steps[2], steps[4]]
    for step, body, finish in zip(calls, bodies[:2], ("tool_calls", "stop"), strict=True):
        assert step.status == "succeeded"
        assert step.model == MODEL
        assert step.model_answered == ANSWERED
        assert step.prompt_fingerprint == mc.prompt_fingerprint(
            MODEL, body["messages"], body["tools"]
        )
        assert (step.input_tokens, step.output_tokens, step.total_tokens) == (10, 5, 15)
        assert step.cost == pytest.approx(CALL_COST)
        assert step.finish_reason == finish
        assert step.latency_ms is not None and 0 <= step.latency_ms < 5000
        assert step.output_committed is True
    assert steps[2].tool_calls == [
        {"id": steps[2].output["tool_calls"][0]["id"], "name": "http_get",
         "arguments": json.dumps({"url": page})}
    ]  # fmt: skip
    assert steps[4].tool_calls == []
    assert steps[3].output["status"] == 200 and steps[3].output["text"] == "hello from the page"
    assert steps[1].model is None and steps[1].cost is None  # not a model call

    messages = await ledger.list_messages(done.conversation_id)
    assert [(m["direction"], m["text"]) for m in messages] == [
        ("in", "What does the page say?"),
        ("out", "The page says hello."),
        ("in", "thanks"),
        ("out", "You're welcome!"),
    ]
    usage = await ledger.work_usage(first)
    assert (usage.calls, usage.total_tokens, usage.unpriced_calls) == (2, 30, 0)
    assert usage.cost == pytest.approx(2 * CALL_COST)


async def test_llm_agent_without_a_conversation_uses_its_input_and_handles_bad_tools(
    ledger: Ledger, fake: FakeOpenAI
) -> None:
    fake.queue(
        tool_calls(("no_such_tool", {}), ("http_get", {"url": "file:///etc/passwd"})),
        text("Done."),
    )
    work, _ = await ledger.create_work("llm", {"text": "hi"})
    async with running_pool(ledger, models=runtime(fake)) as pool:
        done = await wait_for_state(ledger, work.id, pool=pool)
    assert done.state == "succeeded", done.error
    assert done.result == {"replies": ["Done."], "turns": 2}
    assert fake.chat_bodies[0]["messages"][1:] == [{"role": "user", "content": "hi"}]
    results = [json.loads(m["content"]) for m in fake.chat_bodies[1]["messages"][-2:]]
    assert results == [
        {"error": "there is no tool named 'no_such_tool'"},
        {"error": "only http:// and https:// URLs can be fetched"},
    ]


# -- errors and retries --------------------------------------------------------------------------


async def test_rate_limit_retry_comes_no_earlier_than_retry_after(
    ledger: Ledger, fake: FakeOpenAI
) -> None:
    fake.queue(rate_limited(retry_after=1), text("ok"))
    work, _ = await ledger.create_work("mc_once", {"text": "hi"})
    async with running_pool(ledger, models=runtime(fake)) as pool:
        done = await wait_for_state(ledger, work.id, pool=pool)
    assert done.state == "succeeded", done.error
    assert done.result == "ok"
    first, second = fake.requests
    assert first.status == 429 and second.status == 200
    assert second.at - first.at >= 1.0
    step = (await steps_by_seq(ledger, work.id))[1]
    assert step.attempt == 1 and step.output["requests"] == 2


async def test_server_errors_are_retried_then_give_up_with_a_clear_error(
    ledger: Ledger, fake: FakeOpenAI
) -> None:
    fake.queue(server_error(500), server_error(503), text("ok"))
    work, _ = await ledger.create_work("mc_once", {"text": "hi"})
    async with running_pool(ledger, models=runtime(fake)) as pool:
        done = await wait_for_state(ledger, work.id, pool=pool)
        assert done.state == "succeeded", done.error
        assert [r.status for r in fake.requests] == [500, 503, 200]

        fake.queue(server_error(502), server_error(500), server_error(500))
        work, _ = await ledger.create_work("mc_once", {"text": "again"})
        pool.models = runtime(fake, max_retries=2)
        done = await wait_for_state(ledger, work.id, pool=pool)
    assert done.state == "failed"
    assert done.error["type"] == "StepFailed"
    assert "ModelUnavailable" in done.error["message"]
    assert "still failing after 3 request(s): 500" in done.error["message"]
    assert len(fake.requests) == 6


async def test_context_length_error_fails_the_step_at_once(
    ledger: Ledger, fake: FakeOpenAI
) -> None:
    fake.queue(context_length_exceeded(), text("never asked for"))
    work, _ = await ledger.create_work("mc_once", {"text": "a very long prompt"})
    async with running_pool(ledger, models=runtime(fake)) as pool:
        done = await wait_for_state(ledger, work.id, pool=pool)
    assert done.state == "failed"
    message = done.error["message"]
    assert "ContextLengthExceeded" in message
    assert f"the prompt does not fit the context window of model {MODEL!r}" in message
    assert "maximum context length is 8192 tokens" in message
    assert len(fake.requests) == 1  # no retry
    step = (await steps_by_seq(ledger, work.id))[1]
    assert (step.status, step.error_type, step.attempt) == ("failed", "ContextLengthExceeded", 1)
    assert step.cost is None and step.output_committed is None


async def test_unknown_model_price_records_cost_null_and_warns(
    ledger: Ledger, fake: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    fake.queue(text("ok"))
    work, _ = await ledger.create_work("mc_once", {"text": "hi"})
    caplog.set_level(logging.WARNING, logger="worker.model_calls")
    async with running_pool(ledger, models=runtime(fake, prices={})) as pool:
        done = await wait_for_state(ledger, work.id, pool=pool)
    assert done.state == "succeeded", done.error
    step = (await steps_by_seq(ledger, work.id))[1]
    assert step.cost is None and step.total_tokens == 15
    assert any("no price for model" in r.getMessage() for r in caplog.records)
    usage = await ledger.work_usage(work.id)
    assert (usage.calls, usage.cost, usage.unpriced_calls) == (1, 0.0, 1)


# -- budgets -------------------------------------------------------------------------------------


async def test_work_budget_crossed_waits_for_the_operator_then_approve_continues(
    ledger: Ledger, fake: FakeOpenAI
) -> None:
    fake.queue(text("first"), text("second"))
    work, _ = await ledger.create_work("mc_twice", None)
    async with running_pool(ledger, models=runtime(fake, budget_per_work=CALL_COST)) as pool:
        await wait_for_state(ledger, work.id, {"waiting"}, pool=pool)
        assert len(fake.requests) == 1
        (wait,) = await ledger.list_waits(work_id=work.id, state="pending")
        assert (wait.kind, wait.name, wait.channel) == ("approval", "budget:work", "operator")
        assert wait.prompt.startswith("budget exceeded: spent $0.002 of $0.002 for this work")
        await ledger.resolve_wait(wait.id, {"decision": "approve"}, by="operator")
        done = await wait_for_state(ledger, work.id, pool=pool)
    assert done.state == "succeeded", done.error
    assert done.result == ["first", "second"]
    assert len(fake.requests) == 2
    steps = await steps_by_seq(ledger, work.id)
    assert [s.name for s in steps.values()] == ["model_call", "budget:work", "model_call"]
    assert steps[2].output["resolution"]["approved"] is True
    usage = await ledger.budget_usage(work.id, None)
    assert usage.work_raises == 1 and usage.work_spent == pytest.approx(2 * CALL_COST)


async def test_agent_budget_denied_fails_the_work_with_a_clear_reason(
    ledger: Ledger, fake: FakeOpenAI
) -> None:
    fake.queue(text("first"), text("never asked for"))
    work, _ = await ledger.create_work("mc_budgeted", None)
    async with running_pool(ledger, models=runtime(fake)) as pool:  # the agent's own budget
        await wait_for_state(ledger, work.id, {"waiting"}, pool=pool)
        (wait,) = await ledger.list_waits(work_id=work.id, state="pending")
        await ledger.resolve_wait(
            wait.id, {"decision": "deny", "comment": "enough"}, by="operator:ann"
        )
        done = await wait_for_state(ledger, work.id, pool=pool)
    assert done.state == "failed"
    assert done.error["type"] == "BudgetExceeded"
    assert done.error["message"] == (
        "budget exceeded: spent $0.002 of $0.002 for this work item (agent mc_budgeted); "
        "operator:ann denied raising it (enough)"
    )
    assert len(fake.requests) == 1


async def test_conversation_budget_crossed_mid_conversation_asks_the_operator_only(
    ledger: Ledger, fake: FakeOpenAI
) -> None:
    fake.queue(text("hello"), text("hello again"))
    models = runtime(fake, budget_per_conversation=CALL_COST)
    async with running_pool(ledger, models=models) as pool:
        first = await chat(ledger, "c-budget", "hi", 1)
        assert (await wait_for_state(ledger, first, pool=pool)).state == "succeeded"
        second = await chat(ledger, "c-budget", "hi again", 2)
        waiting = await wait_for_state(ledger, second, {"waiting"}, pool=pool)
        (wait,) = await ledger.list_waits(work_id=second, state="pending")
        assert wait.name == "budget:conversation" and wait.channel == "operator"
        assert wait.prompt.startswith("budget exceeded: spent $0.002 of $0.002 for this conv")
        # the question is for the operator: nothing was posted in the chat
        texts = [m["text"] for m in await ledger.list_messages(waiting.conversation_id)]
        assert texts == ["hi", "hello", "hi again"]
        await ledger.resolve_wait(wait.id, {"decision": "approve"}, by="operator")
        done = await wait_for_state(ledger, second, pool=pool)
    assert done.state == "succeeded", done.error
    assert done.result["replies"] == ["hello again"]
    usage = await ledger.budget_usage(second, done.conversation_id)
    assert usage.conversation_raises == 1
    assert usage.conversation_spent == pytest.approx(2 * CALL_COST)


# -- streaming -----------------------------------------------------------------------------------


async def test_streamed_call_publishes_partials_and_records_only_the_final_text(
    ledger: Ledger, fake: FakeOpenAI
) -> None:
    fake.queue(text("streaming is fun"))
    seen: list[PartialOutput] = []
    work, _ = await ledger.create_work("mc_once", {"text": "hi", "stream": True})
    stop = listen_partial_output(seen.append, work.id)
    try:
        async with running_pool(ledger, models=runtime(fake)) as pool:
            done = await wait_for_state(ledger, work.id, pool=pool)
    finally:
        stop()
    assert done.state == "succeeded", done.error
    assert done.result == "streaming is fun"
    assert fake.chat_bodies[0]["stream"] is True
    texts = [p.text for p in seen]
    assert texts[0] == "stre" and texts[-1] == "streaming is fun" and seen[-1].done
    assert all(b.startswith(a) for a, b in itertools.pairwise(texts))
    step = (await steps_by_seq(ledger, work.id))[1]
    assert step.output["content"] == "streaming is fun" and step.output["streamed"] is True
    assert (step.total_tokens, step.cost) == (15, pytest.approx(CALL_COST))


# -- fingerprints and settings -------------------------------------------------------------------

FINGERPRINT_SNIPPET = """
import json, sys
from worker.model_calls import prompt_fingerprint
args = json.loads(sys.stdin.read())
print(prompt_fingerprint(args["model"], args["messages"], args["tools"], args["params"]))
"""


def test_prompt_fingerprints_are_stable_across_processes_and_follow_the_prompt() -> None:
    messages = [{"role": "user", "content": "héllo ✓", "name": "ann"}]
    tools = TOOLS[:2]
    params = {"temperature": 0.2, "max_tokens": 100}
    here = mc.prompt_fingerprint(MODEL, messages, tools, params)
    assert here.startswith("sha256:") and len(here) == 7 + 64
    # another process, another hash seed, keys in another order: the same fingerprint
    reordered = {
        "model": MODEL,
        "messages": [dict(reversed(list(m.items()))) for m in messages],
        "tools": tools,
        "params": dict(reversed(list(params.items()))),
    }
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    root = Path(__file__).resolve().parents[2]
    there = subprocess.run(
        [sys.executable, "-c", FINGERPRINT_SNIPPET],
        input=json.dumps(reordered),
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        check=True,
        timeout=60,
    ).stdout.strip()
    assert there == here
    # delivery options are not part of the prompt ...
    assert mc.prompt_fingerprint(MODEL, messages, tools, {**params, "stream": True}) == here
    # ... but every part of the prompt is
    changed = [
        mc.prompt_fingerprint(MODEL, [{**messages[0], "content": "hello ✓"}], tools, params),
        mc.prompt_fingerprint("gpt-4o", messages, tools, params),
        mc.prompt_fingerprint(MODEL, messages, TOOLS[:1], params),
        mc.prompt_fingerprint(MODEL, messages, tools, {**params, "temperature": 0.3}),
    ]
    assert len({here, *changed}) == 5


def test_bad_price_table_is_one_line_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_MODEL_PRICES", '{"gpt-4o-mini": {"input": 0.15, "output": 0.6}')
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert len(err.value.problems) == 1
    assert str(err.value).startswith("TETHER_MODEL_PRICES: must be a JSON object")
    assert "\n" not in str(err.value)
    monkeypatch.setenv("TETHER_MODEL_PRICES", '{"gpt-4o-mini": {"input": 0.15}}')
    with pytest.raises(SettingsError, match=r"^TETHER_MODEL_PRICES\.gpt-4o-mini\.output: is req"):
        load_settings()
    monkeypatch.setenv("TETHER_MODEL_PRICES", '{"gpt-4o-mini": {"input": 0.15, "output": 0.6}}')
    monkeypatch.setenv("TETHER_BUDGET_PER_WORK", "0")
    with pytest.raises(SettingsError, match=r"^TETHER_BUDGET_PER_WORK: must be greater than 0"):
        load_settings()
    monkeypatch.setenv("TETHER_BUDGET_PER_WORK", "0.5")
    monkeypatch.setenv("TETHER_MODEL_API_KEY", "sk-secret")
    models = ModelRuntime.from_settings(load_settings())
    assert models.price_of(MODEL, ANSWERED) == mc.Price(0.15, 0.6)  # by prefix
    assert models.price_of("llama3", "llama3") is None
    assert (models.budget_per_work, models.api_key, models.model) == (0.5, "sk-secret", MODEL)


async def test_without_a_runtime_the_worker_reads_the_settings(
    ledger: Ledger, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TETHER_MODEL_BASE_URL", fake.base_url)
    monkeypatch.setenv("TETHER_MODEL", "local-llama")
    monkeypatch.setattr(mc, "_default_runtime", None)
    fake.queue(text("from the settings"))
    work, _ = await ledger.create_work("mc_once", {"text": "hi"})
    async with running_pool(ledger) as pool:
        done = await wait_for_state(ledger, work.id, pool=pool)
    assert done.state == "succeeded", done.error
    assert fake.chat_bodies[0]["model"] == "local-llama"
    assert fake.requests[0].headers["Authorization"] == "Bearer not-needed"


async def test_a_recorded_call_is_not_asked_again_after_the_lease_is_lost(
    ledger: Ledger, fake: FakeOpenAI
) -> None:
    """In-process version of the crash test: the pool that made the call disappears after the
    step was recorded; the next run replays the call from the ledger."""
    page = fake.page("slow", "finally", first_delay=30)
    fake.queue(tool_calls(("http_get", {"url": page})), text("It says finally."))
    work, _ = await ledger.create_work("llm", "what is on the slow page?")
    models = runtime(fake)
    async with running_pool(ledger, models=models, shutdown_grace=0.1) as pool:
        await wait_until(lambda: fake.pages["slow"].hits == 1, what="the slow page was asked")
        await wait_for_state(ledger, work.id, {"running"}, pool=pool)
    # the stopped pool released the item mid-http_get; a new pool finishes it
    async with running_pool(ledger, models=models) as pool:
        started = time.monotonic()
        done = await wait_for_state(ledger, work.id, pool=pool)
    assert done.state == "succeeded", done.error
    assert time.monotonic() - started < 25  # the slow page is slow only the first time
    assert len(fake.requests) == 2  # the first model call was answered from the ledger
    assert fake.pages["slow"].hits == 2


def test_agent_budgets_must_be_positive() -> None:
    for bad in (0, -1.0):
        with pytest.raises(ValueError, match="budget_per_work must be a positive amount"):
            agent("mc_bad_budget", budget_per_work=bad)
    with pytest.raises(ValueError, match="budget_per_conversation must be a positive amount"):
        agent("mc_bad_budget", budget_per_conversation=float("nan"))
