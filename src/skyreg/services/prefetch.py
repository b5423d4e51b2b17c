"""Learned prefetch lists for lazy pull (issue 18): what the machines of an image read in their
first seconds, as an agent reports it, for the next lazy start of the image (on any host) to
fetch first (`lazy/prefetch.py` says what a list is).

Agents only (an admin or agent token; an agent token bound to an org: that org's apps): a list
belongs to one manifest of one of an app's repositories (`DIGEST` or `REPO@DIGEST`), another
org's answers as a missing one does. A report replaces the list; it is bounded (`MAX_RANGES`
ranges, `MAX_BYTES` in all) and names only layers of the manifest itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated

import msgspec

from skyreg.lazy.prefetch import MAX_BYTES, MAX_RANGE_BYTES, MAX_RANGES, PrefetchRange
from skyreg.meta.platform import App, PlatformMeta, TokenRecord
from skyreg.meta.prefetch import PrefetchMeta
from skyreg.meta.registry import RegistryMeta
from skyreg.oci.digest import Digest
from skyreg.oci.errors import RegistryError
from skyreg.oci.manifest import parse_manifest
from skyreg.services.access import sees_org
from skyreg.services.errors import Forbidden, Invalid, NotFound
from skyreg.services.images import split_reference
from skyreg.services.inputs import Body, Input, given

MAX_OFFSET = 1 << 50  # bytes into a layer's uncompressed stream (IndexLimits: 64 GiB)
MAX_BODY = 1 << 20  # bytes of a report (MAX_RANGES ranges of about 110 bytes each)


def _doc(**schema: object) -> msgspec.Meta:
    return msgspec.Meta(extra_json_schema=schema)


class PrefetchRangeInput(Input):
    """Bytes of one layer's uncompressed stream (its tar) a machine read."""

    layer: Annotated[str, _doc(description="The layer blob's digest (one of the manifest's)")]
    offset: Annotated[int, _doc(minimum=0, description="Offset in the uncompressed stream")]
    length: Annotated[int, _doc(minimum=1, maximum=MAX_RANGE_BYTES)]


class PrefetchReport(Input):
    """`PUT /agent/apps/{app}/images/{reference}/prefetch`: what the image's machine read in its
    first seconds, in the order it read it (replaces the image's list)."""

    ranges: Annotated[
        list[PrefetchRangeInput],
        _doc(maxItems=MAX_RANGES, description=f"At most {MAX_BYTES} bytes in all"),
    ]


@dataclass(frozen=True)
class PrefetchList:
    """An image's prefetch list (`reported_at` None: none reported yet, `ranges` empty)."""

    repository: str
    digest: str
    ranges: list[PrefetchRange]
    bytes: int
    reported_at: datetime | None


@dataclass
class PrefetchService:
    """Prefetch lists over `PrefetchMeta`, images found through `RegistryMeta`."""

    platform: PlatformMeta
    registry: RegistryMeta
    meta: PrefetchMeta = field(init=False)

    def __post_init__(self) -> None:
        self.meta = PrefetchMeta(self.platform.db)

    @staticmethod
    def _agent(caller: TokenRecord) -> None:
        if caller.kind not in ("admin", "agent"):
            raise Forbidden(f"a {caller.kind} token may not read or report prefetch lists")

    async def get(self, caller: TokenRecord, app: str, reference: str) -> PrefetchList:
        """The prefetch list of the image `reference` (a digest) of the app."""
        self._agent(caller)
        return await self.platform.read(self._get, caller, app, reference)

    def _get(self, caller: TokenRecord, name: str, reference: str) -> PrefetchList:
        repository, digest, _ = self._image(caller, name, reference)
        found = self.meta.get(repository, digest)
        if found is None:
            return PrefetchList(repository, digest, [], 0, None)
        ranges = [
            PrefetchRange(layer, offset, length)
            for layer, offset, length in msgspec.json.decode(
                found.ranges, type=list[tuple[str, int, int]]
            )
        ]
        return PrefetchList(repository, digest, ranges, found.bytes, found.reported_at)

    async def replace(
        self, caller: TokenRecord, app: str, reference: str, body: Body[PrefetchReport]
    ) -> PrefetchList:
        """Keep an agent's report as the image's prefetch list (`body` is asked for once the
        image is found)."""
        self._agent(caller)
        return await self.platform.run(self._replace, caller, app, reference, body)

    def _replace(
        self, caller: TokenRecord, name: str, reference: str, body: Body[PrefetchReport]
    ) -> PrefetchList:
        repository, digest, layers = self._image(caller, name, reference)
        report = given(body)
        ranges = _checked(report.ranges, layers)
        encoded = msgspec.json.encode([(r.layer, r.offset, r.length) for r in ranges]).decode()
        size = sum(r.length for r in ranges)
        stored = self.meta.replace(repository, digest, encoded, len(ranges), size)
        if stored is None:  # deleted meanwhile
            raise NotFound("image", reference[:200])
        return PrefetchList(repository, digest, ranges, size, stored.reported_at)

    def _visible(self, caller: TokenRecord, name: str) -> App:
        app = self.platform.get_app(name)
        every_org = caller.kind == "agent" and caller.org_id is None
        if app is None or not (every_org or sees_org(caller, app.org_id)):
            raise NotFound("app", name)
        return app

    def _image(self, caller: TokenRecord, name: str, reference: str) -> tuple[str, str, set[str]]:
        """(repository, manifest digest, its layers' digests) of an image of the app."""
        app = self._visible(caller, name)
        repository, ref, by_digest = split_reference(app.name, reference)
        if repository != app.name and not repository.startswith(app.name + "/"):
            raise NotFound("image", reference[:200])
        if not by_digest:
            raise Invalid("reference must be DIGEST or REPO@DIGEST: a list is one manifest's")
        try:
            parsed = Digest.parse(ref)
        except RegistryError:
            raise Invalid("reference must hold a valid digest") from None
        stored = self.registry.get_manifest(repository, str(parsed), by_digest=True)
        if stored is None:
            raise NotFound("image", reference[:200])
        try:
            manifest = parse_manifest(stored.content, stored.media_type, parsed)
        except RegistryError:
            raise NotFound("image", reference[:200]) from None
        if manifest.is_index:
            raise Invalid("an image index has no layers: name one platform's manifest")
        return repository, str(parsed), {str(d.digest) for d in manifest.layers}


def _checked(ranges: list[PrefetchRangeInput], layers: set[str]) -> list[PrefetchRange]:
    """The report's ranges, or Invalid naming the first one out of bounds."""
    if len(ranges) > MAX_RANGES:
        raise Invalid(f"ranges must hold at most {MAX_RANGES} ranges")
    total = 0
    out = []
    for number, r in enumerate(ranges):
        if r.layer not in layers:
            raise Invalid(f"ranges[{number}]: layer {r.layer[:100]!r} is not a layer of the image")
        if not 0 <= r.offset <= MAX_OFFSET:
            raise Invalid(f"ranges[{number}]: offset must be a whole number from 0 to {MAX_OFFSET}")
        if not 1 <= r.length <= MAX_RANGE_BYTES:
            raise Invalid(
                f"ranges[{number}]: length must be a whole number from 1 to {MAX_RANGE_BYTES}"
            )
        total += r.length
        if total > MAX_BYTES:
            raise Invalid(f"ranges must cover at most {MAX_BYTES} bytes in all")
        out.append(PrefetchRange(r.layer, r.offset, r.length))
    return out
