"""Small helpers for building distribution API responses."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from skyreg.oci.bounded import parse_int
from skyreg.oci.errors import ErrorCode, RegistryError

MAX_PAGE = 10000


def json_response(
    doc: Any,
    *,
    content_type: str = "application/json",
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """A JSON body with an exact Content-Type."""
    body = json.dumps(doc).encode()
    resp = web.Response(body=body, status=status, headers=headers)
    resp.content_type = content_type
    return resp


def empty(status: int, headers: dict[str, str] | None = None) -> web.Response:
    """A body-less response with `Content-Length: 0`."""
    return web.Response(status=status, headers={**(headers or {}), "Content-Length": "0"})


def page_size(request: web.Request, default: int | None) -> int | None:
    """The `n` query parameter, validated; `default` when absent."""
    raw = request.query.get("n")
    if raw is None or raw == "":
        return default
    try:
        n = parse_int(raw)
    except ValueError as e:
        raise RegistryError(ErrorCode.PAGINATION_NUMBER_INVALID, f"n {raw[:50]!r}: {e}") from None
    return min(n, MAX_PAGE)


def next_link(path: str, n: int, last: str) -> str:
    """The RFC 5988 Link header pointing at the next page."""
    return f'<{path}?{urlencode({"n": n, "last": last})}>; rel="next"'
