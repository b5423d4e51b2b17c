"""What the console's tests share: a server with two orgs, each with an app and an org token
(`console_site`), a signed-in HTTP client that behaves like a browser's forms, a page served from
another origin on 127.0.0.1, and direct changes to a console session's row."""

from __future__ import annotations

import contextlib
import http.server
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import requests
from sqlalchemy import update

from skyreg.meta import schema as s
from skyreg.meta.console import session_sha256
from skyreg.meta.registry import open_database
from tests.support.inprocess import InProcessRegistry
from tests.support.platform import Tenancy

_FIELD = r'name="{}" value="([^"]*)"'


@dataclass
class ConsoleSite:
    """The server and its tenants: `acme` owns app `shop`, `bravo` owns app `bank`."""

    server: InProcessRegistry
    tenancy: Tenancy
    admin: str
    acme: str
    acme_id: str
    bravo: str
    bravo_id: str

    @property
    def url(self) -> str:
        return self.server.url


@contextlib.contextmanager
def console_site(data_dir: Path, **options: Any) -> Iterator[ConsoleSite]:
    """A server (with `options`, ServeConfig fields) and the two orgs, their apps and tokens."""
    server = InProcessRegistry(data_dir=data_dir, options=options)
    server.start()
    try:
        tenancy = Tenancy(server.data_dir)
        tenancy.org("acme")
        tenancy.org("bravo")
        tenancy.app("shop", "acme")
        tenancy.app("bank", "bravo")
        acme, acme_id = tenancy.token("org", org="acme")
        bravo, bravo_id = tenancy.token("org", org="bravo")
        yield ConsoleSite(server, tenancy, tenancy.admin_secret(), acme, acme_id, bravo, bravo_id)
    finally:
        server.stop()


def field(page: str, name: str) -> str:
    """The value of the hidden form field `name` of an HTML page."""
    found = re.search(_FIELD.format(re.escape(name)), page)
    assert found is not None, (name, page[:2000])
    return found.group(1)


def page_text(page: str) -> str:
    """An HTML page's text, tags dropped, whitespace squeezed (entities left as they are)."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page)).strip()


class Console:
    """A browser's view of the console over HTTP: its cookies, forms posted from its own origin
    (unless told otherwise), no redirects followed."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.http = requests.Session()

    def get(self, path: str, **kw: Any) -> requests.Response:
        return self.http.get(self.url + path, allow_redirects=False, timeout=60, **kw)

    def post(
        self,
        path: str,
        data: Any,
        *,
        origin: str | None = "",
        headers: dict[str, str] | None = None,
    ) -> requests.Response:
        """POST a form; `origin` "" is this console's own, None sends no Origin header."""
        sent = dict(headers or {})
        if origin is not None:
            sent["Origin"] = origin or self.url
        return self.http.post(
            self.url + path, data=data, headers=sent, allow_redirects=False, timeout=60
        )

    def sign_in(self, secret: str, following: str = "/") -> requests.Response:
        form = self.get("/signin")
        assert form.status_code == 200, form.text
        return self.post(
            "/signin",
            {"form_secret": field(form.text, "form_secret"), "token": secret, "next": following},
        )

    def csrf(self, path: str = "/orgs") -> str:
        found = self.get(path)
        assert found.status_code == 200, (found.status_code, found.text)
        return field(found.text, "csrf")

    @property
    def session(self) -> str | None:
        return self.http.cookies.get("skyreg_session")


def signed_in(url: str, secret: str) -> Console:
    console = Console(url)
    done = console.sign_in(secret)
    assert done.status_code == 303, (done.status_code, done.text)
    assert console.session
    return console


def end_session_at(data_dir: Path, secret: str, when: datetime) -> None:
    """Move the end of the console session whose cookie holds `secret` to `when`."""
    meta = open_database(None, data_dir)
    try:
        with meta.engine.begin() as conn:
            done = conn.execute(
                update(s.console_sessions)
                .where(s.console_sessions.c.id_sha256 == session_sha256(secret))
                .values(expires_at=when)
            )
            assert done.rowcount == 1
    finally:
        meta.engine.dispose()


@contextlib.contextmanager
def foreign_page(body: str) -> Iterator[str]:
    """An HTML page served from another origin of 127.0.0.1 (another port): its URL."""
    encoded = body.encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(encoded)))
            self.end_headers()
            self.wfile.write(encoded)

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
