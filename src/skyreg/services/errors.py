"""Domain errors of the service layer: what went wrong, not how HTTP says it.

`platform/api/base.py` (`refusal`) gives each its status, code and message.
"""

from __future__ import annotations


class ServiceError(Exception):
    """A request a service refuses; `reason` is the message a caller sees."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Unauthenticated(ServiceError):
    """The request needs a token and came without one."""


class NotFound(ServiceError):
    """No such resource, or one the caller may not see: the same answer for both."""

    def __init__(self, kind: str, name: str) -> None:
        super().__init__(f"{kind} {name[:100]!r} not found")
        self.kind = kind
        self.name = name


class Forbidden(ServiceError):
    """The caller sees the resource but may not do this to it."""


class Invalid(ServiceError):
    """The request itself is wrong (a bad name, value or combination)."""


class LimitExceeded(Invalid):
    """The request is well formed but over a configured bound (`limit` is the bound)."""

    def __init__(self, reason: str, limit: int) -> None:
        super().__init__(reason)
        self.limit = limit


class Conflict(ServiceError):
    """The name is taken, or the change would break an invariant (the last admin token)."""


class Unavailable(ServiceError):
    """The server cannot do this now (a misconfiguration, a key it does not hold): 503."""
