"""`skyreg push PATH HOST/APP[/NAME][:TAG]`: push a local image to a registry, no skopeo needed.

`push_image` is the library function (`skyreg deploy --image PATH` reuses it): it reads a
docker-archive or an OCI layout (`imagesource.py`), asks the registry for every blob (HEAD) and
uploads only the missing ones (POST, streamed PATCH, PUT ?digest=), then puts the manifest.
Authentication: Basic with the token as password when the registry takes it (skyreg does),
otherwise the Bearer challenge flow against the realm the registry names.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import re
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TransferSpeedColumn,
)

from skyreg.cli.imagesource import (
    ArchiveLayer,
    Compression,
    GzipDigestCache,
    LayerHashes,
    OciLayout,
    SourceError,
    detect_source,
    gzip_stream,
    hash_layers,
    member_streams,
    open_oci_layout,
    read_chunks,
    read_docker_archive,
    sha256_digest,
)
from skyreg.oci.mediatypes import (
    DOCKER_MANIFEST,
    FOREIGN_LAYERS,
    INDEXES,
    OCI_INDEX,
    OCI_MANIFEST,
)
from skyreg.oci.reference import ImageReference
from skyreg.oci.reference import parse_reference as parse_image_reference

DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"

PATCH_SIZE = 64 * 1024 * 1024  # bytes per PATCH request of a blob upload
TIMEOUT = 120.0
USER_AGENT = "skyreg-push"


class PushError(Exception):
    """The push failed; the message is one line for the user."""


# -- references ----------------------------------------------------------------------------------


def parse_reference(text: str) -> ImageReference:
    """Parse `HOST[:PORT]/REPO[:TAG][@DIGEST]` (no tag and no digest: `latest`)."""
    try:
        target = parse_image_reference(text.strip().removeprefix("docker://"))
    except ValueError as e:
        raise PushError(f"invalid image reference {text[:300]!r}: {e}") from None
    if target.host is None:
        raise PushError(f"invalid image reference {text[:300]!r}: use HOST[:PORT]/APP[/NAME][:TAG]")
    return target.with_default_tag()


def registry_url(host: str, insecure: bool = False) -> str:
    """http:// for loopback hosts and with `insecure`, else https://."""
    hostname = urllib.parse.urlsplit("//" + host).hostname or ""
    loopback = hostname in ("localhost", "::1") or hostname.startswith("127.")
    return f"{'http' if insecure or loopback else 'https'}://{host}"


# -- HTTP ----------------------------------------------------------------------------------------


@dataclass
class _Response:
    status: int
    reason: str
    headers: http.client.HTTPMessage
    body: bytes

    def header(self, name: str) -> str:
        return self.headers.get(name) or ""


def _registry_error(resp: _Response) -> str:
    """`CODE: message` from a registry error body, else the HTTP status."""
    try:
        doc = json.loads(resp.body)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        errors = doc.get("errors")
        if isinstance(errors, list) and errors and isinstance(errors[0], dict):
            first = errors[0]
            return f"{first.get('code', resp.status)}: {first.get('message', '')}".rstrip(": ")
        for key in ("error_description", "message", "error", "details"):
            if isinstance(doc.get(key), str):
                return f"HTTP {resp.status}: {doc[key]}"
    return f"HTTP {resp.status} {resp.reason}".rstrip()


def _parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """(scheme, params) of a WWW-Authenticate value such as `Bearer realm="...",scope="..."`."""
    scheme, _, rest = header.strip().partition(" ")
    params = {
        m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
        for m in re.finditer(r'([A-Za-z_]+)=(?:"((?:[^"\\]|\\.)*)"|([^,\s]+))', rest)
    }
    return scheme.lower(), params


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
    ) -> _Response:
        parts = urllib.parse.urlsplit(url)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        all_headers = {"User-Agent": USER_AGENT, **headers}
        if auth:
            all_headers["Authorization"] = auth
        streamed = body is not None and not isinstance(body, bytes)
        if body is None and method in ("POST", "PUT", "PATCH"):
            body = b""
        for attempt in (0, 1):
            conn = self._connection(parts, fresh=streamed or attempt > 0)
            try:
                conn.request(
                    method, target, body=body, headers=all_headers, encode_chunked=streamed
                )
                resp = conn.getresponse()
                data = resp.read()
                if resp.will_close:
                    conn.close()
                return _Response(resp.status, resp.reason, resp.headers, data)
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                conn.close()
                if streamed or attempt:
                    raise PushError(f"{parts.netloc} closed the connection: {e}") from None
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                reason = reason or type(e).__name__
                raise PushError(f"cannot reach {parts.netloc}: {reason}") from None
            except BaseException:
                conn.close()
                raise
        raise AssertionError("unreachable")

    def url(self, path: str) -> str:
        return urllib.parse.urljoin(self.base_url, path)

    # -- authentication
    def _basic(self) -> str:
        return "Basic " + base64.b64encode(f"x:{self.token}".encode()).decode()

    def _default_scopes(self) -> list[str]:
        return [f"repository:{self.repository}:pull,push"]

    def login(self) -> None:
        """GET /v2/: keep Basic if the registry takes it, else follow its Bearer challenge."""
        self._auth = self._basic() if self.token else None
        resp = self._send("GET", self.url("/v2/"), {}, None, self._auth)
        if resp.status == 200:
            return
        if resp.status != 401:
            raise PushError(
                f"{self.base_url} is not a registry: GET /v2/ answered {_registry_error(resp)}"
            )
        scheme, params = _parse_challenge(resp.header("WWW-Authenticate"))
        if scheme == "bearer" and params.get("realm"):
            self._fetch_token(params, self._default_scopes())
            return
        raise PushError(f"authentication failed: {_registry_error(resp)}{self._token_hint()}")

    def _token_hint(self) -> str:
        return "" if self.token else " (no token: pass --token or set SKYREG_TOKEN)"

    def _fetch_token(self, challenge: dict[str, str], scopes: list[str]) -> None:
        query = [("service", challenge["service"])] if challenge.get("service") else []
        query += [("scope", s) for s in scopes]
        realm = challenge["realm"]
        url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(query)
        basic = self._basic() if self.token else None
        resp = self._send("GET", url, {"Accept": "application/json"}, None, basic)
        if resp.status != 200:
            raise PushError(
                f"authentication failed at {urllib.parse.urlsplit(realm).netloc}: "
                f"{_registry_error(resp)}{self._token_hint()}"
            )
        try:
            doc = json.loads(resp.body)
            token = doc.get("token") or doc.get("access_token")
            lifetime = float(doc.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError):
            token = None
            lifetime = 0.0
        if not isinstance(token, str) or not token:
            raise PushError(f"the token endpoint {realm} answered without a token")
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
    ) -> _Response:
        """Send with the current credentials; a 401 Bearer challenge to a request without a
        streamed body fetches a token for the scope it names and retries once."""
        replayable = body is None or isinstance(body, bytes)
        if not replayable:
            self._refresh_soon_expiring()
        resp = self._send(method, url, headers or {}, body, self._auth)
        if resp.status == 401 and replayable:
            scheme, params = _parse_challenge(resp.header("WWW-Authenticate"))
            if scheme == "bearer" and params.get("realm"):
                scopes = self._default_scopes()
                if params.get("scope") and params["scope"] not in scopes:
                    scopes.append(params["scope"])
                held = self._bearer[1] if self._bearer is not None else []
                same = params.get("error") == "insufficient_scope" and set(scopes) <= set(held)
                if not same:  # a new scope, an expired token, or no token yet: ask once
                    self._fetch_token(params, scopes)
                    resp = self._send(method, url, headers or {}, body, self._auth)
        return resp

    def fail(self, what: str, resp: _Response) -> PushError:
        hint = ""
        if resp.status == 401:
            _, params = _parse_challenge(resp.header("WWW-Authenticate"))
            if params.get("error") == "insufficient_scope":
                hint = (
                    f" (insufficient scope: the token does not grant {params.get('scope', 'it')})"
                )
            hint += self._token_hint()
        return PushError(f"{what} failed: {_registry_error(resp)}{hint}")

    # -- registry operations
    def blob_exists(self, digest: str) -> bool:
        url = self.url(f"/v2/{self.repository}/blobs/{digest}")
        resp = self.request("HEAD", url)
        if resp.status == 200 or 300 <= resp.status < 400:  # a redirect: it is in storage
            return True
        if resp.status == 404:
            return False
        if resp.status in (401, 403, 429):  # HEAD has no body: ask again for the error message
            resp = self._error_body(url, resp)
        raise self.fail(f"checking blob {_short(digest)} in {self.repository}", resp)

    def manifest_exists(self, digest: str) -> bool:
        url = self.url(f"/v2/{self.repository}/manifests/{digest}")
        resp = self.request("HEAD", url, {"Accept": ", ".join(_ALL_MANIFESTS)})
        if resp.status == 200:
            return True
        if resp.status == 404:
            return False
        if resp.status in (401, 403, 429):
            resp = self._error_body(url, resp)
        raise self.fail(f"checking manifest {_short(digest)} in {self.repository}", resp)

    def _error_body(self, url: str, head: _Response) -> _Response:
        resp = self.request("GET", url, {"Range": "bytes=0-0"})
        return resp if resp.status == head.status else head

    def upload(self, chunks: Iterable[bytes], digest_of_sent: Callable[[], str]) -> str:
        """Upload a blob streamed from `chunks` (POST, PATCH per PATCH_SIZE bytes, PUT ?digest=);
        `digest_of_sent()` gives the digest of the bytes the stream produced."""
        what = f"uploading to {self.repository}"
        resp = self.request("POST", self.url(f"/v2/{self.repository}/blobs/uploads/"))
        if resp.status != 202:
            raise self.fail(what, resp)
        location = self._location(resp, what)
        pieces = _Pieces(chunks)
        while not pieces.done:
            resp = self.request(
                "PATCH",
                location,
                {"Content-Type": "application/octet-stream"},
                pieces.next_piece(PATCH_SIZE),
            )
            if resp.status != 202:
                raise self.fail(what, resp)
            location = self._location(resp, what)
        digest = digest_of_sent()
        sep = "&" if urllib.parse.urlsplit(location).query else "?"
        resp = self.request("PUT", location + sep + urllib.parse.urlencode({"digest": digest}))
        if resp.status != 201:
            raise self.fail(f"finishing the upload of {_short(digest)}", resp)
        return digest

    def _location(self, resp: _Response, what: str) -> str:
        location = resp.header("Location")
        if not location:
            raise PushError(f"{what} failed: the registry sent no upload Location")
        return self.url(location)

    def put_manifest(self, reference: str, media_type: str, body: bytes) -> str:
        url = self.url(f"/v2/{self.repository}/manifests/{reference}")
        resp = self.request("PUT", url, {"Content-Type": media_type}, body)
        if resp.status not in (200, 201):
            raise self.fail(f"putting the manifest {self.repository}:{reference}", resp)
        return resp.header("Docker-Content-Digest")


_ALL_MANIFESTS = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, *INDEXES)


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


def _short(digest: str) -> str:
    algorithm, _, hex_part = digest.partition(":")
    return f"{algorithm}:{hex_part[:12]}"


# -- progress ------------------------------------------------------------------------------------


class _Progress:
    """One Rich bar per blob on stderr (bytes, rate, status), or nothing."""

    def __init__(self, enabled: bool) -> None:
        self._progress = (
            Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TextColumn("{task.fields[status]}"),
                console=Console(stderr=True),
            )
            if enabled
            else None
        )

    def __enter__(self) -> _Progress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()

    def add(self, description: str, total: int | None, status: str) -> TaskID:
        if self._progress is None:
            return TaskID(-1)
        return self._progress.add_task(description, total=total, status=status)

    def update(self, task: TaskID, **fields: Any) -> None:
        if self._progress is not None and task >= 0:
            self._progress.update(task, **fields)

    def done(self, task: TaskID, status: str) -> None:
        if self._progress is not None and task >= 0:
            total = self._progress.tasks[self._progress.task_ids.index(task)].total
            self._progress.update(task, completed=total or 0, status=status)


# -- pushing -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PushResult:
    """What was pushed: `reference` is `HOST/REPO@DIGEST`."""

    reference: str
    digest: str
    media_type: str
    size: int
    layers_uploaded: int
    layers_skipped: int
    bytes_uploaded: int


class _Pusher:
    def __init__(self, client: RegistryClient, progress: _Progress) -> None:
        self.client = client
        self.progress = progress
        self.uploaded: set[str] = set()
        self.skipped: set[str] = set()
        self.bytes_uploaded = 0

    def layer_task(self, digest: str, size: int, exists: bool) -> TaskID:
        """A progress bar for a layer; one the registry has is counted as skipped."""
        if not exists:
            return self.progress.add(_short(digest), size, "waiting")
        self.skipped.add(digest)
        task = self.progress.add(_short(digest), size, "exists")
        self.progress.done(task, "exists")
        return task

    def send(self, chunks: Iterable[bytes], task: TaskID) -> tuple[str, int]:
        """Upload a stream; (digest, size) of what was sent."""
        hasher = hashlib.sha256()
        sent = 0

        def counted() -> Iterator[bytes]:
            nonlocal sent
            for chunk in chunks:
                hasher.update(chunk)
                sent += len(chunk)
                self.progress.update(task, advance=len(chunk))
                yield chunk

        self.progress.update(task, status="pushing")
        digest = self.client.upload(counted(), lambda: "sha256:" + hasher.hexdigest())
        self.bytes_uploaded += sent
        self.progress.update(task, total=sent, completed=sent, status="pushed")
        return digest, sent

    def push_bytes(self, data: bytes, description: str) -> None:
        """A small blob (a config) from memory, unless the registry has it."""
        digest = sha256_digest(data)
        if self.client.blob_exists(digest):
            return
        task = self.progress.add(description, len(data), "waiting")
        self.send([data], task)


def push_image(
    source: Path | str,
    reference: str,
    token: str | None,
    *,
    progress: bool = True,
    ref: str | None = None,
    insecure: bool = False,
    cache: GzipDigestCache | None = None,
) -> PushResult:
    """Push a docker-archive tarball or an OCI image layout (`docker-archive:`/`oci:` prefixes
    work too; `ref` picks an image in a source holding several) to `reference`
    (`HOST[:PORT]/REPO[:TAG|@DIGEST]`). Blobs the registry has are not uploaded again.

    Raises PushError with a one-line message.
    """
    target = parse_reference(reference)
    try:
        src = detect_source(source, ref)
    except SourceError as e:
        raise PushError(str(e)) from None
    client = RegistryClient(
        registry_url(target.registry_host(), insecure), target.repository, token
    )
    try:
        with _Progress(progress) as bars:
            pusher = _Pusher(client, bars)
            client.login()
            if src.kind == "oci":
                manifest, media_type = _push_oci(pusher, src.path, src.ref)
            else:
                manifest, media_type = _push_docker_archive(
                    pusher, src.path, src.ref, cache or GzipDigestCache.default()
                )
            digest = sha256_digest(manifest)
            if target.digest is not None and target.digest != digest:
                raise PushError(
                    f"the image's manifest is {digest}, not {target.digest} as the reference says"
                )
            answered = client.put_manifest(target.tag or digest, media_type, manifest)
            if answered and answered != digest:
                raise PushError(f"the registry stored the manifest as {answered}, not {digest}")
    except SourceError as e:
        raise PushError(str(e)) from None
    finally:
        client.close()
    return PushResult(
        reference=f"{target.host}/{target.repository}@{digest}",
        digest=digest,
        media_type=media_type,
        size=len(manifest),
        layers_uploaded=len(pusher.uploaded),
        layers_skipped=len(pusher.skipped - pusher.uploaded),
        bytes_uploaded=pusher.bytes_uploaded,
    )


def _push_docker_archive(
    pusher: _Pusher, path: Path, ref: str | None, cache: GzipDigestCache
) -> tuple[bytes, str]:
    """Three passes at most: find the image, hash what the cache does not know, upload what the
    registry lacks. Returns the Docker schema 2 (or, with zstd layers, OCI) manifest."""
    bars = pusher.progress
    try:
        archive_size = path.stat().st_size
    except OSError as e:
        raise PushError(f"cannot read {path}: {e.strerror}") from None

    def reading(label: str) -> tuple[TaskID, Callable[[int], None]]:
        task = bars.add(label, archive_size, "")
        return task, lambda n: bars.update(task, advance=n)

    task, on_read = reading(f"reading {path.name}")
    archive = read_docker_archive(path, ref, on_read)
    bars.done(task, "")
    layers = archive.layers
    oci = any(layer.compression == "zstd" for layer in layers)

    # Digest and size of each layer as pushed.
    known: dict[str, tuple[str, int]] = {}
    to_hash: dict[str, Compression] = {}
    for layer in layers:
        cached = cache.get(layer.diff_id) if layer.compression == "none" else None
        if cached is not None:
            known[layer.member] = cached
        else:
            to_hash[layer.member] = layer.compression
    if to_hash:
        task, on_read = reading(f"hashing {len(to_hash)} layer(s)")
        hashes: dict[str, LayerHashes] = hash_layers(path, to_hash, on_read)
        bars.done(task, "")
        for layer in layers:
            if layer.member in known:
                continue
            found = hashes.get(layer.member)
            if found is None:
                raise PushError(f"{path}: could not read the layer {layer.member}")
            if layer.compression == "none":
                if found.sha256 != layer.diff_id:
                    raise PushError(
                        f"{path}: the layer {layer.member} is {found.sha256}, but the config "
                        f"says {layer.diff_id}"
                    )
                assert found.gzip_digest is not None and found.gzip_size is not None
                known[layer.member] = (found.gzip_digest, found.gzip_size)
                cache.put(layer.diff_id, found.gzip_digest, found.gzip_size)
            else:
                known[layer.member] = (found.sha256, _layer_size(layers, layer.member))
    cache.save()

    tasks: dict[str, TaskID] = {}
    missing: set[str] = set()
    by_digest: dict[str, str] = {}
    for layer in layers:
        if layer.member in tasks:
            continue
        digest, size = known[layer.member]
        if digest in by_digest:  # the same bytes under another name: pushed once
            tasks[layer.member] = tasks[by_digest[digest]]
            continue
        by_digest[digest] = layer.member
        exists = pusher.client.blob_exists(digest)
        tasks[layer.member] = pusher.layer_task(digest, size, exists)
        if not exists:
            missing.add(layer.member)
    pusher.push_bytes(archive.config, "config")
    if missing:
        compression = {layer.member: layer.compression for layer in layers}
        for member, chunks in member_streams(path, missing):
            stream = gzip_stream(chunks) if compression[member] == "none" else chunks
            digest, size = pusher.send(stream, tasks[member])
            expected = known[member][0]
            if digest != expected:
                if compression[member] != "none":
                    raise PushError(f"{path}: the layer {member} changed while it was pushed")
                for layer in layers:  # a stale cache entry: trust what was sent
                    if known[layer.member][0] == expected:
                        cache.put(layer.diff_id, digest, size)
                        known[layer.member] = (digest, size)
            known[member] = (digest, size)
            pusher.uploaded.add(digest)
            missing.discard(member)
        cache.save()
        if missing:
            raise PushError(f"{path}: the layer {sorted(missing)[0]} vanished while reading")

    def layer_type(compression: str) -> str:
        if oci:
            return OCI_LAYER_ZSTD if compression == "zstd" else OCI_LAYER_GZIP
        return DOCKER_LAYER_GZIP

    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST if oci else DOCKER_MANIFEST,
        "config": {
            "mediaType": OCI_CONFIG if oci else DOCKER_CONFIG,
            "size": len(archive.config),
            "digest": sha256_digest(archive.config),
        },
        "layers": [
            {
                "mediaType": layer_type(layer.compression),
                "size": known[layer.member][1],
                "digest": known[layer.member][0],
            }
            for layer in layers
        ],
    }
    return json.dumps(manifest, indent=3).encode(), OCI_MANIFEST if oci else DOCKER_MANIFEST


def _layer_size(layers: Iterable[ArchiveLayer], member: str) -> int:
    return next(layer.size for layer in layers if layer.member == member)


def _push_oci(pusher: _Pusher, path: Path, ref: str | None) -> tuple[bytes, str]:
    """Push the blobs (and, for an index, the child manifests) of the chosen layout entry;
    returns its manifest exactly as stored in the layout."""
    layout, descriptor = open_oci_layout(path, ref)
    raw = layout.read_blob(descriptor["digest"])
    media_type = _media_type(descriptor, raw)
    _push_oci_blobs(pusher, layout, raw, media_type, depth=0)
    return raw, media_type


def _media_type(descriptor: dict[str, Any], raw: bytes) -> str:
    value = descriptor.get("mediaType")
    if isinstance(value, str) and value:
        return value
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = {}
    value = doc.get("mediaType") if isinstance(doc, dict) else None
    if isinstance(value, str) and value:
        return value
    return OCI_INDEX if isinstance(doc, dict) and "manifests" in doc else OCI_MANIFEST


def _push_oci_blobs(
    pusher: _Pusher, layout: OciLayout, raw: bytes, media_type: str, depth: int
) -> None:
    if depth > 4:
        raise PushError(f"{layout.path}: indexes nested too deeply")
    try:
        doc = json.loads(raw)
    except ValueError:
        raise PushError(f"{layout.path}: a manifest is not JSON") from None
    if not isinstance(doc, dict):
        raise PushError(f"{layout.path}: a manifest is not a JSON object")
    if media_type in INDEXES or "manifests" in doc:
        for child in doc.get("manifests") or []:
            digest = child.get("digest") if isinstance(child, dict) else None
            if not isinstance(digest, str):
                raise PushError(f"{layout.path}: an index entry has no digest")
            if pusher.client.manifest_exists(digest):
                continue
            child_raw = layout.read_blob(digest)
            child_type = _media_type(child, child_raw)
            _push_oci_blobs(pusher, layout, child_raw, child_type, depth + 1)
            pusher.client.put_manifest(digest, child_type, child_raw)
        return
    blobs: list[tuple[dict[str, Any], bool]] = []
    if isinstance(doc.get("config"), dict):
        blobs.append((doc["config"], False))
    blobs += [(layer, True) for layer in doc.get("layers") or [] if isinstance(layer, dict)]
    for desc, is_layer in blobs:
        digest = desc.get("digest")
        if not isinstance(digest, str):
            raise PushError(f"{layout.path}: a manifest names a blob without a digest")
        if desc.get("mediaType") in FOREIGN_LAYERS and desc.get("urls"):
            continue
        if digest in pusher.uploaded or digest in pusher.skipped:
            continue
        size = int(desc.get("size") or 0)
        exists = pusher.client.blob_exists(digest)
        if not is_layer:
            if not exists:
                _send_file(pusher, layout, digest, pusher.progress.add("config", size, "waiting"))
            continue
        task = pusher.layer_task(digest, size, exists)
        if not exists:
            _send_file(pusher, layout, digest, task)
            pusher.uploaded.add(digest)


def _send_file(pusher: _Pusher, layout: OciLayout, digest: str, task: TaskID) -> None:
    blob = layout.blob_path(digest)
    try:
        f = open(blob, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        raise PushError(f"{layout.path}: blob {digest} is missing") from None
    except OSError as e:
        raise PushError(f"cannot read {blob}: {e.strerror}") from None
    with f:
        sent, _ = pusher.send(read_chunks(f, blob), task)
    if sent != digest:
        raise PushError(f"{layout.path}: blob {digest} does not match its digest")


# -- the command ---------------------------------------------------------------------------------


def _saved_token(host: str) -> str | None:
    """The token `skyreg login` saved, if it was saved for this host."""
    from skyreg.cli.client import read_config

    config = read_config()
    server, token = config.get("server"), config.get("token")
    if (
        isinstance(server, str)
        and isinstance(token, str)
        and urllib.parse.urlsplit(server).netloc == host
    ):
        return token
    return None


def push(
    source: Annotated[
        str,
        typer.Argument(
            metavar="PATH",
            help="A docker-archive tarball (plain or gzip'd, e.g. nix's ./result) or an OCI "
            "image layout directory; docker-archive:PATH and oci:DIR[:REF] work too.",
            show_default=False,
        ),
    ],
    reference: Annotated[
        str,
        typer.Argument(
            metavar="HOST/APP[/NAME][:TAG]",
            help="Where to push, e.g. registry.example.com/myapp:v1 (no tag: latest).",
            show_default=False,
        ),
    ],
    ref: Annotated[
        str | None,
        typer.Option(
            "--ref", help="Which image of the source: an OCI ref name or a docker RepoTag."
        ),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="SKYREG_TOKEN",
            help="Access token (default: from `skyreg login`, for that server).",
            show_default=False,
        ),
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Plain HTTP (loopback hosts always use it).")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Push a local image; prints HOST/REPO@DIGEST. Layers the registry has are skipped."""
    from skyreg.cli.client import fail

    try:
        target = parse_reference(reference)
        result = push_image(
            source,
            reference,
            token or _saved_token(target.registry_host()),
            progress=not quiet,
            ref=ref,
            insecure=insecure,
        )
    except PushError as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted", 130)
    typer.echo(result.reference)
    if not quiet:
        typer.echo(
            f"Pushed {target}: {result.layers_uploaded} layer(s) uploaded, "
            f"{result.layers_skipped} already present.",
            err=True,
        )


def register(app: typer.Typer) -> None:
    """Add `skyreg push` to the `skyreg` command."""
    app.command()(push)
