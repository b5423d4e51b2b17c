"""Talking to a skyreg server's management API: where (URL, token) and how (urllib, JSON)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import tempfile
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

if TYPE_CHECKING:
    # Imported where used: urllib.request (http.client, ssl) and asyncio cost every command
    # its start-up time, and most commands never call the API or run an event loop.
    import asyncio
    import urllib.error

API_PREFIX = "/api/v1"
TIMEOUT = 30.0
_LOOPBACK = ("localhost", "::1")


def fail(message: str, code: int = 1) -> NoReturn:
    """Print `error: message` on stderr and exit non-zero (no traceback)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def config_path() -> Path:
    """$XDG_CONFIG_HOME/skyreg/config.json, else ~/.config/skyreg/config.json."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "skyreg" / "config.json"


def normalize_server(url: str) -> str:
    """A server URL with a scheme and no trailing slash (no scheme: https, http for loopback)."""
    url = url.strip().rstrip("/")
    if not url:
        fail("the server URL is empty")
    if "://" not in url:
        host = urllib.parse.urlsplit("//" + url).hostname or ""
        scheme = "http" if host in _LOOPBACK or host.startswith("127.") else "https"
        url = f"{scheme}://{url}"
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        fail(f"invalid server URL {url!r}: use http(s)://host[:port]")
    return url


def read_config() -> dict[str, Any]:
    """The config file written by `skyreg login` ({} when there is none)."""
    path = config_path()
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        fail(f"cannot read {path}: {e}")
    if not isinstance(doc, dict):
        fail(f"{path} is not a JSON object")
    return doc


def write_private_json(path: Path, doc: object, *, indent: int | str = 2) -> None:
    """Write JSON atomically to a file only its owner may read (mode 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:  # mkstemp creates the file with mode 0600
            json.dump(doc, f, indent=indent)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    os.chmod(path, 0o600)


def write_config(server: str, token: str) -> Path:
    path = config_path()
    doc = read_config()
    doc.update(server=server, token=token)
    try:
        write_private_json(path, doc)
    except OSError as e:
        fail(f"cannot write {path}: {e}")
    return path


class ApiFailure(Exception):
    """The server answered with an error."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass
class Client:
    """A management API client for one server and token."""

    server: str
    token: str | None

    def call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        query: dict[str, str | None] | None = None,
    ) -> Any:
        """The JSON answer of `method path` (None for an empty one: 204); ApiFailure for an
        error answer, exits when the server cannot be reached."""
        import urllib.error
        import urllib.request

        url = self.server + API_PREFIX + path
        params = {k: v for k, v in (query or {}).items() if v is not None}
        if params:
            url += "?" + urllib.parse.urlencode(params)
        headers = {"Accept": "application/json", "User-Agent": "skyreg-cli"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            raise _failure(e) from None
        except (OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            fail(f"cannot reach {self.server}: {reason}")
        if not raw:  # 204 No Content
            return None
        try:
            return json.loads(raw)
        except ValueError:
            fail(f"{self.server} answered {method} {path} with something that is not JSON")

    def raw(
        self,
        method: str,
        path: str,
        query: dict[str, str | None] | None = None,
        *,
        accept: str = "application/json",
        upload: Path | None = None,
        content_type: str = "application/octet-stream",
        timeout: float = TIMEOUT,
    ) -> bytes:
        """The answer's bytes as sent (an SBOM, a report), optionally streaming the file
        `upload` as the body; an error answer is printed and ends the command."""
        import urllib.error
        import urllib.request

        url = self.server + API_PREFIX + path
        params = {k: v for k, v in (query or {}).items() if v is not None}
        if params:
            url += "?" + urllib.parse.urlencode(params)
        headers = {"Accept": accept, "User-Agent": "skyreg-cli"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            with contextlib.ExitStack() as stack:
                data = None
                if upload is not None:
                    data = stack.enter_context(upload.open("rb"))
                    headers["Content-Type"] = content_type
                    headers["Content-Length"] = str(upload.stat().st_size)
                request = urllib.request.Request(url, data=data, headers=headers, method=method)
                with urllib.request.urlopen(request, timeout=timeout) as resp:
                    return bytes(resp.read())
        except urllib.error.HTTPError as e:
            failure = _failure(e)
            fail(f"{failure.message} (HTTP {failure.status})")
        except (OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            fail(f"cannot reach {self.server}: {reason}")

    def __call__(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        query: dict[str, str | None] | None = None,
    ) -> Any:
        """Like `call`, but an error answer is printed and ends the command."""
        try:
            return self.call(method, path, body, query)
        except ApiFailure as e:
            fail(f"{e.message} (HTTP {e.status})")


def _failure(e: urllib.error.HTTPError) -> ApiFailure:
    try:
        raw = e.read()
    except OSError:
        raw = b""
    try:
        err = json.loads(raw)["error"]
        return ApiFailure(e.code, str(err["code"]), str(err["message"]))
    except (ValueError, KeyError, TypeError):
        pass
    message = f"the server answered {e.code} {e.reason}"
    if e.code == 404:
        message += " (does it run skyreg with authentication on?)"
    return ApiFailure(e.code, "http", message)


def client(server: str | None, token: str | None, *, need_token: bool = True) -> Client:
    """A client from flags / SKYREG_SERVER / SKYREG_TOKEN, else the config file.

    The token in the config file is used only for the server it was saved for.
    """
    config = read_config()
    saved_server = config.get("server") if isinstance(config.get("server"), str) else None
    saved_token = config.get("token") if isinstance(config.get("token"), str) else None
    if server:
        server = normalize_server(server)
    elif saved_server:
        server = saved_server
    else:
        fail("no server: pass --server URL, set SKYREG_SERVER, or run `skyreg login`")
    if not token and saved_server and server == normalize_server(saved_server):
        token = saved_token
    if need_token and not token:
        fail(f"no token for {server}: pass --token, set SKYREG_TOKEN, or run `skyreg login`")
    return Client(server=server, token=token or None)


def read_token_file(path: str) -> str:
    """A token from a file ('-': standard input), without surrounding whitespace."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        fail(f"cannot read the token from {path}: {e}")
    token = text.strip()
    if not token:
        fail(f"{path} holds no token")
    return token


def service_token(token: str | None, token_file: Path | None, who: str) -> str:
    """The admin or org token a host service (`agent`, `builder`) runs with: from
    `--token-file`, else SKYREG_TOKEN or `--token` (warned about: every host user can read a
    process's command line)."""
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as e:
            fail(f"cannot read --token-file: {e}")
    elif token and any(a == "--token" or a.startswith("--token=") for a in sys.argv):
        typer.echo(
            "warning: --token puts the token on this process's command line, which every host "
            "user can read; use SKYREG_TOKEN or --token-file",
            err=True,
        )
    if not token:
        fail(f"no token: set SKYREG_TOKEN or pass --token-file (an admin or org token {who})")
    return token


def service_token_option(who: str) -> Any:
    """`--token` of a host service: `who` says which tokens it takes."""
    return typer.Option(
        "--token",
        envvar="SKYREG_TOKEN",
        help=f"{who} Prefer SKYREG_TOKEN or --token-file: every host user can read a process's "
        "command line.",
        show_default=False,
    )


TokenFile = Annotated[
    Path | None,
    typer.Option(help="File holding the token (e.g. mode 0600).", show_default=False),
]


def run_until_signalled(service: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run a host service (`service(stop)`) on an event loop until SIGTERM or SIGINT sets
    `stop`; it returns once it has stopped what it runs."""
    import asyncio

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await service(stop)

    asyncio.run(main())
