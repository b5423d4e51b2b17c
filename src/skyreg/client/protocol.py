"""What both OCI clients (`registry.py`, synchronous; `aio.py`, asyncio) know of the protocol,
without any I/O: URLs, scope strings, the Basic header, `WWW-Authenticate` challenges, token
endpoint answers, registry error bodies, upload and Range headers."""

from __future__ import annotations

import base64
import math
import re
import urllib.parse
from typing import Any

from skyreg.oci.bounded import load_json
from skyreg.oci.mediatypes import DOCKER_MANIFEST, INDEXES, OCI_INDEX, OCI_MANIFEST

ALL_MANIFESTS = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, *INDEXES)
MAX_ERROR_BODY = 64 * 1024  # an error body is parsed only this far
MAX_TOKEN_BODY = 1024 * 1024  # a token endpoint's answer (JWTs with many claims are kilobytes)
REDIRECTS = (301, 302, 303, 307, 308)
_TOKEN_RE = re.compile(r"[\x21-\x7e]+")  # what a header value may hold as is, no space


class RegistryClientError(Exception):
    """A registry request failed; the message is one line for the user."""


class ResponseTooLarge(RegistryClientError):
    """A body was larger than the caller's bound (`announced`: its Content-Length, if that
    already said so)."""

    def __init__(self, message: str, limit: int, announced: int | None) -> None:
        super().__init__(message)
        self.limit = limit
        self.announced = announced


def registry_url(host: str, insecure: bool = False) -> str:
    """http:// for loopback hosts and with `insecure`, else https://."""
    hostname = urllib.parse.urlsplit("//" + host).hostname or ""
    loopback = hostname in ("localhost", "::1") or hostname.startswith("127.")
    return f"{'http' if insecure or loopback else 'https'}://{host}"


def short_digest(digest: str) -> str:
    """`sha256:` and the first 12 hex digits, for messages and progress bars."""
    algorithm, _, hex_part = digest.partition(":")
    return f"{algorithm}:{hex_part[:12]}"


def blob_path(repository: str, digest: str) -> str:
    """The path of a blob in a repository."""
    return f"/v2/{repository}/blobs/{digest}"


def manifest_path(repository: str, reference: str) -> str:
    """The path of a manifest (by tag or digest) in a repository."""
    return f"/v2/{repository}/manifests/{reference}"


def uploads_path(repository: str) -> str:
    """Where blob uploads of a repository start (POST)."""
    return f"/v2/{repository}/blobs/uploads/"


def repository_scope(repository: str, actions: str) -> str:
    """A token scope such as `repository:web/api:pull,push`."""
    return f"repository:{repository}:{actions}"


def basic_authorization(username: str, password: str) -> str:
    """The `Authorization` value for Basic credentials."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """(scheme, params) of a WWW-Authenticate value such as `Bearer realm="...",scope="..."`;
    the scheme is lowercase."""
    scheme, _, rest = header.strip().partition(" ")
    params = {
        m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
        for m in re.finditer(r'([A-Za-z_]+)=(?:"((?:[^"\\]|\\.)*)"|([^,\s]+))', rest)
    }
    return scheme.lower(), params


def bearer_challenge(header: str) -> dict[str, str] | None:
    """The parameters of a Bearer challenge that names a realm, else None."""
    scheme, params = parse_challenge(header)
    return params if scheme == "bearer" and params.get("realm") else None


def token_url(challenge: dict[str, str], scopes: list[str]) -> str:
    """The token endpoint URL answering `challenge` for `scopes`."""
    query = [("service", challenge["service"])] if challenge.get("service") else []
    query += [("scope", s) for s in scopes]
    realm = challenge["realm"]
    return realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(query)


def origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an absolute http(s) URL without credentials in it, else None."""
    try:
        parts = urllib.parse.urlsplit(url)
        scheme, host, port = parts.scheme.lower(), parts.hostname, parts.port
    except ValueError:  # a bad port or IPv6 literal
        return None
    if scheme not in ("http", "https") or not host or parts.username or parts.password:
        return None
    return scheme, host, port or (443 if scheme == "https" else 80)


def realm_takes_credentials(realm: str, registry: str) -> bool:
    """Whether credentials for `registry` may go to the token `realm` it named: a realm at the
    registry's own origin, or any https one (auth servers often have a host of their own) —
    never a cleartext one elsewhere, which anyone on the path could read."""
    at = origin(realm)
    return at is not None and (at[0] == "https" or at == origin(registry))


def parse_token(body: bytes) -> tuple[str, float] | None:
    """(token, lifetime in seconds) from a token endpoint's answer, or None without a token.

    A token must be visible ASCII (it goes into a header as is); a lifetime that is no finite
    number counts as the default 60 seconds."""
    try:
        doc = load_json(body, max_bytes=MAX_TOKEN_BODY)
        token = doc.get("token") or doc.get("access_token")
        lifetime = float(doc.get("expires_in") or 60)
    except (ValueError, AttributeError, TypeError, OverflowError):
        return None
    if not isinstance(token, str) or _TOKEN_RE.fullmatch(token) is None:
        return None
    return token, lifetime if math.isfinite(lifetime) else 60.0


def _json(body: bytes) -> Any:
    return load_json(body, max_bytes=MAX_ERROR_BODY)


def first_error(body: bytes) -> tuple[str, str] | None:
    """(code, message) of the first entry of a registry error body, or None."""
    try:
        doc = _json(body)
    except ValueError:
        return None
    errors = doc.get("errors") if isinstance(doc, dict) else None
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        return str(errors[0].get("code", "")), str(errors[0].get("message", ""))
    return None


def registry_error(status: int, reason: str, body: bytes) -> str:
    """`CODE: message` from a registry error body, else the HTTP status (and reason)."""
    try:
        doc = _json(body)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        errors = doc.get("errors")
        if isinstance(errors, list) and errors and isinstance(errors[0], dict):
            first = errors[0]
            return f"{first.get('code', status)}: {first.get('message', '')}".rstrip(": ")
        for key in ("error_description", "message", "error", "details"):
            if isinstance(doc.get(key), str):
                return f"HTTP {status}: {doc[key]}"
    return f"HTTP {status} {reason}".rstrip()


def held_bytes(range_header: str) -> int:
    """The bytes an upload holds from its `Range: 0-N` header (a missing one: 0). "0-0" also
    means an empty upload (as Distribution answers); a 416 tells the one-byte case apart."""
    m = re.fullmatch(r"0-(\d{1,19})", range_header.strip())
    if m is None:
        return 0
    end = int(m.group(1))
    return end + 1 if end else 0


def content_range_start(header: str) -> int | None:
    """Where a 206's `Content-Range: bytes N-M/T` starts, or None when it says nothing usable."""
    m = re.match(r"bytes (\d{1,19})-", header)
    return int(m.group(1)) if m else None
