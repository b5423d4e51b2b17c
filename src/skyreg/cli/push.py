"""`skyreg push PATH HOST/APP[/NAME][:TAG]`: the Typer command and its Rich progress bars.

The push itself (reading the image, deciding what to upload, the registry protocol) is
`skyreg.client.push.push_image`; `push_with_bars` runs it with a bar per blob on stderr
(`skyreg deploy --image PATH` uses it too).
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Annotated, cast

import typer

if TYPE_CHECKING:
    # Imported where used: rich and the image readers cost every other command its start-up
    # time (`skyreg --help`, a remote `skyreg deploy`).
    from rich.progress import TaskID

    from skyreg.client.imagesource import GzipDigestCache
    from skyreg.client.push import PushResult, Task

__all__ = ["RichProgress", "push_with_bars", "register"]


class RichProgress:
    """A `PushProgress` drawing one Rich bar per task on stderr (bytes, rate, status); the
    display starts with the first bar, so a push failing before it prints only its error."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TextColumn("{task.fields[status]}"),
            console=Console(stderr=True),
        )
        self._started = False

    def __enter__(self) -> RichProgress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._started:
            self._progress.stop()

    def add(self, description: str, total: int | None, status: str) -> Task:
        """A new bar."""
        if not self._started:
            self._progress.start()
            self._started = True
        return int(self._progress.add_task(description, total=total, status=status))

    def advance(self, task: Task, n: int) -> None:
        """Move the bar `n` bytes on."""
        if task >= 0:
            self._progress.update(cast("TaskID", task), advance=n)

    def status(self, task: Task, status: str) -> None:
        """Change the bar's status word."""
        if task >= 0:
            self._progress.update(cast("TaskID", task), status=status)

    def done(self, task: Task, status: str, total: int | None = None) -> None:
        """Fill the bar (to `total`, when given)."""
        if task < 0:
            return
        tid = cast("TaskID", task)
        if total is None:
            total = int(self._progress.tasks[self._progress.task_ids.index(tid)].total or 0)
        self._progress.update(tid, total=total, completed=total, status=status)


def push_with_bars(
    source: Path | str,
    reference: str,
    token: str | None,
    *,
    bars: bool,
    ref: str | None = None,
    insecure: bool = False,
    cache: GzipDigestCache | None = None,
) -> PushResult:
    """`push_image` with Rich progress bars on stderr when `bars` is set; raises PushError."""
    from skyreg.client.push import push_image

    if not bars:
        return push_image(source, reference, token, ref=ref, insecure=insecure, cache=cache)
    with RichProgress() as progress:
        return push_image(
            source, reference, token, progress=progress, ref=ref, insecure=insecure, cache=cache
        )


# -- the command ---------------------------------------------------------------------------------


def _saved_token(host: str) -> str | None:
    """The token `skyreg login` saved, if it was saved for this host."""
    from skyreg.cli.client import read_config

    config = read_config()
    server, token = config.get("server"), config.get("token")
    if (
        isinstance(server, str)
        and isinstance(token, str)
        and urllib.parse.urlsplit(server).netloc == host
    ):
        return token
    return None


def push(
    source: Annotated[
        str,
        typer.Argument(
            metavar="PATH",
            help="A docker-archive tarball (plain or gzip'd, e.g. nix's ./result) or an OCI "
            "image layout directory; docker-archive:PATH and oci:DIR[:REF] work too.",
            show_default=False,
        ),
    ],
    reference: Annotated[
        str,
        typer.Argument(
            metavar="HOST/APP[/NAME][:TAG]",
            help="Where to push, e.g. registry.example.com/myapp:v1 (no tag: latest).",
            show_default=False,
        ),
    ],
    ref: Annotated[
        str | None,
        typer.Option(
            "--ref", help="Which image of the source: an OCI ref name or a docker RepoTag."
        ),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="SKYREG_TOKEN",
            help="Access token (default: from `skyreg login`, for that server).",
            show_default=False,
        ),
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Plain HTTP (loopback hosts always use it).")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Push a local image; prints HOST/REPO@DIGEST. Layers the registry has are skipped."""
    from skyreg.cli.client import fail
    from skyreg.client.push import PushError, parse_reference

    try:
        target = parse_reference(reference)
        result = push_with_bars(
            source,
            reference,
            token or _saved_token(target.registry_host()),
            bars=not quiet,
            ref=ref,
            insecure=insecure,
        )
    except PushError as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted", 130)
    typer.echo(result.reference)
    if not quiet:
        typer.echo(
            f"Pushed {target}: {result.layers_uploaded} layer(s) uploaded, "
            f"{result.layers_skipped} already present.",
            err=True,
        )


def register(app: typer.Typer) -> None:
    """Add `skyreg push` to the `skyreg` command."""
    app.command()(push)
