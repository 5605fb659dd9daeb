"""A SIGKILLed worker never asks the model again for an answer it already recorded.

A real ``tether worker`` subprocess runs the built-in ``llm`` agent against the fake
OpenAI-compatible server (``tests/fakes/openai_api.py``), which runs in this test process and so
outlives the worker. The model's first answer asks for ``http_get`` on a page that hangs the
first time: the worker sits inside that step, after the model-call step was committed. The test
SIGKILLs it there; the scheduler subprocess reaps the lease (TTL 1 s) and a fresh worker
finishes the item. The fake must have seen the first model call exactly once: the new worker
replayed it from the ledger. On SQLite and on PostgreSQL.
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from procs import ProcessGroup, wait_until

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fakes"))

from openai_api import FakeOpenAI, text, tool_calls

from ledger import Ledger

LEASE_TTL = 1.0
REAPER_INTERVAL = 0.2
MODEL = "gpt-4o-mini"
PRICES = {MODEL: {"input": 100.0, "output": 200.0}}


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as server:
        yield server


async def test_sigkill_after_a_model_call_replays_it_from_the_ledger(
    ledger: Ledger, db_url: str, procs: ProcessGroup, fake: FakeOpenAI
) -> None:
    page = fake.page("slow", "the answer is 42", first_delay=60)
    fake.queue(tool_calls(("http_get", {"url": page})), text("It says 42."))
    settings = {
        "lease_ttl": LEASE_TTL,
        "reaper_interval": REAPER_INTERVAL,
        "agent_modules": "worker.agents",
        "default_agent": "llm",
        "TETHER_MODEL_BASE_URL": fake.base_url,
        "TETHER_MODEL_API_KEY": "test-key",
        "TETHER_MODEL": MODEL,
        "TETHER_MODEL_PRICES": json.dumps(PRICES),
    }
    scheduler = procs.scheduler(db_url, **settings)
    first = procs.worker(db_url, **settings)
    await scheduler.wait_ready()
    await first.wait_ready()
    work, _ = await ledger.create_work("llm", {"text": "what is on the page?"})

    async def in_http_get() -> bool:
        steps = {s.seq: s for s in await ledger.list_steps(work.id)}
        call = steps.get(2)
        return (
            call is not None
            and call.name == "model_call"
            and call.status == "succeeded"
            and fake.pages["slow"].hits == 1
        )

    await wait_until(in_http_get, 30, lambda: f"the worker to sit in http_get\n{procs.tails()}")
    assert len(fake.requests) == 1
    first.kill()  # after the model call was recorded, before the next step was

    second = procs.worker(db_url, **settings)
    await second.wait_ready()

    async def finished() -> bool:
        return (await ledger.get_work(work.id)).state in ("succeeded", "failed", "cancelled")

    await wait_until(finished, 30, lambda: f"work {work.id} to finish\n{procs.tails()}", 0.05)
    done = await ledger.get_work(work.id)
    assert done.state == "succeeded", (done.error, procs.tails())
    assert done.result == {"replies": ["It says 42."], "turns": 2}
    assert done.attempt == 2  # one lease expired: the killed worker's

    # the first model call reached the model exactly once; the second once, after recovery
    assert len(fake.requests) == 2
    firsts = [b for b in fake.chat_bodies if b["messages"][-1]["role"] == "user"]
    assert len(firsts) == 1
    assert fake.chat_bodies[1]["messages"][-1]["role"] == "tool"
    assert "the answer is 42" in fake.chat_bodies[1]["messages"][-1]["content"]
    assert fake.pages["slow"].hits == 2  # the step in flight ran again, as it may

    steps = {s.seq: s for s in await ledger.list_steps(work.id)}
    assert [s.name for s in steps.values()] == [
        "history", "model_call", "http_get", "model_call", "reply"
    ]  # fmt: skip
    assert steps[2].attempt == 1 and steps[2].cost == pytest.approx(0.002)
    assert steps[3].attempt == 2  # killed mid-flight in attempt 1
    types = [e.type for e in await ledger.list_events(work.id)]
    assert types.count("lease_expired") == 1, types
    assert [e for e in types if e == "step_completed"].count("step_completed") == 5
    usage = await ledger.work_usage(work.id)
    assert usage.calls == 2 and usage.cost == pytest.approx(0.004)
