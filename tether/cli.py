"""The ``tether`` command line: run the roles, migrate, and steer work through the operator API.

Exit codes: 0 done; 1 the API refused (illegal action, bad request, a wait decided before);
2 bad usage or settings; 3 unknown id, or nothing waits for the signal; 4 the gateway or
database cannot be reached; 130 interrupted (Ctrl-C in ``work attach``). ``--json`` makes every
read command print one JSON document (``work attach --json``: one JSON object per line).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from config import Settings, SettingsError, load_settings

app = typer.Typer(help="Tether: durable agent work across chat channels.", no_args_is_help=True)
db_app = typer.Typer(help="Database migrations and retention.", no_args_is_help=True)
work_app = typer.Typer(help="Inspect and steer work items (through the operator API).")
app.add_typer(db_app, name="db")
app.add_typer(work_app, name="work")
telegram_app = typer.Typer(help="The Telegram channel.", no_args_is_help=True)
app.add_typer(telegram_app, name="telegram")

out = Console()
err = Console(stderr=True)

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help="TOML settings file (or TETHER_CONFIG).", show_default=False
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]

EXIT_REFUSED, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_UNREACHABLE = 1, 2, 3, 4


def _settings(config: Path | None, **overrides: Any) -> Settings:
    try:
        return load_settings(config, **overrides)
    except SettingsError as exc:
        err.print(f"[bold red]tether: invalid settings[/]\n{exc}", highlight=False)
        raise typer.Exit(EXIT_USAGE) from None


def _run(coro: Any) -> None:
    from ledger import LedgerUnavailable

    try:
        asyncio.run(coro)
    except LedgerUnavailable as exc:
        err.print(f"[bold red]tether: the database is unreachable:[/] {exc}", highlight=False)
        raise typer.Exit(EXIT_UNREACHABLE) from None
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        err.print(f"[bold red]tether:[/] {exc}", highlight=False)
        raise typer.Exit(EXIT_UNREACHABLE) from None


# -- roles ------------------------------------------------------------------------------------


@app.command()
def serve(
    config: ConfigOpt = None,
    host: Annotated[str | None, typer.Option(help="Bind address (TETHER_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (TETHER_PORT).")] = None,
    concurrency: Annotated[int | None, typer.Option(help="Worker slots.")] = None,
) -> None:
    """Gateway + worker pool + scheduler in one process (SQLite ./tether.db by default)."""
    from tether.roles import configure_logging, run_serve

    settings = _settings(config, host=host, port=port)
    configure_logging(settings.log_level, json_format=settings.log_format == "json")
    _run(run_serve(settings, concurrency=concurrency))


@app.command()
def gateway(config: ConfigOpt = None) -> None:
    """The HTTP gateway alone (channels, operator API, health)."""
    from tether.roles import configure_logging, run_gateway

    settings = _settings(config)
    configure_logging(settings.log_level, json_format=settings.log_format == "json")
    _run(run_gateway(settings))


@app.command()
def worker(
    config: ConfigOpt = None,
    concurrency: Annotated[
        int | None, typer.Option(min=1, max=1000, help="Work items run at once.")
    ] = None,
) -> None:
    """A worker pool process: claims work and runs agents."""
    from tether.roles import configure_logging, run_worker

    settings = _settings(config)
    configure_logging(settings.log_level, json_format=settings.log_format == "json")
    _run(run_worker(settings, concurrency=concurrency))


@app.command()
def scheduler(config: ConfigOpt = None) -> None:
    """A scheduler process: reaps expired leases (any number may run)."""
    from tether.roles import configure_logging, run_scheduler

    settings = _settings(config)
    configure_logging(settings.log_level, json_format=settings.log_format == "json")
    _run(run_scheduler(settings))


# -- database ---------------------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade(config: ConfigOpt = None) -> None:
    """Apply pending migrations (Alembic)."""
    from ledger import Ledger
    from ledger.migrate import current_revision

    settings = _settings(config)

    async def go() -> None:
        led = await Ledger.open(settings.database_url, migrate=True)
        rev = await current_revision(led.engines)
        await led.close()
        out.print(f"database is at revision {rev}")

    _run(go())


_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration(text: str) -> timedelta:
    """``30d``, ``12h``, ``90m``, ``3600s``, ``2w``."""
    m = _DURATION.match(text)
    if not m:
        raise typer.BadParameter(f"{text!r} is not a duration like 30d, 12h, 90m or 3600s")
    return timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})


@db_app.command("prune")
def db_prune(
    older_than: Annotated[str, typer.Option("--older-than", help="e.g. 30d, 12h")],
    config: ConfigOpt = None,
    batch: Annotated[int, typer.Option(min=1, max=10_000, help="Items per transaction.")] = 500,
) -> None:
    """Delete finished work (with steps, waits, events) that finished before the cutoff."""
    from ledger import Ledger

    age = parse_duration(older_than)
    settings = _settings(config)

    async def go() -> None:
        led = await Ledger.open(settings.database_url)
        try:
            n = await led.prune(age, batch=batch)
        finally:
            await led.close()
        out.print(f"pruned {n} finished work item(s) older than {older_than}")

    _run(go())


# -- operator API client ------------------------------------------------------------------------


class ApiClient:
    def __init__(self, settings: Settings, url: str | None) -> None:
        from config.token import read_operator_token

        self.base = (url or f"http://{settings.host}:{settings.port}").rstrip("/")
        token = read_operator_token(settings)
        if not token:
            err.print(
                "tether: no operator token: set TETHER_OPERATOR_TOKEN or run `tether serve` "
                f"once to create {settings.operator_token_file()}"
            )
            raise typer.Exit(EXIT_USAGE)
        self.token = token

    def _request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> urllib.request.Request:
        data = json.dumps(body).encode() if body is not None else None
        return urllib.request.Request(
            self.base + path,
            data=data,
            method=method,
            headers={
                "Authorization": f"Bearer {self.token}",
                "Content-Type": "application/json",
                **(headers or {}),
            },
        )

    def _fail(self, exc: urllib.error.HTTPError) -> typer.Exit:
        """Print the API's error and return the exit code that says what kind it was."""
        error: dict[str, Any] = {}
        try:
            error = json.loads(exc.read())["error"]
            message = error["message"]
        except Exception:
            message = f"HTTP {exc.code}"
        err.print(f"tether: {message}", highlight=False)
        if exc.code == 409 and error.get("code") == "already_resolved":
            err.print(f"tether: {describe_resolution(error)}", highlight=False)
        code = {404: EXIT_NOT_FOUND, 401: EXIT_USAGE, 503: EXIT_UNREACHABLE}.get(
            exc.code, EXIT_REFUSED
        )
        return typer.Exit(code)

    def _unreachable(self, exc: BaseException) -> typer.Exit:
        err.print(f"tether: cannot reach the gateway at {self.base}: {exc}", highlight=False)
        return typer.Exit(EXIT_UNREACHABLE)

    def call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            with urllib.request.urlopen(self._request(method, path, body), timeout=30) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise self._fail(exc) from None
        except (urllib.error.URLError, OSError) as exc:
            raise self._unreachable(exc) from None

    def events(self, work_id: str, *, after: int = 0) -> Iterator[dict[str, Any]]:
        """Follow ``GET /api/v1/work/{id}/events`` (Server-Sent Events): yield each event
        until the server says the item finished. A dropped connection is resumed with
        ``Last-Event-ID`` (:data:`ATTACH_RETRIES` times in a row at most); a gateway that
        cannot be reached at all fails at once."""
        last, failures, connected = after, 0, False
        path = f"/api/v1/work/{_q(work_id)}/events"
        while True:
            headers = {"Accept": "text/event-stream", "Last-Event-ID": str(last)}
            try:
                with urllib.request.urlopen(
                    self._request("GET", path, headers=headers), timeout=ATTACH_READ_TIMEOUT
                ) as resp:
                    connected = True
                    for kind, data, event_id in _sse_frames(resp):
                        failures = 0
                        if kind == "end":
                            return
                        if event_id is not None and event_id.isdigit():
                            last = max(last, int(event_id))
                        yield json.loads(data)
            except urllib.error.HTTPError as exc:
                raise self._fail(exc) from None
            except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
                failures += 1
                if not connected or failures > ATTACH_RETRIES:
                    raise self._unreachable(exc) from None
            else:  # closed without the end of the item: the gateway went away; reconnect
                failures += 1
                if failures > ATTACH_RETRIES:
                    err.print("tether: the event stream keeps closing; giving up")
                    raise typer.Exit(EXIT_UNREACHABLE)
            time.sleep(min(0.5 * 2**failures, 10.0))


#: consecutive reconnects ``work attach`` tries before giving up
ATTACH_RETRIES = 5
#: the server sends a keep-alive every 15 s; a read that waits longer means a dead connection
ATTACH_READ_TIMEOUT = 60.0


def _sse_frames(lines: Iterable[bytes]) -> Iterator[tuple[str, str, str | None]]:
    """``(event type, data, id)`` of each Server-Sent Events frame (comments skipped)."""
    kind, data, event_id = "message", [], None
    for raw in lines:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield kind, "\n".join(data), event_id
            kind, data, event_id = "message", [], None
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            kind = value
        elif name == "data":
            data.append(value)
        elif name == "id":
            event_id = value


def describe_resolution(error: dict[str, Any]) -> str:
    """Who decided a wait first, and what: for the 409 ``already_resolved`` answer."""
    state = error.get("state") or "resolved"
    by = error.get("resolved_by") or "unknown"
    resolution = error.get("resolution")
    if state != "resolved":
        what = state.replace("_", " ")
    elif isinstance(resolution, dict) and "decision" in resolution:
        what = "approved" if resolution["decision"] == "approve" else "denied"
        if resolution.get("comment"):
            what += f" ({resolution['comment']})"
    elif isinstance(resolution, dict):
        shown = {k: v for k, v in resolution.items() if k != "by"}
        what = f"resolved with {json.dumps(shown)[:300]}"
    else:
        what = "resolved"
    return f"first decision: {what} by {by}"


UrlOpt = Annotated[
    str | None, typer.Option("--url", help="Gateway URL (default http://HOST:PORT).")
]


def _table(*columns: str) -> Table:
    """A table whose first column is a full, unwrapped id (ids are what scripts copy)."""
    table = Table()
    table.add_column("id", no_wrap=True, min_width=28)
    for column in columns:
        table.add_column(column)
    return table


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")


@work_app.command("ls")
def work_ls(
    state: Annotated[str | None, typer.Option(help="Only this state.")] = None,
    agent: Annotated[str | None, typer.Option(help="Only this agent.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=500)] = 50,
    config: ConfigOpt = None,
    url: UrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List work items, newest first, with counts by state."""
    client = ApiClient(_settings(config), url)
    query = (
        f"?limit={limit}"
        + (f"&state={state}" if state else "")
        + (f"&agent={agent}" if agent else "")
    )
    data = client.call("GET", f"/api/v1/work{query}")
    if as_json:
        _print_json(data)
        return
    table = _table("agent", "state", "attempt", "updated", "reason")
    for w in data["items"]:
        table.add_row(
            w["id"], w["agent"], w["state"], str(w["attempt"]), w["updated_at"][:19],
            w.get("wait_reason") or w.get("state_reason") or "",
        )  # fmt: skip
    out.print(table)
    out.print("  ".join(f"{k}: {v}" for k, v in data["counts"].items() if v))


@work_app.command("show")
def work_show(
    work_id: str, config: ConfigOpt = None, url: UrlOpt = None, as_json: JsonOpt = False
) -> None:
    """One work item: state, lease, steps and history."""
    client = ApiClient(_settings(config), url)
    w = client.call("GET", f"/api/v1/work/{work_id}")
    if as_json:
        _print_json(w)
        return
    out.print(f"[bold]{w['id']}[/]  agent={w['agent']}  state=[bold]{w['state']}[/]")
    out.print(f"attempt {w['attempt']}/{w['max_attempts']}  lease owner={w.get('lease_owner')}")
    if w.get("wait_reason"):
        out.print(f"waiting: {w['wait_reason']}")
    if w.get("error"):
        out.print(f"[red]error:[/] {w['error'].get('type')}: {w['error'].get('message')}")
    if w.get("result") is not None:
        out.print(f"result: {json.dumps(w['result'])[:500]}")
    steps = Table("seq", "name", "status", "attempt", "finished")
    for s in w.get("steps", []):
        finished = (s.get("finished_at") or "")[:19]
        steps.add_row(str(s["seq"]), s["name"], s["status"], str(s["attempt"]), finished)
    out.print(steps)
    events = Table("event", "at", "actor")
    for e in w.get("events", [])[-20:]:
        events.add_row(e["type"], e["created_at"][:23], e.get("actor") or "")
    out.print(events)


def _action(action: str) -> Any:
    def command(
        work_id: str, config: ConfigOpt = None, url: UrlOpt = None, as_json: JsonOpt = False
    ) -> None:
        client = ApiClient(_settings(config), url)
        w = client.call("POST", f"/api/v1/work/{work_id}/{action}", {})
        if as_json:
            _print_json(w)
        else:
            pending = f" ({w['control']} requested)" if w.get("control") else ""
            out.print(f"{w['id']}: {w['state']}{pending}")

    command.__doc__ = f"{action.capitalize()} a work item."
    return command


for _name in ("pause", "resume", "retry", "cancel"):
    work_app.command(_name)(_action(_name))


@work_app.command("start")
def work_start(
    agent: str,
    input: Annotated[str, typer.Option("--input", help="JSON input.")] = "null",
    idempotency_key: Annotated[str | None, typer.Option("--idempotency-key")] = None,
    config: ConfigOpt = None,
    url: UrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Start work for AGENT with a JSON input."""
    try:
        payload = json.loads(input)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"--input is not JSON: {exc}") from None
    client = ApiClient(_settings(config), url)
    body: dict[str, Any] = {"agent": agent, "input": payload}
    if idempotency_key:
        body["idempotency_key"] = idempotency_key
    w = client.call("POST", "/api/v1/work", body)
    if as_json:
        _print_json(w)
    else:
        out.print(f"{w['id']}: {w['state']}")


@work_app.command("restart")
def work_restart(
    work_id: str,
    from_step: Annotated[
        int, typer.Option("--from-step", min=1, help="The first step to run again.")
    ],
    config: ConfigOpt = None,
    url: UrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Fork a work item into a new one that keeps steps 1..N-1 and runs again from step N.
    Prints the new item's id."""
    client = ApiClient(_settings(config), url)
    w = client.call("POST", f"/api/v1/work/{_q(work_id)}/restart", {"from_step": from_step})
    if as_json:
        _print_json(w)
        return
    new = w.get("work", w) if isinstance(w, dict) else {}
    sys.stdout.write(f"{new.get('id')}\n")
    err.print(
        f"restarted {work_id} from step {from_step} as {new.get('id')} ({new.get('state')})",
        highlight=False,
    )


@work_app.command("attach")
def work_attach(
    work_id: str,
    after: Annotated[
        int, typer.Option("--after", min=0, help="Only events after this event id.")
    ] = 0,
    config: ConfigOpt = None,
    url: UrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Follow a work item's events live, from its first one (or --after), until it finishes.

    One line per event: time, type, detail (--json: one JSON object per line). Ctrl-C stops
    (exit 130); the item goes on."""
    client = ApiClient(_settings(config), url)
    try:
        for event in client.events(work_id, after=after):
            if as_json:
                line = json.dumps(event, default=str)
            else:
                at = _clock(event.get("created_at"))
                line = f"{at}  {event.get('type', ''):<16}  {describe_event(event)}"
            sys.stdout.write(line.rstrip() + "\n")
            sys.stdout.flush()
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _clock(stamp: str | None) -> str:
    """``HH:MM:SS.mmm`` in local time."""
    try:
        at = datetime.fromisoformat(stamp or "").astimezone()
    except ValueError:
        return "??:??:??.???"
    return at.strftime("%H:%M:%S.") + f"{at.microsecond // 1000:03d}"


def describe_event(event: dict[str, Any]) -> str:
    """What one history event says, in a line: the transition or the step, and its details."""
    data = event.get("data") if isinstance(event.get("data"), dict) else {}
    parts: list[str] = []
    if "seq" in data:  # a step event
        parts.append(f"#{data['seq']} {data.get('name', '')} (attempt {data.get('attempt', 1)})")
        error = data.get("error")
        if isinstance(error, dict):
            parts.append(f"{error.get('type', 'Error')}: {error.get('message', '')}")
    else:
        if data.get("from") or data.get("to"):
            parts.append(f"{data.get('from') or '-'} -> {data.get('to') or '-'}")
        if data.get("agent"):
            parts.append(f"agent={data['agent']}")
        if event.get("type") in ("claimed", "retried", "lease_expired", "created"):
            parts.append(f"attempt={data.get('attempt')}")
        detail = data.get("detail")
        if isinstance(detail, dict):
            for key, value in detail.items():
                if value is not None and key != "actor":
                    parts.append(f"{key}={value if isinstance(value, str) else json.dumps(value)}")
    if event.get("actor"):
        parts.append(f"by {event['actor']}")
    return "  ".join(parts)[:400]


# -- waits ------------------------------------------------------------------------------------


def _q(text: str) -> str:
    return urllib.parse.quote(text, safe="")


@app.command("approve")
def approve(
    wait_id: Annotated[str, typer.Argument(help="The approval wait's id.")],
    deny: Annotated[bool, typer.Option("--deny", help="Deny instead of approving.")] = False,
    comment: Annotated[str | None, typer.Option("--comment", help="Why.")] = None,
    config: ConfigOpt = None,
    url: UrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Approve (or --deny) a pending approval. Exit 1 if someone decided first."""
    client = ApiClient(_settings(config), url)
    body: dict[str, Any] = {"decision": "deny" if deny else "approve"}
    if comment is not None:
        body["comment"] = comment
    w = client.call("POST", f"/api/v1/waits/{_q(wait_id)}/resolve", body)
    if as_json:
        _print_json(w)
    else:
        verb = "denied" if deny else "approved"
        out.print(f"{w['id']}: {verb}; work {w['work_id']} resumes", highlight=False)


@app.command("signal")
def signal(
    name: Annotated[str, typer.Argument(help="The signal's name.")],
    data: Annotated[str, typer.Option("--data", help="JSON payload.")],
    key: Annotated[str | None, typer.Option("--key", help="The signal's key.")] = None,
    config: ConfigOpt = None,
    url: UrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Send signal NAME (with --key) to whatever waits for it. Exit 3 if nothing waits."""
    try:
        payload = json.loads(data)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"--data is not JSON: {exc}") from None
    client = ApiClient(_settings(config), url)
    result = client.call("POST", f"/api/v1/signals/{_q(name)}", {"key": key, "data": payload})
    if as_json:
        _print_json(result)
    else:
        ids = result["resolved"]
        out.print(f"resolved {len(ids)} wait(s): {', '.join(ids)}", highlight=False)


WAIT_STATES = ("pending", "resolved", "timed_out", "cancelled", "all")


@app.command("waits")
def waits(
    state: Annotated[
        str, typer.Option(help=f"One of {', '.join(WAIT_STATES)}.", show_default=True)
    ] = "pending",
    work: Annotated[str | None, typer.Option("--work", help="Only this work item's.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=500)] = 100,
    config: ConfigOpt = None,
    url: UrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List waits (pending by default): what needs a decision, and until when."""
    if state not in WAIT_STATES:
        raise typer.BadParameter(f"--state must be one of {', '.join(WAIT_STATES)}")
    client = ApiClient(_settings(config), url)
    params: dict[str, Any] = {"limit": limit}
    if state != "all":
        params["state"] = state
    if work:
        params["work_id"] = work
    data = client.call("GET", f"/api/v1/waits?{urllib.parse.urlencode(params)}")
    if as_json:
        _print_json(data["items"])
        return
    table = _table("work", "kind", "prompt / name", "deadline", "state")
    for w in data["items"]:
        label = w.get("prompt") or w.get("name") or ""
        if w.get("key"):
            label += f" [{w['key']}]"
        table.add_row(
            w["id"], w["work_id"], w["kind"], label[:80], (w.get("deadline") or "")[:19],
            w["state"],
        )  # fmt: skip
    out.print(table)


@app.command("workers")
def workers(config: ConfigOpt = None, url: UrlOpt = None, as_json: JsonOpt = False) -> None:
    """Worker processes and when they were last seen."""
    client = ApiClient(_settings(config), url)
    data = client.call("GET", "/api/v1/workers")
    items = data["items"] if isinstance(data, dict) else data
    if as_json:
        _print_json(items)
        return
    table = Table("id", "host", "pid", "state", "slots", "last seen")
    for w in items:
        table.add_row(
            w["id"], w["host"], str(w["pid"]), w["state"], str(w["concurrency"]),
            (w.get("last_seen_at") or "")[:19],
        )  # fmt: skip
    out.print(table)


# -- telegram ---------------------------------------------------------------------------------

TELEGRAM_UPDATES = ["message", "edited_message", "callback_query"]


@telegram_app.command("set-webhook")
def telegram_set_webhook(
    config: ConfigOpt = None,
    max_connections: Annotated[
        int, typer.Option(min=1, max=100, help="Telegram's max_connections for the webhook.")
    ] = 40,
) -> None:
    """Register ``{public_url}/channels/telegram/webhook`` with Telegram (setWebhook), with the
    webhook secret and the update types Tether handles."""
    settings = _settings(config)
    if settings.telegram_token is None:
        err.print("[bold red]tether:[/] TETHER_TELEGRAM_TOKEN is not set", highlight=False)
        raise typer.Exit(EXIT_USAGE)
    secret = settings.telegram_webhook_secret
    if secret is None or not secret.get_secret_value():
        err.print("[bold red]tether:[/] TETHER_TELEGRAM_WEBHOOK_SECRET is not set", highlight=False)
        raise typer.Exit(EXIT_USAGE)
    url = f"{settings.effective_public_url.rstrip('/')}/channels/telegram/webhook"

    async def register() -> None:
        from adapters.telegram import build_sender

        sender = build_sender(settings)
        try:
            await sender.warm()
            await sender.bot.set_webhook(
                url=url,
                secret_token=secret.get_secret_value(),
                allowed_updates=TELEGRAM_UPDATES,
                max_connections=max_connections,
            )
        finally:
            await sender.close()

    try:
        _run(register())
    except typer.Exit:
        raise
    except Exception as exc:
        err.print(f"[bold red]tether: setWebhook failed:[/] {exc}", highlight=False)
        raise typer.Exit(EXIT_REFUSED) from None
    out.print(f"Telegram webhook set to {url}", highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
