"""`skyreg gc status` and `skyreg gc run [--dry-run]`: garbage collection over the management
API (admin tokens)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from skyreg.cli.client import client
from skyreg.cli.platform import (
    AsJson,
    Server,
    Token,
    _console,
    _print_json,
    _table,
    _when,
)
from skyreg.units import human_size

gc_app = typer.Typer(
    help="Garbage collection: blobs and manifests nothing holds any more.", no_args_is_help=True
)


def _duration(seconds: float) -> str:
    """`1d`, `2h`, `90s`: the review delay as people say it."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _runs_table(runs: list[dict[str, Any]]) -> None:
    rows = _table("STARTED", "NODE", "KIND", "MANIFESTS", "BLOBS", "FREED", "FAILURES")
    for run in runs:
        kind = run["kind"] + (" (dry run)" if run["dry_run"] else "")
        rows.add_row(
            _when(run["started_at"]),
            run["node"],
            kind,
            f"{run['manifests_deleted']}/{run['manifests_reviewed']}",
            f"{run['blobs_deleted']}/{run['blobs_reviewed']}",
            human_size(int(run["bytes_deleted"])),
            str(run["failures"]),
        )
    _console().print(rows)


@gc_app.command("status")
def gc_status(server: Server = None, token: Token = None, as_json: AsJson = False) -> None:
    """Review queues, bytes still to delete per region, totals and the latest passes (admin)."""
    found = client(server, token)("GET", "/gc")
    if as_json:
        _print_json(found)
        return
    settings = found["settings"]
    worker = "runs here" if found["worker"] else "off here (--no-gc)"
    typer.echo(
        f"Review delay {_duration(float(settings['review_delay']))}, images of the newest "
        f"{settings['keep_releases']} releases per app kept; the gc worker {worker}."
    )
    queues = _table("QUEUE", "QUEUED", "DUE NOW", "FAILING", "BYTES")
    for name, key in (("manifest reviews", "manifest_reviews"), ("blob reviews", "blob_reviews")):
        q = found[key]
        queues.add_row(name, str(q["queued"]), str(q["due"]), str(q["failing"]), "")
    for d in found["deletions"]:
        where = f"deletions in {d['region']}" if d["region"] else "deletions"
        queues.add_row(
            where, str(d["queued"]), str(d["due"]), str(d["failing"]), human_size(int(d["bytes"]))
        )
    _console().print(queues)
    totals = found["totals"]
    typer.echo(
        f"Collected so far: {human_size(int(totals['bytes_deleted']))} in "
        f"{totals['blobs_deleted']} blob(s), {totals['manifests_deleted']} manifest(s); "
        f"{totals['failures']} failure(s)."
    )
    if found["runs"]:
        _runs_table(found["runs"])
    for error in found["errors"]:
        typer.echo(f"recent error: {error}", err=True)


@gc_app.command("run")
def gc_run(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Decide and list what would go; delete nothing.")
    ] = False,
    server: Server = None,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Run a garbage collection pass now on the server (admin); safe during pushes.

    Only what is due (queued at least the review delay ago) is reviewed.
    """
    run = client(server, token)("POST", "/gc/runs", {"dry_run": dry_run})
    if as_json:
        _print_json(run)
        return
    verb = "Would delete" if dry_run else "Deleted"
    if run["tags_deleted"]:
        typer.echo(f"{verb} {run['tags_deleted']} tag(s) by retention policies.")
    for tag in run["deleted_tags"]:
        typer.echo(f"  tag {tag}")
    typer.echo(
        f"{verb} {run['manifests_deleted']} of {run['manifests_reviewed']} manifest(s) and "
        f"{run['blobs_deleted']} of {run['blobs_reviewed']} blob(s) reviewed"
        + ("" if dry_run else f"; freed {human_size(int(run['bytes_deleted']))}")
        + (f"; {run['failures']} failure(s)" if run["failures"] else "")
        + "."
    )
    for manifest in run["deleted_manifests"]:
        typer.echo(f"  manifest {manifest}")
    for blob in run["deleted_blobs"]:
        typer.echo(f"  blob {blob}")


def register(app: typer.Typer) -> None:
    """Add `skyreg gc` to the `skyreg` command."""
    app.add_typer(gc_app, name="gc")
