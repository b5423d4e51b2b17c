"""Running Debian's buildah for one build: its command lines, its environment, and what its
output says (steps, cache hits, the failing step's exit code).

Every RUN step runs under runc (`--isolation oci`): its own mount, PID, IPC, UTS and network
namespaces, Docker's default capabilities and seccomp profile, never the builder's own processes,
files or credentials (buildah's `chroot` isolation shares the host's /proc and network, so it is
not offered). The storage (layers, the build cache) is one directory per organization.
"""

from __future__ import annotations

import json
import re
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from skyreg.privatefs import private_dir

STEP_RE = re.compile(r"^STEP (\d+)/(\d+): (.*)$")
CACHE_RE = re.compile(r"^--> Using cache ")
EXIT_RE = re.compile(r"exit status (\d+)")
NETWORKS = ("private", "none")
MAX_INSTRUCTION = 1000


@dataclass(frozen=True)
class BuildahSettings:
    """How `skyreg builder` runs buildah."""

    buildah: str = "buildah"
    runtime: str = "runc"
    storage_driver: str = "vfs"  # overlay where the kernel allows it
    network: str = "private"  # RUN steps: "private" (their own network) or "none"


@dataclass(frozen=True)
class BuildPaths:
    """One build's working files (all under a 0700 directory removed when it ends)."""

    work: Path

    @property
    def archive(self) -> Path:
        return self.work / "context.tar.gz"

    @property
    def context(self) -> Path:
        return self.work / "context"

    @property
    def secrets(self) -> Path:
        return self.work / "secrets"

    @property
    def authfile(self) -> Path:
        return self.work / "auth.json"

    @property
    def registries_conf(self) -> Path:
        return self.work / "registries.conf"

    @property
    def tmp(self) -> Path:
        return self.work / "tmp"

    @property
    def digestfile(self) -> Path:
        return self.work / "digest"

    def prepare(self) -> None:
        for d in (self.work, self.secrets, self.tmp):
            private_dir(d)


def registry_host(server: str) -> str:
    """HOST[:PORT] of the server's URL, as image references name it."""
    return urllib.parse.urlsplit(server).netloc


def write_credentials(paths: BuildPaths, server: str, credential: str) -> None:
    """The build token as buildah's authfile, and a registries.conf that reaches the server
    over plain HTTP when its URL is http:// (for that host only), short names from Docker Hub."""
    import base64

    host = registry_host(server)
    auth = base64.b64encode(f"build:{credential}".encode()).decode()
    _write_private(paths.authfile, json.dumps({"auths": {host: {"auth": auth}}}))
    conf = 'unqualified-search-registries = ["docker.io"]\nshort-name-mode = "permissive"\n'
    if urllib.parse.urlsplit(server).scheme == "http":
        conf += f'\n[[registry]]\nlocation = "{host}"\ninsecure = true\n'
    _write_private(paths.registries_conf, conf)


def _write_private(path: Path, text: str) -> None:
    import os

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def storage_args(settings: BuildahSettings, storage: Path) -> list[str]:
    """buildah's global options for an org's storage directory."""
    return [
        settings.buildah,
        "--root",
        str(storage / "root"),
        "--runroot",
        str(storage / "run"),
        "--storage-driver",
        settings.storage_driver,
    ]


def environment(paths: BuildPaths) -> dict[str, str]:
    """buildah's environment: nothing of the builder's own (its token stays out)."""
    return {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(paths.work),
        "TMPDIR": str(paths.tmp),
        "CONTAINERS_REGISTRIES_CONF": str(paths.registries_conf),
        "REGISTRY_AUTH_FILE": str(paths.authfile),
        "LANG": "C.UTF-8",
    }


def bud_command(
    settings: BuildahSettings,
    storage: Path,
    paths: BuildPaths,
    *,
    dockerfile: Path,
    tag: str,
    target: str | None,
    platform: str | None,
    build_args: dict[str, str],
    secret_ids: list[str],
    no_cache: bool,
) -> list[str]:
    """`buildah bud` for one build (the context is `paths.context`)."""
    cmd = [
        *storage_args(settings, storage),
        "bud",
        "--layers",
        "--isolation",
        "oci",
        "--runtime",
        settings.runtime,
        "--network",
        "none" if settings.network == "none" else "private",
        "--authfile",
        str(paths.authfile),
        "--file",
        str(dockerfile),
        "--tag",
        tag,
        "--iidfile",
        str(paths.work / "iid"),
    ]
    if target:
        cmd += ["--target", target]
    if platform:
        cmd += ["--platform", platform]
    for key, value in sorted(build_args.items()):
        cmd += ["--build-arg", f"{key}={value}"]
    for sid in secret_ids:
        cmd += ["--secret", f"id={sid},src={paths.secrets / sid}"]
    if no_cache:
        cmd.append("--no-cache")
    cmd.append(str(paths.context))
    return cmd


def push_command(
    settings: BuildahSettings, storage: Path, paths: BuildPaths, tag: str, destination: str
) -> list[str]:
    """`buildah push` of the built image to `docker://destination` (layers the registry has
    are not sent again)."""
    return [
        *storage_args(settings, storage),
        "push",
        "--authfile",
        str(paths.authfile),
        "--digestfile",
        str(paths.digestfile),
        tag,
        f"docker://{destination}",
    ]


@dataclass
class StepClock:
    """Times each Dockerfile step from buildah's `STEP n/m:` lines and notes cache hits."""

    steps: list[dict[str, object]] = field(default_factory=list)
    _started: float | None = None

    def line(self, text: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        m = STEP_RE.match(text)
        if m:
            self._close(now)
            self.steps.append(
                {
                    "step": int(m.group(1)),
                    "instruction": m.group(3)[:MAX_INSTRUCTION],
                    "seconds": 0.0,
                    "cached": False,
                }
            )
            self._started = now
        elif CACHE_RE.match(text) and self.steps:
            self.steps[-1]["cached"] = True

    def _close(self, now: float) -> None:
        if self.steps and self._started is not None:
            self.steps[-1]["seconds"] = round(now - self._started, 3)
        self._started = None

    def finish(self, now: float | None = None) -> list[dict[str, object]]:
        self._close(time.monotonic() if now is None else now)
        return self.steps


def failure_message(tail: list[str], code: int | None) -> str:
    """Why a build failed, from buildah's last lines: the failing step and its exit code."""
    step_exit = None
    for line in reversed(tail):
        if (
            "building at STEP" in line
            or "error building" in line
            or "while running runtime" in line
        ):
            m = EXIT_RE.search(line)
            if m:
                step_exit = int(m.group(1))
                break
    last = [line for line in tail if line.strip()][-20:]
    head = (
        f"a build step exited with code {step_exit}"
        if step_exit is not None
        else f"buildah exited with code {code}"
    )
    return head + ("\n" + "\n".join(last) if last else "")


class Redactor:
    """Replaces every build secret's value in log text (secrets never reach the build log)."""

    def __init__(self, values: list[bytes]) -> None:
        texts: set[str] = set()
        for v in values:
            text = v.decode("utf-8", "replace")
            texts.add(text.strip())
            texts.update(part.strip() for part in text.splitlines())  # printed a line at a time
        self.values = sorted((t for t in texts if len(t) >= 4), key=len, reverse=True)

    def __call__(self, line: str) -> str:
        for value in self.values:
            if value in line:
                line = line.replace(value, "[secret]")
        return line
