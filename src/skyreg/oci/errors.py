"""OCI distribution error codes, each defined once, raised as `RegistryError`."""

from __future__ import annotations

import json
from enum import Enum
from typing import Any


class ErrorCode(Enum):
    """An error code of the distribution spec with its HTTP status and default message."""

    BLOB_UNKNOWN = (404, "blob unknown to registry")
    BLOB_UPLOAD_INVALID = (400, "blob upload invalid")
    BLOB_UPLOAD_UNKNOWN = (404, "blob upload unknown to registry")
    DIGEST_INVALID = (400, "provided digest did not match uploaded content")
    MANIFEST_BLOB_UNKNOWN = (400, "manifest references a manifest or blob unknown to registry")
    MANIFEST_INVALID = (400, "manifest invalid")
    MANIFEST_UNKNOWN = (404, "manifest unknown to registry")
    NAME_INVALID = (400, "invalid repository name")
    NAME_UNKNOWN = (404, "repository name not known to registry")
    SIZE_INVALID = (400, "provided length did not match content length")
    TAG_INVALID = (400, "manifest tag did not match URI")
    UNAUTHORIZED = (401, "authentication required")
    DENIED = (403, "requested access to the resource is denied")
    UNSUPPORTED = (405, "the operation is unsupported")
    TOOMANYREQUESTS = (429, "too many requests")
    RANGE_INVALID = (416, "invalid content range")
    PAGINATION_NUMBER_INVALID = (400, "invalid number of results requested")
    NOT_FOUND = (404, "no such endpoint")
    MANIFEST_TOO_LARGE = (413, "manifest too large")
    UNKNOWN = (500, "internal server error")
    UNAVAILABLE = (503, "service unavailable")  # Distribution's code for a backend it cannot reach
    # 507 (RFC 4918): the server cannot store what the request needs. Not 503 + Retry-After:
    # space comes back when an operator frees it, not after a time the registry could name.
    STORAGE_FULL = (507, "registry storage is full: pushes fail until space is freed")

    @property
    def status(self) -> int:
        return self.value[0]

    @property
    def message(self) -> str:
        return self.value[1]

    @property
    def wire_code(self) -> str:
        """The code as written on the wire (an oversized manifest is a SIZE_INVALID; full
        storage is Distribution's UNAVAILABLE, a code clients already know)."""
        return _WIRE_CODES.get(self, self.name)


_WIRE_CODES = {
    ErrorCode.MANIFEST_TOO_LARGE: "SIZE_INVALID",
    ErrorCode.STORAGE_FULL: "UNAVAILABLE",
}


class RegistryError(Exception):
    """A failure that answers the request with the spec's JSON error body."""

    def __init__(
        self,
        code: ErrorCode,
        message: str | None = None,
        detail: Any = None,
        *,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message or code.message)
        self.code = code
        self.message = message or code.message
        self.detail = detail
        self.status = status or code.status
        self.headers = headers or {}

    def body(self) -> bytes:
        """The `{"errors": [...]}` document for this error."""
        entry: dict[str, Any] = {"code": self.code.wire_code, "message": self.message}
        if self.detail is not None:
            entry["detail"] = self.detail
        return json.dumps({"errors": [entry]}).encode()
