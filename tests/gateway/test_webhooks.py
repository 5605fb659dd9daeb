"""Inbound webhooks end to end: a real gateway on SQLite and PostgreSQL, requests signed by the
``standardwebhooks`` package (and by hand for GitHub's ``X-Hub-Signature-256``).

Every refused request is checked to have written nothing (no work item, no wait resolved).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from standardwebhooks.webhooks import Webhook

from config import load_settings
from gateway import create_app
from ledger import Ledger, WaitSpec

TOKEN = "webhook-test-token"
SECRET = "whsec_" + base64.b64encode(b"standard-webhooks-test-secret-32b").decode()
OLD_SECRET = "whsec_" + base64.b64encode(b"the-previous-secret-being-rotated").decode()
GH_SECRET = "github shared secret"
HOOKS = [
    {"name": "orders", "scheme": "standard", "secret": SECRET, "agent": "t_hook_agent"},
    {
        "name": "payments",
        "scheme": "standard",
        "secret": SECRET,
        "signal": "payment",
        "key_field": "data.order_id",
    },
    {"name": "gh", "scheme": "github", "secret": GH_SECRET, "agent": "t_hook_gh"},
]


@contextlib.asynccontextmanager
async def gateway(ledger: Ledger) -> AsyncIterator[aiohttp.ClientSession]:
    settings = load_settings(None, operator_token=TOKEN, webhooks=json.dumps(HOOKS))
    app = create_app(ledger, settings, operator_token=TOKEN)
    async with (
        TestServer(app, host="127.0.0.1") as server,
        aiohttp.ClientSession(str(server.make_url("/"))) as http,
    ):
        yield http


def signed(
    body: bytes | str,
    msg_id: str = "msg_1",
    *,
    secrets: tuple[str, ...] = (SECRET,),
    at: datetime | None = None,
) -> dict[str, str]:
    """Standard Webhooks headers, signed by the package (several secrets: key rotation)."""
    text = body.decode() if isinstance(body, bytes) else body
    at = at or datetime.now(UTC)
    sigs = " ".join(Webhook(s).sign(msg_id, at, text) for s in secrets)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": sigs,
        "Content-Type": "application/json",
    }


def github(body: bytes, delivery: str | None = "d-1", secret: str = GH_SECRET) -> dict[str, str]:
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    headers = {"X-Hub-Signature-256": f"sha256={digest}", "X-GitHub-Event": "push"}
    if delivery is not None:
        headers["X-GitHub-Delivery"] = delivery
    return headers


async def send(
    http: aiohttp.ClientSession, name: str, body: bytes, headers: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    async with http.post(f"/webhooks/{name}", data=body, headers=headers) as resp:
        return resp.status, await resp.json()


async def nothing_written(ledger: Ledger) -> None:
    assert await ledger.list_work() == []
    assert await ledger.list_waits(state="resolved") == []


async def park(ledger: Ledger, key: str = "o-1", agent: str = "t_hook_waiter") -> tuple[str, str]:
    """A work item parked on ``wait_for_signal("payment", key=key)``: (work id, wait id)."""
    work, _ = await ledger.create_work(agent, {"order": key})
    [claim] = await ledger.claim_work("w-test", limit=1, lease_ttl=30, agents=[agent])
    assert claim.work_id == work.id
    outcome = await ledger.enter_wait(
        claim, WaitSpec(seq=1, kind="signal", name="payment", key=key), "signal:payment"
    )
    assert isinstance(outcome, tuple) and outcome[0] is None
    assert (await ledger.get_work(work.id)).state == "waiting"
    return work.id, outcome[1]


def payment(order_id: str = "o-1") -> bytes:
    return json.dumps(
        {"type": "payment.succeeded", "data": {"order_id": order_id, "amount": 42}}
    ).encode()


# -- agent hooks -------------------------------------------------------------------------------


async def test_a_signed_delivery_starts_work_once(ledger: Ledger) -> None:
    body = json.dumps({"order": 7, "items": ["a", "b"]}).encode()
    async with gateway(ledger) as http:
        status, first = await send(http, "orders", body, signed(body, "msg_a"))
        assert status == 202 and first["duplicate"] is False, first
        for _ in range(4):
            status, again = await send(http, "orders", body, signed(body, "msg_a"))
            assert status == 202, again
            assert again == {"work_id": first["work_id"], "duplicate": True}
    [work] = await ledger.list_work()
    assert work.id == first["work_id"]
    assert (work.agent, work.input, work.state) == (
        "t_hook_agent",
        {"order": 7, "items": ["a", "b"]},
        "queued",
    )
    assert (work.source, work.source_event_id) == ("webhook:orders", "msg_a")


async def test_key_rotation_accepts_any_one_valid_signature(ledger: Ledger) -> None:
    body = b'{"rotated": true}'
    wrong = "whsec_" + base64.b64encode(b"an-unknown-secret-of-the-sender").decode()
    async with gateway(ledger) as http:
        status, out = await send(
            http, "orders", body, signed(body, "msg_r", secrets=(OLD_SECRET, SECRET))
        )
        assert status == 202, out
        status, out = await send(
            http, "orders", body, signed(body, "msg_s", secrets=(OLD_SECRET, wrong))
        )
        assert (status, out["error"]["code"]) == (401, "invalid_signature")
    assert [w.source_event_id for w in await ledger.list_work()] == ["msg_r"]


@pytest.mark.parametrize(
    "case",
    [
        "wrong_secret",
        "tampered_body",
        "stale_timestamp",
        "future_timestamp",
        "missing_signature",
        "missing_id",
        "missing_timestamp",
        "no_headers",
        "garbage_signature",
    ],
)
async def test_bad_signatures_are_401_and_write_nothing(ledger: Ledger, case: str) -> None:
    body = b'{"order": 1}'
    headers = signed(body, "msg_bad")
    if case == "wrong_secret":
        other = "whsec_" + base64.b64encode(b"not-the-configured-secret!!").decode()
        headers = signed(body, "msg_bad", secrets=(other,))
    elif case == "tampered_body":
        body = b'{"order": 2}'
    elif case == "stale_timestamp":
        headers = signed(body, "msg_bad", at=datetime.now(UTC) - timedelta(minutes=6))
    elif case == "future_timestamp":
        headers = signed(body, "msg_bad", at=datetime.now(UTC) + timedelta(minutes=6))
    elif case == "missing_signature":
        del headers["webhook-signature"]
    elif case == "missing_id":
        del headers["webhook-id"]
    elif case == "missing_timestamp":
        del headers["webhook-timestamp"]
    elif case == "no_headers":
        headers = {}
    elif case == "garbage_signature":
        headers["webhook-signature"] = "not-a-signature"
    async with gateway(ledger) as http:
        status, out = await send(http, "orders", body, headers)
    assert status == 401, out
    assert out["error"]["code"] == "invalid_signature" and out["error"]["message"]
    await nothing_written(ledger)


async def test_oversize_malformed_and_unknown_are_4xx_and_write_nothing(ledger: Ledger) -> None:
    big = json.dumps({"blob": "x" * (1024 * 1024 + 10)}).encode()
    bad_json = b'{"order": '
    not_storable = b'{"text": "nul \\u0000 here"}'
    async with gateway(ledger) as http:
        status, out = await send(http, "orders", big, signed(big, "msg_big"))
        assert (status, out["error"]["code"]) == (413, "payload_too_large")
        status, out = await send(http, "orders", bad_json, signed(bad_json, "msg_json"))
        assert (status, out["error"]["code"]) == (400, "invalid_json")
        status, out = await send(http, "orders", b"", signed(b"", "msg_empty"))
        assert (status, out["error"]["code"]) == (400, "invalid_json")
        status, out = await send(http, "orders", not_storable, signed(not_storable, "msg_nul"))
        assert (status, out["error"]["code"]) == (400, "invalid_json")
        # a malformed body with a bad signature is refused for the signature first
        status, out = await send(http, "orders", bad_json, {"webhook-id": "x"})
        assert (status, out["error"]["code"]) == (401, "invalid_signature")
        status, out = await send(http, "nope", b"{}", signed(b"{}", "msg_unknown"))
        assert (status, out["error"]["code"]) == (404, "not_found")
        long_id = "m" * 200
        status, out = await send(http, "orders", b"{}", signed(b"{}", long_id))
        assert (status, out["error"]["code"]) == (400, "invalid_delivery_id")
    await nothing_written(ledger)


# -- signal hooks ------------------------------------------------------------------------------


async def test_a_signal_hook_resumes_the_parked_work_once(ledger: Ledger) -> None:
    work_id, wait_id = await park(ledger, "o-1")
    body = payment("o-1")
    async with gateway(ledger) as http:
        status, out = await send(http, "payments", body, signed(body, "msg_pay"))
        assert status == 200, out
        assert out == {"resolved": [wait_id], "duplicate": False}
        for _ in range(3):
            status, again = await send(http, "payments", body, signed(body, "msg_pay"))
            assert status == 200, again
            assert again == {"resolved": [wait_id], "duplicate": True}
    wait = await ledger.get_wait(wait_id)
    assert wait.state == "resolved" and wait.resolved_by == "webhook:payments:msg_pay"
    assert wait.resolution["data"] == json.loads(body), "the agent gets exactly the payload"
    assert (await ledger.get_work(work_id)).state == "queued"
    assert len(await ledger.list_work()) == 1


async def test_a_redelivery_does_not_resolve_a_later_wait_on_the_same_key(ledger: Ledger) -> None:
    _, first = await park(ledger, "o-1")
    body = payment("o-1")
    async with gateway(ledger) as http:
        assert (await send(http, "payments", body, signed(body, "msg_p1")))[0] == 200
        _, second = await park(ledger, "o-1", agent="t_hook_waiter_again")
        status, again = await send(http, "payments", body, signed(body, "msg_p1"))
        assert (status, again) == (200, {"resolved": [first], "duplicate": True})
        assert (await ledger.get_wait(second)).state == "pending"
        status, fresh = await send(http, "payments", body, signed(body, "msg_p2"))
        assert (status, fresh) == (200, {"resolved": [second], "duplicate": False})


async def test_a_signal_nobody_waits_for_is_404_and_writes_nothing(ledger: Ledger) -> None:
    body = payment("o-404")
    async with gateway(ledger) as http:
        status, out = await send(http, "payments", body, signed(body, "msg_nobody"))
    assert (status, out["error"]["code"]) == (404, "no_waiter"), out
    assert "o-404" in out["error"]["message"]
    await nothing_written(ledger)


async def test_a_signal_without_its_key_field_is_400_and_writes_nothing(ledger: Ledger) -> None:
    _, wait_id = await park(ledger, "o-1")
    async with gateway(ledger) as http:
        for body in (
            b'{"data": {}}',
            b'{"order_id": "o-1"}',
            b"[1, 2]",
            b'{"data": {"order_id": null}}',
        ):
            status, out = await send(http, "payments", body, signed(body, "msg_nokey"))
            assert status == 400, out
            assert "data.order_id" in out["error"]["message"]
    assert (await ledger.get_wait(wait_id)).state == "pending"
    assert await ledger.list_waits(state="resolved") == []


# -- GitHub scheme -----------------------------------------------------------------------------


async def test_github_signatures(ledger: Ledger) -> None:
    body = json.dumps({"ref": "refs/heads/main", "after": "abc"}).encode()
    async with gateway(ledger) as http:
        status, out = await send(http, "gh", body, github(body, "d-1"))
        assert status == 202 and out["duplicate"] is False, out
        status, again = await send(http, "gh", body, github(body, "d-1"))
        assert (status, again) == (202, {"work_id": out["work_id"], "duplicate": True})
        refused = [
            github(body, "d-2", secret="wrong secret"),
            {**github(body, "d-3"), "X-Hub-Signature-256": "sha256=" + "0" * 64},
            {**github(body, "d-4"), "X-Hub-Signature-256": "sha1=deadbeef"},
            {"X-GitHub-Delivery": "d-5"},
            {**github(body, "d-6"), "X-Hub-Signature-256": "sha256=ünïcode"},
        ]
        for headers in refused:
            status, err = await send(http, "gh", body, headers)
            assert (status, err["error"]["code"]) == (401, "invalid_signature"), (headers, err)
        status, err = await send(http, "gh", body + b" ", github(body, "d-7"))
        assert (status, err["error"]["code"]) == (401, "invalid_signature"), "tampered body"
        status, err = await send(http, "gh", body, github(body, None))
        assert (status, err["error"]["code"]) == (400, "missing_delivery_id")
        status, err = await send(http, "gh", b"{oops", github(b"{oops", "d-8"))
        assert (status, err["error"]["code"]) == (400, "invalid_json")
    [work] = await ledger.list_work()
    assert (work.agent, work.source, work.source_event_id) == ("t_hook_gh", "webhook:gh", "d-1")
    assert work.input == json.loads(body)


async def test_a_standard_hook_with_a_non_base64_secret_is_refused_at_start(ledger: Ledger) -> None:
    hooks = [{"name": "h", "scheme": "standard", "secret": "whsec_a", "agent": "x"}]
    settings = load_settings(None, operator_token=TOKEN, webhooks=json.dumps(hooks))
    with pytest.raises(ValueError, match="webhook 'h'") as caught:
        create_app(ledger, settings, operator_token=TOKEN)
    assert "whsec_a" not in str(caught.value)
