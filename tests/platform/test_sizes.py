"""`services/sizes.py` `parse_size` (quota limits) and `services/retention.py`
`parse_duration` (retention durations): what they take, and the messages they refuse with."""

from __future__ import annotations

import pytest

from skyreg.services.names import parse_duration
from skyreg.services.sizes import MAX_SIZE, parse_size


@pytest.mark.parametrize(
    ("text", "size"),
    [
        (0, 0),
        (1234, 1234),
        ("1234", 1234),
        (" 42 ", 42),
        ("7B", 7),
        ("7b", 7),
        ("1kB", 1000),
        ("1KB", 1000),
        ("1kb", 1000),
        ("2MB", 2 * 10**6),
        ("3gb", 3 * 10**9),
        ("4TB", 4 * 10**12),
        ("1KiB", 1024),
        ("1kib", 1024),
        ("2MiB", 2 * 2**20),
        ("3GiB", 3 * 2**30),
        ("4TiB", 4 * 2**40),
        ("1.5GiB", 3 * 2**29),
        ("1.5 GiB", 3 * 2**29),
        (".5kB", 500),
        ("0.0001kB", 0),  # rounded down to whole bytes
        ("1.0009kB", 1000),
        (MAX_SIZE, MAX_SIZE),
        (str(MAX_SIZE), MAX_SIZE),
        ("8388607TiB", 8388607 * 2**40),
    ],
)
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("12 parsecs", "invalid hard '12 parsecs'"),
        ("", "invalid hard ''"),
        ("GB", "invalid hard 'GB'"),
        ("1.GB", "invalid hard"),
        ("1e9", "invalid hard"),
        ("1,5GB", "invalid hard"),
        ("5 GiBs", "invalid hard"),
        ("1 PB", "invalid hard"),
        ("0x10", "invalid hard"),
        ("1\tGB", "invalid hard"),
        ("\uff11GB", "invalid hard"),  # a fullwidth 1
        ("١٢٣", "invalid hard"),  # digits, but not ASCII ones
        ("9" * 65, "invalid hard"),
        (-1, "hard cannot be negative"),
        ("-1", "hard cannot be negative"),
        ("-1.5GiB", "hard cannot be negative"),
        (MAX_SIZE + 1, "at most 9223372036854775807 bytes"),
        ("8EiB", "invalid hard"),
        ("8388608TiB", "at most 9223372036854775807 bytes"),
        ("9" * 64, "at most"),
        (True, "hard must be bytes"),
        (1.5, "hard must be bytes"),
        (None, "hard must be bytes"),
    ],
)
def test_bad_sizes(value: object, words: str) -> None:
    with pytest.raises(ValueError, match=r"^") as caught:
        parse_size(value, "hard")
    assert words in str(caught.value), str(caught.value)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        (0, 0),
        (90, 90),
        (1.2, 2),
        ("0", 0),
        ("86400", 86400),
        ("30d", 30 * 86400),
        ("12h", 12 * 3600),
        ("1h30m", 5400),
        ("45s", 45),
        (" 2D ", 2 * 86400),
    ],
)
def test_durations(value: object, seconds: int | None) -> None:
    assert parse_duration(value, "keep_within") == seconds


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("12 parsecs", "invalid keep_within '12 parsecs'"),
        ("30 d", "invalid keep_within"),
        ("1w", "invalid keep_within"),
        ("", "invalid keep_within"),
        ("-5", "invalid keep_within"),
        ("١٢٣", "invalid keep_within"),  # digits, but not ASCII ones
        ("²", "invalid keep_within"),
        ("\uff11h", "invalid keep_within"),  # a fullwidth 1
        ("1" * 41, "invalid keep_within"),
        (-1, "keep_within cannot be negative"),
        (float("inf"), "keep_within must be"),
        (float("nan"), "keep_within must be"),
        (True, "keep_within must be"),
        ([1], "keep_within must be"),
    ],
)
def test_bad_durations(value: object, words: str) -> None:
    with pytest.raises(ValueError, match=r"^") as caught:
        parse_duration(value, "keep_within")
    assert words in str(caught.value), str(caught.value)
