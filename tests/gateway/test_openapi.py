"""The OpenAPI document: it validates as OpenAPI 3.1, it names exactly the routes the app
serves under ``/api/`` and ``/resume/`` (and ``/metrics``), and the live API answers as it
says: schemathesis generates requests for every operation against a real server (SQLite
ledger, bearer token) and checks there is no 5xx and every answer fits its documented schema.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import hypothesis
import pytest
import requests
import schemathesis
import sqlalchemy as sa
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, Phase
from hypothesis import strategies as st
from openapi_spec_validator import validate
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from config import Settings
from gateway import create_app
from gateway.openapi import OPENAPI
from ledger import Ledger, StepWrite, WaitSpec, utcnow
from ledger.schema import outbox_t

TOKEN = "schema-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: streams until the work item finishes: checked on its own below, not by generated requests
STREAMING = {("/api/v1/work/{id}/events", "get")}
#: no 5xx; every answer has a documented status, content type and schema
CHECKS = [
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
    content_type_conformance,
]
#: aiohttp's default limit on the request line (bytes): a longer URL is refused by its HTTP
#: parser with a plain-text 400 before the app sees it (long UTF-8 filters can get there)
MAX_REQUEST_LINE = 8190
#: examples per operation and generation mode (TETHER_SCHEMATHESIS_EXAMPLES to dig deeper)
EXAMPLES = int(os.environ.get("TETHER_SCHEMATHESIS_EXAMPLES", "20"))


def test_document_validates() -> None:
    validate(json.loads(json.dumps(OPENAPI)))
    assert OPENAPI["openapi"].startswith("3.1")


async def test_document_names_exactly_the_served_routes(ledger: Ledger) -> None:
    app = create_app(ledger, Settings(), operator_token=TOKEN)
    served: set[tuple[str, str]] = set()
    for route in app.router.routes():
        path = route.resource.canonical if route.resource else ""
        documented_area = path.startswith(("/api/", "/resume/")) or path == "/metrics"
        if documented_area and route.method != "HEAD":
            served.add((path, route.method.lower()))
    documented = {(path, method) for path, ops in OPENAPI["paths"].items() for method in ops}
    assert documented == served
    # the operator plane's routes are all there
    for path in (
        "/api/v1/work/{id}/restart",
        "/api/v1/outbox",
        "/api/v1/outbox/{id}/resend",
        "/api/v1/outbox/{id}/abandon",
        "/api/v1/work/{id}/events",
        "/metrics",
    ):
        assert path in OPENAPI["paths"]
    assert OPENAPI["paths"]["/metrics"]["get"]["security"] == []


async def test_streaming_and_metrics_answer_with_their_documented_types(ledger: Ledger) -> None:
    """The two routes whose answers are not JSON: checked by hand."""
    work, _ = await ledger.create_work("echo")
    await ledger.cancel_work(work.id)
    app = create_app(ledger, Settings(), operator_token=TOKEN)
    events_doc = OPENAPI["paths"]["/api/v1/work/{id}/events"]["get"]
    metrics_doc = OPENAPI["paths"]["/metrics"]["get"]
    async with TestServer(app, host="127.0.0.1") as server, aiohttp.ClientSession() as http:
        url = server.make_url(f"/api/v1/work/{work.id}/events")
        async with http.get(url, params={"follow": "false"}, headers=AUTH) as resp:
            assert resp.status == 200
            assert resp.content_type in events_doc["responses"]["200"]["content"]
            text = await resp.text()
        assert "event: created\ndata: {" in text and "\nid: " in f"\n{text}"
        first_id = int(text.split("id: ", 1)[1].split("\n", 1)[0])
        headers = {**AUTH, "Last-Event-ID": str(first_id)}
        async with http.get(url, params={"follow": "false"}, headers=headers) as resp:
            assert "event: created" not in await resp.text()
        async with http.get(url) as resp:  # no token
            assert resp.status == 401
        async with http.get(server.make_url("/metrics")) as resp:
            assert resp.status == 200
            assert resp.content_type in metrics_doc["responses"]["200"]["content"]


# ---- schemathesis against a live server -------------------------------------------------------


class LiveServer:
    """The gateway app on 127.0.0.1 (a free port) in a thread with its own event loop, so the
    synchronous schemathesis client can call it."""

    def __init__(self, db_url: str) -> None:
        self.db_url = db_url
        self.base_url = ""
        self.ids: dict[str, list[Any]] = {}
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="live-api", daemon=True)

    def __enter__(self) -> LiveServer:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the live server did not start")
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # surfaced in __enter__
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        ledger = await Ledger.open(self.db_url)
        try:
            self.ids = await seed(ledger)
            app = create_app(ledger, Settings(max_attempts=3), operator_token=TOKEN)
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = runner.addresses[0][1]
            self.base_url = f"http://127.0.0.1:{port}"
            self._ready.set()
            await self._stop.wait()
            await runner.cleanup()
        finally:
            await ledger.close()


async def seed(ledger: Ledger) -> dict[str, list[Any]]:
    """A little of everything, so detail views have steps, waits, messages and children, and
    actions meet items in every state. Returns the ids to put into generated paths."""
    chat = await ledger.accept_message(
        channel="http", chat_id="chat-1", text="hello", message_id="m-1", agent="echo"
    )
    works = [chat.work_id]
    for n in range(3):
        works.append((await ledger.create_work("echo", {"n": n}, max_attempts=1))[0].id)
    claims = await ledger.claim_work("worker-1", limit=4, lease_ttl=30)
    by_id = {c.work_id: c for c in claims}
    now = utcnow()
    waiting = by_id[works[0]]
    await ledger.record_step(
        waiting,
        StepWrite(
            1, "plan", 1, f"{waiting.work_id}:1", now, "succeeded", {"p": 1}, finished_at=now
        ),
    )
    works.append(await ledger.spawn_child(waiting, 2, "echo", None, max_attempts=1))
    token = await ledger.open_resume_url(waiting, 3, "webhook")
    _, wait_id = await ledger.enter_wait(
        waiting, WaitSpec(seq=4, kind="approval", prompt="ok?"), "approve"
    )
    await ledger.complete_work(by_id[works[1]], {"done": True})
    await ledger.fail_work(by_id[works[2]], {"type": "E", "message": "x", "traceback": "tb"})
    # works[3] stays running; works[4] (the child) is queued
    await ledger.register_worker("worker-1", host="box", pid=1, concurrency=2)
    outbox = []
    for state in ("unknown", "pending", "failed", "sent", "abandoned"):
        stmt = (
            sa.insert(outbox_t)
            .values(
                work_id=works[0],
                channel="slack",
                payload={"text": state},
                state=state,
                attempts=1,
                created_at=now,
            )
            .returning(outbox_t.c.id)
        )
        outbox.append(await ledger.engines.run_write(lambda c, s=stmt: c.execute(s).scalar_one()))
    return {
        "work": works,
        "outbox": outbox,
        "waits": [wait_id, *(w.id for w in await ledger.list_waits())],
        "token": [token],
        "name": ["webhook"],
    }


def known_values(ids: dict[str, list[Any]], path: str) -> dict[str, list[Any]]:
    """Path parameter -> seeded values worth trying for ``path``."""
    if path.startswith("/api/v1/work/"):
        return {"id": ids["work"]}
    if path.startswith("/api/v1/outbox/"):
        return {"id": ids["outbox"]}
    if path.startswith("/api/v1/waits/"):
        return {"id": ids["waits"]}
    if path.startswith("/resume/"):
        return {"token": ids["token"]}
    if path.startswith("/api/v1/signals/"):
        return {"name": ids["name"]}
    return {}


@pytest.fixture
def live(sqlite_template: Path, tmp_path: Path) -> Iterator[LiveServer]:
    path = tmp_path / "tether.db"
    shutil.copy(sqlite_template, path)
    with LiveServer(f"sqlite+aiosqlite:///{path}") as server:
        yield server


def test_schemathesis_finds_no_server_errors_and_no_schema_violations(live: LiveServer) -> None:
    schema = schemathesis.openapi.from_url(f"{live.base_url}/api/v1/openapi.json", timeout=10)
    session = requests.Session()
    failures: list[str] = []
    statuses: dict[str, list[int]] = collections.defaultdict(list)
    oversized: list[str] = []
    started = time.monotonic()
    operations = []
    for result in schema.get_all_operations():
        operation = result.ok()
        if (operation.path, operation.method.lower()) not in STREAMING:
            operations.append(operation)
    documented = sum(len(ops) for ops in OPENAPI["paths"].values())
    # schemathesis leaves out the operation that serves the document it loaded
    assert len(operations) == documented - len(STREAMING) - 1

    def check(operation: Any, mode: Any) -> None:
        label = f"{operation.method.upper()} {operation.path}"
        known = known_values(live.ids, operation.path)
        picks = st.fixed_dictionaries(
            {name: st.one_of(st.none(), st.sampled_from(values)) for name, values in known.items()}
        )

        @hypothesis.given(case=operation.as_strategy(generation_mode=mode), pick=picks)
        @hypothesis.settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def run(case: Any, pick: dict[str, Any]) -> None:
            for name, value in pick.items():  # about half the time, a seeded id
                if value is not None and case.path_parameters:
                    case.path_parameters[name] = value
            response = case.call(base_url=live.base_url, session=session, headers=AUTH, timeout=10)
            statuses[label].append(response.status_code)
            if len(response.request.path_url.encode()) > MAX_REQUEST_LINE:
                # refused by aiohttp's HTTP parser before any handler runs: a plain-text 400
                assert response.status_code == 400, label
                oversized.append(label)
                return
            try:
                case.validate_response(response, checks=CHECKS)
            except Exception as exc:  # collect them all, report at the end
                failures.append(f"{label}: {exc}")
                raise

        recorded = len(failures)
        try:
            run()
        except hypothesis.errors.Unsatisfiable:
            # nothing to break: an operation without parameters or body has no negative cases
            assert mode is schemathesis.GenerationMode.NEGATIVE, label
        except Exception:
            if len(failures) == recorded:  # not a finding: a broken test
                raise

    for operation in operations:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            check(operation, mode)
    elapsed = time.monotonic() - started
    seen = {label: dict(collections.Counter(codes)) for label, codes in statuses.items()}
    assert not failures, "\n\n".join(dict.fromkeys(failures))
    assert set(seen) == {f"{op.method.upper()} {op.path}" for op in operations}
    # the seeded ids reached real objects, not only 404s
    for label, status in [
        ("GET /api/v1/work/{id}", 200),
        ("POST /api/v1/work/{id}/restart", 201),
        ("GET /api/v1/waits/{id}", 200),
        ("POST /api/v1/outbox/{id}/abandon", 409),
    ]:
        assert status in seen[label], (label, seen[label])
    assert elapsed < 60, f"the schemathesis run took {elapsed:.0f}s"
