"""The operator token: from ``TETHER_OPERATOR_TOKEN``, or generated once and kept in a 0600 file.

The API never runs without a token. When none is configured, the first start generates one and
writes it beside the SQLite database (:meth:`Settings.operator_token_file`); later starts and
the CLI read it from there. Imports nothing of Tether's but :mod:`config.settings`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import secrets
import stat
import time

from config.settings import Settings

log = logging.getLogger(__name__)

# A concurrent creator that could not hard-link writes the final file in place; give it this
# long to finish before an empty file counts as broken.
_EMPTY_FILE_GRACE = 2.0


class OperatorTokenError(RuntimeError):
    """The token file exists but cannot be used (unreadable or empty)."""


def _read_file(path: pathlib.Path) -> str | None:
    """The token kept in ``path``; ``None`` if there is no file; raise if it is unusable."""
    deadline = time.monotonic() + _EMPTY_FILE_GRACE
    while True:
        try:
            text = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise OperatorTokenError(f"cannot read the operator token file {path}: {exc}") from exc
        if text:
            _warn_if_readable_by_others(path)
            return text
        if time.monotonic() >= deadline:
            raise OperatorTokenError(
                f"the operator token file {path} is empty; delete it to generate a new token "
                "or set TETHER_OPERATOR_TOKEN"
            )
        time.sleep(0.05)  # another process is still writing it


def _warn_if_readable_by_others(path: pathlib.Path) -> None:
    with contextlib.suppress(OSError):
        if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("operator token file %s is accessible by other users; chmod 600 it", path)


def read_operator_token(settings: Settings) -> str | None:
    """The configured token, else the one kept in the token file, else ``None``. Never creates
    anything (the CLI uses this)."""
    if settings.operator_token is not None:
        return settings.operator_token.get_secret_value()
    return _read_file(settings.operator_token_file())


def load_or_create_operator_token(settings: Settings) -> tuple[str, bool]:
    """Return ``(token, created)``: the configured token, the kept one, or a new one written to
    :meth:`Settings.operator_token_file` with mode 0600 (``created`` is then ``True``).

    Safe against concurrent first starts: the file appears atomically with its full content
    and is never replaced, so every process ends up with the same token.
    """
    existing = read_operator_token(settings)
    if existing is not None:
        return existing, False
    path = settings.operator_token_file()
    token = secrets.token_urlsafe(32)
    if _create_exclusive(path, token):
        return token, True
    # Someone else created it between our read and our write: theirs wins.
    kept = _read_file(path)
    if kept is None:
        raise OperatorTokenError(f"the operator token file {path} vanished while being created")
    return kept, False


def _write_new(path: pathlib.Path, data: bytes) -> None:
    """Create ``path`` (must not exist) with mode 0600 and ``data``, flushed to disk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_exclusive(path: pathlib.Path, token: str) -> bool:
    """Write ``token`` to ``path`` unless it exists. ``False`` if another creator won."""
    data = (token + "\n").encode("ascii")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    _write_new(tmp, data)
    try:
        try:
            # link() never replaces an existing file, and readers see all of it or nothing.
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:
            # No hard links on this file system: create the final file exclusively instead.
            try:
                _write_new(path, data)
            except FileExistsError:
                return False
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    _fsync_dir(path.parent)
    return True


def _fsync_dir(directory: pathlib.Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
