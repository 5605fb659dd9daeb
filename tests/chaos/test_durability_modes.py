"""Durability modes under SIGKILL: what a crash may re-run, and what it never may.

``batched`` and ``exit`` items keep pure steps' records pending (in the group-commit queue, or
in memory) until a semantic boundary. A worker SIGKILLed in the middle of the second run of pure
steps loses exactly those pending records: after recovery those pure steps run again, while no
``side_effect=True`` step and no outbound message is repeated, and the item ends with the result
an uninterrupted run gives. ``sync`` items: a step that returned has its record, always, also
with 8 items committing at once through the shared group commit.

Runs on SQLite and PostgreSQL, with real ``tether worker`` processes.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import pytest
import sqlalchemy as sa
from procs import ProcessGroup, wait_until

from ledger import Ledger

LEASE_TTL = 1.0
N = 10  # pure steps per phase
EXPECTED_TOTAL = sum(i * i for i in range(2 * N))
# seqs: a0..a9 = 1..10, charge = 11, reply = 12, b10..b19 = 13..22, notify = 23, reply = 24
PHASE_B = range(13, 23)


def effect_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def step_rows(ledger: Ledger, work_id: str) -> dict[int, tuple[str, str, str | None]]:
    async with ledger.engines.read.connect() as conn:
        rows = await conn.execute(
            sa.text("SELECT seq, name, status, durability FROM step WHERE work_id = :w"),
            {"w": work_id},
        )
        return {r.seq: (r.name, r.status, r.durability) for r in rows}


@pytest.mark.parametrize("mode", ["batched", "exit"])
async def test_sigkill_reruns_only_pending_pure_steps(
    mode: str, ledger: Ledger, db_url: str, procs: ProcessGroup, tmp_path: Path
) -> None:
    effects = tmp_path / "effects.txt"
    settings = {
        "lease_ttl": LEASE_TTL,
        "agent_modules": "durability_agents",
        # a long group-commit window: batched records stay pending until a boundary
        "TETHER_GROUP_COMMIT_MS": "5000",
    }
    scheduler = procs.scheduler(db_url, reaper_interval=0.2, **settings)
    config = json.dumps({"effects": str(effects), "n": N, "sleep": 0.05})
    accepted = await ledger.accept_message(
        channel="http", chat_id="dur", text=config, message_id=f"m-{mode}", agent=f"mixed_{mode}"
    )
    work_id = accepted.work_id
    assert work_id is not None
    first = procs.worker(db_url, **settings)

    # Kill once the charge is done and four phase-B pure steps ran after it.
    def four_after_charge() -> bool:
        lines = effect_lines(effects)
        return (
            any(line.startswith("effect:") for line in lines)
            and sum(
                line.startswith("pure:") and int(line.rsplit(":", 1)[1]) in PHASE_B
                for line in lines
            )
            >= 4
        )

    await wait_until(four_after_charge, 30, lambda: procs.tails())
    first.kill()
    before_restart = effect_lines(effects)
    recorded_at_kill = await step_rows(ledger, work_id)
    await scheduler.wait_ready()
    procs.worker(db_url, **settings)

    async def finished() -> bool:
        return (await ledger.get_work(work_id)).state in {"succeeded", "failed"}

    await wait_until(finished, 60, lambda: procs.tails(), interval=0.05)
    work = await ledger.get_work(work_id)
    assert work.state == "succeeded", (work.error, procs.tails())
    assert work.result == {
        "total": EXPECTED_TOTAL,
        "charged": f"{work_id}:11",
        "notified": f"{work_id}:23",
    }

    lines = effect_lines(effects)
    runs = Counter(lines)
    effects_run = {k: n for k, n in runs.items() if k.startswith("effect:")}
    assert effects_run == {f"effect:{work_id}:11": 1, f"effect:{work_id}:23": 1}
    outbox = await ledger.list_outbox(work_id=work_id)
    assert sorted(m.payload["text"] for m in outbox) == [
        f"charged {work_id}:11",
        f"total {EXPECTED_TOTAL}",
    ]

    # What the kill lost: the phase-B pure steps that ran before it had no record yet (they
    # were pending), and exactly those ran again. Phase A was flushed before the charge.
    ran_before = {
        int(line.rsplit(":", 1)[1]) for line in before_restart if line.startswith("pure:")
    }
    pending_at_kill = sorted(s for s in ran_before if s not in recorded_at_kill)
    rerun = sorted(
        int(k.rsplit(":", 1)[1]) for k, n in runs.items() if k.startswith("pure:") and n > 1
    )
    print(f"[{ledger.dialect} {mode}] pure steps re-run after SIGKILL: {rerun}")
    assert rerun == pending_at_kill
    assert len(rerun) >= 4 and set(rerun) <= set(PHASE_B)
    assert all(s in recorded_at_kill for s in range(1, 13)), recorded_at_kill  # flushed

    final = await step_rows(ledger, work_id)
    assert sorted(final) == list(range(1, 25))
    assert {final[s][2] for s in PHASE_B} == {mode}
    assert final[11][2] == final[23][2] == "sync"  # side effects are always committed at once


async def test_sync_steps_are_durable_when_they_return(
    ledger: Ledger, db_url: str, procs: ProcessGroup, tmp_path: Path
) -> None:
    """8 items at once through one worker's group commit; SIGKILL at a random moment: every
    step that had returned (the agent wrote ``returned:...`` after it) has its record."""
    effects = tmp_path / "effects.txt"
    for _ in range(8):
        await ledger.create_work("sync_witness", {"effects": str(effects), "n": 400})
    worker = procs.worker(db_url, concurrency=8, agent_modules="durability_agents")

    def returned_enough() -> bool:
        return len(effect_lines(effects)) >= 300

    await wait_until(returned_enough, 60, lambda: procs.tails())
    await asyncio.sleep(0.05)
    worker.kill()
    returned = [line.split(":", 1)[1] for line in effect_lines(effects)]
    async with ledger.engines.read.connect() as conn:
        rows = await conn.execute(
            sa.text("SELECT work_id, seq FROM step WHERE status = 'succeeded'")
        )
        recorded = {f"{r.work_id}:{r.seq}" for r in rows}
    missing = [key for key in returned if key not in recorded]
    assert not missing, f"{len(missing)} returned steps without a record, e.g. {missing[:5]}"
    per_item = Counter(key.rsplit(":", 1)[0] for key in returned)
    print(f"[{ledger.dialect}] {len(returned)} steps returned before the kill across "
          f"{len(per_item)} items; every one recorded")  # fmt: skip
    assert len(per_item) >= 2  # the items really ran concurrently
