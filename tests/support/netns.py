"""Helpers of the tests that give machines their own networks (root, `ip`, iptables): why they
cannot run here, a private range no host route uses, a fresh name prefix, and what a prefix
left behind."""

from __future__ import annotations

import json
import os
import random
import shutil
import string
import subprocess
from ipaddress import IPv4Network
from pathlib import Path

from tests.support.images import BUSYBOX

TOOLS = ("bwrap", "ip", "iptables", "iptables-restore", "nsenter", "setpriv")


def network_problem() -> str | None:
    """Why machine networks cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in TOOLS:
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not BUSYBOX.exists():
        return f"{BUSYBOX} is missing"
    if Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() != "1":
        return "net.ipv4.ip_forward is off"
    name = "tprobe" + "".join(random.choices(string.digits, k=6))
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        return f"ip netns add fails: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True, check=True)
    return None


def host_routes() -> list[IPv4Network]:
    """Every IPv4 destination the host routes, in every table."""
    out = subprocess.run(["ip", "-j", "-4", "route", "show", "table", "all"], capture_output=True)
    nets = []
    for r in json.loads(out.stdout or b"[]"):
        dst = r.get("dst", "")
        if dst and dst != "default":
            nets.append(IPv4Network(dst, strict=False))
    return nets


def free_subnet(prefixlen: int, taken: list[IPv4Network] | None = None) -> IPv4Network:
    """A random 10.x.y.0/prefixlen (x in 100..199: `skyreg dev` takes 10.200-249) that no host
    route and nothing in `taken` overlaps; added to `taken`."""
    taken = [] if taken is None else taken
    routes = host_routes() + taken
    for _ in range(200):
        base = f"10.{random.randint(100, 199)}.{random.randint(0, 255)}.0"
        net = IPv4Network(f"{base}/{prefixlen}", strict=False)
        if not any(net.overlaps(r) for r in routes):
            taken.append(net)
            return net
    raise RuntimeError("no free 10.x range")


def fresh_prefix(first: str) -> str:
    """A name prefix for one test's HostNetwork: `first` and random characters, 5 in all."""
    return first + "".join(random.choices(string.ascii_lowercase + string.digits, k=5 - len(first)))


def leftovers(prefix: str) -> list[str]:
    """What carries `prefix`: named namespaces, links, iptables rules and chains."""
    found = [f"netns {p.name}" for p in Path("/run/netns").glob(f"{prefix}*")]
    links = json.loads(subprocess.run(["ip", "-j", "link", "show"], capture_output=True).stdout)
    found += [f"link {link['ifname']}" for link in links if link["ifname"].startswith(prefix)]
    for table in ("filter", "nat"):
        rules = subprocess.run(["iptables", "-t", table, "-S"], capture_output=True, text=True)
        found += [f"{table}: {r}" for r in rules.stdout.splitlines() if prefix.upper() in r]
    return found
