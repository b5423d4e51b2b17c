"""`skyreg dev`: the whole platform on one machine, driven only through the `skyreg` command (each
test's first one a real `python -m skyreg` process, the others run in this process, as
tests/support/cli.py does, to spare an interpreter start per command and per poll)."""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from skyreg.builder.buildah import BuildahSettings
from skyreg.builder.host import check_host
from tests.support.cli import run_skyreg_in_process
from tests.support.images import Entry, build_app_image
from tests.support.netns import leftovers, network_problem
from tests.support.platform import cli_env, run_skyreg
from tests.support.waiting import children, free_port, http_get, wait_for

# `skyreg dev` starts a builder where buildah can run (as root, with runc).
BUILDER = 1 if check_host(BuildahSettings()) is None else 0

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bwrap is not installed"),
]


def _read_until(proc: subprocess.Popen[bytes], pattern: str, timeout: float = 60.0) -> str:
    """Read the process's stdout until `pattern` matches; the text read so far."""
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + timeout
    while not re.search(pattern, seen.decode(errors="replace")):
        if proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode}: {seen.decode(errors='replace')}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {pattern!r} in: {seen.decode(errors='replace')}")
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            seen += os.read(proc.stdout.fileno(), 65536)
    return seen.decode()


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie has exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _proxy_url(banner: str) -> str:
    found = re.search(r"curl http://myapp\.localhost:(\d+)/", banner)
    assert found, banner
    return f"http://127.0.0.1:{found.group(1)}"


def _through(proxy: str, app: str) -> bytes | None:
    """The body of `GET /` for `<app>.localhost` through the proxy (None: no 200 answer)."""
    try:
        r = requests.get(f"{proxy}/", headers={"Host": f"{app}.localhost"}, timeout=5)
    except requests.RequestException:
        return None
    return r.content if r.status_code == 200 else None


def _interrupt(dev: subprocess.Popen[bytes]) -> int:
    """Ctrl-C `skyreg dev` and wait for it. If it hangs, it and everything it started (its
    own session) are killed, and the test fails."""
    dev.send_signal(signal.SIGINT)
    try:
        return dev.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(dev.pid, signal.SIGKILL)
        dev.wait()
        raise


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Machines must reach their rootfs: every ancestor of the data dir is o+x.
    top = Path(tempfile.mkdtemp(prefix="skyreg-dev-"))
    top.chmod(0o711)
    try:
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_dev_runs_push_deploy_and_a_serving_machine_then_stops_it_all(workdir: Path) -> None:
    dev = subprocess.Popen(
        [sys.executable, "-m", "skyreg", "dev", "--data-dir", str(workdir / "dev"), "--port", "0",
         "--proxy-port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # so a hang can be cleaned up whole
    )  # fmt: skip
    port = free_port()  # where the app listens (on the host, when machines share its network)
    try:
        banner = _read_until(dev, r"curl http://myapp.localhost:\d+/")
        proxy = _proxy_url(banner)
        url = re.search(r"registry (http://127\.0\.0\.1:\d+)", banner)
        assert url, banner
        token_file = workdir / "dev" / "registry" / "admin-token"
        assert str(token_file) in banner
        env = cli_env(workdir, url.group(1), token_file.read_text().strip())

        def skyreg(*args: str) -> str:  # in this process (tests/support/cli.py)
            return run_skyreg_in_process(env, *args)

        run_skyreg(env, "orgs", "create", "acme")  # a real `python -m skyreg` process
        skyreg("apps", "create", "myapp", "--org", "acme")
        image = build_app_image(
            "dev",
            [Entry("www", "dir", mode=0o755), Entry("www/index.html", "file", data=b"hi dev\n")],
            cmd=["/bin/sh", "-c", "echo serving; exec /bin/busybox httpd -f -p $PORT -h /www"],
            env=[f"PORT={port}"],
        )
        archive = image.write_docker_archive(workdir / "image.tar")
        skyreg("apps", "update", "myapp", "--port", str(port), "--check-http", "/")
        skyreg("deploy", "--app", "myapp", "--image", str(archive), "--region", "local")
        # As the banner says: the app answers through the proxy at myapp.localhost.
        wait_for(
            lambda: _through(proxy, "myapp") == b"hi dev\n", "the machine serving through the proxy"
        )
        releases = wait_for(
            lambda: (
                o if "complete" in (o := skyreg("releases", "--app", "myapp", "--image")) else None
            ),
            "the release complete",
        )
        assert "myapp:deployment-" in releases
        assert "serving" in wait_for(lambda: skyreg("logs", "--app", "myapp"), "the machine log")
        processes = children(dev.pid)
        assert len(processes) == 3 + BUILDER  # the registry, the agent, the proxy (the builder)
    finally:
        code = _interrupt(dev)
    assert code == 0
    assert _through(proxy, "myapp") is None  # the proxy went down with the platform
    assert http_get(port) is None  # and so did the machine
    if network_problem() is None:  # and its network: no bridge, namespace or rule is left
        assert leftovers("sd0") == []
    for pid in processes:
        assert not Path(f"/proc/{pid}").exists()


def test_dev_regions_push_in_one_region_and_run_in_another(workdir: Path) -> None:
    dev = subprocess.Popen(
        [
            sys.executable, "-m", "skyreg", "dev",
            "--data-dir", str(workdir / "dev"), "--port", "0", "--regions", "iad,sin,syd",
            "--proxy-port", "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # so a hang can be cleaned up whole
    )  # fmt: skip
    port = free_port()
    try:
        banner = _read_until(dev, r"skyreg replication status")
        proxy = _proxy_url(banner)
        urls = dict(re.findall(r"region (\w+)\s+registry (http://127\.0\.0\.1:\d+)", banner))
        assert sorted(urls) == ["iad", "sin", "syd"] and len(set(urls.values())) == 3
        token = (workdir / "dev" / "iad" / "registry" / "admin-token").read_text().strip()
        env = cli_env(workdir, urls["iad"], token)

        def skyreg(*args: str) -> str:  # in this process (tests/support/cli.py)
            return run_skyreg_in_process(env, *args)

        run_skyreg(env, "orgs", "create", "acme")  # a real `python -m skyreg` process
        skyreg("apps", "create", "myapp", "--org", "acme")
        image = build_app_image(
            "far",
            [Entry("www", "dir", mode=0o755), Entry("www/index.html", "file", data=b"from syd\n")],
            cmd=["/bin/sh", "-c", "exec /bin/busybox httpd -f -p $PORT -h /www"],
            env=[f"PORT={port}"],
        )
        skyreg("apps", "update", "myapp", "--port", str(port))
        layout = image.write_oci_layout(workdir / "layout")
        iad_host = urls["iad"].removeprefix("http://")
        skyreg("push", str(layout), f"{iad_host}/myapp:v1")
        shown = skyreg("images", "show", "myapp:v1", "--json")
        assert '"complete": false' in shown  # only iad holds it so far
        skyreg("deploy", "--app", "myapp", "--image", f"{iad_host}/myapp:v1", "--region", "syd")
        # The proxy runs in iad; with no machine there it sends the app's requests to syd's.
        wait_for(lambda: _through(proxy, "myapp") == b"from syd\n", "the syd machine serving")
        machines = skyreg("machines", "list", "--app", "myapp")
        assert "syd" in machines and "started" in machines
        table = wait_for(
            lambda: o if "done" in (o := skyreg("replication", "status")) else None,
            "replication jobs done",
        )
        assert "syd" in table
        shown = skyreg("images", "show", f"{iad_host}/myapp:v1")
        complete = next(line for line in shown.splitlines() if line.startswith("complete"))
        assert complete.split()[-3:] == ["yes", "no", "yes"]  # iad, sin, syd
    finally:
        code = _interrupt(dev)
    assert code == 0
    assert http_get(port) is None and _through(proxy, "myapp") is None


def test_killing_skyreg_dev_takes_its_registry_and_agent_down(workdir: Path) -> None:
    dev = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "skyreg",
            "dev",
            "--data-dir",
            str(workdir / "dev"),
            "--port",
            "0",
            "--proxy-port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _read_until(dev, r"skyreg logs --app myapp -f")
        processes = children(dev.pid)
        assert len(processes) == 3 + BUILDER  # the registry, the agent, the proxy (the builder)
    finally:
        dev.kill()  # no chance to stop anything itself
        dev.wait()
    try:
        wait_for(
            lambda: not any(_alive(pid) for pid in processes),
            "the registry and the agent to exit",
            timeout=30,
        )
    finally:
        for pid in processes:  # whatever outlived it, so the test leaves nothing running
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
