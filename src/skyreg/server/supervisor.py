"""Worker processes forked from one master, sharing the sockets it bound (`skyreg serve
--workers`, `skyreg proxy --workers`): each dies with the master, one that dies is replaced after
a back-off, and SIGTERM/SIGINT to the master stops them all."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable
from typing import NoReturn

log = logging.getLogger("skyreg.server")

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_FIRST_BACKOFF = 1.0  # seconds before replacing a worker that died soon after its start
_MAX_BACKOFF = 30.0
_STABLE_AFTER = 60.0  # a worker that lived this long resets the back-off


def _die_with(master: int) -> None:
    """Make the kernel send this worker SIGTERM when `master` dies, so no worker outlives it
    holding the port; exit now if the master died before that was in place."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG): %s", os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError) as e:  # not Linux
        log.warning("workers cannot follow their master's death: %s", e)
    if os.getppid() != master:
        os._exit(0)


def _worker_process(work: Callable[[], None], master: int, mask: Iterable[int]) -> NoReturn:
    """A forked worker: `work()` until SIGTERM/SIGINT or the master's death, then exit."""
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _die_with(master)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # the master's blocks signals
        work()
        code = 0
    except BaseException:
        log.exception("worker failed")
    finally:
        os._exit(code)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        try:
            return f"killed by signal {signal.Signals(signum).name}"
        except ValueError:
            return f"killed by signal {signum}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


def supervise(count: int, work: Callable[[], None]) -> bool:
    """Run `count` worker processes, each forked to run `work()` (which serves on sockets the
    master bound), until SIGTERM/SIGINT; a worker that dies is logged
    and replaced (after a back-off while they keep dying). Returns whether every worker
    stopped cleanly when told to.

    The master blocks SIGCHLD, SIGTERM and SIGINT and takes them with sigtimedwait, so no
    signal can arrive between checking for work and waiting for it.
    """
    master = os.getpid()
    watched = {signal.SIGCHLD, *_STOP_SIGNALS}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    workers: dict[int, float] = {}  # pid → when it started (monotonic)
    restarts: list[float] = []  # when to start each missing worker
    backoff = 0.0

    def start() -> None:
        pid = os.fork()
        if pid == 0:
            _worker_process(work, master, mask)
        workers[pid] = time.monotonic()

    def reap() -> list[tuple[int, int]]:
        dead = []
        while workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid in workers:
                dead.append((pid, status))
        return dead

    try:
        for _ in range(count):
            start()
        while True:
            now = time.monotonic()
            for pid, status in reap():
                lived = now - workers.pop(pid)
                backoff = 0.0 if lived >= _STABLE_AFTER else backoff
                log.warning(
                    "worker %d %s after %.0fs; replacing it in %.0fs",
                    pid,
                    _describe(status),
                    lived,
                    backoff,
                )
                restarts.append(now + backoff)
                backoff = min(max(backoff * 2, _FIRST_BACKOFF), _MAX_BACKOFF)
            due = [t for t in restarts if t <= now]
            restarts = [t for t in restarts if t > now]
            for _ in due:
                start()
            timeout = min([*restarts, now + 5.0]) - now
            got = signal.sigtimedwait(watched, max(timeout, 0.0))
            if got is not None and got.si_signo in _STOP_SIGNALS:
                break
    finally:
        clean = _stop_workers(workers)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    return clean


def _stop_workers(workers: dict[int, float]) -> bool:
    """SIGTERM every worker and wait for all; whether each stopped by SIGTERM or exit 0."""
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    clean = True
    for pid in workers:
        _, status = os.waitpid(pid, 0)
        stopped = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
        if status != 0 and not stopped:
            log.warning("worker %d %s while stopping", pid, _describe(status))
            clean = False
    return clean
