"""`skyreg webhooks create|list|delete|deliveries|redeliver`: an org's webhooks."""

from __future__ import annotations

from typing import Annotated

import typer

from skyreg.cli.client import client
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

webhooks_app = typer.Typer(
    help="Webhooks: CloudEvents POSTed to a URL of yours when images, releases and machines "
    "change.",
    no_args_is_help=True,
)
Org = Annotated[str, typer.Option("--org", "-o", help="The organization.")]


@webhooks_app.command("create")
def create(
    org: Org,
    url: Annotated[str, typer.Option(help="Where events are POSTed (http or https).")],
    event: Annotated[
        list[str] | None,
        typer.Option(
            help="An event type to send (repeat; default: all), e.g. dev.skyreg.image.pushed."
        ),
    ] = None,
    app: Annotated[str | None, typer.Option(help="Only this app's events.")] = None,
    as_json: AsJson = False,
    server: Server = None,
    token: Token = None,
) -> None:
    """Create a webhook; its signing secret is printed once."""
    body = {"url": url, "events": event or [], "app": app}
    made = client(server, token)("POST", f"/orgs/{_quote(org)}/webhooks", body=body)
    if as_json:
        _print_json(made)
        return
    typer.echo(f"webhook {made['id']} -> {made['url']}")
    typer.echo(f"secret (shown once; verify X-Skyreg-Signature with it): {made['secret']}")


@webhooks_app.command("list")
def list_(org: Org, as_json: AsJson = False, server: Server = None, token: Token = None) -> None:
    """The org's webhooks."""
    found = client(server, token)("GET", f"/orgs/{_quote(org)}/webhooks")
    if as_json:
        _print_json(found)
        return
    rows = _table("ID", "URL", "APP", "EVENTS", "CREATED")
    for h in found["webhooks"]:
        rows.add_row(
            _cell(h["id"]),
            _cell(h["url"]),
            _cell(h["app"] or "*"),
            _cell(", ".join(h["events"]) or "all"),
            _when(h["created_at"]),
        )
    _console().print(rows)


@webhooks_app.command("delete")
def delete(
    webhook_id: Annotated[str, typer.Argument(help="The webhook's id.")],
    server: Server = None,
    token: Token = None,
) -> None:
    """Delete a webhook (its pending deliveries fail)."""
    client(server, token)("DELETE", f"/webhooks/{_quote(webhook_id)}")
    typer.echo(f"deleted webhook {webhook_id}")


@webhooks_app.command("deliveries")
def deliveries(
    webhook_id: Annotated[str, typer.Argument(help="The webhook's id.")],
    as_json: AsJson = False,
    server: Server = None,
    token: Token = None,
) -> None:
    """A webhook's latest deliveries: state, attempts, the receiver's answer."""
    found = client(server, token)("GET", f"/webhooks/{_quote(webhook_id)}/deliveries")
    if as_json:
        _print_json(found)
        return
    rows = _table("ID", "EVENT", "STATE", "ATTEMPTS", "STATUS", "LATENCY", "ANSWER")
    for d in found["deliveries"]:
        latency = "-" if d["last_latency_ms"] is None else f"{d['last_latency_ms']} ms"
        answer = (d["last_error"] or d["last_response"] or "")[:60]
        rows.add_row(
            str(d["id"]),
            _cell(d["event_type"]),
            _cell(d["state"]),
            str(d["attempts"]),
            str(d["last_status"] or "-"),
            latency,
            _cell(answer),
        )
    _console().print(rows)


@webhooks_app.command("redeliver")
def redeliver(
    webhook_id: Annotated[str, typer.Argument(help="The webhook's id.")],
    delivery_id: Annotated[int, typer.Argument(help="The delivery to send again.")],
    server: Server = None,
    token: Token = None,
) -> None:
    """Send a delivery's event again (the same event id)."""
    again = client(server, token)(
        "POST", f"/webhooks/{_quote(webhook_id)}/deliveries/{delivery_id}/redeliver"
    )
    typer.echo(f"queued delivery {again['id']} of event {again['event_id']}")


def register(app: typer.Typer) -> None:
    app.add_typer(webhooks_app, name="webhooks")
