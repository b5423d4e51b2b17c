"""`skyreg audit --org ORG [--since] [--json|--jsonl]`: who changed what in an org."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import typer

from skyreg.cli.client import client, fail
from skyreg.cli.platform import (
    AsJson,
    Server,
    Token,
    _cell,
    _console,
    _print_json,
    _quote,
    _table,
    _when,
)

_AGO = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_ENTRIES = 100_000  # printed by one command (JSON lines: use --since to page further)


def _since(value: str | None) -> str | None:
    """`--since 2h` (ago) or an RFC 3339 time, as the API takes it."""
    if value is None:
        return None
    if m := _AGO.fullmatch(value):
        when = datetime.now(UTC) - timedelta(seconds=int(m[1]) * _UNITS[m[2]])
        return when.isoformat()
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        fail(f"--since must be a duration (30m, 2h, 7d) or an RFC 3339 time, not {value!r}")
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.isoformat()


def audit(
    org: Annotated[
        str | None, typer.Option("--org", "-o", help="The organization (admin: omit for all).")
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="Only entries since: a duration (2h, 7d) or a time.")
    ] = None,
    as_json: AsJson = False,
    jsonl: Annotated[
        bool, typer.Option("--jsonl", help="One JSON object per line (an export).")
    ] = False,
    server: Server = None,
    token: Token = None,
) -> None:
    """Who changed what in an org, when, from where, and the result (the audit log)."""
    api = client(server, token)
    path = "/audit" if org is None else f"/orgs/{_quote(org)}/audit"
    after = 0
    entries: list[dict[str, Any]] = []
    while len(entries) < MAX_ENTRIES:
        page = api("GET", path, query={"since": _since(since), "after": str(after)})
        for entry in page["entries"]:
            if jsonl:
                typer.echo(json.dumps(entry, separators=(",", ":")))
            else:
                entries.append(entry)
        if page["next_after"] is None:
            break
        after = page["next_after"]
    if jsonl:
        return
    if as_json:
        _print_json(entries)
        return
    rows = _table("WHEN", "WHO", "ACTION", "TARGET", "FROM", "RESULT")
    for e in entries:
        who = f"{e['actor_name'] or '-'} ({e['actor_kind'] or 'anonymous'})"
        rows.add_row(
            _when(e["at"]),
            _cell(who),
            _cell(e["action"]),
            _cell(e["target"]),
            _cell(e["client"]),
            str(e["status"]),
        )
    _console().print(rows)


def register(app: typer.Typer) -> None:
    app.command("audit")(audit)
