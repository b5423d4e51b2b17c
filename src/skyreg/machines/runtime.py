"""Run a machine: an image's entrypoint, as PID 1, in bubblewrap namespaces over an unpacked rootfs.

`start_machine` spawns `bwrap` with the per-machine rootfs copy bound read-write at `/`, a fresh
`/proc`, a minimal `/dev`, a tmpfs `/tmp`, and new PID, mount, IPC, UTS and (where possible)
cgroup namespaces. `--as-pid-1` makes the image's entrypoint PID 1 of its PID namespace (no
reaper from bwrap), so it gets the job of reaping, and - like `docker stop` - SIGTERM reaches it
only when it installs a handler; SIGKILL always does.

The network namespace is the host's unless the caller hands `start_machine` an `enter`
prefix (`machines.network.enter_command`): bwrap then starts inside the machine's own network
namespace (`nsenter --net=...`), and the switch to the machine's user (below) is done by
`setpriv` in that prefix, after nsenter, rather than by Popen before it.

Users. The image's `User` is resolved in the rootfs's own `/etc/passwd` and `/etc/group`. A
machine running as root (the default) runs bwrap as host root ("privileged" mode: no user
namespace) with Docker's default capability set minus `CAP_MKNOD` (there is no device cgroup
to stop it from opening host disks) and `CAP_NET_RAW` (the network is the host's). Any other
user runs bwrap itself as that host uid/gid with the image's supplementary groups, so bwrap
sets up an unprivileged user namespace mapping the uid to itself: the machine's uid 1000 is
the host's uid 1000, files it creates belong to 1000, it has no capabilities, and it can write
only what that uid may write. (bwrap's own `--unshare-user --uid` would instead map the
sandbox uid onto host root and show every root-owned file as the user's.) The price: the
rootfs and volume directories must be reachable (`o+x` on their ancestors) by that uid in the
caller's mount namespace (the agent shows them through its own: see rootfs.py), and that needs
unprivileged user namespaces in the kernel. The log file is created 0600 (root's alone).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from skyreg.machines import rootpath
from skyreg.oci.bounded import load_json

BWRAP = "bwrap"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MAX_ID = 0xFFFFFFFE  # (uid_t)-1 means "no change" to the kernel
STARTUP_TIMEOUT = 30.0
_KILL_WAIT = 5.0  # after SIGKILL of PID 1, before bwrap itself is killed
# Docker's default capabilities minus CAP_MKNOD and CAP_NET_RAW (see the module docstring).
ROOT_CAPABILITIES = (
    "CAP_AUDIT_WRITE",
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_NET_BIND_SERVICE",
    "CAP_SETFCAP",
    "CAP_SETGID",
    "CAP_SETPCAP",
    "CAP_SETUID",
    "CAP_SYS_CHROOT",
)
_MAX_DB_SIZE = 4 << 20  # /etc/passwd or /etc/group larger than this is not read


UserIds = tuple[int, int, list[int]]
"""uid, gid and supplementary gids that bwrap runs as."""
EnterCommand = Callable[[UserIds | None], Sequence[str]]
"""The argv prefix that starts bwrap somewhere else (`network.enter_command`), given the user
to switch to after entering (None: stay root)."""


class MachineError(Exception):
    """A machine cannot be configured or started."""


# --------------------------------------------------------------------------- image config


def _str_list(value: object, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):  # old configs may hold a plain string
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise MachineError(f"image config: {what} must be a list of strings")


@dataclass(frozen=True, slots=True)
class ImageConfig:
    """What an image says about running it: the `config` object of an OCI/Docker image config."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    working_dir: str = ""
    user: str = ""

    @classmethod
    def from_json(cls, raw: bytes) -> ImageConfig:
        """Parse an image config blob; a missing or null `config` means all defaults."""
        try:
            doc = load_json(raw, max_bytes=len(raw))  # its size was bounded when it was read
        except ValueError as e:
            raise MachineError(f"image config is not JSON: {e}") from e
        if not isinstance(doc, dict):
            raise MachineError("image config is not a JSON object")
        conf = doc.get("config") or {}
        if not isinstance(conf, dict):
            raise MachineError("image config: config must be an object")
        env: dict[str, str] = {}
        for item in _str_list(conf.get("Env"), "Env"):
            name, sep, value = item.partition("=")
            if sep and name:  # "NAME" alone would take the value from the host: never
                env[name] = value
        working_dir, user = conf.get("WorkingDir") or "", conf.get("User") or ""
        if not isinstance(working_dir, str) or not isinstance(user, str):
            raise MachineError("image config: WorkingDir and User must be strings")
        return cls(
            entrypoint=tuple(_str_list(conf.get("Entrypoint"), "Entrypoint")),
            cmd=tuple(_str_list(conf.get("Cmd"), "Cmd")),
            env=env,
            working_dir=working_dir,
            user=user,
        )

    def argv(
        self, command: Sequence[str] | None = None, *, entrypoint: Sequence[str] | None = None
    ) -> list[str]:
        """Entrypoint + Cmd, Docker's way.

        A run-time `command` replaces Cmd; a run-time `entrypoint` replaces Entrypoint and drops
        the image's Cmd. Raises `MachineError` when nothing is left to run.
        """
        ep = list(self.entrypoint if entrypoint is None else entrypoint)
        if command is not None:
            cmd = list(command)
        else:
            cmd = [] if entrypoint is not None else list(self.cmd)
        argv = ep + cmd
        if not argv:
            raise MachineError("nothing to run: the image has no Entrypoint or Cmd")
        return argv

    def merged_env(
        self,
        overrides: Mapping[str, str] | None = None,
        *,
        defaults: Mapping[str, str] | None = None,
    ) -> dict[str, str]:
        """`defaults`, then the image's Env, then run-time `overrides` (PATH as Docker's)."""
        env = {"PATH": DEFAULT_PATH, **(defaults or {}), **self.env, **(overrides or {})}
        for name, value in env.items():
            if not name or "=" in name or "\0" in name or "\0" in value:
                raise MachineError(f"invalid environment variable: {name!r}")
        return env

    @property
    def workdir(self) -> str:
        """WorkingDir as an absolute path ("/" by default; relative ones are taken from /)."""
        return str(PurePosixPath("/", self.working_dir or "/"))


# --------------------------------------------------------------------------- rootfs files


@contextmanager
def _open_dir_in_rootfs(
    rootfs: Path, path: str, *, create: bool = False
) -> Iterator[rootpath.Location]:
    """The directory `path` leads to inside `rootfs` (its fd, and its real path there), resolved
    by `rootpath` as the machine will see it (`..` stops at the root, absolute symlink targets
    restart there); nothing outside the rootfs is ever opened. With `create`, missing
    directories are made (0755, owned by the agent). Raises `MachineError` for a path that
    cannot be resolved (and OSError for the rest).
    """
    root_fd = rootpath.open_root(rootfs)
    try:
        with rootpath.open_dir(root_fd, path, create=create) as loc:
            yield loc
    except rootpath.RootPathError as e:
        raise MachineError(f"{_shown(path)} in the rootfs: {e}") from e
    finally:
        os.close(root_fd)


def _shown(path: str, limit: int = 200) -> str:
    """`path` for a message: quoted, and cut short (a WorkingDir may be megabytes long)."""
    return repr(path) if len(path) <= limit else repr(path[:limit]) + "..."


def _read_rootfs_file(rootfs: Path, path: str) -> bytes | None:
    """A regular file inside `rootfs` (symlinks resolved inside it, the last one too), or None
    if it or a directory on its way is missing."""
    try:
        root_fd = rootpath.open_root(rootfs)
    except FileNotFoundError:
        return None
    try:
        with rootpath.resolve(root_fd, path, follow_last=True) as loc:
            if loc.name is None:
                raise MachineError(f"{path} in the rootfs is not a regular file")
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            fd = os.open(loc.name, flags, dir_fd=loc.dir_fd)
    except (rootpath.PathNotFound, rootpath.NotADirectory, FileNotFoundError, NotADirectoryError):
        return None
    except rootpath.RootPathError as e:
        raise MachineError(f"{_shown(path)} in the rootfs: {e}") from e
    except OSError as e:
        raise MachineError(f"cannot open {path} in the rootfs: {e.strerror}") from e
    finally:
        os.close(root_fd)
    try:  # checked before fdopen, which refuses a directory and would leak the fd
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        os.close(fd)
        raise
    if not regular:
        os.close(fd)
        raise MachineError(f"{path} in the rootfs is not a regular file")
    with os.fdopen(fd, "rb") as f:
        data = f.read(_MAX_DB_SIZE + 1)
    if len(data) > _MAX_DB_SIZE:
        raise MachineError(f"{path} in the rootfs is too large")
    return data


def _db(rootfs: Path, path: str) -> list[list[str]]:
    """The colon-separated records of /etc/passwd or /etc/group (missing file: none)."""
    raw = _read_rootfs_file(rootfs, path) or b""
    text = raw.decode("utf-8", errors="replace")
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


def _parse_id(text: str) -> int | None:
    if not text.isascii() or not text.isdigit():
        return None
    value = int(text)
    if value > MAX_ID:
        raise MachineError(f"id {text} is out of range")
    return value


def _passwd_entry(rootfs: Path, user: str) -> tuple[str, int, int, str] | None:
    """(name, uid, gid, home) of `user` (a name or a uid) in the rootfs's /etc/passwd."""
    wanted = _parse_id(user)
    for rec in _db(rootfs, "/etc/passwd"):
        if len(rec) < 4:
            continue
        uid, gid = _parse_id(rec[2]), _parse_id(rec[3])
        if uid is None or gid is None:
            continue
        if (wanted is None and rec[0] == user) or (wanted is not None and uid == wanted):
            return rec[0], uid, gid, rec[5] if len(rec) > 5 else ""
    return None


def resolve_user(rootfs: Path, user: str) -> tuple[int, int]:
    """(uid, gid) for an image's User: "name", "uid", "name:group" or "uid:gid"; "" is 0:0.

    Names are looked up in the rootfs's own /etc/passwd and /etc/group, never the host's. A
    numeric uid need not exist (its gid is then 0, as in Docker); an unknown name is an error.
    """
    return _resolve(rootfs, user)[:2]


def _resolve(rootfs: Path, user: str) -> tuple[int, int, list[int], str]:
    """(uid, gid, supplementary gids, home) for an image's User."""
    user_part, sep, group_part = user.partition(":")
    if not user_part and not sep:
        user_part = "0"
    if not user_part or (sep and not group_part):
        raise MachineError(f"invalid user {user!r}")
    entry = _passwd_entry(rootfs, user_part)
    if entry is None:
        uid = _parse_id(user_part)
        if uid is None:
            raise MachineError(f"unknown user {user_part!r}: not in the image's /etc/passwd")
        name, gid, home = "", 0, "/"
    else:
        name, uid, gid, home = entry
    groups = _db(rootfs, "/etc/group")
    if group_part:
        gid_opt = _parse_id(group_part)
        if gid_opt is None:
            found = [g for g in groups if len(g) >= 3 and g[0] == group_part]
            gid_opt = _parse_id(found[0][2]) if found else None
            if gid_opt is None:
                raise MachineError(f"unknown group {group_part!r}: not in the image's /etc/group")
        gid = gid_opt
    extra = {gid}
    if name:
        for rec in groups:
            if len(rec) >= 4 and name in rec[3].split(","):
                member_gid = _parse_id(rec[2])
                if member_gid is not None:
                    extra.add(member_gid)
    return uid, gid, sorted(extra), home or "/"


# --------------------------------------------------------------------------- running


class RunningMachine:
    """A started machine: its bwrap process and the image's entrypoint inside (PID 1 there)."""

    def __init__(self, proc: subprocess.Popen[bytes], pid: int, status_fd: int) -> None:
        self._proc = proc
        self._status_fd = status_fd  # read end of bwrap's --json-status-fd
        self.pid = pid
        """Host pid of the machine's PID 1; also its process group and session id."""
        # A pidfd pins PID 1: once it has exited, its pid (and group id) may be reused by an
        # unrelated process, which must never be signalled.
        self._pidfd: int | None
        try:
            self._pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._pidfd = None

    @property
    def bwrap_pid(self) -> int:
        """Host pid of the bwrap monitor process that owns the namespaces."""
        return self._proc.pid

    @property
    def running(self) -> bool:
        """True until the machine has exited and been reaped."""
        return self._proc.poll() is None

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait up to `timeout` seconds (None: forever); the exit status, or None if running."""
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self._close()
        return self.returncode

    @property
    def returncode(self) -> int | None:
        """Exit status of PID 1 (128 + signal number if killed), or None while running."""
        code = self._proc.returncode
        return code if code is None or code >= 0 else 128 - code

    def stop(self, grace: float = 10.0) -> int:
        """SIGTERM the machine's process group, SIGKILL after `grace` seconds; reap. Idempotent.

        As PID 1 of its namespace, the entrypoint sees SIGTERM only if it handles it; SIGKILL of
        PID 1 ends every process of the namespace (and bwrap exits with it). Returns the exit
        status.
        """
        if self.running:
            self._signal_group(signal.SIGTERM)
            if self.wait(grace) is None:
                self._signal_group(signal.SIGKILL)
                if self.wait(_KILL_WAIT) is None:
                    with suppress(ProcessLookupError):
                        self._proc.kill()  # bwrap: --die-with-parent takes PID 1 along
        self._proc.wait()
        self._close()
        code = self.returncode
        assert code is not None
        return code

    def _signal_group(self, sig: int) -> None:
        if self._pidfd is None or select.select([self._pidfd], [], [], 0)[0]:
            return  # PID 1 has exited (a pidfd turns readable): its ids may be reused
        with suppress(ProcessLookupError):
            os.killpg(self.pid, sig)

    def _close(self) -> None:
        for fd in (self._status_fd, self._pidfd):
            if fd is not None and fd >= 0:
                os.close(fd)
        self._status_fd, self._pidfd = -1, None

    def __enter__(self) -> RunningMachine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def bwrap_args(
    config: ImageConfig,
    *,
    argv: Sequence[str],
    env: Mapping[str, str],
    hostname: str,
    as_root: bool,
    volume: tuple[Path, str] | None,
    status_fd: int,
) -> list[str]:
    """The bwrap command line for a machine whose rootfs is passed as `--bind ROOTFS /` first."""
    args = [
        "--proc", "/proc",
        "--dev", "/dev",
        "--tmpfs", "/tmp",
        "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
        "--hostname", hostname,
        "--die-with-parent",
        "--new-session",
        "--as-pid-1",
        "--json-status-fd", str(status_fd),
        "--chdir", config.workdir,
    ]  # fmt: skip
    if volume is not None:
        args += ["--bind", str(volume[0]), volume[1]]
    if as_root:
        args += ["--cap-drop", "ALL"]
        for cap in ROOT_CAPABILITIES:
            args += ["--cap-add", cap]
    args.append("--clearenv")
    for name, value in env.items():
        args += ["--setenv", name, value]
    return [*args, "--", *argv]


def _args_file(args: Sequence[str]) -> int:
    """A sealed-to-us memory file holding `args` NUL-separated, positioned at its start."""
    fd = os.memfd_create("bwrap-args", os.MFD_CLOEXEC)
    try:
        data = b"".join(a.encode() + b"\0" for a in args)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def start_machine(
    rootfs: Path,
    config: ImageConfig,
    *,
    log_path: Path,
    volume: tuple[Path, str] | None = None,
    env: dict[str, str] | None = None,
    hostname: str,
    command: Sequence[str] | None = None,
    enter: EnterCommand | None = None,
) -> RunningMachine:
    """Start the image's entrypoint (or `command` in place of Cmd) over `rootfs`.

    `rootfs` is this machine's own copy (bound read-write at `/`); `volume` is (host dir, path
    inside), bound read-write; `env` overrides the image's Env. stdout and stderr (bwrap's own
    errors too) are appended to `log_path`. The network is the host's, or the one `enter`
    enters (see the module docstring).
    """
    argv = config.argv(command)
    uid, gid, groups, home = _resolve(rootfs, config.user)
    merged = config.merged_env(env, defaults={"HOSTNAME": hostname, "HOME": home})
    privileged = os.geteuid() == 0
    if uid != 0 and not privileged:
        raise MachineError("running a machine as another user needs a root agent")
    if volume is not None and not PurePosixPath(volume[1]).is_absolute():
        raise MachineError(f"volume path {volume[1]!r} must be absolute")
    # Mount points and the working directory must exist before an unprivileged bwrap needs
    # them (it could not create them in root-owned directories); made here as root, safely.
    real: dict[str, str] = {}  # each mount point as a path free of symlinks inside the rootfs
    for inside in ("/proc", "/dev", "/tmp", config.workdir, *([volume[1]] if volume else [])):
        try:
            with _open_dir_in_rootfs(rootfs, inside, create=True) as where:
                real[inside] = "/" + "/".join(where.parts)
        except MachineError as e:
            raise MachineError(f"cannot create {e}") from e
        except OSError as e:
            raise MachineError(f"cannot create {_shown(inside)} in the rootfs: {e}") from e
    if volume is not None:
        # bwrap makes a bind target's parents by path, following symlinks, while the host's
        # root is still reachable (/oldroot): hand it the resolved path, which has none.
        volume = (volume[0], real[volume[1]])

    # bwrap itself runs as the machine's user: see the module docstring. Through `enter`, the
    # switch is the prefix's job (nsenter needs root to join the namespace).
    user: UserIds | None = (uid, gid, groups) if privileged else None
    prefix: list[str] = []
    if enter is not None:
        prefix = list(enter(user))
        user = None
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    args_fd = -1
    try:
        args = ["--bind", str(rootfs), "/"]
        args += bwrap_args(
            config,
            argv=argv,
            env=merged,
            hostname=hostname,
            as_root=privileged and uid == 0,
            volume=volume,
            status_fd=write_fd,
        )
        # Every host user can read /proc/<pid>/cmdline: the environment (and all the rest) goes
        # to bwrap through a memory file instead (`--args FD`), never on its command line.
        # The command stays on the command line (bwrap wants it there, and the machine's own
        # PID 1 shows it anyway).
        split = args.index("--")
        args_fd = _args_file(args[:split])
        log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        with open(log_fd, "ab") as log:
            os.fchmod(log_fd, 0o600)  # whatever the umask, and an older log's looser mode
            proc = subprocess.Popen(
                [*prefix, _bwrap_path(prefix), "--args", str(args_fd), *args[split:]],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                pass_fds=(write_fd, args_fd),
                # bwrap runs as the machine's user, so a host user of that uid can read its
                # /proc/PID/environ: none of the agent's (its token) goes there. The machine's own
                # environment reaches it through the memory file (--clearenv, --setenv).
                env={},
                start_new_session=True,
                close_fds=True,
                user=user[0] if user else None,
                group=user[1] if user else None,
                extra_groups=user[2] if user else None,
            )
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
        if args_fd >= 0:
            os.close(args_fd)
    try:
        pid = _read_child_pid(read_fd, proc)
    except BaseException:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        os.close(read_fd)
        raise
    return RunningMachine(proc, pid, read_fd)


def _bwrap_path(prefix: Sequence[str]) -> str:
    """bwrap, found on the agent's PATH when a prefix will exec it (with an empty environment,
    where its own search would use a default PATH)."""
    return (shutil.which(BWRAP) or BWRAP) if prefix else BWRAP


def _read_child_pid(fd: int, proc: subprocess.Popen[bytes]) -> int:
    """The first bwrap status line names PID 1's host pid; bwrap exiting first is a failure."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise MachineError("bwrap did not start the machine in time")
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            code = proc.wait()
            raise MachineError(f"bwrap failed (exit status {code}); see the machine log")
        buf += chunk
    try:
        pid = json.loads(buf.split(b"\n", 1)[0])["child-pid"]
    except (ValueError, KeyError, TypeError) as e:
        raise MachineError(f"unexpected bwrap status: {buf[:200]!r}") from e
    if not isinstance(pid, int) or pid <= 1:
        raise MachineError(f"unexpected bwrap child pid: {pid!r}")
    return pid
