"""`skyreg deploy` from a directory with a Dockerfile, end to end: a real server, a real
`skyreg builder` (buildah, RUN steps under runc), a real `skyreg agent` running the result in
bubblewrap, the command in this process.

Org `acme` owns apps `web` (deployed), `base` (the private base image) and `cachetest`; org
`other` owns `copycat`. The builder serves every org (admin token); the agent runs machines.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from skyreg.client.push import push_image
from tests.support.agents import RunningAgent, machine_top
from tests.support.builders import RunningBuilder, builder_registered, require_buildah
from tests.support.cli import skyreg_as
from tests.support.images import build_image, write_oci_layout
from tests.support.inprocess import InProcessRegistry
from tests.support.platform import Tenancy
from tests.support.waiting import free_port, http_get, wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bwrap is not installed"),
]


@dataclass
class Platform:
    reg: InProcessRegistry
    admin: str
    acme: str  # an org token of acme
    other: str  # an org token of other
    builder: RunningBuilder
    agent: RunningAgent
    work: Path

    def project(self, name: str, dockerfile: str, files: dict[str, str]) -> Path:
        root = self.work / name
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        (root / "Dockerfile").write_text(dockerfile.replace("BASE", f"{self.reg.host}/base:v1"))
        for rel, text in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(text)
        return root

    def skyreg(self, token: str, *args: str) -> subprocess.CompletedProcess[str]:
        home = self.work / "home"
        home.mkdir(exist_ok=True)
        return skyreg_as(home, self.reg.url, token, *args)

    def api(self, path: str, token: str | None = None, **kw: Any) -> Any:
        r = requests.get(f"{self.reg.url}/api/v1{path}", auth=("x", token or self.admin), **kw)
        assert r.status_code == 200, (path, r.status_code, r.text)
        return r.json()

    def builds(self, app: str) -> list[dict[str, Any]]:
        return self.builds_of(self.admin, app)

    def builds_of(self, token: str, app: str) -> list[dict[str, Any]]:
        return list(self.api(f"/apps/{app}/builds", token)["builds"])

    def log(self, build_id: str) -> str:
        lines = self.api(f"/builds/{build_id}/logs", params={"limit": 1000})["lines"]
        return "\n".join(line["line"] for line in lines)

    def diagnostics(self) -> str:
        return f"builder log:\n{self.builder.log()}\nagent log:\n{self.agent.log()}"

    def blob(self, app: str, digest: str) -> bytes:
        r = requests.get(f"{self.reg.url}/v2/{app}/blobs/{digest}", auth=("x", self.admin))
        assert r.status_code == 200, r.text
        return r.content

    def manifest(self, app: str, ref: str) -> dict[str, Any]:
        r = requests.get(
            f"{self.reg.url}/v2/{app}/manifests/{ref}",
            auth=("x", self.admin),
            headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
        )
        assert r.status_code == 200, r.text
        return dict(r.json())


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    require_buildah()
    reg = InProcessRegistry(
        data_dir=tmp_path_factory.mktemp("builds") / "data", options={"access_log": True}
    )
    with contextlib.ExitStack() as stack:
        top = machine_top(stack, "skyreg-build-")
        stack.callback(reg.stop)
        reg.start()
        t = Tenancy(reg.data_dir)
        t.org("acme")
        t.org("other")
        for app, org in (("web", "acme"), ("base", "acme"), ("cachetest", "acme")):
            t.app(app, org)
        t.app("copycat", "other")
        admin = t.admin_secret()
        work = tmp_path_factory.mktemp("projects")
        layout = write_oci_layout(work / "base-layout", [("v1", build_image("base"))])
        push_image(layout, f"{reg.host}/base:v1", admin)
        builder = RunningBuilder(reg.url, admin, top / "builder", top / "builder.log")
        stack.callback(builder.stop)
        builder.start()
        agent = RunningAgent(reg.url, admin, top / "agent", top / "agent.log")
        stack.callback(agent.stop)
        agent.start()
        acme, _ = t.token("org", org="acme")
        other, _ = t.token("org", org="other")
        p = Platform(reg, admin, acme, other, builder, agent, work)
        wait_for(
            lambda: builder_registered(reg.url, acme, "web"), "the builder registered", timeout=60
        )
        yield p


SERVE = 'CMD ["/bin/sh", "-c", "exec /bin/busybox httpd -f -p 127.0.0.1:PORT -h /www"]\n'


def test_dockerfile_from_the_registry_builds_pushes_deploys_and_answers(
    platform: Platform,
) -> None:
    p = platform
    port = free_port()
    root = p.project(
        "site",
        "FROM BASE\nCOPY www /www\nRUN echo built-by-run > /www/run.txt\n"
        + SERVE.replace("PORT", str(port)),
        {"www/index.html": "<h1>built from a Dockerfile</h1>\n"},
    )
    proc = p.skyreg(p.acme, "deploy", str(root), "--app", "web")
    assert proc.returncode == 0, proc.stdout + proc.stderr + p.diagnostics()
    assert "STEP 3/4: RUN echo built-by-run" in proc.stderr
    assert http_get(port) == b"<h1>built from a Dockerfile</h1>\n"
    assert http_get(port, "/run.txt") == b"built-by-run\n"
    releases = p.skyreg(p.acme, "releases", "--app", "web", "--image")
    assert re.search(r"web:deployment-\d{8}-\d{6}", releases.stdout), releases.stdout
    [build] = p.builds("web")[:1]
    assert build["status"] == "succeeded" and build["image_label"].startswith("deployment-")
    assert [s["step"] for s in build["steps"]] == [1, 2, 3, 4]
    assert build["context_digest"].startswith("sha256:") and build["finished_at"]


def _uploads_finished(log: str) -> list[str]:
    """Digests of blob uploads the registry finished (PUT ...?digest=), in order."""
    return re.findall(
        r'"PUT /v2/[^ ]*/blobs/uploads/[^ ]*digest=(sha256(?::|%3A)[0-9a-f]{64})', log
    )


def test_a_changed_app_file_reruns_no_earlier_step_and_uploads_only_its_layer(
    platform: Platform,
) -> None:
    p = platform
    dockerfile = (
        "FROM BASE\nRUN echo slow-dependency-ran && echo deps > /deps.txt\nCOPY app.txt /app.txt\n"
        'CMD ["/bin/cat", "/app.txt"]\n'
    )
    root = p.project("cached", dockerfile, {"app.txt": "version one\n"})
    first = p.skyreg(p.acme, "deploy", str(root), "--app", "cachetest", "--build-only", "--push")
    assert first.returncode == 0, first.stderr + p.diagnostics()
    before = len(p.reg.log())
    (root / "app.txt").write_text("version two\n")
    second = p.skyreg(p.acme, "deploy", str(root), "--app", "cachetest", "--build-only", "--push")
    assert second.returncode == 0, second.stderr + p.diagnostics()
    ref = second.stdout.strip().splitlines()[-1]
    assert ref.startswith("cachetest@sha256:"), second.stdout
    [latest, previous] = p.builds("cachetest")[:2]
    steps = {s["step"]: s for s in latest["steps"]}
    assert steps[2]["cached"] is True, latest["steps"]  # the RUN before the change
    assert steps[3]["cached"] is False
    # The step ran (printed) in the first build; the second says it used its cache.
    assert "slow-dependency-ran" in p.log(previous["id"]).splitlines()
    log = p.log(latest["id"]).splitlines()
    assert "slow-dependency-ran" not in log
    run_step = log[log.index(next(x for x in log if x.startswith("STEP 2/4: RUN"))) + 1]
    assert run_step.startswith("--> Using cache"), log
    # The registry received the new context, the changed layer and the new config: nothing more.
    manifest = p.manifest("cachetest", latest["image_digest"])
    old = p.manifest("cachetest", previous["image_digest"])
    new_layers = [d["digest"] for d in manifest["layers"] if d not in old["layers"]]
    assert len(new_layers) == 1
    uploaded = {d.replace("%3A", ":") for d in _uploads_finished(p.reg.log()[before:])}
    assert uploaded == {latest["context_digest"], manifest["config"]["digest"], new_layers[0]}
    # Unchanged: every step from the cache, the same image, nothing uploaded at all.
    before = len(p.reg.log())
    third = p.skyreg(p.acme, "deploy", str(root), "--app", "cachetest", "--build-only", "--push")
    assert third.returncode == 0, third.stderr + p.diagnostics()
    [again] = p.builds("cachetest")[:1]
    assert [s["cached"] for s in again["steps"][1:]] == [True, True, True], again["steps"]
    assert again["image_digest"] == latest["image_digest"]
    assert _uploads_finished(p.reg.log()[before:]) == []


def _layer_files(p: Platform, app: str, digest: str) -> dict[str, bytes]:
    """Every regular file of every layer of the image, by path (later layers win)."""
    files: dict[str, bytes] = {}
    for layer in p.manifest(app, digest)["layers"]:
        data = p.blob(app, layer["digest"])
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for m in tar.getmembers():
                if m.isfile():
                    f = tar.extractfile(m)
                    files[m.name] = f.read() if f else b""
    return files


def test_a_build_secret_is_read_in_run_and_found_in_no_layer_log_or_database(
    platform: Platform,
) -> None:
    p = platform
    secret = "sk-live-4c1d2e9f8a7b6c5d"
    root = p.project(
        "secretive",
        "FROM BASE\n"
        "RUN --mount=type=secret,id=npm_token wc -c /run/secrets/npm_token "
        "&& cat /run/secrets/npm_token && echo && sha256sum /run/secrets/npm_token > /sum.txt\n",
        {},
    )
    secret_file = p.work / "npm_token"
    secret_file.write_text(secret)
    proc = p.skyreg(
        p.acme, "deploy", str(root), "--app", "web", "--build-only", "--push",
        "--build-secret", f"npm_token={secret_file}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr + p.diagnostics()
    [build] = p.builds("web")[:1]
    assert build["secrets"] == ["npm_token"]
    log = p.log(build["id"])
    assert f"{len(secret)} /run/secrets/npm_token" in log  # the RUN step read it
    assert secret not in log and "[secret]" in log
    assert secret not in proc.stderr + proc.stdout
    files = _layer_files(p, "web", build["image_digest"])
    assert b"/run/secrets/npm_token" in files["sum.txt"]
    assert not any(secret.encode() in data for data in files.values())
    assert not any("npm_token" in name for name in files)
    database = (p.reg.data_dir / "skyreg.db").read_bytes()
    for suffix in ("-wal",):
        wal = p.reg.data_dir / f"skyreg.db{suffix}"
        if wal.exists():
            database += wal.read_bytes()
    assert secret.encode() not in database
    # Nothing of the build is left on the builder: context, secrets, credentials.
    assert list((p.builder.data_dir / "work").iterdir()) == []


def test_dockerignore_keeps_files_out_of_the_context(platform: Platform) -> None:
    p = platform
    root = p.project(
        "ignoring",
        "FROM BASE\nCOPY . /src\n",
        {
            "main.txt": "kept\n",
            "debug.log": "ignored\n",
            "node_modules/pkg/index.js": "ignored\n",
            "logs/keep.log": "kept by an exception\n",
            ".dockerignore": "# comment\n*.log\nnode_modules\n!logs/keep.log\n",
        },
    )
    proc = p.skyreg(p.acme, "deploy", str(root), "--app", "web", "--build-only", "--push")
    assert proc.returncode == 0, proc.stderr + p.diagnostics()
    [build] = p.builds("web")[:1]
    files = _layer_files(p, "web", build["image_digest"])
    names = {n for n in files if n.startswith("src/")}
    assert {"src/main.txt", "src/logs/keep.log", "src/Dockerfile"} <= names
    assert not {n for n in names if n.endswith("debug.log") or "node_modules" in n}


def test_a_failing_run_ends_the_deploy_with_its_output_and_exit_code(platform: Platform) -> None:
    p = platform
    root = p.project(
        "broken",
        'FROM BASE\nRUN echo about-to-fail-marker && exit 7\nCMD ["true"]\n',
        {},
    )
    proc = p.skyreg(p.acme, "deploy", str(root), "--app", "web")
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "about-to-fail-marker" in out
    assert "exited with code 7" in out, out
    [build] = p.builds("web")[:1]
    assert build["status"] == "failed" and "code 7" in (build["error"] or "")


def test_orgs_share_no_build_cache_and_another_orgs_private_base_is_refused(
    platform: Platform,
) -> None:
    p = platform
    dockerfile = "FROM BASE\nRUN echo same-step-in-two-orgs > /same.txt\n"
    root = p.project("shared", dockerfile, {})
    acme = p.skyreg(p.acme, "deploy", str(root), "--app", "web", "--build-only", "--push")
    assert acme.returncode == 0, acme.stderr + p.diagnostics()
    # The same Dockerfile in org other: its FROM names acme's private app, refused.
    refused = p.skyreg(p.other, "deploy", str(root), "--app", "copycat", "--build-only", "--push")
    assert refused.returncode != 0
    out = refused.stdout + refused.stderr
    assert "base:v1" in out and re.search(r"unauthorized|denied|not found|unknown", out, re.I), out
    # A public copy of the base in org other's own app builds, and runs its step afresh.
    push_image(
        write_oci_layout(p.work / "own-base", [("v1", build_image("base"))]),
        f"{p.reg.host}/copycat:base",
        p.admin,
    )
    own = p.project("own", "FROM " + f"{p.reg.host}/copycat:base\n" + dockerfile[10:], {})
    built = p.skyreg(p.other, "deploy", str(own), "--app", "copycat", "--build-only", "--push")
    assert built.returncode == 0, built.stderr + p.diagnostics()
    [build] = p.builds_of(p.other, "copycat")[:1]
    assert [s["cached"] for s in build["steps"]] == [False, False]
    orgs = sorted(d.name for d in (p.builder.data_dir / "orgs").iterdir())
    assert orgs == ["acme", "other"]
    assert json.dumps(build).count("same-step-in-two-orgs") == 1


def test_build_args_and_target_choose_what_is_built(platform: Platform) -> None:
    p = platform
    root = p.project(
        "staged",
        "FROM BASE AS builder\nARG GREETING=unset\nRUN echo $GREETING > /greeting.txt\n"
        "FROM BASE AS final\nCOPY --from=builder /greeting.txt /greeting.txt\n"
        "FROM BASE AS ignored\nRUN echo never-built && exit 9\n",
        {},
    )
    proc = p.skyreg(
        p.acme, "deploy", str(root), "--app", "web", "--build-only", "--push",
        "--build-arg", "GREETING=hello-from-an-arg", "--target", "final",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr + p.diagnostics()
    [build] = p.builds("web")[:1]
    assert build["target"] == "final"
    assert build["build_args"] == {"GREETING": "hello-from-an-arg"}
    files = _layer_files(p, "web", build["image_digest"])
    assert files["greeting.txt"] == b"hello-from-an-arg\n"
    assert "never-built" not in p.log(build["id"]).replace("RUN echo never-built", "")


def test_ctrl_c_cancels_the_build_and_the_builder_stops_it(platform: Platform) -> None:
    p = platform
    root = p.project("endless", "FROM BASE\nRUN echo sleeping-now && sleep 600\n", {})
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SKYREG_")},
        "SKYREG_SERVER": p.reg.url,
        "SKYREG_TOKEN": p.acme,
        "HOME": str(p.work / "home"),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "skyreg", "deploy", str(root), "--app", "web", "--build-only"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        build = wait_for(
            lambda: next(
                (b for b in p.builds("web")[:1] if b["status"] == "running" and b["log_lines"]),
                None,
            ),
            "the endless build running",
        )
        wait_for(lambda: "sleeping-now" in p.log(build["id"]).splitlines(), "the RUN step started")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "cancelled" in err
    ended = wait_for(
        lambda: b if (b := p.api(f"/builds/{build['id']}"))["status"] != "running" else None,
        "the builder stopping the build",
        timeout=30,
    )
    assert ended["status"] == "cancelled", ended
    wait_for(lambda: not list((p.builder.data_dir / "work").iterdir()), "the work dir removed")
    # The builder is free again: the next build runs.
    again = p.skyreg(p.acme, "deploy", str(p.project("after", "FROM BASE\n", {})), "--app",
                     "web", "--build-only", "--push")  # fmt: skip
    assert again.returncode == 0, again.stderr + p.diagnostics()


def test_build_local_builds_here_and_pushes_with_skyregs_client(
    platform: Platform, tmp_path: Path
) -> None:
    p = platform
    storage = tmp_path / "storage"
    conf = tmp_path / "storage.conf"
    conf.write_text(
        f'[storage]\ndriver = "vfs"\nrunroot = "{storage}/run"\ngraphroot = "{storage}/root"\n'
    )
    root = p.project("local", "FROM BASE\nRUN echo built-here > /here.txt\n", {})
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SKYREG_")},
        "SKYREG_SERVER": p.reg.url,
        "SKYREG_TOKEN": p.acme,
        "HOME": str(tmp_path),
        "CONTAINERS_STORAGE_CONF": str(conf),
        "BUILDAH_ISOLATION": "chroot",  # the user's own machine; runc is the builder's
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",  # buildah first: no podman or docker choice
    }
    registries = tmp_path / "registries.conf"
    registries.write_text(f'[[registry]]\nlocation = "{p.reg.host}"\ninsecure = true\n')
    env["CONTAINERS_REGISTRIES_CONF"] = str(registries)
    auth = tmp_path / "auth.json"
    auth.write_text(
        json.dumps(
            {"auths": {p.reg.host: {"auth": base64.b64encode(f"x:{p.acme}".encode()).decode()}}}
        )
    )
    env["REGISTRY_AUTH_FILE"] = str(auth)
    done = subprocess.run(
        [sys.executable, "-m", "skyreg", "deploy", str(root), "--app", "web", "--build-local",
         "--build-only", "--push", "--image-label", "local-build"],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Building locally with buildah" in done.stderr
    ref = done.stdout.strip().splitlines()[-1]
    assert ref.startswith("web@sha256:"), done.stdout
    files = _layer_files(p, "web", ref.split("@", 1)[1])
    assert files["here.txt"] == b"built-here\n"
    assert p.manifest("web", "local-build")  # the label is the tag


def test_a_build_past_its_timeout_fails_and_the_builder_stops_it(platform: Platform) -> None:
    p = platform
    root = p.project("slow", "FROM BASE\nRUN echo slow-step-started && sleep 600\n", {})
    proc = p.skyreg(
        p.acme, "deploy", str(root), "--app", "web", "--build-only", "--build-timeout", "10s"
    )
    assert proc.returncode != 0
    assert "took longer than its timeout" in proc.stderr, proc.stderr
    [build] = p.builds("web")[:1]
    assert build["status"] == "failed" and "slow-step-started" in p.log(build["id"]).splitlines()
    wait_for(lambda: not list((p.builder.data_dir / "work").iterdir()), "the builder stopping it")
