"""Strict parsing of an inbound JSON body, shared by every HTTP entry point.

Rejects what JSON does not allow (NaN, Infinity), bodies nested too deeply, and strings a
database cannot store (NUL characters, unpaired surrogates). Imports nothing of Tether's.
"""

from __future__ import annotations

import json
from typing import Any


class InvalidJson(ValueError):
    """The body is not JSON Tether can store; the message says why."""


def unstorable_reason(value: str) -> str | None:
    """Why a string cannot be stored (PostgreSQL rejects NUL; lone surrogates are not UTF-8)."""
    if "\x00" in value:
        return "contains a NUL character (\\u0000)"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "contains an unpaired surrogate"
    return None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _check_storable(value: Any, where: str) -> None:
    """Walk a parsed JSON value (iteratively) and refuse strings the databases cannot store."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            texts = [item]
        elif isinstance(item, dict):
            texts = list(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
            continue
        else:
            continue
        for text in texts:
            why = unstorable_reason(text)
            if why:
                raise InvalidJson(f"a string in {where} {why}")


def parse_json_body(raw: bytes, *, what: str, where: str) -> Any:
    """``raw`` (not empty) as a JSON value, or :class:`InvalidJson`. ``what`` names the body in
    messages ("the request body"), ``where`` its contents ("the payload")."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidJson(f"{what} is not UTF-8 ({exc.reason})") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise InvalidJson(f"{what} is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError included
        raise InvalidJson(f"{what} is not valid JSON: {exc}") from None
    _check_storable(data, where)
    return data
