"""skyreg served from a thread of the test process: the same composition root as `skyreg serve`
(`server.process.prepare` and `run_worker`), without starting an interpreter per server.

For tests of API behaviour. Tests whose point is a process (a crash, a signal, its log, a second
node, several workers) use `RunningRegistry` (tests/conftest.py) instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from skyreg.server.config import ServeConfig
from skyreg.server.process import listen, prepare, public_url_of, run_worker

_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 30.0


@dataclass
class InProcessRegistry:
    """A skyreg worker on 127.0.0.1, in a thread with its own event loop.

    `options` are further `ServeConfig` fields (say `auth=False`, `database_url=...`). Has the
    `url`, `host`, `port`, `data_dir`, `start`, `stop`, `restart` and `log` of `RunningRegistry`;
    `log` says where the log went (pytest captures it with the test's).
    """

    data_dir: Path
    options: dict[str, Any] = field(default_factory=dict)
    port: int = 0
    admin_token_file: Path | None = None
    _thread: threading.Thread | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _stop: asyncio.Event | None = None
    _error: BaseException | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def config(self) -> ServeConfig:
        return ServeConfig(
            data_dir=self.data_dir,
            host="127.0.0.1",
            port=self.port,
            access_log=False,
            **self.options,
        )

    def start(self) -> None:
        cfg = self.config()
        self.admin_token_file = prepare(cfg)
        sock = listen(cfg.host, cfg.port)
        self.port = int(sock.getsockname()[1])
        cfg.port = self.port
        cfg.public_url = public_url_of(cfg, self.port)
        ready = threading.Event()
        self._error = None
        self._thread = threading.Thread(
            target=self._serve, args=(cfg, sock, ready), name=f"skyreg-{self.port}", daemon=True
        )
        self._thread.start()
        if not ready.wait(_START_TIMEOUT):
            raise RuntimeError("the in-process registry did not start its event loop")
        self._wait_until_serving()

    def _serve(self, cfg: ServeConfig, sock: socket.socket, ready: threading.Event) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            ready.set()
            await run_worker(cfg, sock, stop=self._stop)

        try:
            asyncio.run(main())
        except BaseException as e:  # reported by start() or stop(), on the test's thread
            self._error = e
            ready.set()
        finally:
            sock.close()

    def _wait_until_serving(self) -> None:
        # The socket listens already: this request waits for the app, not for luck.
        try:
            with urllib.request.urlopen(f"{self.url}/v2/", timeout=_START_TIMEOUT) as resp:
                headers = resp.headers
        except urllib.error.HTTPError as e:  # 401 with a challenge when auth is on
            headers = e.headers
        except OSError:
            self.stop()
            raise
        if self._error is not None:
            raise RuntimeError("the in-process registry failed") from self._error
        assert headers["Docker-Distribution-API-Version"] == "registry/2.0"

    def stop(self) -> None:
        """Stop serving (open connections end, background workers stop, stores close)."""
        thread, loop, stop = self._thread, self._loop, self._stop
        self._thread = self._loop = self._stop = None
        if thread is None:
            return
        if loop is not None and stop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stop.set)
        thread.join(_STOP_TIMEOUT)
        if thread.is_alive():
            raise RuntimeError(f"the in-process registry on port {self.port} did not stop")
        if self._error is not None:
            raise RuntimeError("the in-process registry failed") from self._error

    def restart(self) -> None:
        """Stop and start again on the same port and data dir."""
        self.stop()
        self.start()

    def log(self) -> str:
        return "(in-process registry: its log is in the test's captured log)"


_SERVE_FLAGS = {
    "--database-url": "database_url",
    "--storage": "storage",
    "--s3-endpoint": "s3_endpoint",
}


def serve_options(args: list[str]) -> dict[str, object]:
    """`skyreg serve --FLAG VALUE ...` flags (those `scaleout_backing` gives) as ServeConfig
    fields, for an in-process server on the same backing."""
    return {_SERVE_FLAGS[flag]: value for flag, value in zip(args[::2], args[1::2], strict=True)}


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
