"""`skyreg builds list|logs|show|cancel`: Dockerfile builds (queued by `skyreg deploy` in a
directory with a Dockerfile, built by a builder host) over the management API."""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from skyreg.cli.client import Client, client, fail
from skyreg.cli.platform import (
    AsJson,
    Server,
    Token,
    _console,
    _print_json,
    _quote,
    _table,
    _when,
    short_digest,
)
from skyreg.units import human_size

builds_app = typer.Typer(
    help="Dockerfile builds: their status, logs and steps.", no_args_is_help=True
)

BuildArg = Annotated[str, typer.Argument(help="Build id (bu...).", show_default=False)]

FOLLOW_WAIT = 10  # seconds each follow request waits on the server for a new line
MIN_POLL = 1.0  # seconds between follow requests that came back at once with nothing
MAX_PAGES = 100  # pages of at most 1000 lines: more than a build's log holds (20,001 lines)


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def duration_text(seconds: float) -> str:
    """`0.4s`, `12s`, `2m05s`, `1h02m`: a duration as a build's progress is read."""
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def build_duration(build: dict[str, Any], now: datetime | None = None) -> str:
    """How long the build ran (so far, while running; `-` when it never started)."""
    started = _parse_time(build.get("started_at"))
    if started is None:
        return "-"
    finished = _parse_time(build.get("finished_at"))
    end = finished or now or datetime.now(UTC)
    text = duration_text((end - started).total_seconds())
    return text if finished is not None else f"{text} so far"


def image_text(build: dict[str, Any]) -> str:
    """`TAG sha256:0123456789ab` of the built image (`TAG` alone until it is built)."""
    digest = build.get("image_digest")
    label = str(build.get("image_label") or "-")
    return f"{label} {short_digest(str(digest))}" if digest else label


def _safe(line: str, err: bool = False) -> str:
    """A log line as a terminal may show it: control characters (escape sequences a build's
    output may carry) replaced, tabs kept. Unchanged when not printing to a terminal."""
    if not (sys.stderr if err else sys.stdout).isatty():
        return line
    return "".join(c if c == "\t" or c.isprintable() else "\ufffd" for c in line)


@builds_app.command("list")
def builds_list(
    app: Annotated[str, typer.Option("--app", help="App name.")],
    limit: Annotated[int, typer.Option("--limit", min=1, max=100, help="At most N builds.")] = 25,
    server: Server = None,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """An app's builds, newest first."""
    found = client(server, token)("GET", f"/apps/{_quote(app)}/builds", query={"limit": str(limit)})
    builds: list[dict[str, Any]] = found["builds"]
    if as_json:
        _print_json(builds)
        return
    if not builds:
        typer.echo(f"No builds of app {app}.", err=True)
        return
    table = _table("ID", "STATUS", "IMAGE", "DURATION", "CREATED")
    now = datetime.now(UTC)
    for build in builds:
        table.add_row(
            build["id"],
            build["status"],
            image_text(build),
            build_duration(build, now),
            _when(build["created_at"]),
        )
    _console().print(table)


def _print_lines(page: dict[str, Any], err: bool = False) -> None:
    for line in page["lines"]:
        typer.echo(_safe(str(line["line"]), err), err=err)


def follow_log(api: Client, build_id: str, *, err: bool = False) -> dict[str, Any]:
    """Print the build's log (on stderr with `err`) as it grows until the build ended and every
    line is printed; the last page read (its `status`, `error`, `image_digest`)."""
    path = f"/builds/{_quote(build_id)}/logs"
    after = 0
    while True:
        asked = time.monotonic()
        page: dict[str, Any] = api(
            "GET", path, query={"after": str(after), "wait": str(FOLLOW_WAIT)}
        )
        _print_lines(page, err)
        after = max(after, int(page["next"]))
        if page["ended"]:
            return page
        if not page["lines"]:
            # The server waits up to FOLLOW_WAIT for a line; one that answers at once with
            # nothing (an old server, a build that ended between two reads) is not hammered.
            time.sleep(max(0.0, MIN_POLL - (time.monotonic() - asked)))


@builds_app.command("logs")
def builds_logs(
    build_id: BuildArg,
    follow: Annotated[
        bool,
        typer.Option(
            "-f",
            "--follow",
            help="Follow the log until the build ends; exit 0 only if it succeeded.",
        ),
    ] = False,
    server: Server = None,
    token: Token = None,
) -> None:
    """Print a build's log (reading an unfinished build's log keeps it alive)."""
    api = client(server, token)
    if follow:
        page = follow_log(api, build_id)
        status = page["status"]
        if status != "succeeded":
            reason = f": {page['error']}" if page.get("error") else ""
            fail(f"build {build_id} {status}{reason}")
        typer.echo(f"Build {build_id} succeeded: {page['image_digest']}", err=True)
        return
    path = f"/builds/{_quote(build_id)}/logs"
    after = 0
    for _ in range(MAX_PAGES):
        page = api("GET", path, query={"after": str(after)})
        _print_lines(page)
        if not page["lines"] or int(page["next"]) <= after:
            return
        after = int(page["next"])


@builds_app.command("show")
def builds_show(
    build_id: BuildArg, server: Server = None, token: Token = None, as_json: AsJson = False
) -> None:
    """A build's fields and how long each Dockerfile step took."""
    build = client(server, token)("GET", f"/builds/{_quote(build_id)}")
    if as_json:
        _print_json(build)
        return
    fields: list[tuple[str, str]] = [
        ("ID", build["id"]),
        ("App", build["app"]),
        ("Status", build["status"]),
        ("Image", build["image_ref"] or image_text(build)),
        ("Tag", build["image_label"]),
        ("Builder", f"{build['builder']} ({build['region']})"),
        ("Created", _when(build["created_at"])),
        ("Started", _when(build["started_at"])),
        ("Finished", _when(build["finished_at"])),
        ("Duration", build_duration(build)),
        (
            "Context",
            f"{short_digest(build['context_digest'])} ({human_size(int(build['context_size']))})",
        ),
        ("Dockerfile", build["dockerfile"]),
        ("Target", build["target"] or "-"),
        ("Platform", build["platform"] or "-"),
        ("Build args", ", ".join(sorted(build["build_args"])) or "-"),
        ("Secrets", ", ".join(build["secrets"]) or "-"),
        ("No cache", "yes" if build["no_cache"] else "no"),
        ("Log lines", str(build["log_lines"])),
    ]
    if build.get("error"):
        fields.append(("Error", build["error"]))
    width = max(len(name) for name, _ in fields)
    for name, value in fields:
        typer.echo(f"{name + ':':<{width + 1}} {_safe(str(value))}")
    steps = build["steps"]
    if not steps:
        return
    typer.echo("")
    table = _table("STEP", "INSTRUCTION", "DURATION", "CACHED")
    for step in steps:
        table.add_row(
            str(step["step"]),
            _safe(str(step["instruction"])),
            duration_text(float(step["seconds"])),
            "yes" if step["cached"] else "",
        )
    _console().print(table)
    total = sum(float(s["seconds"]) for s in steps)
    typer.echo(f"{len(steps)} step(s), {duration_text(total)} in all")


@builds_app.command("cancel")
def builds_cancel(build_id: BuildArg, server: Server = None, token: Token = None) -> None:
    """Cancel a build: a queued one ends now, a running one at its builder's next report."""
    build = client(server, token)("POST", f"/builds/{_quote(build_id)}/cancel")
    status = build["status"]
    if status == "running":
        typer.echo(f"Build {build['id']} is running: its builder was told to stop it.")
    elif status == "cancelled":
        typer.echo(f"Build {build['id']} cancelled.")
    else:
        typer.echo(f"Build {build['id']} had already ended ({status}).")


def register(app: typer.Typer) -> None:
    """Add `skyreg builds` to the `skyreg` command."""
    app.add_typer(builds_app, name="builds")
