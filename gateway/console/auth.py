"""Console sessions, CSRF tokens and flash messages, all signed with keys derived from the
operator token.

* A session cookie is ``<nonce>.<issued>.<signature>``: a random nonce, the time it was issued
  and an HMAC of both. It never contains the operator token; it stops being valid when the token
  changes (the key is derived from it), after :data:`SESSION_TTL`, or once logged out.
* A form's CSRF token is an HMAC of the session's nonce, so it is bound to one session and needs
  no server-side storage.
* A flash message travels in a short-lived signed cookie from a POST to the page it redirects to.

Every comparison of a secret is constant-time. Imports nothing of Tether's.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass, field

#: the session cookie
COOKIE = "tether_console"
#: the flash-message cookie
FLASH_COOKIE = "tether_console_flash"
#: the chat box's conversation id
CHAT_COOKIE = "tether_console_chat"
#: every console cookie is scoped to the console
COOKIE_PATH = "/console"
#: how long a login lasts (seconds)
SESSION_TTL = 12 * 3600
#: a session issued this far in the future (clock skew between gateways) is still accepted
CLOCK_SKEW = 60
_KEY_LABEL = b"tether-console-v1"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _key(operator_token: bytes) -> bytes:
    """The signing key: derived from the operator token, so a new token voids every session."""
    return hmac.new(operator_token, _KEY_LABEL, hashlib.sha256).digest()


def _sign(operator_token: bytes, purpose: str, payload: str) -> str:
    msg = purpose.encode("ascii") + b"\x00" + payload.encode("utf-8")
    return _b64(hmac.new(_key(operator_token), msg, hashlib.sha256).digest())


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8", "replace"), b.encode("utf-8", "replace"))


def token_matches(given: str, expected: bytes) -> bool:
    """Whether the token typed on the login form is the operator token. Both sides are hashed
    first so that even the length of the token does not show in the timing."""
    try:
        raw = given.strip().encode("utf-8", "surrogateescape")
    except UnicodeError:
        raw = b""
    return hmac.compare_digest(hashlib.sha256(raw).digest(), hashlib.sha256(expected).digest())


@dataclass(frozen=True, slots=True)
class Session:
    nonce: str
    issued: int


def new_session(operator_token: bytes, *, now: float | None = None) -> tuple[Session, str]:
    """A fresh session and its cookie value."""
    session = Session(secrets.token_urlsafe(18), int(now if now is not None else time.time()))
    payload = f"{session.nonce}.{session.issued}"
    return session, f"{payload}.{_sign(operator_token, 'session', payload)}"


def read_session(
    operator_token: bytes, value: str | None, *, now: float | None = None
) -> Session | None:
    """The session a cookie value names, or ``None`` when it is missing, forged, signed with an
    older operator token, or expired."""
    if not value or len(value) > 200:
        return None
    parts = value.split(".")
    if len(parts) != 3:
        return None
    nonce, issued_text, signature = parts
    if not _same(signature, _sign(operator_token, "session", f"{nonce}.{issued_text}")):
        return None
    if not issued_text.isascii() or not issued_text.isdigit():
        return None
    issued = int(issued_text)
    clock = now if now is not None else time.time()
    if not issued - CLOCK_SKEW <= clock <= issued + SESSION_TTL:
        return None
    return Session(nonce, issued)


def csrf_token(operator_token: bytes, session: Session) -> str:
    """The token every form of this session carries."""
    return _sign(operator_token, "csrf", session.nonce)


def csrf_ok(operator_token: bytes, session: Session, given: str | None) -> bool:
    return bool(given) and _same(given or "", csrf_token(operator_token, session))


def pack_flash(operator_token: bytes, kind: str, text: str) -> str:
    payload = _b64(json.dumps([kind, text[:500]]).encode("utf-8"))
    return f"{payload}.{_sign(operator_token, 'flash', payload)}"


def unpack_flash(operator_token: bytes, value: str | None) -> tuple[str, str] | None:
    if not value or "." not in value or len(value) > 2000:
        return None
    payload, _, signature = value.partition(".")
    if not _same(signature, _sign(operator_token, "flash", payload)):
        return None
    try:
        kind, text = json.loads(_unb64(payload))
    except (ValueError, TypeError):
        return None
    if kind not in ("info", "error") or not isinstance(text, str):
        return None
    return kind, text


@dataclass
class Revoked:
    """Sessions ended with "Log out" (in this process), until they would have expired anyway."""

    until: dict[str, float] = field(default_factory=dict)

    def add(self, session: Session) -> None:
        now = time.time()
        self.until = {n: t for n, t in self.until.items() if t > now}
        self.until[session.nonce] = session.issued + SESSION_TTL

    def __contains__(self, session: object) -> bool:
        return isinstance(session, Session) and session.nonce in self.until
