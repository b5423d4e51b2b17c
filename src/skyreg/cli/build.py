"""Building a directory with a Dockerfile for `skyreg deploy`: on a builder (remote, the
default) or on this machine (`--build-local`), then pushed to `APP:<label>`.

Remote: the context (`.dockerignore` honoured) is packed into a private temporary file, pushed
to the app as a blob (skipped when the registry has it: an unchanged project sends nothing),
build secrets are sealed to the chosen builder's key, the build is queued and its log followed
on stderr until it ends; Ctrl-C cancels it. Local: buildah (or podman, or docker) builds into an
OCI layout that skyreg's own client pushes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO, cast

import typer

from skyreg.cli.builds import follow_log
from skyreg.cli.client import ApiFailure, Client, fail
from skyreg.client.buildcontext import ContextError, pack_context
from skyreg.client.protocol import RegistryClientError
from skyreg.client.registry import RegistryClient
from skyreg.services.names import parse_duration
from skyreg.units import human_size

if TYPE_CHECKING:
    from skyreg.cli.push import RichProgress

MAX_CONTEXT = 2 << 30
MAX_SECRET_BYTES = 30 << 10


@dataclass
class BuildOptions:
    """What `skyreg deploy` says about the build."""

    path: Path
    dockerfile: Path | None = None
    build_args: dict[str, str] = field(default_factory=dict)
    secrets: dict[str, Path] = field(default_factory=dict)
    target: str | None = None
    platform: str | None = None
    no_cache: bool = False
    label: str | None = None
    timeout: int = 1800


@dataclass(frozen=True)
class Built:
    """A built and pushed image: `app@digest`, and the tag it got."""

    ref: str
    digest: str
    label: str


def parse_pairs(values: list[str] | None, what: str) -> dict[str, str]:
    """`K=V` options (`--build-arg`, `--build-secret`) as a dict; exits on a malformed one."""
    pairs: dict[str, str] = {}
    for value in values or []:
        key, sep, rest = value.partition("=")
        if not sep or not key:
            fail(f"{what} must be NAME=VALUE, not {value!r}")
        pairs[key] = rest
    return pairs


def parse_build_timeout(value: str) -> int:
    """`--build-timeout` in seconds (10 s to 2 h); exits on a malformed one."""
    try:
        seconds = parse_duration(value, "--build-timeout", "such as 90s, 30m or 1h")
    except ValueError as e:
        fail(str(e))
    if seconds is None or not 10 <= seconds <= 7200:
        fail("--build-timeout is 10s to 2h")
    return seconds


def has_dockerfile(path: Path, dockerfile: Path | None) -> bool:
    return (dockerfile or path / "Dockerfile").is_file()


class _HashingWriter:
    """Counts and hashes what the packer writes to the context file."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.out.write(data)

    def flush(self) -> None:
        self.out.flush()


def _secret_values(secrets: dict[str, Path]) -> dict[str, bytes]:
    values = {}
    for sid, path in secrets.items():
        try:
            data = path.read_bytes()
        except OSError as e:
            fail(f"--build-secret {sid}: cannot read {path}: {e.strerror}")
        if len(data) > MAX_SECRET_BYTES:
            fail(f"--build-secret {sid}: {path} is larger than {human_size(MAX_SECRET_BYTES)}")
        values[sid] = data
    return values


def remote_build(api: Client, app: str, options: BuildOptions) -> Built:
    """Pack, send, build on a builder and follow the log; exits non-zero when the build fails."""
    secrets = _secret_values(options.secrets)
    host = urllib.parse.urlsplit(api.server).netloc
    with tempfile.TemporaryDirectory(prefix="skyreg-context-") as tmp, _bars() as bars:
        archive = Path(tmp) / "context.tar.gz"
        started = time.monotonic()
        packing = bars.add("packing context", None, "") if bars else -1
        done = [0]

        def packed_so_far(total: int) -> None:
            if bars:
                bars.advance(packing, total - done[0])
            done[0] = total

        fd = os.open(archive, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            writer = _HashingWriter(f)
            try:
                packed = pack_context(
                    options.path,
                    options.dockerfile,
                    cast(BinaryIO, writer),
                    limit=MAX_CONTEXT,
                    progress=packed_so_far,
                )
            except ContextError as e:
                fail(str(e))
        digest = "sha256:" + writer.sha.hexdigest()
        if bars:
            bars.done(packing, "packed", packed.size)
        else:
            typer.echo(
                f"==> Sending build context: {packed.files} files, {human_size(packed.size)} "
                f"({human_size(writer.size)} compressed)",
                err=True,
            )
        sending = bars.add("sending context", writer.size, "") if bars else -1

        def read_from(offset: int) -> Iterator[bytes]:
            for chunk in _read_from(archive, offset):
                if bars:
                    bars.advance(sending, len(chunk))
                yield chunk

        registry = RegistryClient(api.server, app, api.token)
        try:
            registry.login()
            registry.push_blob_chunked(read_from, writer.size, digest)
        except RegistryClientError as e:
            fail(f"sending the build context failed: {e}")
        finally:
            registry.close()
        if bars:
            bars.done(sending, "sent")
    summary = "" if bars is None else f"{packed.files} files, {human_size(packed.size)}, "
    typer.echo(f"    {summary}sent in {time.monotonic() - started:.1f}s", err=True)
    body: dict[str, Any] = {
        "context_digest": digest,
        "dockerfile": packed.dockerfile,
        "build_args": options.build_args,
        "no_cache": options.no_cache,
        "timeout": options.timeout,
    }
    for key, value in (("target", options.target), ("platform", options.platform),
                       ("image_label", options.label)):  # fmt: skip
        if value:
            body[key] = value
    if secrets:
        # Imported here: libsodium is loaded only for builds that have secrets to seal.
        from skyreg.client.sealing import SealError, seal

        chosen = api("GET", f"/apps/{_q(app)}/builder")
        try:
            body["secrets"] = {sid: seal(chosen["public_key"], v) for sid, v in secrets.items()}
        except SealError as e:
            fail(str(e))
        body["builder_id"] = chosen["id"]
    build = api("POST", f"/apps/{_q(app)}/builds", body)
    typer.echo(
        f"==> Building {app} on builder {build['builder']} ({build['region']}): "
        f"build {build['id']}",
        err=True,
    )
    try:
        follow_log(api, build["id"], err=True)
        final = api("GET", f"/builds/{_q(build['id'])}")
    except KeyboardInterrupt:
        with contextlib.suppress(ApiFailure):
            api.call("POST", f"/builds/{build['id']}/cancel")
        fail(f"build {build['id']} cancelled", code=130)
    if final["status"] != "succeeded":
        fail(f"build {build['id']} {final['status']}: {final.get('error') or 'no reason given'}")
    digest = str(final["image_digest"])
    typer.echo(f"==> Built {host}/{app}:{final['image_label']} ({digest})", err=True)
    return Built(f"{app}@{digest}", digest, str(final["image_label"]))


@contextlib.contextmanager
def _bars() -> Iterator[RichProgress | None]:
    """Progress bars on stderr when it is a terminal, else None (plain lines instead)."""
    if not sys.stderr.isatty():
        yield None
        return
    from skyreg.cli.push import RichProgress

    with RichProgress() as bars:
        yield bars


def _q(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def _read_from(path: Path, offset: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        f.seek(offset)
        while chunk := f.read(1 << 20):
            yield chunk


# -- building on this machine --------------------------------------------------------------------


def local_engine() -> str | None:
    """The first of buildah, podman, docker installed here."""
    for engine in ("buildah", "podman", "docker"):
        if shutil.which(engine):
            return engine
    return None


def local_build(options: BuildOptions, layout: Path) -> None:
    """Build with this machine's engine into the OCI layout `layout` (tag `latest`)."""
    engine = local_engine()
    if engine is None:
        fail("--build-local needs buildah, podman or docker on this machine")
    dockerfile = options.dockerfile or options.path / "Dockerfile"
    tag = "localhost/skyreg-local-build:latest"
    cmd = [engine, "build" if engine != "buildah" else "bud", "-f", str(dockerfile), "-t", tag]
    for key, value in sorted(options.build_args.items()):
        cmd += ["--build-arg", f"{key}={value}"]
    for sid, path in sorted(options.secrets.items()):
        cmd += ["--secret", f"id={sid},src={path}"]
    if options.target:
        cmd += ["--target", options.target]
    if options.platform:
        cmd += ["--platform", options.platform]
    if options.no_cache:
        cmd.append("--no-cache")
    if engine == "buildah":
        cmd += ["--layers"]
    cmd.append(str(options.path))
    typer.echo(f"==> Building locally with {engine}", err=True)
    if _echo_run(cmd) != 0:
        fail(f"the local build failed ({engine})")
    if engine == "docker":
        target = ["docker", "save", "-o", str(layout), tag]
    else:
        target = [engine, "push", tag, f"oci:{layout}:latest"]
    if _echo_run(target) != 0:
        fail(f"exporting the locally built image failed ({engine})")


def _echo_run(cmd: list[str]) -> int:
    """Run `cmd`, its output echoed to stderr line by line; its exit code."""
    with subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    ) as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            typer.echo(raw.decode("utf-8", "replace").rstrip("\n"), err=True)
        return proc.wait()
