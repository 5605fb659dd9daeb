"""Inbound webhook signatures: verify a delivery, then parse it. Knows nothing about the ledger.

Two schemes:

* ``standard`` — `Standard Webhooks <https://www.standardwebhooks.com/>`_, verified by the
  ``standardwebhooks`` package: ``webhook-id`` (the delivery id), ``webhook-timestamp`` (within
  5 minutes of now), ``webhook-signature`` (one or more space-separated ``v1,<base64>``
  signatures, so a sender can rotate keys), ``whsec_<base64>`` secrets;
* ``github`` — ``X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the raw body>``, delivery id
  from ``X-GitHub-Delivery``. GitHub signs no timestamp: a replay is only caught by
  deduplicating on the delivery id.

The signature is always checked on the raw body *before* it is parsed. :func:`verify_delivery`
returns a :class:`Delivery` or raises :class:`WebhookError` (``status``, ``code``, ``message``).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from adapters.json_body import InvalidJson, parse_json_body

__all__ = [
    "Delivery",
    "GitHubVerifier",
    "StandardVerifier",
    "Verifier",
    "WebhookError",
    "make_verifier",
    "parse_payload",
    "verify_delivery",
]

#: longest delivery id accepted (it is stored as the dedup key)
MAX_DELIVERY_ID = 150
_PRINTABLE_ID = re.compile(r"[\x21-\x7e]+")  # visible ASCII, no spaces


class WebhookError(Exception):
    """A delivery that is refused: ``status`` (401 or 400), a stable ``code`` and a message
    that says what is wrong (never the secret or the expected signature)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _invalid_signature(why: str) -> WebhookError:
    return WebhookError(401, "invalid_signature", f"webhook signature rejected: {why}")


@dataclass(frozen=True, slots=True)
class Delivery:
    """A verified delivery: the sender's delivery id and the parsed JSON payload."""

    id: str
    payload: Any


class Verifier(Protocol):
    def verify(self, body: bytes, headers: Mapping[str, str]) -> str | None:
        """Check the signature of ``body``; return the delivery id (``None`` if absent).
        Raises :class:`WebhookError` (401) when the signature does not hold."""
        ...


class StandardVerifier:
    """Standard Webhooks (``webhook-id``, ``webhook-timestamp``, ``webhook-signature``)."""

    HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")

    def __init__(self, secret: str) -> None:
        try:
            self._webhook = Webhook(secret)
        except Exception as exc:  # binascii.Error, EmptyWebhookSecretError, ...
            # never echo the secret
            raise ValueError(
                "a Standard Webhooks secret must be base64, optionally prefixed 'whsec_' "
                f"({type(exc).__name__})"
            ) from None

    def verify(self, body: bytes, headers: Mapping[str, str]) -> str | None:
        got = {name: headers.get(name, "").strip() for name in self.HEADERS}
        missing = [name for name, value in got.items() if not value]
        if missing:
            raise _invalid_signature(f"missing header(s): {', '.join(missing)}")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise _invalid_signature("the body is not UTF-8, so it cannot be verified") from None
        try:
            self._webhook.verify(text, got, json_parse=False)
        except WebhookVerificationError as exc:
            raise _invalid_signature(_standard_reason(str(exc))) from None
        except (ValueError, TypeError):
            # a malformed webhook-signature entry (no "v1," prefix, bad base64)
            raise _invalid_signature("malformed webhook-signature header") from None
        return got["webhook-id"]


def _standard_reason(message: str) -> str:
    reasons = {
        "Message timestamp too old": "webhook-timestamp is more than 5 minutes old",
        "Message timestamp too new": "webhook-timestamp is more than 5 minutes in the future",
        "Invalid Signature Headers": "webhook-timestamp is not a Unix timestamp",
        "No matching signature found": "no signature in webhook-signature matches",
    }
    return reasons.get(message, message)


class GitHubVerifier:
    """GitHub: ``X-Hub-Signature-256: sha256=<hex HMAC-SHA256(secret, raw body)>``."""

    SIGNATURE = "X-Hub-Signature-256"
    DELIVERY = "X-GitHub-Delivery"

    def __init__(self, secret: str) -> None:
        if not secret:
            raise ValueError("a GitHub webhook secret must not be empty")
        self._key = secret.encode("utf-8")

    def verify(self, body: bytes, headers: Mapping[str, str]) -> str | None:
        given = headers.get(self.SIGNATURE, "").strip()
        if not given:
            raise _invalid_signature(f"missing header {self.SIGNATURE}")
        expected = "sha256=" + hmac.new(self._key, body, hashlib.sha256).hexdigest()
        # bytes, so a non-ASCII header cannot make compare_digest raise
        presented = given.encode("utf-8", "surrogateescape").lower()
        if not hmac.compare_digest(presented, expected.encode("ascii")):
            raise _invalid_signature(f"{self.SIGNATURE} does not match the body")
        return headers.get(self.DELIVERY, "").strip() or None


def make_verifier(scheme: Literal["standard", "github"] | str, secret: str) -> Verifier:
    """The verifier for a hook's ``scheme``. Raises ``ValueError`` on an unusable secret."""
    if scheme == "standard":
        return StandardVerifier(secret)
    if scheme == "github":
        return GitHubVerifier(secret)
    raise ValueError(f"unknown webhook scheme {scheme!r} (expected 'standard' or 'github')")


# -- payload -----------------------------------------------------------------------------------


def parse_payload(body: bytes) -> Any:
    """The body as a JSON value, or :class:`WebhookError` 400 ``invalid_json``."""
    if not body.strip():
        raise WebhookError(400, "invalid_json", "the webhook body is empty; expected JSON")
    try:
        return parse_json_body(body, what="the webhook body", where="the payload")
    except InvalidJson as exc:
        raise WebhookError(400, "invalid_json", str(exc)) from None


def _check_delivery_id(delivery_id: str | None, header: str, max_length: int) -> str:
    if not delivery_id:
        raise WebhookError(400, "missing_delivery_id", f"the delivery has no id (header {header})")
    if len(delivery_id) > max_length or not _PRINTABLE_ID.fullmatch(delivery_id):
        raise WebhookError(
            400,
            "invalid_delivery_id",
            f"the delivery id ({header}) must be 1-{max_length} visible ASCII characters",
        )
    return delivery_id


def verify_delivery(
    verifier: Verifier,
    body: bytes,
    headers: Mapping[str, str],
    *,
    max_id_length: int = MAX_DELIVERY_ID,
) -> Delivery:
    """Verify ``body`` against its signature headers, then parse it. The signature is checked
    first: nothing about an unsigned body is looked at. Raises :class:`WebhookError`."""
    delivery_id = verifier.verify(body, headers)
    header = "X-GitHub-Delivery" if isinstance(verifier, GitHubVerifier) else "webhook-id"
    delivery_id = _check_delivery_id(delivery_id, header, max_id_length)
    return Delivery(delivery_id, parse_payload(body))
