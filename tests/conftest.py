"""Fixtures that start real servers: `skyreg serve` on a free loopback port."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.inprocess import InProcessRegistry, environment, serve_options
from tests.support.servers import BACKINGS, RunningRegistry, scaleout_backing

pytest_plugins = [
    "tests.support.clients",
    "tests.support.holders",
    "tests.support.postgres",
    "tests.support.s3",
]

# Every server the suite starts (and every store it makes) refuses a query on an event loop
# thread (skyreg.meta.db.Database): a request handler that forgot to hop answers 500 and the
# test that drives it fails, instead of the server quietly stalling under a slow database.
os.environ["SKYREG_STRICT_DB_THREADS"] = "1"

# Tests interrupt commands (`skyreg dev`, `skyreg logs -f`) with SIGINT, as a user's Ctrl-C. A
# suite started in the background by a non-interactive shell inherits SIGINT ignored, and so would
# every command it starts: handle it here, so that the commands start with the default again.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[RunningRegistry]:
    """A fresh `skyreg serve` with its own data dir."""
    reg = RunningRegistry(data_dir=tmp_path / "data", extra_args=["--no-auth"])
    reg.start()
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="module", params=BACKINGS)
def shared_registry(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[InProcessRegistry]:
    """One skyreg for a whole test module, on each backing: the embedded default (SQLite +
    filesystem) and the scale-out one (S3 on SeaweedFS + PostgreSQL). Served in-process
    (tests/support/inprocess.py): these modules test what the server answers, not its process."""
    with contextlib.ExitStack() as stack:
        options: dict[str, object] = {"auth": False}
        if request.param == "s3+postgresql":
            args, env = stack.enter_context(scaleout_backing(request))
            options.update(serve_options(args))
            stack.enter_context(environment(env))
        reg = InProcessRegistry(
            data_dir=tmp_path_factory.mktemp("registry") / "data", options=options
        )
        reg.start()
        try:
            yield reg
        finally:
            reg.stop()
