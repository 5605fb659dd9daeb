"""The operator web console (/console).

(a) Over a real aiohttp server on SQLite and PostgreSQL: login, session cookie, CSRF, pages,
    actions and their flash messages, approvals, the chat box (with a real worker pool running
    the demo agent).
(b) In real headless Chromium (Debian's ``chromium``, driven by Playwright) against a real
    ``tether serve`` process: log in, chat ``/approve deploy``, approve it on the approvals page,
    see ``Approved: deploy`` in the chat; a screenshot goes to the test artefacts.
"""

from __future__ import annotations

import html
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

import worker.agents.demo  # noqa: F401  (registers the "demo" agent)
from config import load_settings
from gateway import create_app
from gateway.console import auth
from ledger import Claim, Ledger
from ledger.waits import WaitSpec
from worker.registry import chat_policies

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "worker"))
from helpers_worker import running_pool, wait_for_state, wait_until

TOKEN = "console-test-token"
REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
REQUIRED = os.environ.get("TETHER_REQUIRE_POSTGRES") == "1" or (
    os.environ.get("CI", "").lower() in {"1", "true", "yes"}
)
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


# -- (a) the console over HTTP -------------------------------------------------------------------


class Console:
    """A browser-like client: follows nothing by itself, keeps cookies (also for 127.0.0.1)."""

    def __init__(self, server: TestServer, http: aiohttp.ClientSession) -> None:
        self.server = server
        self.http = http

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))

    async def get(self, path: str) -> tuple[int, str, Any]:
        async with self.http.get(self.url(path), allow_redirects=False) as r:
            return r.status, await r.text(), r.headers

    async def post(self, path: str, data: dict[str, str]) -> tuple[int, str, Any]:
        async with self.http.post(self.url(path), data=data, allow_redirects=False) as r:
            return r.status, await r.text(), r.headers

    async def login(self, token: str = TOKEN) -> tuple[int, str, Any]:
        return await self.post("/console/login", {"token": token, "next": "/console"})

    async def page(self, path: str) -> str:
        """GET a page that must render (200)."""
        status, text, _ = await self.get(path)
        assert status == 200, (path, status, text[:500])
        return text

    async def csrf(self, path: str = "/console") -> str:
        match = _CSRF.search(await self.page(path))
        assert match, f"no CSRF token on {path}"
        return match.group(1)

    async def submit(self, path: str, data: dict[str, str], back: str) -> str:
        """POST a form with this session's CSRF token; expect 303 to ``back``; the page there."""
        status, text, headers = await self.post(path, {"csrf": await self.csrf(), **data})
        assert status == 303, (status, text[:500])
        assert headers["Location"] == back, headers["Location"]
        return await self.page(back)


def _client(server: TestServer) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


@pytest.fixture
async def console(ledger: Ledger) -> AsyncIterator[Console]:
    settings = load_settings(None, default_agent="demo", operator_token=TOKEN)
    app = create_app(ledger, settings, operator_token=TOKEN, chat_policies=chat_policies())
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    http = _client(server)
    try:
        yield Console(server, http)
    finally:
        await http.close()
        await server.close()


@pytest.fixture
async def logged_in(console: Console) -> Console:
    status, text, _ = await console.login()
    assert status == 303, text
    return console


async def running(ledger: Ledger, agent: str | None = None) -> Claim:
    """A fresh work item, claimed as a worker would (and only that one)."""
    agent = agent or f"agent-{secrets.token_hex(4)}"
    await ledger.create_work(agent, {"n": 1})
    [claim] = await ledger.claim_work("w", limit=1, lease_ttl=30, agents=[agent])
    return claim


async def waiting_for_approval(ledger: Ledger, prompt: str = "Delete it?") -> tuple[str, str]:
    claim = await running(ledger)
    entered = await ledger.enter_wait(claim, WaitSpec(seq=1, kind="approval", prompt=prompt), "ok")
    assert isinstance(entered, tuple)
    return claim.work_id, entered[1]


async def event_types(ledger: Ledger, work_id: str) -> list[str]:
    return [e.type for e in await ledger.list_recent_events(work_id, limit=100)]


def flash_of(page: str) -> str:
    match = re.search(r'<div class="flash (?:info|error)"[^>]*>(.*?)</div>', page, re.S)
    assert match, "no flash message on the page"
    return html.unescape(match.group(1)).strip()


async def test_every_page_needs_a_login(console: Console, ledger: Ledger) -> None:
    work, _ = await ledger.create_work("a", None)
    for path in (
        "/console",
        f"/console/work/{work.id}",
        "/console/approvals",
        "/console/chat",
        "/console/live/work",
        f"/console/live/work/{work.id}",
        "/console/live/chat",
        "/console/nothing-here",
    ):
        status, _, headers = await console.get(path)
        assert status == 303, path
        assert headers["Location"].startswith("/console/login?next="), headers["Location"]
    _, _, headers = await console.get("/console/approvals")
    assert headers["Location"] == "/console/login?next=%2Fconsole%2Fapprovals"
    # A POST without a session is turned away too, and changes nothing.
    status, _, headers = await console.post(f"/console/work/{work.id}/cancel", {"confirmed": "1"})
    assert status == 303 and headers["Location"].startswith("/console/login")
    assert (await ledger.get_work(work.id)).state == "queued"
    # The login page and the stylesheet are public; the operator API still wants its bearer.
    status, text, headers = await console.get("/console/login")
    assert status == 200 and 'name="token"' in text
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    status, _, _ = await console.get("/console/static/console.css")
    assert status == 200
    status, _, _ = await console.get("/api/v1/work")
    assert status == 401


async def test_a_wrong_token_is_rejected(console: Console) -> None:
    for wrong in ("nope", TOKEN + "x", "", " "):
        status, text, headers = await console.login(wrong)
        assert status == 401, wrong
        assert "not the operator token" in text
        assert "Set-Cookie" not in headers or auth.COOKIE not in headers["Set-Cookie"]
    status, _, _ = await console.get("/console")
    assert status == 303
    # A cookie signed with another token, a tampered one, or an expired one is no session.
    _, other = auth.new_session(b"another-token")
    _, old = auth.new_session(TOKEN.encode(), now=time.time() - auth.SESSION_TTL - 5)
    _, good = auth.new_session(TOKEN.encode())
    tampered = good[:-2] + ("AA" if not good.endswith("AA") else "BB")
    for value in (other, old, tampered, "x.y.z", TOKEN):
        console.http.cookie_jar.clear()
        console.http.cookie_jar.update_cookies(
            {auth.COOKIE: value}, response_url=console.server.make_url("/console")
        )
        status, _, _ = await console.get("/console")
        assert status == 303, value
    assert auth.read_session(TOKEN.encode(), good) is not None
    assert auth.read_session(b"rotated-token", good) is None, "a new token voids old sessions"


async def test_the_session_cookie_is_httponly_strict_and_not_the_token(console: Console) -> None:
    status, _, headers = await console.login(f"  {TOKEN}\n")
    assert status == 303 and headers["Location"] == "/console"
    [raw] = [h for h in headers.getall("Set-Cookie") if h.startswith(f"{auth.COOKIE}=")]
    cookie = SimpleCookie()
    cookie.load(raw)
    morsel = cookie[auth.COOKIE]
    assert morsel["httponly"] is True
    assert morsel["samesite"] == "Strict"
    assert morsel["path"] == "/console"
    assert int(morsel["max-age"]) == auth.SESSION_TTL
    assert TOKEN not in morsel.value
    page = await console.page("/console")
    assert "<h1>Work</h1>" in page and "Log out" in page
    # Two logins are two sessions with different CSRF tokens.
    first = await console.csrf()
    await console.login()
    assert await console.csrf() != first


async def test_a_post_without_the_csrf_token_is_forbidden_and_changes_nothing(
    logged_in: Console, ledger: Ledger
) -> None:
    console = logged_in
    _, wait_id = await waiting_for_approval(ledger)
    work, _ = await ledger.create_work("a", None)
    before = await event_types(ledger, work.id)
    # A CSRF token of another session does not do either.
    other = _client(console.server)
    try:
        async with other.post(console.url("/console/login"), data={"token": TOKEN}) as r:
            assert r.status == 200
        async with other.get(console.url("/console")) as r:
            foreign = _CSRF.search(await r.text())
        assert foreign
    finally:
        await other.close()
    for csrf in (None, "", "forged", foreign.group(1)):
        extra = {} if csrf is None else {"csrf": csrf}
        for path, data in (
            (f"/console/work/{work.id}/pause", {}),
            (f"/console/work/{work.id}/cancel", {"confirmed": "1"}),
            (f"/console/waits/{wait_id}/resolve", {"decision": "approve"}),
            ("/console/chat", {"text": "hello"}),
            ("/console/logout", {}),
        ):
            status, text, _ = await console.post(path, {**data, **extra})
            assert status == 403, (path, csrf)
            assert "nothing was changed" in text
    assert (await ledger.get_work(work.id)).state == "queued"
    assert await event_types(ledger, work.id) == before
    assert (await ledger.get_wait(wait_id)).state == "pending"
    assert await ledger.list_work(agent="demo") == []
    await console.page("/console")  # still logged in: the logout was refused as well
    # With the token, the same action goes through.
    page = await console.submit(f"/console/work/{work.id}/pause", {}, f"/console/work/{work.id}")
    assert flash_of(page) == "Paused."
    assert (await ledger.get_work(work.id)).state == "paused"


async def test_approve_from_the_approvals_page(logged_in: Console, ledger: Ledger) -> None:
    console = logged_in
    work_id, wait_id = await waiting_for_approval(ledger, "Deploy <prod>?")
    page = await console.page("/console/approvals")
    assert "Deploy &lt;prod&gt;?" in page and "<prod>" not in page
    assert f'action="/console/waits/{wait_id}/resolve"' in page
    assert 'data-poll="/console/live/approvals"' in page

    page = await console.submit(
        f"/console/waits/{wait_id}/resolve",
        {"decision": "approve", "comment": "ship it", "next": "/console/approvals"},
        "/console/approvals",
    )
    assert flash_of(page) == "Approved: Deploy <prod>?"
    assert "Nothing is waiting for an approval." in page
    wait = await ledger.get_wait(wait_id)
    assert wait.state == "resolved" and wait.resolved_by == "console"
    assert wait.resolution["decision"] == "approve"
    assert wait.resolution["comment"] == "ship it"
    assert (await ledger.get_work(work_id)).state == "queued", "the work is woken"

    # Deciding again is a friendly message, not an error page; the first decision stands.
    page = await console.submit(
        f"/console/waits/{wait_id}/resolve", {"decision": "deny"}, "/console/approvals"
    )
    assert flash_of(page) == "Not done: already decided by console (approve)."
    assert (await ledger.get_wait(wait_id)).resolution["decision"] == "approve"
    page = await console.submit(
        "/console/waits/0123456789abcdef/resolve", {"decision": "deny"}, "/console/approvals"
    )
    assert flash_of(page) == "Not done: there is no such approval."
    # A deny from the work page goes back there.
    work_id, wait_id = await waiting_for_approval(ledger, "Drop the table?")
    here = f"/console/work/{work_id}"
    assert "Drop the table?" in await console.page(here)
    page = await console.submit(
        f"/console/waits/{wait_id}/resolve", {"decision": "deny", "next": here}, here
    )
    assert flash_of(page) == "Denied: Drop the table?"
    assert (await ledger.get_wait(wait_id)).resolution["decision"] == "deny"


async def test_illegal_actions_are_flash_messages(logged_in: Console, ledger: Ledger) -> None:
    console = logged_in
    work, _ = await ledger.create_work("a", None)
    here = f"/console/work/{work.id}"
    page = await console.submit(f"{here}/resume", {}, here)
    assert flash_of(page) == f"Not done: work {work.id} is queued; it cannot become queued"
    page = await console.submit(f"{here}/retry", {}, here)
    assert "cannot become queued" in flash_of(page)
    # Cancel asks first (the page's confirm() sets confirmed=1; without it, the server asks).
    status, text, _ = await console.post(f"{here}/cancel", {"csrf": await console.csrf()})
    assert status == 200 and "Yes, cancel" in text
    assert (await ledger.get_work(work.id)).state == "queued"
    page = await console.submit(f"{here}/cancel", {"confirmed": "1"}, here)
    assert flash_of(page) == "Cancelled."
    assert (await ledger.get_work(work.id)).state == "cancelled"
    assert 'data-confirm="Cancel' not in page, "no cancel button on a cancelled item"
    page = await console.submit(f"{here}/pause", {}, here)
    assert flash_of(page) == f"Not done: work {work.id} is cancelled; it cannot become paused"
    page = await console.submit(f"{here}/retry", {}, here)
    assert flash_of(page) == "Queued for another attempt."
    # A running item is asked to stop at its next step boundary.
    claim = await running(ledger, "b")
    there = f"/console/work/{claim.work_id}"
    page = await console.submit(f"{there}/pause", {}, there)
    assert "requested" in flash_of(page)
    assert "Requested" in page and "at the next step boundary" in page
    page = await console.submit(f"{there}/cancel", {"confirmed": "1"}, there)
    assert flash_of(page) == "Cancel requested; the worker stops at the next step boundary."
    page = await console.submit(f"{there}/pause", {}, there)
    assert flash_of(page) == (
        f"Not done: work {claim.work_id} is running; it cannot become paused: "
        "a cancel is already requested"
    )
    status, text, _ = await console.post(f"{there}/explode", {"csrf": await console.csrf()})
    assert status == 404 and "<html" in text


async def test_work_list_and_work_page(logged_in: Console, ledger: Ledger) -> None:
    console = logged_in
    queued, _ = await ledger.create_work("<b>bold</b>", {"text": "<script>alert(1)</script>"})
    claim = await running(ledger, "stepper")
    from datetime import UTC, datetime

    from ledger import StepWrite

    await ledger.record_step(
        claim,
        StepWrite(
            seq=1,
            name="fetch",
            attempt=1,
            idempotency_key=f"{claim.work_id}:1",
            started_at=datetime.now(UTC),
            progress={"done": 3, "of": 10},
        ),
    )
    page = await console.page("/console")
    assert "&lt;b&gt;bold&lt;/b&gt;" in page and "<b>bold</b>" not in page
    assert f'href="/console/work/{queued.id}"' in page
    assert re.search(r"queued <span class=\"n\">1</span>", page)
    assert re.search(r"running <span class=\"n\">1</span>", page)
    page = await console.page("/console?state=running")
    assert claim.work_id in page and queued.id not in page
    page = await console.page("/console?state=bogus")
    assert "Unknown state" in page and queued.id in page

    page = await console.page(f"/console/work/{claim.work_id}")
    for needle in ("fetch", "running", "3/10", "Lease", "claimed", "step started", "History"):
        assert needle in page, needle
    assert f'data-poll="/console/live/work/{claim.work_id}"' in page
    assert '<meta http-equiv="refresh"' in page  # inside <noscript>, for pages without JS
    page = await console.page(f"/console/work/{queued.id}")
    assert "&lt;script&gt;" in page and "<script>alert" not in page
    status, fragment, headers = await console.get(f"/console/live/work/{claim.work_id}")
    assert status == 200 and "fetch" in fragment and "<html" not in fragment
    assert "X-Console-Done" not in headers
    await ledger.cancel_work(queued.id)
    _, _, headers = await console.get(f"/console/live/work/{queued.id}")
    assert headers["X-Console-Done"] == "1", "a terminal item stops the polling"
    status, text, _ = await console.get("/console/work/0123456789abcdef0123456789ab")
    assert status == 404 and "no work item" in text
    status, text, _ = await console.get("/console/work/bad%20id")
    assert status == 404


async def test_chat_talks_to_the_default_agent(logged_in: Console, ledger: Ledger) -> None:
    """The whole console flow in-process: chat /approve deploy, approve, read the answer."""
    console = logged_in
    page = await console.page("/console/chat")
    assert "No messages yet" in page
    message_id = re.search(r'name="message_id" value="([^"]+)"', page)
    assert message_id
    form = {"text": "/approve deploy", "message_id": message_id.group(1)}
    async with running_pool(ledger, concurrency=2):
        await console.submit("/console/chat", form, "/console/chat")
        await console.submit("/console/chat", form, "/console/chat")  # a double submit
        [work] = await ledger.list_work(agent="demo")
        assert work.conversation_id is not None

        async def asked() -> bool:
            return "Approve deploy?" in (await console.get("/console/live/chat"))[1]

        await wait_until(asked, what="the approval prompt in the chat")
        [wait] = await ledger.list_waits(state="pending", kind="approval")
        page = await console.submit(
            f"/console/waits/{wait.id}/resolve", {"decision": "approve"}, "/console/approvals"
        )
        assert flash_of(page) == "Approved: Approve deploy?"
        await wait_for_state(ledger, work.id, {"succeeded"})

        async def answered() -> bool:
            return "Approved: deploy" in (await console.get("/console/live/chat"))[1]

        await wait_until(answered, what="the answer in the chat")
    page = await console.page("/console/chat")
    assert page.index("/approve deploy") < page.index("Approve deploy?")
    assert page.index("Approve deploy?") < page.index("Approved: deploy")
    assert page.count(">/approve deploy<") == 1, "the double submit was delivered once"
    assert "resolved by console: approve" in page
    # A new conversation starts empty.
    page = await console.submit("/console/chat/new", {}, "/console/chat")
    assert "No messages yet" in page
    page = await console.submit("/console/chat", {"text": "   "}, "/console/chat")
    assert flash_of(page) == "Type a message first."


async def test_logout_ends_the_session(logged_in: Console) -> None:
    console = logged_in
    cookie = console.http.cookie_jar.filter_cookies(console.server.make_url("/console"))
    value = cookie[auth.COOKIE].value
    status, _, headers = await console.post("/console/logout", {"csrf": await console.csrf()})
    assert status == 303 and headers["Location"] == "/console/login"
    status, _, _ = await console.get("/console")
    assert status == 303
    # The old cookie, replayed, is refused.
    console.http.cookie_jar.update_cookies(
        {auth.COOKIE: value}, response_url=console.server.make_url("/console")
    )
    status, _, headers = await console.get("/console")
    assert status == 303 and headers["Location"].startswith("/console/login")


# -- (b) the console in real Chromium against `tether serve` -------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _need(what: str) -> None:
    """Fail where browser tests are required (CI), else skip with how to get ``what``."""
    if REQUIRED:
        pytest.fail(f"{what} (required here: TETHER_REQUIRE_POSTGRES=1 or CI is set)")
    pytest.skip(what)


@pytest.fixture
def chromium() -> str | None:
    """Why the browser test cannot run here (no Chromium, no Playwright), or ``None``."""
    if not CHROMIUM.exists():
        return f"Chromium is missing at {CHROMIUM}: apt-get install -y chromium"
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return "the playwright package is missing: pip install -e '.[test]'"
    return None


@pytest.fixture
def artifacts() -> Path:
    """Where screenshots go: $TETHER_TEST_ARTIFACTS, else <repo>/test-artifacts."""
    path = Path(os.environ.get("TETHER_TEST_ARTIFACTS") or REPO / "test-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A real ``tether serve`` on a fresh SQLite file in ``tmp_path``: its URL and the operator
    token from the token file it wrote."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    env.update({"TETHER_PORT": str(port), "TETHER_LEASE_TTL": "5"})
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tether.cli", "serve"],
        cwd=tmp_path,
        env=env,
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
        yield base, (tmp_path / "tether.db.operator-token").read_text().strip()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


async def test_console_flow_in_chromium(
    chromium: str | None, artifacts: Path, served: tuple[str, str]
) -> None:
    if chromium is not None:
        _need(chromium)
    from playwright.async_api import async_playwright, expect

    base, token = served
    shot = artifacts / "console-approve.png"
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True
        )
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 860})
            page.set_default_timeout(30_000)
            try:
                await page.goto(f"{base}/console")
                await expect(page).to_have_url(re.compile(r"/console/login\?next="))
                await page.get_by_label("Operator token").fill(token)
                await page.get_by_role("button", name="Log in").click()
                await expect(page.get_by_role("heading", name="Work")).to_be_visible()

                await page.get_by_role("link", name="Chat").click()
                await page.get_by_label("Message").fill("/approve deploy")
                await page.get_by_label("Message").press("Enter")
                chat_log = page.locator("#chat-log")
                await expect(chat_log).to_contain_text("Approve deploy?")

                await page.get_by_role("link", name="Approvals").click()
                row = page.locator("tr", has_text="Approve deploy?")
                await row.get_by_role("button", name="Approve").click()
                await expect(page.locator(".flash")).to_have_text("Approved: Approve deploy?")
                nothing = page.get_by_text("Nothing is waiting for an approval.")
                await expect(nothing).to_be_visible()

                await page.get_by_role("link", name="Chat").click()
                await expect(chat_log).to_contain_text("Approved: deploy")
                png = await page.screenshot(path=str(shot), full_page=True)
            except BaseException:
                await page.screenshot(path=str(shot.with_name("console-failure.png")))
                raise
        finally:
            await browser.close()
    assert png.startswith(b"\x89PNG")
