"""Tether side by side with DBOS Transact: the same workloads, the same databases, one run.

Run: ``python bench/compare.py [--runs N] [--quick]`` (DBOS from the ``bench`` extra:
``pip install -e '.[bench]'``). PostgreSQL from ``TETHER_BENCH_POSTGRES_URL`` (default the
local server; this script creates and drops its own databases ``bench_compare_0..2``); SQLite
in temporary files. Prints the versions and the machine, then ONE table; every figure comes from
this one run.

Every measurement runs in a fresh subprocess on a fresh database, one per system, workload and
database (DBOS keeps process-global state; so, a little, does Tether's agent registry). Within
each of the ``--runs`` rounds the two systems take turns, and which goes first alternates from
round to round, so a slow spell of this shared machine does not land on one side only. Each
cell is the median over the rounds, with [min-max] when there is more than one.

Rows:

* durable steps/s: one workflow of ``--steps`` trivial steps (``x + 1``, result checkpointed).
  Tether: ``steps_per_second`` of ``bench/run.py`` (an agent of ``ctx.step`` calls, run by a
  worker pool of 1 slot). DBOS: a ``@DBOS.workflow`` calling a ``@DBOS.step`` ``--steps`` times,
  called directly (``--dbos-mode``: ``async`` by default, which measured better than ``sync``
  here on PostgreSQL and no worse on SQLite).
* work items/s: ``--items`` workflows of 3 such steps, 8 at a time. Tether:
  ``items_per_second`` of ``bench/run.py`` (all items created, then a pool with 8 slots).
  DBOS: all enqueued on a queue held at ``worker_concurrency=0``, then raised to 8; the queue is
  polled every ``--dbos-items-poll`` s (50 ms by default; 10 ms and 200 ms measured no better).
* enqueue -> first step, ms, median and p99, one at a time. Tether, two ways: ``POST
  /api/v1/work`` through the real gateway (``submit_latency`` of ``bench/run.py``; an HTTP round
  trip on top) and an in-process ``Ledger.create_work`` (the same API level as DBOS's
  ``Queue.enqueue``); an idle worker pool (8 slots) wakes on PostgreSQL ``NOTIFY`` or on the
  in-process commit. DBOS: ``Queue.enqueue`` on a queue polled every 1 s (DBOS's default) and
  every 10 ms (tuned; a query every 10 ms per queue per process, even when idle).

SQLite: Tether runs WAL with ``synchronous=FULL``. DBOS opens SQLite in its default rollback
journal; ``--dbos-sqlite-journal wal`` (the default here) switches the file to WAL before DBOS
opens it (``synchronous`` stays FULL, so both are equally durable), which is DBOS's better
number; ``delete`` keeps DBOS's own default.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(ROOT), str(BENCH)]

import asyncpg  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

PG_ADMIN = os.environ.get(
    "TETHER_BENCH_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
)
PG_DB = "bench_compare"
BACKENDS = ("sqlite", "postgres")
BACKEND_NAME = {"sqlite": "SQLite", "postgres": "PostgreSQL"}
SYSTEMS = ("tether", "dbos")
DBOS_FAST_POLL = 0.01
DBOS_DEFAULT_POLL = 1.0
TARGET_STEPS_RATIO = 2.0
TARGET_P50_MS = 5.0


# -- children: one measurement each, in a fresh process -------------------------------------------


async def _tether_create_latency(url: str, n: int) -> tuple[float, float]:
    """In-process ``Ledger.create_work`` to the first step running in an idle pool."""
    import run as tether_run

    from ledger import Ledger
    from worker import WorkerPool

    led = await Ledger.open(url)
    pool = WorkerPool(led, concurrency=8, poll_interval=1.0)
    task = asyncio.create_task(pool.run())
    await asyncio.sleep(0.2)
    latencies: list[float] = []
    for _ in range(n):
        t0 = time.perf_counter()
        work, _ = await led.create_work("bench_latency", None)
        deadline = time.monotonic() + 60
        while work.id not in tether_run.FIRST_STEP_AT:
            if time.monotonic() > deadline:
                raise RuntimeError("a created item never started")
            await asyncio.sleep(0.0005)
        latencies.append((tether_run.FIRST_STEP_AT[work.id] - t0) * 1000)
    pool.stop()
    await task
    await led.close()
    return _p50_p99(latencies)


def _p50_p99(values: list[float]) -> tuple[float, float]:
    values = sorted(values)
    return statistics.median(values), values[min(len(values) - 1, int(len(values) * 0.99))]


async def _tether_child(spec: dict[str, Any]) -> dict[str, Any]:
    import run as tether_run  # bench/run.py: its agents and measurements

    from ledger import Ledger

    url = spec["url"]
    led = await Ledger.open(url, migrate=True)
    await led.close()
    measure = spec["measure"]
    if measure == "steps":
        return {"value": await tether_run.steps_per_second(url, spec["steps"])}
    if measure == "items":
        return {"value": await tether_run.items_per_second(url, spec["items"], 8)}
    if measure == "latency":
        http = await tether_run.submit_latency(url, spec["samples"])
        inproc = await _tether_create_latency(url, spec["samples"])
        return {"http": http, "inproc": inproc}
    raise ValueError(f"unknown measure {measure!r}")


def _dbos_child(spec: dict[str, Any]) -> dict[str, Any]:
    import compare_dbos

    if spec["measure"] != "latency":
        return compare_dbos.run(spec)
    fast = compare_dbos.run({**spec, "poll": DBOS_FAST_POLL})
    slow = compare_dbos.run({**spec, "poll": DBOS_DEFAULT_POLL, "samples": spec["slow_samples"]})
    return {"fast": (fast["p50"], fast["p99"]), "default": (slow["p50"], slow["p99"])}


def child_main(specs: list[dict[str, Any]]) -> None:
    """Run the given measurements in turn (one, except with ``--quick``); one result line each."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    for spec in specs:
        started = time.perf_counter()
        if spec["system"] == "tether":
            result = asyncio.run(_tether_child(spec))
        else:
            result = _dbos_child(spec)
        result["seconds"] = time.perf_counter() - started
        print("RESULT " + json.dumps(result), flush=True)


# -- parent: fresh databases, subprocesses, the table ---------------------------------------------


def _dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def _pg(sql: list[str], database: str | None = None) -> Any:
    url = make_url(PG_ADMIN)
    if database:
        url = url.set(database=database)
    conn = await asyncpg.connect(_dsn(url.render_as_string(hide_password=False)), timeout=10)
    try:
        out = None
        for s in sql:
            out = await conn.fetchval(s)
        return out
    finally:
        await conn.close()


def fresh_url(system: str, backend: str, tmp: Path, journal: str, slot: int = 0) -> str:
    if backend == "sqlite":
        path = tmp / f"{system}-{time.monotonic_ns()}.db"
        if system == "tether":
            return f"sqlite+aiosqlite:///{path}"
        if journal == "wal":
            with sqlite3.connect(path) as conn:
                conn.execute("PRAGMA journal_mode=WAL")
        return f"sqlite:///{path}"
    db = f"{PG_DB}_{slot}"
    asyncio.run(_pg([f"DROP DATABASE IF EXISTS {db} WITH (FORCE)", f"CREATE DATABASE {db}"]))
    url = make_url(PG_ADMIN).set(database=db)
    if system == "dbos":  # DBOS: its documented URL form (psycopg 3 underneath)
        url = url.set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


def run_child(specs: list[dict[str, Any]], tmp: Path, log: list[str]) -> list[dict[str, Any]]:
    """One subprocess for ``specs``; a result (or ``{"error": ...}``) for each."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(specs)]
    try:
        proc = subprocess.run(
            cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=1800, check=False
        )
        stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        stderr, rc = "timed out after 1800 s", None
    found = [json.loads(ln[len("RESULT ") :]) for ln in stdout.splitlines()
             if ln.startswith("RESULT ")]  # fmt: skip
    if len(found) < len(specs):
        lines = [ln for ln in (stderr + stdout).splitlines() if ln.strip()]
        spec = specs[len(found)]
        log.append(f"--- {spec['system']} {spec['measure']} {spec['backend']} (exit {rc})")
        log.extend(lines[-15:])
        error = lines[-1].strip() if lines else f"exit code {rc}"
        found += [{"error": error}] * (len(specs) - len(found))
    return found


def versions() -> list[str]:
    def ver(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    try:
        pg = asyncio.run(_pg(["SHOW server_version"]))
    except Exception as exc:
        pg = f"unreachable ({exc})"
    commit = "?"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
        if dirty:
            commit += " + local changes"
    except OSError:
        pass
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return [
        f"machine:    {os.cpu_count()} CPUs, {model}, {mem} RAM, {platform.platform()}",
        f"python:     {platform.python_version()} ({sys.executable})",
        f"tether:     {ver('tether-gateway')} (git {commit})",
        f"dbos:       {ver('dbos')}",
        f"sqlalchemy: {ver('sqlalchemy')}, asyncpg {ver('asyncpg')}, psycopg {ver('psycopg')}",
        f"postgresql: {pg} (127.0.0.1, the same machine)",
        f"sqlite:     {sqlite3.sqlite_version}",
        "load:       {:.2f} {:.2f} {:.2f} (1/5/15-min load average at the start)".format(
            *os.getloadavg()
        ),
    ]


def cell(values: list[float], fmt: str) -> str:
    if not values:
        return "n/a"
    med = format(statistics.median(values), fmt)
    if len(values) == 1:
        return med
    return f"{med} [{format(min(values), fmt)}-{format(max(values), fmt)}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="rounds; each cell is their median")
    ap.add_argument("--quick", action="store_true",
                    help="small sizes, one round, one process per system and database")  # fmt: skip
    ap.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--items", type=int, default=500)
    ap.add_argument("--latency-samples", type=int, default=200)
    ap.add_argument("--dbos-default-poll-samples", type=int, default=30,
                    help="samples with DBOS's 1 s queue polling (each costs ~1 s)")  # fmt: skip
    ap.add_argument("--dbos-mode", choices=["sync", "async"], default="async")
    ap.add_argument("--dbos-items-poll", type=float, default=0.05)
    ap.add_argument("--dbos-sqlite-journal", choices=["wal", "delete"], default="wal")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[attr-defined]
    if args.child:
        child_main(json.loads(args.child))
        return
    if args.quick:
        args.runs, args.steps, args.items = 1, 200, 100
        args.latency_samples, args.dbos_default_poll_samples = 20, 2
    backends = list(BACKENDS) if args.db == "both" else [args.db]
    measures = ("steps", "items", "latency")
    params = {
        "steps": args.steps,
        "items": args.items,
        "concurrency": 8,
        "samples": args.latency_samples,
        "slow_samples": args.dbos_default_poll_samples,
        "mode": args.dbos_mode,
        "poll": args.dbos_items_poll,
    }
    print("\n".join(versions()))
    print(
        f"settings:   --runs {args.runs} --steps {args.steps} --items {args.items} "
        f"--latency-samples {args.latency_samples} --dbos-default-poll-samples "
        f"{args.dbos_default_poll_samples} --dbos-mode {args.dbos_mode} --dbos-items-poll "
        f"{args.dbos_items_poll:g} --dbos-sqlite-journal {args.dbos_sqlite_journal}",
        flush=True,
    )
    results: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    errors: dict[tuple[str, str, str], str] = {}
    log: list[str] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tether-bench-compare-") as tmp_dir:
        tmp = Path(tmp_dir)
        for r in range(args.runs):
            order = SYSTEMS if r % 2 == 0 else SYSTEMS[::-1]
            # --quick: one process per system and database runs all three measurements
            groups = [[m] for m in measures] if not args.quick else [list(measures)]
            for group in groups:
                for backend in backends:
                    for system in order:
                        specs = [
                            {"system": system, "measure": m, "backend": backend, **params,
                             "url": fresh_url(system, backend, tmp, args.dbos_sqlite_journal, i)}
                            for i, m in enumerate(group)
                        ]  # fmt: skip
                        t0 = time.perf_counter()
                        outs = run_child(specs, tmp, log)
                        wall = time.perf_counter() - t0
                        for spec, out in zip(specs, outs, strict=True):
                            key = (spec["measure"], backend, system)
                            if "error" in out:
                                errors[key] = out["error"]
                            else:
                                results.setdefault(key, []).append(out)
                        done = ", ".join(
                            f"{s['measure']} " + (f"n/a: {o['error']}" if "error" in o
                                                  else f"{o['seconds']:.1f}s")
                            for s, o in zip(specs, outs, strict=True)
                        )  # fmt: skip
                        print(f"  round {r + 1}/{args.runs} {backend:<8} {system:<6} {done} "
                              f"(process {wall:.1f}s)", file=sys.stderr, flush=True)  # fmt: skip
        if "postgres" in backends:
            asyncio.run(
                _pg([f"DROP DATABASE IF EXISTS {PG_DB}_{i} WITH (FORCE)" for i in range(3)])
            )
    elapsed = time.perf_counter() - started

    def values(measure: str, backend: str, system: str, field: str, idx: int | None = None):
        out = []
        for res in results.get((measure, backend, system), []):
            v = res[field]
            out.append(v[idx] if idx is not None else v)
        return out

    def na(measure: str, backend: str, system: str) -> str | None:
        err = errors.get((measure, backend, system))
        return None if err is None else f"n/a: {err[:90]}"

    rows: list[tuple[str, ...]] = []
    for backend in backends:
        name = BACKEND_NAME[backend]
        for measure, label in (
            ("steps", f"durable steps/s, 1 workflow x {args.steps} steps"),
            ("items", f"work items/s, {args.items} x 3 steps, concurrency 8"),
        ):
            t = values(measure, backend, "tether", "value")
            d = values(measure, backend, "dbos", "value")
            tc = na(measure, backend, "tether") or cell(t, ",.0f")
            dc = na(measure, backend, "dbos") or cell(d, ",.0f")
            ratio, target = "n/a", ""
            if t and d:
                q = statistics.median(t) / statistics.median(d)
                ratio = f"{q:.2f}x Tether/DBOS ({'Tether' if q >= 1 else 'DBOS'} faster)"
                if measure == "steps":
                    target = (
                        f">= {TARGET_STEPS_RATIO:g}x: "
                        + ("met" if q >= TARGET_STEPS_RATIO else
                           f"MISSED ({q:.2f}x, needs {TARGET_STEPS_RATIO / q:.2f}x more)")
                    )  # fmt: skip
            rows.append((label, name, tc, dc, ratio, target))
        slow_poll = f"enqueue, {DBOS_DEFAULT_POLL:g} s poll (default)"
        fast_poll = f"enqueue, {DBOS_FAST_POLL * 1000:g} ms poll"
        lat = [
            ("http", "default", "POST /api/v1/work", slow_poll),
            ("inproc", "fast", "Ledger.create_work", fast_poll),
        ]
        for tfield, dfield, tname, dname in lat:
            for idx, pname in ((0, "p50"), (1, "p99")):
                t = values("latency", backend, "tether", tfield, idx)
                d = values("latency", backend, "dbos", dfield, idx)
                tc = na("latency", backend, "tether") or cell(t, ".1f")
                dc = na("latency", backend, "dbos") or cell(d, ".1f")
                ratio, target = "n/a", ""
                if t and d:
                    q = statistics.median(d) / statistics.median(t)
                    ratio = f"{q:.2f}x DBOS/Tether ({'Tether' if q >= 1 else 'DBOS'} faster)"
                if backend == "postgres" and pname == "p50" and tfield == "http" and t:
                    m = statistics.median(t)
                    target = f"<= {TARGET_P50_MS:g} ms: " + (
                        "met" if m <= TARGET_P50_MS else f"MISSED by {m - TARGET_P50_MS:.1f} ms"
                    )
                label = f"enqueue->first step {pname} ms: Tether {tname} vs DBOS {dname}"
                rows.append((label, name, tc, dc, ratio, target))

    head = ("measure", "database", "Tether", "DBOS", "ratio", "target (issue)")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    print()
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        cells = [v.ljust(w) if i in (0, 1, 4, 5) else v.rjust(w)
                 for i, (v, w) in enumerate(zip(r, widths, strict=True))]  # fmt: skip
        print("| " + " | ".join(cells) + " |")
    print(
        f"(median of {args.runs} round(s) [min-max]; each figure from a fresh process and a fresh "
        f"database; DBOS steps in {args.dbos_mode} mode, items queue polled every "
        f"{args.dbos_items_poll:g} s, SQLite journal {args.dbos_sqlite_journal}; latency over "
        f"{args.latency_samples} sequential samples, {args.dbos_default_poll_samples} with DBOS's "
        f"1 s polling; whole run {elapsed:.0f} s; load average at the end "
        + "{:.2f} {:.2f} {:.2f})".format(*os.getloadavg())
    )
    if log:
        print("\nfailed children (last lines):", file=sys.stderr)
        print("\n".join(log), file=sys.stderr)


if __name__ == "__main__":
    main()
