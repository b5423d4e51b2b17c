"""`RegistryClient`: one repository on one OCI registry, over keep-alive http.client connections.

Authentication: Basic with the token as password when the registry takes it (skyreg does),
otherwise the Docker token flow: a 401 `Bearer realm=…,service=…,scope=…` challenge is answered by
a token from the realm, and a request without a streamed body is sent again once with it.
Blobs go up monolithically (one POST ?digest=) or in pieces (POST, PATCH per piece, PUT ?digest=);
a chunked upload with a known size sends each piece with its Content-Range and carries on from the
size the registry holds after an interruption. Blobs come down streamed, from an offset with Range.
Every failure is a `RegistryClientError` with a one-line message; responses read into memory are
bounded (`MAX_RESPONSE_BYTES`), blob bodies are streamed.
"""

from __future__ import annotations

import hashlib
import http.client
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from skyreg.client.protocol import (
    ALL_MANIFESTS,
    REDIRECTS,
    RegistryClientError,
    basic_authorization,
    bearer_challenge,
    blob_path,
    content_range_start,
    held_bytes,
    manifest_path,
    parse_challenge,
    parse_token,
    registry_error,
    repository_scope,
    short_digest,
    token_url,
    uploads_path,
)

DEFAULT_PIECE_SIZE = 64 * 1024 * 1024  # bytes per PATCH request of a chunked upload
TIMEOUT = 120.0
USER_AGENT = "skyreg-push"
MAX_RESPONSE_BYTES = 16 * 1024 * 1024  # a body read into memory: errors, tokens, manifests
READ_SIZE = 1024 * 1024  # bytes per read of a streamed blob body
MAX_REDIRECTS = 5
MAX_OFFSET_RETRIES = 3  # a chunked upload re-reading its offset after a 416


class Sink(Protocol):
    """Where a pulled blob's bytes go (a file opened for writing, a BytesIO)."""

    def write(self, data: bytes, /) -> object:
        """Write all of `data`."""
        ...


@dataclass
class Response:
    """A registry answer; `stream` is set (and `body` empty) for a streamed 2xx body."""

    status: int
    reason: str
    headers: http.client.HTTPMessage
    body: bytes
    stream: http.client.HTTPResponse | None = None
    connection: http.client.HTTPConnection | None = None

    def header(self, name: str) -> str:
        """The header's value, or "" when absent."""
        return self.headers.get(name) or ""


def _registry_error(resp: Response) -> str:
    """`CODE: message` from a registry error body, else the HTTP status."""
    return registry_error(resp.status, resp.reason, resp.body)


class RegistryClient:
    """One repository on one registry, over keep-alive http.client connections."""

    def __init__(self, base_url: str, repository: str, token: str | None) -> None:
        self.base_url = base_url
        self.repository = repository
        self.token = token
        self._auth: str | None = None
        self._bearer: tuple[dict[str, str], list[str], float] | None = None
        self._conns: dict[str, http.client.HTTPConnection] = {}

    # -- transport
    def _connection(
        self, parts: urllib.parse.SplitResult, fresh: bool
    ) -> http.client.HTTPConnection:
        key = f"{parts.scheme}://{parts.netloc}"
        conn = self._conns.get(key)
        if conn is not None and fresh:
            conn.close()
            conn = None
        if conn is None:
            host, port = parts.hostname or "", parts.port
            if parts.scheme == "https":
                conn = http.client.HTTPSConnection(host, port, timeout=TIMEOUT)
            else:
                conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
            self._conns[key] = conn
        return conn

    def close(self) -> None:
        """Close every connection (the client can still be used: it reconnects)."""
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()

    def _send(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        body: bytes | Iterable[bytes] | None,
        auth: str | None,
        stream: bool = False,
    ) -> Response:
        parts = urllib.parse.urlsplit(url)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        all_headers = {"User-Agent": USER_AGENT, **headers}
        if auth:
            all_headers["Authorization"] = auth
        streamed = body is not None and not isinstance(body, bytes)
        chunked = streamed and "Content-Length" not in headers
        if body is None and method in ("POST", "PUT", "PATCH"):
            body = b""
        for attempt in (0, 1):
            conn = self._connection(parts, fresh=streamed or attempt > 0)
            try:
                conn.request(method, target, body=body, headers=all_headers, encode_chunked=chunked)
                resp = conn.getresponse()
                if stream and 200 <= resp.status < 300:
                    return Response(resp.status, resp.reason, resp.headers, b"", resp, conn)
                data = resp.read(MAX_RESPONSE_BYTES + 1)
                if len(data) > MAX_RESPONSE_BYTES:
                    conn.close()
                    raise RegistryClientError(
                        f"{parts.netloc} answered {method} with more than "
                        f"{MAX_RESPONSE_BYTES} bytes"
                    )
                resp.read()  # at the end already: marks the response done for keep-alive
                if resp.will_close:
                    conn.close()
                return Response(resp.status, resp.reason, resp.headers, data)
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                conn.close()
                if streamed or attempt:
                    raise RegistryClientError(
                        f"{parts.netloc} closed the connection: {e}"
                    ) from None
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                reason = reason or type(e).__name__
                raise RegistryClientError(f"cannot reach {parts.netloc}: {reason}") from None
            except BaseException:
                conn.close()
                raise
        raise AssertionError("unreachable")

    def url(self, path: str) -> str:
        """`path` (or a Location header) resolved against the registry's URL."""
        return urllib.parse.urljoin(self.base_url, path)

    # -- authentication
    def _basic(self) -> str:
        return basic_authorization("x", self.token or "")

    def _default_scopes(self) -> list[str]:
        return [repository_scope(self.repository, "pull,push")]

    def login(self) -> None:
        """GET /v2/: keep Basic if the registry takes it, else follow its Bearer challenge."""
        self._auth = self._basic() if self.token else None
        resp = self._send("GET", self.url("/v2/"), {}, None, self._auth)
        if resp.status == 200:
            return
        if resp.status != 401:
            raise RegistryClientError(
                f"{self.base_url} is not a registry: GET /v2/ answered {_registry_error(resp)}"
            )
        challenge = bearer_challenge(resp.header("WWW-Authenticate"))
        if challenge is not None:
            self._fetch_token(challenge, self._default_scopes())
            return
        raise RegistryClientError(
            f"authentication failed: {_registry_error(resp)}{self._token_hint()}"
        )

    def _token_hint(self) -> str:
        return "" if self.token else " (no token: pass --token or set SKYREG_TOKEN)"

    def _fetch_token(self, challenge: dict[str, str], scopes: list[str]) -> None:
        realm = challenge["realm"]
        url = token_url(challenge, scopes)
        basic = self._basic() if self.token else None
        resp = self._send("GET", url, {"Accept": "application/json"}, None, basic)
        if resp.status != 200:
            raise RegistryClientError(
                f"authentication failed at {urllib.parse.urlsplit(realm).netloc}: "
                f"{_registry_error(resp)}{self._token_hint()}"
            )
        answer = parse_token(resp.body)
        if answer is None:
            raise RegistryClientError(f"the token endpoint {realm} answered without a token")
        token, lifetime = answer
        self._auth = f"Bearer {token}"
        self._bearer = (challenge, scopes, time.monotonic() + lifetime)

    def _refresh_soon_expiring(self) -> None:
        """Before a streamed request (it cannot be retried): renew a Bearer token near its end."""
        if self._bearer is not None and self._bearer[2] - time.monotonic() < 60:
            self._fetch_token(self._bearer[0], self._bearer[1])

    def request(
        self,
        method: str,
        url: str,
        headers: dict[str, str] | None = None,
        body: bytes | Iterable[bytes] | None = None,
        stream: bool = False,
    ) -> Response:
        """Send with the current credentials; a 401 Bearer challenge to a request without a
        streamed body fetches a token for the scope it names and retries once. With `stream`,
        a 2xx body is left to read from `Response.stream`."""
        replayable = body is None or isinstance(body, bytes)
        if not replayable:
            self._refresh_soon_expiring()
        resp = self._send(method, url, headers or {}, body, self._auth, stream)
        if resp.status == 401 and replayable:
            params = bearer_challenge(resp.header("WWW-Authenticate"))
            if params is not None:
                scopes = self._default_scopes()
                if params.get("scope") and params["scope"] not in scopes:
                    scopes.append(params["scope"])
                held = self._bearer[1] if self._bearer is not None else []
                same = params.get("error") == "insufficient_scope" and set(scopes) <= set(held)
                if not same:  # a new scope, an expired token, or no token yet: ask once
                    self._fetch_token(params, scopes)
                    resp = self._send(method, url, headers or {}, body, self._auth, stream)
        return resp

    def fail(self, what: str, resp: Response) -> RegistryClientError:
        """The error for `what` failing with `resp` (the registry's code and message)."""
        hint = ""
        if resp.status == 401:
            _, params = parse_challenge(resp.header("WWW-Authenticate"))
            if params.get("error") == "insufficient_scope":
                hint = (
                    f" (insufficient scope: the token does not grant {params.get('scope', 'it')})"
                )
            hint += self._token_hint()
        return RegistryClientError(f"{what} failed: {_registry_error(resp)}{hint}")

    # -- registry operations
    def blob_exists(self, digest: str) -> bool:
        """HEAD the blob in this repository: True if the registry has it."""
        url = self.url(blob_path(self.repository, digest))
        resp = self.request("HEAD", url)
        if resp.status == 200 or 300 <= resp.status < 400:  # a redirect: it is in storage
            return True
        if resp.status == 404:
            return False
        if resp.status in (401, 403, 429):  # HEAD has no body: ask again for the error message
            resp = self._error_body(url, resp)
        raise self.fail(f"checking blob {short_digest(digest)} in {self.repository}", resp)

    def manifest_exists(self, digest: str) -> bool:
        """HEAD the manifest in this repository: True if the registry has it."""
        url = self.url(manifest_path(self.repository, digest))
        resp = self.request("HEAD", url, {"Accept": ", ".join(ALL_MANIFESTS)})
        if resp.status == 200:
            return True
        if resp.status == 404:
            return False
        if resp.status in (401, 403, 429):
            resp = self._error_body(url, resp)
        raise self.fail(f"checking manifest {short_digest(digest)} in {self.repository}", resp)

    def _error_body(self, url: str, head: Response) -> Response:
        resp = self.request("GET", url, {"Range": "bytes=0-0"})
        return resp if resp.status == head.status else head

    def push_blob(self, data: bytes, digest: str | None = None, skip_existing: bool = True) -> str:
        """Monolithic upload of a blob held in memory: one POST ?digest= with the bytes (after a
        HEAD, unless `skip_existing` is off: a blob the registry has is not sent). Returns the
        digest (`digest`, or the bytes' SHA-256); the registry refuses bytes that do not match."""
        digest = digest or "sha256:" + hashlib.sha256(data).hexdigest()
        if skip_existing and self.blob_exists(digest):
            return digest
        query = urllib.parse.urlencode({"digest": digest})
        resp = self.request(
            "POST",
            self.url(f"{uploads_path(self.repository)}?{query}"),
            {"Content-Type": "application/octet-stream"},
            data,
        )
        if resp.status != 201:
            raise self.fail(f"uploading {short_digest(digest)} to {self.repository}", resp)
        return digest

    def start_upload(self) -> str:
        """POST an upload session; returns its location."""
        what = f"uploading to {self.repository}"
        resp = self.request("POST", self.url(uploads_path(self.repository)))
        if resp.status != 202:
            raise self.fail(what, resp)
        return self._location(resp, what)

    def upload_offset(self, location: str) -> tuple[str, int]:
        """(location, bytes held) of an upload under way, from its status (GET)."""
        what = f"resuming an upload to {self.repository}"
        resp = self.request("GET", location)
        if resp.status != 204:
            raise self.fail(what, resp)
        return self._location(resp, what), held_bytes(resp.header("Range"))

    def finish_upload(self, location: str, digest: str) -> str:
        """PUT ?digest= on the upload: the registry checks the bytes and stores the blob."""
        sep = "&" if urllib.parse.urlsplit(location).query else "?"
        resp = self.request("PUT", location + sep + urllib.parse.urlencode({"digest": digest}))
        if resp.status != 201:
            raise self.fail(f"finishing the upload of {short_digest(digest)}", resp)
        return digest

    def upload(
        self,
        chunks: Iterable[bytes],
        digest_of_sent: Callable[[], str],
        piece_size: int = DEFAULT_PIECE_SIZE,
    ) -> str:
        """Upload a blob of unknown size streamed from `chunks` (POST, PATCH per `piece_size`
        bytes, PUT ?digest=); `digest_of_sent()` gives the digest of the bytes the stream
        produced. A stream cannot be rewound: an interrupted upload starts again."""
        what = f"uploading to {self.repository}"
        location = self.start_upload()
        pieces = _Pieces(chunks)
        while not pieces.done:
            resp = self.request(
                "PATCH",
                location,
                {"Content-Type": "application/octet-stream"},
                pieces.next_piece(piece_size),
            )
            if resp.status != 202:
                raise self.fail(what, resp)
            location = self._location(resp, what)
        return self.finish_upload(location, digest_of_sent())

    def push_blob_chunked(
        self,
        open_at: Callable[[int], Iterable[bytes]],
        size: int,
        digest: str,
        piece_size: int = DEFAULT_PIECE_SIZE,
        location: str | None = None,
        skip_existing: bool = True,
    ) -> str:
        """Chunked upload of a `size`-byte blob whose bytes from any offset `open_at(offset)`
        gives: PATCH pieces of at most `piece_size` bytes with their Content-Range, then PUT
        ?digest=. Without `location` a blob the registry has is not sent (HEAD) and a new
        upload starts; with the `location` of an upload under way (`start_upload`, or one an
        interrupted push left) it carries on from the bytes the registry holds."""
        what = f"uploading to {self.repository}"
        if location is None:
            if skip_existing and self.blob_exists(digest):
                return digest
            location, held = self.start_upload(), 0
        else:
            location, held = self.upload_offset(location)
        retries = 0
        pieces = _Pieces(open_at(held))
        while held < size:
            n = min(piece_size, size - held)
            headers = {
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{held}-{held + n - 1}",
                "Content-Length": str(n),
            }
            resp = self.request("PATCH", location, headers, _exactly(pieces.next_piece(n), n))
            if resp.status == 416 and retries < MAX_OFFSET_RETRIES:
                # The registry holds another size (an interrupted PATCH's bytes landed late).
                retries += 1
                now = held_bytes(resp.header("Range"))
                held = 1 if now == held == 0 else now
                location = self._location(resp, what) if resp.header("Location") else location
                pieces = _Pieces(open_at(held))
                continue
            if resp.status != 202:
                raise self.fail(what, resp)
            location = self._location(resp, what)
            held += n
        if held > size:
            raise RegistryClientError(
                f"{what} failed: the registry holds {held} bytes of a {size}-byte blob"
            )
        return self.finish_upload(location, digest)

    def _location(self, resp: Response, what: str) -> str:
        location = resp.header("Location")
        if not location:
            raise RegistryClientError(f"{what} failed: the registry sent no upload Location")
        return self.url(location)

    def put_manifest(self, reference: str, media_type: str, body: bytes) -> str:
        """PUT a manifest under a tag or digest; returns the digest the registry answered."""
        url = self.url(manifest_path(self.repository, reference))
        resp = self.request("PUT", url, {"Content-Type": media_type}, body)
        if resp.status not in (200, 201):
            raise self.fail(f"putting the manifest {self.repository}:{reference}", resp)
        return resp.header("Docker-Content-Digest")

    def pull_blob(
        self, digest: str, sink: Sink, offset: int = 0, max_bytes: int | None = None
    ) -> int:
        """Write the blob's bytes from `offset` on (`Range: bytes=offset-`) to `sink`; returns
        how many were written. Redirects (a store's presigned URL) are followed without the
        credentials when they leave the registry's host. A whole blob (offset 0) is checked
        against its digest; more than `max_bytes` bytes is an error."""
        what = f"pulling blob {short_digest(digest)} from {self.repository}"
        url = self.url(blob_path(self.repository, digest))
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        resp = self.request("GET", url, headers, stream=True)
        for _ in range(MAX_REDIRECTS):
            location = resp.header("Location")
            if resp.status not in REDIRECTS or not location:
                break
            target = urllib.parse.urljoin(url, location)
            same_host = urllib.parse.urlsplit(target).netloc == urllib.parse.urlsplit(url).netloc
            auth = self._auth if same_host else None
            resp, url = self._send("GET", target, headers, None, auth, stream=True), target
        if resp.stream is None or resp.status not in (200, 206):
            raise self.fail(what, resp)
        body, conn = resp.stream, resp.connection
        skip = 0
        if offset and resp.status == 206:
            if content_range_start(resp.header("Content-Range")) != offset:
                if conn is not None:
                    conn.close()
                raise RegistryClientError(f"{what} failed: the registry answered another range")
        elif offset:
            skip = offset  # a 200 is the whole blob: drop what the caller holds
        algorithm, _, expected = digest.partition(":")
        hasher = (
            hashlib.new(algorithm) if not offset and algorithm in ("sha256", "sha512") else None
        )
        written = 0
        try:
            while chunk := body.read(READ_SIZE):
                if skip:
                    dropped = min(skip, len(chunk))
                    chunk, skip = chunk[dropped:], skip - dropped
                if max_bytes is not None and written + len(chunk) > max_bytes:
                    raise RegistryClientError(f"{what} failed: more than {max_bytes} bytes")
                sink.write(chunk)
                if hasher is not None:
                    hasher.update(chunk)
                written += len(chunk)
        except (OSError, http.client.HTTPException) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise RegistryClientError(f"{what} failed: {reason or type(e).__name__}") from None
        finally:
            if not body.isclosed() and conn is not None:
                conn.close()
        if hasher is not None and hasher.hexdigest() != expected:
            raise RegistryClientError(f"{what} failed: the bytes do not match the digest")
        return written


def _exactly(piece: Iterable[bytes], n: int) -> Iterator[bytes]:
    """The piece's bytes, ending the request with an error (not a stall: the registry waits for
    the Content-Length it was promised) when the source ends before `n` bytes."""
    sent = 0
    for chunk in piece:
        sent += len(chunk)
        yield chunk
    if sent != n:
        raise RegistryClientError(f"the blob's source ended after {sent} of {n} bytes")


class _Pieces:
    """Splits a byte stream into PATCH bodies of at most n bytes, without copying it whole."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._it = iter(chunks)
        self._pending = b""
        self.done = False

    def next_piece(self, limit: int) -> Iterator[bytes]:
        sent = 0
        while sent < limit:
            if self._pending:
                chunk, self._pending = self._pending, b""
            else:
                chunk = next(self._it, b"")
                if not chunk:
                    if not self._peek_end():
                        continue
                    self.done = True
                    return
            if sent + len(chunk) > limit:
                chunk, self._pending = chunk[: limit - sent], chunk[limit - sent :]
            sent += len(chunk)
            yield chunk
        if not self._pending and self._peek_end():
            self.done = True

    def _peek_end(self) -> bool:
        """True at the end of the stream (else the next chunk is kept pending)."""
        for chunk in self._it:
            if chunk:
                self._pending = chunk
                return False
        return True
