"""A machine's own root filesystem over the shared unpacked image tree.

Every start gets a fresh, writable rootfs (writes vanish on restart, as on Fly.io) without
touching the image's tree in the layer cache, which other machines share:

- `overlay` (root agents): an overlayfs mount (nosuid, nodev) at `<home>/rootfs` with the image
  tree as its read-only lower layer and a new, empty `<home>/overlay/upper` for this start's
  writes (`overlay/` is 0700: the upper layer holds whatever the machine wrote, setuid files
  included). It takes about a millisecond whatever the image size.
- `reflink` / `copy` (agents without the right to mount, or filesystems overlayfs refuses):
  `clone_rootfs` copies the tree.

A root agent calls `enter_private_mount_namespace()` once at start: its overlay mounts then live
in a mount namespace of its own, so they are never seen on the host and vanish with the agent
even when it is killed.

Host files. The agent's data dir is 0700 on the host, so no other host user reaches the cache,
the machines' upper layers or their logs. Yet a machine running as a non-root user U is started
by bwrap running as U (see runtime.py), and bwrap must find the rootfs by path as U: even
`--bind-fd` resolves the path again, and U has no right to search root's 0700 directories. So
`share_data_dir` covers the data dir, inside the agent's private mount namespace only, with a
0711 tmpfs holding bind mounts (nosuid, nodev) of its subdirectories: there U can traverse down
to `machines/<id>/rootfs` (machines/ and machines/<id> are 0711, nothing else is), while on the
host the real 0700 directory keeps everyone out. Host users cannot enter the agent's namespace
(/proc/<agent pid>/root needs ptrace rights over root). The data dir's ancestors must still be
o+x for non-root machines.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from pathlib import Path

from skyreg.machines.layercache import clone_rootfs, remove_tree
from skyreg.privatefs import private_dir

log = logging.getLogger("skyreg.rootfs")

_CLONE_NEWNS = 0x00020000
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_REMOUNT = 0x20
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_PRIVATE = 1 << 18
_MNT_DETACH = 2
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
# Characters overlayfs takes as separators in its mount options.
_UNSAFE_IN_OPTIONS = (",", ":", "\\", "=")
_private_namespace = False  # set once this process is in a mount namespace of its own


def enter_private_mount_namespace() -> bool:
    """Move this process into a new mount namespace whose mounts do not propagate to the host.

    Must run before the process starts any thread. Returns False (and changes nothing) when the
    process may not do that (not root, or namespaces disabled).
    """
    if os.geteuid() != 0:
        return False
    if _libc.unshare(_CLONE_NEWNS) != 0:
        log.info("no private mount namespace: %s", os.strerror(ctypes.get_errno()))
        return False
    if _libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
        raise OSError(ctypes.get_errno(), "cannot make / private in the new mount namespace")
    global _private_namespace
    _private_namespace = True
    return True


def share_data_dir(data_dir: Path, subdirs: tuple[str, ...]) -> bool:
    """Let machine users traverse `data_dir` (0700 on the host) in this agent's namespace only.

    Covers `data_dir` with a 0711 tmpfs holding nosuid,nodev bind mounts of the real `subdirs`
    (see the module docstring). Returns False, changing nothing, outside a private mount
    namespace: machines running as non-root users then cannot reach their rootfs.
    """
    if not _private_namespace:
        return False
    real = os.open(data_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _mount(b"tmpfs", data_dir, b"tmpfs", _MS_NOSUID | _MS_NODEV, b"mode=0711,size=64k")
        for name in subdirs:
            point = data_dir / name
            point.mkdir(mode=0o700)
            _mount(f"/proc/self/fd/{real}/{name}".encode(), point, None, _MS_BIND)
            flags = _MS_BIND | _MS_REMOUNT | _MS_NOSUID | _MS_NODEV
            _mount(b"none", point, None, flags)
    finally:
        os.close(real)
    return True


def _mount(
    source: bytes, target: Path, fstype: bytes | None, flags: int, data: bytes = b""
) -> None:
    if _libc.mount(source, bytes(target), fstype, flags, data or None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot mount on {target}: {os.strerror(err)}")


def fresh_rootfs(image_rootfs: Path, home: Path, *, allow_copy: bool = True) -> tuple[Path, str]:
    """A new writable rootfs for one start of the machine living in `home`.

    Whatever the previous start left (mount, upper layer, copy) is removed first. Returns the
    rootfs path (`<home>/rootfs`) and the method used: `overlay`, `reflink` or `copy`. Without
    `allow_copy` (a lazy mount as the lower layer: copying it would read the whole image through
    it) only the overlay is tried: OSError when it cannot be had.
    """
    release_rootfs(home)
    private_dir(home, mode=0o711)  # its user reaches rootfs/ through it; nothing else is open
    rootfs = home / "rootfs"
    if os.geteuid() == 0 and not any(
        c in str(p) for p in (image_rootfs, home) for c in _UNSAFE_IN_OPTIONS
    ):
        try:
            _mount_overlay(image_rootfs, home)
            return rootfs, "overlay"
        except OSError as e:
            release_rootfs(home)
            if not allow_copy:
                raise
            log.warning("overlay rootfs unavailable (%s); copying the image tree", e)
    if not allow_copy:
        raise OSError("an overlay rootfs needs root and paths overlayfs takes")
    return rootfs, clone_rootfs(image_rootfs, rootfs)


def release_rootfs(home: Path) -> None:
    """Unmount and remove a machine's rootfs and its upper layer (no error if there is none)."""
    rootfs = home / "rootfs"
    if os.path.ismount(rootfs) and _libc.umount2(bytes(rootfs), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot unmount {rootfs}: {os.strerror(err)}")
    for name in ("rootfs", "overlay", "upper", "work"):  # upper, work: older agents' layout
        path = home / name
        if path.exists() or path.is_symlink():
            remove_tree(path)


def _mount_overlay(lower: Path, home: Path) -> None:
    layers = private_dir(home / "overlay")
    upper, work, rootfs = layers / "upper", layers / "work", home / "rootfs"
    for d in (upper, work, rootfs):
        private_dir(d)
    # The merged root directory takes its owner and mode from the upper layer's root.
    st = lower.stat()
    os.chown(upper, st.st_uid, st.st_gid)
    upper.chmod(st.st_mode & 0o7777)
    options = f"lowerdir={lower},upperdir={upper},workdir={work}".encode()
    # nosuid,nodev: no setuid bit or device counts through this mount (bwrap's binds of it
    # inherit that; inside a machine bwrap's no_new_privs ignores setuid bits anyway).
    flags = _MS_NOSUID | _MS_NODEV
    if _libc.mount(b"overlay", bytes(rootfs), b"overlay", flags, options) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
