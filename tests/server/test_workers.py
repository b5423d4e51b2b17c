"""Background workers (`skyreg.workers`): a periodic worker survives and reports failing steps,
stops at once when told, and a server lists what runs in its `/metrics` (admin-only)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from pathlib import Path

import pytest
import requests

from skyreg.workers import PeriodicWorker, Worker, Workers
from tests.support.inprocess import InProcessRegistry
from tests.support.platform import Tenancy
from tests.support.waiting import free_port, wait_for

BOUND = 30.0  # seconds a test waits for what must happen at once before failing, never hanging


class Scripted:
    """A step the test drives: each call announces itself on `started`, then does what the
    next item of `script` says ("ok" or "fail")."""

    def __init__(self) -> None:
        self.started: asyncio.Queue[int] = asyncio.Queue()
        self.script: asyncio.Queue[str] = asyncio.Queue()
        self.calls = 0

    async def __call__(self) -> None:
        self.calls += 1
        self.started.put_nowait(self.calls)
        if await self.script.get() == "fail":
            raise RuntimeError(f"step {self.calls} broke")

    async def next_started(self) -> int:
        return await asyncio.wait_for(self.started.get(), BOUND)


def failures_logged(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "worker demo failed" in r.getMessage()]


def test_a_failing_step_is_logged_once_with_its_exception_and_the_worker_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)

    async def main() -> None:
        step = Scripted()
        worker = PeriodicWorker("demo", 0, step)
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        assert await step.next_started() == 1
        step.script.put_nowait("fail")
        # The next step starts only once the failed one was counted and logged.
        assert await step.next_started() == 2
        logged = failures_logged(caplog)
        assert len(logged) == 1
        assert logged[0].exc_info is not None
        assert str(logged[0].exc_info[1]) == "step 1 broke"
        assert (worker.stats.runs, worker.stats.failures) == (1, 1)
        step.script.put_nowait("ok")
        assert await step.next_started() == 3
        assert (worker.stats.runs, worker.stats.failures) == (2, 1)
        assert worker.stats.consecutive_failures == 0
        assert any("succeeded again after 1 failure" in r.getMessage() for r in caplog.records)
        for _ in range(2):
            step.script.put_nowait("fail")
            await step.next_started()
        assert len(failures_logged(caplog)) == 3
        assert (worker.stats.runs, worker.stats.failures) == (4, 3)
        assert worker.stats.consecutive_failures == 2
        assert worker.stats.last_duration is not None
        stop.set()
        step.script.put_nowait("ok")  # the step under way finishes, then the worker ends
        await asyncio.wait_for(task, BOUND)
        assert step.calls == 5
        assert (worker.stats.runs, worker.stats.failures) == (5, 3)

    asyncio.run(main())


class Unreachable(Exception):
    """What a step raises while what it needs is out of reach."""


def test_an_outage_pauses_a_worker_with_one_line_and_no_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)

    async def main() -> None:
        calls = 0

        async def step() -> None:
            nonlocal calls
            calls += 1
            if calls <= 3:
                raise Unreachable("database down")

        worker = PeriodicWorker("demo", 0, step)
        Workers([worker], outage=lambda e: isinstance(e, Unreachable))
        for _ in range(4):
            await worker.run_once()
        assert (worker.stats.runs, worker.stats.failures) == (4, 3)
        paused = [r for r in caplog.records if "worker demo paused by an outage" in r.getMessage()]
        assert len(paused) == 1 and paused[0].exc_info is None
        assert not failures_logged(caplog)
        assert any("succeeded again after 3 failure" in r.getMessage() for r in caplog.records)
        # Anything else is still a failure with its traceback.
        other = PeriodicWorker("demo", 0, step)
        Workers([other], outage=lambda e: False)
        calls = 0
        await other.run_once()
        assert len(failures_logged(caplog)) == 1
        assert failures_logged(caplog)[0].exc_info is not None

    asyncio.run(main())


def test_stop_ends_the_wait_between_steps_at_once() -> None:
    async def main() -> None:
        ran = asyncio.Event()

        async def step() -> None:
            ran.set()

        worker = PeriodicWorker("hourly", 3600, step)
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        await asyncio.wait_for(ran.wait(), BOUND)
        stop.set()
        await asyncio.wait_for(task, BOUND)  # not an hour
        assert worker.stats.runs == 1

    asyncio.run(main())


def test_a_step_under_way_when_stopping_finishes_before_the_worker_ends() -> None:
    async def main() -> None:
        entered, release = asyncio.Event(), asyncio.Event()
        finished: list[bool] = []

        async def step() -> None:
            entered.set()
            await release.wait()
            finished.append(True)

        workers = Workers([PeriodicWorker("slow", 3600, step)])
        workers.start()
        await asyncio.wait_for(entered.wait(), BOUND)
        stopping = asyncio.create_task(workers.stop(timeout=BOUND))
        release.set()
        assert await asyncio.wait_for(stopping, BOUND * 2) is True
        assert finished == [True]
        assert [(i.name, i.state, i.runs) for i in workers.describe()] == [("slow", "stopped", 1)]

    asyncio.run(main())


class Stubborn(Worker):
    """Ignores `stop`: only cancelling it ends it."""

    def __init__(self) -> None:
        super().__init__("stubborn")
        self.cancelled = False

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise


def test_stopping_cancels_a_worker_still_running_past_the_bound_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        stubborn = Stubborn()
        workers = Workers([stubborn])
        workers.start()
        assert await asyncio.wait_for(workers.stop(timeout=0.05), BOUND) is False
        assert stubborn.cancelled
        assert [i.state for i in workers.describe()] == ["stopped"]

    asyncio.run(main())
    assert any(
        "worker stubborn did not stop within 0.05s" in r.getMessage() for r in caplog.records
    )


class Crashing(Worker):
    async def run(self, stop: asyncio.Event) -> None:
        raise OSError("no such thing")


def test_a_crashed_worker_is_logged_and_reported_down(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> Workers:
        ran = asyncio.Event()

        async def step() -> None:
            ran.set()

        workers = Workers([Crashing("crashing"), PeriodicWorker("steady", 3600, step)])
        workers.start()
        await asyncio.wait_for(ran.wait(), BOUND)
        states = {i.name: i.state for i in workers.describe()}
        assert states == {"crashing": "crashed", "steady": "running"}
        text = workers.metrics()
        assert 'skyreg_worker_up{worker="crashing"} 0' in text
        assert 'skyreg_worker_up{worker="steady"} 1' in text
        assert await workers.stop() is True
        return workers

    workers = asyncio.run(main())
    assert [i.state for i in workers.describe()] == ["crashed", "stopped"]
    crash = [r for r in caplog.records if "worker crashing crashed" in r.getMessage()]
    assert len(crash) == 1 and crash[0].exc_info is not None


def test_metrics_count_runs_failures_and_durations_per_worker() -> None:
    async def main() -> str:
        step = Scripted()
        workers = Workers([PeriodicWorker("demo", 0, step)])
        workers.start()
        await step.next_started()
        step.script.put_nowait("fail")
        await step.next_started()
        step.script.put_nowait("ok")
        await step.next_started()
        text = workers.metrics()
        stopping = asyncio.create_task(workers.stop(timeout=BOUND))
        step.script.put_nowait("ok")
        await stopping
        return text

    text = asyncio.run(main())
    assert "# TYPE skyreg_worker_runs_total counter" in text
    assert 'skyreg_worker_runs_total{worker="demo"} 2' in text
    assert 'skyreg_worker_failures_total{worker="demo"} 1' in text
    assert 'skyreg_worker_consecutive_failures{worker="demo"} 0' in text
    assert 'skyreg_worker_last_duration_seconds{worker="demo"} ' in text


@pytest.mark.parametrize("interval", [-1.0, math.nan, math.inf])
def test_an_interval_must_be_finite_and_not_negative(interval: float) -> None:
    async def step() -> None:
        pass

    with pytest.raises(ValueError, match="interval"):
        PeriodicWorker("bad", interval, step)


def test_names_are_unique_label_values() -> None:
    async def step() -> None:
        pass

    with pytest.raises(ValueError, match="worker name"):
        PeriodicWorker('x"} 1\nevil', 1, step)
    workers = Workers([PeriodicWorker("a", 1, step)])
    with pytest.raises(ValueError, match="two workers named a"):
        workers.add(PeriodicWorker("a", 2, step))


def _metric(text: str, line_start: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_a_single_region_server_shows_its_workers_in_metrics_to_admins_only(
    tmp_path: Path,
) -> None:
    reg = InProcessRegistry(data_dir=tmp_path / "data", options={"expiry_interval": 0.2})
    reg.start()
    try:
        admin = Tenancy(reg.data_dir).admin_secret()
        anonymous = requests.get(f"{reg.url}/metrics", timeout=10)
        assert anonymous.status_code == 401
        assert "skyreg_" not in anonymous.text

        def expiry_ran() -> str | None:
            r = requests.get(f"{reg.url}/metrics", auth=("x", admin), timeout=10)
            assert r.status_code == 200, r.text
            runs = _metric(r.text, 'skyreg_worker_runs_total{worker="upload_expiry"}')
            return r.text if runs is not None and runs >= 2 else None

        text = wait_for(expiry_ran, "two upload expiry runs in /metrics")
        assert 'skyreg_worker_up{worker="upload_expiry"} 1' in text
        assert 'skyreg_worker_failures_total{worker="upload_expiry"} 0' in text
        assert "skyreg_replication_jobs" not in text
        assert 'worker="replication"' not in text
    finally:
        reg.stop()


def test_a_region_node_lists_its_replication_worker_in_metrics(tmp_path: Path) -> None:
    port = free_port()
    regions = tmp_path / "regions.json"
    regions.write_text(
        json.dumps({"regions": {"iad": {"url": f"http://127.0.0.1:{port}", "rtt_ms": {}}}})
    )
    reg = InProcessRegistry(
        data_dir=tmp_path / "data",
        options={"auth": False, "region": "iad", "regions_file": regions},
    )
    reg.port = port
    reg.start()
    try:

        def replication_ran() -> str | None:
            text = requests.get(f"{reg.url}/metrics", timeout=10).text
            runs = _metric(text, 'skyreg_worker_runs_total{worker="replication"}')
            return text if runs is not None and runs >= 1 else None

        text = wait_for(replication_ran, "a replication run in /metrics")
        assert 'skyreg_worker_up{worker="replication"} 1' in text
        assert 'skyreg_worker_up{worker="upload_expiry"} 1' in text
        assert "skyreg_replication_jobs" in text
    finally:
        reg.stop()
