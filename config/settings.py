"""Tether's settings: environment (``TETHER_*``) over a TOML file over defaults.

Use :func:`load_settings`; it resolves the TOML file (argument, else ``TETHER_CONFIG``) and turns
every validation problem into one :class:`SettingsError` whose message has one line per problem,
naming the environment variable or the config file the bad value came from. Secret values never
appear in those messages.
"""

from __future__ import annotations

import difflib
import json
import os
import pathlib
import re
import tomllib
import zoneinfo
from contextvars import ContextVar
from typing import Annotated, Any, Literal, get_args

import pydantic_settings
from apscheduler.triggers.cron import CronTrigger
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

__all__ = ["ScheduleConfig", "Settings", "SettingsError", "WebhookConfig", "load_settings"]

ENV_PREFIX = "TETHER_"
CONFIG_ENV_VAR = "TETHER_CONFIG"

_SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_DB_REWRITES = (
    ("postgresql+asyncpg://", "postgresql+asyncpg://"),
    ("postgresql://", "postgresql+asyncpg://"),
    ("postgres://", "postgresql+asyncpg://"),
    ("sqlite+aiosqlite://", "sqlite+aiosqlite://"),
    ("sqlite://", "sqlite+aiosqlite://"),
)
_FALLBACK_TOKEN_FILE = pathlib.Path("./.tether-operator-token")


class SettingsError(ValueError):
    """Invalid configuration. ``str(error)`` has one line per problem; ``problems`` lists them."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class _Rule(ValueError):
    """A validator failure with a short rule and an optional reason (shown after the value)."""

    def __init__(self, rule: str, why: str | None = None) -> None:
        self.rule = rule
        self.why = why
        super().__init__(rule if why is None else f"{rule}: {why}")


# --------------------------------------------------------------------------------------------
# Webhooks


class WebhookConfig(BaseModel):
    """One inbound webhook served at ``POST /webhooks/{name}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="URL slug: lowercase letters, digits, '-' and '_'.")
    scheme: Literal["standard", "github"] = Field(
        description="Signature scheme: Standard Webhooks or GitHub's X-Hub-Signature-256."
    )
    secret: SecretStr = Field(description="Shared signing secret.")
    agent: str | None = Field(
        default=None, min_length=1, description="Start work on this agent with the payload."
    )
    signal: str | None = Field(
        default=None, min_length=1, description="Resolve wait_for_signal(signal, key=...)."
    )
    key_field: str | None = Field(
        default=None,
        min_length=1,
        description="Payload field whose value is the signal key (required with `signal`).",
    )

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _SLUG.match(value):
            raise _Rule(
                "must be a slug (lowercase letters, digits, '-' and '_', "
                "starting with a letter or digit)"
            )
        return value

    @field_validator("secret")
    @classmethod
    def _check_secret(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value():
            raise _Rule("must not be empty")
        return value

    @model_validator(mode="after")
    def _check_target(self) -> WebhookConfig:
        if (self.agent is None) == (self.signal is None):
            raise _Rule(f"webhook {self.name!r}: set exactly one of 'agent' or 'signal'")
        if self.signal is not None and self.key_field is None:
            raise _Rule(f"webhook {self.name!r}: 'key_field' is required with 'signal'")
        if self.agent is not None and self.key_field is not None:
            raise _Rule(f"webhook {self.name!r}: 'key_field' only applies to 'signal' webhooks")
        return self


# --------------------------------------------------------------------------------------------
# Cron schedules


class ScheduleConfig(BaseModel):
    """One cron schedule: the scheduler starts work on ``agent`` with ``input`` at every fire
    time of ``cron`` (deduplicated on the schedule's name and the fire time)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Unique slug: lowercase letters, digits, '-' and '_'.")
    cron: str = Field(
        description="Standard 5-field crontab expression: minute hour day-of-month month "
        "day-of-week (e.g. '*/15 9-17 * * mon-fri')."
    )
    agent: str = Field(min_length=1, description="Agent that runs at each fire time.")
    input: Any = Field(default=None, description="Input of each run (any JSON value).")
    timezone: str = Field(
        default="UTC", description="IANA time zone the cron expression is read in."
    )

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _SLUG.match(value):
            raise _Rule(
                "must be a slug (lowercase letters, digits, '-' and '_', "
                "starting with a letter or digit)"
            )
        return value

    @field_validator("cron")
    @classmethod
    def _check_cron(cls, value: str, info: ValidationInfo) -> str:
        value = " ".join(value.split())
        try:
            CronTrigger.from_crontab(value, timezone="UTC")
        except ValueError as exc:
            raise _Rule(
                f"{_schedule_label(info)}must be a 5-field crontab expression "
                "(minute hour day-of-month month day-of-week)",
                str(exc),
            ) from None
        return value

    @field_validator("timezone")
    @classmethod
    def _check_timezone(cls, value: str, info: ValidationInfo) -> str:
        value = value.strip()
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise _Rule(
                f"{_schedule_label(info)}must be an IANA time zone name "
                "such as 'UTC' or 'Europe/Berlin'"
            ) from None
        return value


def _schedule_label(info: ValidationInfo) -> str:
    name = (info.data or {}).get("name")
    return f"schedule {name!r}: " if name else ""


# --------------------------------------------------------------------------------------------
# Model prices


class ModelPrice(BaseModel):
    """What one model costs, in USD per million tokens."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: float = Field(ge=0, allow_inf_nan=False, description="USD per 1M input tokens.")
    output: float = Field(ge=0, allow_inf_nan=False, description="USD per 1M output tokens.")


# --------------------------------------------------------------------------------------------
# TOML source

_UNSET: Any = object()
# The TOML file for the Settings() being built right now. load_settings() sets it and resets it
# before returning, so nothing leaks between calls (or between threads/tasks).
_config_file: ContextVar[pathlib.Path | None] = ContextVar("tether_config_file", default=_UNSET)


def _config_file_from_env() -> pathlib.Path | None:
    raw = os.environ.get(CONFIG_ENV_VAR, "").strip()
    return pathlib.Path(raw).expanduser() if raw else None


class _TomlSource(TomlConfigSettingsSource):
    """``TomlConfigSettingsSource`` that fails loudly: missing, unreadable or invalid files."""

    def __init__(self, settings_cls: type[BaseSettings], toml_file: pathlib.Path | None) -> None:
        if toml_file is not None and not toml_file.exists():
            raise SettingsError(f"config file {toml_file}: not found")
        if toml_file is not None and not toml_file.is_file():
            raise SettingsError(f"config file {toml_file}: not a regular file")
        super().__init__(settings_cls, toml_file=toml_file)

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        try:
            with open(file_path, "rb") as fh:
                return tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"config file {file_path}: invalid TOML: {exc}") from None
        except UnicodeDecodeError as exc:
            raise SettingsError(
                f"config file {file_path}: not valid UTF-8 (byte {exc.start})"
            ) from None
        except OSError as exc:
            raise SettingsError(
                f"config file {file_path}: cannot read: {exc.strerror or exc}"
            ) from None


# --------------------------------------------------------------------------------------------
# Settings


def _positive_float(description: str, default: float) -> Any:
    return Field(default=default, gt=0, allow_inf_nan=False, description=description)


class Settings(BaseSettings):
    """Everything Tether reads from ``TETHER_*`` variables and the TOML config file."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        case_sensitive=False,
        extra="forbid",
        env_ignore_empty=True,
        validate_default=True,
    )

    database_url: str = Field(
        default="sqlite+aiosqlite:///./tether.db",
        description="SQLAlchemy URL: sqlite+aiosqlite:///PATH or postgresql+asyncpg://...",
    )
    host: str = Field(default="127.0.0.1", min_length=1, description="Gateway bind address.")
    port: int = Field(default=8080, ge=1, le=65535, description="Gateway bind port.")
    public_url: str | None = Field(
        default=None,
        description="External base URL (webhook registration, resume links); "
        "default http://HOST:PORT.",
    )
    operator_token: SecretStr | None = Field(
        default=None,
        description="Bearer token for /api/* and the console; unset: generated on first start "
        "and kept in operator_token_file().",
    )

    telegram_token: SecretStr | None = Field(
        default=None, description="Telegram bot token; unset = channel off."
    )
    telegram_webhook_secret: SecretStr | None = Field(
        default=None, description="Expected X-Telegram-Bot-Api-Secret-Token."
    )
    telegram_api_base: str = Field(
        default="https://api.telegram.org", description="Telegram Bot API base URL."
    )
    telegram_mode: Literal["webhook", "polling"] = Field(
        default="webhook", description="How Telegram updates arrive."
    )

    slack_bot_token: SecretStr | None = Field(
        default=None, description="Slack bot token (xoxb-...); unset = channel off."
    )
    slack_signing_secret: SecretStr | None = Field(
        default=None, description="Slack signing secret (v0 request signatures)."
    )
    slack_api_base: str = Field(
        default="https://slack.com/api/",
        description="Slack Web API base URL (always ends with '/').",
    )

    webhooks: Annotated[list[WebhookConfig], NoDecode] = Field(
        default_factory=list,
        description="Inbound webhooks: a JSON list in TETHER_WEBHOOKS, [[webhooks]] in TOML.",
    )
    schedules: Annotated[list[ScheduleConfig], NoDecode] = Field(
        default_factory=list,
        description="Cron schedules that start work: a JSON list in TETHER_SCHEDULES, "
        "[[schedules]] in TOML.",
    )
    agent_modules: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["worker.agents"],
        description="Modules workers import to register @agent functions "
        "(comma-separated in the environment).",
    )
    default_agent: str = Field(
        default="demo", min_length=1, description="Agent that handles chat messages starting work."
    )

    model_base_url: str = Field(
        default="https://api.openai.com/v1",
        description="Base URL of an OpenAI-compatible chat-completions API (OpenAI, vLLM, "
        "Ollama, llama.cpp server ...), up to and including /v1.",
    )
    model_api_key: SecretStr | None = Field(
        default=None, description="API key for the model endpoint (unset: none is sent)."
    )
    model: str = Field(
        default="gpt-4o-mini", min_length=1, description="Model the built-in llm agent asks."
    )
    model_prices: Annotated[dict[str, ModelPrice], NoDecode] = Field(
        default_factory=dict,
        description='Prices per model, a JSON object {"model": {"input": usd_per_1M, '
        '"output": usd_per_1M}}; [model_prices."name"] tables in TOML. A model without a '
        "price gets cost null (and a warning).",
    )
    model_timeout: float = _positive_float("Seconds one model request may take.", 120.0)
    model_max_retries: int = Field(
        default=5, ge=0, le=100, description="Retries of a rate-limited (429) or 5xx model call."
    )
    budget_per_work: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="USD one work item may spend on model calls before an operator must "
        "approve more (unset: unlimited).",
    )
    budget_per_conversation: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="USD one conversation may spend on model calls before an operator must "
        "approve more (unset: unlimited).",
    )

    lease_ttl: float = Field(
        default=30.0,
        allow_inf_nan=False,
        description="Seconds a claimed work item stays leased without renewal.",
    )
    worker_concurrency: int = Field(
        default=8, ge=1, le=1000, description="Work items one worker process runs at once."
    )
    poll_interval: float = _positive_float(
        "Seconds between polls of an idle worker when no wake-up arrives.", 1.0
    )
    reaper_interval: float = _positive_float(
        "Seconds between the scheduler's sweeps for expired leases.", 2.0
    )
    group_commit_ms: float = Field(
        default=5.0,
        ge=0,
        le=10_000,
        allow_inf_nan=False,
        description="Group commit: the longest (milliseconds) a step record of a `batched` "
        "step waits before its transaction commits.",
    )
    group_commit_max: int = Field(
        default=500,
        ge=1,
        le=100_000,
        description="Group commit: the most step records one transaction commits.",
    )
    max_attempts: int = Field(default=5, ge=1, description="Default attempts per work item.")
    sqlite_synchronous: Literal["FULL", "NORMAL"] = Field(
        default="FULL", description="SQLite PRAGMA synchronous."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Log level."
    )
    log_format: Literal["text", "json"] = Field(
        default="text", description="Log lines as text (with work=<id>) or one JSON object each."
    )

    # ---- sources ------------------------------------------------------------------------

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = _config_file.get()
        if toml_file is _UNSET:
            toml_file = _config_file_from_env()
        return init_settings, env_settings, _TomlSource(settings_cls, toml_file)

    # ---- validators ---------------------------------------------------------------------

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        value = value.strip()
        for prefix, replacement in _DB_REWRITES:
            if value.startswith(prefix):
                return replacement + value[len(prefix) :]
        scheme = value.split("://", 1)[0] if "://" in value else None
        # Never echo the URL: it may carry a password.
        raise _Rule(
            "must start with sqlite+aiosqlite:// or postgresql+asyncpg://"
            + (f" (got a {scheme}:// URL)" if scheme and len(scheme) < 40 else "")
        )

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip()
        if not value.startswith(("http://", "https://")):
            raise _Rule("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("telegram_api_base", "slack_api_base")
    @classmethod
    def _check_api_base(cls, value: str, info: Any) -> str:
        value = value.strip()
        if not value.startswith(("http://", "https://")):
            raise _Rule("must start with http:// or https://")
        if info.field_name == "slack_api_base" and not value.endswith("/"):
            value += "/"  # slack_sdk joins URLs with urljoin: the trailing slash matters
        return value

    @field_validator("slack_bot_token", "slack_signing_secret")
    @classmethod
    def _check_slack_pair(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            value = None  # blank = unset
        if info.field_name != "slack_signing_secret" or "slack_bot_token" not in info.data:
            return value
        token = info.data["slack_bot_token"]
        if (token is None) != (value is None):
            given, missing = (
                ("TETHER_SLACK_BOT_TOKEN", "TETHER_SLACK_SIGNING_SECRET")
                if value is None
                else ("TETHER_SLACK_SIGNING_SECRET", "TETHER_SLACK_BOT_TOKEN")
            )
            raise _Rule(
                f"{given} is set but {missing} is not",
                "the Slack channel needs both (set both to turn it on, neither to leave it off)",
            )
        return value

    @field_validator("model_base_url")
    @classmethod
    def _check_model_base_url(cls, value: str) -> str:
        value = value.strip()
        if not value.startswith(("http://", "https://")):
            raise _Rule("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("model_prices", mode="before")
    @classmethod
    def _decode_prices(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise _Rule(
                    'must be a JSON object {"model": {"input": usd_per_1M, "output": '
                    f"usd_per_1M}}}} ({exc})"
                ) from None
        if not isinstance(value, dict):
            raise _Rule('must be an object {"model": {"input": usd_per_1M, "output": usd_per_1M}}')
        return value

    @field_validator(
        "telegram_mode", "log_level", "log_format", "sqlite_synchronous", mode="before"
    )
    @classmethod
    def _normalise_case(cls, value: Any, info: Any) -> Any:
        # Case-insensitive choices; an unknown value is left as given for the error message.
        if isinstance(value, str):
            choices = get_args(cls.model_fields[info.field_name].annotation)
            for choice in choices:
                if value.strip().lower() == choice.lower():
                    return choice
        return value

    @field_validator("agent_modules", mode="before")
    @classmethod
    def _split_modules(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, list | tuple):
            value = [v.strip() if isinstance(v, str) else v for v in value]
            value = [v for v in value if v != ""]
        return value

    @field_validator("agent_modules")
    @classmethod
    def _check_modules(cls, value: list[str]) -> list[str]:
        bad = [m for m in value if not _MODULE.match(m)]
        if bad:
            raise _Rule(f"not a dotted module name: {', '.join(repr(m) for m in bad)}")
        return value

    @field_validator("webhooks", "schedules", mode="before")
    @classmethod
    def _decode_json_list(cls, value: Any, info: ValidationInfo) -> Any:
        what = "webhook" if info.field_name == "webhooks" else "schedule"
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                # The message names a position, never the content.
                raise _Rule(f"must be a JSON list of {what} objects ({exc})") from None
        if isinstance(value, dict):
            raise _Rule(f"must be a list of {what} objects, not a single object")
        return value

    @field_validator("webhooks")
    @classmethod
    def _unique_webhooks(cls, value: list[WebhookConfig]) -> list[WebhookConfig]:
        seen: set[str] = set()
        dupes: list[str] = []
        for hook in value:
            if hook.name in seen and hook.name not in dupes:
                dupes.append(hook.name)
            seen.add(hook.name)
        if dupes:
            raise _Rule(f"duplicate webhook name(s): {', '.join(repr(d) for d in dupes)}")
        return value

    @field_validator("schedules")
    @classmethod
    def _unique_schedules(cls, value: list[ScheduleConfig]) -> list[ScheduleConfig]:
        seen: set[str] = set()
        dupes: list[str] = []
        for schedule in value:
            if schedule.name in seen and schedule.name not in dupes:
                dupes.append(schedule.name)
            seen.add(schedule.name)
        if dupes:
            raise _Rule(f"duplicate schedule name(s): {', '.join(repr(d) for d in dupes)}")
        return value

    @field_validator("lease_ttl")
    @classmethod
    def _check_lease_ttl(cls, value: float) -> float:
        if value < 1.0:
            raise _Rule(
                "must be at least 1.0",
                "a worker renews its lease several times per TTL and needs headroom for a slow "
                "database round-trip, or its work is reclaimed while still running",
            )
        return value

    # ---- derived ------------------------------------------------------------------------

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite+aiosqlite://")

    @property
    def effective_public_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"http://{host}:{self.port}"

    def operator_token_file(self) -> pathlib.Path:
        """Where a generated operator token is kept: beside the SQLite file, else ./ ."""
        if not self.is_sqlite:
            return _FALLBACK_TOKEN_FILE
        rest = self.database_url[len("sqlite+aiosqlite://") :].split("?", 1)[0]
        path = rest[1:] if rest.startswith("/") else ""
        if path.startswith("file:"):
            path = path[len("file:") :]
        if not path or path == ":memory:":
            return _FALLBACK_TOKEN_FILE
        return pathlib.Path(path + ".operator-token")


# --------------------------------------------------------------------------------------------
# Loading and error reporting

# Fields whose values never appear in error messages (database_url may carry a password).
_SECRET_FIELDS = frozenset(
    {
        "database_url",
        "operator_token",
        "telegram_token",
        "telegram_webhook_secret",
        "slack_bot_token",
        "slack_signing_secret",
        "model_api_key",
    }
)
_WEBHOOK_ECHO = frozenset({"name", "scheme", "agent", "signal", "key_field"})
#: Per list-of-tables setting: its model (for "did you mean") and the keys whose values may be
#: echoed in error messages.
_TABLES: dict[str, tuple[type[BaseModel], frozenset[str]]] = {
    "webhooks": (WebhookConfig, _WEBHOOK_ECHO),
    "schedules": (ScheduleConfig, frozenset({"name", "cron", "agent", "timezone"})),
}


def _env_lookup() -> dict[str, str]:
    """Lower-cased TETHER_* name -> actual variable name, for non-empty variables."""
    return {
        k.lower(): k
        for k, v in os.environ.items()
        if k.upper().startswith(ENV_PREFIX) and v.strip() != ""
    }


def _show(value: Any) -> str | None:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        if value == "" or value != value.strip() or " " in value or len(value) > 60:
            return repr(value[:60] + ("..." if len(value) > 60 else ""))
        return value
    return None


def _describe(err: dict[str, Any]) -> tuple[str, str | None]:
    """(rule, reason) in plain words for one pydantic error."""
    exc = (err.get("ctx") or {}).get("error")
    if isinstance(exc, _Rule):
        return exc.rule, exc.why
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "greater_than":
        return f"must be greater than {ctx['gt']}", None
    if kind == "greater_than_equal":
        return f"must be at least {ctx['ge']}", None
    if kind == "less_than":
        return f"must be less than {ctx['lt']}", None
    if kind == "less_than_equal":
        return f"must be at most {ctx['le']}", None
    if kind == "missing":
        return "is required", None
    if kind == "string_too_short":
        return "must not be empty", None
    msg = str(err["msg"])
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if msg.startswith("Input should be "):
        msg = "must be " + msg[len("Input should be ") :]
    return msg, None


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _suggest(key: str, model: type[BaseModel] | None = None) -> str:
    candidate = key.lower().removeprefix(ENV_PREFIX.lower())
    names = list((model or Settings).model_fields)
    close = difflib.get_close_matches(candidate, names, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _problems(
    exc: ValidationError, overrides: dict[str, Any], config_file: pathlib.Path | None
) -> list[str]:
    env = _env_lookup()
    lines: list[str] = []
    for err in exc.errors(include_url=False, include_input=True):
        loc = tuple(err["loc"])
        field = str(loc[0]) if loc else ""
        rest = _format_loc(loc[1:]) if len(loc) > 1 else ""
        rest = rest if not rest or rest.startswith("[") else "." + rest
        top_level_extra = err["type"] == "extra_forbidden" and len(loc) == 1

        if field in overrides:
            where = f"{field}{rest}"
        elif not top_level_extra and (ENV_PREFIX + field).lower() in env:
            where = f"{env[(ENV_PREFIX + field).lower()]}{rest}"
        elif config_file is not None:
            where = f"config file {config_file}: {field}{rest}"
        else:
            where = f"{field}{rest}" or "settings"

        if err["type"] == "extra_forbidden" and not top_level_extra:
            model = _TABLES[field][0] if field in _TABLES else None
            lines.append(f"{where}: unknown key{_suggest(str(loc[-1]), model)}")
            continue
        if top_level_extra:
            if field in overrides:
                lines.append(f"{field}: unknown setting{_suggest(field)}")
            else:
                prefix = f"config file {config_file}: " if config_file is not None else ""
                lines.append(f"{prefix}unknown setting {field!r}{_suggest(field)}")
            continue

        rule, why = _describe(err)
        shown: str | None = None
        echo_ok = field not in _SECRET_FIELDS and (
            field not in _TABLES or (len(loc) == 3 and loc[2] in _TABLES[field][1])
        )
        if echo_ok and "input" in err:
            shown = _show(err["input"])
        line = f"{where}: {rule}"
        if shown is not None:
            line += f" (got {shown})"
        if why:
            line += f": {why}"
        lines.append(line)
    return lines or ["invalid settings"]


def load_settings(config_file: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Build :class:`Settings` from ``overrides`` > environment > TOML file > defaults.

    The TOML file is ``config_file`` if given, else ``$TETHER_CONFIG`` if set, else none.
    Overrides whose value is ``None`` are ignored (handy for optional CLI flags).
    Raises :class:`SettingsError` (one line per problem) on anything invalid.
    """
    path: pathlib.Path | None
    if config_file is not None and str(config_file).strip():
        path = pathlib.Path(config_file).expanduser()
    else:
        path = _config_file_from_env()
    given = {k: v for k, v in overrides.items() if v is not None}

    token = _config_file.set(path)
    try:
        return Settings(**given)
    except ValidationError as exc:
        raise SettingsError(_problems(exc, given, path)) from None
    except pydantic_settings.SettingsError as exc:
        raise SettingsError(str(exc)) from None
    finally:
        _config_file.reset(token)
