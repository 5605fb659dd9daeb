"""The scale-out chaos run: topology, load generator, chaos driver, operator and checker.

Used by ``tests/chaos/test_scale_out.py`` (see its docstring for the commands). One run:

* **Topology** (:class:`Topology`): a throwaway PostgreSQL cluster (:mod:`pg_cluster`), migrated
  with ``tether db upgrade``; 2 ``tether gateway`` processes (each on its own port, each with its
  outbox delivery loop), 3 ``tether worker`` and 2 ``tether scheduler`` processes, all running
  the ``scale`` agent (:mod:`scale_agents`); fake Telegram and Slack servers in the test process
  (:class:`Platform` records every message they accept, with its arrival time).
* **Load** (:class:`LoadGenerator`): ``conversations`` chats, half Telegram private chats, half
  Slack DMs. Each sends one command at a time (``echo``, ``/approve`` then a signed button click
  on the prompt the fake received, ``/hook`` then a signed Standard Webhooks POST to
  ``/webhooks/scale``, ``/remind``), waits for its replies, thinks, and goes on. Requests are
  signed like the platforms sign them, spread over both gateways; a connection error, a timeout
  or a 5xx (and a 404 ``no_waiter`` for a signal) is "not accepted": the same update id / event
  id / delivery id is sent again (to the other gateway, like a load balancer would) until a 2xx.
  Only a 2xx counts as accepted.
* **Chaos** (:class:`ChaosDriver`): every few seconds a SIGKILL to one role process, restarted at
  once; with ``>= 14`` kills, every one of the 7 processes is killed twice first (then random
  picks). Only a process that is up and serving is killed (not one still starting), and never
  the last gateway that serves: a gateway restart takes 10-40 s here (it imports aiogram before
  it listens), and the load must keep a way in. Once per run, right after a worker was killed
  half-way through (its leases are being recovered), PostgreSQL itself is crash-stopped
  (``pg_ctl stop -m immediate``), left down for a few seconds, and started again: a full outage.
  A process that exits on its own is restarted too, and reported.
* **Operator** (:class:`Operator`): a delivery whose outcome is in doubt (``unknown``) blocks its
  conversation until an operator acts. The operator looks at the chat (the fake's log), like a
  person would: message there → ``abandon``, not there → ``resend``
  (``TETHER_CHAOS_SCALE_OPERATOR=resend`` resends blindly instead; duplicates then show up and
  are traced).
* **Check** (:func:`check_history`, pure, tested with forged histories): from the ledger, the
  fakes' logs and the effects file: every accepted message has exactly one work item, every
  accepted click / signal resolved exactly one wait, every work item succeeded, the outbox is
  drained, no recorded step ran again (no effect line written after its step's record), and per
  conversation the replies arrived complete and in order; duplicates are counted and each must
  be traceable to an outbox row that went through ``unknown`` and was re-sent.

Known harness choice: the gateway's delivery loop claims an outbox row for a hard-coded 60 s
(``tether/roles.py`` ``_delivery_loop``; not a setting). A gateway SIGKILLed mid-send leaves its
rows ``sending`` that long, then ``unknown``, and their conversations wait. The launcher here
sets that claim to ``delivery_lease`` seconds (``TETHER_CHAOS_SCALE_DELIVERY_LEASE``, default 10;
0 keeps Tether's 60 s) so that a CI-sized run finishes in time; nothing else is changed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import math
import os
import random
import re
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
from aiohttp import web
from pg_cluster import PgCluster, free_port, reap_orphans
from procs import (
    LAUNCHER_GUARD,
    LAUNCHER_RUN,
    SUPPORT_DIR,
    ProcessGroup,
    TetherProcess,
    tether_env,
)
from scale_agents import SIGNAL, expected_replies

sys.path.insert(0, str(SUPPORT_DIR.parent / "fakes"))
from slack_api import BOT_ID, BOT_USER_ID, TEAM_ID, FakeSlack
from telegram_api import FakeTelegram

TELEGRAM_TOKEN = "123456:SCALE-telegram-token"
TELEGRAM_BOT_ID = TELEGRAM_TOKEN.split(":", 1)[0]
TELEGRAM_SECRET = "scale-telegram-secret"
SLACK_TOKEN = "xoxb-scale-slack-token"
SLACK_SECRET = "scale-slack-signing-secret"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"scale-out-standard-webhook-secret").decode()
WEBHOOK_NAME = "scale"
OPERATOR_TOKEN = "scale-operator-token"

ROLES = ("gateway", "worker", "scheduler")
SLOTS = (
    "gateway-a",
    "gateway-b",
    "worker-1",
    "worker-2",
    "worker-3",
    "scheduler-1",
    "scheduler-2",
)
#: the line each role prints once it serves (a traceback may contain " running " too)
READY = {
    "gateway": re.compile(r"^Tether gateway listening on ", re.M),
    "worker": re.compile(r"worker\.pool work=-: worker \S+ running \d+ slot"),
    "scheduler": re.compile(r"scheduler\.service work=-: scheduler running: "),
}
COMMANDS = ("echo", "/approve", "/hook", "/remind")
UNFINISHED_WORK = ("queued", "running", "waiting", "paused")
UNDRAINED_OUTBOX = ("pending", "sending", "unknown")
#: seconds the chaos driver waits for its random pick to become killable before it picks again
PICK_PATIENCE = 5.0
#: how many of the slowest replies get a timeline in the report
DIAGNOSE_SLOWEST = 2


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return float(raw) if raw else default


def _env_range(name: str, default: tuple[float, float]) -> tuple[float, float]:
    """``"a,b"`` (or one number) as a range of seconds."""
    raw = os.environ.get(name)
    if not raw:
        return default
    parts = [float(x) for x in raw.split(",")]
    return parts[0], parts[-1]


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return int(raw) if raw else default


@dataclass
class ScaleConfig:
    """The knobs of one run (``from_env`` reads ``TETHER_CHAOS_SCALE_*``)."""

    kills: int = 14
    conversations: int = 200
    seed: int = 0
    #: seconds between two kills
    kill_interval: tuple[float, float] = (1.5, 3.0)
    #: load before the first kill
    warmup: float = 4.0
    #: the load runs at least this long (seconds, warm-up included), kills or not
    min_duration: float = 0.0
    pg_restart: bool = True
    #: how long PostgreSQL stays down
    pg_down: float = 3.0
    #: a conversation's pause between the end of one command and the next
    think: tuple[float, float] = (10.0, 25.0)
    #: relative weights of echo, /approve, /hook, /remind
    mix: tuple[float, float, float, float] = (0.5, 0.2, 0.15, 0.15)
    lease_ttl: float = 2.0
    reaper_interval: float = 0.5
    #: workers poll this often when no NOTIFY woke them
    poll_interval: float = 1.0
    worker_concurrency: int = 8
    #: the gateway delivery loop's claim on an outbox row (0: Tether's own 60 s)
    delivery_lease: float = 10.0
    #: ``inspect`` (look at the chat: abandon if there, else resend) or ``resend``
    operator: str = "inspect"
    #: the longest a conversation waits for one reply before it is declared stuck
    reply_timeout: float = 120.0
    #: the longest the end of the run may take to settle (work finished, outbox drained)
    settle_timeout: float = 180.0
    #: one HTTP request to a gateway
    request_timeout: float = 10.0
    #: the longest a restarted process may take to be ready (a gateway imports aiogram first)
    start_timeout: float = 300.0
    #: a process is killed only after it has served this long
    min_uptime: float = 2.0
    log_level: str = "INFO"

    @classmethod
    def from_env(cls) -> ScaleConfig:
        seed = _env_int("TETHER_CHAOS_SCALE_SEED", 0) or random.SystemRandom().randrange(2**31)
        operator = os.environ.get("TETHER_CHAOS_SCALE_OPERATOR", "inspect")
        if operator not in ("inspect", "resend"):
            raise ValueError("TETHER_CHAOS_SCALE_OPERATOR must be inspect or resend")
        return cls(
            kills=_env_int("TETHER_CHAOS_SCALE_KILLS", cls.kills),
            conversations=_env_int("TETHER_CHAOS_SCALE_CONVERSATIONS", cls.conversations),
            seed=seed,
            kill_interval=_env_range("TETHER_CHAOS_SCALE_INTERVAL", cls.kill_interval),
            pg_restart=os.environ.get("TETHER_CHAOS_SCALE_PG_RESTART", "1") != "0",
            delivery_lease=_env_float("TETHER_CHAOS_SCALE_DELIVERY_LEASE", cls.delivery_lease),
            operator=operator,
            think=_env_range("TETHER_CHAOS_SCALE_THINK", cls.think),
            min_duration=_env_float("TETHER_CHAOS_SCALE_MIN_SECONDS", cls.min_duration),
            log_level=os.environ.get("TETHER_CHAOS_SCALE_LOG_LEVEL", cls.log_level),
        )

    def describe(self) -> str:
        return (
            f"TETHER_CHAOS_SCALE_SEED={self.seed} TETHER_CHAOS_SCALE_KILLS={self.kills} "
            f"TETHER_CHAOS_SCALE_CONVERSATIONS={self.conversations}"
        )


def percentile(values: list[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank) of ``values``; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


# == the platforms ================================================================================


@dataclass
class Delivery:
    """One message a fake platform accepted (``sendMessage`` / ``chat.postMessage``)."""

    conv: str
    text: str
    at: float
    #: what a click needs: Telegram ``message_id`` and ``reply_markup``; Slack ``ts``/``blocks``
    info: dict[str, Any] = field(default_factory=dict)


class Platform:
    """Both fakes' accepted messages by conversation (``telegram:<chat>``, ``slack:<channel>``),
    in arrival order, and wake-ups for whoever waits for one."""

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        self.by_conv: dict[str, list[Delivery]] = defaultdict(list)
        self.first: dict[tuple[str, str], Delivery] = {}
        self.texts: Counter[str] = Counter()
        self._events: dict[str, asyncio.Event] = defaultdict(asyncio.Event)

    def record(self, conv: str, text: str, at: float, info: dict[str, Any]) -> None:
        d = Delivery(conv, text, at, info)
        self.deliveries.append(d)
        self.by_conv[conv].append(d)
        self.first.setdefault((conv, text), d)
        self.texts[text] += 1
        self._events[conv].set()

    async def wait_for(self, conv: str, text: str, timeout: float) -> Delivery | None:
        deadline = time.monotonic() + timeout
        while True:
            found = self.first.get((conv, text))
            if found is not None:
                return found
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            event = self._events[conv]
            event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), min(left, 1.0))


class RecordingTelegram(FakeTelegram):
    def __init__(self, token: str, platform: Platform) -> None:
        super().__init__(token)
        self.platform = platform

    async def _handle(self, request: web.Request) -> web.Response:
        at = time.time()
        response = await super()._handle(request)
        if request.match_info.get("method") == "sendMessage" and response.status == 200:
            result = json.loads(response.text or "{}").get("result") or {}
            conv = f"telegram:{result['chat']['id']}"
            info = {"message_id": result["message_id"], "reply_markup": result.get("reply_markup")}
            self.platform.record(conv, result.get("text", ""), at, info)
        return response


class RecordingSlack(FakeSlack):
    def __init__(self, token: str, platform: Platform) -> None:
        super().__init__(token)
        self.platform = platform

    async def _handle(self, request: web.Request) -> web.Response:
        at = time.time()
        response = await super()._handle(request)
        if request.match_info.get("method") == "chat.postMessage" and response.status == 200:
            body = json.loads(response.text or "{}")
            if body.get("ok"):
                message = body.get("message") or {}
                info = {
                    "ts": body["ts"],
                    "blocks": message.get("blocks"),
                    "thread_ts": message.get("thread_ts"),
                }
                self.platform.record(f"slack:{body['channel']}", message.get("text", ""), at, info)
        return response


# == processes ====================================================================================

#: ``procs._LAUNCHER`` plus the delivery-claim knob (see the module docstring)
_LAUNCHER = (
    LAUNCHER_GUARD
    + """\
_lease = float(os.environ.get("SCALE_DELIVERY_LEASE") or 0)
if _lease > 0 and sys.argv[1:2] == ["gateway"]:
    import tether.roles as _roles

    def _delivery_loop(ledger, settings):
        from gateway.delivery import DeliveryLoop, senders_from_settings

        return DeliveryLoop(
            ledger, senders_from_settings(settings), poll_interval=0.5, lease_ttl=_lease
        )

    _roles._delivery_loop = _delivery_loop
    print(f"scale: outbox delivery claims last {_lease:g}s", flush=True)
"""
    + LAUNCHER_RUN
)


class ScaleProcessGroup(ProcessGroup):
    """:class:`procs.ProcessGroup` with the launcher above; everything else is inherited
    (logs per process, ``cleanup`` reaps them all)."""

    launcher = _LAUNCHER


def is_ready(proc: TetherProcess) -> bool:
    """Whether the process printed its role's ready line (read from the log's start)."""
    try:
        with proc.log_path.open("rb") as f:
            head = f.read(256 * 1024).decode("utf-8", "replace")
    except OSError:
        return False
    return READY[proc.role].search(head) is not None


@dataclass
class Slot:
    name: str
    role: str
    port: int | None = None
    proc: TetherProcess | None = None
    #: set by the chaos driver just before it kills the process on purpose
    killing: bool = False
    starts: int = 0
    last_start: float = 0.0
    #: when its process was first seen ready (``time.monotonic()``)
    ready_at: float | None = None


@dataclass
class SelfExit:
    slot: str
    process: str
    returncode: int | None
    during_pg_outage: bool
    tail: str
    #: it had started (printed its ready line) before it exited
    was_ready: bool = False


class Topology:
    """The throwaway PostgreSQL server and the seven role processes (one :class:`Slot` each)."""

    def __init__(self, cfg: ScaleConfig, workdir: Path, platform_urls: dict[str, str]) -> None:
        self.cfg = cfg
        self.workdir = workdir
        self.pg: PgCluster | None = None
        self.procs = ScaleProcessGroup(workdir / "procs")
        self.effects = workdir / "effects.txt"
        self.effects.touch()
        self.urls = platform_urls
        self.slots = {
            name: Slot(
                name, name.split("-")[0], free_port() if name.startswith("gateway") else None
            )
            for name in SLOTS
        }
        self.self_exits: list[SelfExit] = []
        #: (start, end) of PostgreSQL outages, ``time.time()``
        self.pg_outages: list[tuple[float, float]] = []
        #: CPU seconds used per role (all its processes, dead ones included)
        self.cpu: Counter[str] = Counter()
        self._accounted: set[int] = set()

    @property
    def gateways(self) -> list[str]:
        return [f"http://127.0.0.1:{s.port}" for s in self.slots.values() if s.role == "gateway"]

    @property
    def db_url(self) -> str:
        assert self.pg is not None
        return self.pg.url

    def settings(self, slot: Slot) -> dict[str, str]:
        s: dict[str, Any] = {
            "lease_ttl": self.cfg.lease_ttl,
            "poll_interval": self.cfg.poll_interval,
            "reaper_interval": self.cfg.reaper_interval,
            "agent_modules": "scale_agents",
            "default_agent": "scale",
            "log_level": self.cfg.log_level,
            "SCALE_EFFECTS_FILE": str(self.effects),
            "SCALE_DELIVERY_LEASE": str(self.cfg.delivery_lease),
            "TETHER_OPERATOR_TOKEN": OPERATOR_TOKEN,
        }
        if slot.role == "gateway":
            s.update(
                TETHER_HOST="127.0.0.1",
                TETHER_PORT=str(slot.port),
                TETHER_PUBLIC_URL=f"http://127.0.0.1:{slot.port}",
                TETHER_TELEGRAM_TOKEN=TELEGRAM_TOKEN,
                TETHER_TELEGRAM_WEBHOOK_SECRET=TELEGRAM_SECRET,
                TETHER_TELEGRAM_API_BASE=self.urls["telegram"],
                TETHER_SLACK_BOT_TOKEN=SLACK_TOKEN,
                TETHER_SLACK_SIGNING_SECRET=SLACK_SECRET,
                TETHER_SLACK_API_BASE=self.urls["slack"],
                TETHER_WEBHOOKS=json.dumps(
                    [
                        {
                            "name": WEBHOOK_NAME,
                            "scheme": "standard",
                            "secret": WEBHOOK_SECRET,
                            "signal": SIGNAL,
                            "key_field": "data.key",
                        }
                    ]
                ),
            )
        return {k: str(v) for k, v in s.items()}

    # -- lifecycle ------------------------------------------------------------------------------

    async def start_database(self) -> None:
        await asyncio.to_thread(reap_orphans)
        self.pg = PgCluster()
        await asyncio.to_thread(self.pg.init)
        await asyncio.to_thread(self.pg.start)
        env = tether_env(self.pg.url, agent_modules="scale_agents", default_agent="scale")
        out = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "tether.cli", "db", "upgrade"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=self.workdir,
        )
        if out.returncode != 0:
            raise AssertionError(f"tether db upgrade failed:\n{out.stdout}\n{out.stderr}")

    def start(self, name: str) -> TetherProcess:
        slot = self.slots[name]
        args = ("--concurrency", str(self.cfg.worker_concurrency)) if slot.role == "worker" else ()
        slot.proc = self.procs.start(slot.role, self.db_url, *args, **self.settings(slot))
        slot.starts += 1
        slot.last_start = time.monotonic()
        slot.ready_at = None
        slot.killing = False
        return slot.proc

    async def start_all(self) -> None:
        for name in SLOTS:
            self.start(name)
        await self.wait_ready(SLOTS, self.cfg.start_timeout)

    async def wait_ready(self, names: tuple[str, ...] | list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for name in names:
            while True:
                proc = self.slots[name].proc
                assert proc is not None
                if is_ready(proc):
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"{name} not ready in {timeout}s\n{proc.tail()}")
                await asyncio.sleep(0.1)

    def serving_for(self, name: str) -> float:
        """Seconds since the slot's process was first seen ready; -1 while it is not."""
        slot = self.slots[name]
        if slot.proc is None:
            return -1.0
        if slot.ready_at is None:
            if not is_ready(slot.proc):
                return -1.0
            slot.ready_at = time.monotonic()
        return time.monotonic() - slot.ready_at

    def kill(self, name: str) -> TetherProcess:
        slot = self.slots[name]
        assert slot.proc is not None
        slot.killing = True
        self._account(slot.proc)
        slot.proc.kill()
        return slot.proc

    def _account(self, proc: TetherProcess) -> None:
        """Add the process's CPU seconds so far (``/proc/<pid>/stat``) to its role's total."""
        if proc.pid in self._accounted:
            return
        try:
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return
        self._accounted.add(proc.pid)
        self.cpu[proc.role] += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def pg_is_down(self, at: float, margin: float = 10.0) -> bool:
        return any(a - margin <= at <= b + margin for a, b in self.pg_outages)

    def supervise(self) -> None:
        """Restart every process that exited on its own (at most once a second per slot)."""
        for slot in self.slots.values():
            proc = slot.proc
            if proc is None or slot.killing or proc.alive:
                continue
            if time.monotonic() - slot.last_start < 1.0:
                continue
            self._account(proc)
            proc.kill()  # reap it (it is gone already)
            self.self_exits.append(
                SelfExit(
                    slot.name,
                    proc.name,
                    proc.popen.returncode,
                    self.pg_is_down(proc.ended_at or time.time()),
                    proc.tail(8),
                    is_ready(proc),
                )
            )
            self.start(slot.name)

    async def restart_postgres(self) -> None:
        assert self.pg is not None
        began = time.time()
        self.pg_outages.append((began, math.inf))
        await asyncio.to_thread(self.pg.stop, "immediate")
        await asyncio.sleep(self.cfg.pg_down)
        await asyncio.to_thread(self.pg.start)
        self.pg_outages[-1] = (began, time.time())

    def dump_ledger(self) -> str:
        """``pg_dump`` of the ledger into the work directory (for a post-mortem of a failed
        run, after the throwaway cluster is gone)."""
        assert self.pg is not None
        path = self.workdir / "ledger.sql"
        out = subprocess.run(
            [str(self.pg.bin / "pg_dump"), "-h", "127.0.0.1", "-p", str(self.pg.port),
             "-U", "postgres", "-f", str(path), "postgres"],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        if out.returncode != 0:
            return f"pg_dump failed: {out.stderr.strip()}"
        return f"ledger dumped to {path} (psql -f it into an empty database to look around)"

    def cleanup(self) -> None:
        for slot in self.slots.values():
            if slot.proc is not None:
                self._account(slot.proc)
        self.procs.cleanup()
        if self.pg is not None:
            self.pg.destroy()


# == load =========================================================================================


@dataclass
class Request:
    """One inbound request as the load generator sent it, until a gateway answered 2xx."""

    kind: str  # "message" | "click" | "signal"
    conv: str
    #: message: the ledger's message id (``{bot}:{update_id}`` / ``{team}:{event_id}``);
    #: click: the wait id; signal: the webhook delivery id
    ref: str
    tag: str
    sent_at: float
    accepted_at: float | None = None
    attempts: int = 0
    status: int | None = None


@dataclass
class Command:
    conv: str
    text: str
    tag: str
    n: int
    message: Request | None = None
    done: bool = False

    @property
    def expected(self) -> list[str]:
        return expected_replies(self.text, self.n)


@dataclass
class Conversation:
    key: str
    channel: str  # "telegram" | "slack"
    chat: str
    user: str
    home: int
    commands: list[Command] = field(default_factory=list)
    stuck: str | None = None


class RefusedRequest(AssertionError):
    """A gateway refused a request for good (4xx): the generator built it wrong."""


class LoadGenerator:
    def __init__(self, cfg: ScaleConfig, gateways: list[str], platform: Platform) -> None:
        self.cfg = cfg
        self.gateways = gateways
        self.platform = platform
        self.rng = random.Random(cfg.seed ^ 0x5CA1E)
        self.conversations: list[Conversation] = []
        for i in range(cfg.conversations):
            if i % 2 == 0:
                chat = str(700_000 + i)
                conv = Conversation(f"telegram:{chat}", "telegram", chat, f"tguser{i}", i % 4 // 2)
            else:
                chat = f"D{i:07d}"
                conv = Conversation(f"slack:{chat}", "slack", chat, f"U{i:07d}", i % 4 // 2)
            self.conversations.append(conv)
        self.requests: list[Request] = []
        self.retries: Counter[str] = Counter()
        #: end-to-end latencies: (seconds from the request's first try to its reply seen by the
        #: fake, conversation, reply)
        self.latencies: list[tuple[float, str, str]] = []
        self._stop = asyncio.Event()
        #: per gateway: until when it is considered down (``time.monotonic()``)
        self._down_until = [0.0, 0.0]
        self._ids = itertools.count(1)
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.errors: list[str] = []

    # -- requests -------------------------------------------------------------------------------

    async def _post(
        self,
        req: Request,
        home: int,
        path: str,
        build: Callable[[int], tuple[bytes, dict[str, str]]],
    ) -> Request:
        """POST until a 2xx: a connection error, a timeout or a 5xx goes to the other gateway;
        a 404 (a signal nobody waits for yet) is retried after a pause."""
        assert self._session is not None
        self.requests.append(req)
        while True:
            gw = self._route(home)
            req.attempts += 1
            body, headers = build(req.attempts)
            reason: str
            try:
                async with self._session.post(
                    self.gateways[gw] + path,
                    data=body,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=self.cfg.request_timeout),
                ) as resp:
                    req.status = resp.status
                    text = await resp.text()
                if 200 <= resp.status < 300:
                    req.accepted_at = time.time()
                    return req
                if resp.status == 404 and req.kind == "signal":
                    reason = "404 no waiter"
                elif resp.status >= 500:
                    reason = f"{resp.status}"
                    home = 1 - gw
                else:
                    raise RefusedRequest(f"{req.kind} {req.ref} refused {resp.status}: {text}")
            except (aiohttp.ClientError, TimeoutError) as exc:
                reason = "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
                self._down_until[gw] = time.monotonic() + 1.0
                home = 1 - gw
            self.retries[reason] += 1
            await asyncio.sleep(min(0.2 * req.attempts, 2.0))

    @property
    def stopping(self) -> bool:
        """Set: no conversation starts another command (the ones under way finish)."""
        return self._stop.is_set()

    @stopping.setter
    def stopping(self, value: bool) -> None:
        if value:
            self._stop.set()
        else:
            self._stop.clear()

    def _route(self, home: int) -> int:
        """Like a load balancer: ``home``, unless it refused a connection in the last second
        and the other gateway did not."""
        now = time.monotonic()
        other = 1 - home
        if self._down_until[home] > now and self._down_until[other] <= now:
            return other
        return home

    def _telegram_message(self, conv: Conversation, text: str) -> tuple[Request, Any]:
        update_id = next(self._ids)
        update = {
            "update_id": update_id,
            "message": {
                "message_id": update_id,
                "date": int(time.time()),
                "chat": {"id": int(conv.chat), "type": "private"},
                "from": {
                    "id": int(conv.chat),
                    "is_bot": False,
                    "first_name": conv.user,
                    "username": conv.user,
                },
                "text": text,
            },
        }
        body = json.dumps(update).encode()
        headers = {
            "Content-Type": "application/json",
            "X-Telegram-Bot-Api-Secret-Token": TELEGRAM_SECRET,
        }
        req = Request("message", conv.key, f"{TELEGRAM_BOT_ID}:{update_id}", "", time.time())
        return req, lambda _n: (body, headers)

    def _slack_signed(self, body: bytes, attempt: int, content_type: str) -> dict[str, str]:
        from slack_sdk.signature import SignatureVerifier

        ts = str(int(time.time()))
        sig = SignatureVerifier(SLACK_SECRET).generate_signature(timestamp=ts, body=body)
        headers = {
            "Content-Type": content_type,
            "X-Slack-Request-Timestamp": ts,
            "X-Slack-Signature": str(sig),
        }
        if attempt > 1:
            headers["X-Slack-Retry-Num"] = str(attempt - 1)
            headers["X-Slack-Retry-Reason"] = "http_error"
        return headers

    def _slack_message(self, conv: Conversation, text: str) -> tuple[Request, Any]:
        n = next(self._ids)
        event_id = f"Ev{n:010d}"
        ts = f"{1_700_000_000 + n}.{n % 1_000_000:06d}"
        envelope = {
            "token": "legacy-verification-token",
            "team_id": TEAM_ID,
            "api_app_id": "A0TETHER",
            "event": {
                "type": "message",
                "channel": conv.chat,
                "channel_type": "im",
                "user": conv.user,
                "text": text,
                "ts": ts,
                "event_ts": ts,
                "team": TEAM_ID,
            },
            "type": "event_callback",
            "event_id": event_id,
            "event_time": int(time.time()),
            "authorizations": [
                {"team_id": TEAM_ID, "user_id": BOT_USER_ID, "is_bot": True, "enterprise_id": None}
            ],
            "is_ext_shared_channel": False,
        }
        body = json.dumps(envelope).encode()
        req = Request("message", conv.key, f"{TEAM_ID}:{event_id}", "", time.time())
        return req, lambda a: (body, self._slack_signed(body, a, "application/json"))

    async def send_message(self, conv: Conversation, cmd: Command) -> Request:
        if conv.channel == "telegram":
            req, build = self._telegram_message(conv, cmd.text)
            path = "/channels/telegram/webhook"
        else:
            req, build = self._slack_message(conv, cmd.text)
            path = "/channels/slack/events"
        req.tag = cmd.tag
        return await self._post(req, conv.home, path, build)

    async def click(self, conv: Conversation, cmd: Command, prompt: Delivery) -> Request:
        if conv.channel == "telegram":
            markup = prompt.info.get("reply_markup") or {}
            data = markup["inline_keyboard"][0][0]["callback_data"]  # "w:<wait>:a"
            wait_id = data.split(":")[1]
            update_id = next(self._ids)
            update = {
                "update_id": update_id,
                "callback_query": {
                    "id": f"cq-{update_id}",
                    "from": {
                        "id": int(conv.chat),
                        "is_bot": False,
                        "first_name": conv.user,
                        "username": conv.user,
                    },
                    "chat_instance": f"ci-{conv.chat}",
                    "data": data,
                    "message": {
                        "message_id": int(prompt.info["message_id"]),
                        "date": int(time.time()),
                        "chat": {"id": int(conv.chat), "type": "private"},
                        "text": prompt.text,
                    },
                },
            }
            body = json.dumps(update).encode()
            headers = {
                "Content-Type": "application/json",
                "X-Telegram-Bot-Api-Secret-Token": TELEGRAM_SECRET,
            }
            req = Request("click", conv.key, wait_id, cmd.tag, time.time())
            return await self._post(
                req, conv.home, "/channels/telegram/webhook", lambda _a: (body, headers)
            )
        blocks = prompt.info.get("blocks") or []
        button = next(b for b in blocks if b.get("type") == "actions")["elements"][0]
        wait_id = button["action_id"].split(":")[1]
        payload = {
            "type": "block_actions",
            "user": {
                "id": conv.user,
                "username": conv.user.lower(),
                "name": conv.user.lower(),
                "team_id": TEAM_ID,
            },
            "api_app_id": "A0TETHER",
            "token": "legacy-verification-token",
            "container": {
                "type": "message",
                "message_ts": prompt.info["ts"],
                "channel_id": conv.chat,
                "is_ephemeral": False,
            },
            "trigger_id": f"{next(self._ids)}.trigger",
            "team": {"id": TEAM_ID, "domain": "tether-scale"},
            "channel": {"id": conv.chat, "name": "directmessage"},
            "message": {
                "type": "message",
                "user": BOT_USER_ID,
                "bot_id": BOT_ID,
                "ts": prompt.info["ts"],
                "text": prompt.text,
                "blocks": blocks,
            },
            "response_url": "https://hooks.slack.com/actions/T0/1/x",
            "actions": [
                {
                    "action_id": button["action_id"],
                    "block_id": f"tether:{wait_id}",
                    "text": {"type": "plain_text", "text": "Approve"},
                    "value": "approve",
                    "type": "button",
                    "action_ts": f"{time.time():.6f}",
                }
            ],
        }
        body = urlencode({"payload": json.dumps(payload)}).encode()
        req = Request("click", conv.key, wait_id, cmd.tag, time.time())
        return await self._post(
            req,
            conv.home,
            "/channels/slack/events",
            lambda a: (body, self._slack_signed(body, a, "application/x-www-form-urlencoded")),
        )

    async def signal(self, conv: Conversation, cmd: Command) -> Request:
        from standardwebhooks.webhooks import Webhook

        delivery_id = f"msg_{cmd.tag}"
        text = json.dumps({"type": "scale.signal", "data": {"key": cmd.tag, "n": cmd.n}})
        body = text.encode()

        def build(_attempt: int) -> tuple[bytes, dict[str, str]]:
            now = datetime.now(UTC)
            return body, {
                "webhook-id": delivery_id,
                "webhook-timestamp": str(int(now.timestamp())),
                "webhook-signature": Webhook(WEBHOOK_SECRET).sign(delivery_id, now, text),
                "Content-Type": "application/json",
            }

        req = Request("signal", conv.key, delivery_id, cmd.tag, time.time())
        return await self._post(req, conv.home, f"/webhooks/{WEBHOOK_NAME}", build)

    # -- conversations --------------------------------------------------------------------------

    async def _reply(self, conv: Conversation, text: str) -> Delivery:
        found = await self.platform.wait_for(conv.key, text, self.cfg.reply_timeout)
        if found is None:
            conv.stuck = f"no {text!r} within {self.cfg.reply_timeout:g}s"
            raise _Stuck()
        return found

    async def _one(self, conv: Conversation, cmd: Command) -> None:
        msg = await self.send_message(conv, cmd)
        cmd.message = msg
        expected = cmd.expected
        first = await self._reply(conv, expected[0])
        self.latencies.append((first.at - msg.sent_at, conv.key, first.text))
        if cmd.text.startswith("/approve"):
            click = await self.click(conv, cmd, first)
            done = await self._reply(conv, expected[1])
            self.latencies.append((done.at - click.sent_at, conv.key, done.text))
        elif cmd.text.startswith("/hook"):
            sig = await self.signal(conv, cmd)
            done = await self._reply(conv, expected[1])
            self.latencies.append((done.at - sig.sent_at, conv.key, done.text))
        elif cmd.text.startswith("/remind"):
            await self._reply(conv, expected[1])
        cmd.done = True

    async def _conversation(self, conv: Conversation, rng: random.Random) -> None:
        await asyncio.sleep(rng.uniform(0, self.cfg.think[0]))  # ramp up
        n = 0
        try:
            while not self.stopping:
                n += 1
                command = rng.choices(COMMANDS, weights=self.cfg.mix)[0]
                tag = f"{conv.key[0]}{conv.chat[-4:]}-{n}"
                cmd = Command(conv.key, f"{command} {tag}", tag, n)
                conv.commands.append(cmd)
                await self._one(conv, cmd)
                with contextlib.suppress(TimeoutError):  # think, unless the run ends
                    await asyncio.wait_for(self._stop.wait(), rng.uniform(*self.cfg.think))
        except _Stuck:
            return
        except RefusedRequest as exc:
            self.errors.append(str(exc))
        except Exception as exc:  # a bug in the generator: report it, keep the others going
            self.errors.append(f"{conv.key}: {type(exc).__name__}: {exc}")

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256, force_close=False)
        )
        for conv in self.conversations:
            rng = random.Random(self.rng.random())
            self._tasks.append(asyncio.create_task(self._conversation(conv, rng)))

    async def stop(self, timeout: float) -> list[str]:
        """Stop starting commands; wait (up to ``timeout``) for the ones in progress. Returns
        the conversations whose command did not finish in time."""
        self.stopping = True
        _, pending = await asyncio.wait(self._tasks, timeout=timeout) if self._tasks else ((), ())
        late = []
        for conv, task in zip(self.conversations, self._tasks, strict=True):
            if task in pending:
                late.append(conv.key)
                conv.stuck = conv.stuck or "still in progress when the run ended"
                task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        return late

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class _Stuck(Exception):
    pass


# == chaos ========================================================================================


def kill_schedule(kills: int, rng: random.Random) -> list[str]:
    """The slots to kill first, in order of preference. With ``kills >= 14``: two rounds in which
    every slot is killed once (each shuffled, no slot twice in a row); the driver picks the rest
    at random. Fewer kills: ``kills`` random picks."""
    if kills < 2 * len(SLOTS):
        return [rng.choice(SLOTS) for _ in range(kills)]
    out: list[str] = []
    for _ in range(2):
        round_ = list(SLOTS)
        rng.shuffle(round_)
        if out and round_[0] == out[-1]:
            round_[0], round_[-1] = round_[-1], round_[0]
        out += round_
    return out


class ChaosDriver:
    def __init__(self, cfg: ScaleConfig, topo: Topology) -> None:
        self.cfg = cfg
        self.topo = topo
        self.rng = random.Random(cfg.seed)
        self.schedule = kill_schedule(cfg.kills, self.rng)
        self.kills: Counter[str] = Counter()
        self.kills_by_slot: Counter[str] = Counter()
        self.pg_restarts = 0
        #: (time.time(), what) for the diagnostics
        self.log: list[tuple[float, str]] = []
        #: seconds spent waiting for processes to be ready before killing them
        self.waited = 0.0
        #: PostgreSQL goes down right after the first worker kill half-way through (while that
        #: worker's leases are being recovered)
        self.pg_after = cfg.kills // 2 if cfg.pg_restart and cfg.kills else None

    def killable(self, name: str) -> bool:
        """A process that has been up and serving for ``min_uptime`` seconds (not one still
        starting, nor one that has just started: it would be killed holding the batch it just
        claimed, again and again), and never the last gateway that serves (a full outage is the
        PostgreSQL restart's job)."""
        slot = self.topo.slots[name]
        if self.topo.serving_for(name) < self.cfg.min_uptime:
            return False
        return slot.role != "gateway" or all(
            self.topo.serving_for(g) >= 0 for g in SLOTS if g.startswith("gateway")
        )

    async def _victim(self, first: list[str], last: str | None) -> str:
        """The first slot of ``first`` that may be killed now (a gateway if one may); once
        ``first`` is done, a random slot (not ``last`` again) as soon as it may be killed, or,
        after ``PICK_PATIENCE`` seconds, a random one of those that may."""
        began = time.monotonic()
        pick: str | None = None
        while True:
            # gateways first: their restarts are the slow ones, so they overlap the other kills
            for name in sorted(first, key=lambda n: not n.startswith("gateway")):
                if self.killable(name):
                    first.remove(name)
                    self.waited += time.monotonic() - began
                    return name
            if not first:
                pick = pick or self.rng.choice([n for n in SLOTS if n != last])
                if time.monotonic() - began > PICK_PATIENCE:  # e.g. a gateway still starting
                    ready = [n for n in SLOTS if n != last and self.killable(n)]
                    pick = self.rng.choice(ready) if ready else pick
                if self.killable(pick):
                    self.waited += time.monotonic() - began
                    return pick
            if time.monotonic() - began > self.cfg.start_timeout:
                raise AssertionError(
                    f"no process became ready to kill in {self.cfg.start_timeout:g}s\n"
                    + self.topo.procs.tails(8)
                )
            await asyncio.sleep(0.1)

    async def run(self) -> None:
        first = list(self.schedule)
        name: str | None = None
        for i in range(self.cfg.kills):
            await asyncio.sleep(self.rng.uniform(*self.cfg.kill_interval))
            name = await self._victim(first, name)
            killed = self.topo.kill(name)
            self.kills[self.topo.slots[name].role] += 1
            self.kills_by_slot[name] += 1
            started = self.topo.start(name)
            self.log.append(
                (time.time(), f"SIGKILL {name} pid {killed.pid}, restarted as pid {started.pid}")
            )
            last = i == self.cfg.kills - 1
            if (
                self.pg_after is not None
                and not self.pg_restarts
                and i >= self.pg_after
                and (name.startswith("worker") or last)
            ):
                await asyncio.sleep(self.rng.uniform(0.2, 0.8))
                self.log.append((time.time(), "PostgreSQL stop -m immediate"))
                await self.topo.restart_postgres()
                self.log.append((time.time(), "PostgreSQL started"))
                self.pg_restarts += 1

    async def supervise(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.topo.supervise()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)


# == the operator =================================================================================


@dataclass
class OperatorAction:
    outbox_id: int
    text: str
    action: str  # "resend" | "abandon"
    seen_on_platform: int
    error: str | None
    at: float = 0.0


class Operator:
    """Resolves ``unknown`` deliveries through the operator API (``/api/v1/outbox``)."""

    def __init__(self, cfg: ScaleConfig, gateways: list[str], platform: Platform) -> None:
        self.cfg = cfg
        self.gateways = gateways
        self.platform = platform
        self.actions: list[OperatorAction] = []
        self.failures = 0
        self._done: set[tuple[int, int]] = set()

    async def _call(self, session: aiohttp.ClientSession, method: str, path: str) -> Any:
        headers = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
        last: BaseException | None = None
        for base in self.gateways:
            try:
                async with session.request(
                    method,
                    base + path,
                    headers=headers,
                    json={} if method == "POST" else None,
                    timeout=aiohttp.ClientTimeout(total=5),
                ) as resp:
                    data = await resp.json(content_type=None)
                    if resp.status < 300 or resp.status == 409:
                        return data
                    last = RuntimeError(f"{method} {path}: {resp.status} {data}")
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                last = exc
        raise RuntimeError(str(last))

    async def once(self, session: aiohttp.ClientSession) -> int:
        data = await self._call(session, "GET", "/api/v1/outbox?state=unknown&limit=200")
        acted = 0
        for row in data.get("items", []):
            text = str((row.get("payload") or {}).get("text", ""))
            seen = self.platform.texts[text]
            key = (int(row["id"]), int(row.get("attempts") or 0))
            if key in self._done:
                continue
            action = "abandon" if self.cfg.operator == "inspect" and seen else "resend"
            try:
                await self._call(session, "POST", f"/api/v1/outbox/{row['id']}/{action}")
                error = None
            except RuntimeError as exc:
                error = str(exc)
            self._done.add(key)
            self.actions.append(
                OperatorAction(int(row["id"]), text, action, seen, error, time.time())
            )
            acted += 1
        return acted

    async def run(self, stop: asyncio.Event) -> None:
        async with aiohttp.ClientSession() as session:
            while not stop.is_set():
                try:
                    await self.once(session)
                except Exception:
                    self.failures += 1  # gateways down, PostgreSQL restarting: next round
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)


# == the ledger, read back ========================================================================


@dataclass
class WorkRow:
    id: str
    source: str | None
    source_event_id: str | None
    conv: str | None
    state: str
    attempt: int = 1
    error: Any = None
    created_at: float = 0.0


@dataclass
class WaitRow:
    id: str
    work_id: str
    kind: str
    key: str | None
    state: str
    resolved_by: str | None


@dataclass
class OutboxRow:
    id: int
    conv: str | None
    text: str
    state: str
    resent: int = 0
    abandoned: int = 0
    created_at: float = 0.0


@dataclass
class LedgerView:
    work: list[WorkRow] = field(default_factory=list)
    waits: list[WaitRow] = field(default_factory=list)
    outbox: list[OutboxRow] = field(default_factory=list)
    #: idempotency key → ``finished_at`` (``time.time()`` seconds) of each recorded effect step
    effect_records: dict[str, float] = field(default_factory=dict)
    #: work id → when it was first claimed
    first_claim: dict[str, float] = field(default_factory=dict)
    #: how many times each work transition event happened (``lease_expired``, ``claimed`` …)
    event_counts: Counter[str] = field(default_factory=Counter)


@dataclass
class EffectLine:
    key: str
    at: float
    pid: int


async def connect(dsn: str, timeout: float = 30.0) -> Any:
    import asyncpg

    deadline = time.monotonic() + timeout
    while True:
        try:
            return await asyncpg.connect(dsn, timeout=5)
        except (OSError, asyncpg.PostgresError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def unfinished(dsn: str) -> tuple[int, int]:
    """(work items not finished, outbox rows not delivered)."""
    conn = await connect(dsn)
    try:
        work = await conn.fetchval(
            "SELECT count(*) FROM work WHERE state = ANY($1::text[])", list(UNFINISHED_WORK)
        )
        out = await conn.fetchval(
            "SELECT count(*) FROM outbox WHERE state = ANY($1::text[])", list(UNDRAINED_OUTBOX)
        )
        return int(work), int(out)
    finally:
        await conn.close()


def _ts(value: datetime | None) -> float:
    if value is None:
        return math.inf
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


async def read_ledger(dsn: str) -> LedgerView:
    conn = await connect(dsn)
    try:
        convs = {
            r["id"]: f"{r['channel']}:{r['chat_id']}"
            for r in await conn.fetch("SELECT id, channel, chat_id FROM conversation")
        }
        view = LedgerView()
        for r in await conn.fetch(
            "SELECT id, source, source_event_id, conversation_id, state, attempt, error, "
            "created_at FROM work"
        ):
            view.work.append(
                WorkRow(
                    r["id"],
                    r["source"],
                    r["source_event_id"],
                    convs.get(r["conversation_id"]),
                    r["state"],
                    r["attempt"],
                    r["error"],
                    _ts(r["created_at"]),
                )
            )
        for r in await conn.fetch("SELECT id, work_id, kind, key, state, resolved_by FROM wait"):
            view.waits.append(
                WaitRow(r["id"], r["work_id"], r["kind"], r["key"], r["state"], r["resolved_by"])
            )
        for r in await conn.fetch("SELECT type, count(*) AS n FROM event GROUP BY type"):
            view.event_counts[r["type"]] = int(r["n"])
        for r in await conn.fetch(
            "SELECT work_id, min(created_at) AS at FROM event WHERE type = 'claimed' "
            "GROUP BY work_id"
        ):
            view.first_claim[r["work_id"]] = _ts(r["at"])
        actions: Counter[tuple[int, str]] = Counter()
        for r in await conn.fetch(
            "SELECT type, data FROM event WHERE type IN ('outbox_resent', 'outbox_abandoned')"
        ):
            data = json.loads(r["data"]) if isinstance(r["data"], str) else r["data"]
            actions[(int(data["outbox_id"]), r["type"])] += 1
        for r in await conn.fetch(
            "SELECT id, conversation_id, payload, state, created_at FROM outbox"
        ):
            payload = json.loads(r["payload"]) if isinstance(r["payload"], str) else r["payload"]
            view.outbox.append(
                OutboxRow(
                    r["id"],
                    convs.get(r["conversation_id"]),
                    str((payload or {}).get("text", "")),
                    r["state"],
                    actions[(r["id"], "outbox_resent")],
                    actions[(r["id"], "outbox_abandoned")],
                    _ts(r["created_at"]),
                )
            )
        for r in await conn.fetch(
            "SELECT idempotency_key, finished_at FROM step "
            "WHERE name = 'effect' AND status = 'succeeded'"
        ):
            view.effect_records[r["idempotency_key"]] = _ts(r["finished_at"])
        return view
    finally:
        await conn.close()


def read_effects(path: Path) -> list[EffectLine]:
    lines = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        parts = raw.split()
        if len(parts) == 3:
            lines.append(EffectLine(parts[0], float(parts[1]), int(parts[2])))
    return lines


async def timeline(
    dsn: str,
    conv_keys: list[str],
    load: LoadGenerator,
    platform: Platform,
    extra: list[tuple[float, str]],
) -> str:
    """What happened in these conversations, in time order, from the generator, the ledger and
    the fakes (and ``extra`` events: kills, PostgreSQL, the operator), for a failure message."""
    conn = await connect(dsn)
    out: list[str] = []
    try:
        for key in conv_keys:
            channel, chat = key.split(":", 1)
            events: list[tuple[float, str]] = []
            for r in load.requests:
                if r.conv == key:
                    events.append((r.sent_at, f"load: {r.kind} {r.ref} {r.tag} first sent"))
                    if r.accepted_at is not None:
                        events.append(
                            (
                                r.accepted_at,
                                f"load: {r.kind} {r.ref} accepted after {r.attempts} attempt(s)",
                            )
                        )
            for d in platform.by_conv.get(key, []):
                events.append((d.at, f"fake: received {d.text!r}"))
            conv_id = await conn.fetchval(
                "SELECT id FROM conversation WHERE channel = $1 AND chat_id = $2", channel, chat
            )
            for w in await conn.fetch(
                "SELECT id, state, attempt, created_at, finished_at, input FROM work "
                "WHERE conversation_id = $1",
                conv_id,
            ):
                text = json.loads(w["input"]) if isinstance(w["input"], str) else w["input"]
                events.append(
                    (
                        _ts(w["created_at"]),
                        f"work {w['id']} created for "
                        f"{(text or {}).get('text')!r}: now "
                        f"{w['state']} attempt {w['attempt']}",
                    )
                )
                for e in await conn.fetch(
                    "SELECT type, created_at, actor, data FROM event WHERE work_id = $1 "
                    "ORDER BY id",
                    w["id"],
                ):
                    events.append(
                        (
                            _ts(e["created_at"]),
                            f"  work {w['id'][-6:]} {e['type']} {e['actor'] or ''}",
                        )
                    )
            for o in await conn.fetch(
                "SELECT id, payload, state, attempts, error, created_at, sent_at FROM outbox "
                "WHERE conversation_id = $1 ORDER BY id",
                conv_id,
            ):
                payload = (
                    json.loads(o["payload"]) if isinstance(o["payload"], str) else o["payload"]
                )
                text = (payload or {}).get("text")
                events.append((_ts(o["created_at"]), f"outbox {o['id']} {text!r} written"))
                if o["sent_at"] is not None:
                    events.append(
                        (
                            _ts(o["sent_at"]),
                            f"outbox {o['id']} marked sent (attempts {o['attempts']})",
                        )
                    )
                if o["state"] != "sent":
                    events.append((math.inf, f"outbox {o['id']} ends {o['state']}: {o['error']}"))
            lo = min((t for t, _ in events), default=0.0)
            hi = max((t for t, _ in events if t != math.inf), default=0.0)
            events += [(t, f"** {what}") for t, what in extra if lo - 5 <= t <= hi + 1]
            out.append(f"--- timeline of {key} ---")
            out += [f"{t - lo:8.3f}s {what}" for t, what in sorted(events)]
    finally:
        await conn.close()
    return "\n".join(out)


# == the checker ==================================================================================


@dataclass
class History:
    """Everything the checker looks at; plain data, so a test can forge a bad one."""

    #: accepted inbound requests (2xx), in the order they were sent
    requests: list[Request]
    #: per conversation, the replies it must receive, in order
    expected: dict[str, list[str]]
    #: per conversation, the texts the fake platforms accepted, in arrival order
    observed: dict[str, list[str]]
    ledger: LedgerView
    effects: list[EffectLine]


@dataclass
class Verdict:
    problems: list[str] = field(default_factory=list)
    lost: int = 0
    duplicated: int = 0
    #: duplicates traced to an outbox row that was ``unknown`` and re-sent
    traced_duplicates: int = 0
    out_of_order: int = 0
    #: effect steps whose body ran again before their record (interrupted mid-step; allowed)
    effect_reruns: int = 0


#: how much later than its step's record an effect line may be stamped (clock rounding)
EFFECT_SLACK = 0.001


def check_history(h: History, *, limit: int = 40) -> Verdict:
    v = Verdict()
    problems: list[str] = []
    lv = h.ledger
    accepted = [r for r in h.requests if r.accepted_at is not None]

    # 1. every accepted message: exactly one work item; no work item from nowhere
    work_by_source: dict[tuple[str | None, str | None], list[WorkRow]] = defaultdict(list)
    for w in lv.work:
        work_by_source[(w.source, w.source_event_id)].append(w)
    messages = {r.ref: r for r in accepted if r.kind == "message"}
    for ref, r in messages.items():
        channel = r.conv.split(":", 1)[0]
        items = work_by_source.get((channel, ref), [])
        if len(items) != 1:
            problems.append(f"message {ref} ({r.conv} {r.tag}): {len(items)} work items, not 1")
        elif items[0].conv != r.conv:
            problems.append(f"message {ref}: its work item is in {items[0].conv}, not {r.conv}")
    sent_refs = {r.ref for r in h.requests if r.kind == "message"}
    for w in lv.work:
        if w.source in ("telegram", "slack") and w.source_event_id not in sent_refs:
            problems.append(f"work {w.id} from {w.source} {w.source_event_id}: no such message")
        elif w.source in ("telegram", "slack") and w.source_event_id not in messages:
            problems.append(
                f"work {w.id} from {w.source} {w.source_event_id}: created for a request "
                "that was never answered 2xx"
            )

    # 2. every accepted click / signal resolved exactly one wait
    waits = {w.id: w for w in lv.waits}
    by_resolver: dict[str, list[WaitRow]] = defaultdict(list)
    for w in lv.waits:
        if w.resolved_by:
            by_resolver[w.resolved_by].append(w)
    for r in accepted:
        if r.kind == "click":
            w = waits.get(r.ref)
            if w is None or w.state != "resolved" or w.kind != "approval":
                what = "missing" if w is None else f"{w.kind} {w.state}"
                problems.append(f"click on wait {r.ref} ({r.conv} {r.tag}): wait {what}")
            elif not (w.resolved_by or "").startswith(("telegram:", "slack:")):
                problems.append(f"click on wait {r.ref}: resolved by {w.resolved_by}, not a click")
        elif r.kind == "signal":
            resolved = by_resolver.get(f"webhook:{WEBHOOK_NAME}:{r.ref}", [])
            if len(resolved) != 1:
                problems.append(f"signal {r.ref} ({r.conv}): resolved {len(resolved)} waits, not 1")
            elif resolved[0].key != r.tag:
                problems.append(f"signal {r.ref}: resolved the wait on key {resolved[0].key}")

    # 3. every work item finished (succeeded); the outbox is drained
    for w in lv.work:
        if w.state != "succeeded":
            problems.append(f"work {w.id} ({w.conv}) is {w.state} (attempt {w.attempt}): {w.error}")
    for o in lv.outbox:
        if o.state in UNDRAINED_OUTBOX or o.state == "failed":
            problems.append(f"outbox {o.id} ({o.conv} {o.text!r}) is {o.state}")

    # 4. no recorded step ran again
    seen: Counter[str] = Counter()
    for e in h.effects:
        seen[e.key] += 1
        recorded = lv.effect_records.get(e.key)
        if recorded is None:
            problems.append(f"effect {e.key} ran (pid {e.pid}) but its step has no record")
        elif e.at > recorded + EFFECT_SLACK:
            problems.append(
                f"effect {e.key} ran AGAIN in pid {e.pid} {e.at - recorded:.3f}s after its "
                "step was recorded"
            )
    v.effect_reruns = sum(n - 1 for n in seen.values() if n > 1)
    for key in lv.effect_records:
        if key not in seen:
            problems.append(f"effect step {key} is recorded but its body never ran")

    # 5. replies: complete, once, in order; every duplicate traced to an unknown delivery
    resent: Counter[tuple[str | None, str]] = Counter()
    rows_per_text: Counter[tuple[str | None, str]] = Counter()
    for o in lv.outbox:
        resent[(o.conv, o.text)] += o.resent
        rows_per_text[(o.conv, o.text)] += 1
    for (conv, text), n in rows_per_text.items():
        if n > 1:
            problems.append(f"{conv}: {n} outbox rows for {text!r} (a reply recorded twice)")
    for conv in sorted(set(h.expected) | set(h.observed)):
        expected = h.expected.get(conv, [])
        observed = h.observed.get(conv, [])
        counts = Counter(observed)
        for text, n in counts.items():
            if n > 1:
                v.duplicated += n - 1
                traced = min(n - 1, resent[(conv, text)])
                v.traced_duplicates += traced
                if traced < n - 1:
                    problems.append(
                        f"{conv}: {text!r} arrived {n} times; {n - 1 - traced} duplicate(s) "
                        "without an unknown delivery that was re-sent"
                    )
        missing = [t for t in expected if t not in counts]
        v.lost += len(missing)
        if missing:
            problems.append(f"{conv}: lost {missing}")
        wanted = set(expected)
        extra = [t for t in counts if t not in wanted]
        if extra:
            problems.append(f"{conv}: unexpected replies {extra}")
        firsts = list(dict.fromkeys(t for t in observed if t in wanted))
        order = [t for t in expected if t in counts]
        if firsts != order:
            v.out_of_order += 1
            at = next(i for i, (a, b) in enumerate(zip(firsts, order, strict=False)) if a != b)
            problems.append(
                f"{conv}: replies out of order at #{at}: got {firsts[at : at + 3]}, "
                f"expected {order[at : at + 3]}"
            )
    if len(problems) > limit:
        problems = [*problems[:limit], f"... and {len(problems) - limit} more"]
    v.problems = problems
    return v


# == one run ======================================================================================


@dataclass
class Report:
    cfg: ScaleConfig
    verdict: Verdict
    kills: Counter[str]
    kills_by_slot: Counter[str]
    pg_restarts: int
    requests: Counter[str]
    retries: Counter[str]
    latencies: list[tuple[float, str, str]]
    self_exits: list[SelfExit]
    operator: list[OperatorAction]
    stuck: dict[str, str]
    generator_errors: list[str]
    work_items: int
    max_attempt: int
    replies: int
    phases: dict[str, float]
    log_dir: Path
    #: timelines of the stuck conversations and of the slowest replies
    diagnostics: str = ""
    #: CPU seconds by role, and ``test`` (this process: load generator, fakes, checker)
    cpu: Counter[str] = field(default_factory=Counter)
    #: seconds the chaos driver waited for restarted processes to be ready
    restart_wait: float = 0.0
    #: the first reply's latency by stage: ``gateway`` (request first sent → work committed),
    #: ``queued`` (→ first claimed by a worker), ``run`` (→ reply written to the outbox, lease
    #: expiries included), ``delivery`` (→ seen by the fake)
    stages: dict[str, list[float]] = field(default_factory=dict)
    #: work transition events by type, from the ledger
    events: Counter[str] = field(default_factory=Counter)

    @property
    def problems(self) -> list[str]:
        out = list(self.verdict.problems)
        out += [f"load generator: {e}" for e in self.generator_errors[:10]]
        out += [f"{conv} stuck: {why}" for conv, why in list(self.stuck.items())[:10]]
        return out

    def table(self) -> str:
        ms = [x[0] * 1000 for x in self.latencies]
        kills = " ".join(f"{r} {self.kills[r]}" for r in ROLES)
        exits = Counter(e.slot.split("-")[0] for e in self.self_exits)
        outage = sum(e.during_pg_outage for e in self.self_exits)
        crashed = sum(e.was_ready for e in self.self_exits)
        resent = sum(a.action == "resend" for a in self.operator)
        abandoned = sum(a.action == "abandon" for a in self.operator)
        rows = [
            ("seed", f"{self.cfg.seed}  ({self.cfg.describe()})"),
            (
                "topology",
                "PostgreSQL (throwaway), 2 gateways, 3 workers, 2 schedulers, "
                f"{self.cfg.conversations} conversations (telegram + slack)",
            ),
            (
                "messages accepted",
                f"{self.requests['message']} "
                f"(+ {self.requests['click']} clicks, "
                f"{self.requests['signal']} webhook signals)",
            ),
            ("replies seen by the fakes", f"{self.replies}"),
            (
                "retries (not 2xx)",
                ", ".join(f"{k} {n}" for k, n in sorted(self.retries.items())) or "0",
            ),
            ("kills", f"{sum(self.kills.values())} ({kills})"),
            ("PostgreSQL restarts", f"{self.pg_restarts}"),
            (
                "exited on their own",
                f"{len(self.self_exits)} "
                f"({', '.join(f'{r} {n}' for r, n in exits.items()) or '-'}; "
                f"{len(self.self_exits) - crashed} before they were ready, {crashed} after; "
                f"{outage} around the PostgreSQL restart)",
            ),
            (
                "work items",
                f"{self.work_items} (claims {self.events['claimed']}, lease expiries "
                f"{self.events['lease_expired']}, highest attempt {self.max_attempt})",
            ),
            ("lost", f"{self.verdict.lost}"),
            (
                "duplicated",
                f"{self.verdict.duplicated} "
                f"({self.verdict.traced_duplicates} traced to unknown deliveries)",
            ),
            ("out of order", f"{self.verdict.out_of_order}"),
            (
                "unknown deliveries",
                f"{len(self.operator)} (operator: {resent} re-sent, {abandoned} abandoned)",
            ),
            ("effects re-run mid-step", f"{self.verdict.effect_reruns} (allowed: never recorded)"),
            (
                "latency p50 / p99 / max",
                f"{percentile(ms, 50):.0f} / {percentile(ms, 99):.0f} / "
                f"{max(ms, default=math.nan):.0f} ms "
                f"({len(ms)} samples)",
            ),
            (
                "first reply by stage",
                ", ".join(
                    f"{k} {percentile(v, 50) * 1000:.0f}/{percentile(v, 99) * 1000:.0f}"
                    for k, v in self.stages.items()
                )
                + " ms (p50/p99)",
            ),
            ("CPU seconds", ", ".join(f"{k} {v:.0f}" for k, v in self.cpu.items())),
            (
                "wall time",
                " + ".join(f"{k} {v:.0f}s" for k, v in self.phases.items())
                + f" (chaos waited {self.restart_wait:.0f}s for restarts)",
            ),
            ("problems", f"{len(self.problems)}"),
        ]
        width = max(len(k) for k, _ in rows)
        line = "+" + "-" * (width + 2) + "+" + "-" * 72
        out = ["scale-out chaos summary", line]
        out += [f"| {k:<{width}} | {v}" for k, v in rows]
        out.append(line)
        return "\n".join(out)


def first_reply_stages(
    load: LoadGenerator, view: LedgerView, platform: Platform
) -> dict[str, list[float]]:
    """Where the time to each message's first reply went (see :attr:`Report.stages`)."""
    work = {w.source_event_id: w for w in view.work}
    outbox = {(o.conv, o.text): o for o in view.outbox}
    stages: dict[str, list[float]] = {"gateway": [], "queued": [], "run": [], "delivery": []}
    for conv in load.conversations:
        for cmd in conv.commands:
            m = cmd.message
            if m is None or m.accepted_at is None:
                continue
            w = work.get(m.ref)
            o = outbox.get((conv.key, cmd.expected[0]))
            d = platform.first.get((conv.key, cmd.expected[0]))
            if w is not None:
                stages["gateway"].append(w.created_at - m.sent_at)
            claimed = view.first_claim.get(w.id) if w is not None else None
            if w is not None and claimed is not None:
                stages["queued"].append(claimed - w.created_at)
            if claimed is not None and o is not None:
                stages["run"].append(o.created_at - claimed)
            if o is not None and d is not None:
                stages["delivery"].append(d.at - o.created_at)
    return stages


async def run_scale_out(cfg: ScaleConfig, workdir: Path) -> Report:
    """One full run: start everything, load + chaos, settle, read back, check. Every process
    and the PostgreSQL cluster are gone when it returns or raises."""
    phases: dict[str, float] = {}
    t0 = time.monotonic()
    cpu0 = time.process_time()
    platform = Platform()
    async with (
        RecordingTelegram(TELEGRAM_TOKEN, platform) as telegram,
        RecordingSlack(SLACK_TOKEN, platform) as slack,
    ):
        urls = {"telegram": telegram.base_url, "slack": slack.base_url}
        topo = Topology(cfg, workdir, urls)
        load: LoadGenerator | None = None
        stop = asyncio.Event()
        try:
            await topo.start_database()
            await topo.start_all()
            phases["start"] = time.monotonic() - t0
            t1 = time.monotonic()
            driver = ChaosDriver(cfg, topo)
            operator = Operator(cfg, topo.gateways, platform)
            load = LoadGenerator(cfg, topo.gateways, platform)
            background = [
                asyncio.create_task(driver.supervise(stop)),
                asyncio.create_task(operator.run(stop)),
            ]
            await load.start()
            await asyncio.sleep(cfg.warmup)
            await driver.run()
            await asyncio.sleep(max(0.0, cfg.min_duration - (time.monotonic() - t1)))
            load.stopping = True  # no new commands; the ones under way finish
            phases["chaos"] = time.monotonic() - t1
            t2 = time.monotonic()
            late = await load.stop(cfg.settle_timeout)
            assert topo.pg is not None
            deadline = time.monotonic() + (cfg.settle_timeout if not late else 5.0)
            while time.monotonic() < deadline:
                work, out = await unfinished(topo.pg.dsn)
                if work == 0 and out == 0:
                    break
                await asyncio.sleep(0.5)
            await asyncio.sleep(1.0)  # the last replies reach the fakes and are recorded
            stop.set()
            await asyncio.gather(*background, return_exceptions=True)
            phases["settle"] = time.monotonic() - t2
            view = await read_ledger(topo.pg.dsn)
            effects = read_effects(topo.effects)
            expected: dict[str, list[str]] = defaultdict(list)
            for conv in load.conversations:
                for cmd in conv.commands:
                    if cmd.message is not None and cmd.message.accepted_at is not None:
                        expected[conv.key] += cmd.expected
            observed = {conv: [d.text for d in ds] for conv, ds in platform.by_conv.items()}
            verdict = check_history(History(load.requests, dict(expected), observed, view, effects))
            # timelines: conversations named by a problem, stuck ones, the slowest replies
            named = re.findall(r"(?:telegram|slack):[0-9A-Z]+", "\n".join(verdict.problems))
            stuck = [c.key for c in load.conversations if c.stuck]
            slowest = sorted(load.latencies, reverse=True)[:DIAGNOSE_SLOWEST]
            focus = list(dict.fromkeys([*named, *stuck][:5] + [k for _, k, _ in slowest]))
            extra = [
                *driver.log,
                *(
                    (a.at, f"operator: {a.action} outbox {a.outbox_id} {a.text!r}")
                    for a in operator.actions
                ),
            ]
            diagnostics = await timeline(topo.pg.dsn, focus, load, platform, extra)
            if verdict.problems or stuck:
                diagnostics += "\n" + await asyncio.to_thread(topo.dump_ledger)
        finally:
            stop.set()
            if load is not None:
                load.stopping = True
                await load.stop(0.1)
                await load.close()
            await asyncio.to_thread(topo.cleanup)
        effects = read_effects(topo.effects)
    stages = first_reply_stages(load, view, platform)
    accepted = Counter(r.kind for r in load.requests if r.accepted_at is not None)
    phases["total"] = time.monotonic() - t0
    return Report(
        cfg=cfg,
        verdict=verdict,
        kills=driver.kills,
        kills_by_slot=driver.kills_by_slot,
        pg_restarts=driver.pg_restarts,
        requests=accepted,
        retries=load.retries,
        latencies=load.latencies,
        self_exits=topo.self_exits,
        operator=operator.actions,
        stuck={c.key: c.stuck for c in load.conversations if c.stuck},
        generator_errors=load.errors,
        work_items=len(view.work),
        max_attempt=max((w.attempt for w in view.work), default=0),
        replies=len(platform.deliveries),
        phases=phases,
        log_dir=topo.procs.log_dir,
        diagnostics=diagnostics,
        cpu=Counter({**topo.cpu, "test": time.process_time() - cpu0}),
        restart_wait=driver.waited,
        stages=stages,
        events=view.event_counts,
    )


__all__ = [
    "SLOTS",
    "ChaosDriver",
    "EffectLine",
    "History",
    "LedgerView",
    "OutboxRow",
    "Report",
    "Request",
    "ScaleConfig",
    "WaitRow",
    "WorkRow",
    "check_history",
    "kill_schedule",
    "run_scale_out",
]
