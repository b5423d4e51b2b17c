"""A hostile tenant's Dockerfile against a shared builder: real `skyreg builder` (buildah, RUN steps
under runc, `--network none`), a real server, `skyreg deploy` as the client.

Org `acme` is the victim (apps `web`, `api`, private `base`, public `pub`); org `mallory` is the
attacker (apps `evil`, `evil2`). One builder (admin token) serves both orgs, one build at a time,
so whatever a build leaves on the builder host is what the next tenant's build could reach. Each
test names the promise it checks in its docstring and asserts the attack fails.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import http.server
import io
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from skyreg.client.push import push_image
from skyreg.meta.builds import MAX_LOG_LINES, TRUNCATED
from tests.support.builders import RunningBuilder, builder_registered, require_buildah
from tests.support.cli import skyreg_as
from tests.support.images import build_image, write_oci_layout
from tests.support.inprocess import InProcessRegistry
from tests.support.platform import Tenancy
from tests.support.waiting import free_port, wait_for

pytestmark = [pytest.mark.slow]

BUILD_WAIT = 120.0  # seconds a background build may take to reach a state


@dataclass
class Platform:
    reg: InProcessRegistry
    admin: str
    acme: str  # an org token of acme (the victim)
    mallory: str  # an org token of mallory (the attacker)
    builder: RunningBuilder
    work: Path
    host_marker: str  # the content of a file on the builder host, outside every build

    @property
    def host_marker_path(self) -> Path:
        return self.work / "host-marker.txt"

    def project(self, name: str, dockerfile: str, files: dict[str, str] | None = None) -> Path:
        root = self.work / "projects" / name
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        (root / "Dockerfile").write_text(dockerfile.replace("REG/", f"{self.reg.host}/"))
        for rel, text in (files or {}).items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(text)
        return root

    def deploy(self, token: str, root: Path, app: str, *args: str) -> Build:
        """`skyreg deploy ROOT --app APP --build-only` (remote builds always push)."""
        home = self.work / "home"
        home.mkdir(exist_ok=True)
        proc = skyreg_as(home, self.reg.url, token, "deploy", str(root), "--app", app,
                         "--build-only", *args)  # fmt: skip
        build = self.builds(app)[0]
        return Build(proc, build, self.log(build["id"]))

    def api(self, path: str, token: str | None = None, **kw: Any) -> Any:
        r = requests.get(f"{self.reg.url}/api/v1{path}", auth=("x", token or self.admin), **kw)
        assert r.status_code == 200, (path, r.status_code, r.text)
        return r.json()

    def builds(self, app: str) -> list[dict[str, Any]]:
        return list(self.api(f"/apps/{app}/builds")["builds"])

    def log(self, build_id: str) -> str:
        lines = self.api(f"/builds/{build_id}/logs", params={"limit": 1000})["lines"]
        text = [line["line"] for line in lines]
        after = lines[-1]["seq"] if lines else 0
        while len(lines) == 1000:
            page = self.api(f"/builds/{build_id}/logs", params={"limit": 1000, "after": after})
            lines = page["lines"]
            text += [line["line"] for line in lines]
            after = lines[-1]["seq"] if lines else after
        return "\n".join(text)

    def diagnostics(self) -> str:
        return f"builder log:\n{self.builder.log()}"

    def registry_get(self, app: str, what: str, token: str | None = None) -> requests.Response:
        return requests.get(
            f"{self.reg.url}/v2/{app}/{what}",
            auth=("x", token or self.admin),
            headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
        )

    def image_files(self, app: str, digest: str) -> dict[str, bytes]:
        """Every regular file of every layer of the image, by path (later layers win)."""
        manifest = self.registry_get(app, f"manifests/{digest}").json()
        files: dict[str, bytes] = {}
        for layer in manifest["layers"]:
            data = self.registry_get(app, f"blobs/{layer['digest']}").content
            if data[:2] == b"\x1f\x8b":
                data = gzip.decompress(data)
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                for m in tar.getmembers():
                    if m.isfile():
                        f = tar.extractfile(m)
                        files[m.name] = f.read() if f else b""
        return files

    def image_config(self, app: str, digest: str) -> bytes:
        manifest = self.registry_get(app, f"manifests/{digest}").json()
        return self.registry_get(app, f"blobs/{manifest['config']['digest']}").content


@dataclass
class Build:
    proc: subprocess.CompletedProcess[str]
    build: dict[str, Any]
    log: str

    @property
    def output(self) -> str:
        return self.proc.stdout + self.proc.stderr + self.log + (self.build.get("error") or "")


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    require_buildah()
    reg = InProcessRegistry(data_dir=tmp_path_factory.mktemp("hostile") / "data")
    with contextlib.ExitStack() as stack:
        stack.callback(reg.stop)
        reg.start()
        t = Tenancy(reg.data_dir)
        t.org("acme")
        t.org("mallory")
        for app in ("web", "api", "base"):
            t.app(app, "acme")
        t.app("pub", "acme", public=True)
        t.app("evil", "mallory")
        t.app("evil2", "mallory")
        admin = t.admin_secret()
        work = tmp_path_factory.mktemp("attacks")
        layout = write_oci_layout(work / "base-layout", [("v1", build_image("base"))])
        for ref in ("base:v1", "pub:v1", "evil:base"):
            push_image(layout, f"{reg.host}/{ref}", admin)
        marker = "HOSTMARK-" + secrets.token_hex(12)
        (work / "host-marker.txt").write_text(marker + "\n")
        top = work / "builder"
        top.mkdir()
        builder = RunningBuilder(reg.url, admin, top / "data", top / "builder.log")
        stack.callback(builder.stop)
        builder.start()
        acme, _ = t.token("org", org="acme")
        mallory, _ = t.token("org", org="mallory")
        p = Platform(reg, admin, acme, mallory, builder, work, marker)
        wait_for(
            lambda: builder_registered(reg.url, acme, "web"), "the builder registered", timeout=60
        )
        yield p


def _split(text: str) -> str:
    """`text` as a shell word whose source does not contain `text` (so an echo of the RUN
    instruction in the log is not a hit; only the word's value is)."""
    half = len(text) // 2
    return f'"{text[:half]}""{text[half:]}"'


@pytest.fixture(scope="module")
def acme_marker(platform: Platform) -> str:
    """acme builds `web` with a marker in its context, in a layer and in a build secret."""
    p = platform
    marker = "ACMEMARK-" + secrets.token_hex(12)
    secret = p.work / "acme-secret"
    secret.write_text(marker + "-secret")
    root = p.project(
        "acme-marker",
        "FROM REG/base:v1\nCOPY marker.txt /marker.txt\n"
        "RUN --mount=type=secret,id=tok cp /run/secrets/tok /from-secret.txt\n",
        {"marker.txt": marker + "\n"},
    )
    b = p.deploy(p.acme, root, "web", "--build-secret", f"tok={secret}")
    assert b.proc.returncode == 0, b.output + p.diagnostics()
    return marker


def _storage_ref(p: Platform, org: str) -> str:
    storage = (p.builder.data_dir / "orgs" / org).resolve()
    return f"containers-storage:[vfs@{storage}/root+{storage}/run]localhost/skyreg/web:latest"


# -- 1. a RUN step looks around the builder host ------------------------------------------------


def test_run_step_sees_no_builder_process_file_credential_or_other_tenant(
    platform: Platform, acme_marker: str
) -> None:
    """Promise: a RUN step runs in its own PID and mount namespaces: it sees none of the builder's
    processes (its environment holds the admin token), none of its files (data dir, the build's
    authfile, other orgs' storage) and nothing of another tenant's build."""
    p = platform
    data = p.builder.data_dir.resolve()
    probe = (
        "FROM REG/evil:base\n"
        "RUN echo PIDS=$(ls /proc | grep -c '^[0-9]') ; tr '\\0' '\\n' < /proc/1/environ ; "
        f"for d in {data} {data}/work {data}/orgs/acme /var/lib/containers /var/lib/skyreg-builder "
        f"{p.work}; do test -e $d && echo VIS''IBLE:$d; done ; "
        "cat /proc/*/environ 2>/dev/null | tr '\\0' '\\n' | grep -i skyreg ; "
        "for d in /*; do case $d in /proc|/sys|/dev) ;; *) "
        f"grep -rl -e {_split(acme_marker)} -e {_split(p.host_marker)} -e {_split(p.admin)} "
        "$d 2>/dev/null | sed s/^/FOU''ND:/ ;; esac ; done ; "
        "find / -xdev -name auth.json -o -xdev -name policy.json -o -xdev -name '*skyreg*' "
        "2>/dev/null | grep -v '^/etc/skyreg-' | sed s/^/NAM''ED:/ ; "  # the base's own files
        "echo probing-done\n"
    )
    b = p.deploy(p.mallory, p.project("probe", probe), "evil")
    assert b.proc.returncode == 0, b.output + p.diagnostics()
    log = b.log
    assert "probing-done" in log
    pids = int(re.search(r"^PIDS=(\d+)$", log, re.M).group(1))  # type: ignore[union-attr]
    assert pids <= 5, log  # the step's own shell and its pipeline, not the host's processes
    for leak in (acme_marker, p.host_marker, p.admin, "VISIBLE:", "FOUND:", "NAMED:", "SKYREG_"):
        assert leak not in log, (leak, log)


# -- 2. mounts and base images that name the builder's own files --------------------------------


def test_bind_mount_from_a_stage_with_a_symlink_to_the_host_root_is_refused(
    platform: Platform,
) -> None:
    """Promise: a RUN step never reaches the builder host's file system. buildah 1.28 (Debian 12)
    resolves `--mount=type=bind,from=STAGE,source=LINK` through a symlink in the stage on the
    host (CVE-2024-1753): `LINK -> /` mounts the host's root, read-write. The builder refuses
    `from=` in a RUN mount."""
    p = platform
    attack = (
        "FROM REG/evil:base AS s\nRUN ln -s / /rootlink\n"
        "FROM REG/evil:base\n"
        f"RUN --mount=type=bind,from=s,source=/rootlink,target=/h cat /h{p.host_marker_path} "
        f"; ls /h{p.builder.data_dir.resolve()}/orgs ; echo escape-tried\n"
    )
    b = p.deploy(p.mallory, p.project("bindescape", attack), "evil")
    assert p.host_marker not in b.output
    assert "escape-tried" not in b.log
    assert b.proc.returncode != 0 and b.build["status"] == "failed"
    assert "from=" in (b.build["error"] or ""), b.build["error"]


def test_mount_from_spelled_otherwise_is_refused_too(platform: Platform) -> None:
    """Promise: the `from=` refusal is not bypassed by case, quoting, key order, a continuation
    line or an ONBUILD in the Dockerfile."""
    p = platform
    stage = "FROM REG/evil:base AS s\nRUN ln -s / /rootlink\nFROM REG/evil:base\n"
    target = f"cat /h{p.host_marker_path}; echo escape-tried"
    variants = [
        f"run --MOUNT=FROM=s,type=bind,source=/rootlink,target=/h {target}\n",
        f'RUN --mount=type=bind,"from=s",source=/rootlink,target=/h {target}\n',
        f"RUN \\\n  --mount=type=bind,\\\nfrom=s,source=/rootlink,target=/h \\\n {target}\n",
        f"ONBUILD RUN --mount=type=bind,from=s,source=/rootlink,target=/h {target}\n"
        "FROM REG/evil:base\n",
    ]
    for i, variant in enumerate(variants):
        b = p.deploy(p.mallory, p.project(f"bindvariant{i}", stage + variant), "evil")
        assert p.host_marker not in b.output, variant
        assert b.build["status"] == "failed" and "from=" in (b.build["error"] or ""), (
            variant,
            b.build["error"],
        )


def test_cache_mount_id_climbing_out_of_the_cache_directory_is_refused(
    platform: Platform,
) -> None:
    """Promise: a RUN step never reaches the builder host's file system. buildah 1.28 joins a
    cache mount's id to its cache directory on the host (CVE-2024-9675): enough `..` mounts the
    host's root. The builder refuses `..` in mount options and `/` in a mount id."""
    p = platform
    climb = "/".join([".."] * 24)
    for i, mount in enumerate([f"type=cache,id={climb}", f"type=cache,target=/h,id={climb}/tmp"]):
        target = "" if "target" in mount else ",target=/h"
        attack = (
            f"FROM REG/evil:base\nRUN --mount={mount}{target} "
            f"cat /h{p.host_marker_path} /h{str(p.host_marker_path)[4:]} ; echo escape-tried\n"
        )
        b = p.deploy(p.mallory, p.project(f"cacheescape{i}", attack), "evil")
        assert p.host_marker not in b.output, attack
        assert "escape-tried" not in b.log
        assert b.build["status"] == "failed" and "id=" in (b.build["error"] or ""), b.build


def _push_onbuild_image(p: Platform) -> None:
    """mallory's own docker-format image `evil:onbuild`: a symlink to `/` and an ONBUILD trigger
    that bind-mounts it from the image itself (built with buildah on this machine, as the
    attacker would on theirs, and pushed to mallory's app)."""
    work = p.work / "onbuild"
    shutil.rmtree(work, ignore_errors=True)
    (work / "ctx").mkdir(parents=True)
    (work / "tmp").mkdir()
    (work / "ctx" / "Dockerfile").write_text(
        f"FROM oci:{p.work / 'base-layout'}:v1\nRUN ln -s / /rootlink\n"
        f"ONBUILD RUN --mount=type=bind,from={p.reg.host}/evil:onbuild,source=/rootlink,target=/h"
        f" cat /h{p.host_marker_path} ; echo onbuild-ran\n"
    )
    buildah = ["buildah", "--root", str(work / "root"), "--runroot", str(work / "run"),
               "--storage-driver", "vfs"]  # fmt: skip
    env = {**os.environ, "TMPDIR": str(work / "tmp")}
    for cmd in (
        [*buildah, "bud", "--format", "docker", "--isolation", "oci", "--runtime", "runc",
         "--network", "none", "-t", "localhost/onbuild", str(work / "ctx")],
        [*buildah, "push", "--tls-verify=false", "--creds", f"x:{p.admin}", "localhost/onbuild",
         f"docker://{p.reg.host}/evil:onbuild"],
    ):  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    subprocess.run([*buildah, "rmi", "-a", "-f"], capture_output=True, env=env, timeout=120)
    shutil.rmtree(work, ignore_errors=True)


def test_onbuild_trigger_of_a_base_image_does_not_reach_the_host(platform: Platform) -> None:
    """Promise: a RUN step never reaches the builder host's file system, whatever the base image
    carries."""
    p = platform
    _push_onbuild_image(p)
    b = p.deploy(p.mallory, p.project("onbuild", "FROM REG/evil:onbuild\nRUN echo child\n"), "evil")
    # The builder pulls every base image first and checks its triggers as Dockerfile lines
    # (buildah 1.28 has CVE-2024-1753), then builds with --pull=never: refused, nothing ran.
    assert b.build["status"] == "failed", b.output
    assert "ONBUILD trigger is refused" in (b.build["error"] or ""), b.build
    assert "onbuild-ran" not in b.log
    assert p.host_marker not in b.output


def test_from_another_orgs_builder_storage_or_a_host_path_is_refused(
    platform: Platform, acme_marker: str
) -> None:
    """Promise: a build reads images only from registries (its token decides what it may pull),
    never from the builder's disk: `FROM containers-storage:[...]` naming acme's storage on the
    builder, `FROM oci:/path` or `dir:` on the host, also through an ARG or a build argument."""
    p = platform
    acme_ref = _storage_ref(p, "acme")
    tail = "RUN cat /marker.txt /from-secret.txt ; echo stolen-build-ran\n"
    attacks: list[tuple[str, tuple[str, ...]]] = [
        (f"FROM {acme_ref}\n{tail}", ()),
        (f"ARG B={acme_ref}\nFROM $B\n{tail}", ()),
        (f"ARG B\nFROM ${{B}}\n{tail}", ("--build-arg", f"B={acme_ref}")),
        (f"FROM REG/evil:base\nCOPY --from={acme_ref} /marker.txt /m\nRUN cat /m\n", ()),
        (f"FROM oci:{p.work / 'base-layout'}:v1\nRUN echo host-layout-used\n", ()),
    ]
    for i, (dockerfile, args) in enumerate(attacks):
        b = p.deploy(p.mallory, p.project(f"storage{i}", dockerfile), "evil", *args)
        assert acme_marker not in b.output, dockerfile
        assert "stolen-build-ran" not in b.log and "host-layout-used" not in b.log, dockerfile
        assert b.build["status"] == "failed", (dockerfile, b.log)
    # The policy still lets a build read its own org's storage (a Dockerfile of just FROM commits
    # an image its id names) and push from it.
    own = p.deploy(p.acme, p.project("fromonly", "FROM REG/base:v1\n"), "api")
    assert own.build["status"] == "succeeded", own.output


def test_add_of_a_url_never_fetches_from_the_builder_hosts_network(platform: Platform) -> None:
    """Promise: a build reaches no network the builder host has (its loopback services, a
    cloud's metadata address) unless its RUN steps are given one. buildah fetches `ADD URL` in
    its own process, on the host's network, so the builder refuses URL sources of ADD."""
    p = platform
    secret = "METADATA-" + secrets.token_hex(12)
    hits: list[str] = []

    class Metadata(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            body = secret.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Metadata)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{port}/latest/meta-data/iam"
        for i, dockerfile in enumerate(
            [
                f"FROM REG/evil:base\nADD {url} /meta\nRUN cat /meta\n",
                f'FROM REG/evil:base\nADD ["{url}", "/meta"]\nRUN cat /meta\n',
                f"FROM REG/evil:base\nARG U={url}\nADD $U /meta\nRUN cat /meta\n",
                f"FROM REG/evil:base\nadd --chown=0:0 {url.upper().replace('HTTP', 'http')} /m\n",
            ]
        ):
            b = p.deploy(p.mallory, p.project(f"ssrf{i}", dockerfile), "evil")
            assert secret not in b.output, dockerfile
            assert b.build["status"] == "failed", (dockerfile, b.log)
        assert hits == []
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# -- 6. COPY of links to host files ---------------------------------------------------------------


def test_copy_through_symlinks_copies_no_host_file(platform: Platform) -> None:
    """Promise: COPY copies only the context's and the stages' own files: a symlink in the
    context to /etc/shadow or to the builder's work dir, or in a stage to `/`, copies nothing of
    the host."""
    p = platform
    root = p.project(
        "copylinks",
        "FROM REG/evil:base AS s\nRUN ln -s / /rootlink && ln -s ../../../../../../.. /up\n"
        "FROM REG/evil:base\n"
        "COPY --from=s /rootlink/etc/shadow /s1\n"
        f"COPY --from=s /up{p.host_marker_path} /s2\n",
        {},
    )
    (root / "shadow").symlink_to("/etc/shadow")
    (root / "marker").symlink_to(p.host_marker_path)
    stage = p.deploy(p.mallory, root, "evil")
    # Links in the context: refused (client or builder) or copied as links, never as host files.
    ctx = p.project("ctxlinks", "FROM REG/evil:base\nCOPY . /ctx\n", {})
    (ctx / "shadow").symlink_to("/etc/shadow")
    (ctx / "marker").symlink_to(p.host_marker_path)
    (ctx / "work").symlink_to(p.builder.data_dir.resolve() / "work")
    linked = p.deploy(p.mallory, ctx, "evil")
    shadow = Path("/etc/shadow").read_bytes()
    for b in (stage, linked):
        assert p.host_marker not in b.output and shadow.decode() not in b.output
        if b.build["status"] == "succeeded":
            files = p.image_files("evil", b.build["image_digest"])
            assert not any(p.host_marker.encode() in v for v in files.values())
            assert not any(v == shadow for v in files.values() if v)


# -- 2. the build token ---------------------------------------------------------------------------


def _popen_deploy(p: Platform, token: str, root: Path, app: str) -> subprocess.Popen[str]:
    home = p.work / "home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKYREG_")}
    env.update(HOME=str(home), SKYREG_SERVER=p.reg.url, SKYREG_TOKEN=token, NO_COLOR="1")
    return subprocess.Popen(
        [sys.executable, "-m", "skyreg", "deploy", str(root), "--app", app, "--build-only"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _build_token(p: Platform) -> str | None:
    """The build token of the build running now, read from its authfile on the builder."""
    for auth in (p.builder.data_dir / "work").glob("*/auth.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            entry = json.loads(auth.read_text())["auths"][p.reg.host]["auth"]
            return base64.b64decode(entry).decode().partition(":")[2]
    return None


def _push_status(p: Platform, app: str, token: str) -> int:
    r = requests.post(f"{p.reg.url}/v2/{app}/blobs/uploads/", auth=("build", token))
    return r.status_code


def test_build_token_stays_in_its_lane_and_dies_with_a_cancelled_build(platform: Platform) -> None:
    """Promise: the build token reaches no management API, pushes only its own app, pulls
    nothing private of another org, and is revoked when the build ends. Cancelling a RUN that
    sleeps forever stops buildah within seconds, and the next tenant's build runs after."""
    p = platform
    root = p.project("sleeper", "FROM REG/evil:base\nRUN echo sleeping-now && sleep 100000\n")
    proc = _popen_deploy(p, p.mallory, root, "evil")
    try:
        wait_for(lambda: "sleeping-now" in p.log(p.builds("evil")[0]["id"]), "the sleep", 120)
        build = p.builds("evil")[0]
        token = wait_for(lambda: _build_token(p), "the build token", 30)
        auth = ("build", token)
        assert requests.get(f"{p.reg.url}/api/v1/apps", auth=auth).status_code == 403
        assert requests.get(f"{p.reg.url}/api/v1/builds/{build['id']}", auth=auth).status_code in (
            403,
            404,
        )
        assert _push_status(p, "evil", token) == 202  # its own app: the push it exists for
        assert _push_status(p, "evil2", token) in (401, 403, 404)
        assert _push_status(p, "web", token) in (401, 403, 404)
        pull = requests.get(f"{p.reg.url}/v2/base/manifests/v1", auth=auth)
        assert pull.status_code in (401, 403, 404)
        assert requests.get(f"{p.reg.url}/v2/pub/manifests/v1", auth=auth).status_code == 200
        r = requests.post(f"{p.reg.url}/api/v1/builds/{build['id']}/cancel", auth=("x", p.mallory))
        assert r.status_code == 200, r.text
        ended = wait_for(
            lambda: (b := p.builds("evil")[0])["status"] in ("cancelled", "failed") and b,
            "the cancelled build ended",
            30,
        )
        assert ended["status"] == "cancelled", ended
        assert _push_status(p, "evil", token) == 401  # revoked
        assert requests.get(f"{p.reg.url}/v2/pub/manifests/v1", auth=auth).status_code == 401
        wait_for(lambda: not _sleeping(), "the RUN step's processes gone", 15)
        assert list((p.builder.data_dir / "work").iterdir()) == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.communicate(timeout=30)
    after = p.deploy(p.acme, p.project("after", "FROM REG/base:v1\nRUN echo next-ran\n"), "api")
    assert after.build["status"] == "succeeded" and "next-ran" in after.log, after.output


def _sleeping() -> bool:
    """Whether a `sleep 100000` (the cancelled RUN step) still runs on this host."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if cmdline.read_bytes() == b"sleep\x00100000\x00":
                return True
    return False


# -- 3. cache poisoning across orgs ---------------------------------------------------------------


def test_another_orgs_cached_layer_or_cache_mount_is_never_used(platform: Platform) -> None:
    """Promise: orgs share no build cache: mallory building acme's exact Dockerfile first (same
    public base, same instruction, different output bytes; a cache mount with the same id) does
    not give acme mallory's layer or cache-mount content."""
    p = platform
    poison = p.project(
        "poison",
        "FROM REG/pub:v1\nRUN --mount=type=cache,id=shared,target=/c echo poisoned > /c/p\n",
    )
    assert p.deploy(p.mallory, poison, "evil").build["status"] == "succeeded"
    common = (
        "FROM REG/pub:v1\n"  # acme's public app: mallory may build on it
        "RUN --mount=type=cache,id=shared,target=/c (cat /c/p 2>/dev/null || echo cache-clean)"
        " && head -c 16 /dev/urandom | od -x > /f\n"
    )
    bad = p.deploy(p.mallory, p.project("common-m", common), "evil")
    good = p.deploy(p.acme, p.project("common-a", common), "web")
    assert bad.build["status"] == good.build["status"] == "succeeded", good.output + bad.output
    assert [s["cached"] for s in good.build["steps"]] == [False, False]
    assert "cache-clean" in good.log and "poisoned" not in good.log
    mine = p.image_files("web", good.build["image_digest"])["f"]
    theirs = p.image_files("evil", bad.build["image_digest"])["f"]
    assert mine != theirs


def test_from_another_orgs_private_app_is_refused(platform: Platform) -> None:
    """Promise: the build token pulls only its org's apps and public ones."""
    p = platform
    b = p.deploy(p.mallory, p.project("private", "FROM REG/base:v1\nRUN echo got-it\n"), "evil")
    assert b.build["status"] == "failed" and "got-it" not in b.log
    assert re.search(r"unauthorized|denied|not found|unknown", b.output, re.I), b.output


# -- 4. secrets -----------------------------------------------------------------------------------


def test_secret_not_in_history_or_config_and_its_encodings_are_a_known_log_leak(
    platform: Platform,
) -> None:
    """Promise: a build secret's value is in no layer, no image config or history and, verbatim,
    not in the log. Known limit (documented, not fixed): a RUN step that prints it encoded
    (base64) or cut in pieces gets it into the log: only exact values and lines are redacted.
    A --build-arg is not secret: it lands in the history, as with Docker."""
    p = platform
    value = "sk-live-" + secrets.token_hex(16)
    secret = p.work / "leaky-secret"
    secret.write_text(value)
    root = p.project(
        "leaky",
        "FROM REG/base:v1\nARG VISIBLE\n"
        "RUN --mount=type=secret,id=tok base64 /run/secrets/tok | tr -d '\\n' ; echo ; "
        "cut -c1-12 /run/secrets/tok ; cut -c13- /run/secrets/tok ; echo used-$VISIBLE\n",
    )
    b = p.deploy(p.acme, root, "web", "--build-secret", f"tok={secret}",
                 "--build-arg", "VISIBLE=not-a-secret-arg")  # fmt: skip
    assert b.build["status"] == "succeeded", b.output + p.diagnostics()
    assert value not in b.output
    config = p.image_config("web", b.build["image_digest"])
    history = json.loads(config)["history"]
    assert value.encode() not in config
    assert base64.b64encode(value.encode()) not in config
    assert any("--mount=type=secret,id=tok" in h.get("created_by", "") for h in history) or any(
        "base64 /run/secrets/tok" in h.get("created_by", "") for h in history
    ), history
    assert b"not-a-secret-arg" in config  # build arguments are not secret (Docker's behaviour)
    files = p.image_files("web", b.build["image_digest"])
    assert not any(value.encode() in v for v in files.values())
    # The known limit, pinned so a change in redaction shows up here:
    assert base64.b64encode(value.encode()).decode() in b.log
    assert value[:12] in b.log.splitlines() and value[12:] in b.log.splitlines()


# -- 5. denial of service -------------------------------------------------------------------------


def test_a_flood_of_output_is_cut_at_the_log_bound_and_the_build_goes_on(
    platform: Platform,
) -> None:
    """Promise: the server keeps at most MAX_LOG_LINES lines of a build's log (one more says it
    was cut); the builder goes on serving."""
    p = platform
    flood = p.project("flood", f"FROM REG/evil:base\nRUN seq 1 {MAX_LOG_LINES + 5000}\n")
    b = p.deploy(p.mallory, flood, "evil")
    assert b.build["status"] == "succeeded", b.build
    lines = b.log.splitlines()
    assert len(lines) == MAX_LOG_LINES + 1 and lines[-1] == TRUNCATED
    assert b.build["log_lines"] <= MAX_LOG_LINES + 1
