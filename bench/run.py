"""Tether's core benchmark: durable steps/s, work items/s, and submit-to-first-step latency.

Run: ``python bench/run.py`` (both databases) or ``python bench/run.py --db sqlite``.
PostgreSQL from ``TETHER_BENCH_POSTGRES_URL`` (default the local server, database
``tether_bench``, recreated). Prints one table; every figure comes from this one run.

Rows:
* bare commit/s — one single-row INSERT + COMMIT through the raw driver (the disk's floor);
* steps/s — one agent of ``--steps`` trivial steps, each a durable, fenced checkpoint;
* items/s — ``--items`` work items of 3 steps on a pool with ``--concurrency`` slots;
* latency — ``POST /api/v1/work`` to the first step running (median and p99, ms),
  measured one request at a time through the real gateway and an in-process worker pool.
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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
import asyncpg
from aiohttp import web
from sqlalchemy.engine import make_url

from config import load_settings
from ledger import Ledger
from worker import Context, WorkerPool, agent

PG_ADMIN = os.environ.get(
    "TETHER_BENCH_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
)
FIRST_STEP_AT: dict[str, float] = {}


def _inc(x: int) -> int:
    return x + 1


@agent("bench_steps")
async def bench_steps(ctx: Context, n: int) -> int:
    x = 0
    for _ in range(n):
        x = await ctx.step("inc", _inc, x)
    return x


@agent("bench_three")
async def bench_three(ctx: Context, _input: Any) -> int:
    x = await ctx.step("a", _inc, 0)
    x = await ctx.step("b", _inc, x)
    return await ctx.step("c", _inc, x)


def _mark_first(work_id: str) -> bool:
    FIRST_STEP_AT.setdefault(work_id, time.perf_counter())
    return True


@agent("bench_latency")
async def bench_latency(ctx: Context, _input: Any) -> bool:
    return await ctx.step("first", _mark_first, ctx.work_id)


async def _fresh_db(kind: str, tmp: Path) -> str:
    if kind == "sqlite":
        path = tmp / f"bench-{time.monotonic_ns()}.db"
        url = f"sqlite+aiosqlite:///{path}"
    else:
        admin = make_url(PG_ADMIN)
        conn = await asyncpg.connect(
            admin.set(drivername="postgresql").render_as_string(hide_password=False)
        )
        await conn.execute("DROP DATABASE IF EXISTS tether_bench WITH (FORCE)")
        await conn.execute("CREATE DATABASE tether_bench")
        await conn.close()
        url = admin.set(database="tether_bench").render_as_string(hide_password=False)
    led = await Ledger.open(url, migrate=True)
    await led.close()
    return url


async def bare_commits(kind: str, url: str, n: int = 2000) -> float:
    if kind == "sqlite":
        import sqlite3

        path = make_url(url).database
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE IF NOT EXISTS bare (id INTEGER PRIMARY KEY, v TEXT)")
        t0 = time.perf_counter()
        for i in range(n):
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO bare (v) VALUES (?)", (str(i),))
            conn.execute("COMMIT")
        dt = time.perf_counter() - t0
        conn.close()
        return n / dt
    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    pg = await asyncpg.connect(dsn)
    await pg.execute("CREATE TABLE IF NOT EXISTS bare (id serial PRIMARY KEY, v text)")
    t0 = time.perf_counter()
    for i in range(n):
        async with pg.transaction():
            await pg.execute("INSERT INTO bare (v) VALUES ($1)", str(i))
    dt = time.perf_counter() - t0
    await pg.close()
    return n / dt


async def _run_pool_until(led: Ledger, ids: list[str], concurrency: int) -> float:
    before = (await led.count_by_state())["succeeded"]
    pool = WorkerPool(led, concurrency=concurrency, poll_interval=0.05)
    task = asyncio.create_task(pool.run())
    t0 = time.perf_counter()
    while pool.completed < len(ids):
        await asyncio.sleep(0.002)
    dt = time.perf_counter() - t0
    pool.stop()
    await task
    counts = await led.count_by_state()
    if counts["succeeded"] - before != len(ids):
        raise RuntimeError(f"bench work did not all succeed: {counts}")
    return dt


async def steps_per_second(url: str, steps: int) -> float:
    led = await Ledger.open(url)
    w, _ = await led.create_work("bench_steps", steps)
    dt = await _run_pool_until(led, [w.id], 1)
    assert (await led.get_work(w.id)).result == steps
    await led.close()
    return steps / dt


async def items_per_second(url: str, items: int, concurrency: int) -> float:
    led = await Ledger.open(url)
    ids = [(await led.create_work("bench_three", None))[0].id for _ in range(items)]
    dt = await _run_pool_until(led, ids, concurrency)
    await led.close()
    return items / dt


async def submit_latency(url: str, n: int) -> tuple[float, float]:
    from gateway import create_app

    settings = load_settings(None, database_url=url, operator_token="bench-token")
    led = await Ledger.open(url)
    app = create_app(led, settings, operator_token="bench-token", known_agents=None)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    pool = WorkerPool(led, concurrency=8, poll_interval=1.0)
    task = asyncio.create_task(pool.run())
    await asyncio.sleep(0.2)
    latencies: list[float] = []
    headers = {"Authorization": "Bearer bench-token"}
    async with aiohttp.ClientSession(headers=headers) as http:
        for _ in range(n):
            t0 = time.perf_counter()
            async with http.post(
                f"http://127.0.0.1:{port}/api/v1/work", json={"agent": "bench_latency"}
            ) as resp:
                body = await resp.json()
                if resp.status != 201:
                    raise RuntimeError(f"POST failed: {resp.status} {body}")
            while body["id"] not in FIRST_STEP_AT:
                await asyncio.sleep(0.0005)
            latencies.append((FIRST_STEP_AT[body["id"]] - t0) * 1000)
    pool.stop()
    await task
    await runner.cleanup()
    await led.close()
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return statistics.median(latencies), p99


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--items", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--latency-samples", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure; the median is shown")
    args = ap.parse_args()
    kinds = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    rows: list[tuple[str, ...]] = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        for kind in kinds:
            bare, steps, items = [], [], []
            for _ in range(args.repeat):
                url = await _fresh_db(kind, tmp)
                bare.append(await bare_commits(kind, url))
                steps.append(await steps_per_second(url, args.steps))
                items.append(await items_per_second(url, args.items, args.concurrency))
            url = await _fresh_db(kind, tmp)
            p50, p99 = await submit_latency(url, args.latency_samples)
            b, s, i = (statistics.median(x) for x in (bare, steps, items))
            rows.append(
                (
                    kind,
                    f"{b:,.0f}",
                    f"{s:,.0f}",
                    f"{s / b:.0%}",
                    f"{i:,.0f}",
                    f"{p50:.1f}",
                    f"{p99:.1f}",
                )
            )
    items_head = f"items/s ({args.items}x3, c={args.concurrency})"
    head = ("database", "bare commit/s", f"steps/s ({args.steps})", "of bare", items_head,
            "submit→step p50 ms", "p99 ms")  # fmt: skip
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))
    print(f"| {line} |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) + " |")
    print(
        f"(median of {args.repeat} runs; latency over {args.latency_samples} sequential requests)"
    )


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main())
