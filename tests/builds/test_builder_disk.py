"""A build cannot fill its builder's disk: a RUN step writing without end is stopped before the
disk is full, and the caches are emptied so the next build runs; a builder starting removes the
working files a killed one left. The builder's data dir is a
small tmpfs the test mounts (tests run as root)."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from skyreg.client.push import push_image
from tests.support.builders import RunningBuilder, builder_registered, require_buildah
from tests.support.cli import skyreg_as
from tests.support.disks import small_tmpfs
from tests.support.images import build_image, write_oci_layout
from tests.support.inprocess import InProcessRegistry
from tests.support.platform import Tenancy
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow

DISK = 160 << 20
KEEP = 64 << 20  # --min-free-space


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "builder", DISK) as mountpoint:
        yield mountpoint


def test_a_run_step_filling_the_disk_is_stopped_and_the_cache_emptied(
    tmp_path: Path, small_disk: Path
) -> None:
    require_buildah()
    reg = InProcessRegistry(data_dir=tmp_path / "data")
    with contextlib.ExitStack() as stack:
        stack.callback(reg.stop)
        reg.start()
        t = Tenancy(reg.data_dir)
        t.org("acme")
        t.app("web", "acme")
        admin = t.admin_secret()
        acme, _ = t.token("org", org="acme")
        push_image(
            write_oci_layout(tmp_path / "base", [("v1", build_image("base"))]),
            f"{reg.host}/web:base",
            admin,
        )
        # What a killed builder left (a build's secrets, say) goes when the next one starts.
        stale = small_disk / "data" / "work" / "bu-killed-mid-build"
        stale.mkdir(parents=True)
        (stale / "secret").write_text("left behind")
        builder = RunningBuilder(
            reg.url,
            admin,
            small_disk / "data",
            tmp_path / "builder.log",
            extra_args=["--min-free-space", str(KEEP)],
        )
        stack.callback(builder.stop)
        builder.start()
        wait_for(lambda: builder_registered(reg.url, acme, "web"), "the builder registered")
        assert not stale.exists()
        project = tmp_path / "filler"
        project.mkdir()
        # 1 MiB every 20 ms: far more than the disk holds, slowly enough to be seen.
        (project / "Dockerfile").write_text(
            f"FROM {reg.host}/web:base\n"
            "RUN i=0; while [ $i -lt 400 ]; do i=$((i+1)); "
            "dd if=/dev/zero of=/fill.$i bs=1M count=1 2>/dev/null || exit 9; sleep 0.02; done\n"
        )
        home = tmp_path / "home"
        home.mkdir()
        proc = skyreg_as(home, reg.url, acme, "deploy", str(project), "--app", "web",
                         "--build-only")  # fmt: skip
        assert proc.returncode != 0
        assert "the builder's disk is nearly full" in proc.stderr, proc.stderr + builder.log()
        # The cache was emptied for room, and nothing of the build is left.
        wait_for(
            lambda: shutil.disk_usage(small_disk).free >= 2 * KEEP,
            "the builder making room",
            timeout=60,
        )
        assert not list((small_disk / "data" / "work").iterdir())
        # The next build runs.
        (project / "Dockerfile").write_text(f"FROM {reg.host}/web:base\nRUN echo fits > /f\n")
        again = skyreg_as(home, reg.url, acme, "deploy", str(project), "--app", "web",
                          "--build-only", "--push")  # fmt: skip
        assert again.returncode == 0, again.stderr + builder.log()
