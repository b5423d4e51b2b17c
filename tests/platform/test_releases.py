"""Releases: a deploy pins the image digest, tags it into the app, and is listed (REST, GraphQL)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests

from tests.support.inprocess import InProcessRegistry
from tests.support.oci import Image, push_image
from tests.support.platform import Tenancy
from tests.support.servers import ServedRegistry

RELEASES_QUERY = """
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


@dataclass
class Deploys:
    reg: ServedRegistry
    admin: str
    deploy2: str  # deploy token of app2
    deploy1: str  # deploy token of app1
    foreign: str  # org token of another org
    build: Image  # app1:build-1

    def deploy(self, app: str, token: str, **body: Any) -> requests.Response:
        return requests.post(
            f"{self.reg.url}/api/v1/apps/{app}/releases", json=body, auth=("x", token)
        )

    def graphql(self, token: str | None, app: str, limit: int = 10) -> requests.Response:
        return requests.post(
            f"{self.reg.url}/graphql",
            json={"query": RELEASES_QUERY, "variables": {"appName": app, "limit": limit}},
            headers={"Authorization": f"Bearer {token}"} if token else {},
        )


@pytest.fixture(scope="module")
def deploys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deploys]:
    reg = InProcessRegistry(data_dir=tmp_path_factory.mktemp("releases") / "data")
    reg.start()
    try:
        t = Tenancy(reg.data_dir)
        t.org("acme")
        t.org("other")
        for app, org in (("app1", "acme"), ("app2", "acme"), ("foreign", "other")):
            t.app(app, org)
        admin = t.admin_secret()
        session = requests.Session()
        session.auth = ("x", admin)
        build = push_image(reg.url, "app1", "build-1", session=session)
        push_image(reg.url, "foreign", "v1", session=session)
        yield Deploys(
            reg=reg,
            admin=admin,
            deploy2=t.token("deploy", org="acme", app="app2")[0],
            deploy1=t.token("deploy", org="acme", app="app1")[0],
            foreign=t.token("org", org="other")[0],
            build=build,
        )
    finally:
        reg.stop()


def test_deploy_from_another_app_pins_digest_and_tags_it_into_the_app(deploys: Deploys) -> None:
    host = deploys.reg.host
    r = deploys.deploy("app2", deploys.deploy2, image=f"{host}/app1:build-1")
    assert r.status_code == 201, r.text
    release = r.json()
    assert release["image_digest"] == deploys.build.digest
    assert release["status"] == "running"  # its machine is created
    assert release["reason"] == "deploy"
    m = re.fullmatch(rf"{re.escape(host)}/app2:(deployment-\d{{8}}-\d{{6}})", release["image_ref"])
    assert m, release["image_ref"]
    tag = m.group(1)
    # The app's own repository now holds what it runs: manifest and every blob.
    auth = ("x", deploys.deploy2)
    got = requests.get(f"{deploys.reg.url}/v2/app2/manifests/{tag}", auth=auth)
    assert got.content == deploys.build.manifest
    for layer in deploys.build.layers:
        blob = requests.get(f"{deploys.reg.url}/v2/app2/blobs/sha256:{_sha(layer)}", auth=auth)
        assert blob.content == layer
    # ... and it can be redeployed by that tag later.
    again = deploys.deploy("app2", deploys.deploy2, image=f"app2:{tag}")
    assert again.status_code == 201
    assert again.json()["image_ref"] == f"{host}/app2:{tag}"
    assert again.json()["version"] == release["version"] + 1


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_image_label_names_the_tag(deploys: Deploys) -> None:
    r = deploys.deploy(
        "app2", deploys.deploy2, image=f"app1@{deploys.build.digest}", image_label="v42"
    )
    assert r.status_code == 201, r.text
    assert r.json()["image_ref"] == f"{deploys.reg.host}/app2:v42"
    got = requests.get(f"{deploys.reg.url}/v2/app2/manifests/v42", auth=("x", deploys.deploy2))
    assert got.headers["Docker-Content-Digest"] == deploys.build.digest


@pytest.mark.parametrize(
    ("app", "token", "image", "status"),
    [
        ("app2", "deploy1", "app1:build-1", 403),  # app1's deploy token may not deploy app2
        ("app2", "deploy2", "foreign:v1", 404),  # another org's image: as if missing
        ("app2", "deploy2", "app1:nope", 404),
        ("foreign", "deploy2", "app1:build-1", 404),  # another org's app: as if missing
        ("app2", "deploy2", "app1:bad tag!", 400),
    ],
)
def test_deploy_refusals(deploys: Deploys, app: str, token: str, image: str, status: int) -> None:
    r = deploys.deploy(app, getattr(deploys, token), image=image)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"]


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"image": "app1:build-1", "strategy": "canary"},
        {"image": "app1", "count": 0},
        {"image": "app1", "regions": ["NOT A REGION"]},
        {"image": "app1", "bogus": 1},
    ],
)
def test_deploy_validates_its_body(deploys: Deploys, body: dict[str, object]) -> None:
    r = deploys.deploy("app2", deploys.deploy2, **body)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "bad_request"


def test_releases_list_newest_first_and_graphql_answers_the_fly_query(deploys: Deploys) -> None:
    for _ in range(2):
        r = deploys.deploy(
            "app1", deploys.deploy1, image="app1:build-1", regions=["local"], strategy="immediate"
        )
        assert r.status_code == 201
    listed = requests.get(
        f"{deploys.reg.url}/api/v1/apps/app1/releases",
        params={"limit": 2},
        auth=("x", deploys.deploy2),  # any token of the org may read
    ).json()["releases"]
    assert [x["version"] for x in listed] == sorted((x["version"] for x in listed), reverse=True)
    assert len(listed) == 2
    assert listed[0]["image_ref"] == f"{deploys.reg.host}/app1:build-1"
    assert listed[0]["regions"] == ["local"]

    r = deploys.graphql(deploys.deploy1, "app1", limit=2)
    assert r.status_code == 200, r.text
    nodes = r.json()["data"]["app"]["releases"]["nodes"]
    assert [n["version"] for n in nodes] == [x["version"] for x in listed]
    first = nodes[0]
    assert first["imageRef"] == listed[0]["image_ref"]
    assert first["status"] == "running" and first["reason"] == "deploy"
    assert first["stable"] is False
    assert first["user"]["name"] and first["user"]["id"] == listed[0]["user"]["id"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d.*Z", first["createdAt"])


def test_graphql_hides_other_orgs_apps_and_needs_a_token(deploys: Deploys) -> None:
    foreign = deploys.graphql(deploys.foreign, "app1")
    missing = deploys.graphql(deploys.foreign, "no-such-app")
    assert foreign.json()["data"] == {"app": None} == missing.json()["data"]
    assert foreign.json()["errors"][0]["message"] == "Could not find App 'app1'"
    assert deploys.graphql(None, "app1").status_code == 401
    bad = requests.post(
        f"{deploys.reg.url}/graphql", json={"query": "{ nope }"}, auth=("x", deploys.admin)
    )
    assert bad.json()["errors"]


def test_cli_deploy_and_releases_with_image(deploys: Deploys, tmp_path: object) -> None:
    import os
    import subprocess
    import sys

    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "XDG_CONFIG_HOME": str(tmp_path),
        "SKYREG_SERVER": deploys.reg.url,
        "SKYREG_TOKEN": deploys.deploy2,
        "COLUMNS": "250",
    }

    def skyreg(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "skyreg", *args],
            env=env,
            text=True,
            capture_output=True,
            timeout=60,
            check=False,
        )

    done = skyreg(
        "deploy",
        "--app",
        "app2",
        "--image",
        "app1:build-1",
        "--image-label",
        "cli",
        "--region",
        "local",
        "--description",
        "from the cli",
        "--detach",  # no agent runs here: the release is recorded, nothing starts
    )
    assert done.returncode == 0, done.stderr
    version = re.search(r"Release v(\d+) of app2", done.stdout)
    assert version, done.stdout
    assert deploys.build.digest in done.stdout
    listed = skyreg("releases", "--app", "app2", "--image")
    assert listed.returncode == 0, listed.stderr
    first_row = next(line for line in listed.stdout.splitlines() if line.startswith("v"))
    assert first_row.split()[0] == f"v{version.group(1)}"
    assert "from the cli" in first_row
    assert f"{deploys.reg.host}/app2:cli" in first_row
    refused = skyreg("deploy", "--app", "app2", "--image", "foreign:v1")
    assert refused.returncode != 0
    assert "not found" in refused.stderr.lower() or "no image" in refused.stderr.lower()


def test_cli_deploy_of_a_local_archive_pushes_it_into_the_app(
    deploys: Deploys, tmp_path: object
) -> None:
    """The Nix flow without skopeo: `skyreg deploy --image ./result`."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.support.images import build_image

    work = Path(str(tmp_path))
    archive = build_image("deploy-local").write_docker_archive(work / "image.tar", ["x:1"])
    (work / "result").symlink_to(archive)
    env = {
        **os.environ,
        "HOME": str(work),
        "XDG_CONFIG_HOME": str(work),
        "XDG_CACHE_HOME": str(work / "cache"),
        "SKYREG_SERVER": deploys.reg.url,
        "SKYREG_TOKEN": deploys.deploy2,
    }
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "skyreg",
            "deploy",
            "--app",
            "app2",
            "--image",
            "./result",
            "--json",
            "--detach",
        ],
        cwd=work,
        env=env,
        text=True,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    release = __import__("json").loads(done.stdout)
    tag = release["image_ref"].rsplit(":", 1)[1]
    assert re.fullmatch(r"deployment-\d{8}-\d{6}", tag)
    got = requests.get(f"{deploys.reg.url}/v2/app2/manifests/{tag}", auth=("x", deploys.deploy2))
    assert got.status_code == 200
    assert got.headers["Docker-Content-Digest"] == release["image_digest"]
