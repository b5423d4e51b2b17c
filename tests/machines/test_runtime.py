"""Running a machine from an unpacked rootfs with bubblewrap (`skyreg.machines.runtime`)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from skyreg.machines.runtime import (
    ImageConfig,
    MachineError,
    RunningMachine,
    resolve_user,
    start_machine,
)
from skyreg.machines.unpack import unpack_layers
from tests.support.images import FIXED_MTIME, build_image
from tests.support.oci import OCI_LAYER
from tests.support.waiting import free_port

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bwrap is not installed")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")

APPLETS = ("id", "hostname", "head", "sleep", "httpd", "touch", "pwd", "wget")
PASSWD = b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:App:/home/app:/bin/sh\n"
GROUP = b"root:x:0:\napp:x:1000:\nstaff:x:1001:app\n"
INDEX = b"<h1>hello from a machine</h1>\n"


def config(**conf: object) -> ImageConfig:
    return ImageConfig.from_json(json.dumps({"architecture": "amd64", "config": conf}).encode())


# --------------------------------------------------------------------------- ImageConfig


def test_argv_is_entrypoint_then_cmd() -> None:
    c = config(Entrypoint=["/bin/app", "--serve"], Cmd=["--port", "80"])
    assert c.argv() == ["/bin/app", "--serve", "--port", "80"]


def test_argv_without_entrypoint_is_cmd() -> None:
    assert config(Cmd=["/bin/sh", "-c", "true"]).argv() == ["/bin/sh", "-c", "true"]


def test_runtime_command_replaces_cmd_only() -> None:
    c = config(Entrypoint=["/bin/app"], Cmd=["default"])
    assert c.argv(["other", "arg"]) == ["/bin/app", "other", "arg"]
    assert config(Cmd=["default"]).argv(["/bin/echo", "hi"]) == ["/bin/echo", "hi"]


def test_runtime_entrypoint_drops_image_cmd() -> None:
    c = config(Entrypoint=["/bin/app"], Cmd=["default"])
    assert c.argv(entrypoint=["/bin/other"]) == ["/bin/other"]
    assert c.argv(["x"], entrypoint=["/bin/other"]) == ["/bin/other", "x"]


def test_empty_argv_is_a_clear_error() -> None:
    with pytest.raises(MachineError, match="no Entrypoint or Cmd"):
        config(Entrypoint=None, Cmd=[]).argv()
    with pytest.raises(MachineError, match="no Entrypoint or Cmd"):
        ImageConfig.from_json(b'{"config": null}').argv()


def test_string_entrypoint_is_one_argument() -> None:
    assert config(Entrypoint="/bin/app").argv() == ["/bin/app"]


def test_bad_config_is_rejected() -> None:
    with pytest.raises(MachineError):
        ImageConfig.from_json(b"not json")
    with pytest.raises(MachineError):
        config(Cmd=[1, 2])


def test_env_merges_with_runtime_winning() -> None:
    c = config(Env=["PATH=/app/bin", "A=image", "B=image=with=equals", "NOVALUE"])
    assert c.env == {"PATH": "/app/bin", "A": "image", "B": "image=with=equals"}
    env = c.merged_env({"A": "runtime", "C": "new"}, defaults={"HOME": "/root", "A": "default"})
    assert env == {
        "PATH": "/app/bin",
        "HOME": "/root",
        "A": "runtime",
        "B": "image=with=equals",
        "C": "new",
    }
    assert config().merged_env()["PATH"].endswith(":/bin")
    with pytest.raises(MachineError):
        c.merged_env({"BAD=NAME": "x"})


def test_workdir_defaults_to_root() -> None:
    assert config().workdir == "/"
    assert config(WorkingDir="/srv/app").workdir == "/srv/app"
    assert config(WorkingDir="srv").workdir == "/srv"


# --------------------------------------------------------------------------- resolve_user


@pytest.fixture
def fake_rootfs(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_bytes(
        b"root:x:0:0:root:/root:/bin/sh\n"
        b"# a comment\n"
        b"broken line\n"
        b"web:x:33:33:www:/var/www:/bin/false\n"
        b"app:x:1000:1000::/home/app:/bin/sh\n"
    )
    (root / "etc/group").write_bytes(b"root:x:0:\nwww:x:33:\napp:x:1000:\nstaff:x:50:app\n")
    return root


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        ("", (0, 0)),
        ("root", (0, 0)),
        ("web", (33, 33)),
        ("1000", (1000, 1000)),
        ("4242", (4242, 0)),  # a uid not in /etc/passwd: gid 0, as in Docker
        ("app:staff", (1000, 50)),
        ("app:77", (1000, 77)),
        ("1000:33", (1000, 33)),
        ("0:www", (0, 33)),
    ],
)
def test_resolve_user(fake_rootfs: Path, user: str, expected: tuple[int, int]) -> None:
    assert resolve_user(fake_rootfs, user) == expected


@pytest.mark.parametrize("user", ["nobody-here", "app:nogroup", "app:", ":1000", "-1"])
def test_unknown_or_bad_users_are_clear_errors(fake_rootfs: Path, user: str) -> None:
    with pytest.raises(MachineError, match=r"unknown|invalid"):
        resolve_user(fake_rootfs, user)


def test_resolve_user_never_reads_the_host(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").symlink_to("/etc/../../../etc/real-passwd")
    (root / "etc/real-passwd").write_bytes(b"inside:x:7:8::/:/bin/sh\n")
    assert resolve_user(root, "inside") == (7, 8)
    with pytest.raises(MachineError, match="unknown user"):
        resolve_user(root, "root")  # the host's /etc/passwd has root; this rootfs does not
    (root / "etc/passwd").unlink()
    (root / "etc/passwd").symlink_to("/proc/self/root/etc/passwd")
    assert resolve_user(root, "") == (0, 0)  # missing inside: defaults, never the host's file
    with pytest.raises(MachineError, match="unknown user"):
        resolve_user(root, "root")


# --------------------------------------------------------------------------- running machines


def _extra_layer() -> bytes:
    """Applet symlinks, users, a home owned by uid 1000 and a web root, as a plain tar."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:

        def add(
            name: str, kind: bytes, data: bytes = b"", *, uid: int = 0, mode: int = 0o755
        ) -> None:
            info = tarfile.TarInfo(name)
            info.mtime, info.uid, info.gid, info.mode = FIXED_MTIME, uid, uid, mode
            info.type = kind
            if kind == tarfile.SYMTYPE:
                info.linkname = "busybox"
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        for applet in APPLETS:
            add(f"bin/{applet}", tarfile.SYMTYPE)
        add("etc/passwd", tarfile.REGTYPE, PASSWD, mode=0o644)
        add("etc/group", tarfile.REGTYPE, GROUP, mode=0o644)
        add("home", tarfile.DIRTYPE)
        add("home/app", tarfile.DIRTYPE, uid=1000)
        add("www", tarfile.DIRTYPE)
        add("www/index.html", tarfile.REGTYPE, INDEX, mode=0o644)
    return buf.getvalue()


@pytest.fixture(scope="module")
def layer_files() -> Iterator[list[tuple[Path, str]]]:
    directory = Path(tempfile.mkdtemp(prefix="skyreg-runtime-layers-"))
    try:
        image = build_image("runtime")
        files = []
        for i, blob in enumerate([*(layer.gz for layer in image.layers), _extra_layer()]):
            path = directory / f"layer{i}"
            path.write_bytes(blob)
            files.append((path, OCI_LAYER if blob[:2] == b"\x1f\x8b" else "application/x-tar"))
        yield files
    finally:
        shutil.rmtree(directory)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A scratch directory every uid can traverse (0711): machines may run as uid 1000."""
    directory = Path(tempfile.mkdtemp(prefix="skyreg-runtime-"))
    directory.chmod(0o711)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def make_rootfs(workdir: Path, layer_files: list[tuple[Path, str]]) -> Callable[[], Path]:
    """A fresh rootfs per call, unpacked from the test image plus the extra layer."""
    count = 0

    def make() -> Path:
        nonlocal count
        count += 1
        rootfs = workdir / f"rootfs{count}"
        unpack_layers(layer_files, rootfs)
        return rootfs

    return make


Run = Callable[..., RunningMachine]


@pytest.fixture
def run(workdir: Path, make_rootfs: Callable[[], Path]) -> Iterator[Run]:
    """Start a machine on a fresh rootfs; every machine is stopped at teardown, pass or fail."""
    machines: list[RunningMachine] = []

    def start(conf: ImageConfig, **kwargs: object) -> RunningMachine:
        kwargs.setdefault("rootfs", make_rootfs())
        kwargs.setdefault("log_path", workdir / f"machine{len(machines)}.log")
        kwargs.setdefault("hostname", "testmachine")
        machine = start_machine(config=conf, **kwargs)  # type: ignore[arg-type]
        machines.append(machine)
        return machine

    try:
        yield start
    finally:
        for machine in machines:
            machine.stop(grace=1.0)


def finish(machine: RunningMachine, log_path: Path, timeout: float = 30.0) -> list[str]:
    code = machine.wait(timeout)
    assert code == 0, log_path.read_text()
    return log_path.read_text().splitlines()


def group_members(pgid: int) -> list[int]:
    """Host pids whose process group is `pgid`."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[2]) == pgid:
                members.append(int(entry.name))
    return members


def wait_until(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


IDENTITY_SCRIPT = (
    "echo $$; echo $GREETING; pwd; id -u; hostname; ls /proc | head -3; echo end; id -G; echo $HOME"
)


@pytest.mark.slow
@needs_bwrap
def test_machine_runs_as_pid_1_with_env_workdir_and_hostname(run: Run, workdir: Path) -> None:
    conf = config(Cmd=["/bin/sh", "-c", IDENTITY_SCRIPT], Env=["GREETING=image"], WorkingDir="/www")
    log = workdir / "identity.log"
    machine = run(conf, log_path=log, env={"GREETING": "hello"}, hostname="m-identity")
    lines = finish(machine, log)
    assert lines[:5] == ["1", "hello", "/www", "0", "m-identity"]
    proc_lines = lines[5 : lines.index("end")]
    assert proc_lines[0] == "1"  # a fresh /proc of its own PID namespace
    assert lines[-1] == "/root"


@needs_bwrap
def test_machine_env_never_appears_on_a_host_command_line(run: Run, workdir: Path) -> None:
    """Other host users read every /proc/<pid>/cmdline: the environment (secrets, later) must not
    be there, so bwrap gets its arguments through a file descriptor (SECURITY.md)."""
    secret = "probe-" + os.urandom(8).hex()
    conf = config(Cmd=["/bin/sh", "-c", "echo started; sleep 30"], Env=[f"IMAGE_SECRET={secret}"])
    log = workdir / "env.log"
    machine = run(conf, log_path=log, env={"RUNTIME_SECRET": secret + "x"})
    assert wait_until(lambda: "started" in log.read_text())
    seen = []
    for pid in [machine._proc.pid, *group_members(machine._proc.pid)]:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            seen.append(Path(f"/proc/{pid}/cmdline").read_bytes())
    assert seen and any(b"bwrap" in c for c in seen)
    assert not any(secret.encode() in c for c in seen), seen


@pytest.mark.slow
@needs_bwrap
@needs_root
def test_machine_runs_as_the_images_user(
    run: Run, workdir: Path, make_rootfs: Callable[[], Path]
) -> None:
    rootfs = make_rootfs()
    staff_only = rootfs / "srv/staff"  # only group staff (1001, app is a member) may write
    staff_only.mkdir(parents=True)
    os.chown(staff_only, 0, 1001)
    staff_only.chmod(0o770)
    script = (
        f"{IDENTITY_SCRIPT}; touch /home/app/mine /srv/staff/ours;"
        " touch /etc/not-mine || echo denied"
    )
    conf = config(Cmd=["/bin/sh", "-c", script], User="app", WorkingDir="/home/app")
    log = workdir / "user.log"
    lines = finish(run(conf, rootfs=rootfs, log_path=log), log)
    assert lines[0] == "1"
    assert lines[2:4] == ["/home/app", "1000"]
    # Only the user's own gid is mapped in the user namespace: supplementary groups show as
    # nobody (65534) inside, yet the host checks them (the write to /srv/staff below works).
    assert sorted(lines[lines.index("end") + 1].split()) == ["1000", "65534"]
    assert lines[lines.index("end") + 2] == "/home/app"
    assert lines[-1] == "denied"
    mine = (rootfs / "home/app/mine").stat()
    assert (mine.st_uid, mine.st_gid) == (1000, 1000)  # the same uid on the host
    assert (staff_only / "ours").stat().st_uid == 1000
    assert not (rootfs / "etc/not-mine").exists()


@pytest.mark.slow
@needs_bwrap
def test_writes_stay_in_the_machines_rootfs(
    run: Run, workdir: Path, make_rootfs: Callable[[], Path]
) -> None:
    before = sorted(os.listdir("/etc"))
    assert not Path("/etc/hostile-marker").exists()
    rootfs = make_rootfs()
    script = "echo pwned > /etc/hostile-marker && cat /etc/hostile-marker"
    log = workdir / "write.log"
    assert finish(run(config(Cmd=["/bin/sh", "-c", script]), rootfs=rootfs, log_path=log), log) == [
        "pwned"
    ]
    assert (rootfs / "etc/hostile-marker").read_text() == "pwned\n"
    assert not Path("/etc/hostile-marker").exists()
    assert sorted(os.listdir("/etc")) == before


@pytest.mark.slow
@needs_bwrap
def test_volume_persists_across_machines(run: Run, workdir: Path) -> None:
    volume = workdir / "volume"
    volume.mkdir()
    write = config(Cmd=["/bin/sh", "-c", "echo kept > /data/file"])
    log1, log2 = workdir / "v1.log", workdir / "v2.log"
    finish(run(write, volume=(volume, "/data"), log_path=log1), log1)
    assert (volume / "file").read_text() == "kept\n"
    read = config(Cmd=["/bin/sh", "-c", "cat /data/file"])
    assert finish(run(read, volume=(volume, "/data"), log_path=log2), log2) == ["kept"]


@pytest.mark.slow
@needs_bwrap
def test_http_server_serves_then_stops_cleanly(run: Run, workdir: Path) -> None:
    port = free_port()
    conf = config(
        Entrypoint=["/bin/sh", "-c", "exec httpd -f -p 127.0.0.1:$PORT -h /www"], Cmd=None
    )
    log = workdir / "httpd.log"
    machine = run(conf, env={"PORT": str(port)}, log_path=log)
    url = f"http://127.0.0.1:{port}/"

    def serves() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.read() == INDEX)
        except (urllib.error.URLError, ConnectionError):
            return False

    assert wait_until(serves, timeout=20), log.read_text()
    # httpd is PID 1 and alone, once the child it forked for our request has exited
    assert wait_until(lambda: group_members(machine.pid) == [machine.pid], timeout=5)
    machine.stop(grace=3.0)
    assert not machine.running
    assert machine.wait(0) is not None
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), 2):
        pass
    assert not Path(f"/proc/{machine.pid}").exists()
    assert not Path(f"/proc/{machine.bwrap_pid}").exists()
    assert wait_until(lambda: group_members(machine.pid) == [], timeout=5)
    assert machine.stop() == machine.returncode  # idempotent


@pytest.mark.slow
@needs_bwrap
def test_sigterm_reaches_a_pid_1_that_handles_it(run: Run, workdir: Path) -> None:
    script = "trap 'echo got TERM; exit 3' TERM; echo ready; sleep 1000 & wait"
    log = workdir / "term.log"
    machine = run(config(Cmd=["/bin/sh", "-c", script]), log_path=log)
    assert wait_until(lambda: "ready" in log.read_text())
    started = time.monotonic()
    assert machine.stop(grace=20.0) == 3
    assert time.monotonic() - started < 10
    assert "got TERM" in log.read_text()
    assert wait_until(lambda: group_members(machine.pid) == [], timeout=5)


@pytest.mark.slow
@needs_bwrap
def test_stop_escalates_to_sigkill(run: Run, workdir: Path) -> None:
    log = workdir / "stubborn.log"
    script = "trap '' TERM; sleep 1000; echo not reached"  # sleep inherits the ignored TERM
    machine = run(config(Cmd=["/bin/sh", "-c", script]), log_path=log)
    assert wait_until(lambda: len(group_members(machine.pid)) == 2)  # sh (PID 1) and sleep
    started = time.monotonic()
    code = machine.stop(grace=1.0)
    elapsed = time.monotonic() - started
    assert code == 128 + signal.SIGKILL
    assert 1.0 <= elapsed < 6.0
    assert wait_until(lambda: group_members(machine.pid) == [], timeout=5)


@pytest.mark.slow
@needs_bwrap
def test_exit_code_is_reported(run: Run, workdir: Path) -> None:
    machine = run(config(Cmd=["/bin/sh", "-c", "exit 7"]))
    assert machine.wait(30) == 7
    assert not machine.running
    assert machine.stop() == 7


@pytest.mark.slow
@needs_bwrap
def test_bare_command_is_found_on_the_images_path(run: Run, workdir: Path) -> None:
    log = workdir / "path.log"
    machine = run(config(Cmd=["sh", "-c", "echo found"], Env=["PATH=/bin"]), log_path=log)
    assert finish(machine, log) == ["found"]


@pytest.mark.slow
@needs_bwrap
def test_missing_command_fails_with_a_message_in_the_log(run: Run, workdir: Path) -> None:
    log = workdir / "missing.log"
    machine = run(config(Cmd=["/bin/no-such-program"]), log_path=log)
    assert machine.wait(30) not in (None, 0)
    assert "no-such-program" in log.read_text()


@pytest.mark.slow
@needs_bwrap
@needs_root
def test_root_machine_has_dockers_capabilities_minus_mknod_and_net_raw(
    run: Run, workdir: Path
) -> None:
    log = workdir / "caps.log"
    script = "while read k v; do [ $k = CapEff: ] && echo $v; done < /proc/self/status; true"
    lines = finish(run(config(Cmd=["/bin/sh", "-c", script]), log_path=log), log)
    expected = sum(1 << bit for bit in (0, 1, 3, 4, 5, 6, 7, 8, 10, 18, 29, 31))
    assert int(lines[0], 16) == expected  # no CAP_MKNOD (27), CAP_NET_RAW (13), CAP_SYS_ADMIN
