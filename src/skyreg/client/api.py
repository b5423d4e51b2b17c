"""The management API as host services (`skyreg agent`, `skyreg builder`) call it: one JSON
request with their token over an aiohttp session they own."""

from __future__ import annotations

from typing import Any

import aiohttp

API_PREFIX = "/api/v1"


class ApiCallError(RuntimeError):
    """The server answered a call with a 4xx or 5xx `status`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status

    @property
    def refused(self) -> bool:
        """A 4xx: the call itself is wrong (or no longer wanted); asking again will not help."""
        return 400 <= self.status < 500


async def call_api(
    session: aiohttp.ClientSession,
    server: str,
    token: str,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
) -> Any:
    """The JSON answer of `method /api/v1<path>`; ApiCallError (a RuntimeError) naming the
    status (and the start of the answer) for a 4xx or 5xx."""
    headers = {"Authorization": f"Bearer {token}"}
    url = server + API_PREFIX + path
    async with session.request(method, url, json=body, headers=headers) as resp:
        if resp.status >= 400:
            text = (await resp.text())[:300]
            raise ApiCallError(resp.status, f"{method} {path}: HTTP {resp.status} {text}")
        return await resp.json()
