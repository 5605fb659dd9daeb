"""Real ``tether worker`` processes on PostgreSQL: crash recovery time, and scale-out.

Run: ``python bench/workers.py [--only recovery|scaling] [--runs N] [--quick]``. PostgreSQL from
``TETHER_BENCH_POSTGRES_URL`` (default the local server; database ``bench_workers``, recreated
for every run and dropped at the end). The processes are started, signalled and reaped by
``tests/support/procs.py`` (the chaos tests' helper: a clean ``TETHER_*`` environment, one log
file each, SIGKILL on our own death); they run the agents of ``bench/bench_agents.py``.

Recovery. One ``tether scheduler`` (the lease reaper, every ``--reapers`` seconds) and worker A
(``--concurrency 50``), both with ``TETHER_LEASE_TTL`` = ``--lease-ttl``. 50 items of
``bench_sleep`` (one 600-second step) are submitted; once A holds all 50 and every one is inside
its step (the step's ``running`` record is written), A gets SIGKILL. Worker B (also 50 slots)
is either started right after the kill (a fresh process: Python start-up and imports overlap
the wait for the leases), or was started, and was ready and idle, before it (the usual
scale-out deployment, where other workers are already up). Measured: from the kill to all 50
items ``running`` again under B's lease (epoch 2), with the parts: A's last lease expiry (the
latest ``lease_expires_at`` A had renewed to, read just before the kill), the reaper requeueing
the last of them (``lease_expired`` events), B ready (its "running" log line), B's last claim
(``claimed`` events). Target (issue): recovery <= lease TTL + 1 s. Rows for the default reaper
interval (2 s) and for 0.5 s.

Scaling. ``--items`` (2,000) items of ``bench_trivial3`` (three trivial steps) are all submitted
first, then 1, 2 and 4 ``tether worker`` processes (8 slots each, default settings otherwise)
are started at once; timed until every item has succeeded. Two rates: *processing*, items over
the span from the first ``claimed`` event to the last success (what the workers sustain), and
*wall*, items over the span from spawning the processes (Python start-up, imports, the first
claim) to the last success.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "support")]

import asyncpg  # noqa: E402
import sqlalchemy as sa  # noqa: E402
from procs import ProcessGroup, TetherProcess, wait_until  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from ledger import Ledger  # noqa: E402
from ledger.schema import event_t, step_t, work_t  # noqa: E402

PG_ADMIN = os.environ.get(
    "TETHER_BENCH_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
)
PG_DB = "bench_workers"
HELD = 50


def _dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def _admin(*sql: str) -> None:
    conn = await asyncpg.connect(_dsn(PG_ADMIN), timeout=10)
    try:
        for s in sql:
            await conn.execute(s)
    finally:
        await conn.close()


async def fresh_db() -> str:
    await _admin(f"DROP DATABASE IF EXISTS {PG_DB} WITH (FORCE)", f"CREATE DATABASE {PG_DB}")
    url = make_url(PG_ADMIN).set(database=PG_DB).render_as_string(hide_password=False)
    led = await Ledger.open(url, migrate=True)
    await led.close()
    return url


def ts(value: datetime) -> float:
    """A ledger timestamp as ``time.time()`` seconds (naive values are UTC)."""
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


def log_time(proc: TetherProcess, text: str) -> float | None:
    """``time.time()`` of the first log line containing ``text`` (the log's own timestamp)."""
    for line in proc.log().splitlines():
        if text in line:
            stamp = " ".join(line.split()[:2])  # "2026-11-26 05:38:05,753"
            try:
                local = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f")
            except ValueError:
                return None
            return local.timestamp()
    return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a live process has used (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def scalar(led: Ledger, query: Any) -> Any:
    async with led.engines.read.connect() as conn:
        return (await conn.execute(query)).scalar_one()


def table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) + " |")


# -- recovery -----------------------------------------------------------------------------------


async def recovery_once(
    tmp: Path, lease_ttl: float, reaper: float, standby: bool
) -> dict[str, float]:
    url = await fresh_db()
    group = ProcessGroup(tmp / f"recovery-{time.monotonic_ns()}")
    settings = {"lease_ttl": lease_ttl, "reaper_interval": reaper, "log_level": "INFO",
                "poll_interval": 1.0,
                "agent_modules": "bench_agents", "default_agent": "bench_sleep"}  # fmt: skip
    led = await Ledger.open(url)
    try:
        scheduler = group.scheduler(url, **settings)
        worker_a = group.worker(url, concurrency=HELD, **settings)
        await scheduler.wait_ready(60)
        await worker_a.wait_ready(60)
        ids = [(await led.create_work("bench_sleep", {"sleep": 600}))[0].id for _ in range(HELD)]
        in_step = (
            sa.select(sa.func.count())
            .select_from(step_t)
            .where(step_t.c.work_id.in_(ids), step_t.c.status == "running")
        )
        await wait_until(lambda: _count_is(led, in_step, HELD), 60, "50 items inside their step")
        await asyncio.sleep(0.2)
        if standby:  # B is up (and idle: A holds everything) before the kill
            worker_b = group.worker(url, concurrency=HELD, **settings)
            await worker_b.wait_ready(60)
        expires = sa.select(sa.func.max(work_t.c.lease_expires_at)).where(work_t.c.id.in_(ids))
        last_expiry = ts(await scalar(led, expires))
        killed_at = time.time()
        worker_a.kill()
        if not standby:
            worker_b = group.worker(url, concurrency=HELD, **settings)
        reclaimed = (
            sa.select(sa.func.count())
            .select_from(work_t)
            .where(work_t.c.id.in_(ids), work_t.c.state == "running", work_t.c.lease_epoch >= 2)
        )
        await wait_until(
            lambda: _count_is(led, reclaimed, HELD),
            lease_ttl + reaper + 120,
            lambda: f"50 items reclaimed\n{group.tails()}",
            interval=0.01,
        )
        recovered_at = time.time()
        async with led.engines.read.connect() as conn:
            reaped = (
                await conn.execute(
                    sa.select(sa.func.max(event_t.c.created_at)).where(
                        event_t.c.work_id.in_(ids), event_t.c.type == "lease_expired"
                    )
                )
            ).scalar_one()
            claims = (
                await conn.execute(
                    sa.select(event_t.c.created_at).where(
                        event_t.c.work_id.in_(ids), event_t.c.type == "claimed"
                    )
                )
            ).all()
        claims_after = sorted(ts(c.created_at) for c in claims if ts(c.created_at) > killed_at)
        b_ready = log_time(worker_b, " running ")
        if standby:
            b_ready = killed_at  # shown as 0: it was ready before
        return {
            "recovery": recovered_at - killed_at,
            "expiry": last_expiry - killed_at,
            "reaped": ts(reaped) - killed_at if reaped else float("nan"),
            "b_ready": b_ready - killed_at if b_ready else float("nan"),
            "claimed": claims_after[-1] - killed_at if claims_after else float("nan"),
        }
    finally:
        await led.close()
        group.cleanup()


async def _count_is(led: Ledger, query: Any, n: int) -> bool:
    return await scalar(led, query) >= n


async def recovery(args: argparse.Namespace, tmp: Path) -> None:
    rows = []
    configs = [(standby, reaper) for standby in (False, True) for reaper in args.reapers]
    for standby, reaper in configs:
        runs = []
        for r in range(args.runs):
            res = await recovery_once(tmp, args.lease_ttl, reaper, standby)
            print(
                f"  recovery {'standby' if standby else 'started after the kill'} "
                f"reaper {reaper:g}s run {r + 1}: "
                + ", ".join(f"{k} {v:.2f}s" for k, v in res.items()),
                file=sys.stderr,
                flush=True,
            )
            runs.append(res)

        def med(key: str, runs: list[dict[str, float]] = runs) -> float:
            return statistics.median(x[key] for x in runs)

        worst = max(x["recovery"] for x in runs)
        target = args.lease_ttl + 1.0
        verdict = (
            "met" if med("recovery") <= target else f"MISSED by {med('recovery') - target:.2f} s"
        )
        if med("recovery") <= target < worst:
            verdict += f" (worst run missed by {worst - target:.2f} s)"
        rows.append(
            (
                "already running" if standby else "started after the kill",
                f"{args.lease_ttl:g}",
                f"{reaper:g}" + (" (default)" if reaper == 2.0 else ""),
                f"{med('expiry'):.2f}",
                f"{med('reaped'):.2f}",
                f"{med('b_ready'):.2f}",
                f"{med('claimed'):.2f}",
                f"{med('recovery'):.2f}",
                f"{min(x['recovery'] for x in runs):.2f}-{worst:.2f}",
                f"<= {target:g} s: {verdict}",
            )
        )
    print(
        f"\nRecovery: SIGKILL a worker holding {HELD} items inside a long step; a second worker "
        "takes them over (PostgreSQL); seconds after the kill"
    )
    table(
        ("second worker", "lease TTL s", "reaper every s", "last lease expired",
         "last requeued", "new worker ready", "last claimed", "all 50 running again",
         "min-max", "target (issue)"),
        rows,
    )  # fmt: skip
    print(f"(median of {args.runs} runs per row; 'all 50 running again' = every item running "
          "under the new worker's lease, epoch 2)")  # fmt: skip


# -- scaling ------------------------------------------------------------------------------------


async def _submit(led: Ledger, n: int) -> None:
    sem = asyncio.Semaphore(8)

    async def one() -> None:
        async with sem:
            await led.create_work("bench_trivial3", None)

    await asyncio.gather(*(one() for _ in range(n)))


async def scaling_once(tmp: Path, workers: int, items: int) -> dict[str, Any]:
    url = await fresh_db()
    group = ProcessGroup(tmp / f"scaling-{workers}-{time.monotonic_ns()}")
    settings = {"agent_modules": "bench_agents", "default_agent": "bench_trivial3",
                "lease_ttl": 30.0, "poll_interval": 1.0, "log_level": "INFO"}  # fmt: skip
    led = await Ledger.open(url)
    try:
        await _submit(led, items)
        spawned_at = time.time()
        procs = [group.worker(url, concurrency=8, **settings) for _ in range(workers)]
        at_ready: dict[int, float] = {}  # CPU seconds each process had used when it was ready

        async def all_done() -> bool:
            for p in procs:
                if p.pid not in at_ready and " running " in p.log():
                    at_ready[p.pid] = cpu_seconds(p.pid)
            counts = await led.count_by_state()
            if counts["failed"] or counts["cancelled"]:
                raise RuntimeError(f"items failed: {counts}\n{group.tails()}")
            return counts["succeeded"] == items

        await wait_until(all_done, 1800, lambda: f"{items} items\n{group.tails()}", interval=0.05)
        done_at = time.time()
        for p in procs:
            assert p.alive, p.tail()
        busy = sum(cpu_seconds(p.pid) - at_ready.get(p.pid, 0.0) for p in procs)
        async with led.engines.read.connect() as conn:
            claims = (
                await conn.execute(
                    sa.select(event_t.c.created_at, event_t.c.data).where(
                        event_t.c.type == "claimed"
                    )
                )
            ).all()
            last = (
                await conn.execute(
                    sa.select(sa.func.max(work_t.c.updated_at)).where(work_t.c.state == "succeeded")
                )
            ).scalar_one()
        first_claim = min(ts(c.created_at) for c in claims)
        owners = Counter(c.data["owner"] for c in claims)
        return {
            "processing": items / (ts(last) - first_claim),
            "wall": items / (done_at - spawned_at),
            "startup": first_claim - spawned_at,
            "share": sorted(owners.values(), reverse=True),
            "cpu_ms": busy / items * 1000,
        }
    finally:
        await led.close()
        group.cleanup()


async def scaling(args: argparse.Namespace, tmp: Path) -> None:
    results: dict[int, list[dict[str, Any]]] = {n: [] for n in args.workers}
    for r in range(args.runs):
        for n in args.workers if r % 2 == 0 else args.workers[::-1]:
            res = await scaling_once(tmp, n, args.items)
            print(
                f"  scaling {n} worker(s) run {r + 1}: {res['processing']:.1f} items/s "
                f"processing, {res['wall']:.1f} wall, first claim after {res['startup']:.2f}s, "
                f"claims per worker {res['share']}, worker CPU {res['cpu_ms']:.1f} ms/item",
                file=sys.stderr,
                flush=True,
            )
            results[n].append(res)
    base = statistics.median(x["processing"] for x in results[args.workers[0]])
    rows = []
    for n in args.workers:
        runs = results[n]
        proc = [x["processing"] for x in runs]
        p = statistics.median(proc)
        rows.append(
            (
                str(n),
                str(8 * n),
                f"{p:,.0f}",
                f"{min(proc):,.0f}-{max(proc):,.0f}",
                f"{p / base:.2f}x",
                f"{statistics.median(x['wall'] for x in runs):,.0f}",
                f"{statistics.median(x['startup'] for x in runs):.1f}",
                f"{statistics.median(x['cpu_ms'] for x in runs):.1f}",
                "/".join(str(s) for s in runs[len(runs) // 2]["share"]),
            )
        )
    print(
        f"\nScaling: {args.items:,} items x 3 trivial steps submitted first, then N `tether "
        f"worker` processes (8 slots each) on PostgreSQL; {os.cpu_count()} CPUs shared with "
        "PostgreSQL and this script"
    )
    table(
        ("workers", "slots", "items/s (processing)", "min-max", f"vs {args.workers[0]}",
         "items/s (wall, incl. start-up)", "first claim after s",
         "worker CPU ms/item", "claims per worker"),
        rows,
    )  # fmt: skip
    print(f"(median of {args.runs} runs; processing = first claim to last success; worker CPU = "
          "user+system CPU of all worker processes from their ready line to the end, "
          "per item)")  # fmt: skip


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["recovery", "scaling"])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one run, 500 items, one reaper row")
    ap.add_argument("--lease-ttl", type=float, default=5.0)
    ap.add_argument("--reapers", type=float, nargs="+", default=[2.0, 0.5])
    ap.add_argument("--items", type=int, default=2000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    args = ap.parse_args()
    if args.quick:
        args.runs, args.items, args.reapers = 1, 500, [0.5]
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(BENCH), os.environ.get("PYTHONPATH")])
    )  # the workers import bench_agents
    print("load average at the start: {:.2f} {:.2f} {:.2f} ({} CPUs)".format(
        *os.getloadavg(), os.cpu_count()))  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="tether-bench-workers-") as tmp_dir:
        tmp = Path(tmp_dir)
        try:
            if args.only in (None, "recovery"):
                await recovery(args, tmp)
            if args.only in (None, "scaling"):
                await scaling(args, tmp)
        finally:
            await _admin(f"DROP DATABASE IF EXISTS {PG_DB} WITH (FORCE)")
    print("load average at the end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[attr-defined]
    asyncio.run(main())
