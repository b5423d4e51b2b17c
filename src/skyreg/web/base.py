"""The plumbing of every console page: its declaration, the signed-in session, CSRF, forms,
rendering, and asking the management API's handlers for data.

A page never queries anything itself: it calls the operations of /api/v1 in process
(`View.api`, by operationId) as the session's token, so it sees exactly what that token sees
through the API, with the same checks, bounds and errors; a change it makes leaves the same audit
entry an API call would (its target marked as the console's).

Sessions: sign-in exchanges an access token for a random cookie secret (HttpOnly,
SameSite=Strict, Secure on https); the database keeps its sha256 (`meta/console.py`). Every form
carries a CSRF token (an HMAC of the session's secret, which the page never shows), checked with
the Origin header on every POST; the sign-in form, before any session, a double-submit cookie.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import jinja2
import msgspec
from aiohttp import web

from skyreg.meta.console import ConsoleSessionMeta
from skyreg.meta.db import unreachable as database_unreachable
from skyreg.meta.platform import TokenRecord
from skyreg.platform.api import ROUTE_LIST
from skyreg.platform.api.base import (
    AUDITED_METHODS,
    Call,
    Route,
    Services,
    audit_call,
    refusal,
)
from skyreg.platform.http import ApiError, read_body
from skyreg.services.errors import ServiceError
from skyreg.units import human_size

log = logging.getLogger("skyreg.console")

SESSION_COOKIE = "skyreg_session"
SIGNIN_COOKIE = "skyreg_signin"  # the sign-in form's double-submit CSRF secret
# On https the cookies are `__Host-` ones: Secure, host-only, Path=/, so a tenant's app served
# on a sibling name of the same domain cannot set ("toss") one the console would read.
HOST_PREFIX = "__Host-"
SESSION_TTL = timedelta(hours=12)
MAX_FORM = 16 * 1024  # bytes of a form body
MAX_FORM_FIELDS = 50
PAGE_SIZE = 50  # rows of a list the console pages itself
MAX_EXPORTS = 2
_CSRF_CONTEXT = b"skyreg console csrf"
# Who may sign in: people's tokens. Agent, proxy and build tokens live on hosts.
CONSOLE_KINDS = frozenset({"admin", "org", "deploy", "readonly"})

OPERATIONS: dict[str, Route] = {route.operation_id: route for route in ROUTE_LIST}


@dataclass(frozen=True)
class Console:
    """What every page shares: the services, the session store, the templates, static files."""

    services: Services
    sessions: ConsoleSessionMeta
    templates: jinja2.Environment
    static: Mapping[str, tuple[str, bytes, str]]  # name -> (hashed name, bytes, content type)
    session_ttl: timedelta = SESSION_TTL
    # Audit exports (each up to 200 pages of the log) this process runs at once.
    exports: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(MAX_EXPORTS))


CONSOLE_KEY = web.AppKey("console", Console)


# -- answers -----------------------------------------------------------------------------------

SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}


def html(body: str, status: int = 200) -> web.Response:
    """An HTML answer with the console's security headers."""
    return web.Response(
        text=body,
        status=status,
        content_type="text/html",
        charset="utf-8",
        headers=SECURITY_HEADERS,
    )


def redirect(location: str) -> web.Response:
    """303 See Other to a path of this console."""
    return web.Response(status=303, headers={**SECURITY_HEADERS, "Location": location})


def local_path(value: str | None, default: str = "/") -> str:
    """`value` when it is a path of this site (where sign-in may send the browser), else
    `default`: never another host (`//evil`, `/\\evil`, `https://…`)."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return default
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value) or len(value) > 2000:
        return default
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return default
    return quote(value, safe="/?&=%#:@!$'()*+,;~-._")  # a Location header holds ASCII only


def is_https(request: web.Request, public_url: str) -> bool:
    """Whether the browser talks https to us (cookies are then Secure)."""
    return request.secure or public_url.startswith("https://")


def cookie_name(request: web.Request, public_url: str, name: str) -> str:
    """`name` as the cookie is called on this scheme (`__Host-` on https)."""
    return HOST_PREFIX + name if is_https(request, public_url) else name


# -- sessions and CSRF -------------------------------------------------------------------------


_SECRET_RE = re.compile(r"[A-Za-z0-9_-]{32,100}")


def cookie_secret(value: str | None) -> str | None:
    """A cookie's value when it has the shape of a secret this console made; None otherwise
    (never passed on: a cookie of other bytes must not reach hashing or the database)."""
    return value if value is not None and _SECRET_RE.fullmatch(value) else None


def csrf_token(session_secret: str) -> str:
    """The CSRF token of a session: an HMAC of its secret (which only its cookie holds)."""
    return hmac.new(session_secret.encode(), _CSRF_CONTEXT, hashlib.sha256).hexdigest()


def same_origin(request: web.Request) -> bool:
    """False when the browser says the request came from another origin (Origin, else Referer);
    True when it came from this one or says nothing (a browser always says, for a POST)."""
    source = request.headers.get("Origin") or request.headers.get("Referer")
    if not source or source == "null":
        return source is None
    parts = urlsplit(source)
    return parts.netloc.lower() == request.host.lower() and parts.scheme in ("http", "https")


class Refused(Exception):
    """A page's refusal: rendered as the error page with `status`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def read_form(request: web.Request) -> dict[str, str]:
    """A urlencoded form body, bounded (413, 415, 400): field -> last value."""
    ctype = request.content_type
    if ctype != "application/x-www-form-urlencoded":
        raise Refused(415, "forms are sent as application/x-www-form-urlencoded")
    try:
        raw = await read_body(request, MAX_FORM)
    except ApiError as e:
        raise Refused(e.status, e.message) from None
    try:
        pairs = parse_qsl(
            raw.decode("utf-8"),
            keep_blank_values=True,
            strict_parsing=False,
            max_num_fields=MAX_FORM_FIELDS,
        )
    except (UnicodeDecodeError, ValueError):
        raise Refused(400, "the form could not be read") from None
    form: dict[str, str] = {}
    for key, value in pairs:
        if "\x00" in key or "\x00" in value:
            raise Refused(400, "form fields must not contain NUL")
        form[key] = value
    return form


# -- views -------------------------------------------------------------------------------------


class ConsoleCall(Call):
    """An API call made by a page as its session's token, with the page's parameters."""

    def __init__(
        self,
        request: web.Request,
        services: Services,
        token: TokenRecord,
        route: Route,
        params: Mapping[str, str],
        query: Mapping[str, str],
        body: Mapping[str, Any] | None,
    ) -> None:
        super().__init__(request, services)
        self.token = token
        self._route = route
        self._params = dict(params)
        self._query = {k: v for k, v in query.items() if v is not None}
        if body is not None:
            self._raw = msgspec.json.encode(body)
        elif route.method in ("POST", "PATCH", "PUT"):
            self._raw = b""

    async def identify(self) -> None:  # the session's token, already checked
        return None

    def path(self, name: str) -> str:
        return self._params[name]

    def path_params(self) -> dict[str, str]:
        return dict(self._params)

    def query(self, name: str) -> str | None:
        return self._query.get(name)

    def target(self) -> str:
        path = self._route.path
        for key, value in self._params.items():
            path = path.replace("{" + key + "}", value)
        return f"{self._route.method} /api/v1{path} (console)"


@dataclass
class View:
    """One page request of a signed-in browser (or, for public pages, maybe not)."""

    request: web.Request
    console: Console
    token: TokenRecord | None
    session_secret: str | None
    form: dict[str, str] = field(default_factory=dict)

    @property
    def services(self) -> Services:
        return self.console.services

    def param(self, name: str) -> str:
        """A path parameter of the page."""
        return self.request.match_info[name]

    def arg(self, name: str, default: str = "") -> str:
        """A query parameter of the page (bounded; `default` when absent)."""
        value = self.request.query.get(name, default)
        if len(value) > 500 or "\x00" in value:
            raise Refused(400, f"query parameter {name[:40]!r} is too long or holds NUL")
        return value

    def int_arg(self, name: str, default: int = 0, maximum: int = 2**62) -> int:
        raw = self.request.query.get(name)
        if raw is None or raw == "":
            return default
        if not (raw.isascii() and raw.isdigit()) or len(raw) > 19 or int(raw) > maximum:
            raise Refused(400, f"query parameter {name[:40]!r} must be a whole number")
        return int(raw)

    @property
    def caller(self) -> TokenRecord:
        if self.token is None:
            raise Refused(401, "sign in first")
        return self.token

    @property
    def csrf(self) -> str:
        return "" if self.session_secret is None else csrf_token(self.session_secret)

    async def api(
        self,
        operation_id: str,
        params: Mapping[str, str] | None = None,
        query: Mapping[str, Any] | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> Any:
        """The answer of the management API's operation as this session's token (its msgspec
        Struct); ApiError as the API would answer. A change is audited as the API's are."""
        route = OPERATIONS[operation_id]
        call = ConsoleCall(
            self.request,
            self.services,
            self.caller,
            route,
            params or {},
            {k: str(v) for k, v in (query or {}).items() if v is not None and v != ""},
            body,
        )
        status = route.status
        try:
            return await route.handler(call)
        except ServiceError as e:
            error = refusal(e)
            status = error.status
            raise error from None
        except ApiError as e:
            status = e.status
            raise
        except Exception:
            status = 500
            raise
        finally:
            if route.audited and route.method in AUDITED_METHODS:
                await audit_call(call, route, status)

    def render(self, template: str, status: int = 200, **context: Any) -> web.Response:
        """The page `template` rendered with `context` (and what every page shows)."""
        page = self.console.templates.get_template(template)
        body = page.render(
            token=self.token,
            csrf=self.csrf,
            path=self.request.path,
            request_query=self.request.query_string,
            **context,
        )
        return html(body, status)


PageHandler = Callable[[View], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Page:
    """One console route: `public` pages answer browsers that are not signed in."""

    method: str
    path: str
    handler: PageHandler
    public: bool = False


def page(
    pages: list[Page], method: str, path: str, *, public: bool = False
) -> Callable[[PageHandler], PageHandler]:
    """Declare a page of a module's `PAGES`."""

    def register(handler: PageHandler) -> PageHandler:
        pages.append(Page(method, path, handler, public))
        return handler

    return register


def query_string(**values: Any) -> str:
    """`?k=v&…` of the values that are set ('' when none)."""
    kept = {k: v for k, v in values.items() if v not in (None, "", 0)}
    return "?" + urlencode(kept) if kept else ""


# -- serving a page ----------------------------------------------------------------------------


def serve(
    console: Console, pages: list[Page]
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The aiohttp handler of one path: its pages by method (405 for others)."""
    by_method = {p.method: p for p in pages}
    if "GET" in by_method:
        by_method.setdefault("HEAD", by_method["GET"])

    async def handle(request: web.Request) -> web.StreamResponse:
        entry = by_method.get(request.method)
        view = View(request, console, None, None)
        if entry is None:
            response = _error_page(view, 405, f"{request.method} is not supported here")
            response.headers["Allow"] = ", ".join(sorted(by_method))
            return response
        try:
            secret = cookie_secret(
                request.cookies.get(
                    cookie_name(request, console.services.auth.public_url, SESSION_COOKIE)
                )
            )
            if secret:
                session = await console.sessions.read(console.sessions.find, secret)
                if session is not None:
                    view.token = session.token
                    view.session_secret = secret
            if view.token is None and not entry.public:
                if request.method == "GET":
                    target = request.path_qs
                    return redirect("/signin" + query_string(next=local_path(target)))
                raise Refused(401, "your session has ended: sign in again")
            if request.method == "POST":
                if not same_origin(request):
                    raise Refused(403, "this form was sent from another site")
                view.form = await read_form(request)
                if not entry.public:
                    sent = view.form.get("csrf", "")
                    if not hmac.compare_digest(sent.encode(), view.csrf.encode()):
                        raise Refused(
                            403, "the form's CSRF token is missing or wrong: reload the page"
                        )
            return await entry.handler(view)
        except Refused as e:
            return _error_page(view, e.status, e.message)
        except ServiceError as e:
            error = refusal(e)
            return _error_page(view, error.status, error.message)
        except ApiError as e:
            if e.status == 401:
                return redirect("/signin")
            return _error_page(view, e.status, e.message)
        except Exception as e:
            if database_unreachable(e):
                return _error_page(view, 503, "the registry database is unreachable: retry later")
            log.exception("unhandled error in console %s %s", request.method, request.path)
            return _error_page(view, 500, "internal server error")

    return handle


def _error_page(view: View, status: int, message: str) -> web.Response:
    titles = {
        400: "Bad request",
        401: "Signed out",
        403: "Forbidden",
        404: "Not found",
        405: "Method not allowed",
        409: "Conflict",
        413: "Too large",
        415: "Unsupported form",
        429: "Too many attempts",
        503: "Unavailable",
    }
    return view.render(
        "error.html",
        status=status,
        title=titles.get(status, "Error"),
        message=message,
        code=status,
    )


# -- templates and static files ----------------------------------------------------------------


def _when(value: str | None) -> str:
    """An API time (RFC 3339, UTC) as people read it: `2026-12-03 10:04 UTC`."""
    if not value:
        return "—"
    return value.replace("T", " ")[:16] + " UTC"


def _size(value: int | None) -> str:
    return "—" if value is None else human_size(value)


def _short(digest: str | None) -> str:
    """sha256:0123456789ab (what a table shows of a digest; the title holds it whole)."""
    if not digest:
        return "—"
    algorithm, _, hexpart = digest.partition(":")
    return f"{algorithm}:{hexpart[:12]}" if hexpart else digest[:19]


def templates(static_urls: Mapping[str, str]) -> jinja2.Environment:
    """The console's templates: HTML-escaped output everywhere, undefined names an error."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("skyreg.web", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = _when
    env.filters["size"] = _size
    env.filters["short"] = _short
    env.globals["static"] = lambda name: static_urls[name]
    env.globals["query_string"] = query_string
    return env


_STATIC_TYPES = {".css": "text/css", ".js": "text/javascript"}


def load_static() -> dict[str, tuple[str, bytes, str]]:
    """The console's CSS and JavaScript, each under a name holding its hash (cached forever)."""
    files: dict[str, tuple[str, bytes, str]] = {}
    for entry in resources.files("skyreg.web").joinpath("static").iterdir():
        name = entry.name
        suffix = name[name.rfind(".") :]
        if suffix not in _STATIC_TYPES:
            continue
        data = entry.read_bytes()
        digest = hashlib.sha256(data).hexdigest()[:12]
        stem = name[: name.rfind(".")]
        files[name] = (f"{stem}.{digest}{suffix}", data, _STATIC_TYPES[suffix])
    return files


def new_secret() -> str:
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Paged:
    """One page of a list the console pages and searches itself (`q`: a substring)."""

    rows: list[Any]
    number: int  # 1-based
    pages: int
    total: int  # rows matching `q`
    q: str

    def url(self, path: str, number: int, **more: Any) -> str:
        return path + query_string(q=self.q, page=number if number > 1 else None, **more)


def paged(view: View, items: list[Any], text: Callable[[Any], str]) -> Paged:
    """`items` matching the page's `q` (case-insensitive, in `text(item)`), page `page`."""
    q = view.arg("q").strip()
    if q:
        needle = q.casefold()
        items = [item for item in items if needle in text(item).casefold()]
    pages = max(1, -(-len(items) // PAGE_SIZE))
    number = min(max(1, view.int_arg("page", 1, maximum=10**9)), pages)
    start = (number - 1) * PAGE_SIZE
    return Paged(items[start : start + PAGE_SIZE], number, pages, len(items), q)
