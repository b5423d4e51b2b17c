"""`AsyncRegistryClient`: reading from one OCI registry on asyncio (aiohttp), for the agent's
image preparation (`machines/prepare.py`) and the transfers between regions
(`geo/transfer.py`).

Authentication: Basic credentials (any username, a token as password) are sent with every
request, unless `send_basic` is off (registries that take only Bearer tokens); a 401 with a
`Bearer realm=…,scope=…` challenge fetches a token for that scope from the realm (with the Basic
credentials, if any) and sends the request once more with it; tokens are kept per repository
until shortly before they expire. A token the realm refuses leaves the first 401 as the answer.
Credentials go only to the registry: only a challenge from its own origin is followed (not one
from a host a redirect led to, which aiohttp sends no credentials), the realm must be an
absolute http(s) URL without credentials in it, and the Basic credentials go to a realm only at
the registry's origin or over https (a cleartext realm elsewhere is asked anonymously).

What it reads is bounded: manifests by the caller's limit (refused before reading when the
Content-Length already says so), error and token bodies by 64 KiB, blob streams by the caller's
limit. Blob streams start at an offset with `Range: bytes=N-`; a 206 must start there.
Connection failures and timeouts are the session's (`aiohttp.ClientError`, `TimeoutError`) and
reach the caller unchanged: it knows whether to try elsewhere.
"""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
from multidict import CIMultiDictProxy

from skyreg.client.protocol import (
    ALL_MANIFESTS,
    MAX_ERROR_BODY,
    MAX_TOKEN_BODY,
    RegistryClientError,
    ResponseTooLarge,
    basic_authorization,
    bearer_challenge,
    blob_path,
    content_range_start,
    first_error,
    manifest_path,
    origin,
    parse_token,
    realm_takes_credentials,
    repository_scope,
    short_digest,
    token_url,
)

READ_SIZE = 1 << 20  # bytes per chunk of a streamed body
TOKEN_MARGIN = 10.0  # seconds before its expiry a token is no longer sent


@dataclass(frozen=True)
class Answer:
    """A registry's answer read whole: status, headers and a bounded body (for an error: its
    first 64 KiB)."""

    status: int
    reason: str
    headers: CIMultiDictProxy[str]
    body: bytes = b""

    def error_code(self) -> str:
        """The first OCI error code of the body, else the HTTP reason."""
        first = first_error(self.body)
        return first[0] if first is not None and first[0] else self.reason


@dataclass
class BlobStream:
    """A blob GET under way: `status` and `headers` at once; for a 200/206 `chunks()` gives the
    bytes from `offset` (the requested offset on a 206, 0 on a 200: the registry ignored the
    Range) up to the client's bound, for anything else `answer` holds the error body."""

    status: int
    reason: str
    headers: CIMultiDictProxy[str]
    offset: int
    answer: Answer | None
    _response: aiohttp.ClientResponse | None
    _max_bytes: int | None
    _what: str

    def error_code(self) -> str:
        """The first OCI error code of an error answer, else the HTTP reason."""
        return self.answer.error_code() if self.answer is not None else self.reason

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive; more than the client's bound is ResponseTooLarge."""
        if self._response is None:
            return
        position = self.offset
        async for chunk in self._response.content.iter_chunked(READ_SIZE):
            position += len(chunk)
            if self._max_bytes is not None and position > self._max_bytes:
                raise ResponseTooLarge(
                    f"{self._what}: more than {self._max_bytes} bytes", self._max_bytes, None
                )
            yield chunk


@dataclass
class _Token:
    value: str
    expires: float


@dataclass
class AsyncRegistryClient:
    """Reads one registry (`base_url`) over an aiohttp session the caller owns.

    `password` (a token) goes out as Basic credentials with `username`; `headers` are added to
    every request to the registry (never to a token realm). Without `token_flow` a 401 is the
    answer: no credential goes to a realm a response names."""

    base_url: str
    session: aiohttp.ClientSession
    password: str | None = None
    username: str = "x"
    send_basic: bool = True
    token_flow: bool = True
    headers: Mapping[str, str] = field(default_factory=dict)
    _tokens: dict[str, _Token] = field(default_factory=dict)
    _token_locks: dict[str, asyncio.Lock] = field(default_factory=dict)

    def url(self, path: str) -> str:
        """`path` resolved against the registry's URL."""
        return urllib.parse.urljoin(self.base_url + "/", path.lstrip("/"))

    # -- operations ------------------------------------------------------------------------------

    async def get_manifest(
        self,
        repository: str,
        reference: str,
        max_bytes: int,
        accept: tuple[str, ...] | list[str] = ALL_MANIFESTS,
    ) -> Answer:
        """GET a manifest by tag or digest: its exact bytes (at most `max_bytes`, else
        ResponseTooLarge) and headers, or the error answer. The digest is not checked here."""
        what = f"manifest {repository}@{reference}"
        headers = {"Accept": ", ".join(accept)}
        path = manifest_path(repository, reference)
        async with self._request("GET", repository, path, headers) as got:
            if isinstance(got, Answer):
                return got
            if got.status != 200:
                return await _answer(got)
            body = await _read_bounded(got, max_bytes, what)
            return Answer(got.status, got.reason or "", got.headers, body)

    async def head_blob(self, repository: str, digest: str) -> Answer:
        """HEAD a blob: 200 when `repository` may read it (404 for a blob not linked to it)."""
        async with self._request("HEAD", repository, blob_path(repository, digest), {}) as got:
            return got if isinstance(got, Answer) else await _answer(got)

    @asynccontextmanager
    async def blob(
        self, repository: str, digest: str, offset: int = 0, max_bytes: int | None = None
    ) -> AsyncIterator[BlobStream]:
        """GET a blob from `offset` on (`Range: bytes=offset-`); its bytes are streamed from
        the BlobStream, up to byte `max_bytes` of the blob (from a 206 at `offset`: at most
        `max_bytes - offset` bytes; from a 200: `max_bytes`). A 206 that starts elsewhere is a
        RegistryClientError."""
        what = f"blob {short_digest(digest)} from {repository}"
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        async with self._request("GET", repository, blob_path(repository, digest), headers) as got:
            if isinstance(got, Answer) or got.status not in (200, 206):
                answer = got if isinstance(got, Answer) else await _answer(got)
                yield BlobStream(
                    answer.status, answer.reason, answer.headers, 0, answer, None, None, what
                )
                return
            start = 0
            if got.status == 206:
                start = content_range_start(got.headers.get("Content-Range", "")) or 0
                if start != offset:
                    raise RegistryClientError(
                        f"{what}: asked for bytes from {offset}, the registry answered another "
                        "range"
                    )
            yield BlobStream(
                got.status, got.reason or "", got.headers, start, None, got, max_bytes, what
            )

    # -- requests and tokens ---------------------------------------------------------------------

    @asynccontextmanager
    async def _request(
        self, method: str, repository: str, path: str, headers: dict[str, str]
    ) -> AsyncIterator[aiohttp.ClientResponse | Answer]:
        """Send with the current credentials; a 401 Bearer challenge fetches a token and the
        request goes out once more. Yields the open response, or the first 401 read whole when
        no token could be had for it."""
        url = self.url(path)
        scope = repository_scope(repository, "pull")
        token = self._token(scope)
        resp = await self._send(method, url, headers, token)
        try:
            challenge = bearer_challenge(resp.headers.get("WWW-Authenticate", ""))
            # Only the registry's own challenge counts: a host a redirect led to (storage)
            # must not name a realm that would get the credential aiohttp kept from it.
            if (
                resp.status == 401
                and challenge is not None
                and self.token_flow
                and origin(str(resp.url)) == origin(self.base_url)
            ):
                first = await _answer(resp)
                resp.release()
                token = await self._fetch_token(challenge, scope, token)
                if token is None:
                    yield first
                    return
                resp = await self._send(method, url, headers, token)
            yield resp
        finally:
            resp.release()

    async def _send(
        self, method: str, url: str, headers: dict[str, str], token: str | None
    ) -> aiohttp.ClientResponse:
        all_headers = {**self.headers, **headers}
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        elif self.send_basic and self.password:
            all_headers["Authorization"] = basic_authorization(self.username, self.password)
        return await self.session.request(method, url, headers=all_headers)

    def _token(self, scope: str) -> str | None:
        held = self._tokens.get(scope)
        if held is None or held.expires - time.monotonic() < TOKEN_MARGIN:
            return None
        return held.value

    async def _fetch_token(
        self, challenge: dict[str, str], scope: str, refused: str | None
    ) -> str | None:
        """A token for `scope` (and the challenge's), once for concurrent requests: a token
        another request fetched meanwhile is used. None when the realm gives none."""
        lock = self._token_locks.setdefault(scope, asyncio.Lock())
        async with lock:
            current = self._token(scope)
            if current is not None and current != refused:
                return current
            realm = challenge["realm"]
            if origin(realm) is None:
                return None  # not an absolute http(s) URL, or one carrying credentials
            scopes = [scope]
            if challenge.get("scope") and challenge["scope"] not in scopes:
                scopes.append(challenge["scope"])
            headers = {"Accept": "application/json"}
            if self.password and realm_takes_credentials(realm, self.base_url):
                headers["Authorization"] = basic_authorization(self.username, self.password)
            async with self.session.get(token_url(challenge, scopes), headers=headers) as resp:
                if resp.status != 200:
                    return None
                body = await _read_up_to(resp, MAX_TOKEN_BODY + 1)
            answer = parse_token(body)
            if answer is None:
                return None
            value, lifetime = answer
            self._tokens[scope] = _Token(value, time.monotonic() + lifetime)
            return value


async def _answer(resp: aiohttp.ClientResponse) -> Answer:
    """The response with at most 64 KiB of its body (an error body)."""
    body = b"" if resp.method == "HEAD" else await _read_up_to(resp, MAX_ERROR_BODY)
    return Answer(resp.status, resp.reason or "", resp.headers, body)


async def _read_up_to(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body's first `limit` bytes (all of it when shorter); the rest is left unread."""
    body = bytearray()
    while len(body) < limit:
        chunk = await resp.content.read(limit - len(body))
        if not chunk:
            break
        body += chunk
    return bytes(body)


async def _read_bounded(resp: aiohttp.ClientResponse, limit: int, what: str) -> bytes:
    """The whole body of `resp`, refusing more than `limit` bytes."""
    if (resp.content_length or 0) > limit:
        raise ResponseTooLarge(
            f"{what}: {resp.content_length} bytes, more than {limit}", limit, resp.content_length
        )
    body = bytearray()
    async for chunk in resp.content.iter_chunked(READ_SIZE):
        body += chunk
        if len(body) > limit:
            raise ResponseTooLarge(f"{what}: more than {limit} bytes", limit, None)
    return bytes(body)
