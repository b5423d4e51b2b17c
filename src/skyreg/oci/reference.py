"""Image references (`[HOST[:PORT]/]REPO[:TAG][@DIGEST]`): the one parser every part uses.

The grammar is github.com/distribution/reference's:

    reference        := name [ ":" tag ] [ "@" digest ]
    name             := [ domain "/" ] path          (at most 255 characters in all)
    domain           := host [ ":" port ]
    host             := domain-component [ "." domain-component ]* | "[" IPv6 "]"
    domain-component := [a-zA-Z0-9] | [a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]
    path             := path-component [ "/" path-component ]*
    path-component   := [a-z0-9]+ ( ( "." | "_" | "__" | "-"+ ) [a-z0-9]+ )*
    tag              := [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}

A first component is the registry host, as docker decides it, only when it contains "." or ":",
is `localhost`, or has an uppercase letter (`app/web` is the repository `app/web`, not the host
`app`). Digests are what `Digest.parse` accepts (sha256/sha512, lowercase hex). There is no
docker.io default: a reference without a host has `host` None, and nothing is normalised.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from skyreg.oci.digest import Digest
from skyreg.oci.errors import RegistryError
from skyreg.oci.names import MAX_NAME_LENGTH, NAME_RE, TAG_RE

DEFAULT_TAG = "latest"
MAX_TAG_LENGTH = 128
# name, ":", tag, "@", the longest digest (sha512): nothing longer can be valid.
MAX_REFERENCE_LENGTH = MAX_NAME_LENGTH + 1 + MAX_TAG_LENGTH + 1 + len("sha512:") + 128
MAX_PORT = 65535

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST_RE = re.compile(
    rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::([0-9]+))?"
)


def _show(text: str) -> str:
    """`text` quoted for an error message, cut to a length a terminal line can hold."""
    return repr(text[:100]) + ("..." if len(text) > 100 else "")


@dataclass(frozen=True, slots=True)
class ImageReference:
    """A valid image reference; constructing an invalid one raises ValueError."""

    host: str | None
    repository: str
    tag: str | None = None
    digest: str | None = None

    def __post_init__(self) -> None:
        if self.host is not None:
            m = _HOST_RE.fullmatch(self.host)
            if m is None:
                raise ValueError(f"invalid registry host {_show(self.host)}")
            if m.group(1) is not None and int(m.group(1)) > MAX_PORT:
                raise ValueError(f"invalid port in registry host {_show(self.host)}")
        if NAME_RE.fullmatch(self.repository) is None:
            raise ValueError(
                f"invalid repository name {_show(self.repository)}: lowercase letters and "
                "digits, separated by '.', '_', '__' or '-', components by '/'"
            )
        if len(self.name) > MAX_NAME_LENGTH:
            raise ValueError(
                f"repository name of {len(self.name)} characters "
                f"(with the registry host): at most {MAX_NAME_LENGTH}"
            )
        if self.tag is not None and TAG_RE.fullmatch(self.tag) is None:
            raise ValueError(
                f"invalid tag {_show(self.tag)}: up to {MAX_TAG_LENGTH} letters, digits, "
                "'_', '.' or '-', not starting with '.' or '-'"
            )
        if self.digest is not None:
            try:
                Digest.parse(self.digest)
            except RegistryError as e:
                raise ValueError(e.message) from None

    @property
    def name(self) -> str:
        """`HOST/REPO`, or `REPO` without a host."""
        return f"{self.host}/{self.repository}" if self.host else self.repository

    @property
    def reference(self) -> str:
        """What a registry is asked for: the digest, else the tag, else `latest`."""
        return self.digest or self.tag or DEFAULT_TAG

    def registry_host(self) -> str:
        """The registry host; ValueError when the reference names none."""
        if self.host is None:
            raise ValueError(f"{_show(str(self))} names no registry host")
        return self.host

    def with_default_tag(self, tag: str = DEFAULT_TAG) -> ImageReference:
        """This reference, tagged `tag` when it has neither a tag nor a digest."""
        if self.tag is None and self.digest is None:
            return dataclasses.replace(self, tag=tag)
        return self

    def for_pull(self) -> ImageReference:
        """The reference a pull resolves: a digest wins over a tag (the tag of
        `name:tag@digest` is ignored, as docker does), and neither means `latest`."""
        if self.digest is not None:
            return dataclasses.replace(self, tag=None) if self.tag is not None else self
        return self.with_default_tag()

    def __str__(self) -> str:
        text = self.name
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text


def parse_reference(text: str) -> ImageReference:
    """Parse `[HOST[:PORT]/]REPO[:TAG][@DIGEST]`, exactly (no whitespace stripped, no default
    tag filled in: `str()` of the result is `text`).

    Raises ValueError with a message a user can act on.
    """
    if not text:
        raise ValueError("empty image reference")
    if len(text) > MAX_REFERENCE_LENGTH:
        raise ValueError(
            f"image reference of {len(text)} characters: at most {MAX_REFERENCE_LENGTH}"
        )
    name, at, digest = text.partition("@")
    if at and not digest:
        raise ValueError(f"empty digest after '@' in {_show(text)}")
    tag: str | None = None
    last_slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > last_slash:
        name, tag = name[:colon], name[colon + 1 :]
        if not tag:
            raise ValueError(f"empty tag after ':' in {_show(text)}")
    host: str | None = None
    first, slash, rest = name.partition("/")
    if slash and (any(c in first for c in ".:") or first == "localhost" or first != first.lower()):
        host, name = first, rest
    if not name:
        raise ValueError(f"no repository name in {_show(text)}")
    return ImageReference(host, name, tag, digest if at else None)
