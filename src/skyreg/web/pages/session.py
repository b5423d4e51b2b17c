"""Signing in and out: an access token exchanged for a session cookie, and back."""

from __future__ import annotations

import hmac

from aiohttp import web

from skyreg.auth.http import client_of
from skyreg.auth.service import AuthFailed, Throttled
from skyreg.meta.audit import AuditEntry
from skyreg.meta.platform import TokenRecord
from skyreg.web.base import (
    CONSOLE_KINDS,
    SESSION_COOKIE,
    SIGNIN_COOKIE,
    Page,
    Refused,
    View,
    cookie_name,
    cookie_secret,
    is_https,
    local_path,
    new_secret,
    page,
    redirect,
)

PAGES: list[Page] = []
MAX_SECRET = 200  # characters of a pasted token


def _name(view: View, name: str) -> str:
    return cookie_name(view.request, view.services.auth.public_url, name)


def _cookie(view: View, response: web.StreamResponse, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        _name(view, name),
        value,
        max_age=max_age,
        path="/",
        httponly=True,
        samesite="Strict",
        secure=is_https(view.request, view.services.auth.public_url),
    )


@page(PAGES, "GET", "/signin", public=True)
async def signin_form(view: View) -> web.StreamResponse:
    """The sign-in form (signed in already: on to the orgs)."""
    following = local_path(view.request.query.get("next"))
    if view.token is not None:
        return redirect(following)
    form_secret = cookie_secret(view.request.cookies.get(_name(view, SIGNIN_COOKIE)))
    if form_secret is None:
        form_secret = new_secret()
    response = view.render(
        "signin.html", title="Sign in", following=following, form_secret=form_secret, error=None
    )
    _cookie(view, response, SIGNIN_COOKIE, form_secret, 3600)
    return response


async def _audit_signin(view: View, action: str, token: TokenRecord | None, status: int) -> None:
    audit = view.services.audit
    if audit is None:
        return
    entry = AuditEntry(
        action=action,
        target=f"{view.request.method} {view.request.path} (console)",
        client=view.request.remote or "unknown",
        status=status,
        actor_id=token.id if token else None,
        actor_name=token.name if token else None,
        actor_kind=token.kind if token else None,
        actor_org_id=token.org_id if token else None,
    )
    try:
        await audit.run(audit.record, entry)
    except Exception:  # the sign-in happened; its record failing is logged, not the user's
        view.request.app.logger.exception("audit entry of a console sign-in not written")


@page(PAGES, "POST", "/signin", public=True)
async def signin(view: View) -> web.StreamResponse:
    """Exchange a token for a session cookie (the token's secret is never stored)."""
    form = view.form
    cookie = cookie_secret(view.request.cookies.get(_name(view, SIGNIN_COOKIE)))
    sent = cookie_secret(form.get("form_secret")) or ""
    if not cookie or not hmac.compare_digest(cookie.encode(), sent.encode()):
        raise Refused(403, "the sign-in form expired: reload the page and sign in again")
    following = local_path(form.get("next"))
    secret = form.get("token", "").strip()
    auth = view.services.auth
    error: str | None = None
    token: TokenRecord | None = None
    status = 200
    if not secret or len(secret) > MAX_SECRET:
        error, status = "Paste an access token.", 400
    else:
        client = client_of(view.request)
        try:
            token = await auth.platform.read(
                auth.limited, client, lambda: auth.token_for_secret(secret)
            )
        except Throttled as e:
            error, status = f"Too many failed attempts: retry in {e.retry_after} s.", 429
        except AuthFailed:
            error, status = "That token is invalid, expired or revoked.", 401
    if token is not None and token.kind not in CONSOLE_KINDS:
        error, status = f"A {token.kind} token cannot sign in to the console.", 403
    if error is not None:
        await _audit_signin(view, "consoleSignIn", token, status)
        response = view.render(
            "signin.html",
            status=status,
            title="Sign in",
            following=following,
            form_secret=sent,
            error=error,
        )
        return response
    assert token is not None
    console = view.console
    session = await console.sessions.run(
        console.sessions.create, token.id, console.session_ttl, view.request.remote or "unknown"
    )
    await _audit_signin(view, "consoleSignIn", token, 303)
    response = redirect(following)
    _cookie(view, response, SESSION_COOKIE, session, int(console.session_ttl.total_seconds()))
    response.del_cookie(_name(view, SIGNIN_COOKIE), path="/")
    return response


@page(PAGES, "POST", "/signout")
async def signout(view: View) -> web.StreamResponse:
    """End the session: its row goes, and the cookie."""
    assert view.session_secret is not None
    console = view.console
    await console.sessions.run(console.sessions.end, view.session_secret)
    await _audit_signin(view, "consoleSignOut", view.token, 303)
    response = redirect("/signin")
    response.del_cookie(_name(view, SESSION_COOKIE), path="/")
    return response
