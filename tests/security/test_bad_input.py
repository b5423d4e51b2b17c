"""Malformed input of any shape is a 4xx with the right error code, never a 500.

Deeply nested JSON (a RecursionError in the parser), integers beyond what the interpreter or a
64-bit database column takes, non-ASCII digits, the same in Range headers, and strings a database
refuses (NUL, lone surrogates) or that are very long: each against a real `skyreg serve` with
authentication on, on both backings (SQLite + filesystem, PostgreSQL + S3).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests

from tests.support.backings import create_org_and_app, start_on_backing
from tests.support.oci import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    image_manifest,
    push_blob,
)
from tests.support.servers import BACKINGS, ServedRegistry

APP = "bad"
DEEP = 100_000  # far beyond Python's recursion limit


@dataclass
class Server:
    reg: ServedRegistry
    api: requests.Session  # Bearer admin token, for /api/v1 and /graphql
    v2: requests.Session  # Basic admin token, for /v2/
    blob: str  # a 5-byte blob in repository APP

    @property
    def url(self) -> str:
        return self.reg.url


@pytest.fixture(scope="module", params=BACKINGS)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """A server with auth on, org `acme` and app APP (seeded through the API, which works on
    either database), on each backing."""
    with contextlib.ExitStack() as stack:
        data_dir = tmp_path_factory.mktemp("badinput") / "data"
        reg, admin = start_on_backing(request, stack, data_dir)
        api = stack.enter_context(requests.Session())
        v2 = stack.enter_context(requests.Session())
        api.headers["Authorization"] = f"Bearer {admin}"
        v2.auth = ("admin", admin)
        create_org_and_app(api, reg.url, "acme", APP)
        blob = push_blob(reg.url, APP, b"hello", session=v2)
        yield Server(reg, api, v2, blob)


def api_error(resp: requests.Response, status: int = 400) -> dict[str, Any]:
    """The management API's `{"error": {"code", "message"}}` body of a `status` answer."""
    assert resp.status_code == status, (resp.status_code, resp.text[:300])
    error: dict[str, Any] = resp.json()["error"]
    assert isinstance(error["code"], str) and isinstance(error["message"], str)
    return error


def assert_query_refused(server: Server, path: str, param: str, value: str) -> None:
    """A management API GET of `path` with `param`=`value` is a 400 bad_request naming it."""
    error = api_error(server.api.get(server.url + path, params={param: value}))
    assert error["code"] == "bad_request"
    assert param in error["message"]


def registry_codes(resp: requests.Response, status: int) -> list[str]:
    assert resp.status_code == status, (resp.status_code, resp.text[:300])
    return [e["code"] for e in resp.json()["errors"]]


def nested(depth: int, inner: str = "1") -> str:
    return "[" * depth + inner + "]" * depth


# -- JSON documents -------------------------------------------------------------------------------


NESTED_MANIFESTS = {
    "array at the top": nested(DEEP).encode(),
    "object values": ('{"a":' * DEEP + "1" + "}" * DEEP).encode(),
    "inside an annotation-shaped field": json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "annotations": "X"}
    )
    .replace('"X"', nested(DEEP))
    .encode(),
    "an integer of 5,000 digits": json.dumps({"schemaVersion": 2, "size": "X"})
    .replace('"X"', "9" * 5000)
    .encode(),
    "NaN": b'{"schemaVersion": NaN}',
}


@pytest.mark.parametrize("media_type", [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST])
@pytest.mark.parametrize("shape", list(NESTED_MANIFESTS))
def test_nested_or_out_of_range_manifest_json_is_manifest_invalid(
    server: Server, shape: str, media_type: str
) -> None:
    tag = f"bad-{list(NESTED_MANIFESTS).index(shape)}-{len(media_type)}"
    resp = server.v2.put(
        f"{server.url}/v2/{APP}/manifests/{tag}",
        data=NESTED_MANIFESTS[shape],
        headers={"Content-Type": media_type},
    )
    assert registry_codes(resp, 400) == ["MANIFEST_INVALID"]
    assert server.v2.get(f"{server.url}/v2/{APP}/manifests/{tag}").status_code == 404


def test_an_ordinary_manifest_is_still_accepted(server: Server) -> None:
    config = b"{}"
    push_blob(server.url, APP, config, session=server.v2)
    doc = json.loads(image_manifest(config, []))
    doc["annotations"] = {"x": "y"}
    raw = json.dumps(doc).encode()
    resp = server.v2.put(
        f"{server.url}/v2/{APP}/manifests/shallow",
        data=raw,
        headers={"Content-Type": OCI_MANIFEST},
    )
    assert resp.status_code == 201, resp.text


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/api/v1/orgs"),
        ("POST", "/api/v1/apps"),
        ("PATCH", f"/api/v1/apps/{APP}"),
        ("POST", "/api/v1/tokens"),
        ("POST", f"/api/v1/apps/{APP}/releases"),
    ],
)
@pytest.mark.parametrize("body", ["array", "object"])
def test_nested_api_body_is_bad_request(server: Server, method: str, path: str, body: str) -> None:
    raw = '{"name":' + nested(20_000) + "}" if body == "array" else '{"a":' * 10_000 + "}" * 10_000
    resp = server.api.request(
        method, server.url + path, data=raw, headers={"Content-Type": "application/json"}
    )
    assert api_error(resp)["code"] == "bad_request"


def test_nested_graphql_body_is_bad_request(server: Server) -> None:
    raw = '{"query": "{ __typename }", "variables": {"a": ' + nested(30_000) + "}}"
    resp = server.api.post(
        f"{server.url}/graphql", data=raw, headers={"Content-Type": "application/json"}
    )
    assert resp.status_code == 400, resp.text[:300]


# -- integers in query parameters ---------------------------------------------------------------

OUT_OF_RANGE = [
    "99999999999999999999",  # beyond a signed 64-bit column
    str(2**63),
    "9" * 5000,  # beyond the interpreter's integer-digit limit
    "\u00b2",  # str.isdigit() says yes, int() says no
    "\u0663",  # an Arabic-Indic three: not an ASCII number
    "-1",
    "+1",
    " 1",
    "1_0",
]

API_INT_PARAMS = [
    (f"/api/v1/apps/{APP}/logs", "after"),
    (f"/api/v1/apps/{APP}/releases", "limit"),
    (f"/api/v1/apps/{APP}/machines", "limit"),
    ("/api/v1/agent/machines", "limit"),
]


@pytest.mark.parametrize("value", OUT_OF_RANGE)
@pytest.mark.parametrize(("path", "param"), API_INT_PARAMS)
def test_out_of_range_integer_in_api_query_is_bad_request(
    server: Server, path: str, param: str, value: str
) -> None:
    assert_query_refused(server, path, param, value)


def test_largest_log_id_is_accepted(server: Server) -> None:
    resp = server.api.get(f"{server.url}/api/v1/apps/{APP}/logs", params={"after": 2**63 - 1})
    assert resp.status_code == 200, resp.text
    assert resp.json()["lines"] == []


@pytest.mark.parametrize("value", OUT_OF_RANGE)
@pytest.mark.parametrize("path", [f"/v2/{APP}/tags/list", "/v2/_catalog"])
def test_out_of_range_page_size_is_pagination_number_invalid(
    server: Server, path: str, value: str
) -> None:
    resp = server.v2.get(server.url + path, params={"n": value})
    assert registry_codes(resp, 400) == ["PAGINATION_NUMBER_INVALID"]


# -- integers in headers ------------------------------------------------------------------------

BEYOND_64_BITS = "9" * 20
HUGE = "9" * 4400  # beyond the interpreter's integer-digit limit, within aiohttp's header limit


@pytest.mark.parametrize("header", [f"bytes={HUGE}-", f"bytes={HUGE}-{HUGE[:3000]}"])
def test_huge_range_numbers_are_unsatisfiable(server: Server, header: str) -> None:
    resp = server.v2.get(f"{server.url}/v2/{APP}/blobs/{server.blob}", headers={"Range": header})
    assert registry_codes(resp, 416) == ["RANGE_INVALID"]
    assert resp.headers["Content-Range"] == "bytes */5"


@pytest.mark.parametrize(
    ("header", "content"),
    [(f"bytes=1-{BEYOND_64_BITS}", b"ello"), (f"bytes=-{BEYOND_64_BITS}", b"hello")],
)
def test_a_huge_range_end_or_suffix_is_clamped_to_the_blob(
    server: Server, header: str, content: bytes
) -> None:
    resp = server.v2.get(f"{server.url}/v2/{APP}/blobs/{server.blob}", headers={"Range": header})
    assert resp.status_code == 206, resp.text
    assert resp.content == content


@pytest.mark.parametrize("content_range", [f"0-{HUGE}", f"{HUGE}-{HUGE[:3000]}", f"0-{2**63}"])
def test_huge_content_range_numbers_are_refused(server: Server, content_range: str) -> None:
    start = server.v2.post(f"{server.url}/v2/{APP}/blobs/uploads/")
    assert start.status_code == 202, start.text
    location = start.headers["Location"]
    url = location if location.startswith("http") else server.url + location
    resp = server.v2.patch(url, data=b"ab", headers={"Content-Range": content_range})
    assert registry_codes(resp, 416) == ["BLOB_UPLOAD_INVALID"]
    status = server.v2.get(url)
    assert status.status_code == 204
    assert status.headers["Range"] == "0-0"  # nothing was appended


# -- strings a database cannot store ------------------------------------------------------------
# PostgreSQL refuses NUL in text ("A string literal cannot contain NUL (0x00) characters") and no
# driver can encode a lone surrogate as UTF-8: either must be refused at the edge, never reach a
# query. `\u0000` and `\ud800` are JSON escapes, written into documents as such.

NUL_VALUES = ["\x00", "a\x00b"]
JSON_UNSTORABLE = {"NUL": "\\u0000", "text around NUL": "a\\u0000b", "lone surrogate": "\\ud800"}
MARK = "@MARK@"
LONG = "a" * 4000  # long, but within aiohttp's 8 KiB request line


def with_escape(doc: dict[str, Any], escape: str) -> bytes:
    """`doc` as JSON with every MARK replaced by the raw JSON text `escape`."""
    return json.dumps(doc).replace(MARK, escape).encode()


REGISTRY_QUERIES = [
    (f"/v2/{APP}/tags/list", "last", "TAG_INVALID"),
    ("/v2/_catalog", "last", "NAME_INVALID"),
    (f"/v2/{APP}/referrers/{'sha256:' + '0' * 64}", "artifactType", "MANIFEST_INVALID"),
]


@pytest.mark.parametrize("value", NUL_VALUES)
@pytest.mark.parametrize(("path", "param", "code"), REGISTRY_QUERIES)
def test_nul_in_a_registry_query_is_refused_with_its_code(
    server: Server, path: str, param: str, code: str, value: str
) -> None:
    resp = server.v2.get(server.url + path, params={param: value})
    assert registry_codes(resp, 400) == [code]


@pytest.mark.parametrize(("path", "param", "code"), REGISTRY_QUERIES)
def test_a_long_registry_query_value_is_answered(
    server: Server, path: str, param: str, code: str
) -> None:
    resp = server.v2.get(server.url + path, params={param: LONG})
    assert resp.status_code == 200, (code, resp.text[:300])


@pytest.mark.parametrize(
    ("param", "code"),
    [("tag", "TAG_INVALID"), ("mount", "DIGEST_INVALID"), ("from", "NAME_INVALID")],
)
def test_nul_in_upload_and_manifest_parameters_is_refused(
    server: Server, param: str, code: str
) -> None:
    if param == "tag":
        resp = server.v2.put(
            f"{server.url}/v2/{APP}/manifests/nul-param",
            params={"tag": "a\x00b"},
            data=image_manifest(b"hello", []),
            headers={"Content-Type": OCI_MANIFEST},
        )
    else:
        params = {"mount": server.blob, "from": APP, param: "a\x00b"}
        resp = server.v2.post(f"{server.url}/v2/{APP}/blobs/uploads/", params=params)
    assert registry_codes(resp, 400) == [code]


MANIFEST_STRING_FIELDS: dict[str, dict[str, Any]] = {
    "artifactType": {"artifactType": MARK},
    "an annotation value": {"annotations": {"k": MARK}},
    "an annotation key": {"annotations": {MARK: "v"}},
    "a layer annotation": {"layers": [{"annotations": {"k": MARK}}]},
    "the config media type": {"config": {"mediaType": MARK}},
    "a layer URL": {"layers": [{"urls": [MARK]}]},
}


def hostile_manifest(field: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(image_manifest(b"hello", [b"hello"]))
    for key, value in MANIFEST_STRING_FIELDS[field].items():
        if key == "layers":
            doc["layers"][0].update(value[0])
        elif key == "config":
            doc["config"].update(value)
        else:
            doc[key] = value
    return doc


@pytest.mark.parametrize("escape", list(JSON_UNSTORABLE))
@pytest.mark.parametrize("field", list(MANIFEST_STRING_FIELDS))
def test_a_manifest_with_unstorable_strings_is_manifest_invalid(
    server: Server, field: str, escape: str
) -> None:
    push_blob(server.url, APP, b"hello", session=server.v2)
    raw = with_escape(hostile_manifest(field), JSON_UNSTORABLE[escape])
    tag = f"unstorable-{list(MANIFEST_STRING_FIELDS).index(field)}-{len(escape)}"
    resp = server.v2.put(
        f"{server.url}/v2/{APP}/manifests/{tag}", data=raw, headers={"Content-Type": OCI_MANIFEST}
    )
    assert registry_codes(resp, 400) == ["MANIFEST_INVALID"]
    assert server.v2.get(f"{server.url}/v2/{APP}/manifests/{tag}").status_code == 404


def test_a_manifest_with_escaped_text_and_emoji_is_stored_as_sent(server: Server) -> None:
    doc = hostile_manifest("an annotation value")
    raw = with_escape(doc, "\\\\u0000 \\ud83d\\ude00 \\u00e9")  # a backslash, a pair, é
    resp = server.v2.put(
        f"{server.url}/v2/{APP}/manifests/escaped",
        data=raw,
        headers={"Content-Type": OCI_MANIFEST},
    )
    assert resp.status_code == 201, resp.text
    assert server.v2.get(f"{server.url}/v2/{APP}/manifests/escaped").content == raw


API_QUERIES = [
    ("/api/v1/apps", "org"),
    ("/api/v1/tokens", "org"),
    ("/api/v1/agent/machines", "region"),
    ("/api/v1/agent/machines", "cursor"),
    (f"/api/v1/apps/{APP}/machines", "cursor"),
]


@pytest.mark.parametrize("value", NUL_VALUES)
@pytest.mark.parametrize(("path", "param"), API_QUERIES)
def test_nul_in_an_api_query_is_bad_request(
    server: Server, path: str, param: str, value: str
) -> None:
    assert_query_refused(server, path, param, value)


@pytest.mark.parametrize(("path", "param"), API_QUERIES)
def test_a_long_api_query_value_is_not_a_server_error(
    server: Server, path: str, param: str
) -> None:
    resp = server.api.get(server.url + path, params={param: LONG})
    assert resp.status_code < 500, resp.text[:300]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/v1/apps/a%00b"),
        ("PATCH", "/api/v1/apps/a%00b"),
        ("GET", "/api/v1/apps/a%00b/images"),
        ("GET", f"/api/v1/apps/{APP}/images/a%00b"),
        ("GET", "/api/v1/apps/a%00b/releases"),
        ("GET", "/api/v1/apps/a%00b/logs"),
        ("DELETE", "/api/v1/tokens/a%00b"),
        ("POST", "/api/v1/machines/a%00b/stop"),
        ("POST", "/api/v1/agent/machines/a%00b/state"),
    ],
)
def test_nul_in_an_api_path_is_bad_request(server: Server, method: str, path: str) -> None:
    resp = server.api.request(method, server.url + path, json={})
    assert api_error(resp)["code"] == "bad_request"


API_BODIES = [
    ("POST", "/api/v1/orgs", {"name": MARK}),
    ("POST", "/api/v1/apps", {"name": MARK, "org": "acme"}),
    ("POST", "/api/v1/apps", {"name": "fine", "org": MARK}),
    ("PATCH", f"/api/v1/apps/{APP}", {"regions": [MARK]}),
    ("POST", "/api/v1/tokens", {"kind": "org", "org": MARK}),
    ("POST", "/api/v1/tokens", {"kind": "org", "org": "acme", "name": MARK}),
    ("POST", "/api/v1/tokens", {"kind": "deploy", "app": MARK}),
    ("POST", f"/api/v1/apps/{APP}/releases", {"image": MARK}),
    ("POST", f"/api/v1/apps/{APP}/releases", {"image": f"{APP}:{MARK}"}),
    ("POST", f"/api/v1/apps/{APP}/releases", {"image": APP, "description": MARK}),
    ("POST", f"/api/v1/apps/{APP}/releases", {"image": APP, "regions": [MARK]}),
    ("POST", f"/api/v1/apps/{APP}/releases", {"image": APP, "image_label": MARK}),
]


@pytest.mark.parametrize("escape", list(JSON_UNSTORABLE))
@pytest.mark.parametrize(("method", "path", "body"), API_BODIES)
def test_unstorable_strings_in_an_api_body_are_bad_request(
    server: Server, method: str, path: str, body: dict[str, Any], escape: str
) -> None:
    resp = server.api.request(
        method,
        server.url + path,
        data=with_escape(body, JSON_UNSTORABLE[escape]),
        headers={"Content-Type": "application/json"},
    )
    assert api_error(resp)["code"] == "bad_request"


@pytest.mark.parametrize(("method", "path", "body"), API_BODIES)
def test_long_strings_in_an_api_body_are_not_a_server_error(
    server: Server, method: str, path: str, body: dict[str, Any]
) -> None:
    raw = with_escape(body, "a" * 100_000)
    resp = server.api.request(
        method, server.url + path, data=raw, headers={"Content-Type": "application/json"}
    )
    assert 400 <= resp.status_code < 500, resp.text[:300]


@pytest.mark.parametrize("escape", list(JSON_UNSTORABLE))
def test_unstorable_strings_in_graphql_variables_are_bad_request(
    server: Server, escape: str
) -> None:
    query = "query($n: String!) { app(name: $n) { releasesUnprocessed { nodes { id } } } }"
    raw = with_escape({"query": query, "variables": {"n": MARK}}, JSON_UNSTORABLE[escape])
    resp = server.api.post(
        f"{server.url}/graphql", data=raw, headers={"Content-Type": "application/json"}
    )
    assert resp.status_code == 400, resp.text[:300]


def test_nul_in_a_graphql_string_literal_is_not_a_server_error(server: Server) -> None:
    query = '{ app(name: "a\\u0000b") { releasesUnprocessed { nodes { id } } } }'
    resp = server.api.post(f"{server.url}/graphql", json={"query": query})
    assert resp.status_code < 500, resp.text[:300]
    assert "NUL" not in resp.text and "psycopg" not in resp.text, resp.text[:300]
