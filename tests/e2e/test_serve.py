"""`tether serve` end to end: a real process on a fresh SQLite file, over HTTP and the CLI."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp_path: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    env.update({"TETHER_PORT": str(port), "TETHER_LEASE_TTL": "5"})
    return env


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path, subprocess.Popen[str]]]:
    port = _free_port()
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tether.cli", "serve"],
        cwd=tmp_path,
        env=_env(tmp_path, port),
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
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
                raise AssertionError((tmp_path / "serve.log").read_text())
            time.sleep(0.2)
        yield base, tmp_path, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()


def _call(base: str, token: str, method: str, path: str, body: object = None) -> tuple[int, dict]:
    req = urllib.request.Request(
        base + path,
        data=json.dumps(body).encode() if body is not None else None,
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_serve_runs_the_demo_agent_on_sqlite(served: tuple[str, Path, subprocess.Popen[str]]):
    base, cwd, proc = served
    assert (cwd / "tether.db").exists(), "serve uses ./tether.db by default"
    token_file = cwd / "tether.db.operator-token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    token = token_file.read_text().strip()
    log = (cwd / "serve.log").read_text()
    assert token in log, "a freshly generated token is printed once"

    status, _ = _call(base, "wrong", "GET", "/api/v1/work")
    assert status == 401

    status, work = _call(
        base,
        token,
        "POST",
        "/api/v1/work",
        {"agent": "demo", "input": {"text": "hello durable world"}},
    )
    assert status == 201, work
    deadline = time.monotonic() + 30
    while work["state"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, work
        time.sleep(0.1)
        status, work = _call(base, token, "GET", f"/api/v1/work/{work['id']}")
    assert work["state"] == "succeeded", work
    assert work["result"] == {"replies": ["You said: hello durable world"]}
    assert [s["name"] for s in work["steps"]] == ["reply"]
    types = [e["type"] for e in work["events"]]
    assert types[:2] == ["created", "claimed"] and types[-1] == "succeeded"

    # The CLI reads the token from the file beside the database.
    env = _env(cwd, int(base.rsplit(":", 1)[1]))
    cli = subprocess.run(
        [sys.executable, "-m", "tether.cli", "work", "show", work["id"], "--json"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["state"] == "succeeded"
    missing = subprocess.run(
        [sys.executable, "-m", "tether.cli", "work", "show", "nope"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert missing.returncode == 3, missing.stderr

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0


def test_bad_settings_stop_serve_with_a_clear_message(tmp_path: Path) -> None:
    env = _env(tmp_path, _free_port())
    env["TETHER_LEASE_TTL"] = "-1"
    env["TETHER_PORT"] = "http"
    proc = subprocess.run(
        [sys.executable, "-m", "tether.cli", "serve"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "TETHER_LEASE_TTL" in proc.stderr and "TETHER_PORT" in proc.stderr
    assert not (tmp_path / "tether.db").exists(), "nothing is created on bad settings"
