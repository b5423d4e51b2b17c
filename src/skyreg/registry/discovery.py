"""Content discovery: tag listing, the catalog and the referrers API."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from skyreg.auth.policy import app_of
from skyreg.oci import mediatypes as mt
from skyreg.oci.digest import Digest
from skyreg.oci.errors import ErrorCode, RegistryError
from skyreg.registry.context import may_pull, registry_of
from skyreg.registry.responses import json_response, next_link, page_size

CATALOG_PAGE = 1000


async def list_tags(request: web.Request, name: str, _reference: str) -> web.StreamResponse:
    """GET /v2/<name>/tags/list with `n` and `last` pagination."""
    reg = registry_of(request)
    n = page_size(request, None)
    last = request.query.get("last") or None
    limit = None if n is None else n + 1
    meta = reg.meta

    def known_and_tags() -> list[str] | None:  # one database hop for both queries
        if not meta.repository_known(name):
            return None
        return [] if n == 0 else meta.list_tags(name, limit, last)

    tags = await meta.read(known_and_tags)
    if tags is None:
        raise RegistryError(
            ErrorCode.NAME_UNKNOWN, f"repository {name} is not known", {"name": name}
        )
    headers = {}
    if n is not None and len(tags) > n:
        tags = tags[:n]
        headers["Link"] = next_link(f"/v2/{name}/tags/list", n, tags[-1])
    return json_response({"name": name, "tags": tags}, headers=headers)


def _readable_repositories(request: web.Request, limit: int, last: str | None) -> list[str]:
    """Up to `limit` repository names after `last` that the caller may pull (queries: run it
    on a database thread)."""
    reg = registry_of(request)
    if reg.auth is None:
        return reg.meta.catalog(limit, last)
    names: list[str] = []
    readable_apps: dict[str, bool] = {}
    cursor = last
    while len(names) < limit:
        batch = reg.meta.catalog(CATALOG_PAGE, cursor)
        if not batch:
            break
        for name in batch:
            app = app_of(name)
            if app not in readable_apps:
                readable_apps[app] = may_pull(request, name)
            if readable_apps[app]:
                names.append(name)
        cursor = batch[-1]
    return names[:limit]


async def catalog(request: web.Request, _name: str, _reference: str) -> web.StreamResponse:
    """GET /v2/_catalog with `n` and `last` pagination (only what the caller may pull)."""
    n = page_size(request, CATALOG_PAGE)
    assert n is not None
    last = request.query.get("last") or None
    reg = registry_of(request)
    names = [] if n == 0 else await reg.meta.read(_readable_repositories, request, n + 1, last)
    headers = {}
    if len(names) > n:
        names = names[:n]
        headers["Link"] = next_link("/v2/_catalog", n, names[-1])
    return json_response({"repositories": names}, headers=headers)


async def referrers(request: web.Request, name: str, reference: str) -> web.StreamResponse:
    """GET /v2/<name>/referrers/<digest>: an OCI index of the manifests whose subject it is."""
    reg = registry_of(request)
    subject = Digest.parse(reference)
    artifact_type = request.query.get("artifactType") or None
    found = await reg.meta.read(reg.meta.referrers, name, str(subject), artifact_type)
    manifests: list[dict[str, Any]] = []
    for r in found:
        entry: dict[str, Any] = {"mediaType": r.media_type, "digest": r.digest, "size": r.size}
        if r.artifact_type:
            entry["artifactType"] = r.artifact_type
        if r.annotations:
            entry["annotations"] = r.annotations
        manifests.append(entry)
    headers = {"OCI-Filters-Applied": "artifactType"} if artifact_type else {}
    doc = {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": manifests}
    return json_response(doc, content_type=mt.OCI_INDEX, headers=headers)
