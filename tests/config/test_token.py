"""The operator token: configured, kept in a 0600 file, or generated exactly once."""

from __future__ import annotations

import os
import pathlib
import stat
from concurrent.futures import ThreadPoolExecutor

import pytest

import config.token
from config import Settings, load_or_create_operator_token, read_operator_token
from config.token import OperatorTokenError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("TETHER_"):
            monkeypatch.delenv(name)


def settings_in(tmp_path: pathlib.Path, **kwargs: object) -> Settings:
    return Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/tether.db", **kwargs)


def test_generated_once_with_mode_0600_then_reread(tmp_path: pathlib.Path) -> None:
    settings = settings_in(tmp_path)
    path = settings.operator_token_file()
    assert path == tmp_path / "tether.db.operator-token"
    assert read_operator_token(settings) is None
    assert not path.exists()  # reading never creates

    token, created = load_or_create_operator_token(settings)
    assert created
    assert len(token) >= 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == token

    again, created_again = load_or_create_operator_token(settings)
    assert (again, created_again) == (token, False)
    assert read_operator_token(settings) == token
    # no temporary files left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_environment_token_wins(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kept, _ = load_or_create_operator_token(settings_in(tmp_path))
    monkeypatch.setenv("TETHER_OPERATOR_TOKEN", "from-the-environment")
    settings = settings_in(tmp_path)
    assert load_or_create_operator_token(settings) == ("from-the-environment", False)
    assert read_operator_token(settings) == "from-the-environment"
    assert settings.operator_token_file().read_text().strip() == kept  # untouched


def test_configured_token_creates_no_file(tmp_path: pathlib.Path) -> None:
    settings = settings_in(tmp_path, operator_token="configured")
    assert load_or_create_operator_token(settings) == ("configured", False)
    assert list(tmp_path.iterdir()) == []


def test_concurrent_first_starts_agree_on_one_token(tmp_path: pathlib.Path) -> None:
    settings = settings_in(tmp_path)
    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(lambda _: load_or_create_operator_token(settings), range(32)))
    tokens = {token for token, _ in results}
    assert len(tokens) == 1
    assert sum(created for _, created in results) == 1
    assert settings.operator_token_file().read_text().strip() in tokens
    assert sorted(p.name for p in tmp_path.iterdir()) == [settings.operator_token_file().name]


def test_empty_token_file_is_a_clear_error(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(config.token, "_EMPTY_FILE_GRACE", 0.0)
    settings = settings_in(tmp_path)
    settings.operator_token_file().write_text("\n")
    with pytest.raises(OperatorTokenError, match="is empty"):
        load_or_create_operator_token(settings)
    assert settings.operator_token_file().read_text() == "\n"  # left for the operator


def test_token_file_whitespace_is_ignored(tmp_path: pathlib.Path) -> None:
    settings = settings_in(tmp_path)
    settings.operator_token_file().write_text("  kept-token \n")
    assert load_or_create_operator_token(settings) == ("kept-token", False)
