"""Behind a load balancer: the client's address and scheme from X-Forwarded-For/-Proto.

Only requests arriving from a trusted proxy (`serve --trusted-proxy CIDR`) are rewritten; from
anyone else the headers are ignored, so a client cannot pick its own address to dodge the
failed-login limiter. The client is found right to left (each proxy appends the address it
received the request from): the rightmost address in X-Forwarded-For that is not itself a trusted
proxy. A hop that is not an address ends the walk at the last trusted hop, so no made-up name ever
becomes a client of its own. Whoever can reach the server directly from a trusted address can claim
any client address; the failed-login limiter therefore also counts failures per proxy
(`auth.service.Authenticator.limited`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(values: Sequence[str]) -> tuple[Network, ...]:
    """CIDRs or plain addresses; ValueError names a bad one."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(f"not an address or CIDR: {value!r}") from None
    return tuple(networks)


def trusted(address: str | None, networks: tuple[Network, ...]) -> bool:
    """Whether `address` is an IP address inside one of `networks` (a trusted proxy)."""
    if not address:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


def forwarded_middleware(networks: tuple[Network, ...]) -> Middleware:
    """A middleware that takes the client's address and scheme from trusted proxies' headers."""

    @web.middleware
    async def forwarded(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not trusted(request.remote, networks):
            return await handler(request)
        hops = [
            hop.strip()
            for value in request.headers.getall("X-Forwarded-For", [])
            for hop in value.split(",")
            if hop.strip()
        ]
        remote = request.remote or ""
        for hop in reversed(hops):
            try:
                address = str(ipaddress.ip_address(hop))
            except ValueError:
                break
            remote = address
            if not trusted(address, networks):
                break
        proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
        if proto in ("http", "https"):
            return await handler(request.clone(remote=remote, scheme=proto))
        return await handler(request.clone(remote=remote))

    return forwarded
