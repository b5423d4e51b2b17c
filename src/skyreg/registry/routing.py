"""Mapping `/v2/...` paths (whose repository names contain slashes) to endpoints."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum


class Endpoint(Enum):
    """The distribution API's endpoints below /v2/."""

    CATALOG = "catalog"
    UPLOAD_START = "upload_start"
    UPLOAD = "upload"
    BLOB = "blob"
    MANIFEST = "manifest"
    TAGS = "tags"
    REFERRERS = "referrers"


@dataclass(frozen=True, slots=True)
class Route:
    """An endpoint with the repository name and the reference (digest, tag or upload id)."""

    endpoint: Endpoint
    name: str = ""
    reference: str = ""


_PATTERNS: list[tuple[re.Pattern[str], Endpoint]] = [
    (re.compile(r"^(?P<name>.+)/blobs/uploads/?\Z"), Endpoint.UPLOAD_START),
    (re.compile(r"^(?P<name>.+)/blobs/uploads/(?P<ref>[^/]+)\Z"), Endpoint.UPLOAD),
    (re.compile(r"^(?P<name>.+)/blobs/(?P<ref>[^/]+)\Z"), Endpoint.BLOB),
    (re.compile(r"^(?P<name>.+)/manifests/(?P<ref>[^/]+)\Z"), Endpoint.MANIFEST),
    (re.compile(r"^(?P<name>.+)/tags/list/?\Z"), Endpoint.TAGS),
    (re.compile(r"^(?P<name>.+)/referrers/(?P<ref>[^/]+)\Z"), Endpoint.REFERRERS),
]

METHODS: dict[Endpoint, frozenset[str]] = {
    Endpoint.CATALOG: frozenset({"GET", "HEAD"}),
    Endpoint.UPLOAD_START: frozenset({"POST"}),
    Endpoint.UPLOAD: frozenset({"GET", "HEAD", "PATCH", "PUT", "DELETE"}),
    Endpoint.BLOB: frozenset({"GET", "HEAD", "DELETE"}),
    Endpoint.MANIFEST: frozenset({"GET", "HEAD", "PUT", "DELETE"}),
    Endpoint.TAGS: frozenset({"GET", "HEAD"}),
    Endpoint.REFERRERS: frozenset({"GET", "HEAD"}),
}


def match_route(tail: str) -> Route | None:
    """The route for the part of the path after `/v2/`, or None if no endpoint has that shape."""
    if tail.rstrip("/") == "_catalog":
        return Route(Endpoint.CATALOG)
    for pattern, endpoint in _PATTERNS:
        m = pattern.match(tail)
        if m is not None:
            groups = m.groupdict()
            return Route(endpoint, groups["name"], groups.get("ref") or "")
    return None
