"""`skyreg builds list|logs|show|cancel` against a registry served in-process, with builds made
through the API and driven by the test playing the builder host over HTTP (as
tests/platform/test_builds_api.py does)."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from skyreg.cli.builds import build_duration, duration_text
from tests.support.buildapi import (
    DIGEST,
    claim,
    create_build,
    make_tenant,
    register_builder,
    send_logs,
    send_result,
    succeed,
)
from tests.support.cli import fails, ok, skyreg_as
from tests.support.inprocess import InProcessRegistry, gc_on_request
from tests.support.platform import answer


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessRegistry]:
    with gc_on_request(tmp_path_factory.mktemp("buildscli") / "data") as reg:
        yield reg


def skyreg(
    tmp_path: Path, server: InProcessRegistry, token: str, *args: str
) -> subprocess.CompletedProcess[str]:
    return skyreg_as(tmp_path, server.url, token, *args)


def test_durations() -> None:
    assert duration_text(0.44) == "0.4s"
    assert duration_text(42.9) == "42s"
    assert duration_text(125) == "2m05s"
    assert duration_text(3725) == "1h02m"
    assert duration_text(-3) == "0.0s"
    assert build_duration({"started_at": None}) == "-"
    done = {"started_at": "2026-01-01T00:00:00Z", "finished_at": "2026-01-01T00:01:30Z"}
    assert build_duration(done) == "1m30s"


def test_list_show_and_logs(tmp_path: Path, server: InProcessRegistry) -> None:
    tenant = make_tenant(server)
    builder = register_builder(server, tenant.tokens["org"])
    readonly = tenant.tokens["readonly"]
    assert ok(skyreg(tmp_path, server, readonly, "builds", "list", "--app", tenant.app)) == ""

    first = create_build(server, tenant, builder, image_label="v1", build_args={"VERSION": "1"})
    claim(server, builder)
    answer(send_logs(server, builder, first["id"], ["#1 FROM alpine", "#2 RUN make"]), 200)
    succeed(server, builder, first["id"])
    second = create_build(server, tenant, builder)

    listed = ok(skyreg(tmp_path, server, readonly, "builds", "list", "--app", tenant.app))
    lines = listed.splitlines()
    assert lines[0].split() == ["ID", "STATUS", "IMAGE", "DURATION", "CREATED"]
    assert lines[1].split()[:2] == [second["id"], "queued"]
    assert second["image_label"] in lines[1] and " - " in lines[1]
    row = lines[2].split()
    assert row[:4] == [first["id"], "succeeded", "v1", "sha256:" + DIGEST[7:19]]
    assert row[4].endswith("s")  # its duration
    assert len(lines) == 3
    one = ok(
        skyreg(tmp_path, server, readonly, "builds", "list", "--app", tenant.app, "--limit", "1")
    )
    assert first["id"] not in one and second["id"] in one
    as_json = json.loads(
        ok(skyreg(tmp_path, server, readonly, "builds", "list", "--app", tenant.app, "--json"))
    )
    assert [b["id"] for b in as_json] == [second["id"], first["id"]]

    shown = ok(skyreg(tmp_path, server, readonly, "builds", "show", first["id"]))
    assert "Status:     succeeded" in shown
    assert f"Image:      {tenant.app}@{DIGEST}" in shown
    assert "Build args: VERSION" in shown
    step_lines = [ln.split() for ln in shown.splitlines() if ln.split()[1:2] in (["FROM"], ["RUN"])]
    assert step_lines == [["1", "FROM", "alpine", "0.5s", "yes"], ["2", "RUN", "make", "12s"]]
    assert "2 step(s), 12s in all" in shown
    shown_json = json.loads(
        ok(skyreg(tmp_path, server, readonly, "builds", "show", first["id"], "--json"))
    )
    assert shown_json["image_digest"] == DIGEST and len(shown_json["steps"]) == 2

    logs = ok(skyreg(tmp_path, server, readonly, "builds", "logs", first["id"]))
    assert logs == "#1 FROM alpine\n#2 RUN make\n"
    followed = skyreg(tmp_path, server, readonly, "builds", "logs", "-f", first["id"])
    assert ok(followed) == logs and "succeeded" in followed.stderr
    assert ok(skyreg(tmp_path, server, readonly, "builds", "logs", second["id"])) == ""

    missing = fails(skyreg(tmp_path, server, readonly, "builds", "show", "bu0000000000000000"))
    assert "not found" in missing and "(HTTP 404)" in missing
    stranger = make_tenant(server)
    hidden = fails(skyreg(tmp_path, server, stranger.tokens["org"], "builds", "show", first["id"]))
    assert "(HTTP 404)" in hidden
    fails(skyreg(tmp_path, server, stranger.tokens["org"], "builds", "list", "--app", tenant.app))


def _in_background(work: list[tuple[float, object]]) -> threading.Thread:
    """Run each callable after its delay (seconds since the previous one), on a thread."""

    def run() -> None:
        for delay, step in work:
            time.sleep(delay)
            step()  # type: ignore[operator]

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_follow_prints_lines_as_they_come_and_exits_with_the_outcome(
    tmp_path: Path, server: InProcessRegistry
) -> None:
    tenant = make_tenant(server)
    builder = register_builder(server, tenant.tokens["org"])
    build = create_build(server, tenant, builder)
    bid = build["id"]
    claim(server, builder)
    answer(send_logs(server, builder, bid, ["step one"]), 200)
    # While `logs -f` waits, the builder sends more and then ends the build (failed).
    sender = _in_background(
        [
            (0.5, lambda: send_logs(server, builder, bid, ["step two", "step three"])),
            (0.5, lambda: send_logs(server, builder, bid, ["boom-marker"])),
            (0.2, lambda: send_result(server, builder, bid, status="failed", error="exit code 3")),
        ]
    )
    started = time.monotonic()
    try:
        done = skyreg(tmp_path, server, tenant.tokens["readonly"], "builds", "logs", "-f", bid)
    finally:
        sender.join(30)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert done.stdout == "step one\nstep two\nstep three\nboom-marker\n"
    assert done.stderr == f"error: build {bid} failed: exit code 3\n"
    assert time.monotonic() - started < 15

    # A follow of a build that succeeds while followed exits 0.
    second = create_build(server, tenant, builder)
    claim(server, builder)
    sender = _in_background(
        [
            (0.3, lambda: send_logs(server, builder, second["id"], ["built"])),
            (0.3, lambda: succeed(server, builder, second["id"])),
        ]
    )
    try:
        good = skyreg(
            tmp_path, server, tenant.tokens["org"], "builds", "logs", "--follow", second["id"]
        )
    finally:
        sender.join(30)
    assert ok(good) == "built\n"


def test_cancel(tmp_path: Path, server: InProcessRegistry) -> None:
    tenant = make_tenant(server)
    builder = register_builder(server, tenant.tokens["org"])
    org = tenant.tokens["org"]
    queued = create_build(server, tenant, builder)
    refused = fails(
        skyreg(tmp_path, server, tenant.tokens["readonly"], "builds", "cancel", queued["id"])
    )
    assert "(HTTP 403)" in refused
    assert ok(skyreg(tmp_path, server, org, "builds", "cancel", queued["id"])) == (
        f"Build {queued['id']} cancelled.\n"
    )
    again = ok(skyreg(tmp_path, server, org, "builds", "cancel", queued["id"]))
    assert again == f"Build {queued['id']} cancelled.\n"  # the same: cancelling is idempotent
    built = create_build(server, tenant, builder)
    claim(server, builder)
    succeed(server, builder, built["id"])
    late = ok(skyreg(tmp_path, server, org, "builds", "cancel", built["id"]))
    assert late == f"Build {built['id']} had already ended (succeeded).\n"

    running = create_build(server, tenant, builder)
    claim(server, builder)
    told = ok(skyreg(tmp_path, server, org, "builds", "cancel", running["id"]))
    assert "is running: its builder was told to stop it" in told
    assert answer(send_logs(server, builder, running["id"], ["x"]), 200) == {"stop": True}
    answer(send_result(server, builder, running["id"], status="cancelled", error="cancelled"), 200)
    followed = skyreg(tmp_path, server, org, "builds", "logs", "-f", running["id"])
    assert followed.returncode == 1 and "cancelled" in followed.stderr
    shown = ok(skyreg(tmp_path, server, org, "builds", "show", running["id"]))
    assert "Status:     cancelled" in shown and "Error:      cancelled" in shown
