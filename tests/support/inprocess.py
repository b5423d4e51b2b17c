"""skyreg served from a thread of the test process: the same composition root as `skyreg serve`
(`server.process.prepare` and `run_worker`), without starting an interpreter per server.

For tests of API behaviour. Tests whose point is a process (a crash, a signal, its log, a second
node, several workers) use `RunningRegistry` (tests/support/servers.py) instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy

from skyreg.oci.digest import Digest
from skyreg.server.config import ServeConfig
from skyreg.server.process import (
    close_blob_store,
    listen,
    open_blob_store,
    prepare,
    public_url_of,
    run_worker,
)
from tests.support.servers import assert_serves_v2

_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 30.0
_MAX_LOG_CHARS = 16 * 1024 * 1024


@dataclass
class InProcessRegistry:
    """A skyreg worker on 127.0.0.1, in a thread with its own event loop.

    `options` are further `ServeConfig` fields (say `auth=False`, `database_url=...`;
    `access_log=True` for one line per request, off by default). Has the `url`, `host`, `port`,
    `data_dir`, `start`, `stop`, `restart` and `log` of `RunningRegistry`; `log` is what the
    server's event loop thread logged (INFO and up, as `skyreg serve` writes it) since the first
    start, so a test can assert on it as on a subprocess's log file.
    """

    data_dir: Path
    options: dict[str, Any] = field(default_factory=dict)
    port: int = 0
    admin_token_file: Path | None = None
    _thread: threading.Thread | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _stop: asyncio.Event | None = None
    _error: BaseException | None = None
    _log: _ThreadLog | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def config(self) -> ServeConfig:
        """The `ServeConfig` this server starts with."""
        # No scan worker unless a test asks (`scan_worker=True`): it adds SBOM referrers to
        # pushed images, which tests of other features would count.
        options: dict[str, Any] = {
            "access_log": False,
            "scan_worker": False,
            "lazy_index": False,
            **self.options,
        }
        return ServeConfig(data_dir=self.data_dir, host="127.0.0.1", port=self.port, **options)

    def start(self) -> None:
        cfg = self.config()
        self.admin_token_file = prepare(cfg)
        sock = listen(cfg.host, cfg.port)
        self.port = int(sock.getsockname()[1])
        cfg.port = self.port
        cfg.public_url = public_url_of(cfg, self.port)
        metrics = None
        if cfg.metrics_address is not None:  # HOST:PORT, as `serve` binds it
            host, _, port = cfg.metrics_address.rpartition(":")
            try:
                metrics = listen(host.strip("[]"), int(port))
            except BaseException:
                sock.close()
                raise
        ready = threading.Event()
        self._error = None
        self._thread = threading.Thread(
            target=self._serve,
            args=(cfg, sock, metrics, ready),
            name=f"skyreg-{self.port}",
            daemon=True,
        )
        if self._log is None:
            self._log = _ThreadLog()
        self._log.follow(self._thread)
        self._thread.start()
        try:
            if not ready.wait(_START_TIMEOUT):
                raise RuntimeError("the in-process registry did not start its event loop")
            self._wait_until_serving()
        except BaseException:
            with contextlib.suppress(RuntimeError):  # raised below, with its cause
                self.stop()
            if self._error is not None:
                raise RuntimeError("the in-process registry failed") from self._error
            raise

    def _serve(
        self,
        cfg: ServeConfig,
        sock: socket.socket,
        metrics: socket.socket | None,
        ready: threading.Event,
    ) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            ready.set()
            await run_worker(cfg, sock, metrics, stop=self._stop)

        try:
            asyncio.run(main())
        except BaseException as e:  # reported by start() or stop(), on the test's thread
            self._error = e
            ready.set()
        finally:
            sock.close()
            if metrics is not None:
                metrics.close()

    def _wait_until_serving(self) -> None:
        # The socket listens already: this request waits for the app, not for luck.
        try:
            assert_serves_v2(self.url, timeout=_START_TIMEOUT)
        finally:
            if self._error is not None:
                raise RuntimeError("the in-process registry failed") from self._error

    def stop(self) -> None:
        """Stop serving (open connections end, background workers stop, stores close)."""
        thread, loop, stop = self._thread, self._loop, self._stop
        self._thread = self._loop = self._stop = None
        if thread is None:
            return
        if loop is not None and stop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stop.set)
        thread.join(_STOP_TIMEOUT)
        if self._log is not None:
            self._log.unfollow()
        if thread.is_alive():
            raise RuntimeError(f"the in-process registry on port {self.port} did not stop")
        if self._error is not None:
            raise RuntimeError("the in-process registry failed") from self._error

    def restart(self) -> None:
        """Stop and start again on the same port and data dir."""
        self.stop()
        self.start()

    def log(self) -> str:
        """What the server logged so far (every start since this object was made)."""
        return self._log.text() if self._log is not None else ""


_LOGGERS = ("skyreg", "aiohttp")  # INFO and up while a server runs, as `skyreg serve` sets
_levels_lock = threading.Lock()
_servers_logging = 0
_saved_levels: dict[str, int] = {}


class _ThreadLog(logging.Handler):
    """The records one server thread logs, formatted as `skyreg serve` writes its log. Up to
    `_MAX_LOG_CHARS`; older text is dropped first."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
        self._lines: deque[str] = deque()
        self._chars = 0
        self._thread: threading.Thread | None = None

    def follow(self, thread: threading.Thread) -> None:
        """Record what `thread` logs, from now until `unfollow`."""
        global _servers_logging
        self._thread = thread
        with _levels_lock:
            if _servers_logging == 0:
                for name in _LOGGERS:
                    logger = logging.getLogger(name)
                    _saved_levels[name] = logger.level
                    if logger.getEffectiveLevel() > logging.INFO:
                        logger.setLevel(logging.INFO)
            _servers_logging += 1
        logging.getLogger().addHandler(self)

    def unfollow(self) -> None:
        """Stop recording (the text stays)."""
        global _servers_logging
        if self._thread is None:
            return
        self._thread = None
        logging.getLogger().removeHandler(self)
        with _levels_lock:
            _servers_logging -= 1
            if _servers_logging == 0:
                for name, level in _saved_levels.items():
                    logging.getLogger(name).setLevel(level)

    def emit(self, record: logging.LogRecord) -> None:
        thread = self._thread
        if thread is None or record.thread != thread.ident:
            return
        line = self.format(record) + "\n"
        with self.lock or contextlib.nullcontext():
            self._lines.append(line)
            self._chars += len(line)
            while self._chars > _MAX_LOG_CHARS and len(self._lines) > 1:
                self._chars -= len(self._lines.popleft())

    def text(self) -> str:
        """Everything recorded, oldest first."""
        with self.lock or contextlib.nullcontext():
            return "".join(self._lines)


_SERVE_FLAGS = {
    "--database-url": "database_url",
    "--storage": "storage",
    "--s3-endpoint": "s3_endpoint",
    "--secrets-key-file": "secrets_key_file",
}
_PATH_FIELDS = {"secrets_key_file"}


def serve_options(args: list[str]) -> dict[str, object]:
    """`skyreg serve --FLAG VALUE ...` flags (those `scaleout_backing` gives) as ServeConfig
    fields, for an in-process server on the same backing."""
    options: dict[str, object] = {}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        field_name = _SERVE_FLAGS[flag]
        options[field_name] = Path(value) if field_name in _PATH_FIELDS else value
    return options


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """`env` set in this process (where an in-process server reads it), restored afterwards."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def gc_on_request(data_dir: Path) -> Iterator[InProcessRegistry]:
    """A served registry whose garbage collection runs only when a test asks (no `gc` worker;
    every review due at once: `--no-gc --gc-review-delay 0`), stopped afterwards."""
    reg = InProcessRegistry(data_dir=data_dir, options={"gc_worker": False, "gc_review_delay": 0.0})
    reg.start()
    try:
        yield reg
    finally:
        reg.stop()


def rows(reg: InProcessRegistry, query: str, digest: str) -> list[tuple[Any, ...]]:
    """`query` (one `:digest` parameter) against the server's database."""
    url = reg.config().database_url or f"sqlite:///{reg.data_dir / 'skyreg.db'}"
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sqlalchemy.text(query), {"digest": digest})]
    finally:
        engine.dispose()


def in_store(reg: InProcessRegistry, digest: str) -> bool:
    """Whether the server's blob store (its directory, or its S3 bucket) holds the bytes."""

    async def stat() -> int | None:
        store = open_blob_store(reg.config())
        try:
            return await store.stat(Digest.parse(digest))
        finally:
            await close_blob_store(store)

    return asyncio.run(stat()) is not None
