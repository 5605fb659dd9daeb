"""Scale-out chaos: SIGKILLed gateways, workers and schedulers, and a PostgreSQL restart, under a
steady stream of signed Telegram and Slack messages, button clicks, webhook signals and timers.

The topology (``tests/support/scale_out.py``): a throwaway PostgreSQL cluster started for this
test (``tests/support/pg_cluster.py``; the machine's shared server is never touched), 2
``tether gateway`` processes on their own ports, 3 ``tether worker`` and 2 ``tether scheduler``
processes, fake Telegram and Slack servers, and a load generator driving 200 conversations over
both gateways: ``echo``, ``/approve`` + a click on the prompt, ``/hook`` + a signed Standard
Webhooks POST, ``/remind`` (a 1 s durable timer), one command at a time per conversation.
Requests that are not answered 2xx (connection refused or reset, timeout, 5xx) are re-sent with
the same update / event / delivery id until they are. A chaos driver SIGKILLs a process every
1.5-3 s and restarts it (a process still starting is not killed, nor the last gateway that
serves); half-way, right after a worker kill, it crash-stops PostgreSQL for 3 s. Afterwards,
from the ledger, the fakes' logs and the agent's effects file: every accepted message has
exactly one work item, every accepted click / signal resolved exactly one wait, all work
succeeded, the outbox drained, no recorded step ran again, and in every conversation the
replies arrived complete and in order; duplicates are counted, and each must trace back to an
``unknown`` delivery that was re-sent. The summary table (messages, kills per role, lost,
duplicated, latency percentiles and where the time went) is printed: ``-s`` to see it.

The CI run (the default): 14 kills, each of the 7 processes killed twice, about 2 minutes on a
quiet 2-core machine (up to 3 when the machine is busy: a gateway restart imports aiogram,
about 10 s of CPU, before it listens). The full run, 1,000 kills (about an hour)::

    TETHER_CHAOS_SCALE_KILLS=1000 .venv/bin/python -m pytest tests/chaos/test_scale_out.py -s

Knobs (environment): ``TETHER_CHAOS_SCALE_KILLS`` (default 14), ``TETHER_CHAOS_SCALE_SEED``
(default: fresh, printed in the table and in every failure), ``TETHER_CHAOS_SCALE_CONVERSATIONS``
(200), ``TETHER_CHAOS_SCALE_THINK`` (seconds a conversation pauses between commands,
``10,25``), ``TETHER_CHAOS_SCALE_INTERVAL`` (seconds between kills, ``1.5,3``),
``TETHER_CHAOS_SCALE_MIN_SECONDS`` (the least time the load runs, for a baseline without kills),
``TETHER_CHAOS_SCALE_PG_RESTART`` (``0``: no PostgreSQL restart),
``TETHER_CHAOS_SCALE_DELIVERY_LEASE`` (the gateways' outbox claim, default 10 s; ``0`` keeps
Tether's hard-coded 60 s), ``TETHER_CHAOS_SCALE_OPERATOR`` (``inspect``: the operator abandons
an ``unknown`` delivery the chat already shows and re-sends the others; ``resend``: re-sends
all of them blindly, so duplicates appear and must be traced), ``TETHER_CHAOS_SCALE_LOG_LEVEL``.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest
from pg_cluster import PgUnavailable, find_pg_bin
from scale_out import (
    EffectLine,
    History,
    LedgerView,
    OutboxRow,
    Request,
    ScaleConfig,
    WaitRow,
    WorkRow,
    check_history,
    kill_schedule,
    run_scale_out,
)


async def test_scale_out_survives_kills_and_a_postgres_restart(tmp_path: Path) -> None:
    try:
        find_pg_bin()
    except PgUnavailable as exc:
        pytest.fail(f"the scale-out chaos test needs a PostgreSQL server installation: {exc}")
    cfg = ScaleConfig.from_env()
    report = await run_scale_out(cfg, tmp_path)
    print()
    print(report.table())
    for e in report.self_exits:
        print(f"exited on its own: {e.process} rc={e.returncode} ready={e.was_ready} "
              f"(PostgreSQL outage: {e.during_pg_outage})\n{e.tail}")  # fmt: skip
    print(report.diagnostics)
    print(f"process logs: {report.log_dir}")
    say = f"[{cfg.describe()}]"
    problems = report.problems
    assert not problems, (
        f"{say}\n" + "\n".join(problems) + "\n" + report.table() + "\n" + report.diagnostics
    )
    if cfg.kills >= 14:
        for slot, n in sorted(report.kills_by_slot.items()):
            assert n >= 2, f"{say}: {slot} was killed {n} time(s), not at least twice"
    assert report.pg_restarts == (1 if cfg.pg_restart and cfg.kills else 0), say
    assert report.requests["message"] > 0 and report.requests["click"] > 0, say
    assert report.requests["signal"] > 0, say


# -- the checker can fail ------------------------------------------------------------------------

TG = "telegram:700000"


def _good() -> History:
    """Two commands in one conversation (an echo and an approval), all well."""
    t = 1000.0
    requests = [
        Request("message", TG, "123456:1", "t0000-1", t, t + 0.01, 1),
        Request("message", TG, "123456:2", "t0000-2", t + 2, t + 2.01, 2),
        Request("click", TG, "wait-2", "t0000-2", t + 3, t + 3.01, 1),
    ]
    ledger = LedgerView(
        work=[
            WorkRow("w1", "telegram", "123456:1", TG, "succeeded"),
            WorkRow("w2", "telegram", "123456:2", TG, "succeeded"),
        ],
        waits=[WaitRow("wait-2", "w2", "approval", None, "resolved", "telegram:tguser0")],
        outbox=[
            OutboxRow(1, TG, "echo t0000-1", "sent"),
            OutboxRow(2, TG, "Approve t0000-2?", "sent"),
            OutboxRow(3, TG, "Approved: t0000-2", "sent"),
        ],
        effect_records={"w1:1": t + 0.5, "w2:1": t + 2.5},
    )
    expected = {TG: ["echo t0000-1", "Approve t0000-2?", "Approved: t0000-2"]}
    observed = {TG: list(expected[TG])}
    effects = [EffectLine("w1:1", t + 0.4, 11), EffectLine("w2:1", t + 2.4, 12)]
    return History(requests, expected, observed, ledger, effects)


def test_checker_accepts_a_good_history() -> None:
    v = check_history(_good())
    assert v.problems == [] and (v.lost, v.duplicated, v.out_of_order) == (0, 0, 0)


def test_checker_flags_forged_bad_histories() -> None:
    # a duplicate reply that no unknown delivery explains
    h = _good()
    h.observed[TG].append("echo t0000-1")
    v = check_history(h)
    assert v.duplicated == 1 and v.traced_duplicates == 0
    assert any("without an unknown delivery" in p for p in v.problems), v.problems
    # ... and the same duplicate, traced to a row that was unknown and re-sent, is only counted
    h.ledger.outbox[0].resent = 1
    v = check_history(h)
    assert (v.duplicated, v.traced_duplicates, v.problems) == (1, 1, [])

    # a lost message: an accepted message whose reply never arrived
    h = _good()
    h.observed[TG].remove("echo t0000-1")
    v = check_history(h)
    assert v.lost == 1 and any("lost ['echo t0000-1']" in p for p in v.problems), v.problems

    # replies out of order
    h = _good()
    h.observed[TG] = ["Approve t0000-2?", "echo t0000-1", "Approved: t0000-2"]
    v = check_history(h)
    assert v.out_of_order == 1 and any("out of order" in p for p in v.problems), v.problems

    # an accepted message with no work item, and one with two
    h = _good()
    h.ledger.work = [h.ledger.work[1], h.ledger.work[1]]
    problems = check_history(h).problems
    assert any("123456:1 (telegram:700000 t0000-1): 0 work items" in p for p in problems)
    assert any("123456:2 (telegram:700000 t0000-2): 2 work items" in p for p in problems)

    # a recorded step whose body ran again after its record
    h = _good()
    h.effects.append(EffectLine("w1:1", 1000.0 + 7.0, 13))
    assert any("ran AGAIN" in p for p in check_history(h).problems)
    # ... whereas a body interrupted before its record may run twice (same key)
    h = _good()
    h.effects.insert(0, EffectLine("w1:1", 1000.0 + 0.2, 10))
    v = check_history(h)
    assert v.problems == [] and v.effect_reruns == 1

    # an accepted click that resolved nothing, unfinished work, an undelivered reply
    h = _good()
    h.ledger.waits[0].state = "pending"
    h.ledger.work[1].state = "waiting"
    h.ledger.outbox[2].state = "unknown"
    problems = check_history(h).problems
    assert any("click on wait wait-2" in p for p in problems)
    assert any("work w2" in p and "waiting" in p for p in problems)
    assert any("outbox 3" in p and "unknown" in p for p in problems)

    # a reply recorded twice in the outbox (a replayed reply step)
    h = _good()
    h.ledger.outbox.append(OutboxRow(4, TG, "echo t0000-1", "sent"))
    assert any("2 outbox rows" in p for p in check_history(h).problems)

    # a webhook signal that resolved two waits; work for a message that was never acked 2xx
    h = _good()
    h.requests.append(Request("signal", TG, "msg_t0000-3", "t0000-3", 1009.0, 1009.1, 1))
    by = "webhook:scale:msg_t0000-3"
    h.ledger.waits += [WaitRow(f"s{i}", "w3", "signal", "t0000-3", "resolved", by) for i in (1, 2)]
    h.requests.append(Request("message", TG, "123456:4", "t0000-4", 1010.0, None, 3))
    h.ledger.work.append(WorkRow("w4", "telegram", "123456:4", TG, "succeeded"))
    problems = check_history(h).problems
    assert any("signal msg_t0000-3 (telegram:700000): resolved 2 waits" in p for p in problems)
    assert any("work w4" in p and "never answered 2xx" in p for p in problems)


def test_kill_schedule_kills_every_process_twice() -> None:
    import random

    schedule = kill_schedule(14, random.Random(1))
    counts: dict[str, int] = defaultdict(int)
    for slot in schedule:
        counts[slot] += 1
    assert len(schedule) == 14 and set(counts.values()) == {2} and len(counts) == 7
    assert len(kill_schedule(1000, random.Random(2))) == 14  # the driver picks the rest
    assert len(kill_schedule(5, random.Random(3))) == 5
