"""Concurrent writers on one database: threads, each with its own metadata objects (as worker
processes or servers have), race on the same rows; the end state must be consistent.

Run against every supported database (SQLite serializes writers; PostgreSQL runs them at once).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from sqlalchemy import Engine, func, inspect, select

from skyreg.auth.secrets import new_token_id
from skyreg.meta import schema as s
from skyreg.meta.db import SqlStore, create_db_engine, head_revision
from skyreg.meta.errors import ManifestInUse, ReferenceMissing
from skyreg.meta.machines import MachineMeta
from skyreg.meta.platform import AlreadyExists, PlatformMeta, ReleaseMeta
from skyreg.meta.registry import RegistryMeta, open_database
from skyreg.oci import mediatypes as mt
from skyreg.oci.digest import digest_of
from skyreg.oci.manifest import Manifest, parse_manifest
from tests.support.meta import DATABASES, descriptor_of, link_blobs, manifest_of

T = TypeVar("T")
S = TypeVar("S", bound=SqlStore)
THREADS = 8


@pytest.fixture(params=sorted(DATABASES))
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return DATABASES[request.param](request, tmp_path)


class Stores:
    """Metadata objects on one database, each with an engine of its own, closed at the end."""

    def __init__(self, url: str, data_dir: Path) -> None:
        self.url, self.data_dir = url, data_dir
        self.opened: list[SqlStore] = []

    def registry(self) -> RegistryMeta:
        meta = open_database(self.url, self.data_dir)
        self.opened.append(meta)
        return meta

    def of(self, kind: type[S]) -> S:
        store = kind(create_db_engine(self.url))
        self.opened.append(store)
        return store

    def close(self) -> None:
        for store in self.opened:
            store.close()


@pytest.fixture
def stores(database_url: str, tmp_path: Path) -> Iterator[Stores]:
    st = Stores(database_url, tmp_path)
    st.registry()  # migrated once up front
    yield st
    st.close()


def race(n: int, work: Callable[[int], T]) -> list[T | Exception]:
    """Run work(0..n-1) in n threads released at once; each result or the exception raised."""
    barrier = threading.Barrier(n)
    results: list[T | Exception | None] = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = work(i)
        except Exception as e:
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a writer hung"
    return results  # type: ignore[return-value]


def no_errors(results: list[T | Exception]) -> list[T]:
    errors = [r for r in results if isinstance(r, Exception)]
    assert not errors, errors
    return results  # type: ignore[return-value]


def _index(*children: Manifest) -> Manifest:
    raw = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": mt.OCI_INDEX,
            "manifests": [descriptor_of(c.raw, mt.OCI_MANIFEST) for c in children],
        }
    ).encode()
    return parse_manifest(raw, mt.OCI_INDEX, digest_of(raw))


def assert_consistent(engine: Engine, meta: RegistryMeta) -> None:
    """Every tag names a stored manifest; every stored manifest's blobs are linked into its
    repository and its child manifests are stored there; a blob row left without a link has a GC
    review queued (which deletes it)."""
    m, t, refs, rb = s.manifests, s.tags, s.manifest_references, s.repository_blobs
    with engine.connect() as conn:
        dangling_tags = conn.execute(
            select(t.c.name, t.c.manifest_digest).where(
                ~select(m.c.digest)
                .where(m.c.repository_id == t.c.repository_id, m.c.digest == t.c.manifest_digest)
                .exists()
            )
        ).all()
        assert dangling_tags == []
        stored = conn.execute(select(m.c.repository_id, m.c.digest, m.c.media_type, m.c.content))
        for repo_id, digest, media_type, content in stored:
            parsed = parse_manifest(bytes(content), media_type, digest_of(bytes(content)))
            assert str(parsed.digest) == digest
            for blob in parsed.required_blobs():
                linked = conn.execute(
                    select(rb.c.digest).where(
                        rb.c.repository_id == repo_id, rb.c.digest == str(blob.digest)
                    )
                ).first()
                assert linked is not None, f"{digest} references unlinked blob {blob.digest}"
            for child in parsed.manifests:
                present = conn.execute(
                    select(m.c.digest).where(
                        m.c.repository_id == repo_id, m.c.digest == str(child.digest)
                    )
                ).first()
                assert present is not None, f"{digest} references missing manifest {child.digest}"
        missing_children = conn.execute(
            select(refs.c.parent_digest, refs.c.child_digest).where(
                refs.c.kind == "manifest",
                ~select(m.c.digest)
                .where(m.c.repository_id == refs.c.repository_id, m.c.digest == refs.c.child_digest)
                .exists(),
            )
        ).all()
        assert missing_children == []
        forgotten_blobs = conn.execute(
            select(s.blobs.c.digest).where(
                ~select(rb.c.digest).where(rb.c.digest == s.blobs.c.digest).exists(),
                ~select(s.gc_blob_reviews.c.digest)
                .where(s.gc_blob_reviews.c.digest == s.blobs.c.digest)
                .exists(),
            )
        ).all()
        assert forgotten_blobs == []


def test_servers_migrating_a_new_database_at_once_bring_it_up_once(
    database_url: str, tmp_path: Path
) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "skyreg", "db", "upgrade", "--database-url", database_url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert out.strip() == f"database schema at revision {head_revision()}"
    engine = create_db_engine(database_url)
    try:
        tables = set(inspect(engine).get_table_names())
        with engine.connect() as conn:
            versions = conn.exec_driver_sql("SELECT version_num FROM alembic_version").all()
    finally:
        engine.dispose()
    assert set(s.metadata.tables) <= tables
    assert versions == [(head_revision(),)]


def test_writers_pushing_and_moving_the_same_tags_leave_every_tag_on_a_complete_manifest(
    stores: Stores,
) -> None:
    metas = [stores.registry() for _ in range(THREADS)]
    tags = ["latest", "stable", "v1", "v2", "v3"]
    shared_layer = b"shared layer"
    pushed: list[list[str]] = [[] for _ in range(THREADS)]

    def writer(i: int) -> None:
        meta, rng = metas[i], random.Random(i)
        for j in range(12):
            config = f"config {i}-{j}".encode()
            layer = f"layer {i}-{j}".encode()
            link_blobs(meta, "app/web", config, layer, shared_layer)
            image = manifest_of(config, [layer, shared_layer])
            meta.put_manifest("app/web", image, rng.sample(tags, rng.randint(1, 3)))
            pushed[i].append(str(image.digest))
            if j % 4 == 3:  # an index over this writer's last image, under moving tags
                meta.put_manifest("app/web", _index(image), rng.sample(tags, 2))
            if j % 5 == 4:
                meta.delete_tag("app/web", rng.choice(tags))

    no_errors(race(THREADS, writer))
    check = metas[0]
    assert_consistent(check.engine, check)
    for tag in check.list_tags("app/web", None, None):
        assert tag in tags
        assert check.get_manifest("app/web", tag, by_digest=False) is not None
    for digest in (d for ds in pushed for d in ds):
        assert check.get_manifest("app/web", digest, by_digest=True) is not None
    assert check.catalog(None, None) == ["app/web"]


def test_writers_creating_many_repositories_at_once_each_get_one(stores: Stores) -> None:
    metas = [stores.registry() for _ in range(THREADS)]
    repos = [f"app/r{k}" for k in range(10)]

    def writer(i: int) -> None:
        for repo in random.Random(i).sample(repos, len(repos)):
            link_blobs(metas[i], repo, b"cfg", f"layer {i}".encode())
            metas[i].create_upload(f"u-{i}-{repo.replace('/', '-')}", repo)

    no_errors(race(THREADS, writer))
    with metas[0].engine.connect() as conn:
        count = conn.execute(select(func.count()).select_from(s.repositories)).scalar_one()
    assert count == len(repos)
    assert metas[0].repositories_with_blob(str(digest_of(b"cfg"))) == sorted(repos)


def test_the_same_blob_linked_and_unlinked_at_once_is_linked_exactly_where_it_should_be(
    stores: Stores,
) -> None:
    metas = [stores.registry() for _ in range(THREADS)]
    blob = b"a blob every writer links"
    digest = str(digest_of(blob))

    def writer(i: int) -> None:
        for _ in range(30):
            metas[i].link_blob(f"own/{i}", digest, len(blob))
            assert metas[i].blob_size(f"own/{i}", digest) == len(blob)
            assert metas[i].unlink_blob(f"own/{i}", digest)
        metas[i].link_blob("shared", digest, len(blob))
        if i % 2:  # odd writers end linked
            metas[i].link_blob(f"own/{i}", digest, len(blob))

    no_errors(race(THREADS, writer))
    check = metas[0]
    linked = ["shared", *(f"own/{i}" for i in range(1, THREADS, 2))]
    assert check.repositories_with_blob(digest) == sorted(linked)
    assert check.blob_size("shared", digest) == len(blob)
    assert_consistent(check.engine, check)

    def repo(i: int) -> str:
        return "shared" if i == 0 else f"own/{i}"

    for _round in range(15):  # the last links go at once: each unlinks its own; GC reviews it
        for i in range(THREADS):
            check.link_blob(repo(i), digest, len(blob))
        results = no_errors(race(THREADS, lambda i: metas[i].unlink_blob(repo(i), digest)))
        assert all(results)
        assert check.repositories_with_blob(digest) == []
        assert_consistent(check.engine, check)


def test_deleting_a_manifest_while_an_index_referencing_it_is_pushed_never_leaves_it_dangling(
    stores: Stores,
) -> None:
    deleter, pusher = stores.registry(), stores.registry()
    outcomes = {"pushed": 0, "deleted": 0}
    for k in range(40):
        config, layer = f"cfg {k}".encode(), f"layer {k}".encode()
        link_blobs(deleter, "app/multi", config, layer)
        child = manifest_of(config, [layer])
        deleter.put_manifest("app/multi", child, [f"child-{k}"])
        index = _index(child)

        def work(i: int, child: Manifest = child, index: Manifest = index, k: int = k) -> bool:
            if i == 0:
                return deleter.delete_manifest("app/multi", str(child.digest))
            pusher.put_manifest("app/multi", index, [f"index-{k}"])
            return True

        deleted, pushed = race(2, work)
        if isinstance(pushed, ReferenceMissing):
            assert pushed.missing == [str(child.digest)]
            assert deleted is True
            assert deleter.get_manifest("app/multi", str(child.digest), by_digest=True) is None
            assert deleter.get_manifest("app/multi", f"index-{k}", by_digest=False) is None
            outcomes["deleted"] += 1
        else:
            assert pushed is True
            # the delete lost: refused because the index now references the manifest
            assert isinstance(deleted, ManifestInUse), deleted
            assert deleter.get_manifest("app/multi", str(child.digest), by_digest=True) is not None
            assert deleter.get_manifest("app/multi", f"index-{k}", by_digest=False) is not None
            outcomes["pushed"] += 1
        assert_consistent(deleter.engine, deleter)
    assert sum(outcomes.values()) == 40


def test_concurrent_deploys_number_an_apps_releases_densely(stores: Stores) -> None:
    platform = stores.of(PlatformMeta)
    org = platform.create_org("acme")
    platform.create_app("web", org.id)
    platform.create_app("api", org.id)
    web, api = platform.get_app("web"), platform.get_app("api")
    assert web is not None and api is not None
    releases = [stores.of(ReleaseMeta) for _ in range(THREADS)]
    machines = [stores.of(MachineMeta) for _ in range(THREADS)]

    def deployer(i: int) -> list[tuple[str, int]]:
        got = []
        for j in range(6):
            app = web if (i + j) % 3 else api
            release = releases[i].create_release(
                app_id=app.id,
                status="pending",
                description=f"deploy {i}-{j}",
                reason="deploy",
                image_ref=f"h/{app.name}:t{i}",
                image_repository=app.name,
                image_digest="sha256:" + "0" * 64,
                strategy="immediate" if j % 2 else "rolling",
                regions=["local"],
                machine_count=1,
                user_id="t",
                user_name="token",
            )
            machines[i].create_for_release(release.id, app.id, ["local"], 1, release.strategy)
            got.append((app.name, release.version))
        return got

    made = [r for rs in no_errors(race(THREADS, deployer)) for r in rs]
    for app in (web, api):
        versions = sorted(v for name, v in made if name == app.name)
        assert versions == list(range(1, len(versions) + 1))
        listed = releases[0].list_releases(app.id, 1000)
        assert sorted(r.version for r in listed) == versions
        assert all(r.status == "running" for r in listed)


def test_agents_reporting_at_once_complete_the_release(stores: Stores) -> None:
    platform = stores.of(PlatformMeta)
    org = platform.create_org("acme")
    platform.create_app("web", org.id)
    app = platform.get_app("web")
    assert app is not None
    agents = [stores.of(MachineMeta) for _ in range(THREADS)]
    release_meta = stores.of(ReleaseMeta)
    for _round in range(10):
        release = release_meta.create_release(
            app_id=app.id,
            status="pending",
            description="d",
            reason="deploy",
            image_ref="h/web:t",
            image_repository="web",
            image_digest="sha256:" + "0" * 64,
            strategy="rolling",
            regions=["local"],
            machine_count=THREADS,
            user_id="t",
            user_name="token",
        )
        ids = agents[0].create_for_release(release.id, app.id, ["local"], THREADS, "rolling")
        for machine_id in ids:
            agents[0].report_state(machine_id, "starting", None)
        no_errors(race(THREADS, lambda i, ids=ids: agents[i].report_state(ids[i], "started", None)))
        done = release_meta.get_release(release.id)
        assert done is not None and done.status == "complete" and done.stable
        desired = {m.release_id: m.desired for m in agents[0].of_app(app.id)}
        assert desired[release.id] == "started"
        assert all(d == "stopped" for rid, d in desired.items() if rid != release.id)


def test_creating_the_same_org_or_app_at_once_lets_exactly_one_win(stores: Stores) -> None:
    platforms = [stores.of(PlatformMeta) for _ in range(THREADS)]
    orgs = race(THREADS, lambda i: platforms[i].create_org("acme"))
    assert sum(not isinstance(r, Exception) for r in orgs) == 1
    assert all(isinstance(r, AlreadyExists) for r in orgs if isinstance(r, Exception))
    org = platforms[0].get_org("acme")
    assert org is not None
    apps = race(THREADS, lambda i: platforms[i].create_app("web", org.id))
    assert sum(not isinstance(r, Exception) for r in apps) == 1
    assert all(isinstance(r, AlreadyExists) for r in apps if isinstance(r, Exception))
    assert [a.name for a in platforms[0].list_apps()] == ["web"]


def test_tokens_created_at_once_are_all_kept_and_the_last_admin_survives_revocations(
    stores: Stores,
) -> None:
    platforms = [stores.of(PlatformMeta) for _ in range(THREADS)]

    def create(i: int) -> str:
        record = platforms[i].create_token(
            token_id=new_token_id(),
            name=f"admin {i}",
            kind="admin",
            secret_sha256=f"{i:064x}",
            org_id=None,
            app_id=None,
            expires_at=None,
        )
        return record.id

    ids = no_errors(race(THREADS, create))
    assert sorted(t.id for t in platforms[0].list_tokens()) == sorted(ids)
    revoked = no_errors(race(THREADS, lambda i: platforms[i].revoke_token(ids[i])))
    assert revoked.count(False) == 1
    active = [t for t in platforms[0].list_tokens() if t.active()]
    assert len(active) == 1 and active[0].kind == "admin"


def test_deploys_copying_one_image_into_an_app_at_once_copy_it_whole(stores: Stores) -> None:
    metas = [stores.registry() for _ in range(THREADS)]
    link_blobs(metas[0], "build", b"cfg", b"layer")
    child = manifest_of(b"cfg", [b"layer"])
    metas[0].put_manifest("build", child, [])
    index = _index(child)
    metas[0].put_manifest("build", index, ["v1"])

    def deploy(i: int) -> bool:
        return metas[i].copy_manifest("build", str(index.digest), "web", f"deploy-{i % 3}")

    assert all(no_errors(race(THREADS, deploy)))
    check = metas[0]
    assert check.list_tags("web", None, None) == ["deploy-0", "deploy-1", "deploy-2"]
    assert check.get_manifest("web", str(child.digest), by_digest=True) is not None
    assert check.blob_size("web", str(digest_of(b"layer"))) == len(b"layer")
    assert_consistent(check.engine, check)
