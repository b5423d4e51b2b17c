"""`skyreg serve --workers N`: workers die with their master, a dead worker is logged and
replaced, SIGTERM stops everything, and a restart after any kill binds the port again."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.servers import RunningRegistry
from tests.support.waiting import children, http_get, wait_for


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for a reaper has exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _replaced(master: int, victim: int, seen: set[int]) -> bool:
    """Whether `master` has two workers again, `victim` not among them (all noted in `seen`)."""
    now = children(master)
    seen |= now
    return len(now) == 2 and victim not in now


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[tuple[RunningRegistry, set[int]]]:
    """`skyreg serve --workers 2` and its two worker pids; every process is gone afterwards."""
    reg = RunningRegistry(data_dir=tmp_path / "data", extra_args=["--no-auth", "--workers", "2"])
    seen: set[int] = set()
    reg.start()
    try:
        assert reg.proc is not None
        master = reg.proc.pid

        def two_workers() -> set[int] | None:
            found = children(master)
            return found if len(found) == 2 else None

        pids = wait_for(two_workers, "two workers")
        seen |= pids
        yield reg, seen
    finally:
        if reg.proc is not None:
            seen |= children(reg.proc.pid)
        reg.stop()
        for pid in seen:  # orphans a broken master left behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_workers_exit_when_master_is_killed_and_restart_binds(
    workers: tuple[RunningRegistry, set[int]],
) -> None:
    reg, pids = workers
    assert reg.proc is not None
    first = set(pids)
    reg.proc.kill()
    reg.proc.wait()
    reg.proc = None
    wait_for(lambda: not any(_alive(p) for p in first), "the workers to exit after their master")

    reg.start()  # the same port and data dir
    assert reg.proc is not None
    pids |= children(reg.proc.pid)
    assert http_get(reg.port, "/v2/") is not None


def test_dead_worker_is_logged_and_replaced(workers: tuple[RunningRegistry, set[int]]) -> None:
    reg, pids = workers
    assert reg.proc is not None
    master = reg.proc.pid
    victim = min(pids)
    os.kill(victim, signal.SIGKILL)

    wait_for(lambda: _replaced(master, victim, pids), "a replacement worker")
    wait_for(
        lambda: f"worker {victim} killed by signal SIGKILL" in reg.log(), "the dead worker's line"
    )
    for _ in range(10):
        assert http_get(reg.port, "/v2/") is not None
    assert reg.proc.poll() is None


def test_sigterm_stops_master_and_workers(workers: tuple[RunningRegistry, set[int]]) -> None:
    reg, pids = workers
    assert reg.proc is not None
    reg.proc.send_signal(signal.SIGTERM)
    assert reg.proc.wait(timeout=60) == 0
    reg.proc = None
    wait_for(lambda: not any(_alive(p) for p in pids), "the workers to exit")
    assert "Traceback" not in reg.log()


def test_worker_that_keeps_dying_is_replaced_after_a_backoff(
    workers: tuple[RunningRegistry, set[int]],
) -> None:
    reg, pids = workers
    assert reg.proc is not None
    master = reg.proc.pid
    for delay in (0, 1):
        victim = min(children(master))
        os.kill(victim, signal.SIGKILL)
        wait_for(functools.partial(_replaced, master, victim, pids), "a replacement worker")
        assert f"worker {victim} killed by signal SIGKILL" in reg.log()
        assert f"replacing it in {delay}s" in reg.log()
    assert http_get(reg.port, "/v2/") is not None
