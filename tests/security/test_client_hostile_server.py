"""The async OCI client (`client/aio.py`, used by the machine agent with its token and by geo
transfers with the peer token) against hostile registries: small aiohttp apps on 127.0.0.1.

Whatever a registry answers, the client sends the credential it holds only to the registry's
own origin (or to an https token realm), reads a bounded number of bytes, and fails with its
documented errors (`RegistryClientError`, an `Answer` with the status, or the session's
`aiohttp.ClientError`/`TimeoutError`), never with anything else.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from skyreg.client.aio import AsyncRegistryClient
from skyreg.client.protocol import MAX_ERROR_BODY, RegistryClientError, ResponseTooLarge

SECRET = "skyreg_agentsecret"
REPO = "web/api"
DIGEST = "sha256:" + "a" * 64
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Host:
    """A hostile server: its URL and every request's (method, path, Authorization)."""

    url: str = ""
    seen: list[tuple[str, str, str]] = field(default_factory=list)

    def credentials_seen(self) -> list[str]:
        """Authorization values that carried the agent's secret."""
        return [auth for _, _, auth in self.seen if _carries_secret(auth)]


def _carries_secret(auth: str) -> bool:
    if SECRET in auth:
        return True
    if auth.lower().startswith("basic "):
        with contextlib.suppress(ValueError):
            return SECRET in base64.b64decode(auth[6:]).decode(errors="replace")
    return False


@contextlib.asynccontextmanager
async def serving(
    handler: Callable[[Host, web.Request], Awaitable[web.StreamResponse]],
) -> AsyncIterator[Host]:
    """Serve `handler` for every path on a free port of 127.0.0.1, recording requests."""
    host = Host()

    async def record(request: web.Request) -> web.StreamResponse:
        host.seen.append(
            (request.method, request.path_qs, request.headers.get("Authorization", ""))
        )
        return await handler(host, request)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        yield host
    finally:
        await runner.cleanup()


def _challenge(realm: str) -> web.Response:
    return web.Response(
        status=401,
        headers={
            "WWW-Authenticate": f'Bearer realm="{realm}",service="x",scope="repository:{REPO}:pull"'
        },
        text='{"errors":[{"code":"UNAUTHORIZED","message":"no"}]}',
    )


def _token_answer(body: bytes) -> Callable[[Host, web.Request], Awaitable[web.StreamResponse]]:
    """A registry whose /v2/ challenges everyone and whose own /token answers `body`."""

    async def handler(host: Host, request: web.Request) -> web.StreamResponse:
        if request.path == "/token":
            return web.Response(body=body, content_type="application/json")
        if request.headers.get("Authorization", "").startswith("Bearer "):
            return web.Response(body=b"{}", content_type="application/json")
        return _challenge(f"{host.url}/token")

    return handler


async def _client_get_manifest(url: str, **kw: object) -> tuple[int, str]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        client = AsyncRegistryClient(url, session, password=SECRET, **kw)  # type: ignore[arg-type]
        answer = await client.get_manifest(REPO, DIGEST, 1 << 20)
        return answer.status, answer.error_code()


# -- where the credential goes -------------------------------------------------------------------


def test_a_redirect_to_another_origin_carries_no_credential() -> None:
    async def scenario() -> tuple[Host, bytes]:
        async def storage(host: Host, request: web.Request) -> web.StreamResponse:
            return web.Response(body=b"bytes")

        async with serving(storage) as other:

            async def registry(host: Host, request: web.Request) -> web.StreamResponse:
                raise web.HTTPTemporaryRedirect(f"{other.url}/blob")

            async with serving(registry) as reg, aiohttp.ClientSession() as session:
                client = AsyncRegistryClient(reg.url, session, password=SECRET)
                async with client.blob(REPO, DIGEST) as blob:
                    body = b"".join([c async for c in blob.chunks()])
                return other, body

    other, body = asyncio.run(scenario())
    assert body == b"bytes"
    assert other.seen and other.credentials_seen() == []


def test_a_challenge_from_a_redirect_target_gets_no_credential() -> None:
    # The registry redirects a blob GET to another host (as to object storage); that host
    # answers 401 naming itself as token realm. The credential went nowhere but the registry.
    async def scenario() -> tuple[Host, int]:
        async def lure(host: Host, request: web.Request) -> web.StreamResponse:
            if request.path == "/token":
                return web.json_response({"token": "stolen"})
            return _challenge(f"{host.url}/token")

        async with serving(lure) as other:

            async def registry(host: Host, request: web.Request) -> web.StreamResponse:
                raise web.HTTPTemporaryRedirect(f"{other.url}/blob")

            async with serving(registry) as reg, aiohttp.ClientSession() as session:
                client = AsyncRegistryClient(reg.url, session, password=SECRET)
                async with client.blob(REPO, DIGEST) as blob:
                    return other, blob.status

    other, status = asyncio.run(scenario())
    assert status == 401
    assert other.credentials_seen() == [], other.seen


def test_a_cleartext_realm_on_another_origin_gets_no_credential() -> None:
    async def scenario() -> tuple[Host, Host, tuple[int, str]]:
        async def realm(host: Host, request: web.Request) -> web.StreamResponse:
            return web.json_response({"token": "t"})

        async with serving(realm) as other:

            async def registry(host: Host, request: web.Request) -> web.StreamResponse:
                return _challenge(f"{other.url}/token")

            async with serving(registry) as reg:
                return reg, other, await _client_get_manifest(reg.url)

    reg, other, answer = asyncio.run(scenario())
    assert answer == (401, "UNAUTHORIZED")
    assert other.credentials_seen() == [], other.seen
    assert reg.credentials_seen()  # the registry itself still gets its Basic credential


@pytest.mark.parametrize(
    "realm",
    [
        "http://user:pass@{host}/token",  # credentials in the URL
        "file:///etc/passwd",
        "/token",  # relative
        "http://[::1",  # not a URL
    ],
)
def test_a_malformed_realm_leaves_the_401_as_the_answer(realm: str) -> None:
    # No token is asked for at a realm that is no absolute http(s) URL or carries credentials
    # (aiohttp would refuse them with ValueError or mix them with ours).
    async def scenario() -> tuple[Host, tuple[int, str]]:
        async def registry(host: Host, request: web.Request) -> web.StreamResponse:
            if request.path.startswith("/token"):
                return web.json_response({"token": "t"})
            value = realm.format(host=host.url.removeprefix("http://"))
            return web.Response(
                status=401,
                headers={"WWW-Authenticate": f'Bearer realm="{value}"'},
            )

        async with serving(registry) as reg:
            return reg, await _client_get_manifest(reg.url)

    reg, (status, _) = asyncio.run(scenario())
    assert status == 401
    assert not any(path.startswith("/token") for _, path, _ in reg.seen), reg.seen


# -- token answers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"not json at all",
        b'{"token": ' * 100_000,  # deeply nested, unterminated
        json.dumps({"token": "x" * (2 << 20)}).encode(),  # over the 1 MiB bound
        b'{"token": "t", "expires_in": 1' + b"0" * 400 + b"}",  # past any float
        b'{"token": "t", "expires_in": "NaN"}',
        b'{"token": "t", "expires_in": -5}',
        b'{"token": ["t"]}',
        b'{"token": "a\\r\\nX-Injected: 1"}',  # header injection
        b'{"token": "a b"}',
        b'{"token": "\\u00e9t\\u00e9"}',  # not ASCII
    ],
    ids=[
        "not-json",
        "nested",
        "huge",
        "lifetime-overflow",
        "lifetime-nan",
        "lifetime-negative",
        "not-a-string",
        "crlf",
        "space",
        "non-ascii",
    ],
)
def test_a_hostile_token_answer_is_refused_or_used_never_a_crash(body: bytes) -> None:
    async def scenario() -> tuple[Host, tuple[int, str]]:
        async with serving(_token_answer(body)) as reg:
            return reg, await _client_get_manifest(reg.url)

    reg, (status, code) = asyncio.run(scenario())
    assert status in (200, 401), (status, code)
    # No request carried a header smuggled in through the token.
    assert not any("X-Injected" in a or "\n" in a for _, _, a in reg.seen)


def test_a_token_with_an_absurd_lifetime_is_fetched_again_when_refused() -> None:
    # A token "valid" for 10**300 seconds is used; once the registry refuses it, a new one is
    # fetched rather than the refused one resent forever.
    tokens = iter(["first", "second"])
    used: set[str] = set()

    async def handler(host: Host, request: web.Request) -> web.StreamResponse:
        if request.path == "/token":
            return web.json_response({"token": next(tokens), "expires_in": 1e300})
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer ") and auth not in used:  # each token is good once
            used.add(auth)
            return web.Response(body=b"{}", content_type="application/json")
        return _challenge(f"{host.url}/token")

    async def scenario() -> list[int]:
        async with serving(handler) as reg, aiohttp.ClientSession() as session:
            client = AsyncRegistryClient(reg.url, session, password=SECRET)
            return [(await client.get_manifest(REPO, DIGEST, 1024)).status for _ in range(2)]

    assert asyncio.run(scenario()) == [200, 200]


# -- bodies --------------------------------------------------------------------------------------


async def _endless(
    request: web.Request, status: int = 200, piece: bytes = b"x"
) -> web.StreamResponse:
    resp = web.StreamResponse(status=status)
    await resp.prepare(request)
    for _ in range(4096):  # 64 MiB at most, should the client not stop reading
        await resp.write(piece * (1 << 14))
    return resp


@pytest.mark.parametrize("status", [401, 404, 500])
def test_an_endless_error_body_is_read_only_to_its_bound(status: int) -> None:
    async def handler(host: Host, request: web.Request) -> web.StreamResponse:
        return await _endless(request, status, b"[")

    async def scenario() -> tuple[int, str, int]:
        async with serving(handler) as reg, aiohttp.ClientSession() as session:
            client = AsyncRegistryClient(reg.url, session, password=SECRET)
            answer = await client.get_manifest(REPO, DIGEST, 1024)
            return answer.status, answer.error_code(), len(answer.body)

    got_status, code, length = asyncio.run(scenario())
    assert got_status == status and length <= MAX_ERROR_BODY and code


def test_an_endless_manifest_or_blob_is_cut_at_the_callers_bound() -> None:
    async def handler(host: Host, request: web.Request) -> web.StreamResponse:
        return await _endless(request)

    async def scenario() -> tuple[BaseException, BaseException]:
        async with serving(handler) as reg, aiohttp.ClientSession() as session:
            client = AsyncRegistryClient(reg.url, session, password=SECRET)
            with pytest.raises(ResponseTooLarge) as manifest:
                await client.get_manifest(REPO, DIGEST, 4096)
            with pytest.raises(ResponseTooLarge) as blob:
                async with client.blob(REPO, DIGEST, max_bytes=100_000) as stream:
                    async for _ in stream.chunks():
                        pass
            return manifest.value, blob.value

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "content_range", ["bytes 0-99/200", "bytes 50-99/200", "", "bytes */200", "garbage"]
)
def test_a_206_that_does_not_start_at_the_offset_is_a_client_error(content_range: str) -> None:
    async def handler(host: Host, request: web.Request) -> web.StreamResponse:
        headers = {"Content-Range": content_range} if content_range else {}
        return web.Response(status=206, body=b"y" * 100, headers=headers)

    async def scenario() -> None:
        async with serving(handler) as reg, aiohttp.ClientSession() as session:
            client = AsyncRegistryClient(reg.url, session, password=SECRET)
            with pytest.raises(RegistryClientError):
                async with client.blob(REPO, DIGEST, offset=100) as stream:
                    async for _ in stream.chunks():
                        pass

    asyncio.run(scenario())


def test_a_slow_drip_ends_at_the_sessions_timeout() -> None:
    # The client relies on its caller's session timeout (the agent's is total=300 s): a server
    # sending one byte at a time, never finishing, ends in TimeoutError, not a hang.
    async def handler(host: Host, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        while True:
            await resp.write(b"z")
            await asyncio.sleep(0.05)

    async def scenario() -> None:
        timeout = aiohttp.ClientTimeout(total=1)
        async with serving(handler) as reg, aiohttp.ClientSession(timeout=timeout) as session:
            client = AsyncRegistryClient(reg.url, session, password=SECRET)
            with pytest.raises(TimeoutError):
                async with client.blob(REPO, DIGEST) as stream:
                    async for _ in stream.chunks():
                        pass

    asyncio.run(scenario())


@pytest.mark.parametrize("location", ["/v2/again", "file:///etc/passwd", "http://[::1"])
def test_a_redirect_loop_or_to_no_http_url_is_a_client_error(location: str) -> None:
    async def handler(host: Host, request: web.Request) -> web.StreamResponse:
        return web.Response(status=302, headers={"Location": location})

    async def scenario() -> None:
        async with serving(handler) as reg, aiohttp.ClientSession() as session:
            client = AsyncRegistryClient(reg.url, session, password=SECRET)
            with pytest.raises(aiohttp.ClientError):
                await client.get_manifest(REPO, DIGEST, 1024)

    asyncio.run(scenario())
