"""Version ordering per OSV ecosystem."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from univers import debian
from univers.versions import AlpineLinuxVersion

from skyreg.scan import versions
from skyreg.scan.versions import InvalidVersion, UnknownEcosystem, compare, key


@pytest.mark.parametrize(
    ("ecosystem", "lower", "higher"),
    [
        # dpkg: epochs win, tildes sort before the end, revisions after upstream
        ("Debian:12", "2.36-9+deb12u2", "2.36-9+deb12u3"),
        ("Debian:12", "9.9-9", "1:2.3-4"),
        ("Debian:12", "1:9.2p1-2+deb12u1", "1:9.2p1-2+deb12u2"),
        ("Debian", "1.0~rc1", "1.0"),
        ("Debian", "1.0~rc1-1", "1.0~rc2-1"),
        ("Debian", "1.0-1~bpo12+1", "1.0-1"),
        ("Debian", "1.0", "1.0+b1"),
        ("Ubuntu:22.04:LTS", "3.0.2-0ubuntu1.10", "3.0.2-0ubuntu1.12"),
        # apk: revisions numerically, pre-release suffixes below the release, _git above it
        ("Alpine:v3.19", "1.2.3-r4", "1.2.3-r10"),
        ("Alpine:v3.19", "1.2.3_rc1-r0", "1.2.3-r0"),
        ("Alpine:v3.19", "1.2.4-r4", "1.2.4_git20230717-r4"),
        ("Alpine:v3.19", "1.2.4_git20230717-r4", "1.2.5-r0"),
        ("Alpine:v3.19", "1.2.3", "1.2.3a"),
        ("Alpine:v3.19", "1.2.3a", "1.2.3.1"),
        ("Alpine:v3.19", "1.2_alpha", "1.2_beta1"),
        ("Alpine:v3.19", "1.2_p1", "1.2_p2"),
        ("Alpine:v3.19", "9.9", "10.0"),
        ("Alpine:v3.19", "1.0", "1.0-r0"),
        # RPM
        ("Rocky Linux:9", "5.14.0-362.8.1.el9_3", "5.14.0-362.13.1.el9_3"),
        ("AlmaLinux:9", "1:1.0-1.el9", "2:0.1-1.el9"),
        ("Red Hat", "0:3.0.7-24.el9", "1:3.0.7-25.el9"),
        # PEP 440
        ("PyPI", "1.0rc1", "1.0"),
        ("PyPI", "1.0", "1.0.post1"),
        ("PyPI", "1.0.dev0", "1.0a1"),
        ("PyPI", "2.30.0", "2.31.0"),
        # SemVer (npm)
        ("npm", "7.5.2-beta.1", "7.5.2"),
        ("npm", "6.3.0", "6.3.1"),
        ("SEMVER", "1.9.0", "1.10.0"),
        # Go: "v" prefix, pseudo-versions, the toolchain's spelling
        ("Go", "v0.0.0-20220314000000-aaaaaaaaaaaa", "0.0.0-20220314234659-1baeb1ce4c0b"),
        ("Go", "v0.0.0-20220314234659-1baeb1ce4c0b", "v0.1.0"),
        ("Go", "v0.16.0", "0.17.0"),
        ("Go", "go1.21.4", "1.21.5"),
        ("Go", "go1.22rc1", "1.22.0"),
        ("Go", "1.21.0-0", "go1.21.0"),
    ],
)
def test_orders_each_ecosystem_by_its_rules(ecosystem: str, lower: str, higher: str) -> None:
    assert compare(ecosystem, lower, higher) == -1
    assert compare(ecosystem, higher, lower) == 1
    assert compare(ecosystem, lower, lower) == 0
    assert key(ecosystem, lower) < key(ecosystem, higher)


@pytest.mark.parametrize(
    ("ecosystem", "a", "b"),
    [
        ("Debian", "1.0", "1.0-0"),
        ("Debian", "1.00", "1.0"),
        ("Debian", "0:1.0-1", "1.0-1"),
        ("PyPI", "1.0", "1.0.0"),
        ("Go", "v1.2.3", "1.2.3"),
        ("Go", "go1.21", "1.21.0"),
        ("Rocky Linux:9", "0:1.0-1", "1.0-1"),
    ],
)
def test_equal_spellings(ecosystem: str, a: str, b: str) -> None:
    assert compare(ecosystem, a, b) == 0
    assert key(ecosystem, a) == key(ecosystem, b)


def test_sorting_by_key() -> None:
    given_order = ["1.0-1", "1:0.1-1", "1.0~rc1-1", "1.0-1+b1", "0.9-3"]
    ordered = sorted(given_order, key=lambda v: key("Debian:12", v))
    assert ordered == ["0.9-3", "1.0~rc1-1", "1.0-1", "1.0-1+b1", "1:0.1-1"]


@pytest.mark.parametrize(
    ("ecosystem", "bad"),
    [
        ("Debian:12", "not a version"),
        ("Debian:12", ""),
        ("Debian:12", "x1.0"),
        ("Alpine:v3.19", "1.2.3-beta"),
        ("Alpine:v3.19", "1.2_foo"),
        ("PyPI", "1.0-thing-else"),
        ("npm", "latest"),
        ("Go", "(devel)"),
        ("Rocky Linux:9", "x:1.0"),
        ("Debian", "1" * 1000),
        ("PyPI", "1.0\x00"),
    ],
)
def test_invalid_versions_raise_a_clear_error(ecosystem: str, bad: str) -> None:
    with pytest.raises(InvalidVersion, match=r"not a .* version"):
        key(ecosystem, bad)
    with pytest.raises(ValueError):
        compare(ecosystem, bad, "1.0")


def test_unknown_ecosystem() -> None:
    with pytest.raises(UnknownEcosystem, match="Haskell"):
        compare("Haskell", "1.0", "1.1")
    assert issubclass(UnknownEcosystem, ValueError)


def test_parsed_versions_are_cached_and_bounded() -> None:
    versions.cache_clear()
    first = key("Debian:12", "2.36-9+deb12u3")
    assert key("Debian:11", "2.36-9+deb12u3") is first  # same scheme, same parse
    info = versions._key.cache_info()
    assert info.hits == 1
    assert info.maxsize == versions.CACHE_SIZE


def test_keys_of_different_schemes_do_not_order() -> None:
    with pytest.raises(TypeError):
        _ = key("Debian", "1.0") < key("PyPI", "1.0")


_component = st.integers(min_value=1, max_value=40).map(str)
_apk = st.builds(
    lambda first, rest, letter, suffixes, rev: (
        first
        + "".join(f".{c}" for c in rest)
        + letter
        + "".join(suffixes)
        + (f"-r{rev}" if rev is not None else "")
    ),
    st.integers(min_value=0, max_value=30).map(str),
    st.lists(_component, max_size=3),
    st.sampled_from(["", "a", "b"]),
    st.lists(
        st.builds(
            lambda w, n: f"_{w}{n}",
            st.sampled_from(["alpha", "beta", "pre", "rc", "p"]),
            st.sampled_from(["", "1", "2", "10"]),
        ),
        max_size=2,
    ),
    # Gentoo (univers) treats "-r0" as no revision; apk-tools sorts "1.0" below "1.0-r0".
    st.none() | st.integers(min_value=1, max_value=20),
)


@given(_apk, _apk)
def test_apk_order_agrees_with_univers_where_univers_parses(a: str, b: str) -> None:
    ua, ub = AlpineLinuxVersion(a), AlpineLinuxVersion(b)
    expected = -1 if ua < ub else (1 if ua > ub else 0)
    assert compare("Alpine:v3.19", a, b) == expected


_deb_part = st.text(alphabet="0123456789abz.+~", min_size=1, max_size=8)
_deb = st.builds(
    lambda epoch, first, upstream, revision: (
        (f"{epoch}:" if epoch is not None else "")
        + first
        + upstream
        + (f"-{revision}" if revision else "")
    ),
    st.none() | st.integers(min_value=0, max_value=2),
    st.sampled_from("0123456789"),
    st.text(alphabet="0123456789abz.+~", max_size=8),
    st.none() | _deb_part,
)


@given(_deb, _deb)
def test_dpkg_order_agrees_with_univers(a: str, b: str) -> None:
    expected: int = debian.compare_versions(a, b)  # type: ignore[no-untyped-call]
    assert compare("Debian:12", a, b) == expected
