"""GraphQL queries are bounded before they run, and running one never stalls other requests."""

from __future__ import annotations

import asyncio
import json
import select
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests

from skyreg.auth.policy import AccessPolicy
from skyreg.meta.machines import MachineMeta
from skyreg.meta.platform import PlatformMeta, ReleaseMeta, TokenRecord
from skyreg.meta.registry import RegistryMeta, open_database
from skyreg.platform.graphql import PER_CALLER, GraphQLRunner
from skyreg.services.releases import ReleaseService
from tests.support.platform import Tenancy
from tests.support.servers import RunningRegistry

FLY_QUERY = """
query($appName: String!, $limit: Int!) {
  app(name: $appName) {
    releases: releasesUnprocessed(first: $limit) {
      nodes {
        id version description reason status imageRef stable user { id email name } createdAt
      }
    }
  }
}
"""
NODE = "id version description reason status imageRef stable user { id email name } createdAt"
RELEASES = 100  # in app `gq`; app `big` has as many, with 1,000-character descriptions


@dataclass
class Server:
    reg: RunningRegistry
    token: str

    def post(self, query: str, variables: dict[str, Any] | None = None) -> requests.Response:
        return requests.post(
            f"{self.reg.url}/graphql",
            json={"query": query, "variables": variables or {}},
            headers={"Authorization": f"Bearer {self.token}"},
        )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    reg = RunningRegistry(data_dir=tmp_path_factory.mktemp("graphql") / "data")
    reg.start()
    try:
        t = Tenancy(reg.data_dir)
        t.org("acme")
        meta = open_database(None, reg.data_dir)
        releases = ReleaseMeta(meta.engine)
        try:
            for app, description in (("gq", "deploy"), ("big", "d" * 1000)):
                app_id = t.app(app, "acme")
                for _ in range(RELEASES):
                    releases.create_release(
                        app_id=app_id,
                        status="complete",
                        description=description,
                        reason="deploy",
                        image_ref=f"{reg.host}/{app}:v1",
                        image_repository=app,
                        image_digest="sha256:" + "0" * 64,
                        strategy="rolling",
                        regions=["local"],
                        machine_count=1,
                        user_id="t",
                        user_name="tester",
                    )
        finally:
            releases.close()
            meta.close()
        yield Server(reg, t.token("org", org="acme")[0])
    finally:
        reg.stop()


def _refused(r: requests.Response, *words: str) -> str:
    assert r.status_code == 400, r.text[:500]
    doc = r.json()
    assert set(doc) == {"errors"}, doc
    message = " ".join(e["message"] for e in doc["errors"])
    for word in words:
        assert word in message, message
    return message


def test_fly_release_query_still_works(server: Server) -> None:
    r = server.post(FLY_QUERY, {"appName": "gq", "limit": 25})
    assert r.status_code == 200, r.text
    nodes = r.json()["data"]["app"]["releases"]["nodes"]
    assert len(nodes) == 25
    assert nodes[0]["version"] == RELEASES and nodes[0]["user"]["name"] == "tester"


def test_the_2150_alias_query_is_refused(server: Server) -> None:
    query = (
        "query($n:String!){"
        + "".join(f"a{i}:app(name:$n){{...F}}" for i in range(2150))
        + "}fragment F on App{releasesUnprocessed(first:1000){nodes{id version}}}"
    )
    assert 50_000 < len(query) < 64_000
    _refused(server.post(query, {"n": "gq"}))


def test_too_many_aliases_are_refused(server: Server) -> None:
    query = "{" + " ".join(f'a{i}: app(name: "gq") {{ id }}' for i in range(100)) + "}"
    assert len(query) < 4000
    _refused(server.post(query), "aliases")


def test_aliases_inside_fragments_count(server: Server) -> None:
    inner = " ".join(f"r{i}: releasesUnprocessed(first: 1) {{ totalCount }}" for i in range(40))
    query = '{ app(name: "gq") { ...F } } fragment F on App { ' + inner + " }"
    _refused(server.post(query), "aliases")


def test_exponential_fragments_are_refused(server: Server) -> None:
    levels = 30
    fragments = " ".join(
        f"fragment F{i} on App {{ ...F{i + 1} ...F{i + 1} }}" for i in range(levels)
    )
    query = f'{{ app(name: "gq") {{ ...F0 }} }} {fragments} fragment F{levels} on App {{ id }}'
    _refused(server.post(query), "fields")


def test_deep_nesting_is_refused(server: Server) -> None:
    nested = "x { " * 12 + "y" + " }" * 12
    query = f'{{ app(name: "gq") {{ releasesUnprocessed {{ nodes {{ user {{ {nested} }} }} }} }} }}'
    _refused(server.post(query), "deep")


def test_pathological_nesting_is_a_400_not_a_500(server: Server) -> None:
    query = "{a" * 5000 + "}" * 5000
    _refused(server.post(query))


def test_page_size_over_the_maximum_is_refused(server: Server) -> None:
    literal = '{ app(name: "gq") { releasesUnprocessed(first: 101) { totalCount } } }'
    _refused(server.post(literal), "first")
    _refused(server.post(FLY_QUERY, {"appName": "gq", "limit": 5000}), "first")
    _refused(server.post(FLY_QUERY, {"appName": "gq", "limit": -1}), "first")


def test_too_many_release_nodes_in_total_are_refused(server: Server) -> None:
    body = " ".join(f"r{i}: releasesUnprocessed(first: 100) {{ totalCount }}" for i in range(11))
    _refused(server.post(f'{{ app(name: "gq") {{ {body} }} }}'), "releases")


def test_oversized_query_document_is_refused(server: Server) -> None:
    query = FLY_QUERY + "#" + "x" * 20_000 + "\n"
    _refused(server.post(query, {"appName": "gq", "limit": 1}), "bytes")


def test_oversized_answer_is_refused_not_truncated(server: Server) -> None:
    body = " ".join(
        f"r{i}: releasesUnprocessed(first: 100) {{ nodes {{ {NODE} }} }}" for i in range(10)
    )
    _refused(server.post(f'{{ app(name: "big") {{ {body} }} }}'), "answer")
    ok = server.post(f'{{ app(name: "gq") {{ {body} }} }}')
    assert ok.status_code == 200, ok.text[:300]
    assert len(ok.json()["data"]["app"]["r9"]["nodes"]) == 100


def _raw_post(server: Server, doc: dict[str, Any]) -> socket.socket:
    """Send a whole GraphQL request on a new connection; the answer is read later."""
    body = json.dumps(doc).encode()
    head = (
        f"POST /graphql HTTP/1.1\r\nHost: {server.reg.host}\r\n"
        f"Authorization: Bearer {server.token}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    sock = socket.create_connection(("127.0.0.1", server.reg.port), timeout=60)
    sock.sendall(head + body)
    return sock


def _read_answer(sock: socket.socket) -> tuple[int, Any]:
    data = b""
    while chunk := sock.recv(1 << 16):
        data += chunk
    sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_heavy_queries_do_not_stall_other_requests(server: Server) -> None:
    body = " ".join(
        f"r{i}: releasesUnprocessed(first: 100) {{ nodes {{ {NODE} }} }}" for i in range(10)
    )
    heavy = {"query": f'{{ app(name: "gq") {{ {body} }} }}'}
    # As many as one org may have in progress (more would be refused at once with 429).
    socks = [_raw_post(server, heavy) for _ in range(PER_CALLER)]
    try:
        # Every heavy request is on the wire before this one is even connected.
        v2 = requests.get(f"{server.reg.url}/v2/", timeout=60)
        assert v2.status_code == 401  # answered (auth is on)
        readable, _, _ = select.select(socks, [], [], 0)
        assert readable == [], "a GraphQL answer arrived before /v2/ was answered"
        for sock in socks:
            status, doc = _read_answer(sock)
            assert status == 200, doc
            assert len(doc["data"]["app"]["r0"]["nodes"]) == 100
    finally:
        for sock in socks:
            sock.close()


HEAVY = {
    "query": '{ app(name: "gq") { '
    + " ".join(f"r{i}: releasesUnprocessed(first: 100) {{ nodes {{ {NODE} }} }}" for i in range(10))
    + " } }"
}
TRIVIAL = '{ app(name: "bq") { name } }'


@pytest.fixture(scope="module")
def other_org(server: Server) -> Server:
    """A token of a second org (`beta`, app `bq`) on the same server."""
    t = Tenancy(server.reg.data_dir)
    t.org("beta")
    t.app("bq", "beta")
    return Server(server.reg, t.token("org", org="beta")[0])


def _read_full_answer(sock: socket.socket) -> tuple[int, dict[str, str], Any]:
    data = b""
    while chunk := sock.recv(1 << 16):
        data += chunk
    sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return int(lines[0].split()[1]), headers, json.loads(body)


def test_one_org_saturating_graphql_does_not_lock_out_another(
    server: Server, other_org: Server
) -> None:
    socks = [_raw_post(server, HEAVY) for _ in range(12)]
    try:
        # Org A's twelve heavy queries are on the wire before org B's trivial one.
        b = other_org.post(TRIVIAL)
        assert b.status_code == 200, b.text
        assert b.json() == {"data": {"app": {"name": "bq"}}}
        answers = [_read_full_answer(sock) for sock in socks]
    finally:
        for sock in socks:
            sock.close()
    statuses = sorted(status for status, _, _ in answers)
    assert set(statuses) <= {200, 429}, statuses
    assert 200 in statuses  # org A's own allowance still runs
    for status, headers, doc in answers:
        if status == 429:
            assert int(headers["retry-after"]) >= 1
            assert "in progress for this organization" in doc["errors"][0]["message"]
        else:
            assert len(doc["data"]["app"]["r9"]["nodes"]) == 100


def _token(server: Server) -> TokenRecord:
    auth = Tenancy(server.reg.data_dir)._auth()
    try:
        return auth.token_for_secret(server.token)
    finally:
        auth.platform.close()


def _service(meta: RegistryMeta) -> ReleaseService:
    """The release service GraphQL resolvers ask, over `meta`'s database."""
    platform = PlatformMeta(meta.db)
    return ReleaseService(
        registry=meta,
        releases=ReleaseMeta(meta.db),
        machines=MachineMeta(meta.db),
        platform=platform,
        policy=AccessPolicy(platform),
        public_host="registry.test",
    )


def test_per_org_cap_refuses_the_excess_and_others_queue_in_turn(
    server: Server, other_org: Server
) -> None:
    """In one event loop, admission is decided in submission order: deterministic outcomes."""
    meta = open_database(None, server.reg.data_dir)
    runner = GraphQLRunner(_service(meta), workers=1, per_caller=2)
    org_a, org_b = _token(server), _token(other_org)

    async def scenario() -> tuple[dict[str, int], list[str]]:
        finished: list[str] = []

        async def one(name: str, token: TokenRecord, query: str) -> tuple[str, int]:
            status, _ = await runner.run(token, query, {}, None)
            if status == 200:
                finished.append(name)
            return name, status

        # a0 runs; b queues for the pool, then a1 behind it; a2... are over org A's cap.
        order = [("a0", org_a), ("b", org_b), *((f"a{i}", org_a) for i in range(1, 12))]
        tasks = [
            asyncio.create_task(one(name, tok, TRIVIAL if tok is org_b else HEAVY["query"]))
            for name, tok in order
        ]
        return dict(await asyncio.gather(*tasks)), finished

    try:
        statuses, finished = asyncio.run(scenario())
    finally:
        runner.close()
        meta.close()
    assert statuses == {"a0": 200, "b": 200, "a1": 200, **{f"a{i}": 429 for i in range(2, 12)}}
    assert finished == ["a0", "b", "a1"]  # first come, first served: b is not overtaken


def test_waiting_for_the_pool_is_bounded(server: Server, other_org: Server) -> None:
    meta = open_database(None, server.reg.data_dir)
    org_a, org_b = _token(server), _token(other_org)
    # No wait at all, or no room to wait: a caller finding the pool busy is told to come back.
    for runner in (
        GraphQLRunner(_service(meta), workers=1, per_caller=1, wait_timeout=0),
        GraphQLRunner(_service(meta), workers=1, per_caller=1, max_waiting=0),
    ):

        async def scenario(runner: GraphQLRunner = runner) -> tuple[int, int, bytes]:
            a = asyncio.create_task(runner.run(org_a, HEAVY["query"], {}, None))
            b = asyncio.create_task(runner.run(org_b, TRIVIAL, {}, None))
            (a_status, _), (b_status, b_body) = await asyncio.gather(a, b)
            return a_status, b_status, b_body

        try:
            a_status, b_status, b_body = asyncio.run(scenario())
        finally:
            runner.close()
        assert a_status == 200
        assert b_status == 503, b_body
        assert b"busy" in b_body
    meta.close()
