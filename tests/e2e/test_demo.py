"""The demo agent end to end through the HTTP chat channel, against real ``tether serve``
processes, on SQLite (the default ``./tether.db``) and on PostgreSQL (a fresh database).

The first half sends each demo command to one serve process per database. The second half
leaves one work item waiting on each kind of wait (timer, approval, input, signal), SIGKILLs
the process, starts a new one on the same database and checks that every item completes, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
RESUME_URL = re.compile(r"http://\S+/resume/[A-Za-z0-9_-]+")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it if pytest dies, so nothing outlives the run."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _env(port: int, database_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    env.update(TETHER_PORT=str(port), PYTHONUNBUFFERED="1")
    if database_url is not None:
        env["TETHER_DATABASE_URL"] = database_url
    return env


def _at(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)
    return value


class Serve:
    """``tether serve`` in ``cwd`` on ``database_url`` (None: the default ``./tether.db``),
    always on the same port, so resume URLs handed out before a restart still work."""

    def __init__(self, cwd: Path, database_url: str | None) -> None:
        self.cwd = cwd
        self.database_url = database_url
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    # -- process ---------------------------------------------------------------------------

    def start(self) -> float:
        """Start a new process; return the time (``time.time()``) it first answered /readyz."""
        self.starts += 1
        log = (self.cwd / f"serve-{self.starts}.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tether.cli", "serve"],
            cwd=self.cwd,
            env=_env(self.port, self.database_url),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        log.close()
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{self.base}/readyz", timeout=1) as r:
                    if r.status == 200:
                        return time.time()
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"serve did not get ready:\n{self.log()}")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        assert self.proc is not None and self.proc.poll() is None, self.log()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def log(self) -> str:
        return (self.cwd / f"serve-{self.starts}.log").read_text(errors="replace")

    @property
    def token(self) -> str:
        # generated on first start, kept beside the SQLite file (else in ./)
        name = "tether.db.operator-token" if self.database_url is None else ".tether-operator-token"
        return (self.cwd / name).read_text().strip()

    # -- HTTP ------------------------------------------------------------------------------

    def call(self, method: str, path: str, body: Any = None, *, auth: bool = True) -> tuple:
        url = path if path.startswith("http") else self.base + path
        headers = {"Content-Type": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {self.token}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def post(self, conv: str, text: str) -> dict:
        status, body = self.call(
            "POST", "/channels/http/messages", {"conversation_id": conv, "text": text}
        )
        assert status == 202, body
        return body

    def messages(self, conv: str) -> list[dict]:
        status, body = self.call("GET", f"/channels/http/conversations/{conv}/messages")
        assert status == 200, body
        return body["messages"]

    def outbound(self, conv: str) -> list[dict]:
        return [m for m in self.messages(conv) if m["direction"] == "out"]

    def wait_out(self, conv: str, n: int, timeout: float = 15.0) -> list[dict]:
        """The conversation's outbound messages once there are at least ``n``."""
        return wait_until(
            lambda: (outs := self.outbound(conv)) and len(outs) >= n and outs,
            f"{n} outbound message(s) in {conv!r}",
            timeout,
        )

    def work(self, work_id: str) -> dict:
        status, body = self.call("GET", f"/api/v1/work/{work_id}")
        assert status == 200, body
        return body

    def wait_state(self, work_id: str, state: str, timeout: float = 15.0) -> dict:
        return wait_until(
            lambda: (w := self.work(work_id))["state"] == state and w,
            f"work {work_id} to be {state}",
            timeout,
        )


# -- databases ------------------------------------------------------------------------------


async def _pg(url: str, sql: str) -> None:
    import asyncpg

    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextlib.contextmanager
def database(request: pytest.FixtureRequest, backend: str, cwd: Path) -> Iterator[str | None]:
    """None for SQLite (serve's default ``./tether.db``, migrated by serve itself); for
    PostgreSQL a fresh database, migrated with ``tether db upgrade``, dropped afterwards. The
    server is the one the ``postgres_url`` fixture uses (and skips or fails without)."""
    if backend == "sqlite":
        yield None
        return
    server = request.getfixturevalue("postgres_url")
    name = re.sub(r"\W", "_", f"tether_e2e_{os.getpid()}_{cwd.name}".lower())[:63]
    url = make_url(server).set(database=name).render_as_string(hide_password=False)
    asyncio.run(_pg(server, f"CREATE DATABASE {name}"))
    try:
        upgrade = subprocess.run(
            [sys.executable, "-m", "tether.cli", "db", "upgrade"],
            cwd=cwd, env=_env(_free_port(), url), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
        yield url
    finally:
        asyncio.run(_pg(server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@contextlib.contextmanager
def serving(request: pytest.FixtureRequest, backend: str, cwd: Path) -> Iterator[Serve]:
    with database(request, backend, cwd) as url:
        serve = Serve(cwd, url)
        try:
            yield serve
        finally:
            serve.stop()
            print(f"serve logs in {cwd}")


@pytest.fixture(scope="module", params=BACKENDS)
def demo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """One serve process per database for all the command tests (one conversation each)."""
    with serving(request, request.param, tmp_path_factory.mktemp("demo")) as serve:
        serve.start()
        yield serve


def texts(messages: Iterable[dict]) -> list[str]:
    return [m["text"] for m in messages]


# -- each demo command ------------------------------------------------------------------------


def test_anything_else_is_echoed(demo: Serve) -> None:
    posted = demo.post("echo", "hello there")
    assert posted["disposition"] == "started" and posted["work_id"]
    outs = demo.wait_out("echo", 1)
    assert texts(demo.messages("echo")) == ["hello there", "You said: hello there"]
    assert outs[0]["work_id"] == posted["work_id"]
    work = demo.wait_state(posted["work_id"], "succeeded")
    assert work["result"] == {"replies": ["You said: hello there"]}


def test_remind_sleeps_durably_then_replies(demo: Serve) -> None:
    posted = demo.post("remind", "/remind 1s hi")
    first = demo.wait_out("remind", 1)[0]
    assert first["text"] == "Reminder set for 1s."
    work = demo.wait_state(posted["work_id"], "waiting")
    (timer,) = work["waits"]
    assert (timer["kind"], timer["state"]) == ("timer", "pending")
    outs = demo.wait_out("remind", 2, timeout=10)
    assert texts(outs) == ["Reminder set for 1s.", "hi"]
    assert _at(outs[1]["created_at"]) - _at(first["created_at"]) >= 1.0
    assert _at(outs[1]["created_at"]) >= _at(timer["deadline"])
    assert demo.wait_state(posted["work_id"], "succeeded")["waits"][0]["state"] == "resolved"


@pytest.mark.parametrize(("decision", "reply"), [("approve", "Approved"), ("deny", "Denied")])
def test_approve_asks_and_a_decision_through_the_api_resumes(
    demo: Serve, decision: str, reply: str
) -> None:
    conv = f"approve-{decision}"
    posted = demo.post(conv, "/approve deploy")
    (prompt,) = demo.wait_out(conv, 1)
    assert prompt["text"] == "Approve deploy?"
    assert prompt["wait_id"] and prompt["work_id"] == posted["work_id"]
    assert [a["id"] for a in prompt["actions"]] == ["approve", "deny"]
    assert demo.wait_state(posted["work_id"], "waiting")["waits"][0]["kind"] == "approval"

    status, wait = demo.call(
        "POST", f"/api/v1/waits/{prompt['wait_id']}/resolve", {"decision": decision}
    )
    assert status == 200, wait
    assert wait["state"] == "resolved"
    outs = demo.wait_out(conv, 2)
    assert texts(outs) == ["Approve deploy?", f"{reply}: deploy"]

    other = "deny" if decision == "approve" else "approve"
    status, again = demo.call(
        "POST", f"/api/v1/waits/{prompt['wait_id']}/resolve", {"decision": other}
    )
    assert status == 409, again
    assert again["error"]["code"] == "already_resolved"
    assert again["error"]["resolution"] == wait["resolution"]
    assert wait["resolution"]["decision"] == decision
    assert demo.wait_state(posted["work_id"], "succeeded")["result"] == {
        "replies": [f"{reply}: deploy"]
    }
    assert texts(demo.outbound(conv)) == ["Approve deploy?", f"{reply}: deploy"]


def test_ask_reasks_an_invalid_answer_and_takes_an_integer(demo: Serve) -> None:
    posted = demo.post("ask", "/ask")
    (question,) = demo.wait_out("ask", 1)
    assert question["text"] == "How many?" and question["wait_id"]
    bad = demo.post("ask", "lots")
    assert (bad["disposition"], bad["work_id"]) == ("reasked", posted["work_id"])
    assert texts(demo.wait_out("ask", 2))[-1] == "Please reply with an integer."
    good = demo.post("ask", "7")
    assert (good["disposition"], good["wait_id"]) == ("resolved_wait", question["wait_id"])
    demo.wait_state(posted["work_id"], "succeeded")
    assert texts(demo.messages("ask")) == [
        "/ask",
        "How many?",
        "lots",
        "Please reply with an integer.",
        "7",
        "Got 7.",
    ]


def test_webhook_hands_out_a_resume_url_that_works_once(demo: Serve) -> None:
    posted = demo.post("webhook", "/webhook")
    (handout,) = demo.wait_out("webhook", 1)
    url = RESUME_URL.search(handout["text"])
    assert url and url.group().startswith(f"{demo.base}/resume/"), handout
    demo.wait_state(posted["work_id"], "waiting")

    status, body = demo.call("POST", url.group(), {"paid": True}, auth=False)
    assert status == 200 and body["state"] == "resolved", body
    outs = demo.wait_out("webhook", 2)
    assert outs[1]["text"] == 'Resumed with {"paid": true}'
    status, again = demo.call("POST", url.group(), {"paid": False}, auth=False)
    assert status == 409, again
    assert again["error"]["resolution"] == resolution_of(demo, body["wait_id"])
    status, _ = demo.call("POST", f"{demo.base}/resume/{'x' * 32}", {}, auth=False)
    assert status == 404
    demo.wait_state(posted["work_id"], "succeeded")
    assert len(demo.outbound("webhook")) == 2


def resolution_of(serve: Serve, wait_id: str) -> Any:
    status, wait = serve.call("GET", f"/api/v1/waits/{wait_id}")
    assert status == 200, wait
    return wait["resolution"]


def test_work_runs_a_heartbeating_step(demo: Serve) -> None:
    posted = demo.post("work", "/work 2")
    running = demo.wait_state(posted["work_id"], "running")
    # The step reports progress while it runs, not only at the end.
    mid = wait_until(
        lambda: [
            s["progress"]
            for s in demo.work(posted["work_id"])["steps"]
            if s["name"] == "work" and s["status"] == "running" and s["progress"]
        ],
        "progress of the running step",
        timeout=5,
    )
    assert mid[0]["of"] == 2 and mid[0]["done"] < 2, (running, mid)
    outs = demo.wait_out("work", 1, timeout=10)
    assert texts(outs) == ["Done after 2s."]
    work = demo.wait_state(posted["work_id"], "succeeded")
    step = work["steps"][0]
    assert (step["name"], step["status"], step["output"]) == ("work", "succeeded", 2)
    assert step["progress"] == {"done": 2, "of": 2}
    assert step["last_heartbeat_at"] is not None
    assert _at(step["finished_at"]) - _at(step["started_at"]) >= 2.0


# -- SIGKILL while waiting, restart, resolve -------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_wait_kind_survives_a_sigkill_of_serve(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str
) -> None:
    with serving(request, backend, tmp_path) as serve:
        serve.start()
        # One work item waiting on each kind of wait; the timer is due while nothing runs.
        started = {
            "timer": serve.post("timer", "/remind 2s later"),
            "approval": serve.post("approval", "/approve deploy"),
            "input": serve.post("input", "/ask"),
            "signal": serve.post("signal", "/webhook"),
        }
        ids = {kind: p["work_id"] for kind, p in started.items()}
        waiting = {kind: serve.wait_state(ids[kind], "waiting") for kind in ids}
        for kind, work in waiting.items():
            assert [w["kind"] for w in work["waits"]] == [kind], work
        prompts = {kind: serve.wait_out(kind, 1)[0] for kind in ids}
        due = _at(waiting["timer"]["waits"][0]["deadline"])

        serve.kill()
        assert time.time() < due, "the timer must fall due while no process runs"
        time.sleep(max(due - time.time(), 0) + 0.3)

        ready = serve.start()
        reminder = serve.wait_out("timer", 2, timeout=10)[1]
        arrived = time.time()
        assert reminder["text"] == "later"
        lateness = _at(reminder["created_at"]) - ready
        print(
            f"{backend}: overdue reminder sent {lateness:+.3f}s after the new serve was ready "
            f"(seen by the test {arrived - ready:.3f}s after)"
        )
        assert lateness <= 1.0, lateness

        status, _ = serve.call(
            "POST",
            f"/api/v1/waits/{prompts['approval']['wait_id']}/resolve",
            {"decision": "approve", "comment": "after the crash"},
        )
        assert status == 200
        answer = serve.post("input", "7")
        assert (answer["disposition"], answer["work_id"]) == ("resolved_wait", ids["input"])
        url = RESUME_URL.search(prompts["signal"]["text"])
        assert url, prompts["signal"]
        status, _ = serve.call("POST", url.group(), {"paid": True}, auth=False)
        assert status == 200
        status, _ = serve.call("POST", url.group(), {"paid": True}, auth=False)
        assert status == 409

        expected = {
            "timer": ["Reminder set for 2s.", "later"],
            "approval": ["Approve deploy?", "Approved: deploy"],
            "input": ["How many?", "Got 7."],
            "signal": [prompts["signal"]["text"], 'Resumed with {"paid": true}'],
        }
        for kind, work_id in ids.items():
            work = serve.wait_state(work_id, "succeeded")
            assert [w["state"] for w in work["waits"]] == ["resolved"], work
            # the same work item, each reply sent exactly once
            convo = serve.messages(kind)
            assert {m["work_id"] for m in convo} == {work_id}, convo
            assert texts(m for m in convo if m["direction"] == "out") == expected[kind]
        assert serve.work(ids["approval"])["waits"][0]["resolution"]["comment"] == (
            "after the crash"
        )
        status, listed = serve.call("GET", "/api/v1/work?limit=100")
        assert status == 200 and len(listed["items"]) == 4, "answers start no new work"
