"""Which regions exist, where their registry nodes answer, and how far apart they are.

A regions file (JSON) is shared by every node:

    {
      "regions": {
        "iad": {"url": "http://10.0.1.2:5000", "rtt_ms": {"sin": 230, "syd": 200}},
        "sin": {"url": "http://10.0.2.2:5000", "rtt_ms": {"syd": 95},
                "peer_urls": {"iad": "http://10.0.2.1:7001"}},
        "syd": {"url": "http://10.0.3.2:5000"}
      }
    }

`url` is how the region's nodes are reached (a load balancer in front of its nodes, or its one
node); `peer_urls` optionally overrides, for the nodes of one region, the URL they use to reach
another (a relay, a private link). Round-trip times are symmetric: either side may name them;
pairs without one count as `DEFAULT_RTT_MS`. The file is re-read when it changes, so regions can
be added without restarting nodes.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

REGION_RE = re.compile(r"^[a-z][a-z0-9-]{0,19}\Z")
DEFAULT_RTT_MS = 100.0


class RegionConfigError(Exception):
    """The regions file is missing, unreadable or malformed."""


@dataclass(frozen=True)
class Region:
    code: str
    url: str
    rtt_ms: dict[str, float] = field(default_factory=dict)
    peer_urls: dict[str, str] = field(default_factory=dict)


def _url(value: object, what: str) -> str:
    if not isinstance(value, str) or not re.match(r"^https?://[^/\s]+$", value.rstrip("/")):
        raise RegionConfigError(f"{what} must be an http(s) URL with no path, got {value!r}")
    return value.rstrip("/")


def parse_regions(doc: object) -> dict[str, Region]:
    """Validate a regions document; every error names what is wrong."""
    if not isinstance(doc, dict) or not isinstance(doc.get("regions"), dict):
        raise RegionConfigError('the regions file must be an object with a "regions" object')
    regions: dict[str, Region] = {}
    for code, spec in doc["regions"].items():
        if not isinstance(code, str) or not REGION_RE.match(code):
            raise RegionConfigError(f"region code {code!r} must match {REGION_RE.pattern}")
        if not isinstance(spec, dict):
            raise RegionConfigError(f"region {code}: must be an object")
        rtts = spec.get("rtt_ms", {})
        peers = spec.get("peer_urls", {})
        if not isinstance(rtts, dict) or not isinstance(peers, dict):
            raise RegionConfigError(f"region {code}: rtt_ms and peer_urls must be objects")
        for other, rtt in rtts.items():
            if not isinstance(rtt, int | float) or isinstance(rtt, bool) or rtt < 0:
                raise RegionConfigError(f"region {code}: rtt_ms.{other} must be a number >= 0")
        regions[code] = Region(
            code=code,
            url=_url(spec.get("url"), f"region {code}: url"),
            rtt_ms={str(k): float(v) for k, v in rtts.items()},
            peer_urls={str(k): _url(v, f"region {code}: peer_urls.{k}") for k, v in peers.items()},
        )
    for region in regions.values():
        for other in [*region.rtt_ms, *region.peer_urls]:
            if other not in regions:
                raise RegionConfigError(f"region {region.code} names unknown region {other!r}")
    return regions


class RegionMap:
    """The regions as seen from one node's region (`home`)."""

    def __init__(self, path: Path, home: str) -> None:
        self.path = path
        self.home = home
        self._regions: dict[str, Region] = {}
        self._stamp: tuple[int, int] | None = None
        self.reload()
        if home not in self._regions:
            raise RegionConfigError(f"this node's region {home!r} is not in {path}")

    def reload(self) -> None:
        """Re-read the file if it changed since the last read (a bad edit keeps the old map)."""
        try:
            st = os.stat(self.path)
        except OSError as e:
            if not self._regions:
                raise RegionConfigError(f"cannot read {self.path}: {e.strerror}") from e
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        try:
            regions = parse_regions(json.loads(self.path.read_text()))
        except (OSError, ValueError) as e:
            if not self._regions:
                raise RegionConfigError(f"cannot read {self.path}: {e}") from e
            return
        except RegionConfigError:
            if not self._regions:
                raise
            return
        self._regions, self._stamp = regions, stamp

    @property
    def codes(self) -> list[str]:
        self.reload()
        return sorted(self._regions)

    def rtt(self, a: str, b: str) -> float:
        if a == b:
            return 0.0
        ra, rb = self._regions.get(a), self._regions.get(b)
        if ra is not None and b in ra.rtt_ms:
            return ra.rtt_ms[b]
        if rb is not None and a in rb.rtt_ms:
            return rb.rtt_ms[a]
        return DEFAULT_RTT_MS

    def nearest(self, candidates: list[str] | set[str]) -> list[str]:
        """`candidates` other than home that are known regions, nearest first."""
        self.reload()
        known = [c for c in candidates if c != self.home and c in self._regions]
        return sorted(known, key=lambda c: (self.rtt(self.home, c), c))

    def url_of(self, code: str) -> str:
        """The URL this node uses to reach region `code`."""
        self.reload()
        home = self._regions[self.home]
        return home.peer_urls.get(code) or self._regions[code].url

    def knows(self, code: str) -> bool:
        self.reload()
        return code in self._regions
