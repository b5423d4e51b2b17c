"""`skyreg login`, `orgs`, `apps`, `tokens`, `images` (list, show, delete), `replication`,
`auth docker`: the management API's CLI."""

from __future__ import annotations

import base64
import json
import os
import sys
import urllib.parse
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from skyreg.cli.client import (
    ApiFailure,
    Client,
    client,
    config_path,
    fail,
    normalize_server,
    read_token_file,
    write_config,
    write_private_json,
)
from skyreg.oci.reference import parse_reference
from skyreg.units import human_size

if TYPE_CHECKING:
    # Imported where a table is printed: rich costs every other command its start-up time.
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

Server = Annotated[
    str | None,
    typer.Option(
        "--server",
        envvar="SKYREG_SERVER",
        help="Server URL, e.g. http://127.0.0.1:5000 (default: from `skyreg login`).",
        show_default=False,
    ),
]
Token = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="SKYREG_TOKEN",
        help="Access token (default: from `skyreg login`).",
        show_default=False,
        show_envvar=True,
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
OrgFilter = Annotated[
    str | None,
    typer.Option("--org", help="Only this organization (default: yours; admin: all)."),
]

orgs_app = typer.Typer(help="Organizations.", no_args_is_help=True)
apps_app = typer.Typer(
    help="Apps (globally unique names; their repositories: APP, APP/...).", no_args_is_help=True
)
tokens_app = typer.Typer(help="Access tokens: org, deploy and read-only.", no_args_is_help=True)
images_app = typer.Typer(help="Images pushed to an app.", no_args_is_help=True)
auth_app = typer.Typer(help="Credentials for other tools.", no_args_is_help=True)


def _console() -> Console:
    """Standard output; wide enough when piped that digests and names are never cut."""
    from rich.console import Console

    wide = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(width=200 if wide else None, highlight=False)


def _print_json(doc: object) -> None:
    typer.echo(json.dumps(doc, indent=2))


def _when(value: object) -> str:
    if not isinstance(value, str):
        return "-"
    try:
        return datetime.fromisoformat(value).strftime("%Y-%m-%d %H:%M:%S UTC")
    except ValueError:
        return value


def short_digest(digest: str) -> str:
    """`sha256:0123456789ab`: the algorithm and the first 12 hex digits."""
    algorithm, _, hex_part = digest.partition(":")
    return f"{algorithm}:{hex_part[:12]}" if hex_part else digest[:19]


def _cell(value: object) -> Text:
    """Text a user or tenant controls, as a table cell: never read as markup (`[/x]` would end
    the table with an error), its control characters (terminal escape sequences) as `\\xNN`."""
    from rich.text import Text

    raw = str(value)
    return Text("".join(c if c == "\t" or c.isprintable() else f"\\x{ord(c):02x}" for c in raw))


def _table(*columns: str) -> Table:
    from rich.table import Table

    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


# -- login ---------------------------------------------------------------------------------------


def login(
    server: Annotated[
        str,
        typer.Option(
            "--server", envvar="SKYREG_SERVER", help="Server URL, e.g. http://127.0.0.1:5000."
        ),
    ],
    token: Token = None,
    token_file: Annotated[
        str | None,
        typer.Option("--token-file", help="Read the token from this file ('-': standard input)."),
    ] = None,
) -> None:
    """Check a token against a server and save both in ~/.config/skyreg/config.json."""
    if token_file is not None:
        token = read_token_file(token_file)
    if not token:
        fail("give the token with --token, --token-file or SKYREG_TOKEN")
    url = normalize_server(server)
    me = client(url, token)("GET", "/whoami")
    path = write_config(url, token)
    scope = f" of org {me['org']}" if me.get("org") else ""
    scope += f" for app {me['app']}" if me.get("app") else ""
    typer.echo(f"Logged in to {url} with {me['kind']} token {me['id']}{scope}.")
    typer.echo(f"Saved the server and token in {path}.", err=True)


def logout() -> None:
    """Forget the saved server and token."""
    path = config_path()
    try:
        path.unlink()
    except FileNotFoundError:
        typer.echo("Not logged in.", err=True)
        return
    except OSError as e:
        fail(f"cannot remove {path}: {e}")
    typer.echo(f"Removed {path}.")


def whoami(server: Server = None, token: Token = None, as_json: AsJson = False) -> None:
    """Show the token in use."""
    me = client(server, token)("GET", "/whoami")
    if as_json:
        _print_json(me)
        return
    parts = [f"{me['kind']} token {me['id']} ({me['name']})"]
    if me.get("org"):
        parts.append(f"org {me['org']}")
    if me.get("app"):
        parts.append(f"app {me['app']}")
    if me.get("expires_at"):
        parts.append(f"expires {_when(me['expires_at'])}")
    typer.echo(", ".join(parts))


# -- orgs ----------------------------------------------------------------------------------------


@orgs_app.command("list")
def orgs_list(server: Server = None, token: Token = None, as_json: AsJson = False) -> None:
    """List organizations (admin: all; others: their own)."""
    orgs = client(server, token)("GET", "/orgs")["orgs"]
    if as_json:
        _print_json(orgs)
        return
    table = _table("NAME", "CREATED")
    for org in orgs:
        table.add_row(org["name"], _when(org["created_at"]))
    _console().print(table)


@orgs_app.command("create")
def orgs_create(
    name: Annotated[str, typer.Argument(help="A DNS label: a-z, 0-9, '-'.")],
    server: Server = None,
    token: Token = None,
) -> None:
    """Create an organization (admin token)."""
    org = client(server, token)("POST", "/orgs", {"name": name})
    typer.echo(f"Created organization {org['name']}.")


# -- apps ----------------------------------------------------------------------------------------


def _app_row(table: Table, app: dict[str, Any]) -> None:
    table.add_row(
        app["name"], app["org"], "public" if app["public"] else "private", _when(app["created_at"])
    )


@apps_app.command("list")
def apps_list(
    org: OrgFilter = None, server: Server = None, token: Token = None, as_json: AsJson = False
) -> None:
    """List apps."""
    apps = client(server, token)("GET", "/apps", query={"org": org})["apps"]
    if as_json:
        _print_json(apps)
        return
    table = _table("NAME", "ORG", "VISIBILITY", "CREATED")
    for app in apps:
        _app_row(table, app)
    _console().print(table)


@apps_app.command("create")
def apps_create(
    name: Annotated[
        str | None, typer.Argument(help="A DNS label, unique across the registry.")
    ] = None,
    org: Annotated[
        str | None, typer.Option("--org", help="Organization (default: your token's).")
    ] = None,
    generate_name: Annotated[
        bool, typer.Option("--generate-name", help="Let the server pick a readable unused name.")
    ] = False,
    public: Annotated[
        bool, typer.Option("--public", help="Anyone may pull it (never push).")
    ] = False,
    server: Server = None,
    token: Token = None,
) -> None:
    """Create an app; its name is printed on standard output."""
    if (name is None) == (not generate_name):
        fail("give an app NAME or --generate-name (not both)")
    body: dict[str, Any] = {"org": org, "public": public}
    body.update({"generate_name": True} if generate_name else {"name": name})
    app = client(server, token)("POST", "/apps", body)
    typer.echo(app["name"])
    visibility = "public" if app["public"] else "private"
    typer.echo(f"Created {visibility} app {app['name']} in org {app['org']}.", err=True)


@apps_app.command("show")
def apps_show(
    app: Annotated[str, typer.Argument(help="App name.")],
    server: Server = None,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Show an app."""
    found = client(server, token, need_token=False)("GET", f"/apps/{_quote(app)}")
    if as_json:
        _print_json(found)
        return
    table = _table("NAME", "ORG", "VISIBILITY", "CREATED")
    _app_row(table, found)
    _console().print(table)
    if "service" in found:
        typer.echo(_service_text(found["service"]))


def _service_text(service: object) -> str:
    """An app's service as `apps show` prints it: its port, then a line per check."""
    if not isinstance(service, dict):
        return "Service: none (the proxy sends the app no requests)."
    port = service.get("internal_port")
    lines = [f"Service: port {port}"]
    checks = [c for c in service.get("checks") or [] if isinstance(c, dict)]
    if not checks:
        lines[0] += ", no health checks (machines are ready once started)."
    for check in checks:
        target = f"port {check.get('port', port)}"
        if check.get("type") == "http":
            target += f" {check.get('path', '/')}"
        lines.append(
            f"  {check.get('type')} check of {target} every {_seconds(check.get('interval'))}, "
            f"timeout {_seconds(check.get('timeout'))}, "
            f"grace period {_seconds(check.get('grace_period'))}"
        )
    return "\n".join(lines)


def _seconds(value: object) -> str:
    return f"{value:g}s" if isinstance(value, int | float) else "-"


@apps_app.command("update")
def apps_update(
    app: Annotated[str, typer.Argument(help="App name.")],
    public: Annotated[
        bool | None,
        typer.Option("--public/--private", help="Anonymous pull on or off.", show_default=False),
    ] = None,
    regions: Annotated[
        str | None,
        typer.Option(
            help="Regions the app runs in, e.g. iad,syd (multi-region registries; '' clears).",
            show_default=False,
        ),
    ] = None,
    replicate_ahead: Annotated[
        bool | None,
        typer.Option(
            "--replicate-ahead/--no-replicate-ahead",
            help="Copy every tagged push to the app's regions before any deploy.",
            show_default=False,
        ),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(
            "--port",
            min=1,
            max=65535,
            help="Set the app's service: the port its machines listen on (the proxy's target). "
            "With the --check-* flags, its health checks; without them, none.",
            show_default=False,
        ),
    ] = None,
    check_http: Annotated[
        list[str] | None,
        typer.Option(
            "--check-http",
            metavar="PATH",
            help="An HTTP health check of PATH, e.g. /healthz (repeatable; needs --port).",
            show_default=False,
        ),
    ] = None,
    check_tcp: Annotated[
        bool,
        typer.Option("--check-tcp", help="A TCP health check: the port accepts (needs --port)."),
    ] = False,
    check_interval: Annotated[
        str | None,
        typer.Option(help="Time between checks, e.g. 10s (1s to 1h).", show_default="10s"),
    ] = None,
    check_timeout: Annotated[
        str | None,
        typer.Option(
            help="Longest a check may take (1s to 1m, at most the interval).", show_default="2s"
        ),
    ] = None,
    check_grace: Annotated[
        str | None,
        typer.Option(
            help="Failures this long after a machine starts do not count (0s to 1h).",
            show_default="5s",
        ),
    ] = None,
    no_service: Annotated[
        bool, typer.Option("--no-service", help="Remove the app's service and its checks.")
    ] = False,
    server: Server = None,
    token: Token = None,
) -> None:
    """Change an app (admin or org token). A service (--port, --check-*, --no-service) takes
    effect with the app's next release; a skyreg.toml's http_service replaces it on deploy."""
    body: dict[str, Any] = {}
    if public is not None:
        body["public"] = public
    if regions is not None:
        body["regions"] = [r.strip() for r in regions.split(",") if r.strip()]
    if replicate_ahead is not None:
        body["replicate_ahead"] = replicate_ahead
    timings = {
        "--check-interval": check_interval,
        "--check-timeout": check_timeout,
        "--check-grace": check_grace,
    }
    flags = [name for name, value in timings.items() if value is not None]
    flags = (
        (["--check-http"] if check_http else []) + (["--check-tcp"] if check_tcp else []) + flags
    )
    if no_service:
        if port is not None or flags:
            given = ", ".join((["--port"] if port is not None else []) + flags)
            fail(f"--no-service removes the service: give no {given} with it")
        body["service"] = None
    elif port is not None:
        body["service"] = _service_flags(port, check_http or [], check_tcp, timings)
    elif flags:
        fail(f"{', '.join(flags)}: set the service's port too (--port PORT)")
    if not body:
        fail(
            "nothing to change: pass --public/--private, --regions, --replicate-ahead, "
            "--port or --no-service"
        )
    found = client(server, token)("PATCH", f"/apps/{_quote(app)}", body)
    line = f"App {found['name']} is {'public' if found['public'] else 'private'}"
    if "regions" in found:
        where = ", ".join(found["regions"]) or "no regions set"
        ahead = "copied there on push" if found["replicate_ahead"] else "copied on deploy"
        line += f"; regions: {where} (images {ahead})"
    typer.echo(line + ".")
    if "service" in body:
        typer.echo(_service_text(found.get("service")))
        typer.echo("The service takes effect with the app's next release.", err=True)


def _service_flags(
    port: int, paths: list[str], tcp: bool, timings: dict[str, str | None]
) -> dict[str, Any]:
    """The Service of `apps update --port`: an http check per path, a tcp check, each with the
    --check-interval/-timeout/-grace given; ends the command on a value the API would refuse."""
    from skyreg.cli.appconfig import (
        CHECK_SECONDS,
        MAX_CHECKS,
        Check,
        check_path_problem,
        check_timing_problem,
        duration_problem,
        service_body,
    )

    keys = dict(zip(timings, CHECK_SECONDS, strict=True))  # flag -> interval, timeout, ...
    if not paths and not tcp and any(v is not None for v in timings.values()):
        given = ", ".join(f for f, v in timings.items() if v is not None)
        fail(f"{given}: add a check (--check-http PATH or --check-tcp)")
    for flag, value in timings.items():
        problem = None if value is None else duration_problem(value, *CHECK_SECONDS[keys[flag]])
        if problem:
            fail(f"{flag} {problem}")
    interval, timeout, grace = timings.values()
    timing = check_timing_problem(interval, timeout)
    if timing:
        fail(f"--check-{timing[0]} {timing[1]}")
    for path in paths:
        problem = check_path_problem(path)
        if problem:
            fail(f"--check-http {problem}")
    if len(paths) + tcp > MAX_CHECKS:
        fail(f"at most {MAX_CHECKS} health checks")
    checks = [Check("http", port, path, interval, timeout, grace) for path in paths]
    if tcp:
        checks.append(Check("tcp", port, None, interval, timeout, grace))
    return service_body(port, checks)


def _quote(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


# -- tokens --------------------------------------------------------------------------------------


class Kind(StrEnum):
    org = "org"
    deploy = "deploy"
    readonly = "readonly"
    agent = "agent"
    proxy = "proxy"


@tokens_app.command("create")
def tokens_create(
    kind: Annotated[
        Kind,
        typer.Argument(
            help="org: everything in the org; deploy: push/pull one app, pull the org's others; "
            "readonly: pull the org's apps; agent (admins): a machine agent's, which receives "
            "machines' secrets (its org's, or every org's without --org); proxy (admins): "
            "`skyreg proxy`'s, which reads the routes to machines and nothing else."
        ),
    ],
    org: Annotated[
        str | None, typer.Option("--org", help="Organization (default: your token's).")
    ] = None,
    app: Annotated[str | None, typer.Option("--app", help="The app of a deploy token.")] = None,
    expiry: Annotated[
        str | None,
        typer.Option("--expiry", help="Lifetime: 720h, 30m, 7d, or seconds (default: none)."),
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="A label for listings.")] = None,
    server: Server = None,
    token: Token = None,
) -> None:
    """Create a token. The secret is printed once, alone, on standard output."""
    if kind is Kind.deploy and not app:
        fail("a deploy token needs --app APP")
    if kind is not Kind.deploy and app:
        fail(f"a {kind.value} token is not tied to an app; use --org, not --app")
    body: dict[str, Any] = {"kind": kind.value}
    for key, value in (("org", org), ("app", app), ("expiry", expiry), ("name", name)):
        if value is not None:
            body[key] = value
    created = client(server, token)("POST", "/tokens", body)
    typer.echo(created["secret"])
    if created.get("app"):
        target = f"app {created['app']}"
    else:
        target = f"org {created['org']}" if created.get("org") else "every org"
    expires = f"expires {_when(created['expires_at'])}" if created["expires_at"] else "no expiry"
    typer.echo(
        f"Created {created['kind']} token {created['id']} for {target} ({expires}). "
        "This is the only time the secret is shown: store it now.",
        err=True,
    )


@tokens_app.command("list")
def tokens_list(
    org: OrgFilter = None, server: Server = None, token: Token = None, as_json: AsJson = False
) -> None:
    """List tokens (never their secrets)."""
    tokens = client(server, token)("GET", "/tokens", query={"org": org})["tokens"]
    if as_json:
        _print_json(tokens)
        return
    table = _table("ID", "NAME", "KIND", "ORG", "APP", "CREATED", "EXPIRES", "STATUS")
    for t in tokens:
        status = "active" if t["active"] else ("revoked" if t["revoked_at"] else "expired")
        table.add_row(
            t["id"],
            t["name"],
            t["kind"],
            t["org"] or "-",
            t["app"] or "-",
            _when(t["created_at"]),
            _when(t["expires_at"]) if t["expires_at"] else "never",
            status,
        )
    _console().print(table)


@tokens_app.command("revoke")
def tokens_revoke(
    token_id: Annotated[str, typer.Argument(metavar="ID", help="Token id (see `tokens list`).")],
    server: Server = None,
    token: Token = None,
) -> None:
    """Revoke a token; it stops working at once."""
    revoked = client(server, token)("DELETE", f"/tokens/{_quote(token_id)}")
    typer.echo(f"Revoked token {revoked['id']} ({revoked['name']}).")


# -- images --------------------------------------------------------------------------------------


MAX_IMAGE_PAGES = 1000  # of up to 1000 tags each


def _all_images(api: Client, app: str) -> tuple[str, list[dict[str, Any]]]:
    """The app's name and every tag of its repositories, following the listing's pages."""
    found: list[dict[str, Any]] = []
    query: dict[str, str | None] = {}
    for _ in range(MAX_IMAGE_PAGES):
        page: dict[str, Any] = api("GET", f"/apps/{_quote(app)}/images", query=query)
        found += page["images"]
        cursor = page.get("next_cursor")
        if not cursor or cursor == query.get("cursor"):
            return str(page["app"]), found
        query["cursor"] = str(cursor)
    fail(f"more than {MAX_IMAGE_PAGES} pages of images")


@images_app.command("list")
def images_list(
    app: Annotated[str, typer.Option("--app", help="App name.")],
    server: Server = None,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """List every tag of an app's repositories with digest, size and push time."""
    name, images = _all_images(client(server, token, need_token=False), app)
    if as_json:
        _print_json(images)
        return
    if not images:
        typer.echo(f"No images in app {name}.", err=True)
        return
    table = _table("REPOSITORY", "TAG", "DIGEST", "SIZE", "PUSHED")
    for image in images:
        table.add_row(
            image["repository"],
            image["tag"],
            short_digest(image["digest"]),
            human_size(int(image["size"])),
            _when(image["pushed_at"]),
        )
    _console().print(table)


@images_app.command("show")
def images_show(
    image: Annotated[str, typer.Argument(help="APP:TAG or APP@DIGEST.")],
    server: Server = None,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Show an image's blobs and, in a multi-region registry, which regions hold each."""
    try:
        parsed = parse_reference(image.strip()).for_pull()  # a HOST[:PORT]/ in front is ignored
    except ValueError as e:
        fail(f"invalid image reference {image[:300]!r}: {e}")
    app = parsed.repository
    ref = f"{app}@{parsed.digest}" if parsed.digest else f"{app}:{parsed.tag}"
    found = client(server, token, need_token=False)(
        "GET", f"/apps/{_quote(app)}/images/{_quote(ref)}"
    )
    if as_json:
        _print_json(found)
        return
    typer.echo(f"{found['repository']} {found['reference']} {found['digest']}")
    if "blobs" not in found:
        typer.echo("(one region: every blob is here)")
        return
    regions = sorted(found["regions"])
    table = _table("BLOB", "SIZE", *[r.upper() for r in regions])
    for blob in found["blobs"]:
        table.add_row(
            short_digest(blob["digest"]),
            human_size(int(blob["size"])),
            *["yes" if r in blob["regions"] else "-" for r in regions],
        )
    table.add_row(
        "complete",
        human_size(int(found["size"])),
        *["yes" if found["regions"][r]["complete"] else "no" for r in regions],
    )
    _console().print(table)


@images_app.command("delete")
def images_delete(
    image: Annotated[
        str,
        typer.Argument(help="APP:TAG or APP@DIGEST (APP/NAME:TAG: the app's other repositories)."),
    ],
    server: Server = None,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Delete a tag (the image itself goes once garbage collection finds nothing else holds
    it), or a manifest by digest with every tag of it. Needs a token that may push to the app."""
    try:
        parsed = parse_reference(image.strip())  # a HOST[:PORT]/ in front is ignored
    except ValueError as e:
        fail(f"invalid image reference {image[:300]!r}: {e}")
    if (parsed.tag is None) == (parsed.digest is None):  # no default tag for a deletion
        fail(f"name the image to delete as APP:TAG or APP@DIGEST, not {image[:300]!r}")
    repository = parsed.repository
    app = repository.split("/", 1)[0]
    ref = f"{repository}@{parsed.digest}" if parsed.digest else f"{repository}:{parsed.tag}"
    deleted = client(server, token)("DELETE", f"/apps/{_quote(app)}/images/{_quote(ref)}")
    if as_json:
        _print_json(deleted)
        return
    if "digest" in deleted:
        typer.echo(f"Deleted manifest {deleted['repository']}@{deleted['digest']} and its tags.")
    else:
        typer.echo(
            f"Deleted tag {deleted['repository']}:{deleted['tag']}; the image goes once garbage "
            "collection finds nothing else holds it."
        )


# -- replication ---------------------------------------------------------------------------------

replication_app = typer.Typer(help="Copies of images between regions.", no_args_is_help=True)


@replication_app.command("status")
def replication_status(server: Server = None, token: Token = None, as_json: AsJson = False) -> None:
    """Replication jobs per region and state, bytes moved, and the latest jobs (admin)."""
    found = client(server, token)("GET", "/replication")
    if as_json:
        _print_json(found)
        return
    if not found["regions"]:
        typer.echo("This registry has one region: nothing is replicated.")
        return
    table = _table("REGION", "STATE", "JOBS", "BYTES")
    for row in found["jobs"]:
        table.add_row(row["region"], row["state"], str(row["count"]), human_size(int(row["bytes"])))
    _console().print(table)
    recent = _table("BLOB", "TO", "FROM", "STATE", "TRIES", "SIZE", "UPDATED", "ERROR")
    for job in found["recent"][:20]:
        recent.add_row(
            short_digest(job["digest"]),
            job["region"],
            job["source"] or "",
            job["state"],
            str(job["attempts"]),
            human_size(int(job["size"])),
            _when(job["updated_at"]),
            (job["error"] or "")[:60],
        )
    _console().print(recent)


# -- auth docker ---------------------------------------------------------------------------------


def docker_config_path() -> Path:
    """$DOCKER_CONFIG/config.json, else ~/.docker/config.json."""
    base = os.environ.get("DOCKER_CONFIG") or str(Path.home() / ".docker")
    return Path(base) / "config.json"


@auth_app.command("docker")
def auth_docker(server: Server = None, token: Token = None) -> None:
    """Add the registry's credentials to Docker's config.json (other entries are kept)."""
    api = client(server, token)
    assert api.token is not None
    try:
        api.call("GET", "/whoami")
    except ApiFailure as e:
        fail(f"the token does not work on {api.server}: {e.message} (HTTP {e.status})")
    host = urllib.parse.urlsplit(api.server).netloc
    path = docker_config_path()
    try:
        doc = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError) as e:
        fail(f"cannot read {path} (left unchanged): {e}")
    if not isinstance(doc, dict):
        fail(f"{path} is not a JSON object (left unchanged)")
    auths = doc.setdefault("auths", {})
    if not isinstance(auths, dict):
        fail(f'"auths" in {path} is not a JSON object (left unchanged)')
    auths[host] = {"auth": base64.b64encode(f"x:{api.token}".encode()).decode()}
    try:
        write_private_json(path, doc, indent="\t")
    except OSError as e:
        fail(f"cannot write {path}: {e}")
    typer.echo(f"Wrote credentials for {host} to {path}.")
    helpers = doc.get("credHelpers")
    helper = helpers.get(host) if isinstance(helpers, dict) else None
    helper = helper or doc.get("credsStore")
    if helper:
        typer.echo(
            f"warning: Docker is set to use the credential helper {helper!r} for {host}, "
            "which takes precedence over this entry",
            err=True,
        )
    if api.server.startswith("http://") and not host.startswith(("localhost", "127.")):
        typer.echo(
            f"note: {host} is plain HTTP; Docker needs it in insecure-registries",
            err=True,
        )


def register(app: typer.Typer) -> None:
    """Add the management commands to the `skyreg` command."""
    app.command()(login)
    app.command()(logout)
    app.command()(whoami)
    app.add_typer(orgs_app, name="orgs")
    app.add_typer(apps_app, name="apps")
    app.add_typer(tokens_app, name="tokens")
    app.add_typer(images_app, name="images")
    app.add_typer(replication_app, name="replication")
    app.add_typer(auth_app, name="auth")
