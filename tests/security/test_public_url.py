"""The server names itself after its configured public URL, never the caller's Host header, and
its metrics are not open to anyone who can reach it.

SECURITY.md: "the caller cannot choose the name the server gives itself"; "/metrics needs an
admin token or its own address".
"""

from __future__ import annotations

import json
from pathlib import Path

import requests

from tests.support.inprocess import InProcessRegistry
from tests.support.oci import push_image
from tests.support.platform import Tenancy
from tests.support.waiting import free_ports

EVIL = "attacker.example:8443"


def _realm(resp: requests.Response) -> str:
    header = resp.headers["WWW-Authenticate"]
    return header.split('realm="', 1)[1].split('"', 1)[0]


def test_token_realm_and_image_references_ignore_the_host_header(tmp_path: Path) -> None:
    reg = InProcessRegistry(data_dir=tmp_path / "data")
    reg.start()
    try:
        t = Tenancy(reg.data_dir)
        t.org("acme")
        t.app("web", "acme")
        admin = t.admin_secret()
        challenged = requests.get(f"{reg.url}/v2/", headers={"Host": EVIL})
        assert challenged.status_code == 401
        assert _realm(challenged) == f"{reg.url}/auth/token"
        forwarded = requests.get(
            f"{reg.url}/v2/", headers={"Host": EVIL, "X-Forwarded-Proto": "https"}
        )
        assert _realm(forwarded) == f"{reg.url}/auth/token"

        session = requests.Session()
        session.auth = ("x", admin)
        push_image(reg.url, "web", "v1", session=session)
        release = session.post(
            f"{reg.url}/api/v1/apps/web/releases",
            json={"image": "web:v1", "image_label": "build-7"},
            headers={"Host": EVIL},
        )
        assert release.status_code == 201, release.text
        assert release.json()["image_ref"] == f"{reg.host}/web:build-7"
        assert EVIL not in release.text
    finally:
        reg.stop()


def test_a_configured_public_url_is_the_name_in_challenges(tmp_path: Path) -> None:
    reg = InProcessRegistry(
        data_dir=tmp_path / "data", options={"public_url": "https://registry.example.com"}
    )
    reg.start()
    try:
        challenged = requests.get(f"{reg.url}/v2/", headers={"Host": EVIL})
        assert _realm(challenged) == "https://registry.example.com/auth/token"
    finally:
        reg.stop()


def test_metrics_need_an_admin_token_or_their_own_address(tmp_path: Path) -> None:
    port, metrics_port = free_ports(2)
    regions = tmp_path / "regions.json"
    regions.write_text(
        json.dumps({"regions": {"iad": {"url": f"http://127.0.0.1:{port}", "rtt_ms": {}}}})
    )
    reg = InProcessRegistry(
        data_dir=tmp_path / "data",
        options={
            "region": "iad",
            "regions_file": regions,
            "metrics_address": f"127.0.0.1:{metrics_port}",
        },
    )
    reg.port = port
    reg.start()
    try:
        t = Tenancy(reg.data_dir)
        t.org("acme")
        org_token, _ = t.token("org", org="acme")
        anonymous = requests.get(f"{reg.url}/metrics")
        assert anonymous.status_code == 401
        assert "skyreg_" not in anonymous.text
        assert requests.get(f"{reg.url}/metrics", auth=("x", org_token)).status_code == 403
        admin = requests.get(f"{reg.url}/metrics", auth=("x", t.admin_secret()))
        assert admin.status_code == 200
        assert "skyreg_replication_jobs" in admin.text
        own = requests.get(f"http://127.0.0.1:{metrics_port}/metrics")
        assert own.status_code == 200
        assert "skyreg_replication_jobs" in own.text
        # The metrics address serves metrics only.
        assert requests.get(f"http://127.0.0.1:{metrics_port}/v2/").status_code == 404
    finally:
        reg.stop()
