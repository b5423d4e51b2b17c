"""Apps that really serve, for the machine networking tests: a busybox web app image, a
`skyreg proxy` process, and a client that keeps sending requests through the proxy."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from tests.support.agents import terminate
from tests.support.images import Entry, TestImage, build_app_image
from tests.support.waiting import free_port, wait_for

APP_PORT = 8080

# One connection: an HTTP request answered and closed, or a WebSocket upgrade followed by a
# text frame "tick" every 100 ms for as long as the machine runs. /healthz answers 200 while
# /healthy exists (only in healthy images), 500 otherwise. Every answer names the machine.
HANDLER = r"""#!/bin/sh
read -r method path _version
key=""
while read -r line; do
  line=${line%$(printf '\r')}
  [ -z "$line" ] && break
  case "$line" in
    [Ss]ec-[Ww]eb[Ss]ocket-[Kk]ey:*) key=${line#*: } ;;
  esac
done
if [ -n "$key" ]; then
  accept=$(printf '%s' "${key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11" | sha1sum | cut -c1-40 \
    | xxd -r -p | base64)
  printf 'HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n'
  printf 'Sec-WebSocket-Accept: %s\r\n\r\n' "$accept"
  while printf '\201\004tick'; do sleep 0.1; done
  exit 0
fi
case "$path" in
  /healthz) if [ -e /healthy ]; then status="200 OK"; else status="500 Internal Server Error"; fi ;;
  *) status="200 OK" ;;
esac
body="machine=$SKYREG_MACHINE_ID path=$path"
printf 'HTTP/1.1 %s\r\nContent-Type: text/plain\r\n' "$status"
printf 'Content-Length: %d\r\nConnection: close\r\n\r\n%s' "${#body}" "$body"
"""

_APPLETS = ("nc", "sha1sum", "cut", "xxd", "base64", "sleep", "printf", "touch")


def web_app_image(marker: str, *, healthy: bool = True) -> TestImage:
    """busybox `nc -ll` serving HANDLER on APP_PORT; `healthy=False`: /healthz always fails."""
    entries = [
        Entry("app", "dir", mode=0o755),
        Entry("app/handler.sh", "file", data=HANDLER.encode(), mode=0o755),
        *(Entry(f"bin/{a}", "symlink", target="busybox") for a in _APPLETS),
    ]
    if healthy:
        entries.append(Entry("healthy", "file", data=b"yes\n"))
    return build_app_image(
        marker, entries, cmd=["/bin/nc", "-ll", "-p", str(APP_PORT), "-e", "/app/handler.sh"]
    )


def probe_image(marker: str) -> TestImage:
    """Prints `probe result: <answer>` for `GET /` of $TARGET:APP_PORT (empty when it cannot
    connect), then stays up."""
    script = (
        "out=$(printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 \"$TARGET\" "
        f"{APP_PORT} 2>&1 | tail -n 1); "
        'echo "probe result: [$out]"; exec sleep 3600'
    )
    entries = [*(Entry(f"bin/{a}", "symlink", target="busybox") for a in (*_APPLETS, "tail"))]
    return build_app_image(marker, entries, cmd=["/bin/sh", "-c", script])


@dataclass
class RunningProxy:
    """A `skyreg proxy` process (its token through SKYREG_TOKEN, never argv)."""

    server: str
    token: str
    log_path: Path
    region: str = "local"
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.port = free_port()
        args = [sys.executable, "-m", "skyreg", "proxy", "--server", self.server]
        args += ["--region", self.region, "--listen", f"127.0.0.1:{self.port}", "--poll", "0.2"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "SKYREG_TOKEN": self.token},
            )

        def listening() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log()
            try:
                with socket_to(self.port):
                    return True
            except OSError:
                return False

        wait_for(listening, "skyreg proxy to listen")

    def stop(self) -> None:
        terminate(self.proc)
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path.exists() else ""


def socket_to(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=1)


@dataclass
class Answer:
    at: float  # time.time() when the request was sent
    status: int  # 0: no answer (the error says why)
    machine: str
    error: str = ""


@dataclass
class Load:
    """`rate` GET requests per second for `host` through the proxy at `url`, from a thread,
    each recorded; and optionally one WebSocket held open, its ticks and close recorded."""

    url: str
    host: str
    rate: float = 200.0
    websocket: bool = False
    answers: list[Answer] = field(default_factory=list)
    ws_machine: str = ""
    ws_ticks: int = 0
    ws_last_tick: float = 0.0
    ws_closed_at: float = 0.0
    ws_error: str = ""
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Load:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()
        wait_for(lambda: len(self.answers) >= 10, "the load's first answers", timeout=30)
        if self.websocket:
            wait_for(lambda: self.ws_ticks > 0 or self.ws_error, "the WebSocket", timeout=30)
            assert not self.ws_error, self.ws_error
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=15)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            tasks: set[asyncio.Task[None]] = set()
            if self.websocket:
                tasks.add(asyncio.create_task(self._hold_websocket(session)))
            step = 1.0 / self.rate
            next_at = time.monotonic()
            while not self._stop.is_set():
                task = asyncio.create_task(self._one(session))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                next_at += step
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _one(self, session: aiohttp.ClientSession) -> None:
        sent = time.time()
        try:
            async with session.get(f"{self.url}/load", headers={"Host": self.host}) as r:
                body = await r.text()
                machine = body.split("machine=", 1)[1].split()[0] if "machine=" in body else ""
                self.answers.append(Answer(sent, r.status, machine))
        except (aiohttp.ClientError, TimeoutError) as e:
            self.answers.append(Answer(sent, 0, "", f"{type(e).__name__}: {e}"))

    async def _hold_websocket(self, session: aiohttp.ClientSession) -> None:
        try:
            ws_url = f"{self.url}/ws"
            async with session.ws_connect(
                ws_url, headers={"Host": self.host}, timeout=aiohttp.ClientWSTimeout(ws_close=5)
            ) as ws:
                self.ws_machine = ws._response.headers.get("skyreg-machine", "")
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.TEXT and msg.data == "tick":
                        self.ws_ticks += 1
                        self.ws_last_tick = time.time()
                    if self._stop.is_set():
                        break
        except (aiohttp.ClientError, TimeoutError) as e:
            self.ws_error = f"{type(e).__name__}: {e}"
        finally:
            self.ws_closed_at = time.time()

    def failures(self, since: float = 0.0) -> list[Answer]:
        return [a for a in self.answers if a.at >= since and a.status != 200]

    def machines(self, since: float = 0.0) -> Counter[str]:
        return Counter(a.machine for a in self.answers if a.at >= since and a.status == 200)
