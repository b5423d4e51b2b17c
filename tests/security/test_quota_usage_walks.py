"""An org's usage is a walk over all its links: no tenant can make it run more often than once
per `max_age` per process, however many uploads, manifests or usage requests it sends at once
(`registry/quotas.py` `QuotaGate`), and a blob DELETE refreshes only the deleting org's figure."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from skyreg.meta.quotas import Quota
from skyreg.oci.errors import RegistryError
from skyreg.registry.quotas import QuotaGate


class _Meta:
    """`QuotaMeta`'s queries, counted: org 1 (acme) owns `web`, org 2 (rival) owns `rival`."""

    def __init__(self) -> None:
        self.walks: dict[int, int] = {1: 0, 2: 0}
        self.release = threading.Event()

    async def read(self, fn: Any, *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    def quota_for(self, repository: str) -> tuple[int, str, Quota] | None:
        app = repository.split("/")[0]
        if app == "web":
            return 1, "acme", Quota(hard=1000)
        if app == "rival":
            return 2, "rival", Quota(hard=1000)
        return None

    def org_usage(self, org_id: int) -> tuple[int, int]:
        self.walks[org_id] += 1
        self.release.wait(10)  # a slow walk: everyone else arrives while it runs
        return 600, 3

    def holds(self, org_id: int, digest: str) -> bool:
        return False


def test_concurrent_checks_and_usage_requests_share_one_walk() -> None:
    meta = _Meta()
    gate = QuotaGate(meta, max_age=3600)  # type: ignore[arg-type]

    async def main() -> list[Any]:
        calls = [gate.admit_blob("web", f"sha256:{i:064x}", 100) for i in range(20)]
        calls += [gate.usage(1) for _ in range(20)]
        calls += [gate.admit_blob("web", None, None) for _ in range(10)]
        tasks = [asyncio.ensure_future(c) for c in calls]
        await asyncio.sleep(0.05)
        meta.release.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(main())
    assert meta.walks == {1: 1, 2: 0}
    assert not [r for r in results if isinstance(r, BaseException)]


def test_admitted_blobs_count_until_the_next_walk_and_a_delete_refreshes_only_its_org() -> None:
    meta = _Meta()
    meta.release.set()
    gate = QuotaGate(meta, max_age=3600)  # type: ignore[arg-type]

    async def main() -> None:
        for i in range(4):  # 600 + 4 x 100 = 1000: at the limit, not past it
            await gate.admit_blob("web", f"sha256:{i:064x}", 100, linking=True)
        with pytest.raises(RegistryError) as refused:
            await gate.admit_blob("web", "sha256:" + "f" * 64, 1, linking=True)
        assert "acme" in refused.value.message and "1000 B" in refused.value.message
        assert await gate.usage(1) == (1000, 3)
        await gate.usage(2)
        await gate.forget("web")  # a blob DELETE in acme's repository
        assert await gate.usage(1) == (600, 3)
        await gate.usage(2)

    asyncio.run(main())
    assert meta.walks == {1: 2, 2: 1}
