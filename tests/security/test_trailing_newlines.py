"""A line break at the end of a name, tag, digest or id is refused like any other bad byte.

Python's `$` also matches before a trailing newline, so a pattern anchored with it accepts
`app\n`: every validating pattern ends with `\\Z` instead.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from skyreg.geo.regions import REGION_RE
from skyreg.oci.digest import Digest
from skyreg.oci.errors import RegistryError
from skyreg.oci.names import validate_name, validate_tag
from skyreg.platform.names import is_dns_label
from skyreg.registry.routing import match_route

_HEX = "ab" * 32


@pytest.mark.parametrize(
    ("check", "value"),
    [
        (validate_name, "app/web\n"),
        (validate_tag, "v1\n"),
        (Digest.parse, f"sha256:{_HEX}\n"),
    ],
    ids=["repository", "tag", "digest"],
)
def test_oci_values_with_a_trailing_line_break_are_refused(
    check: Callable[[str], object], value: str
) -> None:
    with pytest.raises((RegistryError, ValueError)):
        check(value)
    check(value.rstrip("\n"))  # the same value without it is fine


def test_platform_names_and_regions_with_a_trailing_line_break_are_refused() -> None:
    assert not is_dns_label("acme\n") and is_dns_label("acme")
    assert REGION_RE.match("iad\n") is None and REGION_RE.match("iad") is not None


def test_a_registry_path_with_a_trailing_line_break_matches_no_route() -> None:
    assert match_route(f"app/web/blobs/sha256:{_HEX}") is not None
    route = match_route(f"app/web/blobs/sha256:{_HEX}\n")
    assert route is None or route.reference.endswith("\n")  # then refused by Digest.parse
