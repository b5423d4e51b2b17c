"""Package catalogers: each parser takes the bytes of one file and returns what it lists.

Parsers return `Package`s with an empty `purl` (a distro package's purl names the image's OS
release, only known once every layer is read); `with_purls` fills them in, the way syft writes
them. Every parser takes hostile bytes: invalid UTF-8 is replaced, records without a name or a
version are skipped, JSON is bounded in size and depth, and nothing loops on its input's
structure. RPM databases: `rpmdb.py`; Go binaries: `golang.py`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

import msgspec
from packageurl import PackageURL

from skyreg.oci.bounded import JSONInputError, load_json
from skyreg.scan.model import APK, DEB, GOLANG, NPM, PYPI, RPM, OsRelease, Package

OS_RELEASE_PATHS = ("etc/os-release", "usr/lib/os-release")
DPKG_STATUS = "var/lib/dpkg/status"
DPKG_STATUS_D = "var/lib/dpkg/status.d"
APK_INSTALLED = "lib/apk/db/installed"
RPMDB_PATHS = ("var/lib/rpm/rpmdb.sqlite", "usr/lib/sysimage/rpm/rpmdb.sqlite")
_MAX_JSON_DEPTH = 64
_MAX_FIELD = 64 * 1024  # longer field values are cut (a name or version is never this long)
_SOURCE_RE = re.compile(r"^(\S+)(?:\s+\((\S+)\))?")


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def _field(value: str) -> str:
    return value.strip()[:_MAX_FIELD]


# -- os-release ----------------------------------------------------------------------------------


def parse_os_release(data: bytes) -> OsRelease | None:
    """`KEY=value` lines (values optionally quoted); None without an ID."""
    values: dict[str, str] = {}
    for line in _text(data).splitlines():
        key, sep, value = line.strip().partition("=")
        if not sep or not key or key.startswith("#"):
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key] = _field(value.replace('\\"', '"'))
    os_id = values.get("ID", "")
    if not os_id:
        return None
    return OsRelease(
        id=os_id.lower(),
        version_id=values.get("VERSION_ID", ""),
        pretty_name=values.get("PRETTY_NAME", ""),
        codename=values.get("VERSION_CODENAME", ""),
    )


# -- stanza files (dpkg, apk) --------------------------------------------------------------------


def _stanzas(text: str) -> Iterator[dict[str, str]]:
    """RFC 822-style paragraphs separated by blank lines; continuation lines are joined."""
    fields: dict[str, str] = {}
    last = ""
    for line in text.splitlines():
        if not line.strip():
            if fields:
                yield fields
            fields, last = {}, ""
        elif line[0] in " \t":
            if last and len(fields[last]) < _MAX_FIELD:
                fields[last] += "\n" + line.strip()
        else:
            key, sep, value = line.partition(":")
            if sep:
                last = key.strip()
                fields[last] = _field(value)
    if fields:
        yield fields


def parse_dpkg_status(data: bytes, *, layer: str, path: str) -> list[Package]:
    """A dpkg status file (or one file of distroless `status.d/`): installed packages only
    (`Status: install ok installed`; `status.d` files have no Status and all count)."""
    found: list[Package] = []
    for fields in _stanzas(_text(data)):
        status = fields.get("Status")
        if status is not None and status.split() != ["install", "ok", "installed"]:
            continue
        name, version = fields.get("Package", ""), fields.get("Version", "")
        if not name or not version:
            continue
        source = source_version = ""
        if m := _SOURCE_RE.match(fields.get("Source", "")):
            source, source_version = m.group(1), m.group(2) or ""
        found.append(
            Package(
                name=name,
                version=version,
                type=DEB,
                purl="",
                layer=layer,
                path=path,
                # kept even when equal to the name: syft writes `upstream=` whenever the
                # record has a Source field
                source=source,
                source_version=source_version if source_version != version else "",
                arch=fields.get("Architecture", ""),
            )
        )
    return found


def parse_apk_installed(data: bytes, *, layer: str, path: str) -> list[Package]:
    """Alpine's `lib/apk/db/installed`: one-letter fields P (name), V, A (arch), o (origin),
    L (license), records separated by blank lines."""
    found: list[Package] = []
    for fields in _stanzas(_text(data)):
        name, version = fields.get("P", ""), fields.get("V", "")
        if not name or not version:
            continue
        origin = fields.get("o", "")
        lic = fields.get("L", "")
        found.append(
            Package(
                name=name,
                version=version,
                type=APK,
                purl="",
                layer=layer,
                path=path,
                source=origin if origin != name else "",
                arch=fields.get("A", ""),
                licenses=(lic,) if lic else (),
            )
        )
    return found


# -- Python --------------------------------------------------------------------------------------


def is_python_metadata(path: str) -> bool:
    """`*.dist-info/METADATA`, `*.egg-info/PKG-INFO` or an `*.egg-info` file."""
    parent, _, base = path.rpartition("/")
    if base == "METADATA":
        return parent.endswith(".dist-info")
    if base == "PKG-INFO":
        return parent.endswith(".egg-info")
    return base.endswith(".egg-info")


def parse_python_metadata(data: bytes, *, layer: str, path: str) -> list[Package]:
    """Core metadata headers (up to the first blank line): Name, Version, License (or
    License-Expression)."""
    name = version = lic = ""
    for line in _text(data).splitlines():
        if not line.strip():
            break
        key, sep, value = line.partition(":")
        if not sep or line[0] in " \t":
            continue
        key = key.strip().lower()
        if key == "name" and not name:
            name = _field(value)
        elif key == "version" and not version:
            version = _field(value)
        elif key == "license-expression":
            lic = _field(value)
        elif key == "license" and not lic:
            lic = _field(value).split("\n", 1)[0]
    if not name or not version:
        return []
    licenses = (lic,) if lic and lic.upper() != "UNKNOWN" else ()
    return [
        Package(
            name=name,
            version=version,
            type=PYPI,
            purl="",
            layer=layer,
            path=path,
            licenses=licenses,
        )
    ]


# -- Node ----------------------------------------------------------------------------------------


def is_npm_package_json(path: str) -> bool:
    """`.../node_modules/NAME/package.json` or `.../node_modules/@scope/NAME/package.json`."""
    parts = path.split("/")
    if len(parts) < 3 or parts[-1] != "package.json":
        return False
    if parts[-3] == "node_modules":
        return not parts[-2].startswith("@")
    return len(parts) >= 4 and parts[-4] == "node_modules" and parts[-3].startswith("@")


def is_npm_lock(path: str) -> bool:
    """A `package-lock.json` outside `node_modules`."""
    parts = path.split("/")
    return parts[-1] == "package-lock.json" and "node_modules" not in parts


def _json(data: bytes, max_bytes: int) -> Any:
    try:
        return load_json(data, max_bytes=max_bytes, max_depth=_MAX_JSON_DEPTH)
    except (JSONInputError, RecursionError, ValueError):
        return None


def _npm_license(value: object) -> tuple[str, ...]:
    if isinstance(value, str) and value:
        return (value[:_MAX_FIELD],)
    if isinstance(value, dict) and isinstance(value.get("type"), str):
        return (value["type"][:_MAX_FIELD],)
    if isinstance(value, list):
        return tuple(x for v in value[:64] for x in _npm_license(v))
    return ()


def _npm(name: object, version: object, lic: object, *, layer: str, path: str) -> Package | None:
    if not isinstance(name, str) or not isinstance(version, str) or not name or not version:
        return None
    if len(name) > 512 or len(version) > 256:
        return None
    return Package(
        name=name,
        version=version,
        type=NPM,
        purl="",
        layer=layer,
        path=path,
        licenses=_npm_license(lic),
    )


def parse_npm_package_json(data: bytes, *, layer: str, path: str, max_bytes: int) -> list[Package]:
    """An installed package's `package.json`: name, version, license."""
    doc = _json(data, max_bytes)
    if not isinstance(doc, dict):
        return []
    found = _npm(doc.get("name"), doc.get("version"), doc.get("license"), layer=layer, path=path)
    return [found] if found is not None else []


def parse_npm_lock(
    data: bytes, *, layer: str, path: str, max_bytes: int, max_packages: int
) -> list[Package]:
    """`package-lock.json`: lockfile v2/v3 `packages` (keyed by install path; the root "" and
    links are skipped), else v1's nested `dependencies`."""
    doc = _json(data, max_bytes)
    if not isinstance(doc, dict):
        return []
    found: list[Package] = []
    packages = doc.get("packages")
    if isinstance(packages, dict):
        for key, entry in packages.items():
            if not key or not isinstance(entry, dict) or entry.get("link") is True:
                continue
            name = entry.get("name") or key.rpartition("node_modules/")[2]
            p = _npm(name, entry.get("version"), entry.get("license"), layer=layer, path=path)
            if p is not None:
                found.append(p)
            if len(found) >= max_packages:
                break
        return found
    # v1: {"dependencies": {name: {"version": ..., "dependencies": {...}}}}; the depth is
    # bounded by the JSON depth limit, the work by the document's size.
    stack: list[object] = [doc.get("dependencies")]
    while stack and len(found) < max_packages:
        deps = stack.pop()
        if not isinstance(deps, dict):
            continue
        for name, entry in deps.items():
            if not isinstance(entry, dict):
                continue
            p = _npm(name, entry.get("version"), None, layer=layer, path=path)
            if p is not None and not str(p.version).startswith(("file:", "git", "http")):
                found.append(p)
            stack.append(entry.get("dependencies"))
    return found


# -- purls ---------------------------------------------------------------------------------------


def with_purls(packages: Iterable[Package], os: OsRelease | None) -> list[Package]:
    """`packages` with their purls, as syft 1.x writes them (distro qualifier from the image's
    OS release, `upstream` when the source package differs)."""
    distro = f"{os.id}-{os.version_id}" if os is not None and os.version_id else None
    out: list[Package] = []
    for p in packages:
        purl = _purl(p, os, distro)
        out.append(msgspec.structs.replace(p, purl=purl))
    return out


def _purl(p: Package, os: OsRelease | None, distro: str | None) -> str:
    qualifiers: dict[str, str] = {}
    if p.type in (DEB, APK, RPM):
        default = {DEB: "debian", APK: "alpine", RPM: "redhat"}[p.type]
        namespace = os.id if os is not None else default
        version = p.version
        if p.arch:
            qualifiers["arch"] = p.arch
        if p.type == RPM:
            epoch, sep, rest = p.version.partition(":")
            if sep and epoch.isdigit():
                qualifiers["epoch"] = epoch
                version = rest
            if p.source:
                qualifiers["upstream"] = f"{p.source}-{p.source_version}.src.rpm"
        elif p.source:
            upstream = p.source
            if p.source_version:
                upstream += f"@{p.source_version}"
            qualifiers["upstream"] = upstream
        if distro:
            qualifiers["distro"] = distro
        return PackageURL(p.type, namespace, p.name, version, qualifiers or None).to_string()
    if p.type == NPM:
        scope, _, base = p.name.rpartition("/")
        return PackageURL(NPM, scope or None, base, p.version).to_string()
    if p.type == PYPI:
        return PackageURL(PYPI, None, p.name, p.version).to_string()
    if p.type == GOLANG:
        return p.purl
    return PackageURL(p.type, None, p.name, p.version).to_string()


def dedupe_npm(packages: list[Package]) -> list[Package]:
    """Drop lockfile entries whose (name, version) is also installed under node_modules."""
    installed = {
        (p.name, p.version) for p in packages if p.type == NPM and is_npm_package_json(p.path)
    }
    seen: set[tuple[str, str]] = set()
    out: list[Package] = []
    for p in packages:
        if p.type == NPM and is_npm_lock(p.path):
            key = (p.name, p.version)
            if key in installed or key in seen:
                continue
            seen.add(key)
        out.append(p)
    return out
