"""Fixtures that start real client-side daemons (dockerd, containerd) on private sockets,
and wrap the daemonless clients (podman, skopeo) with private storage and config.

Loaded as a pytest plugin by ``tests/conftest.py``. Every daemon gets its own temporary
directory (sockets, data root, state, logs) and is stopped, with all of its descendant
processes, when its scope ends, even if a test failed. A failing real-client test gets
the tails of the skyreg and daemon logs attached to its report.

A tool whose binary is missing makes its tests *skip* (``shutil.which``); a tool that is
installed but cannot start is a test *error*: CI installs them all
(``scripts/install-test-tools.sh``).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.support.images import (
    BUSYBOX,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    TestImage,
    sha256,
)

if TYPE_CHECKING:
    from tests.support.servers import RunningRegistry, ServedRegistry

# Debian package that provides each binary, for skip messages.
PACKAGES = {
    "docker": "docker.io",
    "dockerd": "docker.io",
    "containerd": "containerd",
    "ctr": "containerd",
    "podman": "podman",
    "skopeo": "skopeo",
    "busybox": "busybox-static",
}

ALL_MANIFEST_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST)

INSECURE_POLICY = {"default": [{"type": "insecureAcceptAnything"}]}


# --------------------------------------------------------------------------- helpers


def require_binary(name: str) -> str:
    """Path of ``name``, or skip the test when it is not installed."""
    path = shutil.which(name)
    if path is None:
        pkg = PACKAGES.get(name, name)
        pytest.skip(f"{name} not installed (Debian package {pkg}; scripts/install-test-tools.sh)")
    return path


def require_busybox() -> None:
    """Skip when Debian's busybox-static is not installed (tests/support/images.py packs
    /bin/busybox). A dynamically linked /bin/busybox is an error, raised when building."""
    if not BUSYBOX.exists():
        pytest.skip(f"{BUSYBOX} missing (Debian package busybox-static)")


def short_tmpdir(prefix: str) -> Path:
    """A temp dir with a short path: unix socket paths must stay under 108 bytes."""
    return Path(tempfile.mkdtemp(prefix=f"skyreg-{prefix}-", dir="/tmp"))


class CommandFailed(AssertionError):
    pass


@dataclass
class Result:
    """Outcome of a client command; ``out``/``err`` are the raw bytes."""

    argv: list[str]
    returncode: int
    out: bytes
    err: bytes

    @property
    def stdout(self) -> str:
        return self.out.decode(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err.decode(errors="replace")

    def json(self) -> Any:
        return json.loads(self.out)

    def describe(self) -> str:
        return (
            f"command (exit {self.returncode}): {' '.join(self.argv)}\n"
            f"--- stdout ---\n{self.stdout[-4000:]}\n--- stderr ---\n{self.stderr[-6000:]}"
        )


def run(
    args: Sequence[str | os.PathLike[str]],
    *,
    env: dict[str, str] | None = None,
    check: bool = True,
    timeout: float = 300,
    input: bytes | None = None,
    cwd: Path | None = None,
) -> Result:
    """Run a client command; on failure raise with the command, exit code and output."""
    argv = [os.fspath(a) for a in args]
    proc = subprocess.run(
        argv,
        env={**os.environ, **(env or {})},
        capture_output=True,
        timeout=timeout,
        input=input,
        cwd=cwd,
        check=False,
    )
    res = Result(argv, proc.returncode, proc.stdout, proc.stderr)
    if check and res.returncode != 0:
        raise CommandFailed("failed " + res.describe())
    return res


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after ``comm`` (state, ppid, ...), or None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # pid (comm) state ppid ...; comm may itself contain spaces and parens.
    return stat.rsplit(")", 1)[1].split()


def _children_of(pid: int) -> list[tuple[int, str]]:
    """All descendants of ``pid`` as (pid, start time), from /proc."""
    parents: dict[int, list[tuple[int, str]]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _proc_stat(int(entry.name))
        if fields is None:
            continue
        # fields[1] is ppid, fields[19] the start time (field 22 of stat).
        parents.setdefault(int(fields[1]), []).append((int(entry.name), fields[19]))
    out: list[tuple[int, str]] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child[0])
    return out


def _still_running(proc: tuple[int, str]) -> bool:
    """True while that very process (same pid *and* start time) runs and is no zombie."""
    fields = _proc_stat(proc[0])
    return fields is not None and fields[19] == proc[1] and fields[0] != "Z"


@dataclass
class Daemon:
    """A background daemon process with a log file, stopped together with its children."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env},
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self, tail: int = 8000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def wait_until(self, ready: Any, timeout: float = 60, what: str = "ready") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(
                    f"{self.name} exited (code {self.proc and self.proc.returncode}) "
                    f"before it was {what}:\n{self.log()}"
                )
            with contextlib.suppress(Exception):
                if ready():
                    return
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} was not {what} after {timeout}s:\n{self.log()}")

    def stop(self, timeout: float = 30) -> None:
        if self.proc is None:
            return
        pid = self.proc.pid
        descendants = _children_of(pid) if self.proc.poll() is None else []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        # Whatever the daemon left behind (e.g. dockerd's managed containerd): only the
        # processes it had started, checked by pid and start time before each signal.
        leftovers = [p for p in descendants if _still_running(p)]
        for p in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p[0], signal.SIGTERM)
        deadline = time.monotonic() + 10
        while leftovers and time.monotonic() < deadline:
            leftovers = [p for p in leftovers if _still_running(p)]
            time.sleep(0.1)
        for p in leftovers:
            if _still_running(p):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p[0], signal.SIGKILL)
        self.proc = None


def _unmount_under(root: Path) -> None:
    """Lazily unmount anything a daemon left mounted below ``root`` (deepest first)."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return
    prefix = str(root.resolve()) + "/"
    points = sorted(
        (m.split()[1] for m in mounts if m.split()[1].startswith(prefix)),
        key=len,
        reverse=True,
    )
    for point in points:
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)


def remove_tree(root: Path) -> None:
    _unmount_under(root)
    shutil.rmtree(root, ignore_errors=True)


def http_request(
    url: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    data: bytes | None = None,
    timeout: float = 30,
) -> tuple[int, dict[str, str], bytes]:
    """Plain urllib request that returns (status, headers, body) also for 4xx/5xx."""
    req = urllib.request.Request(url, method=method, headers=headers or {}, data=data)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers.items()), err.read()


def push_blob_http(base_url: str, repo: str, data: bytes) -> str:
    """Monolithic blob upload (POST then PUT ?digest=) over plain http; returns the digest."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    status, _, _ = http_request(f"{base_url}/v2/{repo}/blobs/{digest}", method="HEAD")
    if status == 200:
        return digest
    status, headers, body = http_request(f"{base_url}/v2/{repo}/blobs/uploads/", method="POST")
    assert status == 202, f"POST /v2/{repo}/blobs/uploads/ -> {status} {body[:500]!r}"
    location = headers["Location"]
    if location.startswith("/"):
        location = base_url + location
    sep = "&" if "?" in location else "?"
    status, _, body = http_request(
        f"{location}{sep}digest={digest}",
        method="PUT",
        data=data,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert status == 201, f"PUT blob upload {digest} -> {status} {body[:500]!r}"
    return digest


def push_manifest_http(
    base_url: str, repo: str, reference: str, manifest: bytes, media_type: str
) -> str:
    """PUT a manifest; returns the Docker-Content-Digest the registry answered."""
    status, headers, body = http_request(
        f"{base_url}/v2/{repo}/manifests/{reference}",
        method="PUT",
        data=manifest,
        headers={"Content-Type": media_type},
    )
    assert status == 201, f"PUT /v2/{repo}/manifests/{reference} -> {status} {body[:500]!r}"
    return headers.get("Docker-Content-Digest", "")


def push_image_http(base_url: str, repo: str, reference: str, image: TestImage) -> str:
    """Push a built image (blobs then manifest) with plain HTTP, no client tool."""
    for layer in image.layers:
        push_blob_http(base_url, repo, layer.gz)
    push_blob_http(base_url, repo, image.config)
    return push_manifest_http(base_url, repo, reference, image.manifest, image.manifest_media_type)


def get_manifest_http(
    base_url: str, repo: str, reference: str, accept: Sequence[str] = ALL_MANIFEST_TYPES
) -> tuple[int, dict[str, str], bytes]:
    return http_request(
        f"{base_url}/v2/{repo}/manifests/{reference}", headers={"Accept": ", ".join(accept)}
    )


def assert_image_in_registry(
    base_url: str, repo: str, reference: str, image: TestImage
) -> tuple[str, dict[str, Any]]:
    """Check that ``repo:reference`` in the registry is ``image``, whatever the client did
    to its layers: same config bytes, and every layer blob matches its descriptor and
    unpacks to the diff_id the config names. Returns (manifest digest, manifest)."""
    status, headers, body = get_manifest_http(base_url, repo, reference)
    assert status == 200, f"GET /v2/{repo}/manifests/{reference} -> {status} {body[:300]!r}"
    digest = sha256(body)
    assert headers.get("Docker-Content-Digest") == digest
    manifest = json.loads(body)
    assert headers.get("Content-Type") == manifest.get("mediaType")
    assert manifest["config"]["digest"] == image.config_digest
    status, _, config = http_request(f"{base_url}/v2/{repo}/blobs/{image.config_digest}")
    assert status == 200
    assert config == image.config
    assert len(manifest["layers"]) == len(image.layers)
    for desc, diff_id in zip(manifest["layers"], image.diff_ids, strict=True):
        status, _, blob = http_request(f"{base_url}/v2/{repo}/blobs/{desc['digest']}")
        assert status == 200, f"GET blob {desc['digest']} -> {status}"
        assert sha256(blob) == desc["digest"]
        assert len(blob) == desc["size"]
        plain = gzip.decompress(blob) if blob[:2] == b"\x1f\x8b" else blob
        assert sha256(plain) == diff_id
    return digest, manifest


def registry_log(reg: RunningRegistry, tail: int = 6000) -> str:
    return f"--- skyreg log (tail) ---\n{reg.log()[-tail:]}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Attach skyreg's and the client daemons' log tails to failing real-client tests."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.when != "call" or not report.failed:
        return
    funcargs = getattr(item, "funcargs", {})
    if not item.nodeid.split("::")[0].rsplit("/", 1)[-1].startswith("test_clients_"):
        return
    for name in ("shared_registry", "registry"):
        reg = funcargs.get(name)
        if reg is not None:
            report.sections.append((f"{name}: skyreg log (tail)", reg.log()[-8000:]))
    for name in ("dockerd", "containerd"):
        engine = funcargs.get(name)
        if engine is not None:
            report.sections.append((f"{name} log (tail)", engine.daemon.log(6000)))


# --------------------------------------------------------------------------- docker


@dataclass
class DockerEngine:
    """A private dockerd; ``docker(...)`` runs the CLI against it."""

    root: Path
    daemon: Daemon
    registry_host: str

    @property
    def socket(self) -> Path:
        return self.root / "docker.sock"

    @property
    def env(self) -> dict[str, str]:
        return {
            "DOCKER_HOST": f"unix://{self.socket}",
            "DOCKER_CONFIG": str(self.root / "cli-config"),
            "DOCKER_CLI_EXPERIMENTAL": "enabled",
            "DOCKER_CONTENT_TRUST": "0",
        }

    def docker(self, *args: str | os.PathLike[str], check: bool = True, timeout: float = 300):
        return run(["docker", *args], env=self.env, check=check, timeout=timeout)


@pytest.fixture(scope="module")
def dockerd(shared_registry: ServedRegistry) -> Iterator[DockerEngine]:
    """dockerd (with its own managed containerd) trusting the module's skyreg over http."""
    require_busybox()
    require_binary("dockerd")
    require_binary("docker")
    root = short_tmpdir("dockerd")
    (root / "cli-config").mkdir()
    (root / "cli-config" / "config.json").write_text("{}")
    argv = [
        "dockerd",
        "--host",
        f"unix://{root}/docker.sock",
        "--data-root",
        f"{root}/data",
        "--exec-root",
        f"{root}/exec",
        "--pidfile",
        f"{root}/docker.pid",
        "--config-file",
        f"{root}/daemon.json",
        "--storage-driver",
        "vfs",
        "--iptables=false",
        "--ip6tables=false",
        "--ip-masq=false",
        "--bridge=none",
        "--insecure-registry",
        shared_registry.host,
    ]
    (root / "daemon.json").write_text("{}")
    daemon = Daemon("dockerd", argv, root / "dockerd.log")
    engine = DockerEngine(root=root, daemon=daemon, registry_host=shared_registry.host)
    try:
        daemon.start()
        daemon.wait_until(
            lambda: engine.docker("version", "--format", "{{.Server.Version}}", timeout=10),
            what="answering on its socket",
        )
        yield engine
    finally:
        daemon.stop()
        remove_tree(root)


# --------------------------------------------------------------------------- containerd


@dataclass
class Containerd:
    root: Path
    daemon: Daemon

    @property
    def address(self) -> Path:
        return self.root / "containerd.sock"

    def ctr(self, *args: str | os.PathLike[str], check: bool = True, timeout: float = 300):
        return run(
            ["ctr", "--address", self.address, "--namespace", "skyreg-test", *args],
            check=check,
            timeout=timeout,
        )


CONTAINERD_CONFIG = """\
version = 2
root = "{root}/root"
state = "{root}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{root}/containerd.sock"

[ttrpc]
  address = "{root}/containerd.sock.ttrpc"

[debug]
  address = "{root}/debug.sock"
  level = "info"

[metrics]
  address = ""
"""


@pytest.fixture(scope="module")
def containerd() -> Iterator[Containerd]:
    """A private containerd; use ``.ctr(...)`` (native snapshotter, no overlay needed)."""
    require_busybox()
    require_binary("containerd")
    require_binary("ctr")
    root = short_tmpdir("containerd")
    config = root / "config.toml"
    config.write_text(CONTAINERD_CONFIG.format(root=root))
    daemon = Daemon("containerd", ["containerd", "--config", str(config)], root / "containerd.log")
    c = Containerd(root=root, daemon=daemon)
    try:
        daemon.start()
        daemon.wait_until(lambda: c.ctr("version", timeout=10), what="answering on its socket")
        yield c
    finally:
        daemon.stop()
        remove_tree(root)


# --------------------------------------------------------------------------- podman


@dataclass
class Podman:
    """Rootful podman with private storage (vfs) and config files in a temp dir."""

    root: Path

    @property
    def env(self) -> dict[str, str]:
        return {
            "CONTAINERS_REGISTRIES_CONF": str(self.root / "registries.conf"),
            "CONTAINERS_STORAGE_CONF": str(self.root / "storage.conf"),
            "CONTAINERS_CONF": str(self.root / "containers.conf"),
            "REGISTRY_AUTH_FILE": str(self.root / "auth.json"),
            "TMPDIR": str(self.root / "tmp"),
        }

    def podman(self, *args: str | os.PathLike[str], check: bool = True, timeout: float = 300):
        argv = [
            "podman",
            "--root",
            self.root / "storage",
            "--runroot",
            self.root / "run",
            "--storage-driver",
            "vfs",
            "--tmpdir",
            self.root / "libpod-tmp",
            "--events-backend",
            "file",
            "--cgroup-manager",
            "cgroupfs",
            # Keep podman's CNI/netavark config (and its lock file) out of /etc.
            "--network-config-dir",
            self.root / "networks",
            *args,
        ]
        return run(argv, env=self.env, check=check, timeout=timeout)


def _write_containers_files(root: Path, insecure_hosts: Sequence[str]) -> None:
    (root / "tmp").mkdir(exist_ok=True)
    regs = "".join(f'\n[[registry]]\nlocation = "{h}"\ninsecure = true\n' for h in insecure_hosts)
    (root / "registries.conf").write_text(
        'unqualified-search-registries = []\nshort-name-mode = "permissive"\n' + regs
    )
    (root / "storage.conf").write_text(
        f'[storage]\ndriver = "vfs"\ngraphroot = "{root}/storage"\nrunroot = "{root}/run"\n'
    )
    (root / "containers.conf").write_text(
        '[engine]\nevents_logger = "file"\ncgroup_manager = "cgroupfs"\n'
        f'tmp_dir = "{root}/libpod-tmp"\n'
    )
    (root / "policy.json").write_text(json.dumps(INSECURE_POLICY))
    (root / "auth.json").write_text(json.dumps({"auths": {}}))


@pytest.fixture(scope="module")
def podman(shared_registry: ServedRegistry) -> Iterator[Podman]:
    require_busybox()
    require_binary("podman")
    root = short_tmpdir("podman")
    _write_containers_files(root, [shared_registry.host])
    p = Podman(root=root)
    try:
        p.podman("info", "--format", "{{.Store.GraphDriverName}}")
        yield p
    finally:
        # Podman has no daemon; drop its storage (vfs leaves no mounts, but be safe).
        with contextlib.suppress(Exception):
            p.podman("system", "reset", "--force", timeout=60, check=False)
        remove_tree(root)


# --------------------------------------------------------------------------- skopeo


@dataclass
class Skopeo:
    root: Path

    @property
    def policy(self) -> Path:
        return self.root / "policy.json"

    def skopeo(self, *args: str | os.PathLike[str], check: bool = True, timeout: float = 300):
        argv = [
            "skopeo",
            "--policy",
            self.policy,
            "--registries-conf",
            self.root / "registries.conf",
            *args,
        ]
        env = {"TMPDIR": str(self.root / "tmp"), "REGISTRY_AUTH_FILE": str(self.root / "auth.json")}
        return run(argv, env=env, check=check, timeout=timeout)

    def copy(self, src: str, dst: str, *extra: str) -> Result:
        """``skopeo copy`` with plain http on both sides (only matters for docker://)."""
        return self.skopeo(
            "copy", "--src-tls-verify=false", "--dest-tls-verify=false", *extra, src, dst
        )

    def inspect(self, ref: str, *extra: str, check: bool = True) -> Result:
        return self.skopeo("inspect", "--tls-verify=false", *extra, ref, check=check)


@pytest.fixture(scope="module")
def skopeo(shared_registry: ServedRegistry) -> Iterator[Skopeo]:
    """skopeo with an accept-anything policy and the module's skyreg marked insecure."""
    require_busybox()
    require_binary("skopeo")
    root = short_tmpdir("skopeo")
    _write_containers_files(root, [shared_registry.host])
    try:
        yield Skopeo(root=root)
    finally:
        remove_tree(root)
