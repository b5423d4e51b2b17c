"""The management API as host services (`skyreg agent`, `skyreg builder`) call it: one JSON
request with their token over an aiohttp session they own."""

from __future__ import annotations

from typing import Any

import aiohttp

API_PREFIX = "/api/v1"


async def call_api(
    session: aiohttp.ClientSession,
    server: str,
    token: str,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
) -> Any:
    """The JSON answer of `method /api/v1<path>`; RuntimeError naming the status (and the start
    of the answer) for a 4xx or 5xx."""
    headers = {"Authorization": f"Bearer {token}"}
    url = server + API_PREFIX + path
    async with session.request(method, url, json=body, headers=headers) as resp:
        if resp.status >= 400:
            text = (await resp.text())[:300]
            raise RuntimeError(f"{method} {path}: HTTP {resp.status} {text}")
        return await resp.json()
