"""`skyreg apps retention set|show|unset` and `skyreg orgs quota set|unset`, `skyreg orgs
usage`: retention policies per app and quotas per org over the management API."""

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
    _quote,
    _table,
    _when,
    apps_app,
    orgs_app,
)
from skyreg.units import human_size

retention_app = typer.Typer(
    help="Retention policies: which tags an app keeps; untagged manifests go through GC.",
    no_args_is_help=True,
)
quota_app = typer.Typer(
    help="Quotas: limits on the bytes an organization's apps hold (admin tokens).",
    no_args_is_help=True,
)

AppArg = Annotated[str, typer.Argument(help="App name.")]
OrgArg = Annotated[str, typer.Argument(help="Organization name.")]


def _duration(seconds: int | None) -> str:
    """`30d`, `12h`, `90s`: seconds as people say them ("-": not set)."""
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def size(value: int) -> str:
    """Bytes as `human_size` writes them, without a trailing `.0` ("5 GiB")."""
    return human_size(value).replace(".0 ", " ")


def tag_line(tag: dict[str, Any]) -> str:
    """`REPOSITORY:TAG  DIGEST  pushed WHEN  pulled WHEN`: a tag a policy deletes."""
    pulled = _when(tag["pulled_at"]) if tag.get("pulled_at") else "never"
    return (
        f"{tag['repository']}:{tag['tag']}  {tag['digest']}  "
        f"pushed {_when(tag['pushed_at'])}  pulled {pulled}"
    )


def _policy_text(policy: dict[str, Any]) -> str:
    keep = ", ".join(policy["keep_tags"]) or "-"
    recent = "-" if policy["keep_recent"] is None else str(policy["keep_recent"])
    untagged = policy["untagged_after"]
    after = "the review delay" if untagged is None else _duration(untagged)
    return (
        f"keep tags {keep}; keep recent {recent}; keep within "
        f"{_duration(policy['keep_within'])}; untagged after {after}"
    )


@retention_app.command("set")
def retention_set(
    app: AppArg,
    keep_tag: Annotated[
        list[str] | None,
        typer.Option(
            "--keep-tag",
            help="Never delete tags matching this shell glob (v*, release-?); repeatable.",
            show_default=False,
        ),
    ] = None,
    keep_recent: Annotated[
        int | None,
        typer.Option("--keep-recent", help="Keep the N most recent tags of each repository."),
    ] = None,
    keep_within: Annotated[
        str | None,
        typer.Option("--keep-within", help="Keep tags pushed or pulled within DUR (30d, 12h)."),
    ] = None,
    untagged_after: Annotated[
        str | None,
        typer.Option(
            "--untagged-after",
            help="Untagged manifests wait DUR before GC may delete them (default: the review "
            "delay).",
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Save nothing; list the tags the policy would delete.")
    ] = False,
    server: Server = None,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Set an app's retention policy (admin, or an org token of its organization).

    Without --keep-recent and --keep-within the policy deletes no tag.
    """
    body: dict[str, Any] = {
        "keep_tags": list(keep_tag or []),
        "keep_recent": keep_recent,
        "keep_within": keep_within,
        "untagged_after": untagged_after,
    }
    query: dict[str, str | None] = {"dry_run": "true" if dry_run else "false"}
    found = client(server, token)("PUT", f"/apps/{_quote(app)}/retention", body, query)
    if as_json:
        _print_json(found)
        return
    tags = found["would_delete"]
    if dry_run:
        typer.echo(f"Dry run, nothing was saved: the policy would delete {len(tags)} tag(s) now.")
    else:
        typer.echo(
            f"Retention of {found['app']} set: {_policy_text(found['policy'])}. "
            f"{len(tags)} tag(s) go on its next run."
        )
    for tag in tags:
        typer.echo(tag_line(tag))


@retention_app.command("show")
def retention_show(
    app: AppArg, server: Server = None, token: Token = None, as_json: AsJson = False
) -> None:
    """An app's retention policy and the tags it would delete now."""
    found = client(server, token)("GET", f"/apps/{_quote(app)}/retention")
    if as_json:
        _print_json(found)
        return
    policy = found["policy"]
    if policy is None:
        typer.echo(f"{found['app']} has no retention policy: every tag is kept.")
        return
    table = _table("KEEP TAGS", "KEEP RECENT", "KEEP WITHIN", "UNTAGGED AFTER", "SET", "LAST RUN")
    table.add_row(
        ", ".join(policy["keep_tags"]) or "-",
        "-" if policy["keep_recent"] is None else str(policy["keep_recent"]),
        _duration(policy["keep_within"]),
        _duration(policy["untagged_after"]),
        _when(found["updated_at"]),
        _when(found["last_run_at"]),
    )
    _console().print(table)
    tags = found["would_delete"]
    if not policy["deletes_tags"]:
        typer.echo("Without --keep-recent or --keep-within this policy deletes no tag.")
    typer.echo(
        f"{found['tags_deleted']} tag(s) deleted so far; {len(tags)} would be deleted now"
        + (":" if tags else ".")
    )
    for tag in tags:
        typer.echo(tag_line(tag))


@retention_app.command("unset")
def retention_unset(app: AppArg, server: Server = None, token: Token = None) -> None:
    """Remove an app's retention policy: every tag is kept again."""
    client(server, token)("DELETE", f"/apps/{_quote(app)}/retention")
    typer.echo(f"Removed the retention policy of {app}.")


def usage_text(usage: dict[str, Any]) -> str:
    """`1.2 GiB of 5 GiB (hard), soft 4 GiB: over the soft limit`."""
    used = f"{size(int(usage['bytes']))} in {usage['blobs']} blob(s) and manifests"
    quota = usage["quota"]
    if quota is None:
        return f"{usage['org']}: {used}; no quota"
    parts = [f"of {size(int(quota['hard']))} (hard)" if quota["hard"] is not None else ""]
    if quota["soft"] is not None:
        parts.append(f"soft {size(int(quota['soft']))}")
    state = {
        "ok": "within the quota",
        "soft": "over the soft limit",
        "hard": "over the hard limit: pushes of new blobs are refused",
    }[usage["state"]]
    limits = ", ".join(p for p in parts if p)
    return f"{usage['org']}: {used} {limits}: {state}"


@orgs_app.command("usage")
def orgs_usage(
    org: OrgArg, server: Server = None, token: Token = None, as_json: AsJson = False
) -> None:
    """What an organization's apps hold (each unique blob once) against its quota."""
    found = client(server, token)("GET", f"/orgs/{_quote(org)}/usage")
    if as_json:
        _print_json(found)
        return
    typer.echo(usage_text(found))


@quota_app.command("set")
def quota_set(
    org: OrgArg,
    hard: Annotated[
        str, typer.Argument(help="The hard limit: bytes, or 500MB, 5GiB, 1.5TB (admin tokens).")
    ],
    soft: Annotated[
        str | None,
        typer.Option("--soft", help="A soft (warning) limit, at most the hard one."),
    ] = None,
    server: Server = None,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Set an organization's quota (admin tokens only)."""
    found = client(server, token)("PUT", f"/orgs/{_quote(org)}/quota", {"hard": hard, "soft": soft})
    if as_json:
        _print_json(found)
        return
    typer.echo(usage_text(found))


@quota_app.command("unset")
def quota_unset(org: OrgArg, server: Server = None, token: Token = None) -> None:
    """Remove an organization's quota (admin tokens only)."""
    client(server, token)("DELETE", f"/orgs/{_quote(org)}/quota")
    typer.echo(f"Removed the quota of {org}.")


def register() -> None:
    """Add `skyreg apps retention` and `skyreg orgs quota` to the `apps` and `orgs` groups
    (`cli/platform.py`; `skyreg orgs usage` is declared on `orgs_app` above)."""
    apps_app.add_typer(retention_app, name="retention")
    orgs_app.add_typer(quota_app, name="quota")
