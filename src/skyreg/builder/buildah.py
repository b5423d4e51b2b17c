"""Running Debian's buildah for one build: its command lines, its environment, and what its
output says (steps, cache hits, the failing step's exit code).

Every RUN step runs under runc (`--isolation oci`): its own mount, PID, IPC, UTS and network
namespaces, Docker's default capabilities and seccomp profile, never the builder's own processes,
files or credentials (buildah's `chroot` isolation shares the host's /proc and network, so it is
not offered). The storage (layers, the build cache) is one directory per organization.
"""

from __future__ import annotations

import contextlib
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
    def policy(self) -> Path:
        return self.work / "policy.json"

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


MAX_DOCKERFILE = 1 << 20  # bytes of a Dockerfile the builder reads to check it
_DIRECTIVE_RE = re.compile(r"^\s*#\s*([A-Za-z]+)\s*=\s*(\S+)\s*$")
_MOUNT_WORD_RE = re.compile(r"^-+mount(=|$)", re.I)
_MOUNT_FROM_RE = re.compile(r"(^|[\s,=])from\s*=", re.I)


def signature_policy(settings: BuildahSettings, storage: Path) -> str:
    """containers/image's policy for one build: images come from registries (`docker://`) or
    the org's own storage, never another transport. Without it a Dockerfile's `FROM
    containers-storage:[vfs@<another org's storage>]IMAGE`, `FROM oci:/host/path` or `dir:`
    (also through an ARG or a build argument, an ONBUILD trigger or `--mount from=`) reads the
    builder's disk: another tenant's images, any host directory."""
    accept = [{"type": "insecureAcceptAnything"}]
    # A named image's identity is "[driver@root+runroot]name"; an image only an id names (a
    # Dockerfile of just FROM commits one) matches only the "[driver@root]" namespace.
    store = f"{settings.storage_driver}@{storage / 'root'}"
    own = {f"[{store}]": accept, f"[{store}+{storage / 'run'}]": accept}
    return json.dumps(
        {
            "default": [{"type": "reject"}],
            "transports": {"docker": {"": accept}, "containers-storage": own},
        }
    )


def write_policy(paths: BuildPaths, settings: BuildahSettings, storage: Path) -> None:
    """The build's signature policy (`signature_policy`) as `paths.policy`."""
    _write_private(paths.policy, signature_policy(settings, storage))


def read_dockerfile(path: Path) -> str:
    """The Dockerfile's text, at most MAX_DOCKERFILE bytes (ValueError past it)."""
    with open(path, "rb") as f:
        data = f.read(MAX_DOCKERFILE + 1)
    if len(data) > MAX_DOCKERFILE:
        raise ValueError(f"the Dockerfile is larger than {MAX_DOCKERFILE >> 20} MiB")
    return data.decode("utf-8", "replace")


def _instructions(text: str) -> list[str]:
    """The Dockerfile's logical lines, as buildah's parser joins them: the escape character
    (`\\`, or the one an `# escape=` directive names) at a line's end continues it, comment and
    blank lines inside a continuation are skipped."""
    lines = text.splitlines()
    escape = "\\"
    for line in lines:
        m = _DIRECTIVE_RE.match(line)
        if not m:
            break
        if m.group(1).lower() == "escape" and m.group(2) in ("\\", "`"):
            escape = m.group(2)
    found: list[str] = []
    current: str | None = None
    for line in lines:
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        body = line.rstrip()
        continues = body.endswith(escape)
        if continues:
            body = body[: -len(escape)]
        current = body if current is None else current + body
        if not continues:
            found.append(current)
            current = None
    if current is not None:
        found.append(current)
    return found


def _add_sources(args: str) -> list[str]:
    """The sources of an ADD instruction's arguments (flags dropped, the destination too)."""
    words = args.split()
    while words and words[0].startswith("--"):
        words.pop(0)
    rest = " ".join(words)
    if rest.startswith("["):
        with contextlib.suppress(ValueError):
            items = json.loads(rest)
            if isinstance(items, list):
                return [str(item) for item in items[:-1]]
    return words[:-1]


def _mount_problem(args: str) -> str | None:
    """Why a RUN instruction's `--mount` options are refused, or None (`dockerfile_problem`)."""
    plain = args.replace('"', " ").replace("'", " ")
    words = plain.split()
    mounts = [w for w in words if _MOUNT_WORD_RE.match(w)]
    if not mounts:
        return None
    if _MOUNT_FROM_RE.search(plain):
        return "RUN --mount with from= is not allowed on this builder"
    if any("$" in m for m in mounts):
        return "RUN --mount with a $variable is not allowed on this builder"
    for word in mounts:
        for option in word.split(","):
            key, _, value = option.partition("=")
            if _MOUNT_WORD_RE.match(key):
                key, _, value = value.partition("=")
            if ".." in value.split("/") or (key.strip().lower() == "id" and "/" in value):
                return f"RUN --mount with {option[:100]} is not allowed on this builder"
    return None


def dockerfile_problem(text: str) -> str | None:
    """Why the builder refuses to build this Dockerfile, or None.

    - `RUN --mount=...,from=...`: buildah before 1.35.1 follows a symlink in the mounted stage or
      image on the host (CVE-2024-1753): `from=STAGE,source=LINK` with LINK -> / mounts the
      builder host's root file system into the step, read-write. A `$` in a mount is refused
      too (it could spell `from` once expanded).
    - `RUN --mount=type=cache,id=../..`: buildah before 1.38 joins the id to its cache directory
      on the host (CVE-2024-9675): enough `..` mounts the host's root. Mount options with a `..`
      path component, or an id with a `/`, are refused.
    - `ADD URL` (or `git@...`, or a `$` that could expand to one): buildah fetches it in its own
      process, on the builder host's network (its loopback services, a cloud's metadata
      address), which RUN steps never get.
    Checked conservatively on the text (after joining continuation lines, ONBUILD included): a
    false refusal is better than a host. ONBUILD triggers of a base image are not seen here.
    """
    for instruction in _instructions(text):
        keyword, _, args = instruction.strip().partition(" ")
        keyword = keyword.lower()
        if keyword == "onbuild":
            keyword, _, args = args.strip().partition(" ")
            keyword = keyword.lower()
        if keyword == "run":
            problem = _mount_problem(args)
            if problem:
                return problem
        elif keyword == "add":
            for source in _add_sources(args):
                lowered = source.lower()
                if "://" in lowered or lowered.startswith("git@") or "$" in source:
                    return (
                        f"ADD of a URL ({source[:100]}) is not allowed on this builder: "
                        "COPY the file from the context, or fetch it in a RUN step"
                    )
    return None


_VAR_RE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
MAX_BASE_IMAGES = 32


def _expand(word: str, values: dict[str, str]) -> str | None:
    """`$VAR` and `${VAR}` replaced from `values`; None when anything else with a `$` is left
    (an unknown variable, `${VAR:-default}`): the caller refuses what it cannot resolve."""
    expanded = _VAR_RE.sub(lambda m: values.get(m.group(1) or m.group(2), "$?"), word)
    return None if "$" in expanded else expanded


def base_images(
    text: str, build_args: dict[str, str]
) -> tuple[list[tuple[str, str | None]], str | None]:
    """The images a build pulls: every `FROM` that is no earlier stage and not `scratch`, and
    every `COPY --from=` naming an image, as (reference, platform or None), with the ARGs
    declared before the first FROM (and the build's arguments) substituted. Returns (images,
    problem): a reference that stays unresolved is a problem (the builder refuses the build),
    since what it would pull is checked before the build (`host.py`)."""
    values: dict[str, str] = {}
    stages: set[str] = set()
    found: list[tuple[str, str | None]] = []
    seen_from = False
    for instruction in _instructions(text):
        keyword, _, args = instruction.strip().partition(" ")
        keyword = keyword.lower()
        words = args.split()
        if keyword == "arg" and not seen_from:
            for word in words:
                name, eq, default = word.partition("=")
                values[name] = build_args.get(name, default.strip('"') if eq else "")
        elif keyword == "from":
            seen_from = True
            platform = None
            while words and words[0].startswith("--"):
                flag = words.pop(0)
                if flag.lower().startswith("--platform="):
                    platform = _expand(flag.split("=", 1)[1], values)
                    if platform is None:
                        return [], f"FROM {flag}: the platform must not need a variable"
            if not words:
                return [], "a FROM without an image"
            image = _expand(words[0], values)
            if image is None:
                return [], f"FROM {words[0][:100]}: a variable the builder cannot resolve"
            if len(words) >= 3 and words[1].lower() == "as":
                stages.add(words[2].lower())
            if image.lower() not in stages and image.lower() != "scratch":
                found.append((image, platform))
        elif keyword == "copy":
            for word in words:
                if word.lower().startswith("--from="):
                    source = word.split("=", 1)[1]
                    if "$" in source:
                        return [], f"COPY {word[:100]}: a variable the builder cannot resolve"
                    if source.lower() not in stages and not source.isdigit():
                        found.append((source, None))
    unique = list(dict.fromkeys(found))
    if len(unique) > MAX_BASE_IMAGES:
        return [], f"more than {MAX_BASE_IMAGES} base images"
    return unique, None


def trigger_problem(triggers: object) -> str | None:
    """Why a base image's ONBUILD triggers (its config's `OnBuild`, as `buildah inspect` gives
    it) are refused: each trigger is checked as a Dockerfile line would be. A base image runs
    its triggers in the child's build, so an org's own image could carry what its Dockerfile may
    not (CVE-2024-1753 through `ONBUILD RUN --mount=...,from=`)."""
    if triggers is None:
        return None
    if not isinstance(triggers, list) or not all(isinstance(x, str) for x in triggers):
        return "its ONBUILD triggers cannot be read"
    for trigger in triggers:
        problem = dockerfile_problem(trigger)
        if problem:
            return f"its ONBUILD trigger is refused: {problem}"
    return None


def pull_command(
    settings: BuildahSettings, storage: Path, paths: BuildPaths, image: str, platform: str | None
) -> list[str]:
    """`buildah pull` of a base image into the org's storage, checked against the build's
    policy (registries only), always asking the registry for the tag's current manifest."""
    cmd = [
        *storage_args(settings, storage),
        "pull",
        "--policy",
        "always",
        "--authfile",
        str(paths.authfile),
        "--signature-policy",
        str(paths.policy),
    ]
    if platform:
        cmd += ["--platform", platform]
    return [*cmd, image]


def inspect_command(settings: BuildahSettings, storage: Path, image: str) -> list[str]:
    """`buildah inspect` of a pulled image (JSON; its Docker config holds the ONBUILD triggers,
    `onbuild_triggers`)."""
    return [*storage_args(settings, storage), "inspect", "--type", "image", image]


def onbuild_triggers(inspected: bytes) -> object:
    """The ONBUILD triggers in `buildah inspect`'s answer (None: none; "?" when unreadable)."""
    try:
        doc = json.loads(inspected)
        docker = doc.get("Docker") or {}
        return (docker.get("config") or {}).get("OnBuild")
    except (ValueError, AttributeError):
        return "?"


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
        "--signature-policy",
        str(paths.policy),
        # Only the base images `host.py` pulled and checked (their ONBUILD triggers) are used.
        "--pull=never",
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
        "--signature-policy",
        str(paths.policy),
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
