"""The ``tether`` CLI against a live ``tether serve`` (a real process on a fresh SQLite file):
every operator command, its exit codes, and ``--json`` output that parses."""

from __future__ import annotations

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

CLI = [sys.executable, "-m", "tether.cli"]
LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3}  (\S+)\s*(.*)$")
TIMEOUT = 30.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Served:
    base: str
    cwd: Path
    env: dict[str, str]
    token: str

    def cli(self, *args: str, expect: int | None = 0) -> subprocess.CompletedProcess[str]:
        """Run ``tether ARGS`` beside the served database (it finds the token file there)."""
        proc = subprocess.run(
            [*CLI, *args],
            cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if expect is not None:
            assert proc.returncode == expect, (args, proc.returncode, proc.stdout, proc.stderr)
        return proc

    def cli_json(self, *args: str) -> Any:
        proc = self.cli(*args, "--json")
        return json.loads(proc.stdout)

    def http(self, method: str, path: str, body: object = None) -> tuple[int, Any]:
        req = urllib.request.Request(
            self.base + path,
            data=json.dumps(body).encode() if body is not None else None,
            method=method,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def work(self, work_id: str) -> dict[str, Any]:
        status, body = self.http("GET", f"/api/v1/work/{work_id}")
        assert status == 200, body
        return body

    def wait_for(self, what: str, check: Callable[[], Any]) -> Any:
        deadline = time.monotonic() + TIMEOUT
        while True:
            value = check()
            if value:
                return value
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.1)

    def wait_state(self, work_id: str, *states: str) -> dict[str, Any]:
        return self.wait_for(
            f"{work_id} in {states}",
            lambda: (w := self.work(work_id))["state"] in states and w,
        )

    def chat(self, conversation: str, text: str) -> str:
        status, body = self.http(
            "POST", "/channels/http/messages", {"conversation_id": conversation, "text": text}
        )
        assert status == 202, body
        return body["work_id"]

    def pending_approval(self, work_id: str) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            waits = self.cli_json("waits")
            return next((w for w in waits if w["work_id"] == work_id), None)

        return self.wait_for(f"the approval of {work_id}", find)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    cwd = tmp_path_factory.mktemp("cli")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    env.update({"TETHER_PORT": str(port), "TETHER_LEASE_TTL": "5"})
    log = (cwd / "serve.log").open("w")
    proc = subprocess.Popen(
        [*CLI, "serve"], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{base}/readyz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError((cwd / "serve.log").read_text())
            time.sleep(0.2)
        token = (cwd / "tether.db.operator-token").read_text().strip()
        yield Served(base, cwd, env, token)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()
    assert proc.returncode == 0, (cwd / "serve.log").read_text()[-3000:]


def test_start_attach_list_show_and_illegal_actions(served: Served) -> None:
    started = served.cli_json("work", "start", "demo", "--input", '{"text": "hello cli"}')
    work_id = started["id"]
    assert started["agent"] == "demo"

    attached = served.cli("work", "attach", work_id)
    lines = attached.stdout.splitlines()
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines
    types = [m.group(1) for m in parsed if m]
    assert types[:2] == ["created", "claimed"] and types[-1] == "succeeded", types
    assert "step_completed" in types
    claimed = next(m.group(2) for m in parsed if m and m.group(1) == "claimed")
    assert "queued -> running" in claimed

    # --json: one event per line, the same events; --after resumes after an event id
    as_json = [
        json.loads(line)
        for line in served.cli("work", "attach", work_id, "--json").stdout.splitlines()
    ]
    assert [e["type"] for e in as_json] == types
    assert all(set(e) == {"id", "type", "data", "actor", "created_at"} for e in as_json)
    later = served.cli("work", "attach", work_id, "--json", "--after", str(as_json[1]["id"]))
    assert [json.loads(line)["id"] for line in later.stdout.splitlines()] == [
        e["id"] for e in as_json[2:]
    ]

    listed = served.cli_json("work", "ls")
    assert work_id in [w["id"] for w in listed["items"]]
    assert listed["counts"]["succeeded"] >= 1
    succeeded = served.cli_json("work", "ls", "--state", "succeeded", "--agent", "demo")
    assert {w["state"] for w in succeeded["items"]} == {"succeeded"}

    shown = served.cli_json("work", "show", work_id)
    assert shown["state"] == "succeeded"
    assert shown["result"] == {"replies": ["You said: hello cli"]}
    assert [s["name"] for s in shown["steps"]] == ["reply"]
    assert served.cli("work", "show", work_id).stdout.strip()

    # Illegal actions on a finished item: exit 1 with the API's reason; unknown ids: exit 3.
    for action in ("pause", "resume", "cancel", "retry"):
        refused = served.cli("work", action, work_id, expect=1)
        assert "succeeded" in refused.stderr, (action, refused.stderr)
    served.cli("work", "show", "nope", expect=3)
    served.cli("work", "attach", "nope", expect=3)
    served.cli("work", "pause", "nope", expect=3)


def test_approve_pause_resume_cancel_and_retry(served: Served) -> None:
    work_id = served.chat("ops", "/approve deploy")
    wait = served.pending_approval(work_id)
    assert wait["kind"] == "approval" and wait["prompt"] == "Approve deploy?"

    assert served.cli_json("work", "pause", work_id)["state"] == "paused"
    served.cli("work", "pause", work_id, expect=1)
    assert served.cli_json("work", "resume", work_id)["state"] == "queued"
    served.wait_state(work_id, "waiting")  # its wait is still open: straight back to waiting

    approved = served.cli_json("approve", wait["id"], "--comment", "go")
    assert approved["state"] == "resolved" and approved["work_id"] == work_id
    again = served.cli("approve", wait["id"], expect=1)
    assert "approved" in again.stderr

    types = [
        json.loads(line)["type"]
        for line in served.cli("work", "attach", work_id, "--json").stdout.splitlines()
    ]
    assert types[-1] == "succeeded" and "paused" in types and "resumed" in types
    status, convo = served.http("GET", "/channels/http/conversations/ops/messages")
    assert status == 200
    assert [m["text"] for m in convo["messages"] if m["direction"] == "out"][-1] == (
        "Approved: deploy"
    )

    # cancel a waiting item, retry it (it asks again), cancel it for good
    other = served.chat("ops2", "/approve rollback")
    served.pending_approval(other)
    assert served.cli_json("work", "cancel", other)["state"] == "cancelled"
    served.cli("work", "cancel", other, expect=1)
    assert served.cli_json("work", "retry", other)["state"] == "queued"
    served.wait_state(other, "waiting")
    served.cli("work", "cancel", other)
    assert served.work(other)["state"] == "cancelled"
    served.cli("work", "retry", other)
    served.wait_state(other, "waiting")
    served.cli("work", "cancel", other)

    every = served.cli_json("waits", "--state", "all")
    assert {w["work_id"] for w in every} >= {work_id, other}
    assert served.cli_json("waits", "--work", other, "--state", "cancelled")
    served.cli("approve", "no-such-wait", expect=3)


def test_workers_lists_the_serve_pool(served: Served) -> None:
    workers = served.cli_json("workers")
    assert isinstance(workers, list) and len(workers) >= 1
    assert {"id", "host", "pid", "state", "last_seen_at"} <= set(workers[0])
    assert any(w["state"] == "running" for w in workers)
    assert served.cli("workers").stdout.strip()


def test_attach_stops_on_ctrl_c_with_130(served: Served) -> None:
    work_id = served.chat("ops3", "/approve never")
    served.pending_approval(work_id)
    proc = subprocess.Popen(
        [*CLI, "work", "attach", work_id],
        cwd=served.cwd, env=served.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        first = proc.stdout.readline() if proc.stdout else ""
        assert LINE.match(first.rstrip("\n")), first
        time.sleep(0.3)
        assert proc.poll() is None, "attach follows a waiting item"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    served.cli("work", "cancel", work_id)


def test_restart_from_a_step_prints_the_new_id(served: Served) -> None:
    work_id = served.cli_json("work", "start", "demo", "--input", '{"text": "again"}')["id"]
    served.wait_state(work_id, "succeeded")
    proc = served.cli("work", "restart", work_id, "--from-step", "1", expect=None)
    if proc.returncode == 3 and "no such resource" in proc.stderr:
        pytest.skip("the API has no POST /api/v1/work/{id}/restart yet")
    assert proc.returncode == 0, proc.stderr
    new_id = proc.stdout.strip()
    assert new_id and new_id != work_id
    assert served.wait_state(new_id, "succeeded")["result"] == {"replies": ["You said: again"]}
    as_json = served.cli_json("work", "restart", work_id, "--from-step", "1")
    assert as_json
    served.cli("work", "restart", "nope", "--from-step", "1", expect=3)
