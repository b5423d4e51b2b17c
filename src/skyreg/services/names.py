"""Names and durations of the management API: DNS-label names, generated app names, expiries."""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime, timedelta

DNS_LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
MAX_TOKEN_NAME = 100
MAX_EXPIRY = timedelta(days=3650)

_DURATION_PART_RE = re.compile(r"(\d+)(d|h|m|s)")
_UNIT_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}

_ADJECTIVES = (
    "amber", "ancient", "autumn", "bold", "brave", "bright", "calm", "clever", "cool", "crimson",
    "dawn", "eager", "early", "fancy", "fast", "gentle", "golden", "green", "happy", "hidden",
    "icy", "jolly", "keen", "late", "lively", "lucky", "misty", "modest", "noble", "odd",
    "patient", "plain", "polished", "proud", "quiet", "rapid", "red", "rough", "royal", "shy",
    "silent", "silver", "small", "smooth", "snowy", "solid", "spring", "steady", "still", "sunny",
    "swift", "tidy", "twilight", "urban", "vivid", "wandering", "warm", "wild", "winter", "young",
)  # fmt: skip
_NOUNS = (
    "anchor", "bird", "breeze", "brook", "butterfly", "canyon", "cedar", "cherry", "cloud",
    "comet", "coral", "creek", "dew", "dream", "dust", "falcon", "feather", "field", "fire",
    "firefly", "flower", "fog", "forest", "frost", "glade", "glitter", "grass", "harbor", "haze",
    "hill", "lake", "leaf", "meadow", "moon", "morning", "mountain", "night", "ocean", "otter",
    "paper", "pine", "pond", "rain", "resonance", "river", "sea", "shadow", "shape", "sky",
    "smoke", "snow", "sound", "star", "sun", "sunset", "thunder", "tree", "violet", "water",
    "wave", "wildflower", "wind", "wood",
)  # fmt: skip


def is_dns_label(name: object) -> bool:
    """Whether `name` is a lowercase DNS label (what org and app names must be)."""
    return isinstance(name, str) and DNS_LABEL_RE.match(name) is not None


def generate_app_name() -> str:
    """A readable random app name: adjective-noun-NNNN (about 15 million of them)."""
    adjective = secrets.choice(_ADJECTIVES)
    noun = secrets.choice(_NOUNS)
    return f"{adjective}-{noun}-{secrets.randbelow(10000):04d}"


def parse_expiry(value: object) -> timedelta | None:
    """A token lifetime: seconds (a number or a string of digits) or a duration such as "720h",
    "30m", "1h30m", "7d". None means no expiry. ValueError when malformed, not positive or longer
    than ten years."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("expiry must be a duration such as 720h, 30m or a number of seconds")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        if text.isdigit():
            seconds = float(text)
        else:
            parts = _DURATION_PART_RE.findall(text)
            if not parts or "".join(n + u for n, u in parts) != text:
                raise ValueError(
                    f"invalid expiry {value[:40]!r}: use a duration such as 720h, 30m, 1h30m, 7d "
                    "or a number of seconds"
                )
            seconds = float(sum(int(n) * _UNIT_SECONDS[u] for n, u in parts))
    else:
        raise ValueError("expiry must be a duration such as 720h, 30m or a number of seconds")
    if not seconds > 0:
        raise ValueError("expiry must be positive")
    if seconds > MAX_EXPIRY.total_seconds():
        raise ValueError("expiry must be at most ten years (87600h)")
    return timedelta(seconds=seconds)


def deployment_tag(now: datetime | None = None) -> str:
    """`deployment-YYYYMMDD-HHMMSS` in UTC, as Fly.io names the tags of deployed images."""
    return (now or datetime.now(UTC)).strftime("deployment-%Y%m%d-%H%M%S")
