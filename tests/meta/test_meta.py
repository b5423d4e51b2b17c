"""One behavioural suite for the metadata layer, run against every supported database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
import requests
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, select

from skyreg.meta import schema
from skyreg.meta.db import create_db_engine, head_revision
from skyreg.meta.errors import BlobSizeMismatch, ManifestInUse, ReferenceMissing
from skyreg.meta.platform import PlatformMeta, ReleaseMeta
from skyreg.meta.registry import RegistryMeta, open_database
from skyreg.oci import mediatypes as mt
from skyreg.oci.digest import digest_of
from skyreg.oci.manifest import parse_manifest
from tests.support.inprocess import InProcessRegistry
from tests.support.meta import DATABASES, descriptor_of, link_blobs, manifest_of
from tests.support.oci import push_image
from tests.support.servers import RunningRegistry
from tests.support.waiting import free_port

# Every database the metadata layer supports: the URL of a fresh, empty one for a test.


@pytest.fixture(params=sorted(DATABASES))
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a fresh database, once per supported database."""
    return DATABASES[request.param](request, tmp_path)


@pytest.fixture
def meta(database_url: str, tmp_path: Path) -> Iterator[RegistryMeta]:
    m = open_database(database_url, tmp_path)
    yield m
    m.close()


def test_migrations_are_idempotent(database_url: str, tmp_path: Path) -> None:
    open_database(database_url, tmp_path).close()
    m = open_database(database_url, tmp_path)
    assert m.list_tags("none", None, None) == []
    m.close()


def test_manifest_needs_its_blobs_and_stores_nothing_otherwise(meta: RegistryMeta) -> None:
    m = manifest_of(b"cfg", [b"layer"])
    link_blobs(meta, "a", b"cfg")
    with pytest.raises(ReferenceMissing) as info:
        meta.put_manifest("a", m, ["latest"])
    assert info.value.kind == "blob" and info.value.missing == [str(digest_of(b"layer"))]
    assert meta.get_manifest("a", "latest", by_digest=False) is None
    assert meta.get_manifest("a", str(m.digest), by_digest=True) is None
    link_blobs(meta, "a", b"layer")
    meta.put_manifest("a", m, ["latest"])
    stored = meta.get_manifest("a", "latest", by_digest=False)
    assert stored is not None and stored.content == m.raw and stored.digest == str(m.digest)


def test_blob_in_another_repository_does_not_count(meta: RegistryMeta) -> None:
    link_blobs(meta, "other", b"cfg", b"layer")
    with pytest.raises(ReferenceMissing):
        meta.put_manifest("a", manifest_of(b"cfg", [b"layer"]), [])


def test_descriptor_size_must_match_blob(meta: RegistryMeta) -> None:
    meta.link_blob("a", str(digest_of(b"cfg")), 999)
    link_blobs(meta, "a", b"layer")
    with pytest.raises(BlobSizeMismatch) as info:
        meta.put_manifest("a", manifest_of(b"cfg", [b"layer"]), [])
    assert info.value.actual == 999 and info.value.declared == 3


def test_tag_moves_and_deletes(meta: RegistryMeta) -> None:
    link_blobs(meta, "a", b"c1", b"c2", b"l")
    m1, m2 = manifest_of(b"c1", [b"l"]), manifest_of(b"c2", [b"l"])
    meta.put_manifest("a", m1, ["x", "y"])
    meta.put_manifest("a", m2, ["x"])
    got = meta.get_manifest("a", "x", by_digest=False)
    assert got is not None and got.digest == str(m2.digest)
    assert meta.list_tags("a", None, None) == ["x", "y"]
    assert meta.delete_manifest("a", str(m1.digest))
    assert meta.list_tags("a", None, None) == ["x"]
    assert meta.delete_tag("a", "x")
    assert not meta.delete_tag("a", "x")
    assert meta.get_manifest("a", str(m2.digest), by_digest=True) is not None


def test_unlink_removes_the_link_and_leaves_the_blob_to_gc(meta: RegistryMeta) -> None:
    link_blobs(meta, "a", b"blob")
    link_blobs(meta, "b", b"blob")
    d = str(digest_of(b"blob"))
    assert meta.repositories_with_blob(d) == ["a", "b"]
    assert meta.unlink_blob("a", d)
    assert not meta.unlink_blob("a", d)
    assert meta.repositories_with_blob(d) == ["b"]
    assert meta.unlink_blob("b", d)
    assert meta.repositories_with_blob(d) == []
    assert meta.blob_size("b", d) is None
    with meta.engine.connect() as conn:  # the row stays, with a review queued: GC decides
        assert conn.execute(select(schema.blobs.c.digest)).scalars().all() == [d]
        assert conn.execute(select(schema.gc_blob_reviews.c.digest)).scalars().all() == [d]


def test_referrers_filter_by_artifact_type(meta: RegistryMeta) -> None:
    link_blobs(meta, "a", b"c", b"l", b"{}")
    subject = manifest_of(b"c", [b"l"])
    meta.put_manifest("a", subject, [])
    sig = manifest_of(
        b"{}",
        [b"l"],
        artifactType="application/sig",
        subject={**descriptor_of(subject.raw, mt.OCI_MANIFEST)},
    )
    meta.put_manifest("a", sig, [])
    assert [r.digest for r in meta.referrers("a", str(subject.digest), None)] == [str(sig.digest)]
    assert meta.referrers("a", str(subject.digest), "application/other") == []
    assert meta.referrers("a", str(subject.digest), "application/sig")[0].size == len(sig.raw)


def test_catalog_and_tag_pagination(meta: RegistryMeta) -> None:
    link_blobs(meta, "z", b"c", b"l")
    m = manifest_of(b"c", [b"l"])
    for repo in ("r1", "r2", "r3"):
        link_blobs(meta, repo, b"c", b"l")
        meta.put_manifest(repo, m, ["t1", "t2", "t3"])
    assert meta.catalog(None, None) == ["r1", "r2", "r3"]
    assert meta.catalog(1, "r1") == ["r2"]
    assert meta.list_tags("r1", 2, "t1") == ["t2", "t3"]


def test_stale_uploads(meta: RegistryMeta) -> None:
    meta.create_upload("u1", "a")
    assert meta.upload_repository("u1") == "a"
    assert meta.stale_uploads(datetime.now(UTC) - timedelta(hours=1)) == []
    assert meta.stale_uploads(datetime.now(UTC) + timedelta(seconds=1)) == ["u1"]
    assert meta.delete_upload("u1")
    assert meta.upload_repository("u1") is None


def test_migrations_create_exactly_the_schema(database_url: str, tmp_path: Path) -> None:
    m = open_database(database_url, tmp_path)
    try:
        with m.engine.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"compare_type": conn.dialect.name == "postgresql"}
            )
            assert compare_metadata(context, schema.metadata) == []
    finally:
        m.close()


def test_names_are_listed_in_byte_order(meta: RegistryMeta) -> None:
    names = ["B", "a", "a-b", "a.b", "a_b", "ab", "A", "a0", "Z9"]
    link_blobs(meta, "r", b"c", b"l")
    meta.put_manifest("r", manifest_of(b"c", [b"l"]), names)
    expected = sorted(names, key=lambda n: n.encode())
    assert meta.list_tags("r", None, None) == expected
    assert meta.list_tags("r", 3, "a") == expected[expected.index("a") + 1 :][:3]
    repos = ["a-b", "a/b", "ab", "a.b", "a_b", "a0"]
    for repo in repos:
        link_blobs(meta, repo, b"c", b"l")
        meta.put_manifest(repo, manifest_of(b"c", [b"l"]), [])
    assert meta.catalog(None, None) == sorted([*repos, "r"], key=lambda n: n.encode())


def test_a_manifest_an_index_references_cannot_be_deleted_before_the_index(
    meta: RegistryMeta,
) -> None:
    link_blobs(meta, "a", b"c", b"l")
    child = manifest_of(b"c", [b"l"])
    meta.put_manifest("a", child, ["child"])
    raw = json.dumps(
        {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": [descriptor_of(child.raw)]}
    ).encode()
    index = parse_manifest(raw, mt.OCI_INDEX, digest_of(raw))
    meta.put_manifest("a", index, ["multi"])
    with pytest.raises(ManifestInUse) as info:
        meta.delete_manifest("a", str(child.digest))
    assert info.value.referenced_by == str(index.digest)
    assert meta.list_tags("a", None, None) == ["child", "multi"]  # the refused delete left all
    assert meta.delete_manifest("a", str(index.digest))
    assert meta.delete_manifest("a", str(child.digest))
    assert meta.list_tags("a", None, None) == []


def test_values_without_a_length_limit_are_stored_whole(
    meta: RegistryMeta, database_url: str
) -> None:
    artifact_type = "application/vnd.example." + "x" * 400
    link_blobs(meta, "a", b"c", b"l")
    m = manifest_of(b"c", [b"l"], artifactType=artifact_type)
    meta.put_manifest("a", m, [])
    platform = PlatformMeta(meta.engine)
    org = platform.create_org("acme")
    platform.create_app("web", org.id)
    app = platform.get_app("web")
    assert app is not None
    image_ref = "a-very-long-host-name." * 30 + ":5000/web@" + str(m.digest)
    release = ReleaseMeta(meta.engine).create_release(
        app_id=app.id,
        status="pending",
        description="d" * 1000,
        reason="deploy",
        image_ref=image_ref,
        image_repository="web",
        image_digest=str(m.digest),
        strategy="rolling",
        regions=["local"],
        machine_count=1,
        user_id="t" * 32,
        user_name="n" * 100,
    )
    assert release.image_ref == image_ref and release.version == 1
    with meta.engine.connect() as conn:
        stored = conn.execute(select(schema.manifests.c.artifact_type)).scalar_one()
    assert stored == artifact_type


@pytest.mark.parametrize("scheme", ["postgresql", "postgres", "postgresql+psycopg"])
def test_postgresql_urls_of_every_spelling_use_psycopg(
    scheme: str, pg_url: str, tmp_path: Path
) -> None:
    url = pg_url.replace("postgresql+psycopg://", f"{scheme}://")
    m = open_database(url, tmp_path)
    try:
        assert m.engine.dialect.name == "postgresql" and m.engine.dialect.driver == "psycopg"
        link_blobs(m, "a", b"blob")
        assert m.blob_size("a", str(digest_of(b"blob"))) == 4
    finally:
        m.close()


def test_db_upgrade_command_creates_the_tables_in_postgresql(pg_url: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "skyreg", "db", "upgrade", "--database-url", pg_url],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "SKYREG_DATA_DIR": str(tmp_path / "unused")},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"database schema at revision {head_revision()}"
    engine = create_db_engine(pg_url)
    try:
        assert set(schema.metadata.tables) <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert not (tmp_path / "unused").exists()


def test_db_upgrade_command_without_a_url_migrates_sqlite_in_the_data_dir(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "skyreg", "db", "upgrade", "--data-dir", str(tmp_path / "d")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"database schema at revision {head_revision()}"
    assert (tmp_path / "d" / "skyreg.db").exists()


def test_db_upgrade_command_reports_an_unreachable_database_without_a_traceback() -> None:
    port = free_port()  # nothing listens there
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "skyreg",
            "db",
            "upgrade",
            "--database-url",
            f"postgresql://nobody@127.0.0.1:{port}/none",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: cannot migrate the database:")
    assert "Traceback" not in proc.stderr


def test_serve_keeps_its_metadata_in_postgresql(pg_url: str, tmp_path: Path) -> None:
    reg = RunningRegistry(
        data_dir=tmp_path / "data",
        extra_args=["--no-auth", "--database-url", pg_url, "--workers", "2"],
    )
    reg.start()
    try:
        image = push_image(reg.url, "app/web", "v1")
        r = requests.get(
            f"{reg.url}/v2/app/web/manifests/v1", headers={"Accept": mt.OCI_MANIFEST}, timeout=30
        )
        assert r.status_code == 200 and r.content == image.manifest
    finally:
        reg.stop()
    assert not (tmp_path / "data" / "skyreg.db").exists()
    m = open_database(pg_url, tmp_path)
    try:
        assert m.list_tags("app/web", None, None) == ["v1"]
    finally:
        m.close()


@pytest.mark.parametrize("value", ["0", "65", "many"])
def test_serve_refuses_db_threads_outside_1_to_64(tmp_path: Path, value: str) -> None:
    serve = [sys.executable, "-m", "skyreg", "serve", "--data-dir", str(tmp_path / "d")]
    run = subprocess.run(
        [*serve, "--db-threads", value],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "COLUMNS": "200"},  # one line per message in Typer's error box
    )
    assert run.returncode == 2, run.stderr
    assert "Invalid value for '--db-threads'" in run.stderr, run.stderr
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("threads", [2, 40])
def test_serve_queries_postgresql_from_as_many_threads_as_db_threads_says(
    pg_url: str, tmp_path: Path, threads: int
) -> None:
    """Each thread gets its connections: 40 threads need more than the 32 a fixed pool of
    16 + 16 held (their requests waited 30 s for a connection, then failed)."""
    reg = InProcessRegistry(
        data_dir=tmp_path / "data",
        options={"auth": False, "database_url": pg_url, "db_threads": threads},
    )
    reg.start()
    try:
        push_image(reg.url, "app/web", "v1")
        url = f"{reg.url}/v2/app/web/tags/list"
        with ThreadPoolExecutor(64) as pool:
            for _ in range(4):
                answers = list(pool.map(lambda _: requests.get(url, timeout=60), range(64)))
                assert [r.status_code for r in answers] == [200] * 64
        with psycopg.connect(pg_url.replace("postgresql+psycopg://", "postgresql://")) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchone()
    finally:
        reg.stop()
    assert row is not None
    # Each database thread holds one reader connection and checks out at most one writer
    # (the push); the migration's connection went back to the pool. 64 concurrent reads on
    # the default 16 threads open more than 2 x 2 + 1.
    assert 1 <= row[0] <= 2 * threads + 1
