"""Slowing down repeated failed authentication from one client, without locking out others."""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque


class FailureLimiter:
    """After `limit` failures within `window` seconds, a client's next failure is answered with a
    wait until the oldest of them expires.

    Only failures count: nothing here refuses a request whose credentials are valid. Memory and
    time are bounded whatever clients do: at most `limit + 1` times per client and `max_clients`
    clients, the least recently failing forgotten first (O(1) per failure). Safe to call from
    several threads (credential checks run on database threads).
    """

    def __init__(self, limit: int = 10, window: float = 60.0, max_clients: int = 100_000) -> None:
        self.limit = limit
        self.window = window
        self.max_clients = max_clients
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def failed(self, client: str) -> int | None:
        """Count a failure; the seconds the client must now wait when it is over the limit."""
        with self._lock:
            return self._count(client)

    def _count(self, client: str) -> int | None:
        now = time.monotonic()
        failures = self._failures.pop(client, None)
        if failures is None:
            failures = deque(maxlen=self.limit + 1)
            while len(self._failures) >= self.max_clients:
                self._failures.popitem(last=False)
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        failures.append(now)
        self._failures[client] = failures  # now the most recently failing
        if len(failures) <= self.limit:
            return None
        return max(1, math.ceil(failures[0] + self.window - now))
