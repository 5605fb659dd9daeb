"""The process roles: gateway, worker pool, scheduler, and ``serve`` (all three in one process).

The composition root: the one place that wires settings, ledger, gateway, worker and scheduler
together. Each ``run_*`` runs until SIGINT/SIGTERM and then shuts down gracefully.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from config import Settings
from config.token import load_or_create_operator_token
from ledger import Ledger, LedgerUnavailable

log = logging.getLogger("tether")


#: every line names the work item it was emitted for (``work=-`` outside one)
LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s work=%(work)s: %(message)s"
#: ``TETHER_LOG_FORMAT=json``: one JSON object per line instead
LOG_FORMAT_ENV = "TETHER_LOG_FORMAT"


class WorkIdFilter(logging.Filter):
    """Puts the running work item's id (see :data:`worker.context.current_work_id`) on each
    record as ``record.work`` (``-`` when none). Attached to handlers, so it sees every record
    that reaches them, whichever logger emitted it; it runs in the emitting task's context."""

    def __init__(self) -> None:
        super().__init__()
        from worker.context import current_work_id

        self._work_id = current_work_id

    def filter(self, record: logging.LogRecord) -> bool:
        if not isinstance(getattr(record, "work", None), str):
            record.work = self._work_id.get() or "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, work, message (and the traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        work = getattr(record, "work", "-")
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "work": None if work == "-" else work,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def log_handler(stream: Any = None, *, json_format: bool = False) -> logging.Handler:
    """A stream handler with the work-id filter and Tether's line (or JSON) format."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(WorkIdFilter())
    handler.setFormatter(JsonFormatter() if json_format else logging.Formatter(LOG_FORMAT))
    return handler


def configure_logging(level: str, *, json_format: bool | None = None) -> None:
    """Root logging to stderr, each line with ``work=<id>`` (``json_format``: JSON lines
    instead; the CLI passes ``TETHER_LOG_FORMAT``, and the environment is read when it is not
    given)."""
    if json_format is None:
        json_format = os.environ.get(LOG_FORMAT_ENV, "").strip().lower() == "json"
    logging.basicConfig(level=level.upper(), handlers=[log_handler(json_format=json_format)])
    # aiosqlite logs every statement with its parameters at DEBUG (resume tokens included)
    for noisy in ("alembic", "apscheduler", "aiohttp.access", "aiosqlite"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _install_stop(stop: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop)


async def open_ledger(settings: Settings, *, migrate: bool) -> Ledger:
    try:
        return await Ledger.open(
            settings.database_url,
            migrate=migrate,
            sqlite_synchronous=settings.sqlite_synchronous,
        )
    except LedgerUnavailable:
        raise
    except Exception as exc:
        raise LedgerUnavailable(f"cannot open the ledger: {exc}") from exc


def _load_agents(settings: Settings) -> frozenset[str]:
    from worker import load_agent_modules

    agents = load_agent_modules(settings.agent_modules)
    if settings.default_agent not in agents:
        raise SystemExit(
            f"TETHER_DEFAULT_AGENT={settings.default_agent!r} is not among the loaded agents "
            f"({', '.join(sorted(agents)) or 'none'}); check TETHER_AGENT_MODULES"
        )
    return agents


async def _start_gateway(
    ledger: Ledger, settings: Settings, agents: frozenset[str] | None
) -> web.AppRunner:
    from gateway import create_app

    token, created = load_or_create_operator_token(settings)
    from worker.registry import chat_policies

    app = create_app(
        ledger,
        settings,
        operator_token=token,
        known_agents=agents,
        chat_policies={a: p for a, p in chat_policies().items() if agents is None or a in agents},
    )
    if settings.telegram_token is not None:
        # Seconds of CPU: done before listening, not while the first requests are answered.
        from adapters.telegram import import_client_library

        await asyncio.to_thread(import_client_library)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    print(f"Tether gateway listening on http://{settings.host}:{settings.port}", flush=True)
    print(f"  operator API:  {settings.effective_public_url}/api/v1  (bearer token)", flush=True)
    if created:
        print(f"  operator token (shown once): {token}", flush=True)
    if settings.operator_token is None:
        print(f"  token file:    {settings.operator_token_file()}", flush=True)
    return runner


def _delivery_loop(ledger: Ledger, settings: Settings) -> Any:
    """The outbound delivery loop with the senders of the configured channels."""
    from gateway.delivery import DeliveryLoop, senders_from_settings

    return DeliveryLoop(ledger, senders_from_settings(settings), poll_interval=0.5)


def _telegram_poller(ledger: Ledger, settings: Settings, agents: frozenset[str] | None) -> Any:
    """The Telegram poller when ``telegram_mode == "polling"`` and a token is set, else None."""
    if settings.telegram_mode != "polling" or settings.telegram_token is None:
        return None
    from gateway.telegram_polling import TelegramPoller
    from worker.registry import chat_policies

    policies = {a: p for a, p in chat_policies().items() if agents is None or a in agents}
    print("  telegram:      polling getUpdates", flush=True)
    return TelegramPoller(ledger, settings, policies=policies)


async def _run(parts: list[Callable[[], Awaitable[None]]], stops: list[Callable[[], None]]) -> None:
    stopped = asyncio.Event()

    def stop() -> None:
        stopped.set()
        for s in stops:
            s()

    _install_stop(stop)
    # What start-up built (modules, aiogram's pydantic models: hundreds of thousands of objects)
    # lives as long as the process: keep it out of the collector's full passes, which would
    # otherwise walk all of it (over 100 ms here) in the middle of answering requests.
    gc.freeze()
    tasks = [asyncio.create_task(p()) for p in parts]
    waiter = asyncio.create_task(stopped.wait())
    done, _ = await asyncio.wait([*tasks, waiter], return_when=asyncio.FIRST_COMPLETED)
    if waiter not in done:  # a role ended on its own (an error): stop the others
        stop()
    await asyncio.gather(*tasks, return_exceptions=True)
    waiter.cancel()
    for t in tasks:
        if t.done() and not t.cancelled() and t.exception() is not None:
            raise t.exception()  # type: ignore[misc]


async def run_serve(settings: Settings, *, concurrency: int | None = None) -> None:
    """Gateway + worker pool + scheduler in one process (SQLite migrated on start)."""
    from scheduler import SchedulerService
    from worker import WorkerPool
    from worker.model_calls import ModelRuntime

    agents = _load_agents(settings)
    ledger = await open_ledger(settings, migrate=settings.is_sqlite)
    pool = WorkerPool(
        ledger,
        concurrency=concurrency or settings.worker_concurrency,
        lease_ttl=settings.lease_ttl,
        poll_interval=settings.poll_interval,
        agents=agents,
        public_url=settings.effective_public_url,
        models=ModelRuntime.from_settings(settings),
        group_commit_ms=settings.group_commit_ms,
        group_commit_max=settings.group_commit_max,
    )
    sched = SchedulerService(
        ledger, reaper_interval=settings.reaper_interval, schedules=settings.schedules
    )
    runner = await _start_gateway(ledger, settings, agents)
    print(
        f"  worker pool:   {pool.concurrency} slot(s), agents: {', '.join(sorted(agents))}",
        flush=True,
    )
    print(f"  database:      {_safe_url(settings.database_url)}", flush=True)
    delivery = _delivery_loop(ledger, settings)
    parts = [pool.run, sched.run, delivery.run]
    stops = [pool.stop, sched.stop, delivery.stop]
    poller = _telegram_poller(ledger, settings, agents)
    if poller is not None:
        parts.append(poller.run)
        stops.append(poller.stop)
    try:
        await _run(parts, stops)
    finally:
        await runner.cleanup()
        await ledger.close()


async def run_gateway(settings: Settings) -> None:
    agents = _load_agents(settings)
    ledger = await open_ledger(settings, migrate=False)
    runner = await _start_gateway(ledger, settings, agents)
    delivery = _delivery_loop(ledger, settings)
    parts = [delivery.run]
    stops = [delivery.stop]
    poller = _telegram_poller(ledger, settings, agents)
    if poller is not None:
        parts.append(poller.run)
        stops.append(poller.stop)
    try:
        await _run(parts, stops)
    finally:
        await runner.cleanup()
        await ledger.close()


async def run_worker(settings: Settings, *, concurrency: int | None = None) -> None:
    from worker import WorkerPool
    from worker.model_calls import ModelRuntime

    agents = _load_agents(settings)
    ledger = await open_ledger(settings, migrate=False)
    pool = WorkerPool(
        ledger,
        concurrency=concurrency or settings.worker_concurrency,
        lease_ttl=settings.lease_ttl,
        poll_interval=settings.poll_interval,
        agents=agents,
        public_url=settings.effective_public_url,
        models=ModelRuntime.from_settings(settings),
        group_commit_ms=settings.group_commit_ms,
        group_commit_max=settings.group_commit_max,
    )
    log.info("worker %s starting (database %s)", pool.worker_id, _safe_url(settings.database_url))
    try:
        await _run([pool.run], [pool.stop])
    finally:
        await ledger.close()


async def run_scheduler(settings: Settings) -> None:
    from scheduler import SchedulerService

    ledger = await open_ledger(settings, migrate=False)
    sched = SchedulerService(
        ledger, reaper_interval=settings.reaper_interval, schedules=settings.schedules
    )
    try:
        await _run([sched.run], [sched.stop])
    finally:
        await ledger.close()


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
