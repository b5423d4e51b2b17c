"""`skyreg.client.RegistryClient` against a real `skyreg serve` with auth on: the Bearer
challenge answered, monolithic and chunked pushes, an interrupted chunked push resumed, blobs the
registry has not sent again, a blob pulled from an offset with Range; and `AsyncRegistryClient`:
the challenge answered and retried once, Range, bounded reads."""

from __future__ import annotations

import asyncio
import io
import os
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests

from skyreg.client import RegistryClient, RegistryClientError
from skyreg.client.aio import AsyncRegistryClient
from skyreg.client.protocol import ResponseTooLarge
from skyreg.oci.mediatypes import OCI_MANIFEST
from tests.support.inprocess import InProcessRegistry
from tests.support.oci import image_manifest, sha256
from tests.support.platform import Tenancy
from tests.support.servers import ServedRegistry

PIECE = 64 * 1024


@dataclass
class Setup:
    server: ServedRegistry
    token: str  # deploy token of app "web" in org "acme"
    open_token: str  # deploy token of the public app "open"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    server = InProcessRegistry(
        data_dir=tmp_path_factory.mktemp("client") / "data", options={"access_log": True}
    )
    server.start()
    try:
        tenancy = Tenancy(server.data_dir)
        tenancy.org("acme")
        tenancy.app("web", "acme")
        tenancy.app("open", "acme", public=True)
        secret, _ = tenancy.token("deploy", org="acme", app="web")
        open_secret, _ = tenancy.token("deploy", org="acme", app="open")
        yield Setup(server, secret, open_secret)
    finally:
        server.stop()


@pytest.fixture
def client(setup: Setup) -> Iterator[RegistryClient]:
    c = RegistryClient(setup.server.url, f"web/{uuid.uuid4().hex[:10]}", setup.token)
    try:
        yield c
    finally:
        c.close()


def stored(setup: Setup, repository: str, digest: str) -> bytes:
    r = requests.get(
        f"{setup.server.url}/v2/{repository}/blobs/{digest}", auth=("x", setup.token), timeout=30
    )
    assert r.status_code == 200, (r.status_code, r.text)
    return r.content


def requests_since(setup: Setup, offset: int, last: str) -> list[str]:
    """Access-log request lines written since `offset`, once a line containing `last` is there
    (the server logs a request after its response went out, so the client can be faster)."""
    deadline = time.monotonic() + 10
    while True:
        lines = [line for line in setup.server.log()[offset:].splitlines() if '"' in line]
        if any(last in line for line in lines):
            return lines
        assert time.monotonic() < deadline, f"no {last!r} in the access log: {lines}"
        time.sleep(0.05)


class Source:
    """A seekable blob source: records the offsets it was opened at; `break_after` makes the
    first opening raise once that many bytes went out (a client dying mid-upload)."""

    def __init__(self, data: bytes, break_after: int | None = None) -> None:
        self.data = data
        self.break_after = break_after
        self.opened_at: list[int] = []
        self.yielded = 0  # the furthest byte handed out

    def __call__(self, offset: int) -> Iterable[bytes]:
        self.opened_at.append(offset)
        limit = self.break_after if len(self.opened_at) == 1 else None
        return self._chunks(offset, limit)

    def _chunks(self, offset: int, limit: int | None) -> Iterator[bytes]:
        f = io.BytesIO(self.data)
        f.seek(offset)
        sent = offset
        while chunk := f.read(16 * 1024):
            if limit is not None and sent + len(chunk) > limit:
                raise Interrupted
            sent += len(chunk)
            self.yielded = max(self.yielded, sent)
            yield chunk


class Interrupted(Exception):
    """The pushing process "died"."""


def test_a_401_bearer_challenge_is_answered_with_a_token(setup: Setup) -> None:
    # No login: the first request goes out anonymously, the registry answers 401 with a Bearer
    # challenge for the push scope, the client fetches a token at the realm and retries.
    repository = f"web/{uuid.uuid4().hex[:10]}"
    data = os.urandom(1000)
    offset = len(setup.server.log())
    with_token = RegistryClient(setup.server.url, repository, setup.token)
    try:
        digest = with_token.push_blob(data, skip_existing=False)
    finally:
        with_token.close()
    assert digest == sha256(data)
    assert stored(setup, repository, digest) == data
    lines = requests_since(setup, offset, f'"POST /v2/{repository}/blobs/uploads/?digest=')
    posts = [line for line in lines if '"POST ' in line]
    assert [" 401 " in line for line in posts] == [True, False], posts
    assert " 201 " in posts[1], posts
    assert any('"GET /auth/token?' in line and " 200 " in line for line in lines), lines


def test_an_anonymous_client_pulls_a_public_app_through_the_challenge(setup: Setup) -> None:
    repository = f"open/{uuid.uuid4().hex[:10]}"
    data = os.urandom(5000)
    pusher = RegistryClient(setup.server.url, repository, setup.open_token)
    anonymous = RegistryClient(setup.server.url, repository, None)
    try:
        digest = pusher.push_blob(data)
        anonymous.login()
        sink = io.BytesIO()
        assert anonymous.pull_blob(digest, sink) == len(data)
        assert sink.getvalue() == data
        with pytest.raises(RegistryClientError, match="insufficient scope"):
            anonymous.push_blob(b"not allowed")
    finally:
        pusher.close()
        anonymous.close()


def test_a_token_the_registry_refuses_is_a_clear_error(setup: Setup) -> None:
    c = RegistryClient(setup.server.url, "web/x", "skyreg_not-a-token")
    try:
        with pytest.raises(RegistryClientError, match="authentication failed"):
            c.login()
    finally:
        c.close()


def test_monolithic_push_is_one_post_with_the_digest(setup: Setup, client: RegistryClient) -> None:
    client.login()
    data = os.urandom(300 * 1024)
    offset = len(setup.server.log())
    digest = client.push_blob(data)
    assert digest == sha256(data)
    lines = requests_since(setup, offset, f'"POST /v2/{client.repository}/blobs/uploads/?digest=')
    uploads = [line for line in lines if '"POST ' in line or '"PATCH ' in line or '"PUT ' in line]
    assert len(uploads) == 1 and " 201 " in uploads[0], uploads
    assert stored(setup, client.repository, digest) == data


def test_monolithic_push_refuses_a_wrong_digest(setup: Setup, client: RegistryClient) -> None:
    client.login()
    with pytest.raises(RegistryClientError, match="DIGEST_INVALID"):
        client.push_blob(b"some bytes", digest=sha256(b"other bytes"))


def test_chunked_push_sends_pieces_with_their_content_range(
    setup: Setup, client: RegistryClient
) -> None:
    client.login()
    data = os.urandom(5 * PIECE - 1000)
    offset = len(setup.server.log())
    digest = client.push_blob_chunked(Source(data), len(data), sha256(data), piece_size=PIECE)
    assert digest == sha256(data)
    lines = requests_since(setup, offset, f'"PUT /v2/{client.repository}/blobs/uploads/')
    patches = [line for line in lines if '"PATCH ' in line]
    assert len(patches) == 5 and all(" 202 " in line for line in patches), patches
    assert stored(setup, client.repository, digest) == data


def test_an_interrupted_chunked_push_resumes_where_the_registry_stands(
    setup: Setup, client: RegistryClient
) -> None:
    client.login()
    data = os.urandom(6 * PIECE + 123)
    digest = sha256(data)
    location = client.start_upload()
    broken = Source(data, break_after=3 * PIECE + 5000)  # dies inside the fourth PATCH
    with pytest.raises(Interrupted):
        client.push_blob_chunked(broken, len(data), digest, piece_size=PIECE, location=location)
    client.close()

    # Another client (another process, after a restart) carries on from the same upload.
    again = RegistryClient(setup.server.url, client.repository, setup.token)
    try:
        again.login()
        source = Source(data)
        assert (
            again.push_blob_chunked(source, len(data), digest, piece_size=PIECE, location=location)
            == digest
        )
    finally:
        again.close()
    # The source broke while the client looked past the third piece (or in the fourth): two
    # pieces at least were acknowledged, and the registry cannot hold more than was handed out.
    assert 2 * PIECE <= source.opened_at[0] <= broken.yielded, (source.opened_at, broken.yielded)
    assert stored(setup, client.repository, digest) == data


def test_a_blob_the_registry_has_is_not_sent_again(setup: Setup, client: RegistryClient) -> None:
    client.login()
    data = os.urandom(2 * PIECE)
    digest = client.push_blob_chunked(Source(data), len(data), sha256(data), piece_size=PIECE)
    assert client.blob_exists(digest)
    offset = len(setup.server.log())
    source = Source(data)
    assert client.push_blob_chunked(source, len(data), digest, piece_size=PIECE) == digest
    assert client.push_blob(data) == digest
    assert source.opened_at == []
    lines = requests_since(setup, offset, f'"HEAD /v2/{client.repository}/blobs/{digest}')
    sent = [line for line in lines if '"POST ' in line or '"PATCH ' in line or '"PUT ' in line]
    assert sent == [], sent
    assert not client.blob_exists(sha256(b"never pushed"))


def test_a_blob_is_pulled_from_an_offset_with_range(
    setup: Setup, client: RegistryClient, tmp_path: Path
) -> None:
    client.login()
    data = os.urandom(3 * PIECE)
    digest = client.push_blob(data)
    path = tmp_path / "partial"
    path.write_bytes(data[:1000])
    with path.open("ab") as sink:
        assert client.pull_blob(digest, sink, offset=1000) == len(data) - 1000
    assert path.read_bytes() == data
    with pytest.raises(RegistryClientError, match="BLOB_UNKNOWN"):
        client.pull_blob(sha256(b"never pushed"), io.BytesIO())


def test_a_pull_larger_than_its_bound_stops(setup: Setup, client: RegistryClient) -> None:
    client.login()
    data = os.urandom(PIECE)
    digest = client.push_blob(data)
    sink = io.BytesIO()
    with pytest.raises(RegistryClientError, match="more than 1000 bytes"):
        client.pull_blob(digest, sink, max_bytes=1000)
    assert len(sink.getvalue()) <= 1000


# -- AsyncRegistryClient (the agent's preparation and geo transfers) -----------------------------


def _pushed(setup: Setup, data: bytes) -> tuple[str, str]:
    """(repository, digest) of `data` pushed into a fresh repository of "web"."""
    repository = f"web/{uuid.uuid4().hex[:10]}"
    pusher = RegistryClient(setup.server.url, repository, setup.token)
    try:
        return repository, pusher.push_blob(data, skip_existing=False)
    finally:
        pusher.close()


async def _read_blob(client: AsyncRegistryClient, repository: str, digest: str, **kw: Any) -> bytes:
    async with client.blob(repository, digest, **kw) as blob:
        assert blob.status in (200, 206), (blob.status, blob.error_code())
        return b"".join([chunk async for chunk in blob.chunks()])


def test_async_client_answers_a_bearer_challenge_with_a_token_and_retries_once(
    setup: Setup,
) -> None:
    # Credentials go only to the realm (send_basic off): the registry's 401 challenge for the
    # pull scope is answered with a token, the GET is sent once more, and the token is kept.
    data = os.urandom(5000)
    repository, digest = _pushed(setup, data)
    offset = len(setup.server.log())

    async def scenario() -> tuple[bytes, int]:
        async with aiohttp.ClientSession() as session:
            client = AsyncRegistryClient(
                setup.server.url, session, password=setup.token, send_basic=False
            )
            body = await _read_blob(client, repository, digest)
            head = await client.head_blob(repository, digest)
            return body, head.status

    body, head_status = asyncio.run(scenario())
    assert body == data and head_status == 200
    lines = requests_since(setup, offset, f'"HEAD /v2/{repository}/blobs/{digest}')
    gets = [line for line in lines if f'"GET /v2/{repository}/blobs/' in line]
    assert [" 401 " in line for line in gets] == [True, False], gets
    tokens = [line for line in lines if '"GET /auth/token?' in line]
    assert len(tokens) == 1 and " 200 " in tokens[0], tokens
    heads = [line for line in lines if '"HEAD ' in line]
    assert len(heads) == 1 and " 200 " in heads[0], heads


def test_async_client_pulls_a_public_app_anonymously_through_the_challenge(setup: Setup) -> None:
    repository = f"open/{uuid.uuid4().hex[:10]}"
    data = os.urandom(3000)
    pusher = RegistryClient(setup.server.url, repository, setup.open_token)
    try:
        digest = pusher.push_blob(data)
    finally:
        pusher.close()

    async def scenario() -> bytes:
        async with aiohttp.ClientSession() as session:
            return await _read_blob(
                AsyncRegistryClient(setup.server.url, session), repository, digest
            )

    assert asyncio.run(scenario()) == data


def test_async_client_keeps_the_401_when_the_realm_refuses_the_token(setup: Setup) -> None:
    data = os.urandom(100)
    repository, digest = _pushed(setup, data)

    async def scenario() -> tuple[int, str]:
        async with aiohttp.ClientSession() as session:
            client = AsyncRegistryClient(setup.server.url, session, password="skyreg_wrong")
            async with client.blob(repository, digest) as blob:
                assert [chunk async for chunk in blob.chunks()] == []
                return blob.status, blob.error_code()

    assert asyncio.run(scenario()) == (401, "UNAUTHORIZED")


def test_async_client_resumes_a_blob_from_an_offset_with_range(setup: Setup) -> None:
    data = os.urandom(3 * PIECE)
    repository, digest = _pushed(setup, data)

    async def scenario() -> tuple[int, int, bytes]:
        async with aiohttp.ClientSession() as session:
            client = AsyncRegistryClient(setup.server.url, session, password=setup.token)
            async with client.blob(repository, digest, offset=1000) as blob:
                return blob.status, blob.offset, b"".join([c async for c in blob.chunks()])

    status, start, body = asyncio.run(scenario())
    assert (status, start) == (206, 1000)
    assert body == data[1000:]

    async def bounded() -> int:
        # The bound is a position in the blob: from byte 1000, at most 500 more.
        async with aiohttp.ClientSession() as session:
            client = AsyncRegistryClient(setup.server.url, session, password=setup.token)
            received = 0
            with pytest.raises(ResponseTooLarge, match="more than 1500 bytes"):
                async with client.blob(repository, digest, offset=1000, max_bytes=1500) as blob:
                    async for chunk in blob.chunks():
                        received += len(chunk)
            return received

    assert asyncio.run(bounded()) <= 500


def test_async_client_bounds_blob_streams_and_manifests(setup: Setup) -> None:
    data = os.urandom(2 * PIECE)
    repository, digest = _pushed(setup, data)
    manifest = RegistryClient(setup.server.url, repository, setup.token)
    try:
        manifest.login()
        config = b'{"architecture":"amd64","os":"linux"}'
        manifest.push_blob(config)
        body = image_manifest(config, [data])
        manifest.put_manifest("v1", OCI_MANIFEST, body)
    finally:
        manifest.close()

    async def scenario() -> tuple[int, bytes]:
        async with aiohttp.ClientSession() as session:
            client = AsyncRegistryClient(setup.server.url, session, password=setup.token)
            received = 0
            with pytest.raises(ResponseTooLarge, match="more than 1000 bytes"):
                async with client.blob(repository, digest, max_bytes=1000) as blob:
                    async for chunk in blob.chunks():
                        received += len(chunk)
            assert received <= 1000
            with pytest.raises(ResponseTooLarge, match=rf"{len(body)} bytes, more than 100$"):
                await client.get_manifest(repository, "v1", max_bytes=100)
            whole = await client.get_manifest(repository, "v1", max_bytes=len(body))
            return whole.status, whole.body

    assert asyncio.run(scenario()) == (200, body)
