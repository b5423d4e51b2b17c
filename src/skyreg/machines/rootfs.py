"""A machine's own root filesystem over the shared unpacked image tree.

Every start gets a fresh, writable rootfs (writes vanish on restart, as on Fly.io) without
touching the image's tree in the layer cache, which other machines share:

- `overlay` (root agents): an overlayfs mount at `<home>/rootfs` with the image tree as its
  read-only lower layer and a new, empty `<home>/upper` for this start's writes. It takes about
  a millisecond whatever the image size.
- `reflink` / `copy` (agents without the right to mount, or filesystems overlayfs refuses):
  `clone_rootfs` copies the tree.

A root agent calls `enter_private_mount_namespace()` once at start: its overlay mounts then live
in a mount namespace of its own, so they are never seen on the host and vanish with the agent
even when it is killed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from pathlib import Path

from skyreg.machines.layercache import clone_rootfs, remove_tree

log = logging.getLogger("skyreg.rootfs")

_CLONE_NEWNS = 0x00020000
_MS_REC = 0x4000
_MS_PRIVATE = 1 << 18
_MNT_DETACH = 2
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
# Characters overlayfs takes as separators in its mount options.
_UNSAFE_IN_OPTIONS = (",", ":", "\\", "=")


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
    return True


def fresh_rootfs(image_rootfs: Path, home: Path) -> tuple[Path, str]:
    """A new writable rootfs for one start of the machine living in `home`.

    Whatever the previous start left (mount, upper layer, copy) is removed first. Returns the
    rootfs path (`<home>/rootfs`) and the method used: `overlay`, `reflink` or `copy`.
    """
    release_rootfs(home)
    home.mkdir(parents=True, exist_ok=True)
    rootfs = home / "rootfs"
    if os.geteuid() == 0 and not any(
        c in str(p) for p in (image_rootfs, home) for c in _UNSAFE_IN_OPTIONS
    ):
        try:
            _mount_overlay(image_rootfs, home)
            return rootfs, "overlay"
        except OSError as e:
            log.warning("overlay rootfs unavailable (%s); copying the image tree", e)
            release_rootfs(home)
    return rootfs, clone_rootfs(image_rootfs, rootfs)


def release_rootfs(home: Path) -> None:
    """Unmount and remove a machine's rootfs and its upper layer (no error if there is none)."""
    rootfs = home / "rootfs"
    if os.path.ismount(rootfs) and _libc.umount2(bytes(rootfs), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot unmount {rootfs}: {os.strerror(err)}")
    for name in ("rootfs", "upper", "work"):
        path = home / name
        if path.exists() or path.is_symlink():
            remove_tree(path)


def _mount_overlay(lower: Path, home: Path) -> None:
    upper, work, rootfs = home / "upper", home / "work", home / "rootfs"
    for d in (upper, work, rootfs):
        d.mkdir(mode=0o700)
    # The merged root directory takes its owner and mode from the upper layer's root.
    st = lower.stat()
    os.chown(upper, st.st_uid, st.st_gid)
    upper.chmod(st.st_mode & 0o7777)
    options = f"lowerdir={lower},upperdir={upper},workdir={work}".encode()
    if _libc.mount(b"overlay", bytes(rootfs), b"overlay", 0, options) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
