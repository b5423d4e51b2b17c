"""A directory beside a rootfs, watched with inotify: tests of code that works inside a rootfs
show that it never touches anything outside it.

`Sentinel(tmp)` makes `box/rootfs` and, beside it, `box/outside` (a file `secret`, a directory
`dir`); `watch()` starts watching. The kernel queues an event for every open, read, write,
attribute change, link, create or delete there as the call happens, so "no event" means
nothing outside was touched (no timing involved); owners, modes, link counts and contents are
compared before and after too. Layers, volumes and logs go to `spare`, which is not watched.
"""

from __future__ import annotations

import ctypes
import os
import stat
import struct
from pathlib import Path

SECRET = b"outsider:x:4242:4242::/:/bin/sh\n"

_IN_NONBLOCK = 0o4000
_IN_CLOEXEC = 0o2000000
_IN_ALL_EVENTS = 0xFFF
_EVENT = struct.Struct("iIII")
_libc = ctypes.CDLL(None, use_errno=True)

Snapshot = list[tuple[str, int, int, int, int, bytes | None]]


class Sentinel:
    """`box/outside` beside `box/rootfs`, watched with inotify from `watch` until `close`;
    layers, volumes and logs go to `spare`, which is not watched."""

    def __init__(self, tmp: Path) -> None:
        self.box = tmp / "box"
        self.spare = tmp / "spare"
        self.spare.mkdir()
        self.rootfs = self.box / "rootfs"
        self.outside = self.box / "outside"
        (self.outside / "dir").mkdir(parents=True)
        (self.outside / "secret").write_bytes(SECRET)
        self.rootfs.mkdir()
        self.before: Snapshot = []
        self._fd = -1
        self._names: dict[int, str] = {}

    def watch(self) -> None:
        """Start watching (after the test has built what it needs inside the rootfs)."""
        self.before = self._tree()
        self._fd = _libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        for path in (self.box, self.outside, self.outside / "dir", self.outside / "secret"):
            wd = _libc.inotify_add_watch(self._fd, os.fsencode(path), _IN_ALL_EVENTS)
            if wd < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")
            self._names[wd] = str(path)

    def _tree(self) -> Snapshot:
        found: Snapshot = []
        for path in sorted(self.box.rglob("*")):
            if path.is_relative_to(self.rootfs):
                continue
            st = path.lstat()
            data = path.read_bytes() if stat.S_ISREG(st.st_mode) else None
            found.append((str(path), st.st_mode, st.st_uid, st.st_gid, st.st_nlink, data))
        return found

    def events(self) -> list[str]:
        """Events queued so far, except the caller's own use of `rootfs` seen from `box`."""
        seen: list[str] = []
        while True:
            try:
                buf = os.read(self._fd, 65536)
            except BlockingIOError:
                return seen
            offset = 0
            while offset < len(buf):
                wd, mask, _, size = _EVENT.unpack_from(buf, offset)
                raw = buf[offset + _EVENT.size : offset + _EVENT.size + size]
                name = raw.rstrip(b"\0").decode(errors="replace")
                offset += _EVENT.size + size
                where = self._names.get(wd, "?")
                if where == str(self.box) and name == "rootfs":
                    continue
                seen.append(f"{where}/{name}: {mask:#x}")

    def assert_untouched(self) -> None:
        """Nothing outside the rootfs was opened, read, written, changed, created or removed."""
        assert self.events() == []
        assert self._tree() == self.before

    def inside(self, host_path: Path) -> Path:
        """Where the absolute `host_path` is inside the rootfs (the chroot rule)."""
        return self.rootfs.joinpath(*host_path.parts[1:])

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
