"""Learned prefetch for lazy pull (issue 18): which chunks of an image's layers a machine read in
its first seconds, so that the next lazy start of the image fetches them before its entrypoint
runs.

A prefetch list is a list of `PrefetchRange`s — (layer digest, offset, length) in the layer's
uncompressed stream, chunk-aligned (`LayerIndex.chunk_size`), in the order the machine first
read them — bounded by `MAX_RANGES` and `MAX_BYTES`. The mount helper records one
(`Recorder`, during `WINDOW` seconds after it said `ready`), the agent reports it to the server
for the image's manifest digest (`PUT /api/v1/agent/apps/{app}/images/{reference}/prefetch`),
and the next helper of that image turns the server's list back into chunks (`plan`) and reads
them first, through the same verified readers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec

WINDOW = 10.0  # seconds after `ready` whose reads the helper records
MAX_RANGES = 4096  # ranges of one list
MAX_BYTES = 256 << 20  # bytes of one list, all ranges together
MAX_RANGE_BYTES = MAX_BYTES  # bytes of one range


class PrefetchRange(msgspec.Struct, forbid_unknown_fields=True):
    """`length` bytes from `offset` of the uncompressed stream of layer blob `layer`."""

    layer: str
    offset: int
    length: int


@dataclass(frozen=True)
class LayerGeometry:
    """What a list needs of a layer: its blob digest and how its stream is chunked."""

    digest: str
    chunk_size: int
    uncompressed_size: int

    def chunk_bytes(self, number: int) -> int:
        """Bytes of chunk `number` (the last one may be shorter)."""
        return max(0, min(self.chunk_size, self.uncompressed_size - number * self.chunk_size))

    @property
    def chunks(self) -> int:
        return -(-self.uncompressed_size // self.chunk_size) if self.chunk_size > 0 else 0


class Recorder:
    """The chunks read through a mount, in first-read order, from `start` for `window`
    seconds, at most `max_bytes` of them (thread-safe: FUSE reads run in worker threads)."""

    def __init__(
        self,
        layers: Sequence[LayerGeometry],
        window: float = WINDOW,
        max_bytes: int = MAX_BYTES,
        max_ranges: int = MAX_RANGES,
    ) -> None:
        self.layers = list(layers)
        self.window = window
        self.max_bytes = max_bytes
        self.max_ranges = max_ranges
        self._seen: dict[tuple[int, int], None] = {}  # insertion-ordered set
        self._bytes = 0
        self._deadline: float | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Open the window (at `ready`)."""
        self._deadline = time.monotonic() + self.window

    def recording(self) -> bool:
        """Whether the window is open."""
        return self._deadline is not None and time.monotonic() < self._deadline

    def read(self, layer: int, offset: int, length: int) -> None:
        """Note a read of `length` bytes from `offset` of layer `layer`'s stream."""
        if length <= 0 or not self.recording() or not 0 <= layer < len(self.layers):
            return
        geometry = self.layers[layer]
        step = geometry.chunk_size
        last = min(offset + length, geometry.uncompressed_size) - 1
        if step <= 0 or offset < 0 or last < offset:
            return
        with self._lock:
            for number in range(offset // step, last // step + 1):
                if (layer, number) in self._seen:
                    continue
                size = geometry.chunk_bytes(number)
                if self._bytes + size > self.max_bytes or len(self._seen) >= self.max_ranges:
                    return
                self._seen[(layer, number)] = None
                self._bytes += size

    def ranges(self) -> list[PrefetchRange]:
        """What was read, adjacent chunks of a layer joined, in first-read order."""
        with self._lock:
            chunks = list(self._seen)
        out: list[PrefetchRange] = []
        previous: tuple[int, int] | None = None
        for layer, number in chunks:
            geometry = self.layers[layer]
            size = geometry.chunk_bytes(number)
            if previous == (layer, number - 1) and out:
                last = out[-1]
                out[-1] = PrefetchRange(last.layer, last.offset, last.length + size)
            else:
                out.append(PrefetchRange(geometry.digest, number * geometry.chunk_size, size))
            previous = (layer, number)
        return out[: self.max_ranges]


def plan(
    ranges: Sequence[PrefetchRange],
    layers: Sequence[LayerGeometry],
    max_bytes: int = MAX_BYTES,
) -> list[tuple[int, list[int]]]:
    """The chunks to read for `ranges`: per range (in list order) its layer's position and chunk
    numbers, each chunk once, at most `max_bytes` in all. Ranges of layers the image does not
    have, or past a layer's end, are skipped: the list is advice, never trusted for more."""
    position = {g.digest: i for i, g in enumerate(layers)}
    seen: set[tuple[int, int]] = set()
    total = 0
    out: list[tuple[int, list[int]]] = []
    for r in ranges[:MAX_RANGES]:
        layer = position.get(r.layer)
        if layer is None or r.offset < 0 or r.length <= 0:
            continue
        geometry = layers[layer]
        last = min(r.offset + r.length, geometry.uncompressed_size) - 1
        if geometry.chunk_size <= 0 or last < r.offset:
            continue
        numbers = []
        for number in range(r.offset // geometry.chunk_size, last // geometry.chunk_size + 1):
            size = geometry.chunk_bytes(number)
            if (layer, number) in seen:
                continue
            if total + size > max_bytes:
                break
            seen.add((layer, number))
            total += size
            numbers.append(number)
        if numbers:
            out.append((layer, numbers))
        if total >= max_bytes:
            break
    return out
