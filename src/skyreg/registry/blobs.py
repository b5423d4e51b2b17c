"""Blob endpoints: pull (GET/HEAD with Range), delete, and uploads (monolithic, chunked, mount)."""

from __future__ import annotations

import contextlib
import logging
import re
import uuid
from collections.abc import AsyncGenerator, AsyncIterator

from aiohttp import web

from skyreg.geo.transfer import PEER_HEADER
from skyreg.oci.bounded import MAX_INT, parse_int
from skyreg.oci.digest import Digest
from skyreg.oci.errors import ErrorCode, RegistryError
from skyreg.oci.names import validate_name
from skyreg.registry.context import Registry, may_pull, registry_of
from skyreg.registry.responses import empty
from skyreg.store.base import (
    DigestMismatch,
    StorageFull,
    UploadOffsetMismatch,
    UploadUnknown,
)

_RANGE_RE = re.compile(r"^bytes=([0-9]*)-([0-9]*)\Z")
_CONTENT_RANGE_RE = re.compile(r"^(?:bytes )?([0-9]+)-([0-9]+)(?:/(?:[0-9]+|\*))?\Z")
_UPLOAD_ID_RE = re.compile(r"^[0-9a-f]{32}\Z")
_BODY_CHUNK = 1 << 20

log = logging.getLogger("skyreg.blobs")


def _blob_headers(digest: Digest, size: int) -> dict[str, str]:
    return {
        "Docker-Content-Digest": str(digest),
        "Content-Type": "application/octet-stream",
        "Accept-Ranges": "bytes",
        "Cache-Control": "max-age=31536000",
        "ETag": f'"{digest}"',
        "Content-Length": str(size),
    }


def _position(digits: str) -> int:
    """A byte position or length from a header; any beyond MAX_INT is past every blob."""
    try:
        return parse_int(digits)
    except ValueError:
        return MAX_INT + 1


def _byte_range(header: str, size: int) -> tuple[int, int]:
    """The first and last byte a Range header asks for; malformed or unsatisfiable is 416."""
    m = _RANGE_RE.match(header.strip())
    unsatisfiable = RegistryError(
        ErrorCode.RANGE_INVALID,
        f"range {header[:100]!r} cannot be satisfied for a blob of {size} bytes",
        headers={"Content-Range": f"bytes */{size}"},
    )
    if m is None or (not m.group(1) and not m.group(2)):
        raise unsatisfiable
    start = _position(m.group(1)) if m.group(1) else None
    end = _position(m.group(2)) if m.group(2) else None
    if start is not None:
        if start >= size or (end is not None and end < start):
            raise unsatisfiable
        return start, size - 1 if end is None else min(end, size - 1)
    assert end is not None  # a suffix length: the last `end` bytes
    if end == 0 or size == 0:
        raise unsatisfiable
    return max(size - end, 0), size - 1


async def get_blob(request: web.Request, name: str, reference: str) -> web.StreamResponse:
    """GET/HEAD a blob; bytes from a local file go out with sendfile, Range honoured."""
    reg = registry_of(request)
    digest = Digest.parse(reference)
    size = await reg.meta.read(reg.meta.blob_size, name, str(digest))
    stored = await reg.store.stat(digest) if size is not None else None
    if size is not None and stored is None and reg.geo is not None:
        # In the registry, not in this region: from the nearest region holding it, via here.
        reg.geo.refuse_chained(digest, for_peer=bool(request.headers.get(PEER_HEADER)))
        if request.method == "HEAD":
            return web.Response(status=200, headers=_blob_headers(digest, size))
        range_header = request.headers.get("Range")
        asked = _byte_range(range_header, size) if range_header is not None else None
        chunks = await reg.geo.pull_through(name, digest, size, byte_range=asked)
        if chunks is not None:
            headers = _blob_headers(digest, size)
            if asked is None:
                return await _stream(request, chunks, headers)
            headers["Content-Range"] = f"bytes {asked[0]}-{asked[1]}/{size}"
            headers["Content-Length"] = str(asked[1] - asked[0] + 1)
            return await _stream(request, chunks, headers, status=206)
        stored = await reg.store.stat(digest)
    if size is None or stored is None:
        raise RegistryError(
            ErrorCode.BLOB_UNKNOWN, f"blob {digest} is not in {name}", {"digest": str(digest)}
        )
    headers = _blob_headers(digest, stored)
    if request.method == "HEAD":
        return web.Response(status=200, headers=headers)
    # Like Distribution's redirect middleware: the client fetches the bytes from the storage
    # itself (a presigned URL, signed for GET only, so HEAD is answered here).
    redirect = await reg.store.redirect_url(digest)
    if redirect is not None:
        raise web.HTTPTemporaryRedirect(redirect, headers={"Docker-Content-Digest": str(digest)})
    range_header = request.headers.get("Range")
    byte_range = _byte_range(range_header, stored) if range_header is not None else None
    path = reg.store.local_path(digest)
    if path is not None:
        del headers["Content-Length"]
        del headers["ETag"]
        return web.FileResponse(path, headers=headers)
    # No local file (an object store): stream the bytes, honouring the range ourselves.
    offset, length, status = 0, stored, 200
    if byte_range is not None:
        offset, length, status = byte_range[0], byte_range[1] - byte_range[0] + 1, 206
        headers["Content-Range"] = f"bytes {byte_range[0]}-{byte_range[1]}/{stored}"
        headers["Content-Length"] = str(length)
    resp = web.StreamResponse(status=status, headers=headers)
    await resp.prepare(request)
    async for chunk in reg.store.read(digest, offset, length):
        await resp.write(chunk)
    await resp.write_eof()
    return resp


async def _stream(
    request: web.Request,
    chunks: AsyncGenerator[bytes, None],
    headers: dict[str, str],
    status: int = 200,
) -> web.StreamResponse:
    """Send a blob's bytes (or a range of them: 206) as another region supplies them: the
    headers once bytes flow, so a failure before that is still a clean error answer (after it,
    the stream is cut)."""
    resp = web.StreamResponse(status=status, headers=headers)
    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
            if not resp.prepared:
                await resp.prepare(request)
            if chunk:
                await resp.write(chunk)
    if not resp.prepared:
        await resp.prepare(request)
    await resp.write_eof()
    return resp


async def delete_blob(request: web.Request, name: str, reference: str) -> web.StreamResponse:
    """DELETE a blob from a repository: only its link goes (and a GC review of it is queued);
    the bytes stay until garbage collection finds no repository links or references them."""
    reg = registry_of(request)
    digest = Digest.parse(reference)
    if not await reg.meta.run(reg.meta.unlink_blob, name, str(digest)):
        raise RegistryError(
            ErrorCode.BLOB_UNKNOWN, f"blob {digest} is not in {name}", {"digest": str(digest)}
        )
    if reg.quotas is not None:  # the org may hold fewer bytes now
        await reg.quotas.forget(name)
    return empty(202, {"Docker-Content-Digest": str(digest)})


class _Body:
    """A request body as the store reads it, counting the bytes that arrived; with a `limit`
    (a chunk's Content-Range) it ends there and notes whether the body went on (`overflow`)."""

    def __init__(self, request: web.Request, limit: int | None = None) -> None:
        self.request = request
        self.received = 0
        self.limit = limit
        self.overflow = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.request.content.iter_chunked(_BODY_CHUNK):
            if self.limit is not None and self.received + len(chunk) > self.limit:
                self.overflow = True
                chunk = chunk[: self.limit - self.received]
                if chunk:
                    self.received += len(chunk)
                    yield chunk
                return
            self.received += len(chunk)
            yield chunk

    def lost(self) -> bool:
        """Whether this request's connection closed (the client left, or a connection limit
        closed it): a ConnectionError then is not one of ours to a store or a peer."""
        transport = self.request.transport
        return transport is None or transport.is_closing()


def _has_body(request: web.Request) -> bool:
    if request.headers.get("Transfer-Encoding", "").lower() == "chunked":
        return True
    return (request.content_length or 0) > 0


def _blob_created(name: str, digest: Digest) -> web.Response:
    return empty(
        201,
        {
            "Location": f"/v2/{name}/blobs/{digest}",
            "Docker-Content-Digest": str(digest),
        },
    )


def _upload_headers(name: str, upload_id: str, size: int) -> dict[str, str]:
    # A zero-length upload also reports "0-0", as Distribution does.
    return {
        "Location": f"/v2/{name}/blobs/uploads/{upload_id}",
        "Range": f"0-{max(size - 1, 0)}",
        "Docker-Upload-UUID": upload_id,
    }


def _mountable_size(request: web.Request, digest: str, source: str | None) -> int | None:
    """The size of `digest` in `source` (or any repository holding it) if the caller may pull
    it from there, else None (queries: run it on a database thread)."""
    meta = registry_of(request).meta
    sources = [source] if source is not None else meta.repositories_with_blob(digest)
    readable = next((r for r in sources if may_pull(request, r)), None)
    return meta.blob_size(readable, digest) if readable is not None else None


async def _try_mount(reg: Registry, name: str, request: web.Request) -> web.Response | None:
    """Link a blob from another repository the caller may read; None means upload normally.

    A mount the caller may not read from is not a mount (202, a normal upload), so a 201 never
    tells anyone what another tenant stores.
    """
    digest = Digest.parse(request.query["mount"])
    source = request.query.get("from")
    if source is not None:
        validate_name(source)
    size = await reg.meta.read(_mountable_size, request, str(digest), source)
    if size is None or await reg.store.stat(digest) is None:
        return None
    if reg.quotas is not None:
        await reg.quotas.admit_blob(name, str(digest), size, linking=True)
    # Only while the blob row still exists: if GC took it since the read above, its bytes are
    # on their way out and the client must upload them again.
    linked = await reg.meta.run(reg.meta.link_blob, name, str(digest), size, require_existing=True)
    return _blob_created(name, digest) if linked else None


class _Link:
    """The store's `before_install` for an upload into `name`: link the verified blob (and
    forget the finished upload session, in the same commit) before its bytes are installed,
    so GC never deletes bytes the registry acknowledged (the link cancels a deletion of them
    GC may have pending, and a review waits for it)."""

    def __init__(self, reg: Registry, name: str, digest: Digest, upload_id: str | None = None):
        self.reg, self.name, self.digest, self.upload_id = reg, name, digest, upload_id
        self.done = False  # the link (and the session's end) is committed

    async def __call__(self, size: int) -> None:
        meta = self.reg.meta
        if self.reg.quotas is not None:  # the exact size: past the quota, nothing is linked
            await self.reg.quotas.admit_blob(self.name, str(self.digest), size, linking=True)
        await meta.run(
            meta.link_blob, self.name, str(self.digest), size, finished_upload=self.upload_id
        )
        self.done = True

    async def reopen(self, error: Exception) -> None:
        """After the install failed (`error`) once the session had ended with the link: record
        the session again, so the client may finish the upload, which the store still holds,
        with another PUT (as before the link moved ahead of the install)."""
        if not self.done or self.upload_id is None:
            return
        try:
            await self.reg.meta.run(self.reg.meta.create_upload, self.upload_id, self.name)
        except Exception:
            log.warning(
                "upload %s: installing %s failed (%s) and its session could not be reopened",
                self.upload_id,
                self.digest,
                error,
                exc_info=True,
            )


async def start_upload(request: web.Request, name: str, _reference: str) -> web.StreamResponse:
    """POST: mount, monolithic upload with ?digest=, or open an upload session (202)."""
    reg = registry_of(request)
    if "mount" in request.query:
        mounted = await _try_mount(reg, name, request)
        if mounted is not None:
            return mounted
    if "digest" in request.query:
        digest = Digest.parse(request.query["digest"])
        if reg.quotas is not None:  # the size, when the client declared it
            await reg.quotas.admit_blob(name, str(digest), request.content_length)
        if reg.space is not None:  # a new upload needs room (a mount above needs none)
            await reg.space.ensure_room()
        body = _Body(request)
        try:
            await reg.store.put(digest, body, before_install=_Link(reg, name, digest))
        except ConnectionError:
            if body.lost():  # one line, no traceback; the middleware lets it through
                log.info(
                    "monolithic upload of %s to %s: connection lost after %d bytes; nothing kept",
                    digest,
                    name,
                    body.received,
                )
            raise
        except DigestMismatch as e:
            raise RegistryError(ErrorCode.DIGEST_INVALID, str(e), {"digest": str(digest)}) from None
        if reg.geo is not None:  # the copy is recorded before the client hears of it
            await reg.geo.stored(digest)
        return _blob_created(name, digest)
    if _has_body(request):
        raise RegistryError(
            ErrorCode.BLOB_UPLOAD_INVALID, "a POST with a body needs ?digest= (monolithic upload)"
        )
    if reg.quotas is not None:  # the size is not known yet: refused only at the limit
        await reg.quotas.admit_blob(name, None, None)
    if reg.space is not None:
        await reg.space.ensure_room()
    upload_id = uuid.uuid4().hex
    await reg.meta.run(reg.meta.create_upload, upload_id, name)
    await reg.store.create_upload(upload_id)
    return empty(202, _upload_headers(name, upload_id, 0))


async def _session(reg: Registry, name: str, upload_id: str) -> None:
    unknown = RegistryError(
        ErrorCode.BLOB_UPLOAD_UNKNOWN,
        f"upload {upload_id[:64]!r} is unknown",
        {"upload": upload_id[:64]},
    )
    if _UPLOAD_ID_RE.match(upload_id) is None:
        raise unknown
    if await reg.meta.read(reg.meta.upload_repository, upload_id) != name:
        raise unknown


async def _upload_size(reg: Registry, upload_id: str) -> int:
    try:
        return await reg.store.upload_size(upload_id)
    except UploadUnknown:
        raise RegistryError(
            ErrorCode.BLOB_UPLOAD_UNKNOWN, f"upload {upload_id} is unknown"
        ) from None


async def _append(request: web.Request, reg: Registry, name: str, upload_id: str) -> int:
    """Append the request body, honouring Content-Range; returns the upload's new size."""
    offset: int | None = None
    expected: int | None = None
    content_range = request.headers.get("Content-Range")
    if content_range is not None:
        m = _CONTENT_RANGE_RE.match(content_range.strip())
        if m is None:
            raise RegistryError(
                ErrorCode.BLOB_UPLOAD_INVALID, f"malformed Content-Range {content_range[:100]!r}"
            )
        try:
            offset, end = parse_int(m.group(1)), parse_int(m.group(2))
        except ValueError:
            raise RegistryError(
                ErrorCode.BLOB_UPLOAD_INVALID,
                f"Content-Range {content_range[:100]!r} is beyond any upload",
                status=416,
                headers=_upload_headers(name, upload_id, await _upload_size(reg, upload_id)),
            ) from None
        if end < offset:
            raise RegistryError(
                ErrorCode.BLOB_UPLOAD_INVALID,
                "Content-Range ends before it starts",
                status=416,
                headers=_upload_headers(name, upload_id, await _upload_size(reg, upload_id)),
            )
        expected = end - offset + 1
        if request.content_length is not None and request.content_length != expected:
            raise RegistryError(
                ErrorCode.BLOB_UPLOAD_INVALID,
                "Content-Range and Content-Length disagree",
                status=416,
                headers=_upload_headers(name, upload_id, await _upload_size(reg, upload_id)),
            )
    # A chunked body cannot be checked before it is read: stored no further than its range.
    body = _Body(request, expected)
    try:
        size = await reg.store.append(upload_id, body, offset)
    except ConnectionError:
        if body.lost():  # one line, no traceback; the middleware lets it through
            log.info(
                "upload %s: connection lost after %d bytes; the upload holds %d bytes (resumable)",
                upload_id,
                body.received,
                await _upload_size(reg, upload_id),
            )
        raise
    except UploadOffsetMismatch as e:
        raise RegistryError(
            ErrorCode.BLOB_UPLOAD_INVALID,
            f"chunk starts at {offset}, but the upload holds {e.size} bytes",
            status=416,
            headers=_upload_headers(name, upload_id, e.size),
        ) from None
    except UploadUnknown:
        raise RegistryError(
            ErrorCode.BLOB_UPLOAD_UNKNOWN, f"upload {upload_id} is unknown"
        ) from None
    except StorageFull:
        if reg.space is not None:
            reg.space.failed(upload_id)
        raise
    if reg.space is not None:
        reg.space.resumed(upload_id)
    if body.overflow:
        await reg.meta.run(reg.meta.touch_upload, upload_id)
        raise RegistryError(
            ErrorCode.SIZE_INVALID,
            "chunk longer than its Content-Range: the upload keeps only the declared bytes",
            headers=_upload_headers(name, upload_id, size),
        )
    if expected is not None and offset is not None and size != offset + expected:
        raise RegistryError(ErrorCode.SIZE_INVALID, "chunk shorter than its Content-Range")
    await reg.meta.run(reg.meta.touch_upload, upload_id)
    return size


async def upload_session(request: web.Request, name: str, upload_id: str) -> web.StreamResponse:
    """GET (status), PATCH (chunk), PUT (finish) and DELETE (cancel) an upload session."""
    reg = registry_of(request)
    await _session(reg, name, upload_id)
    method = request.method
    if method in ("GET", "HEAD"):
        size = await _upload_size(reg, upload_id)
        return empty(204, _upload_headers(name, upload_id, size))
    if method == "PATCH":
        size = await _append(request, reg, name, upload_id)
        return empty(202, _upload_headers(name, upload_id, size))
    if method == "DELETE":
        await reg.store.abort(upload_id)
        await reg.meta.run(reg.meta.delete_upload, upload_id)
        return empty(204)
    # PUT: the last (possibly empty) chunk and the digest.
    raw_digest = request.query.get("digest")
    if not raw_digest:
        raise RegistryError(ErrorCode.DIGEST_INVALID, "finishing an upload needs ?digest=")
    digest = Digest.parse(raw_digest)
    if _has_body(request) or "Content-Range" in request.headers:
        await _append(request, reg, name, upload_id)
    link = _Link(reg, name, digest, upload_id)
    try:
        await reg.store.commit(upload_id, digest, before_install=link)
    except DigestMismatch as e:
        await reg.meta.run(reg.meta.delete_upload, upload_id)
        raise RegistryError(ErrorCode.DIGEST_INVALID, str(e), {"digest": str(digest)}) from None
    except UploadUnknown:
        raise RegistryError(
            ErrorCode.BLOB_UPLOAD_UNKNOWN, f"upload {upload_id} is unknown"
        ) from None
    except Exception as e:  # the storage failed: the upload stays, and so must its session
        await link.reopen(e)
        raise
    if reg.geo is not None:  # the copy is recorded before the client hears of it
        await reg.geo.stored(digest)
    return _blob_created(name, digest)
