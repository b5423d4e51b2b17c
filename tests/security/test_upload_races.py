"""A hostile tenant's upload requests (`registry/blobs.py` over `store/uploads.py`) against a real
server with auth on, on both backings: racing PATCH/PUT/DELETE on its own upload, guessing
another tenant's upload id, chunk offsets at the edges, many upload ids.

Whatever the requests and their order: a blob is visible only under the digest of its bytes,
another tenant's upload is unknown (404) and untouched, every answer is a 4xx or success —
never a 500 — and the uploads of others still complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import requests

from skyreg.client.protocol import basic_authorization
from tests.support.backings import create_org_and_app, start_on_backing
from tests.support.inprocess import InProcessRegistry
from tests.support.oci import sha256
from tests.support.servers import BACKINGS

TENANTS = ("alpha", "beta")


@dataclass
class Tenants:
    reg: InProcessRegistry
    tokens: dict[str, str]  # tenant (org and app name) -> org token

    @property
    def url(self) -> str:
        return self.reg.url

    def http(self, tenant: str) -> aiohttp.ClientSession:
        """An aiohttp session sending the tenant's token as Basic credentials."""
        return aiohttp.ClientSession(
            headers={"Authorization": basic_authorization("x", self.tokens[tenant])}
        )

    def session(self, tenant: str) -> requests.Session:
        s = requests.Session()
        s.auth = ("x", self.tokens[tenant])
        return s


@pytest.fixture(scope="module", params=BACKINGS)
def tenants(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Tenants]:
    """A server with auth on and two tenants (an org and an app each, an org token each)."""
    with contextlib.ExitStack() as stack:
        reg, admin = start_on_backing(request, stack, tmp_path_factory.mktemp("races") / "data")
        api = stack.enter_context(requests.Session())
        api.headers["Authorization"] = f"Bearer {admin}"
        tokens = {}
        for name in TENANTS:
            create_org_and_app(api, reg.url, name, name)
            resp = api.post(f"{reg.url}/api/v1/tokens", json={"kind": "org", "org": name})
            assert resp.status_code == 201, resp.text
            tokens[name] = resp.json()["secret"]
        yield Tenants(reg, tokens)


def _repo(tenant: str) -> str:
    return f"{tenant}/app"


def _start(t: Tenants, tenant: str, data: bytes = b"") -> str:
    """Open an upload in the tenant's repository, with `data` as its first chunk; its path."""
    with t.session(tenant) as s:
        resp = s.post(f"{t.url}/v2/{_repo(tenant)}/blobs/uploads/", timeout=30)
        assert resp.status_code == 202, resp.text
        location = str(resp.headers["Location"])
        if data:
            resp = s.patch(
                t.url + location,
                data=data,
                headers={"Content-Range": f"0-{len(data) - 1}"},
                timeout=30,
            )
            assert resp.status_code == 202, resp.text
    return location


def _blob(t: Tenants, tenant: str, digest: str) -> bytes | None:
    """The blob's bytes as the tenant's repository serves them, None when it is unknown."""
    with t.session(tenant) as s:
        resp = s.get(f"{t.url}/v2/{_repo(tenant)}/blobs/{digest}", timeout=30)
    if resp.status_code == 404:
        return None
    assert resp.status_code == 200, (resp.status_code, resp.text[:200])
    return resp.content


def _held(t: Tenants, tenant: str, location: str) -> int:
    """The bytes an upload holds, from its status."""
    with t.session(tenant) as s:
        resp = s.get(t.url + location, timeout=30)
    assert resp.status_code == 204, resp.text
    end = int(resp.headers["Range"].split("-")[1])
    return end + 1 if end else 0


async def _send(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    data: bytes | AsyncIterator[bytes] | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, str]:
    async with http.request(method, url, data=data, headers=headers) as resp:
        return resp.status, await resp.text()


def _race(
    t: Tenants, tenant: str, sends: list[tuple[str, str, bytes | None, dict[str, str]]]
) -> list[tuple[int, str]]:
    """Send (method, url, body, headers) requests at once as `tenant`; their answers."""

    async def race() -> list[tuple[int, str]]:
        async with t.http(tenant) as http:
            return list(await asyncio.gather(*(_send(http, m, u, b, h) for m, u, b, h in sends)))

    return asyncio.run(race())


# -- another tenant's uploads --------------------------------------------------------------------


def test_another_tenants_upload_id_is_unknown_to_every_method(tenants: Tenants) -> None:
    data = os.urandom(3000)
    location = _start(tenants, "alpha", data[:1000])
    upload_id = location.rsplit("/", 1)[1]
    with tenants.session("beta") as beta:
        # Through beta's own repository (where beta may push): the id is unknown.
        mine = f"{tenants.url}/v2/{_repo('beta')}/blobs/uploads/{upload_id}"
        answers = [
            beta.get(mine, timeout=30),
            beta.patch(mine, data=data[1000:], headers={"Content-Range": "1000-2999"}, timeout=30),
            beta.put(mine, params={"digest": sha256(data[:1000])}, timeout=30),
            beta.delete(mine, timeout=30),
        ]
        assert [(r.status_code, r.json()["errors"][0]["code"]) for r in answers] == [
            (404, "BLOB_UPLOAD_UNKNOWN")
        ] * 4
        # Through alpha's repository: beta may not push there at all.
        theirs = tenants.url + location
        for method in ("GET", "PATCH", "PUT", "DELETE"):
            resp = beta.request(method, theirs, params={"digest": sha256(data)}, timeout=30)
            assert resp.status_code in (401, 403, 404), (method, resp.status_code)
    # Alpha's upload is untouched and completes.
    assert _held(tenants, "alpha", location) == 1000
    with tenants.session("alpha") as alpha:
        resp = alpha.put(
            tenants.url + location,
            params={"digest": sha256(data)},
            data=data[1000:],
            headers={"Content-Range": "1000-2999"},
            timeout=30,
        )
    assert resp.status_code == 201, resp.text
    assert _blob(tenants, "alpha", sha256(data)) == data


def test_guessed_upload_ids_are_unknown_never_a_500(tenants: Tenants) -> None:
    guesses = [
        uuid.uuid4().hex,
        "0" * 32,
        "put-" + uuid.uuid4().hex,  # the store's own monolithic uploads
        "A" * 32,
        "x" * 200,
        "..%2F..%2Fblobs",
        "%00" * 8,
    ]
    with tenants.session("beta") as beta:
        for guess in guesses:
            url = f"{tenants.url}/v2/{_repo('beta')}/blobs/uploads/{guess}"
            for method in ("GET", "PATCH", "PUT", "DELETE"):
                resp = beta.request(
                    method, url, params={"digest": sha256(b"x")}, data=b"x", timeout=30
                )
                assert 400 <= resp.status_code < 500, (guess, method, resp.status_code)


# -- racing requests on one's own upload ---------------------------------------------------------


def test_concurrent_patches_at_one_offset_store_exactly_one_chunk(tenants: Tenants) -> None:
    location = _start(tenants, "alpha", b"head")
    chunks = [os.urandom(64 * 1024 + i) for i in range(8)]

    async def race() -> list[tuple[int, str]]:
        async with tenants.http("alpha") as http:
            return await asyncio.gather(
                *(
                    _send(
                        http,
                        "PATCH",
                        tenants.url + location,
                        chunk,
                        {"Content-Range": f"4-{4 + len(chunk) - 1}"},
                    )
                    for chunk in chunks
                )
            )

    answers = asyncio.run(race())
    statuses = [status for status, _ in answers]
    assert sorted(statuses) == [202] + [416] * 7, answers
    winner = chunks[statuses.index(202)]
    assert _held(tenants, "alpha", location) == 4 + len(winner)
    with tenants.session("alpha") as alpha:
        resp = alpha.put(tenants.url + location, params={"digest": sha256(b"head" + winner)})
    assert resp.status_code == 201, resp.text
    assert _blob(tenants, "alpha", sha256(b"head" + winner)) == b"head" + winner


@pytest.mark.parametrize("digest_of", ["before", "after", "wrong"])
def test_a_put_racing_a_patch_never_shows_a_blob_under_a_digest_its_bytes_lack(
    tenants: Tenants, digest_of: str
) -> None:
    # The PUT names the digest of the bytes before the racing PATCH, after it, or of nothing
    # held. Whichever runs first: a 201 serves exactly the bytes of that digest; anything
    # else leaves the digest unknown; no answer is a 500.
    for _ in range(6):
        first, second = os.urandom(300_000), os.urandom(300_000)
        location = _start(tenants, "alpha", first)
        digest = {
            "before": sha256(first),
            "after": sha256(first + second),
            "wrong": sha256(os.urandom(8)),
        }[digest_of]

        url = tenants.url + location
        patch_range = f"{len(first)}-{len(first) + len(second) - 1}"
        (patch_status, patch_body), (put_status, put_body) = _race(
            tenants,
            "alpha",
            [
                ("PATCH", url, second, {"Content-Range": patch_range}),
                ("PUT", f"{url}?digest={digest}", None, {}),
            ],
        )
        assert patch_status in (202, 404, 416), (patch_status, patch_body)
        assert put_status in (201, 400), (put_status, put_body)
        served = _blob(tenants, "alpha", digest)
        if put_status == 201:
            assert served is not None and sha256(served) == digest
        else:
            assert "DIGEST_INVALID" in put_body, put_body
            assert served is None or sha256(served) == digest


def test_a_delete_racing_a_patch_and_a_put_leaves_no_blob_and_no_500(tenants: Tenants) -> None:
    for _ in range(6):
        data = os.urandom(200_000)
        location = _start(tenants, "alpha", data[:100_000])

        url = tenants.url + location
        (patch, _), (delete, _), (put, put_body) = _race(
            tenants,
            "alpha",
            [
                ("PATCH", url, data[100_000:], {"Content-Range": "100000-199999"}),
                ("DELETE", url, None, {}),
                ("PUT", f"{url}?digest={sha256(data)}", None, {}),
            ],
        )
        assert patch in (202, 404, 416) and delete in (204, 404) and put in (201, 400, 404), (
            patch,
            delete,
            put,
            put_body,
        )
        served = _blob(tenants, "alpha", sha256(data))
        assert served is None or served == data
        if put == 201:
            assert served == data


# -- chunk offsets at the edges ------------------------------------------------------------------


async def _drip(pieces: list[bytes]) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece


@pytest.mark.parametrize(
    ("content_range", "body", "chunked", "held"),
    [
        ("0-9", b"x" * 10, False, 10),  # rewrites bytes the upload holds
        ("9-9", b"x", False, 10),  # overlaps the last byte
        ("11-20", b"x" * 10, False, 10),  # leaves a gap
        ("10-9", b"", False, 10),  # ends before it starts
        ("10-19", b"x" * 5, False, 10),  # Content-Length disagrees
        # A chunked body longer than its range: the declared bytes are kept, not the rest.
        ("10-19", b"x" * 20, True, 20),
        ("10-19", b"x" * (3 << 20), True, 20),
        # Shorter: what arrived is kept, as when a connection breaks (the client resumes).
        ("10-19", b"x" * 5, True, 15),
        ("10-99999999999999999999", b"x", False, 10),  # past any size
        ("9223372036854775807-9223372036854775807", b"x", False, 10),
        ("-1-5", b"x", False, 10),
        ("bytes=10-19", b"x" * 10, False, 10),
    ],
)
def test_a_chunk_at_the_edges_is_refused_and_the_upload_stays_whole(
    tenants: Tenants, content_range: str, body: bytes, chunked: bool, held: int
) -> None:
    data = os.urandom(10)
    location = _start(tenants, "alpha", data)

    async def patch() -> tuple[int, str]:
        async with tenants.http("alpha") as http:
            sent: bytes | AsyncIterator[bytes] = _drip([body]) if chunked else body
            headers = {"Content-Range": content_range}
            if not chunked:
                headers["Content-Length"] = str(len(body))
            return await _send(http, "PATCH", tenants.url + location, sent, headers)

    status, text = asyncio.run(patch())
    assert status in (400, 416), (status, text)
    # The upload holds no byte outside the declared range; it completes with what it holds.
    assert _held(tenants, "alpha", location) == held
    whole = data + body[: held - len(data)]
    with tenants.session("alpha") as alpha:
        resp = alpha.put(tenants.url + location, params={"digest": sha256(whole)}, timeout=30)
    assert resp.status_code == 201, resp.text


def test_many_upload_ids_from_one_tenant_leave_others_served(tenants: Tenants) -> None:
    # Thousands of upload ids (opened, guessed) by one tenant: every answer a 2xx or 4xx, and
    # another tenant's upload still completes.
    async def flood() -> list[int]:
        async with tenants.http("beta") as http:
            base = f"{tenants.url}/v2/{_repo('beta')}/blobs/uploads/"
            opened = await asyncio.gather(*(_send(http, "POST", base) for _ in range(200)))
            guessed = await asyncio.gather(
                *(
                    _send(http, "PATCH", base + uuid.uuid4().hex, b"x", {"Content-Range": "0-0"})
                    for _ in range(2000)
                )
            )
            return [status for status, _ in [*opened, *guessed]]

    statuses = asyncio.run(flood())
    assert set(statuses) <= {202, 404}, sorted(set(statuses))
    assert statuses.count(202) == 200
    data = os.urandom(5000)
    location = _start(tenants, "alpha", data)
    with tenants.session("alpha") as alpha:
        resp = alpha.put(tenants.url + location, params={"digest": sha256(data)}, timeout=30)
    assert resp.status_code == 201, resp.text
    assert hashlib.sha256(_blob(tenants, "alpha", sha256(data)) or b"").hexdigest() == sha256(
        data
    ).removeprefix("sha256:")


# -- the expiry worker ---------------------------------------------------------------------------


@pytest.fixture
def expiring(tmp_path: Path) -> Iterator[Tenants]:
    """Two tenants on a server where every upload is stale at once (TTL 0, expiry every 0.1 s)."""
    reg = InProcessRegistry(
        data_dir=tmp_path / "data", options={"upload_ttl": 0.0, "expiry_interval": 0.1}
    )
    try:
        reg.start()
        admin = (reg.data_dir / "admin-token").read_text().strip()
        with requests.Session() as api:
            api.headers["Authorization"] = f"Bearer {admin}"
            tokens = {}
            for name in TENANTS:
                create_org_and_app(api, reg.url, name, name)
                resp = api.post(f"{reg.url}/api/v1/tokens", json={"kind": "org", "org": name})
                assert resp.status_code == 201, resp.text
                tokens[name] = resp.json()["secret"]
        yield Tenants(reg, tokens)
    finally:
        reg.stop()


async def _gone(http: aiohttp.ClientSession, url: str, deadline: float) -> bool:
    """Whether the upload at `url` answers 404 before `deadline` (loop time)."""
    loop = asyncio.get_running_loop()
    while loop.time() < deadline:
        async with http.get(url) as resp:
            if resp.status == 404:
                return True
        await asyncio.sleep(0.1)
    return False


def test_a_dripping_patch_does_not_stall_the_expiry_of_other_uploads(expiring: Tenants) -> None:
    # Beta keeps a stale upload's lock with a PATCH that never ends (a byte a second, within the
    # body timeout). The expiry worker must not wait on it: alpha's abandoned upload still goes.
    t = expiring
    done = asyncio.Event()

    async def drip() -> AsyncIterator[bytes]:
        yield b"d" * ((1 << 20) + 1)  # a full write batch: visible in the upload's size
        while not done.is_set():
            yield b"d"
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 1.0)

    async def scenario() -> tuple[bool, int]:
        base = f"{t.url}/v2/{_repo('beta')}/blobs/uploads/"
        async with t.http("beta") as beta, t.http("alpha") as alpha:
            for _ in range(20):  # until the PATCH, not the worker, took the fresh upload
                async with beta.post(base) as resp:
                    assert resp.status == 202
                    held = t.url + resp.headers["Location"]
                patch = asyncio.ensure_future(
                    _send(beta, "PATCH", held, drip(), {"Content-Type": "application/octet-stream"})
                )
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 30
                size = 0
                while not patch.done() and size == 0 and loop.time() < deadline:
                    async with beta.get(held) as resp:
                        if resp.status != 204:
                            break
                        size = int(resp.headers["Range"].split("-")[1])
                    await asyncio.sleep(0.05)
                if size:
                    break
                done.set()
                await patch
                done.clear()
            assert size, "no PATCH got hold of its upload"
            async with alpha.post(f"{t.url}/v2/{_repo('alpha')}/blobs/uploads/") as resp:
                assert resp.status == 202
                abandoned = t.url + resp.headers["Location"]
            expired = await _gone(alpha, abandoned, loop.time() + 30)
            done.set()
            status, _ = await patch
            return expired, status

    expired, patch_status = asyncio.run(scenario())
    assert expired, "the expiry worker stalled behind a dripping PATCH"
    assert patch_status in (202, 404)
