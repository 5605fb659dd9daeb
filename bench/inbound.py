"""Inbound benchmark: Telegram and Slack throughput and ack latency of a real ``tether serve``.

Run: ``python bench/inbound.py [--db sqlite|postgres|both] [--channel telegram|slack|both]
[--scenario idle|busy|both] [--rate 200] [--seconds 10] [--repeat N]``.
Each run starts ``tether serve`` on a fresh database (a temporary SQLite file, or the
PostgreSQL database ``tether_bench_inbound`` from ``TETHER_BENCH_POSTGRES_URL``, recreated and
migrated with ``tether db upgrade``) with Telegram and Slack configured against the fake Bot
API and Web API of ``tests/fakes``, then posts Telegram updates carrying the secret header, or
Slack message events signed with ``slack_sdk``'s ``SignatureVerifier``, with aiohttp, one every
``1/rate`` s on an open-loop schedule (a slow answer does not delay the next send), each from
its own chat so conversation ordering plays no part. Ack latency is from the send to the
answer's last byte. Scenarios:

* idle — the default demo agent, ``TETHER_WORKER_CONCURRENCY`` 2; replies go to the fake;
* busy — the ``stuck`` agent of ``tests/support/stuck_agents.py`` (10-second step),
  concurrency 2; both slots are stuck before sending starts and stay busy throughout.

Prints one table; every figure comes from this one invocation (with ``--repeat N``, each run and
then the median of the N runs: the disk's fsync latency has a long tail on shared machines).
Target (issue 4): p99 ≤ 10 ms on SQLite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "fakes"))
from slack_api import FakeSlack  # noqa: E402
from slack_sdk.signature import SignatureVerifier  # noqa: E402
from telegram_api import FakeTelegram  # noqa: E402

PG_ADMIN = os.environ.get(
    "TETHER_BENCH_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
)
PG_DB = "tether_bench_inbound"
BOT_TOKEN = "123456:BENCH-telegram-token"
SECRET = "bench-secret"
WEBHOOK = "/channels/telegram/webhook"
HEADERS = {"X-Telegram-Bot-Api-Secret-Token": SECRET}
CONCURRENCY = 2
SLACK_TOKEN = "xoxb-bench-slack-token"
SLACK_SECRET = "bench-slack-signing-secret"
SLACK_EVENTS = "/channels/slack/events"
SLACK_SIGNER = SignatureVerifier(SLACK_SECRET)


def _dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def update(update_id: int, chat: int) -> dict[str, Any]:
    return {
        "update_id": update_id,
        "message": {
            "message_id": update_id,
            "date": 1_700_000_000,
            "chat": {"id": chat, "type": "private"},
            "from": {"id": chat, "is_bot": False, "first_name": "b", "username": f"b{chat}"},
            "text": f"bench {update_id}",
        },
    }


def slack_event(n: int, chat: int) -> dict[str, Any]:
    ts = f"{1_700_000_000 + n}.{n % 1_000_000:06d}"
    return {
        "token": "legacy",
        "team_id": "TBENCH",
        "api_app_id": "ABENCH",
        "type": "event_callback",
        "event_id": f"EvBENCH{n}",
        "event_time": 1_700_000_000,
        "authorizations": [{"team_id": "TBENCH", "user_id": "UBOT", "is_bot": True}],
        "event": {
            "type": "message",
            "channel": f"C{chat}",
            "channel_type": "channel",
            "user": f"U{chat}",
            "text": f"bench {n}",
            "ts": ts,
            "event_ts": ts,
            "team": "TBENCH",
        },
    }


async def _pg_admin(*sql: str) -> None:
    conn = await asyncpg.connect(_dsn(PG_ADMIN), timeout=5)
    try:
        for s in sql:
            await conn.execute(s)
    finally:
        await conn.close()


async def fresh_database(db: str, tmp: Path) -> str:
    if db == "sqlite":
        return f"sqlite+aiosqlite:///{tmp / 'tether.db'}"  # a fresh temporary directory
    await _pg_admin(f"DROP DATABASE IF EXISTS {PG_DB} WITH (FORCE)", f"CREATE DATABASE {PG_DB}")
    url = make_url(PG_ADMIN).set(database=PG_DB).render_as_string(hide_password=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    env["TETHER_DATABASE_URL"] = url
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tether.cli", "db", "upgrade", cwd=tmp, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"tether db upgrade failed:\n{out.decode()}")
    return url


async def running_count(url: str) -> int:
    sql = "SELECT count(*) FROM work WHERE state = 'running'"
    if url.startswith("sqlite"):
        with sqlite3.connect(url.split("///", 1)[1], timeout=5) as conn:
            return conn.execute(sql).fetchone()[0]
    conn = await asyncpg.connect(_dsn(url), timeout=5)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


@asynccontextmanager
async def serve(
    tmp: Path, url: str, api_base: str, slack_base: str, **extra: str
) -> AsyncIterator[str]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    env.update(
        TETHER_PORT=str(port),
        TETHER_DATABASE_URL=url,
        TETHER_OPERATOR_TOKEN="bench-operator",
        TETHER_TELEGRAM_TOKEN=BOT_TOKEN,
        TETHER_TELEGRAM_WEBHOOK_SECRET=SECRET,
        TETHER_TELEGRAM_API_BASE=api_base,
        TETHER_SLACK_BOT_TOKEN=SLACK_TOKEN,
        TETHER_SLACK_SIGNING_SECRET=SLACK_SECRET,
        TETHER_SLACK_API_BASE=slack_base,
        TETHER_WORKER_CONCURRENCY=str(CONCURRENCY),
        TETHER_POLL_INTERVAL="0.1",
        TETHER_LOG_LEVEL="WARNING",
        **extra,
    )
    path = [str(ROOT / "tests" / "support"), str(ROOT)]
    if env.get("PYTHONPATH"):
        path.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(path)
    log_path = tmp / "serve.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(  # noqa: ASYNC220 -- reaped below
            [sys.executable, "-m", "tether.cli", "serve"],
            cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            async with aiohttp.ClientSession() as http:
                while True:
                    with suppress(aiohttp.ClientError, TimeoutError):
                        async with http.get(f"{base}/readyz", timeout=1) as r:
                            if r.status == 200:
                                break
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"tether serve did not start:\n{log_path.read_text()}")
                    await asyncio.sleep(0.2)
            yield base
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)


async def _post(http: aiohttp.ClientSession, base: str, channel: str, n: int) -> tuple[int, float]:
    if channel == "telegram":
        path, body = WEBHOOK, json.dumps(update(n, 10_000 + n)).encode()
        headers = {**HEADERS, "Content-Type": "application/json"}
    else:
        path, body = SLACK_EVENTS, json.dumps(slack_event(n, 10_000 + n)).encode()
        ts = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "X-Slack-Request-Timestamp": ts,
            "X-Slack-Signature": SLACK_SIGNER.generate_signature(timestamp=ts, body=body) or "",
        }
    started = time.perf_counter()  # signing is the sender's work, not the gateway's
    async with http.post(base + path, data=body, headers=headers) as r:
        await r.read()
        return r.status, time.perf_counter() - started


async def scenario(db: str, channel: str, name: str, rate: float, seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tether-bench-inbound-") as d:
        tmp = Path(d)
        url = await fresh_database(db, tmp)
        extra = {}
        if name == "busy":
            extra = {"TETHER_AGENT_MODULES": "stuck_agents,worker.agents"}
            extra["TETHER_DEFAULT_AGENT"] = "stuck"
        async with (
            FakeTelegram(BOT_TOKEN) as fake,
            FakeSlack(SLACK_TOKEN) as fake_slack,
            serve(tmp, url, fake.base_url, fake_slack.base_url, **extra) as base,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http,
        ):
            ids = iter(range(1, 10**9))
            # Warm up (connections, caches); in "busy" these occupy every worker slot.
            for _ in range(max(CONCURRENCY, 20)):
                status, _ = await _post(http, base, channel, next(ids))
                assert status == 200, status
            if name == "busy":
                deadline = time.monotonic() + 15
                while await running_count(url) < CONCURRENCY:
                    if time.monotonic() > deadline:
                        raise SystemExit("the stuck agent never occupied every worker slot")
                    await asyncio.sleep(0.05)
            n = int(rate * seconds)
            tasks = []
            t0 = time.perf_counter()
            for i in range(n):
                delay = t0 + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(_post(http, base, channel, next(ids))))
            results = await asyncio.gather(*tasks)
            elapsed = time.perf_counter() - t0
            busy_after = await running_count(url) if name == "busy" else None
    lat = sorted(t * 1000 for _, t in results)
    ok = sum(1 for s, _ in results if s == 200)
    return {
        "db": db,
        "channel": channel,
        "scenario": name if busy_after is None else f"busy ({busy_after} running at end)",
        "requests": n,
        "ok": ok,
        "rate": n / elapsed,
        "p50": statistics.median(lat),
        "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
        "max": lat[-1],
    }


def median_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each figure over repeated runs of one scenario."""
    row = {k: statistics.median(r[k] for r in runs) for k in ("rate", "p50", "p99", "max")}
    scenario = runs[0]["scenario"].split(" (")[0]
    return {
        **runs[0],
        **row,
        "scenario": f"{scenario}: median of {len(runs)}",
        "requests": sum(r["requests"] for r in runs),
        "ok": sum(r["ok"] for r in runs),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--channel", choices=["telegram", "slack", "both"], default="both")
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--scenario", choices=["idle", "busy", "both"], default="both")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs of each scenario; adds a median row"
    )
    args = parser.parse_args()
    dbs = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    channels = ["telegram", "slack"] if args.channel == "both" else [args.channel]
    names = ["idle", "busy"] if args.scenario == "both" else [args.scenario]
    rows = []
    for db in dbs:
        for channel in channels:
            for name in names:
                runs = []
                for _ in range(args.repeat):
                    runs.append(await scenario(db, channel, name, args.rate, args.seconds))
                    if db == "postgres":
                        await _pg_admin(f"DROP DATABASE IF EXISTS {PG_DB} WITH (FORCE)")
                rows.extend(runs)
                if len(runs) > 1:
                    rows.append(median_row(runs))
    header = (
        f"{'database':<10} {'channel':<9} {'scenario':<26} {'requests':>8} {'200s':>6} "
        f"{'rate/s':>8} {'ack p50 ms':>10} {'ack p99 ms':>10} {'ack max ms':>10}"
    )
    print(f"Inbound acks, target {args.rate:g} req/s for {args.seconds:g} s")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['db']:<10} {r['channel']:<9} {r['scenario']:<26} {r['requests']:>8} "
            f"{r['ok']:>6} {r['rate']:>8.1f} {r['p50']:>10.2f} {r['p99']:>10.2f} {r['max']:>10.2f}"
        )


if __name__ == "__main__":
    asyncio.run(main())
