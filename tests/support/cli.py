"""`skyreg ARGS` run in the test process: the command a subprocess would run (`skyreg.cli.main`'s
typer app, as `python -m skyreg` calls it), its stdout, stderr and exit code captured, without
starting an interpreter that imports the package again (~0.5 s of CPU a command).

For tests of what a command prints and exits with. A test whose point is the process itself (the
`python -m skyreg` entry point, a signal, a pipe) runs it as a subprocess instead.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from typer.testing import CliRunner

from skyreg.cli.main import app

# Read by servers running in this process (tests/conftest.py sets it): left as it is while a
# command runs, whatever the command's environment says (no command reads it).
_KEEP = frozenset({"SKYREG_STRICT_DB_THREADS"})


def run_in_process(
    args: list[str] | tuple[str, ...], env: dict[str, str], input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `skyreg ARGS` with exactly `env` as its environment (variables of this process not in
    `env` are unset meanwhile, as in a subprocess given `env`) and `input` on stdin. A
    `CompletedProcess` as `subprocess.run(..., capture_output=True, text=True)` gives. An
    exception the command did not turn into an exit code (what would print a traceback) is
    raised here."""
    overrides: dict[str, str | None] = {k: None for k in os.environ if k not in env}
    overrides.update(env)
    for key in _KEEP:
        overrides.pop(key, None)
    result = CliRunner().invoke(
        app, list(args), input=input, env=overrides, prog_name="skyreg", catch_exceptions=True
    )
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(
        ["skyreg", *args], result.exit_code, stdout=result.stdout, stderr=result.stderr
    )


def run_skyreg_in_process(env: dict[str, str], *args: str) -> str:
    """`run_skyreg` (tests/support/platform.py) in this process: the stdout of `skyreg ARGS`, or
    a failed assertion with its stderr."""
    done = run_in_process(args, env)
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done.stdout


def skyreg_as(home: Path, server: str, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`skyreg ARGS` in this process as a user whose home is `home`, talking to `server` with
    `token` (SKYREG_SERVER, SKYREG_TOKEN; no other SKYREG_ variable), wide and colourless."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKYREG_")}
    env.update(
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / "xdg"),
        SKYREG_SERVER=server,
        SKYREG_TOKEN=token,
        COLUMNS="250",
        NO_COLOR="1",
    )
    return run_in_process(args, env)


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    """The stdout of a command that must succeed."""
    assert proc.returncode == 0, (proc.args, proc.stdout, proc.stderr)
    return proc.stdout


def fails(proc: subprocess.CompletedProcess[str]) -> str:
    """The stderr (`error: ...`) of a command that must fail."""
    assert proc.returncode != 0, (proc.args, proc.stdout, proc.stderr)
    assert proc.stderr.startswith("error: "), proc.stderr
    return proc.stderr
