"""Slowing down repeated failed authentication from one client, without locking out others."""

from __future__ import annotations

import math
import time
from collections import deque


class FailureLimiter:
    """After `limit` failures within `window` seconds a client waits until the oldest expires."""

    def __init__(self, limit: int = 10, window: float = 60.0, max_clients: int = 100_000) -> None:
        self.limit = limit
        self.window = window
        self.max_clients = max_clients
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, client: str, now: float) -> deque[float] | None:
        failures = self._failures.get(client)
        if failures is None:
            return None
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        if not failures:
            del self._failures[client]
            return None
        return failures

    def retry_after(self, client: str) -> int | None:
        """Seconds the client must wait, or None when it may try now."""
        now = time.monotonic()
        failures = self._recent(client, now)
        if failures is None or len(failures) < self.limit:
            return None
        return max(1, math.ceil(failures[0] + self.window - now))

    def failed(self, client: str) -> None:
        now = time.monotonic()
        if len(self._failures) >= self.max_clients and client not in self._failures:
            # Forget the client whose failures are oldest rather than grow without bound.
            oldest = min(self._failures, key=lambda c: self._failures[c][-1])
            del self._failures[oldest]
        self._failures.setdefault(client, deque()).append(now)
