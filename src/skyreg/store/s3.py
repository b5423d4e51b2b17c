"""The S3 blob store: blobs as objects in a bucket, uploads as S3 multipart uploads.

Layout under the key prefix:
    blobs/<algorithm>/<first two hex>/<hex>    verified blobs, never modified
    uploads/<upload id>/state                  JSON: the upload's commit point (see below)
    uploads/<upload id>/tail-<random>          bytes not yet forming a whole part
    uploads/<upload id>/data                   the multipart upload's object (exists once a
                                               commit completed it; copied to blobs/ then)

All upload state is in the bucket, so any node (or this one after a restart) continues any
upload. An OCI chunk may be any size, an S3 part (but the last) at least 5 MiB: incoming bytes
go through a bounded buffer, each full part is uploaded as it fills (one in flight while the next
fills), and what is left over is written as a fresh tail object. The state object, written last,
records the size, the S3 UploadId, every completed part (number, ETag, size), the tail, and the
running SHA-256 (`resumable.py`), so the next chunk continues the hash without re-reading a byte.
A crash before the state write leaves the previous state intact: parts uploaded since are simply
uploaded again under the same numbers (replacing them), and the unused tail is an orphan that
goes with the upload.

A commit checks the digest from the saved hash before anything becomes visible, completes the
multipart upload (the tail as the last part) and copies the object server-side to its blob key.
The multipart upload cannot be started at the blob key: the digest is unknown until the commit.
`put`, which knows the digest up front, uploads to the blob key directly and completes only
after the bytes are verified. Digests other than SHA-256 (sha512) are checked by reading the
completed object back before it is copied, like the filesystem store re-reads its file.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import json
import logging
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession
from botocore.exceptions import ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as EndpointUnreachable

from skyreg.oci.digest import Digest
from skyreg.store import resumable
from skyreg.store.base import BeforeInstall, StorageUnavailable, UploadUnknown
from skyreg.store.resumable import ResumableSha256
from skyreg.store.uploads import UPLOAD_ID_RE, VerifiedUploads, check_upload_id, verify

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef

log = logging.getLogger("skyreg.store.s3")

MIN_PART_SIZE = 5 << 20  # S3: every part but the last
MAX_PART_SIZE = 5 << 30
MAX_PARTS = 10_000
MAX_COPY_SIZE = 5 << 30  # the largest single CopyObject

_HASH_BATCH = 1 << 20
_READ_CHUNK = 1 << 20
_COPY_CONCURRENCY = 4
_MISSING = frozenset({"404", "NoSuchKey", "NotFound"})
# An unreachable endpoint must answer the client within seconds, not after botocore's default
# minute-long timeouts and 5 retries with up to 20 s backoff: 3 attempts in all (backoff at most
# 1 + 2 s), 3 s to connect. A connection that stays silent is given 60 s (botocore's default):
# a server-side copy of a multi-GiB part can take that long before its answer starts.
_CONNECT_TIMEOUT = 3
_READ_TIMEOUT = 60
_ATTEMPTS = 3

_P = ParamSpec("_P")
_R = TypeVar("_R")


@dataclass(frozen=True)
class PartSizes:
    """How big each part of a multipart upload is, by part number.

    The first `per_tier` parts are `base` bytes, the next `per_tier` twice that, and so on (at
    most 5 GiB), so small blobs use small parts while 10,000 parts still cover S3's largest
    object: with the defaults, 8 MiB parts up to 7.8 GiB and 8 TiB in all. A function of the
    part number alone, so every node cuts the same parts.
    """

    base: int = 8 << 20
    per_tier: int = 1000

    def __post_init__(self) -> None:
        if not MIN_PART_SIZE <= self.base <= MAX_PART_SIZE:
            raise ValueError(f"part size must be between {MIN_PART_SIZE} and {MAX_PART_SIZE}")
        if self.per_tier < 1:
            raise ValueError("per_tier must be at least 1")

    def size(self, part_number: int) -> int:
        """Bytes in part `part_number` (1-based) unless it is the last."""
        tier = (part_number - 1) // self.per_tier
        return MAX_PART_SIZE if tier >= 10 else min(self.base << tier, MAX_PART_SIZE)

    def parts_for(self, total: int) -> int:
        """How many parts a blob of `total` bytes takes."""
        parts, covered = 0, 0
        while covered < total:
            parts += 1
            covered += self.size(parts)
        return max(parts, 1)

    def capacity(self, parts: int = MAX_PARTS) -> int:
        """The largest blob `parts` parts hold."""
        return sum(self.size(n) for n in range(1, parts + 1))


@dataclass
class _Part:
    number: int
    etag: str
    size: int


@dataclass
class _UploadState:
    """An upload as the bucket knows it; serialized as the `state` object."""

    key: str  # where the multipart upload completes
    size: int = 0
    upload_id: str | None = None  # the S3 UploadId, once a part was cut
    parts: list[_Part] = field(default_factory=list)
    tail: str | None = None  # key of the bytes after the last part
    tail_size: int = 0
    sha256: bytes | None = None  # ResumableSha256 state of all `size` bytes, if resumable
    completed: bool = False  # the multipart upload is complete: `key` holds every byte

    @property
    def sealed(self) -> bool:
        """A commit completed the multipart upload: no more bytes may be appended."""
        return self.completed

    def encode(self) -> bytes:
        return json.dumps(
            {
                "version": 1,
                "key": self.key,
                "size": self.size,
                "upload_id": self.upload_id,
                "parts": [[p.number, p.etag, p.size] for p in self.parts],
                "tail": self.tail,
                "tail_size": self.tail_size,
                "sha256": base64.b64encode(self.sha256).decode() if self.sha256 else None,
                "completed": self.completed,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def decode(cls, raw: bytes) -> _UploadState:
        doc = json.loads(raw)
        if doc.get("version") != 1:
            raise ValueError(f"unknown upload state version {doc.get('version')!r}")
        sha = doc.get("sha256")
        return cls(
            key=str(doc["key"]),
            size=int(doc["size"]),
            upload_id=doc.get("upload_id"),
            parts=[_Part(int(n), str(e), int(s)) for n, e, s in doc.get("parts", [])],
            tail=doc.get("tail"),
            tail_size=int(doc.get("tail_size", 0)),
            sha256=base64.b64decode(sha) if sha else None,
            completed=bool(doc.get("completed", False)),
        )

    def running_hash(self) -> ResumableSha256 | None:
        """The SHA-256 of the bytes so far, restored; None when it cannot be continued."""
        if not resumable.available():
            return None
        if self.size == 0:
            return ResumableSha256()
        if self.sha256 is None:
            return None
        try:
            return ResumableSha256(self.sha256)
        except ValueError:
            return None


def _error_code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def _unreachable(e: BaseException) -> bool:
    """Whether `e` means the S3 endpoint did not answer (or answered only that it cannot)."""
    if isinstance(e, EndpointUnreachable | HTTPClientError):
        return True  # refused, timed out, connection closed or broken mid-response
    if isinstance(e, ClientError):
        return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)) >= 500
    # A body stream of ours broke; a builtin ConnectionError is the client's request going away.
    return isinstance(e, aiohttp.ClientError) and not isinstance(e, ConnectionError)


def _reaching(
    method: Callable[Concatenate[S3BlobStore, _P], Awaitable[_R]],
) -> Callable[Concatenate[S3BlobStore, _P], Coroutine[Any, Any, _R]]:
    """An S3BlobStore method whose unreachable endpoint is StorageUnavailable (see `_lost`)."""

    async def call(self: S3BlobStore, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            result = await method(self, *args, **kwargs)
        except Exception as e:
            if _unreachable(e):
                raise self._lost(e) from e
            raise
        self._reached()
        return result

    functools.update_wrapper(call, method)
    return call


def _md5(data: bytes) -> str:
    """Content-MD5 of a request body: S3 rejects a part that arrived damaged."""
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()


def _normalize_prefix(prefix: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/" if prefix else ""


class _PartWriter:
    """Uploads the parts of one multipart upload in order, one in flight at a time."""

    def __init__(
        self,
        store: S3BlobStore,
        client: S3Client,
        state: _UploadState,
        on_create: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._store = store
        self._client = client
        self.state = state
        self.next_number = len(state.parts) + 1
        self._inflight: asyncio.Task[None] | None = None
        self._on_create = on_create

    async def add(self, data: bytes) -> None:
        """Start uploading `data` as the next part (waits for the previous one first)."""
        await self.finish()
        if self.state.upload_id is None:
            created = await self._client.create_multipart_upload(
                Bucket=self._store.bucket, Key=self.state.key
            )
            self.state.upload_id = created["UploadId"]
            if self._on_create is not None:
                await self._on_create()
        number = self.next_number
        self.next_number += 1
        self._inflight = asyncio.ensure_future(self._upload(number, data))

    async def _upload(self, number: int, data: bytes) -> None:
        assert self.state.upload_id is not None
        md5 = await self._store._in_thread(_md5, data)
        resp = await self._client.upload_part(
            Bucket=self._store.bucket,
            Key=self.state.key,
            UploadId=self.state.upload_id,
            PartNumber=number,
            Body=data,
            ContentMD5=md5,
        )
        self.state.parts.append(_Part(number, resp["ETag"], len(data)))

    async def finish(self) -> None:
        """Wait for the part in flight (raising its error)."""
        task, self._inflight = self._inflight, None
        if task is not None:
            await task

    async def cancel(self) -> None:
        task, self._inflight = self._inflight, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


class S3BlobStore(VerifiedUploads[_UploadState]):
    """Blobs in an S3 bucket (AWS or any S3-compatible store), through aiobotocore.

    Credentials, region and endpoint not given here come from the standard AWS configuration
    (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE, AWS_REGION,
    AWS_ENDPOINT_URL, ~/.aws/config, instance roles). With `redirect`, pulls are answered with a
    presigned URL of the blob's object (valid `redirect_expiry` seconds).
    """

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        session_token: str | None = None,
        profile: str | None = None,
        redirect: bool = False,
        redirect_expiry: int = 1200,
        part_sizes: PartSizes | None = None,
        max_copy_size: int = MAX_COPY_SIZE,
        max_connections: int = 64,
    ) -> None:
        super().__init__()
        self.bucket = bucket
        self.prefix = _normalize_prefix(prefix)
        self.part_sizes = part_sizes or PartSizes()
        self._redirect = redirect
        self._redirect_expiry = redirect_expiry
        self._max_copy_size = min(max_copy_size, MAX_COPY_SIZE)
        self._session = AioSession(profile=profile)
        if region is None:
            region = self._session.get_config_variable("region") or "us-east-1"
        self._client_args: dict[str, Any] = {
            "region_name": region,
            "endpoint_url": endpoint_url,
            "aws_access_key_id": access_key_id,
            "aws_secret_access_key": secret_access_key,
            "aws_session_token": session_token,
            "config": AioConfig(
                signature_version="s3v4",
                # S3-compatible stores at an endpoint of their own rarely do virtual hosts.
                s3={
                    "addressing_style": "path" if endpoint_url else "auto",
                    # Parts carry Content-MD5 (computed off the event loop) instead of a
                    # SHA-256 of the body in the signature, which would be computed on it.
                    "payload_signing_enabled": False,
                },
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                max_pool_connections=max_connections,
                connect_timeout=_CONNECT_TIMEOUT,
                read_timeout=_READ_TIMEOUT,
                retries={"total_max_attempts": _ATTEMPTS, "mode": "standard"},
            ),
        }
        self._down = False  # the last S3 call found the endpoint unreachable
        self._clients: dict[
            asyncio.AbstractEventLoop, tuple[asyncio.Future[S3Client], asyncio.Task[None]]
        ] = {}
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="s3hash")

    # -- the client: one per event loop, closed when that loop shuts down ----------------------

    async def _client(self) -> S3Client:
        loop = asyncio.get_running_loop()
        entry = self._clients.get(loop)
        if entry is None:
            ready: asyncio.Future[S3Client] = loop.create_future()
            keeper = loop.create_task(self._keep_client(loop, ready), name="s3-client")
            entry = self._clients[loop] = (ready, keeper)
        return await asyncio.shield(entry[0])

    async def _keep_client(
        self, loop: asyncio.AbstractEventLoop, ready: asyncio.Future[S3Client]
    ) -> None:
        """Own the client until cancelled (by `aclose`, or by asyncio.run ending the loop)."""
        try:
            async with self._session.create_client("s3", **self._client_args) as client:
                ready.set_result(client)
                await loop.create_future()
        except Exception as e:
            if not ready.done():
                ready.set_exception(e)
        finally:
            if not ready.done():
                ready.cancel()
            entry = self._clients.get(loop)
            if entry is not None and entry[0] is ready:
                del self._clients[loop]

    async def aclose(self) -> None:
        """Close this event loop's client."""
        entry = self._clients.pop(asyncio.get_running_loop(), None)
        if entry is not None:
            entry[1].cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await entry[1]

    def close(self) -> None:
        """Stop the hashing threads (clients close with their event loops, or `aclose`)."""
        self._executor.shutdown(wait=False)
        for loop in [loop for loop in self._clients if loop.is_closed()]:
            del self._clients[loop]

    async def check(self) -> None:
        """Fail unless the bucket is reachable with these credentials."""
        client = await self._client()
        await client.head_bucket(Bucket=self.bucket)

    def _lost(self, error: BaseException) -> StorageUnavailable:
        """The error to raise for an unreachable endpoint; logged once per outage, not per call."""
        if not self._down:
            self._down = True
            log.warning("storage unreachable: blob requests answer 503 until it is back: %s", error)
        return StorageUnavailable(f"the S3 endpoint did not answer: {error}")

    def _reached(self) -> None:
        if self._down:
            self._down = False
            log.info("storage reachable again")

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- keys --------------------------------------------------------------------------------

    def blob_key(self, digest: Digest) -> str:
        """The object key of a verified blob."""
        return f"{self.prefix}blobs/{digest.algorithm}/{digest.hex[:2]}/{digest.hex}"

    def _upload_dir(self, upload_id: str) -> str:
        return f"{self.prefix}uploads/{check_upload_id(upload_id)}/"

    def _state_key(self, upload_id: str) -> str:
        return self._upload_dir(upload_id) + "state"

    # -- small object helpers ----------------------------------------------------------------

    async def _head(self, client: S3Client, key: str) -> int | None:
        try:
            resp = await client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as e:
            if _error_code(e) in _MISSING:
                return None
            raise
        return int(resp["ContentLength"])

    async def _get_bytes(self, client: S3Client, key: str) -> bytes | None:
        try:
            resp = await client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as e:
            if _error_code(e) in _MISSING:
                return None
            raise
        async with resp["Body"] as body:
            return await body.read()

    async def _put_bytes(self, client: S3Client, key: str, data: bytes) -> None:
        md5 = await self._in_thread(_md5, data) if len(data) > 65536 else _md5(data)
        await client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentMD5=md5)

    async def _delete_keys(self, client: S3Client, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = keys[i : i + 1000]
            resp = await client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
            )
            errors = resp.get("Errors") or []
            if errors:
                raise RuntimeError(f"could not delete {len(errors)} objects: {errors[0]}")

    async def _list(self, client: S3Client, prefix: str) -> list[tuple[str, datetime]]:
        found: list[tuple[str, datetime]] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
            if token:
                kwargs["ContinuationToken"] = token
            resp = await client.list_objects_v2(**kwargs)
            found += [(o["Key"], o["LastModified"]) for o in resp.get("Contents", [])]
            token = resp.get("NextContinuationToken")
            if not resp.get("IsTruncated") or not token:
                return found

    async def _list_multipart(
        self, client: S3Client, prefix: str
    ) -> list[tuple[str, str, datetime]]:
        found: list[tuple[str, str, datetime]] = []
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        while True:
            resp = await client.list_multipart_uploads(**kwargs)
            found += [(u["Key"], u["UploadId"], u["Initiated"]) for u in resp.get("Uploads", [])]
            if not resp.get("IsTruncated"):
                return found
            kwargs["KeyMarker"] = resp.get("NextKeyMarker", "")
            kwargs["UploadIdMarker"] = resp.get("NextUploadIdMarker", "")

    async def _abort_multipart(self, client: S3Client, key: str, upload_id: str) -> None:
        try:
            await client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except ClientError as e:
            if _error_code(e) not in ("NoSuchUpload", *_MISSING):
                raise

    # -- blobs -------------------------------------------------------------------------------

    @_reaching
    async def stat(self, digest: Digest) -> int | None:
        return await self._head(await self._client(), self.blob_key(digest))

    def local_path(self, digest: Digest) -> Path | None:
        return None

    async def read(
        self, digest: Digest, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]:
        if length is not None and length <= 0:
            return
        client = await self._client()
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self.blob_key(digest)}
        if offset or length is not None:
            end = "" if length is None else str(offset + length - 1)
            kwargs["Range"] = f"bytes={offset}-{end}"
        try:
            try:
                resp = await client.get_object(**kwargs)
            except ClientError as e:
                code = _error_code(e)
                if code in _MISSING:
                    raise FileNotFoundError(str(digest)) from None
                if code == "InvalidRange":  # offset at or past the end: nothing to read
                    return
                raise
            async with resp["Body"] as body:
                async for chunk in body.iter_chunks(_READ_CHUNK):
                    yield chunk
        except Exception as e:
            if _unreachable(e):
                raise self._lost(e) from e
            raise
        self._reached()

    async def redirect_url(self, digest: Digest) -> str | None:
        if not self._redirect:
            return None
        client = await self._client()
        return await client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self.blob_key(digest)},
            ExpiresIn=self._redirect_expiry,
        )

    @_reaching
    async def delete(self, digest: Digest) -> bool:
        client = await self._client()
        key = self.blob_key(digest)
        if await self._head(client, key) is None:
            return False
        await client.delete_object(Bucket=self.bucket, Key=key)
        return True

    @_reaching
    async def put(
        self,
        digest: Digest,
        chunks: AsyncIterable[bytes],
        *,
        before_install: BeforeInstall | None = None,
    ) -> int:
        """Stream a blob whose digest is known: a multipart upload at the blob key itself,
        completed only once the bytes hash to `digest` and `before_install` returned (a small
        blob: one PUT after both). A mismatch, a failed hook or a broken stream aborts the
        multipart upload: nothing appears at the blob key.
        """
        # A crash mid-put leaves a multipart upload behind: a state object lets idle_uploads
        # find it and abort() remove it, like any other upload. Its lock, held throughout, keeps
        # reclaim off it while the bytes stream in or the hook waits.
        put_id = f"put-{uuid.uuid4().hex}"
        async with self.upload_locks.hold(put_id):
            return await self._put(digest, chunks, put_id, before_install)

    async def _put(
        self,
        digest: Digest,
        chunks: AsyncIterable[bytes],
        put_id: str,
        before_install: BeforeInstall | None,
    ) -> int:
        client = await self._client()
        state = _UploadState(key=self.blob_key(digest))
        state_key = self._state_key(put_id)
        recorded = False

        async def record() -> None:
            nonlocal recorded
            await self._put_bytes(client, state_key, state.encode())
            recorded = True

        writer = _PartWriter(self, client, state, on_create=record)
        hasher = hashlib.new(digest.algorithm)
        buf = bytearray()
        done = False
        try:
            received, interrupted = await self._receive(chunks, hasher, buf, writer)
            if interrupted is not None:
                raise interrupted
            await writer.finish()
            verify(digest, Digest(digest.algorithm, hasher.hexdigest()))
            if before_install is not None:
                await before_install(received)
            if state.upload_id is None:
                await self._put_bytes(client, state.key, bytes(buf))
            else:
                if buf:
                    await writer.add(bytes(buf))
                    await writer.finish()
                await self._complete(client, state)
            done = True
            return received
        finally:
            if not done:
                await writer.cancel()
                if state.upload_id is not None:
                    await self._abort_multipart(client, state.key, state.upload_id)
            if recorded:
                await client.delete_object(Bucket=self.bucket, Key=state_key)

    # -- uploads -----------------------------------------------------------------------------

    async def _load(self, client: S3Client, upload_id: str) -> _UploadState:
        raw = await self._get_bytes(client, self._state_key(upload_id))
        if raw is None:
            raise UploadUnknown(upload_id)
        return _UploadState.decode(raw)

    async def _save(self, client: S3Client, upload_id: str, state: _UploadState) -> None:
        await self._put_bytes(client, self._state_key(upload_id), state.encode())

    @_reaching
    async def create_upload(self, upload_id: str) -> None:
        client = await self._client()
        state = _UploadState(key=self._upload_dir(upload_id) + "data")
        if resumable.available():
            state.sha256 = ResumableSha256().state()
        await self._save(client, upload_id, state)

    @_reaching
    async def upload_size(self, upload_id: str) -> int:
        return (await self._load(await self._client(), upload_id)).size

    @_reaching
    async def _open_upload(self, upload_id: str) -> _UploadState:
        return await self._load(await self._client(), upload_id)

    @_reaching
    async def _write_upload(
        self, upload_id: str, upload: _UploadState, chunks: AsyncIterable[bytes]
    ) -> int:
        client = await self._client()
        state = upload
        old_tail = state.tail
        buf = bytearray()
        if old_tail is not None:
            tail = await self._get_bytes(client, old_tail)
            if tail is None or len(tail) != state.tail_size:
                raise RuntimeError(f"upload {upload_id}: tail object {old_tail} is damaged")
            buf += tail
        hasher = state.running_hash()
        writer = _PartWriter(self, client, state)
        try:
            received, interrupted = await self._receive(chunks, hasher, buf, writer)
            await writer.finish()
        except BaseException:
            await writer.cancel()
            raise
        if received:
            # Whatever arrived is kept (a client that went away may resume from there).
            state.size += received
            state.sha256 = hasher.state() if hasher is not None else None
            state.tail_size = len(buf)
            state.tail = None
            if buf:
                state.tail = f"{self._upload_dir(upload_id)}tail-{uuid.uuid4().hex}"
                await self._put_bytes(client, state.tail, bytes(buf))
            await self._save(client, upload_id, state)  # the commit point
            if old_tail is not None and old_tail != state.tail:
                with contextlib.suppress(ClientError):
                    await client.delete_object(Bucket=self.bucket, Key=old_tail)
        if interrupted is not None:
            raise interrupted
        return state.size

    async def _receive(
        self,
        chunks: AsyncIterable[bytes],
        hasher: Any,
        buf: bytearray,
        writer: _PartWriter,
    ) -> tuple[int, Exception | None]:
        """Hash `chunks` (in a worker thread, one batch while the next arrives) and add them to
        `buf`, handing every full part to `writer`. Returns the bytes received and the error
        that ended the stream early (the client went away), if any; S3 errors propagate."""
        loop = asyncio.get_running_loop()
        received = 0
        interrupted: Exception | None = None
        batch = bytearray()
        hashing: asyncio.Future[None] | None = None
        sizes = self.part_sizes
        iterator = aiter(chunks)
        try:
            while True:
                try:
                    chunk = await anext(iterator)
                except StopAsyncIteration:
                    break
                except Exception as e:
                    interrupted = e
                    break
                if not chunk:
                    continue
                received += len(chunk)
                buf += chunk
                if hasher is not None:
                    batch += chunk
                    if len(batch) >= _HASH_BATCH:
                        if hashing is not None:
                            await hashing
                        hashing = loop.run_in_executor(self._executor, hasher.update, batch)
                        batch = bytearray()
                while len(buf) >= (n := sizes.size(writer.next_number)):
                    part = bytes(memoryview(buf)[:n])
                    del buf[:n]
                    await writer.add(part)
        finally:
            if hashing is not None:
                await hashing
        if batch and hasher is not None:
            await loop.run_in_executor(self._executor, hasher.update, batch)
        return received, interrupted

    async def _complete(self, client: S3Client, state: _UploadState) -> None:
        assert state.upload_id is not None
        parts: list[CompletedPartTypeDef] = [
            {"PartNumber": p.number, "ETag": p.etag}
            for p in sorted(state.parts, key=lambda p: p.number)
        ]
        await client.complete_multipart_upload(
            Bucket=self.bucket,
            Key=state.key,
            UploadId=state.upload_id,
            MultipartUpload={"Parts": parts},
        )

    async def _materialize(
        self, client: S3Client, upload_id: str, state: _UploadState
    ) -> str | None:
        """The key of one object holding every byte of the upload (None: it is empty)."""
        if state.completed:
            return state.key
        if state.upload_id is None:
            return state.tail
        try:
            if state.tail is not None:
                tail = await self._get_bytes(client, state.tail)
                if tail is None or len(tail) != state.tail_size:
                    raise RuntimeError(f"upload {upload_id}: tail object {state.tail} is damaged")
                writer = _PartWriter(self, client, state)
                await writer.add(tail)
                await writer.finish()
            await self._complete(client, state)
        except ClientError as e:
            # A commit that crashed after completing leaves an UploadId S3 no longer knows.
            if _error_code(e) != "NoSuchUpload" or await self._head(client, state.key) != (
                state.size
            ):
                raise
        state.completed = True
        await self._save(client, upload_id, state)
        return state.key

    @_reaching
    async def _upload_digest(self, upload_id: str, upload: _UploadState, algorithm: str) -> Digest:
        running = upload.running_hash() if algorithm == "sha256" else None
        if running is not None:
            return Digest("sha256", running.hexdigest())
        # No saved hash for this algorithm: complete the multipart upload and read it back.
        client = await self._client()
        source = await self._materialize(client, upload_id, upload)
        return await self._hash_object(client, source, algorithm)

    @_reaching
    async def _install_upload(self, upload_id: str, upload: _UploadState, digest: Digest) -> None:
        client = await self._client()
        target = self.blob_key(digest)
        if await self._head(client, target) is None:
            source = await self._materialize(client, upload_id, upload)
            await self._install(client, source, target, upload.size)
        await self._discard(client, upload_id, upload)

    async def _hash_object(self, client: S3Client, key: str | None, algorithm: str) -> Digest:
        """Hash an object's bytes as they stream in (for digests without a saved state)."""
        hasher = hashlib.new(algorithm)
        if key is not None:
            resp = await client.get_object(Bucket=self.bucket, Key=key)
            hashing: asyncio.Future[None] | None = None
            batch = bytearray()
            async with resp["Body"] as body:
                async for chunk in body.iter_chunks(_READ_CHUNK):
                    batch += chunk
                    if len(batch) >= _HASH_BATCH:
                        if hashing is not None:
                            await hashing
                        hashing = asyncio.ensure_future(self._in_thread(hasher.update, batch))
                        batch = bytearray()
            if hashing is not None:
                await hashing
            if batch:
                await self._in_thread(hasher.update, batch)
        return Digest(algorithm, hasher.hexdigest())

    async def _install(self, client: S3Client, source: str | None, target: str, size: int) -> None:
        """Copy the verified bytes to the blob key, server-side."""
        if source is None:
            await client.put_object(Bucket=self.bucket, Key=target, Body=b"")
            return
        if size <= self._max_copy_size:
            await client.copy_object(
                Bucket=self.bucket, Key=target, CopySource={"Bucket": self.bucket, "Key": source}
            )
            return
        # Larger than one CopyObject may be: a multipart copy, a few ranges at a time.
        part = max(self._max_copy_size // 2, -(-size // MAX_PARTS), MIN_PART_SIZE)
        created = await client.create_multipart_upload(Bucket=self.bucket, Key=target)
        upload = created["UploadId"]
        limit = asyncio.Semaphore(_COPY_CONCURRENCY)

        async def copy(number: int, start: int) -> CompletedPartTypeDef:
            end = min(start + part, size) - 1
            async with limit:
                resp = await client.upload_part_copy(
                    Bucket=self.bucket,
                    Key=target,
                    UploadId=upload,
                    PartNumber=number,
                    CopySource={"Bucket": self.bucket, "Key": source},
                    CopySourceRange=f"bytes={start}-{end}",
                )
            return {"PartNumber": number, "ETag": resp["CopyPartResult"]["ETag"]}

        try:
            parts = await asyncio.gather(
                *(copy(i + 1, start) for i, start in enumerate(range(0, size, part)))
            )
            await client.complete_multipart_upload(
                Bucket=self.bucket, Key=target, UploadId=upload, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            await self._abort_multipart(client, target, upload)
            raise

    @_reaching
    async def _discard_upload(self, upload_id: str, upload: _UploadState | None) -> None:
        await self._discard(await self._client(), upload_id, upload)

    @_reaching
    async def _upload_footprint(self, upload_id: str) -> int:
        try:
            return (await self._open_upload(upload_id)).size
        except UploadUnknown:
            return 0

    async def _discard(self, client: S3Client, upload_id: str, state: _UploadState | None) -> None:
        """Remove an upload: its multipart uploads, its objects, and last its state (so a crash
        half-way leaves an upload that idle_uploads still finds)."""
        directory = self._upload_dir(upload_id)
        if state is not None and state.upload_id is not None and not state.completed:
            await self._abort_multipart(client, state.key, state.upload_id)
        for key, mpu, _ in await self._list_multipart(client, directory):
            await self._abort_multipart(client, key, mpu)
        state_key = self._state_key(upload_id)
        keys = [key for key, _ in await self._list(client, directory) if key != state_key]
        await self._delete_keys(client, keys)
        await client.delete_object(Bucket=self.bucket, Key=state_key)

    @_reaching
    async def idle_uploads(self, idle_since: datetime) -> list[str]:
        client = await self._client()
        root = f"{self.prefix}uploads/"
        newest: dict[str, datetime] = {}  # an upload is its state plus its other objects
        for key, modified in await self._list(client, root):
            upload_id = key[len(root) :].split("/", 1)[0]
            newest[upload_id] = max(modified, newest.get(upload_id, modified))
        for key, _, initiated in await self._list_multipart(client, root):
            upload_id = key[len(root) :].split("/", 1)[0]
            newest[upload_id] = max(initiated, newest.get(upload_id, initiated))
        return sorted(
            u for u, t in newest.items() if t < idle_since and UPLOAD_ID_RE.match(u) is not None
        )
