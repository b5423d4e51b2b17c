"""Retention per app (`meta/retention.py`) and quotas per org (`meta/quotas.py`) on SQLite and
PostgreSQL: which tags a policy keeps and why, what its untagged delay does to GC's queue, and
how usage counts blobs once per org."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from skyreg.meta import schema as s
from skyreg.meta.gc import GcMeta, GcSettings
from skyreg.meta.platform import PlatformMeta
from skyreg.meta.quotas import Quota, QuotaCheck, QuotaInvalid, QuotaMeta
from skyreg.meta.registry import RegistryMeta, open_database
from skyreg.meta.retention import PolicyInvalid, RetentionMeta, RetentionPolicy
from skyreg.oci.digest import digest_of
from skyreg.oci.manifest import Manifest
from tests.support.meta import DATABASES, link_blobs, manifest_of

DAY = timedelta(days=1)


@pytest.fixture(params=sorted(DATABASES))
def meta(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RegistryMeta]:
    m = open_database(DATABASES[request.param](request, tmp_path), tmp_path)
    m.gc = GcSettings(review_delay=3600.0)
    yield m
    m.close()


@pytest.fixture
def platform(meta: RegistryMeta) -> PlatformMeta:
    p = PlatformMeta(meta.db)
    org = p.create_org("acme")
    p.create_app("web", org.id)
    p.create_app("api", org.id)
    other = p.create_org("other")
    p.create_app("rival", other.id)
    return p


@pytest.fixture
def retention(meta: RegistryMeta) -> RetentionMeta:
    r = RetentionMeta(meta.db)
    r.review_delay = 3600.0
    return r


def _app_id(platform: PlatformMeta, name: str) -> int:
    app = platform.get_app(name)
    assert app is not None
    return app.id


def _push(meta: RegistryMeta, repo: str, seed: str, tags: list[str]) -> Manifest:
    config, layer = f"config {seed}".encode(), f"layer {seed}".encode()
    link_blobs(meta, repo, config, layer)
    m = manifest_of(config, [layer])
    meta.put_manifest(repo, m, tags)
    return m


def _age(meta: RegistryMeta, repo: str, tag: str, by: timedelta) -> None:
    """Make a tag look pushed `by` ago."""
    with meta.engine.begin() as conn:
        repo_id = conn.execute(
            select(s.repositories.c.id).where(s.repositories.c.name == repo)
        ).scalar_one()
        conn.execute(
            update(s.tags)
            .where(s.tags.c.repository_id == repo_id, s.tags.c.name == tag)
            .values(updated_at=datetime.now(UTC) - by)
        )


def _tags(meta: RegistryMeta, repo: str) -> list[str]:
    return meta.list_tags(repo, None, None)


def _review_after(meta: RegistryMeta, digest: str) -> datetime:
    with meta.engine.connect() as conn:
        value = conn.execute(
            select(s.gc_manifest_reviews.c.review_after).where(
                s.gc_manifest_reviews.c.digest == digest
            )
        ).scalar_one()
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def test_keep_recent_keeps_the_newest_tags_of_each_repository_and_patterns_keep_any_age(
    meta: RegistryMeta, platform: PlatformMeta, retention: RetentionMeta
) -> None:
    for i in range(5):
        _push(meta, "web", f"w{i}", [f"build-{i}"])
        _age(meta, "web", f"build-{i}", (10 - i) * DAY)  # build-4 is the newest
    _push(meta, "web", "release", ["v1.0"])
    _age(meta, "web", "v1.0", 30 * DAY)
    _push(meta, "web/worker", "x", ["old"])
    _age(meta, "web/worker", "old", 40 * DAY)
    _push(meta, "webby", "y", ["old"])  # another app's repository, despite the prefix
    _age(meta, "webby", "old", 40 * DAY)
    app_id = _app_id(platform, "web")
    retention.set_policy(app_id, RetentionPolicy(keep_tags=("v*",), keep_recent=2))

    planned = retention.plan("web", RetentionPolicy(keep_tags=("v*",), keep_recent=2))
    assert sorted(t.tag for t in planned) == ["build-0", "build-1", "build-2"]
    dry = retention.apply(app_id, "web", dry_run=True)
    assert sorted(t.tag for t in dry.tags) == ["build-0", "build-1", "build-2"]
    assert len(_tags(meta, "web")) == 6  # a dry run deletes nothing

    done = retention.apply(app_id, "web")
    assert done.tags_deleted == 3
    assert _tags(meta, "web") == ["build-3", "build-4", "v1.0"]
    assert _tags(meta, "web/worker") == ["old"]  # the newest of its own repository
    assert _tags(meta, "webby") == ["old"]
    stored = retention.get_policy(app_id)
    assert stored is not None and stored.tags_deleted == 3 and stored.last_run_at is not None


def test_a_pull_counts_as_recent_and_keep_within_keeps_what_was_pushed_or_pulled_lately(
    meta: RegistryMeta, platform: PlatformMeta, retention: RetentionMeta
) -> None:
    pulled = _push(meta, "api", "a", ["pulled"])
    _push(meta, "api", "b", ["stale"])
    _push(meta, "api", "c", ["fresh"])
    _age(meta, "api", "pulled", 20 * DAY)
    _age(meta, "api", "stale", 20 * DAY)
    _age(meta, "api", "fresh", DAY)
    now = datetime.now(UTC)
    assert retention.record_pulls({("api", str(pulled.digest)): now - DAY}) == 1
    # an older pull time never moves it back; an unknown repository is ignored
    assert retention.record_pulls({("api", str(pulled.digest)): now - 30 * DAY}) == 1
    assert retention.record_pulls({("nowhere", str(pulled.digest)): now}) == 0
    policy = RetentionPolicy(keep_within=7 * 24 * 3600)
    retention.set_policy(_app_id(platform, "api"), policy)
    assert [t.tag for t in retention.plan("api", policy)] == ["stale"]
    retention.apply(_app_id(platform, "api"), "api")
    assert _tags(meta, "api") == ["fresh", "pulled"]


def test_a_policy_without_keep_rules_deletes_no_tag(
    meta: RegistryMeta, platform: PlatformMeta, retention: RetentionMeta
) -> None:
    _push(meta, "web", "a", ["ancient"])
    _age(meta, "web", "ancient", 3000 * DAY)
    retention.set_policy(_app_id(platform, "web"), RetentionPolicy(untagged_after=60))
    assert retention.apply(_app_id(platform, "web"), "web").tags_deleted == 0
    assert _tags(meta, "web") == ["ancient"]


def test_a_tag_moved_since_it_was_planned_stays(
    meta: RegistryMeta, platform: PlatformMeta, retention: RetentionMeta
) -> None:
    _push(meta, "web", "a", ["moving"])
    _push(meta, "web", "b", ["kept"])
    _age(meta, "web", "moving", 10 * DAY)
    policy = RetentionPolicy(keep_recent=1)
    retention.set_policy(_app_id(platform, "web"), policy)
    planned = retention.plan("web", policy)
    assert [t.tag for t in planned] == ["moving"]
    # the delete's condition is the planned (digest, push time): a push since changes both
    newer = _push(meta, "web", "c", ["moving"])
    _age(meta, "web", "kept", 10 * DAY)  # now "kept" is the older one
    retention.apply(_app_id(platform, "web"), "web")
    assert _tags(meta, "web") == ["moving"]
    assert meta.get_manifest("web", "moving", False) is not None
    assert meta.get_manifest("web", "moving", False).digest == str(newer.digest)  # type: ignore[union-attr]


def test_the_untagged_delay_of_an_app_replaces_the_review_delay_and_moves_queued_reviews(
    meta: RegistryMeta, platform: PlatformMeta, retention: RetentionMeta
) -> None:
    before = _push(meta, "web", "a", ["t"])
    meta.delete_tag("web", "t")  # queued with the registry's delay: an hour
    hour_ahead = _review_after(meta, str(before.digest))
    assert hour_ahead > datetime.now(UTC) + timedelta(minutes=50)
    retention.set_policy(_app_id(platform, "web"), RetentionPolicy(untagged_after=60))

    after = _push(meta, "web", "b", ["u"])
    meta.delete_tag("web", "u")
    assert _review_after(meta, str(after.digest)) < datetime.now(UTC) + timedelta(seconds=61)
    other = _push(meta, "rival", "c", ["v"])
    meta.delete_tag("rival", "v")  # another app: the registry's delay
    assert _review_after(meta, str(other.digest)) > datetime.now(UTC) + timedelta(minutes=50)

    run = retention.apply(_app_id(platform, "web"), "web")
    assert run.reviews_advanced == 1
    assert _review_after(meta, str(before.digest)) < datetime.now(UTC) + timedelta(seconds=61)
    assert _review_after(meta, str(other.digest)) > datetime.now(UTC) + timedelta(minutes=50)


def test_a_manifest_pushed_by_digest_keeps_a_grace_period_whatever_the_untagged_delay(
    meta: RegistryMeta, platform: PlatformMeta, retention: RetentionMeta
) -> None:
    retention.set_policy(_app_id(platform, "web"), RetentionPolicy(untagged_after=0))
    child = _push(meta, "web", "child", [])  # an index's child, pushed before its index
    assert _review_after(meta, str(child.digest)) > datetime.now(UTC) + timedelta(minutes=9)


def test_retention_runs_and_gc_delete_the_untagged_image_and_its_pull_time(
    meta: RegistryMeta, platform: PlatformMeta, retention: RetentionMeta
) -> None:
    meta.gc = GcSettings(review_delay=0.0)
    old = _push(meta, "web", "old", ["old"])
    _push(meta, "web", "new", ["new"])
    _age(meta, "web", "old", 10 * DAY)
    retention.record_pulls({("web", str(old.digest)): datetime.now(UTC) - 9 * DAY})
    retention.set_policy(_app_id(platform, "web"), RetentionPolicy(keep_recent=1, untagged_after=0))
    assert retention.apply(_app_id(platform, "web"), "web").tags_deleted == 1
    gc = GcMeta(meta.db)
    gc.settings = meta.gc
    for repo_id, digest in gc.due_manifest_reviews(10):
        assert gc.review_manifest(repo_id, digest).outcome == "deleted"
    with meta.engine.connect() as conn:
        assert conn.execute(select(s.manifest_pulls)).all() == []


def test_policies_with_out_of_range_values_are_refused() -> None:
    for bad in (
        {"keep_tags": ("",)},
        {"keep_tags": ("x" * 129,)},
        {"keep_tags": tuple(f"p{i}" for i in range(33))},
        {"keep_tags": ("a\nb",)},
        {"keep_recent": -1},
        {"keep_within": -5},
        {"untagged_after": 10**12},
    ):
        with pytest.raises(PolicyInvalid):
            RetentionPolicy(**bad)  # type: ignore[arg-type]


# -- quotas ------------------------------------------------------------------------------------


def quota_check(
    quotas: QuotaMeta, repository: str, digest: str | None, size: int
) -> QuotaCheck | None:
    """What the registry's quota gate asks before storing `digest` in `repository`, uncached."""
    found = quotas.quota_for(repository)
    if found is None:
        return None
    org_id, org, quota = found
    held = digest is not None and quotas.holds(org_id, digest)
    return QuotaCheck(org, quotas.org_usage(org_id)[0], 0 if held else size, quota)


def test_usage_counts_each_blob_once_per_org_and_every_org_holding_it(
    meta: RegistryMeta, platform: PlatformMeta
) -> None:
    quotas = QuotaMeta(meta.db)
    shared, own = b"s" * 1000, b"o" * 300
    link_blobs(meta, "web", shared, own)
    link_blobs(meta, "web/worker", shared)
    link_blobs(meta, "api", shared)
    link_blobs(meta, "rival", shared)
    link_blobs(meta, "webby", b"x" * 5000)  # no app owns it
    acme, other = platform.get_org("acme"), platform.get_org("other")
    assert acme is not None and other is not None
    assert (quotas.usage(acme.id).bytes, quotas.usage(acme.id).blobs) == (1300, 2)
    assert quotas.usage(other.id).bytes == 1000
    assert quotas.usage(acme.id).quota is None and quotas.usage(acme.id).state == "ok"

    assert quota_check(quotas, "web", str(digest_of(b"new")), 50) is None  # no quota yet
    quotas.set_quota(acme.id, Quota(soft=1000, hard=1400))
    check = quota_check(quotas, "api/deep", str(digest_of(b"new")), 50)
    assert check is not None and (check.org, check.used, check.adding) == ("acme", 1300, 50)
    assert check.over_soft and not check.over_hard
    held = quota_check(
        quotas, "api", str(digest_of(own)), len(own)
    )  # another app of the org holds it
    assert held is not None and held.adding == 0
    big = quota_check(quotas, "web", None, 101)
    assert big is not None and big.over_hard
    assert quota_check(quotas, "rival", None, 10**9) is None  # the other org has none
    assert quotas.usage(acme.id).state == "soft"

    meta.unlink_blob("web", str(digest_of(own)))
    assert quotas.usage(acme.id).bytes == 1000  # a link gone is usage gone
    quotas.set_quota(acme.id, None)
    assert quotas.usage(acme.id).quota is None


def test_quotas_with_a_soft_limit_above_the_hard_one_are_refused() -> None:
    with pytest.raises(QuotaInvalid):
        Quota(soft=10, hard=5)
    with pytest.raises(QuotaInvalid):
        Quota(hard=-1)
