"""Telegram polling mode on SQLite and PostgreSQL: :class:`TelegramPoller` against the fake Bot
API (``getUpdates``), the offset stored in the ledger only after the batch is committed, a
restart resuming from it, a SIGKILLed poller's batch handled once by the next; and
``tether telegram set-webhook`` against the fake."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import worker.agents  # noqa: F401  (registers the demo agent)
from config import load_settings
from gateway.telegram_polling import OFFSET_KEY, TelegramPoller
from ledger import Ledger
from ledger.schema import work_t

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fakes"))
from telegram_api import FakeTelegram

BOT_TOKEN = "123456:TEST-telegram-token"
CHAT = 4242
ROOT = Path(__file__).resolve().parents[2]


def message(update_id: int, text: str) -> dict[str, Any]:
    return {
        "update_id": update_id,
        "message": {
            "message_id": update_id,
            "date": 1_700_000_000,
            "chat": {"id": CHAT, "type": "private"},
            "from": {"id": 7, "is_bot": False, "first_name": "al", "username": "al"},
            "text": text,
        },
    }


def settings(fake: FakeTelegram) -> Any:
    return load_settings(
        None,
        default_agent="demo",
        telegram_token=BOT_TOKEN,
        telegram_mode="polling",
        telegram_api_base=fake.base_url,
    )


async def inbox_count(ledger: Ledger) -> int:
    async with ledger._read() as conn:
        return int((await conn.execute(sa.text("SELECT count(*) FROM inbox"))).scalar_one())


async def work_count(ledger: Ledger) -> int:
    async with ledger._read() as conn:
        return int(
            (await conn.execute(sa.select(sa.func.count()).select_from(work_t))).scalar_one()
        )


def offsets(fake: FakeTelegram) -> list[str | None]:
    return [p.get("offset") for m, p in fake.calls if m == "getUpdates"]


async def test_updates_handled_once_offset_stored_and_resumed(ledger: Ledger) -> None:
    async with FakeTelegram(BOT_TOKEN) as fake:
        fake.queue(message(501, "one"), message(502, "two"), message(503, "three"))
        poller = TelegramPoller(ledger, settings(fake), timeout=1)
        try:
            assert await poller.poll_once() == 3
        finally:
            await poller.close()
        assert await ledger.get_channel_offset(OFFSET_KEY) == 503
        assert offsets(fake) == [None]
        assert await inbox_count(ledger) == 3

        # a new instance (a restart) resumes from the stored offset; nothing is handled twice
        fake.queue(message(504, "four"))
        again = TelegramPoller(ledger, settings(fake), timeout=1)
        task = asyncio.create_task(again.run())
        try:
            for _ in range(200):  # until 504 is stored and confirmed by the next call
                if await ledger.get_channel_offset(OFFSET_KEY) == 504 and "505" in offsets(fake):
                    break
                await asyncio.sleep(0.05)
        finally:
            again.stop()
            await asyncio.wait_for(task, 5)
        assert await ledger.get_channel_offset(OFFSET_KEY) == 504
        assert offsets(fake)[1] == "504"
        assert "505" in offsets(fake)  # confirmed 504 on the next call
        assert await inbox_count(ledger) == 4


async def test_offset_never_moves_backwards(ledger: Ledger) -> None:
    assert await ledger.get_channel_offset("x") is None
    await ledger.set_channel_offset("x", 10)
    await ledger.set_channel_offset("x", 7)
    assert await ledger.get_channel_offset("x") == 10
    await ledger.set_channel_offset("x", 11)
    assert await ledger.get_channel_offset("x") == 11


CRASHING_POLLER = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    sys.path.insert(0, {root!r})
    import worker.agents
    from config import load_settings
    from gateway.telegram_polling import TelegramPoller
    from ledger import Ledger

    async def main():
        ledger = await Ledger.open({url!r}, migrate=False)
        settings = load_settings(None, default_agent="demo", telegram_token={token!r},
                                 telegram_mode="polling", telegram_api_base={base!r})
        mode = {mode!r}
        if mode == "before-offset":
            async def crash(channel, offset):
                os.kill(os.getpid(), signal.SIGKILL)  # committed, offset not stored
            ledger.set_channel_offset = crash
        else:  # mid-batch: the first update committed, the second not
            accept = ledger.accept_message
            seen = []
            async def crash_accept(**kw):
                if seen:
                    os.kill(os.getpid(), signal.SIGKILL)
                seen.append(1)
                return await accept(**kw)
            ledger.accept_message = crash_accept
        await TelegramPoller(ledger, settings, timeout=1).poll_once()

    asyncio.run(main())
    """
)


@pytest.mark.parametrize(("mode", "committed"), [("before-offset", 3), ("mid-batch", 1)])
async def test_sigkill_between_fetch_and_offset_store(
    ledger: Ledger, db_url: str, mode: str, committed: int
) -> None:
    async with FakeTelegram(BOT_TOKEN) as fake:
        fake.queue(message(601, "a"), message(602, "b"), message(603, "c"))
        script = CRASHING_POLLER.format(
            root=str(ROOT), mode=mode, url=db_url, token=BOT_TOKEN, base=fake.base_url
        )
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script, cwd=ROOT)
        assert await asyncio.wait_for(proc.wait(), 60) == -9
        assert await ledger.get_channel_offset(OFFSET_KEY) is None
        assert await inbox_count(ledger) == committed

        poller = TelegramPoller(ledger, settings(fake), timeout=1)
        try:
            assert await poller.poll_once() == 3  # Telegram resends what was not confirmed
        finally:
            await poller.close()
        assert offsets(fake) == [None, None]
        assert await ledger.get_channel_offset(OFFSET_KEY) == 603
        assert await inbox_count(ledger) == 3
        assert await work_count(ledger) == 3  # one work item per distinct message


async def test_cli_set_webhook(tmp_path: Path) -> None:
    async with FakeTelegram(BOT_TOKEN) as fake:
        env = {
            **os.environ,
            "TETHER_TELEGRAM_TOKEN": BOT_TOKEN,
            "TETHER_TELEGRAM_WEBHOOK_SECRET": "s3cret",
            "TETHER_TELEGRAM_API_BASE": fake.base_url,
            "TETHER_PUBLIC_URL": "https://tether.example.org",
            "TETHER_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}",
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tether.cli",
            "telegram",
            "set-webhook",
            "--max-connections",
            "12",
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, (out, err)
        (params,) = fake.sent("setWebhook")
        assert params["url"] == "https://tether.example.org/channels/telegram/webhook"
        assert params["secret_token"] == "s3cret"
        assert params["max_connections"] == "12"
        assert params["allowed_updates"] == '["message","edited_message","callback_query"]' or (
            __import__("json").loads(params["allowed_updates"])
            == ["message", "edited_message", "callback_query"]
        )


async def test_roles_start_the_poller_only_in_polling_mode(ledger: Ledger) -> None:
    from tether.roles import _telegram_poller

    async with FakeTelegram(BOT_TOKEN) as fake:
        poller = _telegram_poller(ledger, settings(fake), None)
        assert isinstance(poller, TelegramPoller)
        await poller.close()
        webhook = load_settings(None, telegram_token=BOT_TOKEN, telegram_webhook_secret="s")
        assert _telegram_poller(ledger, webhook, None) is None
        assert _telegram_poller(ledger, load_settings(None, telegram_mode="polling"), None) is None
