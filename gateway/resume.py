"""``POST /resume/{token}``: the unguessable URL an agent hands to a third party.

No operator token: the resume token itself is the credential, so the route lives outside
``/api/`` and the token is never logged (the access log and error logs show
``/resume/<token>``) nor echoed. The body is any JSON value (an empty body is ``null``); it
becomes the signal's data. Answered 200 only after the resolution committed; a second call is
409 with the first resolution; an unknown token is 404 and writes nothing.
Imports ledger and the gateway's API helpers.
"""

from __future__ import annotations

import re

from aiohttp import web

from gateway.api import LEDGER_KEY, ApiError, read_json
from gateway.waits_api import already_resolved
from ledger.errors import WaitAlreadyResolved

RESOLVER = "resume-url"
# tokens are secrets.token_urlsafe(24) (32 characters); the column holds up to 80
_TOKEN = re.compile(r"[A-Za-z0-9_-]{16,80}")


def _not_found() -> ApiError:
    return ApiError(404, "not_found", "no wait for this resume URL")


async def resume(request: web.Request) -> web.Response:
    token = request.match_info["token"]
    if not _TOKEN.fullmatch(token):
        raise _not_found()
    data = await read_json(request, empty=None)
    try:
        wait = await request.app[LEDGER_KEY].resolve_by_token(token, data, by=RESOLVER)
    except WaitAlreadyResolved as exc:
        raise already_resolved(exc) from None
    return web.json_response({"wait_id": wait.id, "state": wait.state})


def setup_resume(app: web.Application) -> None:
    app.router.add_post("/resume/{token}", resume)
