"""The resumable SHA-256 agrees with hashlib across any split and state round-trips."""

from __future__ import annotations

import hashlib
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from skyreg.store import resumable
from skyreg.store.resumable import ResumableSha256

pytestmark = pytest.mark.skipif(not resumable.available(), reason="no OpenSSL SHA256_*")


@given(st.binary(max_size=5000), st.lists(st.integers(min_value=0, max_value=5000), max_size=6))
def test_split_and_restored_hash_equals_hashlib(data: bytes, cuts: list[int]) -> None:
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    h = ResumableSha256()
    for start, end in itertools.pairwise(points):
        h.update(bytearray(data[start:end]) if start % 2 else data[start:end])
        h = ResumableSha256(h.state())
    assert h.hexdigest() == hashlib.sha256(data).hexdigest()


def test_hexdigest_does_not_end_the_running_hash() -> None:
    h = ResumableSha256()
    h.update(b"abc")
    assert h.hexdigest() == hashlib.sha256(b"abc").hexdigest()
    h.update(b"def")
    assert h.hexdigest() == hashlib.sha256(b"abcdef").hexdigest()


@pytest.mark.parametrize("state", [b"", b"x" * 112, bytes(111)])
def test_garbage_state_is_refused(state: bytes) -> None:
    with pytest.raises(ValueError):
        ResumableSha256(state)
