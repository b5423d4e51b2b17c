"""Schemathesis against the management API: no 5xx, and no answer that contradicts its OpenAPI
document (generated from the route declarations, served at /api/v1/openapi.json).

A real `skyreg serve` (authentication on) is seeded with an org, an app holding a pushed image, a
release with machines and a token to revoke, so that generated requests also reach the deep paths
(as-generated path parameters mostly meet 404s). Every case is sent with an admin token and with
an org token, as generated and with its path parameters swapped for the seeded ones; then with
hostile text (NUL, lone surrogates, very long strings) in each query parameter, path parameter
and top-level string field of its JSON body. Runs on both backings (SQLite + filesystem,
PostgreSQL + S3). Examples are bounded and derandomized: the run is the same in CI every time.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.schemas import BaseSchema
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from skyreg.platform.api import ROUTE_LIST
from skyreg.platform.api.openapi import document
from tests.support.backings import create_org_and_app, start_on_backing
from tests.support.oci import push_image
from tests.support.servers import BACKINGS, RunningRegistry

EXAMPLES = 25  # per operation and generation mode mix; each is sent up to 4 times
ORG = "fuzzorg"
APP = "fuzzapp"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@dataclass
class Seeded:
    reg: RunningRegistry
    tokens: dict[str, str]  # kind -> secret
    path_parameters: dict[str, str]  # a real value for every path parameter of the document


@pytest.fixture(scope="module", params=BACKINGS)
def seeded(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Seeded]:
    """A seeded server on each backing (seeded through the API, which works on either)."""
    with contextlib.ExitStack() as stack:
        data_dir = tmp_path_factory.mktemp("fuzzapi") / "data"
        reg, admin = start_on_backing(request, stack, data_dir)
        api = stack.enter_context(requests.Session())
        api.headers["Authorization"] = f"Bearer {admin}"

        def post(path: str, body: dict[str, str | int]) -> dict[str, str]:
            resp = api.post(f"{reg.url}/api/v1/{path}", json=body)
            assert resp.status_code == 201, resp.text
            created: dict[str, str] = resp.json()
            return created

        create_org_and_app(api, reg.url, ORG, APP)
        org_token = post("tokens", {"kind": "org", "org": ORG})["secret"]
        victim_id = post("tokens", {"kind": "deploy", "app": APP})["id"]  # DELETE may revoke it
        v2 = stack.enter_context(requests.Session())
        v2.auth = ("admin", admin)
        push_image(reg.url, APP, "latest", session=v2)
        post(f"apps/{APP}/releases", {"image": f"{APP}:latest", "count": 1})
        machines = api.get(f"{reg.url}/api/v1/apps/{APP}/machines")
        machine_id = machines.json()["machines"][0]["id"]
        yield Seeded(
            reg,
            {"admin": admin, "org": org_token},
            {
                "app": APP,
                "org": ORG,
                "machine_id": machine_id,
                "token_id": victim_id,
                "reference": "latest",
            },
        )


# The operations to fuzz, from the document the server generates (and serves: `api_schema`).
DOCUMENT = document(ROUTE_LIST)
# Values a query parameter may meet in the wild that generation from the document rarely tries.
HOSTILE = [
    "99999999999999999999",
    str(2**63),
    "9" * 5000,
    "\u00b2",
    "-1",
    "",
    "\x00",
    "a\x00b",
    "a" * 1000,
]
# Text no database column stores, and very long text, for path parameters and JSON bodies (a
# lone surrogate cannot be in a URL: aiohttp refuses or replaces invalid UTF-8 there).
HOSTILE_PATH = ["a\x00b", "\x00", "a" * 1000]
HOSTILE_BODY = ["\x00", "a\x00b", "\ud800", "a" * 100_000]


def _operations() -> list[tuple[str, str]]:
    return [
        (path, method)
        for path, item in DOCUMENT["paths"].items()
        for method in item
        if method in ("get", "put", "post", "patch", "delete")
    ]


def _query_names(path: str, method: str) -> list[str]:
    item = DOCUMENT["paths"][path]
    parameters = [*item.get("parameters", []), *item[method].get("parameters", [])]
    return [p["name"] for p in parameters if p.get("in") == "query"]


@pytest.fixture(scope="module")
def api_schema(seeded: Seeded) -> BaseSchema:
    """The document as the server serves it."""
    schema = schemathesis.openapi.from_url(f"{seeded.reg.url}/api/v1/openapi.json")
    schema.config.update(base_url=seeded.reg.url)
    return schema


@pytest.mark.parametrize(("path", "method"), _operations())
def test_api_answers_never_contradict_the_document(
    api_schema: BaseSchema, seeded: Seeded, path: str, method: str
) -> None:
    operation = api_schema[path][method.upper()]
    cases = st.one_of(
        operation.as_strategy(GenerationMode.POSITIVE),
        operation.as_strategy(GenerationMode.NEGATIVE),
    )

    query_names = _query_names(path, method)

    @given(
        case=cases,
        hostile=st.sampled_from(HOSTILE),
        hostile_path=st.sampled_from(HOSTILE_PATH),
        hostile_body=st.sampled_from(HOSTILE_BODY),
    )
    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(case: Case[Any], hostile: str, hostile_path: str, hostile_body: str) -> None:
        generated = dict(case.path_parameters or {})
        variants = [generated]
        if generated:
            variants.append({k: seeded.path_parameters.get(k, v) for k, v in generated.items()})
        for path_parameters in variants:
            case.path_parameters = path_parameters
            for secret in seeded.tokens.values():
                case.call_and_validate(
                    base_url=seeded.reg.url,
                    headers={"Authorization": f"Bearer {secret}"},
                    checks=CHECKS,
                    timeout=30,
                )

        def hostile_call() -> None:
            case.call_and_validate(
                base_url=seeded.reg.url,
                headers={"Authorization": f"Bearer {seeded.tokens['admin']}"},
                checks=[not_a_server_error],
                timeout=30,
            )

        seeded_parameters = case.path_parameters
        for name in query_names:  # each query parameter once with a hostile value
            query = case.query
            case.query = {**(query or {}), name: hostile}
            hostile_call()
            case.query = query
        for name in generated:  # each path parameter once with hostile text, the others seeded
            case.path_parameters = {**seeded_parameters, name: hostile_path}
            hostile_call()
        case.path_parameters = seeded_parameters
        if isinstance(case.body, dict):  # each top-level string field once with hostile text
            for key in [k for k, v in case.body.items() if isinstance(v, str)]:
                # Sent by hand: schemathesis writes JSON without escapes, and a lone surrogate
                # cannot be UTF-8; json.dumps writes it as the escape a client would send.
                resp = requests.request(
                    case.method,
                    seeded.reg.url + case.formatted_path,
                    params=case.query,
                    data=json.dumps({**case.body, key: hostile_body}),
                    headers={
                        "Authorization": f"Bearer {seeded.tokens['admin']}",
                        "Content-Type": "application/json",
                    },
                    timeout=30,
                )
                assert resp.status_code < 500, (key, hostile_body[:20], resp.text[:300])

    check()
