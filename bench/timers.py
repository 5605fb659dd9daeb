"""Durable timers at scale: how late do 100,000 timers fire, and what does the scheduler cost?

Run: ``python bench/timers.py [--db sqlite|postgres|both] [--timers 100000] [--spread 60]``.
PostgreSQL from ``TETHER_BENCH_POSTGRES_URL`` (default the local server, database
``tether_bench_timers``, recreated); SQLite in a temporary file.

Set-up writes rows directly (a benchmark may): ``--timers`` work items in ``waiting``, each
parked on one pending timer wait, with deadlines spread uniformly over ``--spread`` seconds
starting ``--lead`` seconds after the set-up began. Then ONE scheduler runs in its own process
(``SchedulerService`` from the settings, exactly what ``tether scheduler`` runs, plus a note of
when each ``fire_due_waits`` call returned, appended to a file); its RSS (``/proc/PID/status``
VmRSS) is sampled every 0.5 s until every wait is resolved.

Two lateness figures per timer: *recorded* ``resolved_at - deadline`` as the ledger stores it
(``resolved_at`` is stamped when the firing transaction starts), and *committed*: from the
deadline to the return of the call whose commit made the item ``queued`` again, i.e. when a
worker can see it. Targets: recorded lateness p99 <= 1 s, scheduler RSS <= 300 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from ledger import Ledger, new_id, utcnow
from ledger.schema import wait_t, work_t

REPO = Path(__file__).resolve().parent.parent
PG_ADMIN = os.environ.get(
    "TETHER_BENCH_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
)
PG_DB = "tether_bench_timers"
BATCH = 5000
TARGET_P99 = 1.0
TARGET_RSS_MB = 300.0


async def fresh_db(kind: str, tmp: Path) -> str:
    if kind == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp / f'timers-{time.monotonic_ns()}.db'}"
    else:
        admin = make_url(PG_ADMIN)
        conn = await asyncpg.connect(
            admin.set(drivername="postgresql").render_as_string(hide_password=False)
        )
        await conn.execute(f"DROP DATABASE IF EXISTS {PG_DB} WITH (FORCE)")
        await conn.execute(f"CREATE DATABASE {PG_DB}")
        await conn.close()
        url = admin.set(database=PG_DB).render_as_string(hide_password=False)
    led = await Ledger.open(url, migrate=True)
    await led.close()
    return url


def rows_for(deadlines: list[datetime], now: datetime) -> tuple[list[dict], list[dict]]:
    """Work rows parked in ``waiting`` on step 1, and their pending timer waits."""
    works, waits = [], []
    for deadline in deadlines:
        work_id, wait_id = new_id(), new_id()
        works.append(
            {
                "id": work_id,
                "agent": "bench_sleeper",
                "state": "waiting",
                "attempt": 1,
                "max_attempts": 5,
                "priority": 0,
                "lease_epoch": 1,
                "wait_reason": f"timer {wait_id}",
                "state_reason": "waiting",
                "state_detail": {"kind": "timer", "wait_id": wait_id},
                "created_at": now,
                "updated_at": now,
            }
        )
        waits.append(
            {
                "id": wait_id,
                "work_id": work_id,
                "step_seq": 1,
                "kind": "timer",
                "deadline": deadline,
                "on_timeout": "fail",
                "state": "pending",
                "created_at": now,
            }
        )
    return works, waits


async def insert_timers(url: str, n: int, first: datetime, spread: float) -> None:
    led = await Ledger.open(url)
    try:
        engine = led.engines.write
        for i in range(0, n, BATCH):
            count = min(BATCH, n - i)
            deadlines = [first + timedelta(seconds=spread * (i + j) / n) for j in range(count)]
            works, waits = rows_for(deadlines, utcnow())
            async with engine.begin() as conn:
                await conn.execute(sa.insert(work_t), works)
                await conn.execute(sa.insert(wait_t), waits)
    finally:
        await led.close()


#: ``tether scheduler`` with a note of when each due wait was committed as fired.
SCHEDULER = """
import asyncio, logging, signal, sys, time
import tether.cli, tether.roles  # what `tether scheduler` has loaded (for a fair RSS)
from config import load_settings
from ledger import Ledger
from scheduler import SchedulerService

async def main(out):
    settings = load_settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    led = await Ledger.open(settings.database_url, sqlite_synchronous=settings.sqlite_synchronous)
    fire = led.fire_due_waits
    async def noted(**kw):
        done = await fire(**kw)
        now = time.time()
        out.write("".join(f"{wait_id} {now:.6f}\\n" for wait_id, _ in done))
        return done
    led.fire_due_waits = noted
    svc = SchedulerService(led, reaper_interval=settings.reaper_interval)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, svc.stop)
    try:
        await svc.run()
    finally:
        await led.close()

with open(sys.argv[1], "w", buffering=1 << 16) as out:
    asyncio.run(main(out))
"""


def start_scheduler(
    url: str, log_path: Path, fired_path: Path
) -> tuple[subprocess.Popen[bytes], Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    env.update(
        TETHER_DATABASE_URL=url,
        TETHER_LOG_LEVEL="INFO",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    )
    log = open(log_path, "wb")  # noqa: SIM115 -- closed by the caller
    proc = subprocess.Popen(
        [sys.executable, "-c", SCHEDULER, str(fired_path)],
        env=env,
        cwd=log_path.parent,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return proc, log


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


async def count_pending(led: Ledger) -> int:
    q = sa.select(sa.func.count()).select_from(wait_t).where(wait_t.c.state == "pending")
    async with led.engines.read.connect() as conn:
        return (await conn.execute(q)).scalar_one()


def pct(values: list[float], p: float) -> float:
    return values[min(len(values) - 1, int(len(values) * p))]


async def run_one(kind: str, n: int, spread: float, lead: float, tmp: Path) -> dict[str, Any]:
    url = await fresh_db(kind, tmp)
    t0 = utcnow()
    first = t0 + timedelta(seconds=lead)
    started = time.perf_counter()
    await insert_timers(url, n, first, spread)
    insert_s = time.perf_counter() - started

    log_path = tmp / f"scheduler-{kind}.log"
    fired_path = tmp / f"fired-{kind}.txt"
    proc, log = start_scheduler(url, log_path, fired_path)
    led = await Ledger.open(url)
    peak = 0.0
    try:
        give_up = time.monotonic() + 120
        while b"scheduler running" not in log_path.read_bytes():
            if proc.poll() is not None or time.monotonic() > give_up:
                raise RuntimeError(f"scheduler did not start:\n{log_path.read_text()[-2000:]}")
            peak = max(peak, rss_mb(proc.pid))
            await asyncio.sleep(0.05)
        ready_in = (utcnow() - first).total_seconds()
        if ready_in > 0:
            print(
                f"warning [{kind}]: the scheduler was ready {ready_in:.1f}s after the first "
                f"deadline (set-up took {insert_s:.1f}s); use a larger --lead",
                file=sys.stderr,
            )
        give_up = time.monotonic() + lead + spread + 300
        while True:
            peak = max(peak, rss_mb(proc.pid))
            if proc.poll() is not None:
                raise RuntimeError(f"scheduler exited:\n{log_path.read_text()[-2000:]}")
            left = await count_pending(led)
            if left == 0:
                break
            if time.monotonic() > give_up:
                raise RuntimeError(f"{left} timers still pending")
            await asyncio.sleep(0.5)
        peak = max(peak, rss_mb(proc.pid))
        async with led.engines.read.connect() as conn:
            rows = (
                await conn.execute(
                    sa.select(wait_t.c.id, wait_t.c.deadline, wait_t.c.resolved_at, wait_t.c.state)
                )
            ).all()
            queued = (
                await conn.execute(
                    sa.select(sa.func.count()).select_from(work_t).where(work_t.c.state == "queued")
                )
            ).scalar_one()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        await led.close()
    if len(rows) != n or {r.state for r in rows} != {"resolved"} or queued != n:
        raise RuntimeError(f"not every timer fired once: {len(rows)} waits, {queued} queued")
    committed_at: dict[str, float] = {}
    for line in fired_path.read_text().splitlines():
        wait_id, at = line.split()
        committed_at[wait_id] = float(at)
    if len(committed_at) != n:
        raise RuntimeError(f"the scheduler noted {len(committed_at)} fired waits, not {n}")
    late = sorted((r.resolved_at - r.deadline).total_seconds() for r in rows)
    committed = sorted(committed_at[r.id] - r.deadline.timestamp() for r in rows)
    return {
        "kind": kind,
        "insert_s": insert_s,
        "p50": statistics.median(late),
        "p99": pct(late, 0.99),
        "max": late[-1],
        "c_p50": statistics.median(committed),
        "c_p99": pct(committed, 0.99),
        "c_max": committed[-1],
        "rss": peak,
    }


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    ap.add_argument("--timers", type=int, default=100_000)
    ap.add_argument("--spread", type=float, default=60.0, help="seconds the deadlines span")
    ap.add_argument("--lead", type=float, default=10.0, help="seconds until the first deadline")
    args = ap.parse_args()
    kinds = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    results = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        for kind in kinds:
            results.append(await run_one(kind, args.timers, args.spread, args.lead, Path(tmp_dir)))
    head = ("database", "timers", "spread s", "recorded lateness p50 ms", "p99 ms", "max ms",
            "committed p50 ms", "p99 ms", "max ms", "peak RSS MB",
            "targets (p99 <= 1 s, RSS <= 300 MB)")  # fmt: skip
    rows = []
    for r in results:
        ok = r["p99"] <= TARGET_P99 and r["rss"] <= TARGET_RSS_MB
        rows.append(
            (
                r["kind"],
                f"{args.timers:,}",
                f"{args.spread:g}",
                f"{r['p50'] * 1000:.0f}",
                f"{r['p99'] * 1000:.0f}",
                f"{r['max'] * 1000:.0f}",
                f"{r['c_p50'] * 1000:.0f}",
                f"{r['c_p99'] * 1000:.0f}",
                f"{r['c_max'] * 1000:.0f}",
                f"{r['rss']:.0f}",
                "met" if ok else "MISSED",
            )
        )
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))
    print(f"| {line} |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) + " |")
    print(
        "(one scheduler process; recorded = resolved_at - deadline, committed = when the firing "
        "transaction returned - deadline; set-up took "
        + ", ".join(f"{r['kind']} {r['insert_s']:.1f}s" for r in results)
        + ")"
    )


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main())
