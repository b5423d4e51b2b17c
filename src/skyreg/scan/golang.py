"""Go modules from the build information the Go linker embeds in executables.

Only the inline format of Go >= 1.18 is read: a 32-byte header that starts with
`\\xff Go buildinf:` and has bit 2 of its flags byte set, followed by two varint-prefixed strings,
the Go version and the module information. Older binaries (pointer format, Go < 1.18) are
skipped: reading them needs the ELF section table and pointer chasing through the whole file.

`BuildInfoScanner` is fed a binary's bytes as they stream by, in chunks of any size; it keeps a
tail of the previous chunk (so a magic split across chunks is found) and, once the magic is
seen, at most `max_info` bytes after it. Nothing else of the binary is kept.
"""

from __future__ import annotations

import re

from packageurl import PackageURL

from skyreg.scan.model import GOLANG, Package

MAGIC = b"\xff Go buildinf:"
_HEADER = 32
_FLAG_INLINE = 0x2
_INFO_START = bytes.fromhex("3077af0c9274080241e1c107e6d618e6")
_INFO_END = bytes.fromhex("f932433186182072008242104116d8f2")
_MAX_VERSION = 256
# `-X anything.version=1.2.3` in -ldflags: syft's guess of the main module's version.
_LDFLAGS_VERSION = re.compile(r"-X\s+\S*?[./_-]?[vV]ersion=['\"]?v?([0-9][0-9A-Za-z.+~-]*)")
_SEMVER = re.compile(r"^v[0-9]+\.[0-9]+\.[0-9]+")


class BuildInfoScanner:
    """Find the Go build information in a binary fed chunk by chunk (see the module doc)."""

    def __init__(self, max_info: int) -> None:
        self._max_info = max_info
        self._tail = b""
        self._offset = 0  # position in the binary of the first byte of `_tail`
        self._found: bytearray | None = None
        self.done = False  # nothing more to learn from this binary

    def feed(self, chunk: bytes) -> None:
        """Look at the next bytes of the binary."""
        if self.done:
            return
        if self._found is not None:
            room = _HEADER + 2 * 10 + _MAX_VERSION + self._max_info - len(self._found)
            self._found += chunk[: max(room, 0)]
            if self._complete():
                self.done = True
            return
        data = self._tail + chunk
        at = data.find(MAGIC)
        while at >= 0 and (self._offset + at) % 16:  # the header is 16-byte aligned
            at = data.find(MAGIC, at + 1)
        if at < 0:
            keep = min(len(data), len(MAGIC) - 1)
            self._offset += len(data) - keep
            self._tail = data[len(data) - keep :]
            return
        self._found = bytearray(data[at:])
        self._tail = b""
        self.done = self._complete()

    def _complete(self) -> bool:
        """Whether enough bytes after the magic are held to decode both strings."""
        found = self._found
        if found is None or len(found) < _HEADER:
            return False
        if not found[len(MAGIC) + 1] & _FLAG_INLINE:
            return True  # pointer format: not read
        pos = _HEADER
        for _ in range(2):
            decoded = _uvarint(found, pos)
            if decoded is None:
                return len(found) >= _HEADER + 20
            size, pos = decoded
            pos += size
        return len(found) >= pos or len(found) >= _HEADER + 20 + _MAX_VERSION + self._max_info

    def result(self) -> tuple[str, str] | None:
        """(Go version, module information) when the binary held readable build info."""
        found = self._found
        if found is None or len(found) < _HEADER or not found[len(MAGIC) + 1] & _FLAG_INLINE:
            return None
        pos = _HEADER
        strings: list[bytes] = []
        for limit in (_MAX_VERSION, self._max_info):
            decoded = _uvarint(found, pos)
            if decoded is None:
                return None
            size, pos = decoded
            if size > limit or pos + size > len(found):
                return None
            strings.append(bytes(found[pos : pos + size]))
            pos += size
        version = strings[0].decode("utf-8", "replace")
        if not version.startswith("go"):
            return None
        return version, _strip_sentinels(strings[1]).decode("utf-8", "replace")


def _uvarint(buf: bytearray, pos: int) -> tuple[int, int] | None:
    """Decode an unsigned varint at `pos`: (value, position after it); None if cut or too big."""
    value = shift = 0
    for i in range(pos, min(pos + 10, len(buf))):
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i + 1
        shift += 7
    return None


def _strip_sentinels(raw: bytes) -> bytes:
    """The module information without the 16-byte markers the linker puts around it."""
    ends = raw.endswith(_INFO_END) or raw[-17:-16] == b"\n"
    if len(raw) >= 33 and raw.startswith(_INFO_START) and ends:
        return raw[16:-16]
    return raw


def go_packages(go_version: str, modinfo: str, *, layer: str, path: str) -> list[Package]:
    """The modules syft reports for one binary: the main module, each dependency (replaced
    ones under the replacement's path and version, as syft does) and `stdlib` at the Go version
    (`go1.22.5`, purl version `1.22.5`)."""
    main: tuple[str, str] | None = None
    built_from = ""  # the `path` line: the main package's import path
    deps: list[list[str]] = []
    ldflags = ""
    vcs_revision = vcs_time = ""
    for line in modinfo.split("\n"):
        fields = line.split("\t")
        kind = fields[0]
        if kind == "path" and len(fields) >= 2:
            built_from = fields[1]
        elif kind == "mod" and len(fields) >= 3:
            main = (fields[1], fields[2])
        elif kind == "dep" and len(fields) >= 3:
            deps.append([fields[1], fields[2]])
        elif kind == "=>" and len(fields) >= 3 and deps:
            deps[-1] = [fields[1], fields[2]]
        elif kind == "build" and len(fields) >= 2:
            key, _, value = fields[1].partition("=")
            if key == "-ldflags":
                ldflags = value
            elif key == "vcs.revision":
                vcs_revision = value
            elif key == "vcs.time":
                vcs_time = value
    found: list[Package] = []

    def add(name: str, version: str, purl_version: str) -> None:
        if not name or not version:
            return
        purl = golang_purl(name, purl_version)
        found.append(
            Package(name=name, version=version, type=GOLANG, purl=purl, layer=layer, path=path)
        )

    if main is None and "." in built_from.split("/", 1)[0]:
        # Built outside module mode (Debian builds Go packages so): no `mod` line, the main
        # package's path names it; syft reports it too, versioned from -ldflags when it can.
        main = (built_from, "(devel)")
    if main is not None:
        version = _main_version(main[1], ldflags, vcs_revision, vcs_time)
        if version:
            add(main[0], version, version)
    for name, version in deps:
        add(name, version, version)
    add("stdlib", go_version, go_version.removeprefix("go").split(" ", 1)[0])
    return found


def golang_purl(module: str, version: str) -> str:
    """syft's purl for a module: the first two path components are the namespace, the third
    the name, the rest a subpath (`github.com/a/b/v3` -> `pkg:golang/github.com/a/b@V#v3`)."""
    fields = module.split("/")
    namespace: str | None = None
    subpath: str | None = None
    if len(fields) == 1:
        name = fields[0]
    elif len(fields) == 2:
        namespace, name = fields
    else:
        namespace, name = "/".join(fields[:2]), fields[2]
        subpath = "/".join(fields[3:]) or None
    return PackageURL(GOLANG, namespace, name, version or None, None, subpath).to_string()


def _main_version(version: str, ldflags: str, revision: str, when: str) -> str:
    """The main module's version: as built, else from -ldflags, else a pseudo-version from
    the VCS settings (what syft 1.x does); "" when nothing says it (syft then writes "(devel)")."""
    if version and version != "(devel)":
        return version
    if m := _LDFLAGS_VERSION.search(ldflags):
        candidate = "v" + m.group(1)
        if _SEMVER.match(candidate):
            return candidate
    if revision and when:
        stamp = re.sub(r"[^0-9]", "", when)[:14]
        if len(stamp) == 14:
            return f"v0.0.0-{stamp}-{revision[:12]}"
    return version
