"""Settings: defaults, environment, TOML, validation and error messages (no mocks)."""

from __future__ import annotations

import os
import pathlib

import pytest

from config import Settings, SettingsError, WebhookConfig, load_settings
from config.settings import ScheduleConfig

REPO = pathlib.Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "config" / "tether.example.toml"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start every test with no TETHER_* variables, whatever the caller's shell has."""
    for name in list(os.environ):
        if name.upper().startswith("TETHER_"):
            monkeypatch.delenv(name)


def write(tmp_path: pathlib.Path, text: str, name: str = "tether.toml") -> pathlib.Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problem(**kwargs) -> str:
    config_file = kwargs.pop("config_file", None)
    with pytest.raises(SettingsError) as info:
        load_settings(config_file, **kwargs)
    assert isinstance(info.value, ValueError)
    return str(info.value)


# ---- defaults and sources ---------------------------------------------------------------------


def test_defaults() -> None:
    s = load_settings()
    assert s.database_url == "sqlite+aiosqlite:///./tether.db"
    assert s.is_sqlite
    assert (s.host, s.port) == ("127.0.0.1", 8080)
    assert s.public_url is None
    assert s.effective_public_url == "http://127.0.0.1:8080"
    assert s.operator_token is None
    assert s.telegram_token is None and s.telegram_webhook_secret is None
    assert s.telegram_api_base == "https://api.telegram.org"
    assert s.telegram_mode == "webhook"
    assert s.slack_bot_token is None and s.slack_signing_secret is None
    assert s.slack_api_base == "https://slack.com/api/"
    assert s.webhooks == []
    assert s.schedules == []
    assert s.agent_modules == ["worker.agents"]
    assert s.default_agent == "demo"
    assert s.lease_ttl == 30.0
    assert s.worker_concurrency == 8
    assert s.poll_interval == 1.0
    assert s.reaper_interval == 2.0
    assert s.max_attempts == 5
    assert s.sqlite_synchronous == "FULL"
    assert s.log_level == "INFO"


def test_defaults_are_not_shared_between_instances() -> None:
    a, b = load_settings(), load_settings()
    a.agent_modules.append("x.y")
    assert b.agent_modules == ["worker.agents"]


def test_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_DATABASE_URL", "postgresql+asyncpg://u:p@db:5432/tether")
    monkeypatch.setenv("TETHER_HOST", "0.0.0.0")
    monkeypatch.setenv("TETHER_PORT", "9090")
    monkeypatch.setenv("TETHER_PUBLIC_URL", "https://tether.example.com/")
    monkeypatch.setenv("TETHER_OPERATOR_TOKEN", "op-token")
    monkeypatch.setenv("TETHER_TELEGRAM_TOKEN", "123:abc")
    monkeypatch.setenv("TETHER_TELEGRAM_MODE", "Polling")
    monkeypatch.setenv("TETHER_SLACK_API_BASE", "http://127.0.0.1:1234/api")
    monkeypatch.setenv("TETHER_LEASE_TTL", "2.5")
    monkeypatch.setenv("TETHER_WORKER_CONCURRENCY", "3")
    monkeypatch.setenv("TETHER_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("TETHER_SQLITE_SYNCHRONOUS", "normal")
    monkeypatch.setenv("tether_log_level", "debug")  # names and choices are case-insensitive
    s = load_settings()
    assert s.database_url == "postgresql+asyncpg://u:p@db:5432/tether"
    assert not s.is_sqlite
    assert (s.host, s.port) == ("0.0.0.0", 9090)
    assert s.effective_public_url == "https://tether.example.com"
    assert s.operator_token is not None
    assert s.operator_token.get_secret_value() == "op-token"
    assert s.telegram_token is not None
    assert s.telegram_token.get_secret_value() == "123:abc"
    assert s.telegram_mode == "polling"
    assert s.slack_api_base == "http://127.0.0.1:1234/api/"
    assert s.lease_ttl == 2.5
    assert s.worker_concurrency == 3
    assert s.max_attempts == 1
    assert s.sqlite_synchronous == "NORMAL"
    assert s.log_level == "DEBUG"


def test_empty_env_var_means_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_PORT", "")
    monkeypatch.setenv("TETHER_OPERATOR_TOKEN", "")
    s = load_settings()
    assert s.port == 8080
    assert s.operator_token is None


def test_unrelated_tether_env_vars_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_REQUIRE_POSTGRES", "1")
    assert load_settings().port == 8080


def test_slack_needs_both_token_and_signing_secret(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    s = load_settings(slack_bot_token="xoxb-1-secret-token", slack_signing_secret="sig-secret")
    assert s.slack_bot_token is not None and s.slack_signing_secret is not None
    assert s.slack_bot_token.get_secret_value() == "xoxb-1-secret-token"
    msg = problem(slack_bot_token="xoxb-1-secret-token")
    assert "TETHER_SLACK_BOT_TOKEN is set but TETHER_SLACK_SIGNING_SECRET is not" in msg
    assert "xoxb-1-secret-token" not in msg
    msg = problem(slack_signing_secret="sig-secret")
    assert "TETHER_SLACK_SIGNING_SECRET is set but TETHER_SLACK_BOT_TOKEN is not" in msg
    assert "sig-secret" not in msg
    monkeypatch.setenv("TETHER_SLACK_BOT_TOKEN", "xoxb-env-token")
    assert "TETHER_SLACK_SIGNING_SECRET is not" in problem()
    monkeypatch.delenv("TETHER_SLACK_BOT_TOKEN")
    # blank values mean unset: the channel is simply off
    path = write(tmp_path, 'slack_bot_token = ""\nslack_signing_secret = "  "\n')
    s = load_settings(path)
    assert s.slack_bot_token is None and s.slack_signing_secret is None


def test_toml_file(tmp_path: pathlib.Path) -> None:
    path = write(
        tmp_path,
        """
database_url = "sqlite:///data/t.db"
port = 9000
lease_ttl = 10
agent_modules = ["my.agents", "other.agents"]
log_level = "warning"

[[webhooks]]
name = "gh"
scheme = "github"
secret = "s"
agent = "triage"
""",
    )
    s = load_settings(path)
    assert s.database_url == "sqlite+aiosqlite:///data/t.db"
    assert s.port == 9000
    assert s.lease_ttl == 10.0
    assert s.agent_modules == ["my.agents", "other.agents"]
    assert s.log_level == "WARNING"
    assert [w.name for w in s.webhooks] == ["gh"]
    assert s.webhooks[0].agent == "triage" and s.webhooks[0].signal is None
    assert s.webhooks[0].secret.get_secret_value() == "s"


def test_toml_file_from_tether_config(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TETHER_CONFIG", str(write(tmp_path, "port = 7000\n")))
    assert load_settings().port == 7000
    # An explicit argument beats TETHER_CONFIG.
    assert load_settings(write(tmp_path, "port = 7001\n", "other.toml")).port == 7001


def test_env_beats_toml_and_overrides_beat_env(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, 'port = 9000\nlease_ttl = 10\ndefault_agent = "from-toml"\n')
    monkeypatch.setenv("TETHER_PORT", "9100")
    monkeypatch.setenv("TETHER_DEFAULT_AGENT", "from-env")
    s = load_settings(path, default_agent="from-kwargs")
    assert s.port == 9100  # env over TOML
    assert s.lease_ttl == 10.0  # TOML over default
    assert s.default_agent == "from-kwargs"  # overrides over env
    # None overrides mean "not given".
    assert load_settings(path, port=None).port == 9100


def test_no_state_leaks_between_calls(tmp_path: pathlib.Path) -> None:
    assert load_settings(write(tmp_path, "port = 9000\n")).port == 9000
    assert load_settings().port == 8080
    assert Settings().port == 8080


def test_settings_constructor_reads_tether_config(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TETHER_CONFIG", str(write(tmp_path, "port = 7002\n")))
    assert Settings().port == 7002


def test_agent_modules_comma_separated(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TETHER_AGENT_MODULES", "a.b, c.d,,e")
    assert load_settings().agent_modules == ["a.b", "c.d", "e"]
    monkeypatch.delenv("TETHER_AGENT_MODULES")
    path = write(tmp_path, 'agent_modules = "x.y,z"\n')
    assert load_settings(path).agent_modules == ["x.y", "z"]
    assert load_settings(agent_modules="p.q").agent_modules == ["p.q"]


def test_bad_agent_module_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_AGENT_MODULES", "ok.mod,not a module")
    msg = problem()
    assert msg.startswith("TETHER_AGENT_MODULES:")
    assert "'not a module'" in msg


# ---- database URL -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("sqlite+aiosqlite:///./x.db", "sqlite+aiosqlite:///./x.db"),
        ("sqlite:///./x.db", "sqlite+aiosqlite:///./x.db"),
        ("postgresql+asyncpg://u:p@h/db", "postgresql+asyncpg://u:p@h/db"),
        ("postgresql://u:p@h/db", "postgresql+asyncpg://u:p@h/db"),
        ("postgres://u:p@h:5433/db", "postgresql+asyncpg://u:p@h:5433/db"),
    ],
)
def test_database_url_normalised(given: str, expected: str) -> None:
    assert load_settings(database_url=given).database_url == expected


def test_bad_database_url_names_variable_and_hides_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TETHER_DATABASE_URL", "mysql://root:hunter2@db/tether")
    msg = problem()
    assert msg.startswith("TETHER_DATABASE_URL:")
    assert "sqlite+aiosqlite://" in msg and "postgresql+asyncpg://" in msg
    assert "hunter2" not in msg


# ---- operator token file ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite+aiosqlite:///./tether.db", "./tether.db.operator-token"),
        ("sqlite+aiosqlite:///data/t.db?mode=rwc", "data/t.db.operator-token"),
        ("sqlite+aiosqlite:////var/lib/tether/t.db", "/var/lib/tether/t.db.operator-token"),
        ("sqlite+aiosqlite:///:memory:", "./.tether-operator-token"),
        ("sqlite+aiosqlite://", "./.tether-operator-token"),
        ("postgresql+asyncpg://u:p@h/db", "./.tether-operator-token"),
    ],
)
def test_operator_token_file(url: str, expected: str) -> None:
    assert load_settings(database_url=url).operator_token_file() == pathlib.Path(expected)


# ---- public URL -------------------------------------------------------------------------------


def test_effective_public_url() -> None:
    assert load_settings(port=9999).effective_public_url == "http://127.0.0.1:9999"
    assert load_settings(host="::1").effective_public_url == "http://[::1]:8080"
    s = load_settings(public_url="https://x.example/tether/")
    assert s.effective_public_url == "https://x.example/tether"
    assert "public_url" in problem(public_url="x.example")


# ---- webhooks ---------------------------------------------------------------------------------


def test_webhooks_from_env_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "TETHER_WEBHOOKS",
        '[{"name": "pay", "scheme": "standard", "secret": "whsec_x", '
        '"signal": "payment", "key_field": "order_id"}]',
    )
    (hook,) = load_settings().webhooks
    assert isinstance(hook, WebhookConfig)
    assert (hook.name, hook.scheme, hook.signal, hook.key_field) == (
        "pay",
        "standard",
        "payment",
        "order_id",
    )
    assert hook.agent is None


def test_webhooks_env_invalid_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_WEBHOOKS", '[{"name": "x", "secret": "topsecret-json"')
    msg = problem()
    assert msg.startswith("TETHER_WEBHOOKS:")
    assert "JSON" in msg
    assert "topsecret-json" not in msg


def test_webhook_agent_and_signal_both_set(tmp_path: pathlib.Path) -> None:
    path = write(
        tmp_path,
        '[[webhooks]]\nname = "both"\nscheme = "github"\nsecret = "s"\n'
        'agent = "a"\nsignal = "b"\nkey_field = "id"\n',
    )
    msg = problem(config_file=path)
    assert f"config file {path}: webhooks[0]" in msg
    assert "exactly one of 'agent' or 'signal'" in msg


def test_webhook_neither_agent_nor_signal() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        WebhookConfig(name="x", scheme="github", secret="s")


def test_webhook_signal_without_key_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "TETHER_WEBHOOKS", '[{"name": "pay", "scheme": "standard", "secret": "s", "signal": "p"}]'
    )
    msg = problem()
    assert msg.startswith("TETHER_WEBHOOKS[0]:")
    assert "'key_field' is required" in msg


def test_webhook_duplicate_names(tmp_path: pathlib.Path) -> None:
    hook = '[[webhooks]]\nname = "dup"\nscheme = "github"\nsecret = "s"\nagent = "a"\n'
    path = write(tmp_path, hook + hook)
    msg = problem(config_file=path)
    assert f"config file {path}: webhooks" in msg
    assert "duplicate" in msg and "'dup'" in msg


def test_webhook_bad_name_and_scheme(tmp_path: pathlib.Path) -> None:
    path = write(
        tmp_path,
        '[[webhooks]]\nname = "Not A Slug"\nscheme = "gitlab"\nsecret = "s"\nagent = "a"\n',
    )
    lines = problem(config_file=path).splitlines()
    assert len(lines) == 2
    assert any("webhooks[0].name" in line and "slug" in line for line in lines)
    assert any("webhooks[0].scheme" in line and "gitlab" in line for line in lines)


def test_webhook_secret_never_echoed(tmp_path: pathlib.Path) -> None:
    # Unknown key in a webhook table (typo), plus a bad type for the secret itself.
    path = write(
        tmp_path,
        '[[webhooks]]\nname = "w"\nscheme = "github"\nsecret = "s3cr3t-value"\n'
        'agnet = "a"\nsignal = "sig"\nkey_field = "k"\n'
        '[[webhooks]]\nname = "v"\nscheme = "github"\nsecret = 424242\nagent = \'a\'\n',
    )
    msg = problem(config_file=path)
    assert "webhooks[0].agnet: unknown key (did you mean 'agent'?)" in msg
    assert "webhooks[1].secret" in msg
    assert "s3cr3t-value" not in msg and "424242" not in msg


# ---- cron schedules ---------------------------------------------------------------------------


def test_schedules_from_env_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "TETHER_SCHEDULES",
        '[{"name": "nightly", "cron": "0  3 * * *", "agent": "report", "input": {"k": [1]}},'
        ' {"name": "berlin", "cron": "*/15 9-17 * * mon-fri", "agent": "ping",'
        ' "timezone": "Europe/Berlin"}]',
    )
    nightly, berlin = load_settings().schedules
    assert isinstance(nightly, ScheduleConfig)
    assert (nightly.name, nightly.cron, nightly.agent) == ("nightly", "0 3 * * *", "report")
    assert nightly.input == {"k": [1]} and nightly.timezone == "UTC"
    assert (berlin.cron, berlin.timezone, berlin.input) == (
        "*/15 9-17 * * mon-fri",
        "Europe/Berlin",
        None,
    )


def test_schedules_from_toml(tmp_path: pathlib.Path) -> None:
    path = write(
        tmp_path,
        '[[schedules]]\nname = "hourly"\ncron = "5 * * * *"\nagent = "a"\n'
        'input = { text = "hi", n = 2 }\n'
        '[[schedules]]\nname = "daily"\ncron = "0 0 * * *"\nagent = "b"\n'
        'timezone = "America/New_York"\n',
    )
    hourly, daily = load_settings(path).schedules
    assert (hourly.name, hourly.input) == ("hourly", {"text": "hi", "n": 2})
    assert (daily.name, daily.timezone) == ("daily", "America/New_York")


@pytest.mark.parametrize(
    ("cron", "why"),
    [
        ("0 0 * * * *", "got 6, expected 5"),  # a seconds field is not standard crontab
        ("* * * *", "got 4, expected 5"),
        ("61 * * * *", "61"),
        ("0 0 * * funday", "funday"),
    ],
)
def test_schedule_bad_cron(monkeypatch: pytest.MonkeyPatch, cron: str, why: str) -> None:
    monkeypatch.setenv(
        "TETHER_SCHEDULES", f'[{{"name": "nightly", "cron": "{cron}", "agent": "a"}}]'
    )
    msg = problem()
    assert msg.startswith("TETHER_SCHEDULES[0].cron: schedule 'nightly': must be a 5-field")
    assert why in msg and len(msg.splitlines()) == 1


def test_schedule_bad_cron_in_toml(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, '[[schedules]]\nname = "x"\ncron = "every day"\nagent = "a"\n')
    msg = problem(config_file=path)
    assert msg.startswith(f"config file {path}: schedules[0].cron: schedule 'x': must be")
    assert "'every day'" in msg


def test_schedule_duplicate_names(tmp_path: pathlib.Path) -> None:
    one = '[[schedules]]\nname = "dup"\ncron = "* * * * *"\nagent = "a"\n'
    path = write(tmp_path, one + one + one.replace("dup", "ok"))
    msg = problem(config_file=path)
    assert msg == f"config file {path}: schedules: duplicate schedule name(s): 'dup'"


def test_schedule_bad_timezone_name_and_unknown_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "TETHER_SCHEDULES",
        '[{"name": "tz", "cron": "* * * * *", "agent": "a", "timezone": "Mars/Olympus"},'
        ' {"name": "Nightly Run", "cron": "* * * * *", "agent": "a", "agnet": "b"}]',
    )
    lines = problem().splitlines()
    assert lines == [
        "TETHER_SCHEDULES[0].timezone: schedule 'tz': must be an IANA time zone name such as "
        "'UTC' or 'Europe/Berlin' (got Mars/Olympus)",
        "TETHER_SCHEDULES[1].name: must be a slug (lowercase letters, digits, '-' and '_', "
        "starting with a letter or digit) (got 'Nightly Run')",
        "TETHER_SCHEDULES[1].agnet: unknown key (did you mean 'agent'?)",
    ]


def test_schedules_env_must_be_a_json_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_SCHEDULES", '{"name": "x", "cron": "* * * * *", "agent": "a"}')
    assert problem() == (
        "TETHER_SCHEDULES: must be a list of schedule objects, not a single object"
    )
    monkeypatch.setenv("TETHER_SCHEDULES", "[{")
    assert problem().startswith("TETHER_SCHEDULES: must be a JSON list of schedule objects")


def test_schedule_missing_fields() -> None:
    with pytest.raises(ValueError, match="agent"):
        ScheduleConfig(name="x", cron="* * * * *")  # type: ignore[call-arg]


# ---- validation errors name the variable or the file -------------------------------------------


def test_bad_lease_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_LEASE_TTL", "-1")
    msg = problem()
    assert msg.startswith("TETHER_LEASE_TTL: must be at least 1.0 (got -1)")
    assert "headroom" in msg
    monkeypatch.setenv("TETHER_LEASE_TTL", "0.5")
    assert problem().startswith("TETHER_LEASE_TTL: must be at least 1.0 (got 0.5)")
    monkeypatch.setenv("TETHER_LEASE_TTL", "nan")
    assert problem().startswith("TETHER_LEASE_TTL:")


def test_bad_port(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    monkeypatch.setenv("TETHER_PORT", "70000")
    assert problem() == "TETHER_PORT: must be at most 65535 (got 70000)"
    monkeypatch.setenv("TETHER_PORT", "http")
    assert problem().startswith("TETHER_PORT: must be a valid integer")
    monkeypatch.delenv("TETHER_PORT")
    path = write(tmp_path, "port = 0\n")
    assert problem(config_file=path) == f"config file {path}: port: must be at least 1 (got 0)"
    assert problem(port=-5) == "port: must be at least 1 (got -5)"


def test_other_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_WORKER_CONCURRENCY", "0")
    monkeypatch.setenv("TETHER_POLL_INTERVAL", "0")
    monkeypatch.setenv("TETHER_REAPER_INTERVAL", "-2")
    monkeypatch.setenv("TETHER_MAX_ATTEMPTS", "0")
    monkeypatch.setenv("TETHER_LOG_LEVEL", "verbose")
    monkeypatch.setenv("TETHER_TELEGRAM_MODE", "carrier-pigeon")
    lines = problem().splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "TETHER_TELEGRAM_MODE",
        "TETHER_WORKER_CONCURRENCY",
        "TETHER_POLL_INTERVAL",
        "TETHER_REAPER_INTERVAL",
        "TETHER_MAX_ATTEMPTS",
        "TETHER_LOG_LEVEL",
    ]
    assert "(got verbose)" in lines[-1]
    monkeypatch.setenv("TETHER_WORKER_CONCURRENCY", "1001")
    assert "TETHER_WORKER_CONCURRENCY: must be at most 1000 (got 1001)" in problem()


def test_unknown_toml_key(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, 'lease_tll = 10\noperator_tokn = "very-secret-token"\n')
    lines = problem(config_file=path).splitlines()
    assert lines == [
        f"config file {path}: unknown setting 'lease_tll' (did you mean 'lease_ttl'?)",
        f"config file {path}: unknown setting 'operator_tokn' (did you mean 'operator_token'?)",
    ]


def test_unknown_override() -> None:
    assert problem(lease_tll=3).startswith("lease_tll: unknown setting")


def test_invalid_toml(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, 'port = 8080\nhost = "unterminated\n')
    msg = problem(config_file=path)
    assert msg.startswith(f"config file {path}: invalid TOML")
    assert "line 2" in msg and "column" in msg


def test_toml_not_utf8(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'default_agent = "caf\xe9"\n')
    assert problem(config_file=path).startswith(f"config file {path}: not valid UTF-8")


def test_missing_config_file(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nope.toml"
    assert problem(config_file=missing) == f"config file {missing}: not found"
    monkeypatch.setenv("TETHER_CONFIG", str(missing))
    assert problem() == f"config file {missing}: not found"


def test_unreadable_config_file(tmp_path: pathlib.Path) -> None:
    assert problem(config_file=tmp_path).startswith(f"config file {tmp_path}:")


def test_secrets_never_echoed(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    # A secret that lands in the wrong type, and a secret under a misspelt key.
    path = write(
        tmp_path,
        'telegram_tokn = "123456:AAAA-secret-telegram"\n'
        "slack_signing_secret = 987654321\n"
        'operator_token = ["op-secret-in-a-list"]\n',
    )
    monkeypatch.setenv("TETHER_WEBHOOKS", '{"name": "x", "secret": "env-hook-secret"}')
    msg = problem(config_file=path)
    assert "slack_signing_secret" in msg and "operator_token" in msg and "TETHER_WEBHOOKS" in msg
    for secret in ("AAAA-secret-telegram", "987654321", "op-secret-in-a-list", "env-hook-secret"):
        assert secret not in msg
    # The chained exception does not carry the values either.
    with pytest.raises(SettingsError) as info:
        load_settings(path)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_one_line_per_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_PORT", "0")
    monkeypatch.setenv("TETHER_LEASE_TTL", "0")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert len(info.value.problems) == 2
    assert str(info.value).splitlines() == info.value.problems


# ---- example file -----------------------------------------------------------------------------


def test_example_toml_loads() -> None:
    s = load_settings(EXAMPLE)
    assert s.database_url == "sqlite+aiosqlite:///./tether.db"
    assert s.port == 8080
    assert s.lease_ttl == 30.0
    assert [w.name for w in s.webhooks] == ["github-push", "payments"]
    assert s.webhooks[1].key_field == "order_id"
    (schedule,) = s.schedules
    assert (schedule.name, schedule.cron, schedule.timezone) == (
        "weekday-digest",
        "30 8 * * mon-fri",
        "Europe/Berlin",
    )


def test_example_toml_mentions_every_setting() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    for name in Settings.model_fields:
        assert f"{name} =" in text or f"[[{name}]]" in text, name
    for name in WebhookConfig.model_fields:
        assert f"{name} =" in text or f"`{name}`" in text, name
