"""Which client an IP address stands for, for per-client limits.

An IPv4 address is one client. An IPv6 host is normally given a whole /64 (SLAAC, privacy
addresses, one prefix per customer), so it can pick a fresh address from 2^64 for every
connection: limits keyed on the exact address would never bind. IPv6 clients are therefore
grouped by their /64, and an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) is its IPv4 client.
"""

from __future__ import annotations

import ipaddress

IPV6_CLIENT_PREFIX = 64


def client_key(address: str) -> str:
    """The key per-client limits count `address` under: an IPv4 address itself, an IPv6
    address's /64 (`2001:db8:1:2::/64`), an IPv4-mapped address as IPv4; anything that is not
    an IP address (e.g. "unknown") unchanged."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv4Address):
        return str(ip)
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((ip, IPV6_CLIENT_PREFIX), strict=False))
