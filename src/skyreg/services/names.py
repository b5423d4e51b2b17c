"""Names and durations of the management API: DNS-label names, generated app names, expiries,
and the shapes of regions, deploy strategies and build arguments.

Kept free of the metadata layer (SQLAlchemy, asyncio): the CLI checks a skyreg.toml against
these same rules (`skyreg.cli.appconfig`) without loading the server's modules."""

from __future__ import annotations

import math
import re
import secrets
from datetime import UTC, datetime, timedelta

DNS_LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
MAX_TOKEN_NAME = 100
MAX_EXPIRY = timedelta(days=3650)

REGION_RE = re.compile(r"^[a-z][a-z0-9-]{1,19}\Z")
STRATEGIES = ("rolling", "immediate")  # how a release replaces the running machines
ARG_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}\Z")  # a build argument's name
TARGET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")  # a Dockerfile stage
MAX_BUILD_ARGS = 100
MAX_BUILD_ARG_VALUE = 4096

_DURATION_PART_RE = re.compile(r"([0-9]+)(d|h|m|s)")  # ASCII digits only
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


_MAX_DURATION_CHARS = 40
EXPIRY_HINT = "use a duration such as 720h, 30m, 1h30m, 7d or a number of seconds"


def parse_duration(value: object, what: str, hint: str = EXPIRY_HINT) -> int | None:
    """Whole seconds (rounded up) from a duration: a number of seconds, a string of ASCII
    digits, or parts such as "720h", "30m", "1h30m", "7d", "90s". None stays None. ValueError
    naming `what` (and `hint`, how to write one) when malformed or negative."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a duration: {hint}")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError(f"{what} must be a duration: {hint}")
        seconds = math.ceil(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        fits = len(text) <= _MAX_DURATION_CHARS
        parts = _DURATION_PART_RE.findall(text) if fits else []
        if fits and text.isascii() and text.isdigit():
            seconds = int(text)
        elif parts and "".join(n + u for n, u in parts) == text:
            seconds = sum(int(n) * _UNIT_SECONDS[u] for n, u in parts)
        else:
            raise ValueError(f"invalid {what} {value[:40]!r}: {hint}")
    else:
        raise ValueError(f"{what} must be a duration: {hint}")
    if seconds < 0:
        raise ValueError(f"{what} cannot be negative")
    return seconds


def parse_expiry(value: object) -> timedelta | None:
    """A token lifetime (`parse_duration`). None means no expiry. ValueError when malformed,
    not positive or longer than ten years."""
    seconds = parse_duration(value, "expiry")
    if seconds is None:
        return None
    if not seconds > 0:
        raise ValueError("expiry must be positive")
    if seconds > MAX_EXPIRY.total_seconds():
        raise ValueError("expiry must be at most ten years (87600h)")
    return timedelta(seconds=seconds)


def deployment_tag(now: datetime | None = None) -> str:
    """`deployment-YYYYMMDD-HHMMSS` in UTC, as Fly.io names the tags of deployed images."""
    return (now or datetime.now(UTC)).strftime("deployment-%Y%m%d-%H%M%S")
