"""`skyreg secrets set|list|unset|rotate-key`: an app's secrets, which its machines get as
environment variables. Values go to the server once and never come back: `list` shows names and
a keyed digest of each value."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from skyreg.cli.client import client, fail
from skyreg.cli.platform import AsJson, Server, Token, _console, _print_json, _quote, _table, _when
from skyreg.cli.waiting import parse_wait_timeout, wait_release

secrets_app = typer.Typer(
    help="App secrets: environment variables of an app's machines, encrypted at rest and never "
    "shown again.",
    no_args_is_help=True,
)

AppArg = Annotated[str, typer.Argument(help="App name.")]
Stage = Annotated[
    bool,
    typer.Option("--stage", help="Keep the change for the next deploy instead of rolling now."),
]
Detach = Annotated[
    bool, typer.Option("--detach", help="Return once the release is recorded (no waiting).")
]
WaitTimeout = Annotated[
    str,
    typer.Option("--wait-timeout", help="How long to wait for the machines (90s, 5m, 1h)."),
]
MAX_STDIN = 2 << 20  # bytes of NAME=VALUE lines read from standard input (the API's limit)


def parse_assignments(pairs: list[str]) -> dict[str, str]:
    """NAME=VALUE arguments; `-` reads NAME=VALUE lines from standard input (blank lines and
    lines starting with # skipped). A later NAME wins. Exits on a malformed one."""
    values: dict[str, str] = {}
    for pair in pairs:
        if pair == "-":
            data = sys.stdin.buffer.read(MAX_STDIN + 1)
            if len(data) > MAX_STDIN:
                fail(f"standard input holds more than {MAX_STDIN >> 20} MiB of secrets")
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                fail("standard input is not UTF-8 text")
            for number, line in enumerate(text.splitlines(), start=1):
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                name, sep, value = line.partition("=")
                if not sep or not name.strip():
                    fail(f"line {number} of standard input is not NAME=VALUE")
                values[name.strip()] = value
            continue
        name, sep, value = pair.partition("=")
        if not sep or not name:
            # The value is not echoed: it may be the secret itself, typed without its name.
            fail("each secret is NAME=VALUE (or - to read NAME=VALUE lines from standard input)")
        values[name] = value
    if not values:
        fail("give at least one NAME=VALUE")
    return values


def _changed(
    answer: dict[str, Any],
    what: str,
    *,
    server: str | None,
    token: str | None,
    detach: bool,
    wait_timeout: str,
    as_json: bool,
) -> None:
    timeout = parse_wait_timeout(wait_timeout)
    names = ", ".join(answer["changed"]) or "nothing"
    release = answer.get("release")
    if not answer["changed"]:
        message = f"{answer['app']}: nothing changed."
    elif release is None:
        message = (
            f"{answer['app']}: {what} {names} (version {answer['version']}), staged: the next "
            "deploy uses them."
        )
    else:
        message = (
            f"{answer['app']}: {what} {names} (version {answer['version']}); release "
            f"v{release['version']} rolls the machines."
        )
    typer.echo(message, err=as_json)
    waited = None
    if release is not None and not detach:
        api = client(server, token)
        waited = wait_release(
            api, answer["app"], release, timeout, lambda s: typer.echo(s, err=as_json)
        )
        answer["release"] = waited.release
    if as_json:
        _print_json(answer)
    if waited is not None and waited.code:
        fail(waited.reason, waited.code)


@secrets_app.command("set")
def secrets_set(
    app: AppArg,
    pairs: Annotated[
        list[str],
        typer.Argument(help="NAME=VALUE, or - to read NAME=VALUE lines from standard input."),
    ],
    stage: Stage = False,
    detach: Detach = False,
    wait_timeout: WaitTimeout = "5m",
    server: Server = None,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Set secrets of an app; its machines restart with them (unless --stage).

    Values are never shown again: `skyreg secrets list` gives names and digests only.
    """
    values = parse_assignments(pairs)
    answer = client(server, token)(
        "POST", f"/apps/{_quote(app)}/secrets", {"secrets": values, "stage": stage}
    )
    _changed(
        answer, "set", server=server, token=token, detach=detach,
        wait_timeout=wait_timeout, as_json=as_json,
    )  # fmt: skip


@secrets_app.command("unset")
def secrets_unset(
    app: AppArg,
    names: Annotated[list[str], typer.Argument(help="Names of the secrets to remove.")],
    stage: Stage = False,
    detach: Detach = False,
    wait_timeout: WaitTimeout = "5m",
    server: Server = None,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Remove secrets of an app; its machines restart without them (unless --stage)."""
    answer = client(server, token)(
        "POST", f"/apps/{_quote(app)}/secrets/unset", {"names": names, "stage": stage}
    )
    _changed(
        answer, "unset", server=server, token=token, detach=detach,
        wait_timeout=wait_timeout, as_json=as_json,
    )  # fmt: skip


@secrets_app.command("list")
def secrets_list(
    app: AppArg, server: Server = None, token: Token = None, as_json: AsJson = False
) -> None:
    """An app's secrets: names, a digest of each value, who set them and when (never values)."""
    found = client(server, token)("GET", f"/apps/{_quote(app)}/secrets")
    if as_json:
        _print_json(found)
        return
    if not found["secrets"]:
        typer.echo(f"{found['app']} has no secrets.")
        return
    table = _table("NAME", "DIGEST", "STATUS", "SET BY", "SET")
    for s in found["secrets"]:
        table.add_row(
            s["name"],
            s["digest"],
            "deployed" if s["deployed"] else "staged",
            s["set_by"]["name"],
            _when(s["set_at"]),
        )
    _console().print(table)


@secrets_app.command("rotate-key")
def secrets_rotate_key(server: Server = None, token: Token = None, as_json: AsJson = False) -> None:
    """Admin: make the servers read their master keys again and wrap every org's data key with
    the newest one.

    First add the new key as the first line of every server's key file (`skyreg serve
    --secrets-key-file`, or SKYREG_SECRETS_KEY then a restart); keep the old key there until
    this reports every data key rewrapped.
    """
    done = client(server, token)("POST", "/secrets/rotate-key")
    if as_json:
        _print_json(done)
        return
    typer.echo(
        f"Every data key is wrapped by master key {done['key_id']}: {done['rewrapped']} of "
        f"{done['total']} were wrapped anew."
    )


def register(app: typer.Typer) -> None:
    """Add `skyreg secrets` to the `skyreg` command."""
    app.add_typer(secrets_app, name="secrets")


@secrets_app.command("add-key")
def secrets_add_key(
    key_file: Annotated[
        str,
        typer.Option(
            "--key-file",
            help="The server's master key file (default: DATA_DIR/secrets.key).",
        ),
    ],
) -> None:
    """On a server host: put a new master key first in the key file, keeping the others (the
    first step of a rotation; then `skyreg secrets rotate-key`)."""
    from pathlib import Path

    from skyreg.auth.envelope import SecretKeyError, prepend_new_key

    try:
        key = prepend_new_key(Path(key_file))
    except (SecretKeyError, OSError) as e:
        fail(str(e))
    typer.echo(f"Master key {key.key_id} added first to {key_file}; the older keys stay.")
