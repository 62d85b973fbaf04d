"""The public HTTP API's JSON request bodies: one reader, one size bound, one pair of answers.

Why one: signup and the top-up route both take a JSON object, and two readers had drifted (only
one checked the size). Every route now answers an oversized body 413 ``body_too_large`` and a body
that is not a JSON object 400 ``invalid_json``; only the example in the message is the route's.

Sharp edge: the bound is checked against ``Content-Length`` before anything is read. A body sent
without one (chunked) is bounded by aiohttp's ``client_max_size``, which ``http_api.make_app`` sets
to the same number; aiohttp then raises its own 413, which the API's error middleware answers as
``body_too_large`` too.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from authz_sidecar import api_errors

BODY_BYTES_MAX = 64 * 1024


async def read_object(request: web.Request, *, example: str = "") -> dict[str, Any]:
    """The body as a JSON object, or :class:`api_errors.ApiError` (413 or 400) saying what is wrong.

    ``example`` (a JSON object, as text) is shown in the 400's message.
    """
    if request.content_length is not None and request.content_length > BODY_BYTES_MAX:
        raise api_errors.ApiError(413, "body_too_large", f"The body must be at most {BODY_BYTES_MAX} bytes.")
    try:
        body = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict):
        such_as = f" such as {example}" if example else ""
        raise api_errors.ApiError(400, "invalid_json", f"The body must be a JSON object{such_as}.")
    return body
