"""Durability modes: steps/s for ``sync``, ``batched`` and ``exit``, alone and 8 at once.

Run: ``python bench/durability.py`` (both databases) or ``--db sqlite``. PostgreSQL from
``TETHER_BENCH_POSTGRES_URL`` (default the local server; database ``tether_bench_durability``,
recreated). Prints one table; every figure comes from this one run (median of ``--repeat``).

Rows, per database and mode:
* 1 item — one agent of ``--steps`` trivial steps (the 1,000-step agent), alone on the pool;
* 8 items — ``--concurrent`` such agents at once on one pool: aggregate steps/s;
* records/tx — step records per group-commit transaction in the 8-item run.

Targets (issue 8): ``batched`` >= 5,000 steps/s aggregate; ``sync`` with 8 items >= 2,500.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg
from sqlalchemy.engine import make_url

from ledger import Ledger
from worker import Context, WorkerPool, agent

PG_ADMIN = os.environ.get(
    "TETHER_BENCH_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
)
PG_DB = "tether_bench_durability"
MODES = ("sync", "batched", "exit")


def _inc(x: int) -> int:
    return x + 1


async def _steps(ctx: Context, n: int) -> int:
    x = 0
    for _ in range(n):
        x = await ctx.step("inc", _inc, x)
    return x


for _mode in MODES:
    agent(f"bench_durability_{_mode}", durability=_mode)(_steps)


async def fresh_db(kind: str, tmp: Path) -> str:
    if kind == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp / f'dur-{time.monotonic_ns()}.db'}"
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


async def run_items(url: str, mode: str, items: int, steps: int) -> tuple[float, float]:
    """Steps/s across ``items`` items of ``steps`` steps, and records per transaction."""
    led = await Ledger.open(url)
    ids = [(await led.create_work(f"bench_durability_{mode}", steps))[0].id for _ in range(items)]
    pool = WorkerPool(led, concurrency=max(items, 1), poll_interval=0.05)
    task = asyncio.create_task(pool.run())
    t0 = time.perf_counter()
    while pool.completed < items:
        await asyncio.sleep(0.001)
    dt = time.perf_counter() - t0
    stats = pool.committer.stats
    per_tx = stats.records / stats.transactions if stats.transactions else 0.0
    pool.stop()
    await task
    for work_id in ids:
        work = await led.get_work(work_id)
        if work.state != "succeeded" or work.result != steps:
            raise RuntimeError(f"{work_id}: {work.state} {work.result} {work.error}")
    await led.close()
    return items * steps / dt, per_tx


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--concurrent", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure; the median is shown")
    args = ap.parse_args()
    kinds = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    rows: list[tuple[str, ...]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            for mode in MODES:
                single, multi, per_tx = [], [], []
                for _ in range(args.repeat):
                    url = await fresh_db(kind, Path(tmp))
                    single.append((await run_items(url, mode, 1, args.steps))[0])
                    rate, ratio = await run_items(url, mode, args.concurrent, args.steps)
                    multi.append(rate)
                    per_tx.append(ratio)
                rows.append((
                    kind, mode,
                    f"{statistics.median(single):,.0f}",
                    f"{statistics.median(multi):,.0f}",
                    f"{statistics.median(per_tx):.1f}",
                ))  # fmt: skip
                print(" ".join(rows[-1]), file=sys.stderr, flush=True)
    header = ("database", "mode", "steps/s, 1 item", f"steps/s, {args.concurrent} items",
              "records/tx")  # fmt: skip
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print()
    print(f"{args.steps}-step agent, median of {args.repeat} runs, {os.cpu_count()} CPUs")
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in
                        enumerate(zip(r, widths, strict=True))))  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
