"""Repository names and tags, as the distribution spec defines them."""

from __future__ import annotations

import re

from skyreg.oci.errors import ErrorCode, RegistryError

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*\Z")
TAG_RE = re.compile(r"^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}\Z")
MAX_NAME_LENGTH = 255


def validate_name(name: str) -> str:
    """Return `name` if it is a valid repository name, else raise NAME_INVALID."""
    if len(name) > MAX_NAME_LENGTH or NAME_RE.match(name) is None:
        raise RegistryError(
            ErrorCode.NAME_INVALID, f"invalid repository name {name[:300]!r}", {"name": name[:300]}
        )
    return name


def validate_tag(tag: str) -> str:
    """Return `tag` if it is a valid tag, else raise TAG_INVALID."""
    if TAG_RE.match(tag) is None:
        raise RegistryError(ErrorCode.TAG_INVALID, f"invalid tag {tag[:200]!r}", {"tag": tag[:200]})
    return tag
