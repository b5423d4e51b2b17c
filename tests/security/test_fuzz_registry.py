"""Hypothesis against the registry API (/v2/) of a real `skyreg serve`: no 5xx, nothing stored
that should not be.

Manifests of every media type (valid, mutated, nested, huge), chunked uploads sent in any order,
and arbitrary names, references, digests and Range headers; strings include NUL, lone
surrogates and very long text. Runs on both backings (SQLite + filesystem, PostgreSQL + S3).
Examples are bounded and derandomized, so CI runs the same requests
every time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.backings import create_org_and_app, start_on_backing
from tests.support.oci import (
    DOCKER_CONFIG,
    DOCKER_LAYER,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_EMPTY,
    OCI_INDEX,
    OCI_LAYER,
    OCI_MANIFEST,
    push_blob,
    sha256,
)
from tests.support.servers import BACKINGS, ServedRegistry

APP = "fuzzreg"
FUZZ = settings(
    max_examples=60,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)


MEDIA_TYPES = [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST, "application/json", ""]


@dataclass
class Server:
    reg: ServedRegistry
    http: requests.Session  # Basic with the admin token
    config: bytes  # pushed blobs the generated manifests may reference
    layer: bytes
    child: bytes  # a pushed image manifest, for indexes and subjects

    def url(self, path: str) -> str:
        return f"{self.reg.url}/v2/{APP}/{path}"


@pytest.fixture(scope="module", params=BACKINGS)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """A server with auth on and app APP (seeded through the API), on each backing."""
    with contextlib.ExitStack() as stack:
        data_dir = tmp_path_factory.mktemp("fuzzreg") / "data"
        reg, admin = start_on_backing(request, stack, data_dir)
        http = stack.enter_context(requests.Session())
        http.auth = ("admin", admin)
        create_org_and_app(http, reg.url, "fuzz", APP)
        config, layer = b'{"architecture":"amd64","os":"linux"}', b"layer bytes"
        for blob in (config, layer, b"{}"):
            push_blob(reg.url, APP, blob, session=http)
        child = json.dumps(image(OCI_MANIFEST, config, layer)).encode()
        resp = http.put(
            f"{reg.url}/v2/{APP}/manifests/child",
            data=child,
            headers={"Content-Type": OCI_MANIFEST},
        )
        assert resp.status_code == 201, resp.text
        yield Server(reg, http, config, layer, child)


def descriptor(media_type: str, data: bytes) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": sha256(data), "size": len(data)}


def image(media_type: str, config: bytes, layer: bytes) -> dict[str, Any]:
    docker = media_type == DOCKER_MANIFEST
    return {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": descriptor(DOCKER_CONFIG if docker else OCI_CONFIG, config),
        "layers": [descriptor(DOCKER_LAYER if docker else OCI_LAYER, layer)],
    }


def valid_documents(s: Server) -> list[tuple[str, dict[str, Any]]]:
    """One valid manifest of each kind, as (Content-Type, document)."""
    child = descriptor(OCI_MANIFEST, s.child)
    artifact = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example.sbom",
        "config": descriptor(OCI_EMPTY, b"{}"),
        "layers": [descriptor(OCI_LAYER, s.layer)],
        "subject": child,
    }
    return [
        (OCI_MANIFEST, image(OCI_MANIFEST, s.config, s.layer)),
        (DOCKER_MANIFEST, image(DOCKER_MANIFEST, s.config, s.layer)),
        (OCI_INDEX, {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [child]}),
        (DOCKER_LIST, {"schemaVersion": 2, "mediaType": DOCKER_LIST, "manifests": [child]}),
        (OCI_MANIFEST, artifact),
    ]


# Text no database column stores (NUL; a lone surrogate, which json.dumps writes as "\\ud800"),
# and very long text.
HOSTILE_TEXT = ["\x00", "a\x00b", "\ud800", "x\udfff", "a" * 100_000]
hostile_text = st.sampled_from(HOSTILE_TEXT) | st.text(max_size=20)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | hostile_text
    | st.sampled_from(["sha256:" + "0" * 64, "sha512:x", OCI_MANIFEST, OCI_INDEX]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(hostile_text, inner, max_size=4),
    max_leaves=20,
)
KEYS = ["schemaVersion", "mediaType", "config", "layers", "manifests", "subject", "annotations"]
SUBKEYS = ["mediaType", "digest", "size", "urls", "annotations", "platform", "artifactType"]
# Fields stored in columns or compared with them: a hostile string goes into one of them.
TEXT_FIELDS = ["artifactType", "mediaType", "annotations"]


@st.composite
def manifest_bodies(draw: st.DrawFn, s: Server) -> tuple[str, bytes]:
    """(Content-Type, body): valid manifests, mutated ones, and bytes that are barely JSON."""
    kind = draw(st.sampled_from(["valid", "mutated", "hostile", "deep", "huge-number", "bytes"]))
    content_type, doc = draw(st.sampled_from(valid_documents(s)))
    content_type = draw(st.sampled_from([content_type, *MEDIA_TYPES]))
    if kind == "valid":
        return content_type, json.dumps(doc).encode()
    if kind == "mutated":
        doc = json.loads(json.dumps(doc))
        for _ in range(draw(st.integers(1, 3))):
            target = doc
            inner = [v for v in doc.values() if isinstance(v, dict)]
            inner += [
                d for v in doc.values() if isinstance(v, list) for d in v if isinstance(d, dict)
            ]
            if draw(st.booleans()) and inner:
                target = draw(st.sampled_from(inner))
            key = draw(st.sampled_from(KEYS + SUBKEYS) | st.text(max_size=8))
            if draw(st.booleans()):
                target.pop(key, None)
            else:
                target[key] = draw(json_values)
        return content_type, json.dumps(doc).encode()
    if kind == "hostile":  # a valid document but for one string, at the top or in a descriptor
        doc = json.loads(json.dumps(doc))
        parts = [v for v in doc.values() if isinstance(v, dict)]
        parts += [d for v in doc.values() if isinstance(v, list) for d in v if isinstance(d, dict)]
        target = draw(st.sampled_from([doc, *parts]))
        text = draw(st.sampled_from(HOSTILE_TEXT))
        field = draw(st.sampled_from(TEXT_FIELDS))
        if field == "annotations":
            key, value = draw(st.sampled_from([(text, "v"), ("k", text)]))
            target["annotations"] = {key: value}
        else:
            target[field] = text
        return content_type, json.dumps(doc).encode()
    if kind == "deep":
        depth = draw(st.sampled_from([63, 64, 65, 1000, 200_000]))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        where = draw(st.sampled_from(["layers", "annotations", "config"]))
        text = json.dumps({**doc, where: "X"})
        return content_type, text.replace('"X"', opener * depth + "1" + closer * depth).encode()
    if kind == "huge-number":
        digits = draw(st.sampled_from([19, 20, 400, 4301, 100_000]))
        text = json.dumps({**doc, "schemaVersion": "X"})
        return content_type, text.replace('"X"', "9" * digits).encode()
    return content_type, draw(st.binary(max_size=64))


def tags(s: Server) -> list[str]:
    resp = s.http.get(s.url("tags/list"))
    assert resp.status_code == 200, resp.text
    listed: list[str] = resp.json()["tags"]
    return listed


def test_manifest_puts_never_fail_and_refused_ones_store_nothing(server: Server) -> None:
    counter = iter(range(10**6))
    stored = {sha256(server.child)}  # digests of manifests pushed so far

    @given(body=manifest_bodies(server))
    @FUZZ
    def check(body: tuple[str, bytes]) -> None:
        content_type, raw = body
        tag = f"t{next(counter)}"
        headers = {"Content-Type": content_type} if content_type else {}
        resp = server.http.put(server.url(f"manifests/{tag}"), data=raw, headers=headers)
        assert resp.status_code < 500, resp.text[:300]
        got = server.http.get(server.url(f"manifests/{tag}"))
        by_digest = server.http.get(
            server.url(f"manifests/sha256:{hashlib.sha256(raw).hexdigest()}")
        )
        if resp.status_code == 201:
            stored.add(sha256(raw))
            assert got.status_code == 200
            assert got.content == raw
            assert tag in tags(server)
        else:
            assert 400 <= resp.status_code < 500
            assert resp.json()["errors"][0]["code"] in {
                "MANIFEST_INVALID",
                "MANIFEST_BLOB_UNKNOWN",
                "MANIFEST_TOO_LARGE",
                "TAG_INVALID",
                "DIGEST_INVALID",
            }
            assert got.status_code == 404
            assert by_digest.status_code == (200 if sha256(raw) in stored else 404)
            assert tag not in tags(server)

    check()


@st.composite
def chunk_plans(draw: st.DrawFn) -> tuple[bytes, list[tuple[int, int]]]:
    """A blob and the (start, end) byte ranges a client sends it in: any order, overlapping,
    with gaps, or in order."""
    data = draw(st.binary(min_size=1, max_size=64))
    cuts = sorted(draw(st.sets(st.integers(1, len(data) - 1), max_size=4))) if len(data) > 1 else []
    pieces = [(a, b - 1) for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    shuffled = draw(st.permutations(pieces))
    extra = draw(st.lists(st.tuples(st.integers(0, 80), st.integers(0, 80)), max_size=2))
    order = draw(st.sampled_from(["in order", "shuffled", "with extra"]))
    if order == "in order":
        return data, pieces
    if order == "shuffled":
        return data, list(shuffled)
    return data, [*pieces[: len(pieces) // 2], *extra, *pieces[len(pieces) // 2 :]]


def test_chunks_out_of_order_are_416_and_failed_uploads_serve_nothing(server: Server) -> None:
    counter = iter(range(10**6))

    @given(plan=chunk_plans())
    @FUZZ
    def check(plan: tuple[bytes, list[tuple[int, int]]]) -> None:
        data, ranges = plan
        salt = next(counter).to_bytes(8, "big")
        data = salt + data  # a blob no earlier example stored
        ranges = [(0, len(salt) - 1)] + [(a + len(salt), b + len(salt)) for a, b in ranges]
        start = server.http.post(server.url("blobs/uploads/"))
        assert start.status_code == 202, start.text
        url = server.reg.url + start.headers["Location"]
        size = 0
        for first, last in ranges:
            body = data[first : last + 1] if first <= last else b""
            resp = server.http.patch(
                url,
                data=body,
                headers={
                    "Content-Range": f"{first}-{last}",
                    "Content-Type": "application/octet-stream",
                },
            )
            assert resp.status_code < 500, resp.text
            if first == size and last >= first and len(body) == last - first + 1:
                assert resp.status_code == 202, resp.text
                size = last + 1
            else:
                assert resp.status_code in (400, 416), resp.text
                assert resp.json()["errors"][0]["code"] in ("BLOB_UPLOAD_INVALID", "SIZE_INVALID")
            status = server.http.get(url)
            assert status.status_code == 204
            assert status.headers["Range"] == f"0-{max(size - 1, 0)}"
        digest = sha256(data)
        done = server.http.put(url, params={"digest": digest})
        blob = server.http.head(server.url(f"blobs/{digest}"))
        if size == len(data):
            assert done.status_code == 201, done.text
            assert blob.status_code == 200
        else:
            assert done.status_code == 400, done.text
            assert done.json()["errors"][0]["code"] == "DIGEST_INVALID"
            assert blob.status_code == 404

    check()


# No lone surrogates: a URL is bytes, and aiohttp refuses invalid UTF-8 in it or decodes an
# escaped one to U+FFFD. Long values stay within aiohttp's 8 KiB request line.
path_text = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=80
) | st.sampled_from(
    [
        "sha256:" + "a" * 64,
        "sha512:" + "b" * 128,
        "latest",
        "..",
        "_catalog",
        "\x00",
        "a\x00b",
        "sha256:" + "a" * 63 + "\x00",
        "%ED%A0%80",
        "a" * 1000,
    ]
)
range_headers = st.one_of(
    st.text(st.characters(codec="latin-1", exclude_categories=["Cc"]), max_size=40),
    st.builds(
        lambda a, b: f"bytes={a}-{b}",
        st.sampled_from(["", "0", "1", "4", "5", "99999999999999999999", "9" * 4400, "-1"]),
        st.sampled_from(["", "0", "1", "4", "5", "99999999999999999999", "9" * 3000, "x"]),
    ),
)


def test_arbitrary_names_references_and_ranges_never_fail(server: Server) -> None:
    blob = sha256(server.layer)

    @given(
        name=path_text,
        reference=path_text,
        kind=st.sampled_from(["manifests", "blobs", "tags/list", "referrers", "blobs/uploads"]),
        method=st.sampled_from(["GET", "HEAD", "DELETE", "PUT", "PATCH", "POST"]),
        range_header=range_headers,
        query=st.dictionaries(
            st.sampled_from(["n", "last", "digest", "mount", "from", "artifactType", "tag"]),
            path_text,
            max_size=3,
        ),
    )
    @FUZZ
    def check(
        name: str,
        reference: str,
        kind: str,
        method: str,
        range_header: str,
        query: dict[str, str],
    ) -> None:
        name = draw_name(name)
        path = f"/v2/{quote(name, safe='/')}/{kind}/{quote(reference, safe='')}"
        resp = server.http.request(
            method,
            server.reg.url + path,
            params=query,
            headers={"Range": range_header},
            data=b"x" if method in ("PUT", "PATCH", "POST") else None,
        )
        assert resp.status_code < 500, (path, resp.status_code, resp.text[:300])
        ranged = server.http.get(server.url(f"blobs/{blob}"), headers={"Range": range_header})
        assert ranged.status_code in (200, 206, 416), (range_header, ranged.text[:300])

    check()


def draw_name(generated: str) -> str:
    """Half the examples under the seeded app (past authorization), half anywhere."""
    return f"{APP}/{generated}".rstrip("/") if len(generated) % 2 else generated or APP


HOSTILE_QUERY_TEXT = ["\x00", "a\x00b", "latest\x00", "\ufffd", "a" * 4000]


def test_hostile_query_text_is_refused_or_answered_never_a_failure(server: Server) -> None:
    child = sha256(server.child)
    # (method, path, fixed query, the parameter drawn): each reads its parameter as text.
    endpoints = [
        ("GET", server.url("tags/list"), {}, "last"),
        ("GET", f"{server.reg.url}/v2/_catalog", {}, "last"),
        ("GET", server.url(f"referrers/{child}"), {}, "artifactType"),
        ("PUT", server.url("manifests/hostile"), {}, "tag"),
        ("POST", server.url("blobs/uploads/"), {"mount": sha256(server.layer)}, "from"),
        ("POST", server.url("blobs/uploads/"), {"from": APP}, "mount"),
    ]

    @given(
        endpoint=st.sampled_from(endpoints),
        value=st.sampled_from(HOSTILE_QUERY_TEXT) | st.text(max_size=40),
    )
    @FUZZ
    def check(endpoint: tuple[str, str, dict[str, str], str], value: str) -> None:
        method, url, fixed, param = endpoint
        resp = server.http.request(
            method,
            url,
            params={**fixed, param: value},
            data=server.child if method == "PUT" else None,
            headers={"Content-Type": OCI_MANIFEST} if method == "PUT" else {},
        )
        assert resp.status_code < 500, (param, value[:40], resp.text[:300])
        if "\x00" in value:
            assert resp.status_code == 400, (param, resp.text[:300])
            assert resp.json()["errors"][0]["code"] in {
                "TAG_INVALID",
                "NAME_INVALID",
                "MANIFEST_INVALID",
                "DIGEST_INVALID",
            }

    check()
