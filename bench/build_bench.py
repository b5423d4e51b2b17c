#!/usr/bin/env python3
"""What a Dockerfile deploy costs: `skyreg deploy PATH` (remote build on a `skyreg builder`)
side by side with its anchors, on one machine, in one run.

A real `skyreg serve` (127.0.0.1, auth on), a real `skyreg builder` (buildah, vfs, RUN steps
under runc, `--network none`) and a real `skyreg agent` (machines in bubblewrap), as
tests/builds/test_deploy_build.py starts them. The base image (static busybox, from
tests/support/images.py) is pushed into the registry first; the project is

    FROM HOST/base:v1
    COPY www /www                 # 4 files, ~4 MiB, half random bytes, half text
    RUN echo built-by-run > /www/run.txt && ls -l /www > /www/listing.txt
    CMD ["/bin/busybox", "sleep", "3600"]

Figures (each command timed as a whole, subprocess wall clock; runs alternate A1 B1 A2 B2 ...):

1. warm deploy: `skyreg deploy PATH --app web` of the unchanged project (every step cached, the
   context already in the registry, the same image digest) against `skyreg deploy --app web
   --image web@<that digest>`; both wait until the new machine started. Goal <= 1.5x.
2. cold build + push: `skyreg deploy PATH --app cold --build-only --push` of a fresh project
   (new file contents each run: COPY and RUN run, their layers are pushed) against the same
   build by hand: `buildah bud --layers --isolation oci --runtime runc --storage-driver vfs
   --network none` + `skopeo copy containers-storage:... docker://HOST/cold:TAG` (the issue's
   anchor), in a storage that, like the builder's, already holds the base (one untimed warm-up
   run on each side). Goal <= 1.1x.
3. the same with the `app` project (`--only cold-app`): 48 files of 512 KiB, and a RUN that
   gzips each of them at level 9 and checksums them all, so the steps do real work and the
   context is 24 MiB.

For the skyreg runs, where the time goes is taken from the build record (created_at,
started_at = claimed, finished_at = reported; microseconds, same clock) and from when each line
of the command's output arrived. Ratio = skyreg / anchor: lower is better. The table goes to
stdout (Markdown), progress and per-run values to stderr. Exit 0 when every run succeeded.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import json
import os
import platform
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for tests/

from skyreg.client.push import push_image
from tests.support.agents import RunningAgent
from tests.support.builders import RunningBuilder
from tests.support.images import build_image, write_oci_layout
from tests.support.platform import Tenancy
from tests.support.servers import RunningRegistry

ORG = "bench"
COMMAND_TIMEOUT = 300.0


@dataclass(frozen=True)
class Project:
    """What a benchmarked project holds: `files` files of `file_size` bytes under www/, and a
    Dockerfile (`{base}` is the base image)."""

    name: str
    files: int
    file_size: int
    dockerfile: str


SMALL = Project(
    "small",
    4,
    1 << 20,
    "FROM {base}\n"
    "COPY www /www\n"
    "RUN echo built-by-run > /www/run.txt && ls -l /www > /www/listing.txt\n"
    'CMD ["/bin/busybox", "sleep", "3600"]\n',
)
# A web app's static site: 24 MiB of assets, pre-compressed and checksummed in a RUN step.
APP = Project(
    "app",
    48,
    512 << 10,
    "FROM {base}\n"
    "COPY www /www\n"
    "RUN cd /www && for f in *.bin; do /bin/busybox gzip -9 -c $f > $f.gz; done"
    " && /bin/busybox sha256sum * > SHA256SUMS\n"
    'CMD ["/bin/busybox", "sleep", "3600"]\n',
)
WORDS = b"alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron".split()


def log(message: str) -> None:
    print(f"[build-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def skyreg_binary() -> list[str]:
    """The `skyreg` command (the venv's entry point next to this interpreter, else -m)."""
    script = Path(sys.executable).with_name("skyreg")
    return [str(script)] if script.exists() else [sys.executable, "-m", "skyreg"]


def file_content(rng: random.Random, size: int) -> bytes:
    """About half random bytes, half text, in 64 KiB pieces: gzip does real work."""
    out = bytearray()
    while len(out) < size:
        if rng.random() < 0.5:
            out += rng.randbytes(65536)
        else:
            line = b" ".join(rng.choice(WORDS) for _ in range(12))
            out += (line + b" %d\n" % rng.randrange(10**9)) * (65536 // (len(line) + 12))
    return bytes(out[:size])


def write_project(root: Path, base: str, seed: int, project: Project = SMALL) -> Path:
    """A project directory: the Dockerfile and www/ with the project's files, whose bytes
    depend on seed."""
    if root.exists():
        shutil.rmtree(root)
    (root / "www").mkdir(parents=True)
    (root / "Dockerfile").write_text(project.dockerfile.format(base=base))
    rng = random.Random(seed)
    for i in range(project.files):
        (root / "www" / f"part{i}.bin").write_bytes(file_content(rng, project.file_size))
    (root / "www" / "index.html").write_text(f"<h1>build bench {seed}</h1>\n")
    return root


# ----------------------------------------------------------------------------- timed commands


@dataclass
class Timed:
    """One command: its wall time, exit code, and each output line with when it arrived
    (seconds after the start; stdout and stderr merged)."""

    seconds: float
    code: int
    lines: list[tuple[float, str]]
    started_wall: float  # time.time() at the start, to compare with the server's timestamps

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def first(self, prefix: str) -> float | None:
        """When the first line starting with prefix (after stripping) arrived."""
        for at, line in self.lines:
            if line.strip().startswith(prefix):
                return at
        return None


def run_timed(cmd: list[str], env: dict[str, str], timeout: float = COMMAND_TIMEOUT) -> Timed:
    """Run cmd, timing it as a whole and stamping each output line as it arrives."""
    lines: list[tuple[float, str]] = []
    started_wall = time.time()
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    assert proc.stdout is not None

    def read() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            lines.append((time.monotonic() - started, raw.decode(errors="replace").rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        code = -9
    seconds = time.monotonic() - started
    reader.join(timeout=10)
    return Timed(seconds, code, lines, started_wall)


def wall(iso: str | None) -> float | None:
    """A server timestamp (RFC 3339, microseconds) as time.time() seconds."""
    if not iso:
        return None
    return datetime.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


# ----------------------------------------------------------------------------- the platform


@dataclass
class Platform:
    """Server, builder, agent and the bench's org, apps and token."""

    top: Path
    reg: RunningRegistry
    builder: RunningBuilder
    agent: RunningAgent
    admin: str
    token: str  # an org token of ORG
    base: str  # HOST/base:v1
    env: dict[str, str] = field(default_factory=dict)

    def api(self, path: str) -> Any:
        r = requests.get(f"{self.reg.url}/api/v1{path}", auth=("x", self.admin), timeout=30)
        r.raise_for_status()
        return r.json()

    def latest_build(self, app: str) -> dict[str, Any]:
        return dict(self.api(f"/apps/{app}/builds")["builds"][0])

    def skyreg(self, *args: str) -> Timed:
        return run_timed([*skyreg_binary(), *args], self.env)

    def diagnostics(self) -> str:
        return f"--- builder log:\n{self.builder.log(3000)}\n--- agent log:\n{self.agent.log(3000)}"


@contextlib.contextmanager
def started_platform(parent: str | None) -> Iterator[Platform]:
    top = Path(tempfile.mkdtemp(prefix="skyreg-build-bench-", dir=parent))
    top.chmod(0o711)  # machines running as another user must reach their rootfs
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, top, ignore_errors=True)
        (top / "data").mkdir()
        reg = RunningRegistry(top / "data")
        stack.callback(reg.stop)
        reg.start()
        t = Tenancy(reg.data_dir)
        t.org(ORG)
        for app in ("web", "base", "cold"):
            t.app(app, ORG)
        admin = t.admin_secret()
        token, _ = t.token("org", org=ORG)
        layout = write_oci_layout(top / "base-layout", [("v1", build_image("base"))])
        push_image(layout, f"{reg.host}/base:v1", admin)
        builder = RunningBuilder(reg.url, admin, top / "builder", top / "builder.log")
        stack.callback(builder.stop)
        builder.start()
        agent = RunningAgent(reg.url, admin, top / "agent", top / "agent.log")
        stack.callback(agent.stop)
        agent.start()
        home = top / "home"
        home.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SKYREG_")}
        env.update(
            HOME=str(home),
            XDG_CONFIG_HOME=str(home / "xdg"),
            SKYREG_SERVER=reg.url,
            SKYREG_TOKEN=token,
            COLUMNS="250",
            NO_COLOR="1",
        )
        p = Platform(top, reg, builder, agent, admin, token, f"{reg.host}/base:v1", env)
        deadline = time.monotonic() + 60
        while True:
            r = requests.get(f"{reg.url}/api/v1/apps/web/builder", auth=("x", token), timeout=10)
            if r.status_code == 200:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the builder did not register\n" + p.diagnostics())
            time.sleep(0.2)
        yield p


# ----------------------------------------------------------------------------- the anchor


@dataclass
class HandBuild:
    """`buildah bud` + `skopeo copy` by hand, with the builder's settings."""

    storage: Path
    authfile: Path
    registry_host: str

    def global_args(self) -> list[str]:
        return [
            "buildah",
            "--root",
            str(self.storage / "root"),
            "--runroot",
            str(self.storage / "run"),
            "--storage-driver",
            "vfs",
        ]

    def bud(self, project: Path) -> list[str]:
        return [
            *self.global_args(),
            "bud",
            "--layers",
            "--isolation",
            "oci",
            "--runtime",
            "runc",
            "--network",
            "none",
            "--tls-verify=false",
            "--authfile",
            str(self.authfile),
            "--file",
            str(project / "Dockerfile"),
            "--tag",
            "localhost/bench/cold:latest",
            str(project),
        ]

    def push(self, tag: str, digestfile: Path) -> list[str]:
        """`skopeo copy` out of the same storage, as the issue's anchor says."""
        store = f"[vfs@{self.storage / 'root'}+{self.storage / 'run'}]"
        return [
            "skopeo",
            "copy",
            "--dest-tls-verify=false",
            "--authfile",
            str(self.authfile),
            "--digestfile",
            str(digestfile),
            f"containers-storage:{store}localhost/bench/cold:latest",
            f"docker://{self.registry_host}/cold:{tag}",
        ]


def hand_build(p: Platform) -> HandBuild:
    """The by-hand side's storage and credentials: one for every figure, as the builder keeps
    one storage per org."""
    storage = p.top / "anchor-storage"
    authfile = p.top / "anchor-auth.json"
    if storage.exists():
        return HandBuild(storage, authfile, p.reg.host)
    storage.mkdir(mode=0o700)
    auth = base64.b64encode(f"x:{p.admin}".encode()).decode()
    fd = os.open(authfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"auths": {p.reg.host: {"auth": auth}}}, f)
    return HandBuild(storage, authfile, p.reg.host)


# ----------------------------------------------------------------------------- measurements


class BenchFailed(Exception):
    """A command failed: the bench reports it and exits non-zero."""


def check(timed: Timed, what: str, p: Platform) -> Timed:
    if timed.code != 0:
        raise BenchFailed(f"{what} exited {timed.code}:\n{timed.text()[-3000:]}\n{p.diagnostics()}")
    return timed


def image_of(timed: Timed, app: str) -> str:
    """The digest a deploy printed (`Release vN of APP: APP@sha256:... (sha256:...)`) or
    `--build-only` printed (`APP@sha256:...`)."""
    for _, line in reversed(timed.lines):
        line = line.strip()
        if line.startswith(f"{app}@sha256:"):
            return line.split("@", 1)[1]
        if line.startswith("Release v") and "(sha256:" in line:
            return "sha256:" + line.split("(sha256:", 1)[1].split(")", 1)[0]
    raise BenchFailed(f"no image digest in the output of the {app} command:\n{timed.text()}")


@dataclass
class Phases:
    """Where one skyreg build's time went (seconds from the command's start, or durations)."""

    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, value: float | None) -> None:
        if value is not None:
            self.values.setdefault(name, []).append(value)

    def median(self, name: str) -> float | None:
        got = self.values.get(name)
        return statistics.median(got) if got else None


def record_phases(phases: Phases, timed: Timed, build: dict[str, Any]) -> None:
    """Split a skyreg build run into phases (server timestamps + when output lines arrived)."""
    t0 = timed.started_wall
    created, started, finished = (
        wall(build["created_at"]),
        wall(build["started_at"]),
        wall(build["finished_at"]),
    )
    sending = timed.first("==> Sending build context")
    phases.add("command start -> context packed", sending)
    for _, line in timed.lines:
        if line.strip().startswith("sent in "):  # the CLI's own clock: packing + sending
            phases.add("context packed + sent (the CLI's `sent in`)", float(line.split()[2][:-1]))
            break
    if created is not None:
        phases.add("command start -> build queued", created - t0)
    if created is not None and started is not None:
        phases.add("queued -> claimed by the builder", started - created)
    if started is not None and finished is not None:
        phases.add("claimed -> reported (fetch, unpack, bud, push)", finished - started)
    steps = build.get("steps") or []
    if len(steps) > 1:  # the last step's clock runs until the report: leave it out
        phases.add("buildah steps 1..n-1 (builder's clock)", sum(s["seconds"] for s in steps[:-1]))
    pushing, pushed = timed.first("[skyreg] pushing"), timed.first("[skyreg] pushed")
    if pushing is not None and pushed is not None:
        phases.add("push (output lines, +-0.5 s)", pushed - pushing)
    built = timed.first("==> Built")
    if finished is not None and built is not None:
        phases.add("reported -> client saw the end", t0 + built - finished)
    release = timed.first("Release v")
    if release is not None:
        phases.add("release recorded -> machines started (exit)", timed.seconds - release)
    if built is not None:
        phases.add("client saw the end -> exit", timed.seconds - built)


@dataclass
class Figure:
    name: str
    skyreg: list[float] = field(default_factory=list)
    anchor: list[float] = field(default_factory=list)
    goal: float = 1.0
    anchor_name: str = ""

    def ratio(self) -> float:
        return statistics.median(self.skyreg) / statistics.median(self.anchor)


def warm_deploy(p: Platform, runs: int, phases: Phases) -> Figure:
    """Figure 1: redeploy of an unchanged project vs deploy --image of the same digest."""
    project = write_project(p.top / "site", p.base, seed=1)
    log("warm deploy: first deploy of the project (untimed: fills the cache, starts a machine)")
    first = check(p.skyreg("deploy", str(project), "--app", "web"), "the first deploy", p)
    digest = image_of(first, "web")
    context = p.latest_build("web")["context_digest"]
    log(f"  {first.seconds:.2f} s, web@{digest[:19]}...")
    fig = Figure("warm deploy (unchanged project) + machine started", goal=1.5)
    fig.anchor_name = f"deploy --image web@{digest[:13]}..."
    for i in range(runs):
        built = check(p.skyreg("deploy", str(project), "--app", "web"), "deploy PATH", p)
        build = p.latest_build("web")
        if image_of(built, "web") != digest or build["context_digest"] != context:
            raise BenchFailed(f"the unchanged project gave another image or context:\n{build}")
        if not all(s["cached"] for s in build["steps"][1:]):
            raise BenchFailed(f"a step of the unchanged project ran again: {build['steps']}")
        if "sent in" not in built.text():
            raise BenchFailed(f"deploy PATH printed no `sent in` line:\n{built.text()}")
        record_phases(phases, built, build)
        fig.skyreg.append(built.seconds)
        by_image = check(
            p.skyreg("deploy", "--app", "web", "--image", f"web@{digest}"), "deploy --image", p
        )
        fig.anchor.append(by_image.seconds)
        log(f"  run {i + 1}: deploy PATH {built.seconds:.2f} s, --image {by_image.seconds:.2f} s")
        phases.add("anchor: release recorded -> machines started (exit)",
                   by_image.seconds - (by_image.first("Release v") or 0.0))  # fmt: skip
    return fig


def cold_build(
    p: Platform, runs: int, phases: Phases, anchor_phases: Phases, project: Project = SMALL
) -> Figure:
    """Figures 2 and 3: build + push of a fresh project, skyreg's builder vs buildah by hand."""
    hand = hand_build(p)
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(p.top / "anchor-home"),
        "TMPDIR": str(p.top / "anchor-tmp"),
        "LANG": "C.UTF-8",
    }
    for d in ("anchor-home", "anchor-tmp"):
        (p.top / d).mkdir(mode=0o700, exist_ok=True)
    site = p.top / "site"
    if site.exists() and not (p.top / "anchor-storage" / "has-site").exists():
        # The builder's storage holds the warm figure's images too (one storage per org), and
        # buildah's commits slow down as a storage fills: give the by-hand storage the same.
        check(run_timed(hand.bud(site), env), "buildah bud of the warm project", p)
        (p.top / "anchor-storage" / "has-site").touch()
    size = project.files * project.file_size >> 20
    what = "COPY + RUN" if project is SMALL else "COPY + RUN gzip -9 of every file"
    fig = Figure(f"cold build + push ({project.name} project, {size} MiB, {what})", goal=1.1)
    fig.anchor_name = "buildah bud + skopeo copy"
    for i in range(runs + 1):  # run 0 is the warm-up: the base in both storages and the repo
        seed = 1000 + 2 * i
        directory = write_project(p.top / f"cold-{i}", p.base, seed, project)
        built = check(
            p.skyreg("deploy", str(directory), "--app", "cold", "--build-only", "--push"),
            "deploy --build-only --push",
            p,
        )
        build = p.latest_build("cold")
        if any(s["cached"] for s in build["steps"][1:]):
            raise BenchFailed(f"a step of a fresh project came from the cache: {build['steps']}")
        mine = write_project(p.top / f"hand-{i}", p.base, seed + 1, project)
        bud = check(run_timed(hand.bud(mine), env), "buildah bud", p)
        push = check(run_timed(hand.push(f"hand-{i}", p.top / "digest"), env), "skopeo copy", p)
        hand_seconds = bud.seconds + push.seconds
        shutil.rmtree(directory)
        shutil.rmtree(mine)
        label = "warm-up" if i == 0 else f"run {i}"
        log(
            f"  {label}: skyreg {built.seconds:.2f} s, buildah bud {bud.seconds:.2f} s + "
            f"skopeo copy {push.seconds:.2f} s = {hand_seconds:.2f} s"
        )
        if i == 0:
            continue
        record_phases(phases, built, build)
        startup = run_timed([sys.executable, "-c", "import skyreg.cli.main"], p.env)
        phases.add("of row 1: interpreter + `import skyreg.cli.main`", startup.seconds)
        anchor_phases.add("buildah bud", bud.seconds)
        steps = [at for at, line in bud.lines if line.startswith("STEP ")]
        if len(steps) > 1:
            anchor_phases.add("of which: start -> STEP 1", steps[0])
            anchor_phases.add(
                "of which: steps 1..n-1 (compare the builder's above)", steps[-1] - steps[0]
            )
            anchor_phases.add(
                "of which: STEP n -> exit (last step, commit)", bud.seconds - steps[-1]
            )
        anchor_phases.add("skopeo copy", push.seconds)
        fig.skyreg.append(built.seconds)
        fig.anchor.append(hand_seconds)
    return fig


# ----------------------------------------------------------------------------- report


def fmt(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{os.cpu_count()} cores, {mem:.1f} GiB RAM, Linux {platform.release()}, "
        f"load average at the end {load}"
    )


def version(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "?"


def report(figures: list[Figure], phases: dict[str, Phases], runs: int) -> str:
    out = [
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; machine: {machine()}",
        f"- command: `{shlex.join(['python', 'bench/build_bench.py', *sys.argv[1:]])}`",
        f"- {version(['buildah', '--version'])}; runtime runc; storage driver vfs",
        f"- median of {runs} alternating runs; ratio = skyreg / anchor, **lower is better**",
        "",
        "| figure | skyreg | anchor | anchor is | ratio | goal |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for f in figures:
        ratio = f.ratio()
        verdict = "met" if ratio <= f.goal else f"missed by {ratio / f.goal - 1:.0%}"
        out.append(
            f"| {f.name} | {fmt(statistics.median(f.skyreg))} | "
            f"{fmt(statistics.median(f.anchor))} | {f.anchor_name} | {ratio:.2f} | "
            f"≤ {f.goal:.1f} ({verdict}) |"
        )
    for title, ph in phases.items():
        out += ["", f"{title} (medians):", "", "| phase | seconds |", "|---|---:|"]
        for name in ph.values:
            out.append(f"| {name} | {fmt(ph.median(name))} |")
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="timed runs per figure (default 5)")
    ap.add_argument("--tmp-dir", default=None, help="parent of the temporary directory")
    ap.add_argument("--only", choices=("warm", "cold", "cold-app"), help="measure one figure alone")
    args = ap.parse_args()
    if not 1 <= args.runs <= 50:
        ap.error("--runs is 1 to 50")
    if os.geteuid() != 0:
        print("the builder runs buildah as root: run the bench as root", file=sys.stderr)
        return 2
    for binary in ("buildah", "runc", "bwrap"):
        if shutil.which(binary) is None:
            print(f"{binary} is not installed", file=sys.stderr)
            return 2
    started = time.monotonic()
    figures: list[Figure] = []
    phases: dict[str, Phases] = {}
    try:
        with started_platform(args.tmp_dir) as p:
            log(f"server {p.reg.url}, builder and agent up, work dir {p.top}")
            if args.only in (None, "warm"):
                warm = Phases()
                figures.append(warm_deploy(p, args.runs, warm))
                phases["Warm deploy, skyreg deploy PATH"] = warm
            if args.only in (None, "cold"):
                cold, hand = Phases(), Phases()
                figures.append(cold_build(p, args.runs, cold, hand))
                phases["Cold build + push, skyreg deploy PATH --build-only --push"] = cold
                phases["Cold build + push, by hand"] = hand
            if args.only in (None, "cold-app"):
                cold, hand = Phases(), Phases()
                figures.append(cold_build(p, args.runs, cold, hand, APP))
                phases["Cold build + push of the app project, skyreg deploy PATH"] = cold
                phases["Cold build + push of the app project, by hand"] = hand
    except BenchFailed as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    log(f"done in {time.monotonic() - started:.0f} s")
    print(report(figures, phases, args.runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
