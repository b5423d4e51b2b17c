"""Manifest endpoints: GET/HEAD with content negotiation, PUT with validation, DELETE."""

from __future__ import annotations

import asyncio
import hashlib

from aiohttp import web

from skyreg.lazy.index import ARTIFACT_TYPE as LAZY_INDEX_ARTIFACT
from skyreg.oci import mediatypes as mt
from skyreg.oci.digest import Digest, is_digest
from skyreg.oci.errors import ErrorCode, RegistryError
from skyreg.oci.manifest import MAX_MANIFEST_SIZE, parse_manifest
from skyreg.oci.names import validate_tag
from skyreg.registry.context import registry_of
from skyreg.registry.responses import empty


def _unknown(name: str, reference: str) -> RegistryError:
    return RegistryError(
        ErrorCode.MANIFEST_UNKNOWN,
        f"manifest {reference} is not in {name}",
        {"name": name, "reference": reference},
    )


def _reference(reference: str) -> tuple[str, bool]:
    """(normalised reference, whether it is a digest)."""
    if is_digest(reference):
        return str(Digest.parse(reference)), True
    return validate_tag(reference), False


def _lookup_reference(name: str, reference: str) -> tuple[str, bool]:
    """Like `_reference`, but a malformed tag names nothing: MANIFEST_UNKNOWN, as clients expect."""
    try:
        return _reference(reference)
    except RegistryError as e:
        if e.code is ErrorCode.TAG_INVALID:
            raise _unknown(name, reference[:200]) from None
        raise


async def get_manifest(request: web.Request, name: str, reference: str) -> web.StreamResponse:
    """GET/HEAD a manifest by tag or digest: exact bytes, stored Content-Type, digest, ETag."""
    reg = registry_of(request)
    ref, by_digest = _lookup_reference(name, reference)
    stored = await reg.meta.read(reg.meta.get_manifest, name, ref, by_digest)
    if stored is None:
        raise _unknown(name, ref)
    accepted = mt.parse_accept(request.headers.getall("Accept", []))
    if accepted is not None and stored.media_type not in accepted:
        raise RegistryError(
            ErrorCode.MANIFEST_UNKNOWN,
            f"manifest {ref} is a {stored.media_type}, which the Accept header does not allow",
            {"name": name, "reference": ref, "mediaType": stored.media_type},
        )
    if request.method == "GET" and reg.pulls is not None:  # for retention policies
        reg.pulls.record(name, stored.digest)
    etag = f'"{stored.digest}"'
    headers = {"Docker-Content-Digest": stored.digest, "ETag": etag}
    if etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    headers["Content-Type"] = stored.media_type
    if request.method == "HEAD":
        headers["Content-Length"] = str(len(stored.content))
        return web.Response(status=200, headers=headers)
    return web.Response(body=stored.content, headers=headers)


async def _read_limited(request: web.Request) -> bytes:
    if request.content_length is not None and request.content_length > MAX_MANIFEST_SIZE:
        raise RegistryError(
            ErrorCode.MANIFEST_TOO_LARGE,
            f"manifest is {request.content_length} bytes; the limit is {MAX_MANIFEST_SIZE} bytes",
        )
    data = bytearray()
    async for chunk in request.content.iter_any():
        data += chunk
        if len(data) > MAX_MANIFEST_SIZE:
            raise RegistryError(
                ErrorCode.MANIFEST_TOO_LARGE,
                f"manifest is over the limit of {MAX_MANIFEST_SIZE} bytes",
            )
    return bytes(data)


SERVER_ARTIFACT_TYPES = frozenset({LAZY_INDEX_ARTIFACT})  # no client may push these


async def put_manifest(request: web.Request, name: str, reference: str) -> web.StreamResponse:
    """PUT a manifest by tag or digest (plus any ?tag= parameters)."""
    reg = registry_of(request)
    ref, by_digest = _reference(reference)
    raw = await _read_limited(request)
    if by_digest:
        claimed = Digest.parse(ref)
        digest = Digest(claimed.algorithm, hashlib.new(claimed.algorithm, raw).hexdigest())
        if digest != claimed:
            raise RegistryError(
                ErrorCode.DIGEST_INVALID,
                f"manifest digest is {digest}, not {claimed}",
                {"digest": str(claimed)},
            )
    else:
        digest = Digest("sha256", hashlib.sha256(raw).hexdigest())
    # Parsing up to 4 MiB of JSON (and bounding its depth first) takes a while: not on the loop.
    manifest = await asyncio.to_thread(
        parse_manifest, raw, request.headers.get("Content-Type"), digest
    )
    if manifest.referrer_artifact_type() in SERVER_ARTIFACT_TYPES:
        # Agents mount images through these: only the registry's own, made from the layers'
        # bytes, may exist (a tenant's could show a tree other than its layers').
        raise RegistryError(
            ErrorCode.DENIED,
            f"artifact type {manifest.referrer_artifact_type()} is reserved: the registry "
            "attaches these itself",
        )
    tags = [] if by_digest else [ref]
    tags += [validate_tag(t) for t in request.query.getall("tag", []) if t not in tags]
    warning = None
    if reg.quotas is not None:  # a new manifest while the org is over its hard quota: DENIED

        async def stored() -> bool:
            return await reg.meta.read(reg.meta.get_manifest, name, str(digest), True) is not None

        warning = await reg.quotas.admit_manifest(name, len(raw), stored)
    await reg.meta.run(reg.meta.put_manifest, name, manifest, tags)
    if reg.geo is not None and tags:  # a tagged push (an index's children come untagged first)
        await reg.meta.run(reg.geo.after_push, name, str(digest))
    headers = {"Location": f"/v2/{name}/manifests/{digest}", "Docker-Content-Digest": str(digest)}
    if manifest.subject is not None:
        headers["OCI-Subject"] = str(manifest.subject.digest)
    if warning is not None:  # over the org's soft quota
        headers["Warning"] = warning
    resp = empty(201, headers)
    for tag in tags:
        resp.headers.add("OCI-Tag", tag)
    return resp


async def delete_manifest(request: web.Request, name: str, reference: str) -> web.StreamResponse:
    """DELETE by digest removes the manifest and its tags; by tag removes only that tag."""
    reg = registry_of(request)
    ref, by_digest = _lookup_reference(name, reference)
    found = (
        await reg.meta.run(reg.meta.delete_manifest, name, ref)
        if by_digest
        else await reg.meta.run(reg.meta.delete_tag, name, ref)
    )
    if not found:
        raise _unknown(name, ref)
    return empty(202)
