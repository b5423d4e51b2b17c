"""Version ordering per OSV ecosystem, each with its own rules.

`compare(ecosystem, a, b)` answers -1/0/1; `key(ecosystem, version)` returns an orderable
`VersionKey` for sorting and repeated comparisons. Parsed versions are kept in a bounded LRU
cache: matching compares the same installed version against many advisory events.

Debian/Ubuntu (dpkg rules; univers parses, a tuple key of ours orders), RPM distributions,
PyPI (PEP 440), SemVer ecosystems and Go use `univers`. Alpine (and Wolfi, Chainguard) use
apk-tools' rules implemented here: univers' `AlpineLinuxVersion` applies Gentoo's grammar and
refuses `_git`/`_svn`/`_cvs`/`_hg` suffixes and `~hash`, which Alpine's own packages use (musl
`1.2.4_git20230717-r4`), and takes "-r0" for no revision where apk sorts "1.0" < "1.0-r0".
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

from univers import rpm as _rpm
from univers import versions as _uv

__all__ = ["InvalidVersion", "UnknownEcosystem", "VersionKey", "compare", "key", "scheme"]

MAX_VERSION_LENGTH = 256
CACHE_SIZE = 65_536


class UnknownEcosystem(ValueError):
    """The ecosystem has no version rules here."""


class InvalidVersion(ValueError):
    """The string is not a version of the ecosystem's grammar."""


# OSV ecosystem (the part before the first ":") -> version scheme.
_SCHEMES = {
    "Debian": "deb",
    "Ubuntu": "deb",
    "Alpine": "apk",
    "Wolfi": "apk",
    "Chainguard": "apk",
    "Rocky Linux": "rpm",
    "AlmaLinux": "rpm",
    "Red Hat": "rpm",
    "openSUSE": "rpm",
    "SUSE": "rpm",
    "Mageia": "rpm",
    "openEuler": "rpm",
    "PyPI": "pypi",
    "npm": "semver",
    "crates.io": "semver",
    "Hex": "semver",
    "SEMVER": "semver",
    "Go": "go",
    "Maven": "maven",
    "NuGet": "nuget",
    "RubyGems": "gem",
    "Packagist": "composer",
}


def scheme(ecosystem: str) -> str:
    """The version scheme of an OSV ecosystem ("Debian:12" -> "deb"); `UnknownEcosystem` if none."""
    base = ecosystem.split(":", 1)[0]
    try:
        return _SCHEMES[base]
    except KeyError:
        raise UnknownEcosystem(f"no version rules for ecosystem {ecosystem!r}") from None


class VersionKey:
    """A parsed version of one scheme; orders against keys of the same scheme only."""

    __slots__ = ("_cmp", "scheme", "text", "value")

    def __init__(self, scheme: str, text: str, value: Any, cmp: Callable[[Any, Any], int]) -> None:
        self.scheme = scheme
        self.text = text
        self.value = value
        self._cmp = cmp

    def compare(self, other: VersionKey) -> int:
        """-1, 0 or 1 as this version sorts before, with or after `other`."""
        if other.scheme != self.scheme:
            raise TypeError(f"cannot order a {self.scheme} version against a {other.scheme} one")
        return self._cmp(self.value, other.value)

    def __lt__(self, other: VersionKey) -> bool:
        return self.compare(other) < 0

    def __le__(self, other: VersionKey) -> bool:
        return self.compare(other) <= 0

    def __gt__(self, other: VersionKey) -> bool:
        return self.compare(other) > 0

    def __ge__(self, other: VersionKey) -> bool:
        return self.compare(other) >= 0

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VersionKey) and self.compare(other) == 0

    def __hash__(self) -> int:
        raise TypeError("VersionKey is not hashable: equal versions can be spelled differently")

    def __repr__(self) -> str:
        return f"VersionKey({self.scheme!r}, {self.text!r})"


def _native(a: Any, b: Any) -> int:
    return int(a > b) - int(a < b)


def _dpkg_order(c: str) -> int:
    if c == "~":
        return -1
    return ord(c) if c.isalpha() else ord(c) + 256


_DPKG_PART = re.compile(r"([^0-9]*)([0-9]*)")
_DPKG_EMPTY = ((0,), 0)


def _dpkg_key(part: str) -> tuple[tuple[tuple[int, ...], int], ...]:
    """dpkg's `verrevcmp` order as a tuple of (non-digit run as character orders closed by 0 for
    its end, digit run as a number) pairs. The first pair is always there (possibly empty) and
    the empty pair closes the tuple: a missing pair then compares as dpkg's "" and 0 would, below
    a run starting with "~" and above anything else."""
    parts = [
        ((*(_dpkg_order(c) for c in text), 0), int(digits or 0))
        for i, (text, digits) in enumerate(_DPKG_PART.findall(part))
        if i == 0 or text or digits
    ]
    parts.append(_DPKG_EMPTY)
    return tuple(parts)


def _deb_value(text: str) -> Any:
    # univers checks the grammar and splits epoch, upstream and revision; comparing its objects
    # runs ~80k/s, the tuple ~1M/s.
    v = _uv.DebianVersion(text).value
    return (int(v.epoch), _dpkg_key(v.upstream), _dpkg_key(v.revision or ""))


def _rpm_cmp(a: Any, b: Any) -> int:
    return _rpm.compare_rpm_versions(a, b)


# apk-tools' grammar: digits{.digits}[letter]{_suffix[digits]}[~hash][-rN]
_APK = re.compile(
    r"(?P<num>[0-9]+(?:\.[0-9]+)*)(?P<letter>[a-z])?"
    r"(?P<suffixes>(?:_(?:alpha|beta|pre|rc|cvs|svn|git|hg|p)[0-9]*)*)"
    r"(?:~[0-9a-f]+)?(?:-r(?P<rev>[0-9]+))?"
)
_APK_SUFFIX = re.compile(r"_([a-z]+)([0-9]*)")
_APK_PRE = ("alpha", "beta", "pre", "rc")
_APK_POST = ("cvs", "svn", "git", "hg", "p")
# Ranks of the token that follows an equal prefix: a further number component sorts above a
# letter, above a post-release suffix, above the revision, above the end; a pre-release suffix
# sorts below them all (apk-tools' `apk_version_compare`).
_R_PRE, _R_END, _R_REV, _R_POST, _R_LETTER, _R_NUM = range(6)


def _apk_key(text: str) -> tuple[tuple[int, ...], ...]:
    m = _APK.fullmatch(text)
    if m is None:
        raise ValueError(text)
    parts: list[tuple[int, ...]] = []
    first, *rest = m["num"].split(".")
    parts.append((_R_NUM, int(first)))
    for comp in rest:
        # After a dot, leading zeros count against the component (apk: "1.01" < "1.1").
        stripped = comp.lstrip("0")
        zeros = len(comp) - len(stripped)
        if zeros:
            parts.append((_R_NUM, -zeros))
            if stripped:
                parts.append((_R_NUM, int(stripped)))
        else:
            parts.append((_R_NUM, int(comp)))
    if m["letter"]:
        parts.append((_R_LETTER, ord(m["letter"])))
    for word, digits in _APK_SUFFIX.findall(m["suffixes"]):
        number = int(digits) if digits else -1
        if word in _APK_PRE:
            parts.append((_R_PRE, _APK_PRE.index(word), number))
        else:
            parts.append((_R_POST, _APK_POST.index(word), number))
    if m["rev"] is not None:
        parts.append((_R_REV, int(m["rev"])))
    parts.append((_R_END,))
    return tuple(parts)


_GO_TOOLCHAIN = re.compile(r"go([0-9]+)\.([0-9]+)(?:\.([0-9]+))?(?:(rc|beta)([0-9]+))?")


def _go_text(text: str) -> str:
    """Go toolchain spellings ("go1.21.5", "go1.22rc1") as the SemVer OSV's stdlib entries use."""
    m = _GO_TOOLCHAIN.fullmatch(text)
    if m is None:
        return text
    major, minor, patch, pre, pre_n = m.groups()
    out = f"{major}.{minor}.{patch or 0}"
    return f"{out}-{pre}.{pre_n}" if pre else out


def _univers(cls: type[_uv.Version], text: str) -> Any:
    return cls(text).value


def _parse(scheme_name: str, text: str) -> tuple[Any, Callable[[Any, Any], int]]:
    if scheme_name == "deb":
        return _deb_value(text), _native
    if scheme_name == "rpm":
        if not text or not text[0].isalnum():
            raise ValueError(text)
        return _univers(_uv.RpmVersion, text), _rpm_cmp
    if scheme_name == "apk":
        return _apk_key(text), _native
    if scheme_name == "pypi":
        return _univers(_uv.PypiVersion, text), _native
    if scheme_name == "semver":
        return _univers(_uv.SemverVersion, text), _native
    if scheme_name == "go":
        return _univers(_uv.GolangVersion, _go_text(text)), _native
    if scheme_name == "maven":
        return _univers(_uv.MavenVersion, text), _native
    if scheme_name == "nuget":
        return _univers(_uv.NugetVersion, text), _native
    if scheme_name == "gem":
        return _univers(_uv.RubygemsVersion, text), _native
    if scheme_name == "composer":
        return _univers(_uv.ComposerVersion, text), _native
    raise UnknownEcosystem(scheme_name)  # pragma: no cover - _SCHEMES names only the above


@functools.lru_cache(maxsize=CACHE_SIZE)
def _key(scheme_name: str, text: str) -> VersionKey:
    if not text or len(text) > MAX_VERSION_LENGTH or not text.isprintable():
        raise InvalidVersion(f"not a {scheme_name} version: {text[:MAX_VERSION_LENGTH]!r}")
    try:
        value, cmp = _parse(scheme_name, text)
    except (ValueError, TypeError, ArithmeticError) as e:
        raise InvalidVersion(f"not a {scheme_name} version: {text!r}") from e
    return VersionKey(scheme_name, text, value, cmp)


def key(ecosystem: str, version: str) -> VersionKey:
    """The parsed, orderable form of `version` under `ecosystem`'s rules (cached).

    Raises `UnknownEcosystem` or `InvalidVersion` (both `ValueError`)."""
    return _key(scheme(ecosystem), version)


def compare(ecosystem: str, a: str, b: str) -> int:
    """-1, 0 or 1 as version `a` sorts before, with or after `b` in `ecosystem`."""
    return key(ecosystem, a).compare(key(ecosystem, b))


def cache_clear() -> None:
    """Forget parsed versions (tests and benchmarks)."""
    _key.cache_clear()
