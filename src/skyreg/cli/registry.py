"""`skyreg registry sbom|vulns|vulnsummary|files` (what is inside an app's image and what is
known to be wrong with it) and `skyreg vulndb import|status` (the operator's OSV data)."""

from __future__ import annotations

import json
import tempfile
import urllib.parse
import zipfile
from pathlib import Path
from typing import Annotated, Any

import typer

from skyreg.cli.client import client, fail
from skyreg.cli.platform import (
    AsJson,
    Server,
    Token,
    _cell,
    _console,
    _print_json,
    _quote,
    _table,
    _when,
)
from skyreg.units import human_size

registry_app = typer.Typer(
    help="What is inside an app's images and what is known to be wrong with them.",
    no_args_is_help=True,
)
vulndb_app = typer.Typer(
    help="The vulnerability data images are matched against (OSV advisories; admin).",
    no_args_is_help=True,
)

TRIVY_MEDIA_TYPE = "application/vnd.skyreg.trivy+json"
SEVERITIES = ("CRITICAL", "HIGH", "MEDIUM", "LOW", "UNKNOWN")
MAX_DOWNLOAD = 2 * 1024**3
IMPORT_TIMEOUT = 3600.0

AppName = Annotated[str, typer.Option("--app", "-a", help="The app.")]
Image = Annotated[
    str | None,
    typer.Option(
        "--image",
        "-i",
        help="TAG, DIGEST, REPO:TAG or REPO@DIGEST (default: the image of the app's current "
        "release).",
    ),
]
Platform = Annotated[
    str | None,
    typer.Option(
        help="For a multi-platform image: OS/ARCH or OS/ARCH/VARIANT (default linux/amd64)."
    ),
]


def _image_query(image: str | None, platform: str | None) -> dict[str, str | None]:
    return {"image": image, "platform": platform}


def _scan_not_ready(doc: dict[str, Any]) -> str | None:
    scan = doc.get("scan") or {}
    state = scan.get("state")
    if state == "done":
        return None
    if state == "failed":
        return f"the scan of {doc.get('image')} failed: {scan.get('error')}"
    return f"{doc.get('image')} is not scanned yet ({state}); try again shortly"


@registry_app.command("sbom")
def sbom(
    app: AppName,
    image: Image = None,
    fmt: Annotated[
        str, typer.Option("--format", help="spdx (SPDX 2.3 JSON) or cyclonedx (CycloneDX JSON).")
    ] = "spdx",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to this file, not stdout.")
    ] = None,
    platform: Platform = None,
    server: Server = None,
    token: Token = None,
) -> None:
    """The image's SBOM, as attached to it (an OCI referrer: `oras discover` lists it too)."""
    if fmt not in ("spdx", "cyclonedx"):
        fail("--format must be spdx or cyclonedx")
    query = {**_image_query(image, platform), "format": fmt}
    document = client(server, token).raw("GET", f"/apps/{_quote(app)}/sbom", query)
    if output is None:
        typer.echo(document.decode())
    else:
        output.write_bytes(document)
        typer.echo(f"wrote {output} ({human_size(len(document))})", err=True)


@registry_app.command("vulns")
def vulns(
    app: AppName,
    image: Image = None,
    severity: Annotated[
        str | None,
        typer.Option(help="Only findings at least this severe: CRITICAL, HIGH, MEDIUM, LOW."),
    ] = None,
    as_json: AsJson = False,
    trivy: Annotated[
        bool, typer.Option("--trivy", help="Print Trivy's JSON report shape (SchemaVersion 2).")
    ] = False,
    platform: Platform = None,
    server: Server = None,
    token: Token = None,
) -> None:
    """Known vulnerabilities of the image's packages, worst first, with the fixed version."""
    if severity is not None and severity.upper() not in SEVERITIES:
        fail(f"--severity must be one of {', '.join(SEVERITIES)}")
    query = {**_image_query(image, platform), "severity": severity and severity.upper()}
    api = client(server, token)
    if trivy:
        report = api.raw("GET", f"/apps/{_quote(app)}/vulns", query, accept=TRIVY_MEDIA_TYPE)
        typer.echo(json.dumps(json.loads(report), indent=2))
        return
    doc = api("GET", f"/apps/{_quote(app)}/vulns", query=query)
    if as_json:
        _print_json(doc)
        return
    waiting = _scan_not_ready(doc)
    if waiting:
        fail(waiting)
    database = doc["database"]
    if not database["advisories"]:
        typer.echo("warning: no vulnerability data is loaded (`skyreg vulndb import`)", err=True)
    found = doc.get("vulnerabilities")
    if found is None:
        fail(f"{doc['image']} is scanned but not matched yet; try again shortly")
    scan = doc["scan"]
    os_name = (scan.get("os") or {}).get("pretty_name") or "unknown OS"
    counts = ", ".join(f"{k} {v}" for k, v in (doc.get("counts") or {}).items())
    typer.echo(
        f"{doc['repository']}@{doc['digest']} ({os_name}, {scan['packages']} packages): "
        f"{len(found)} found{' (' + counts + ')' if counts else ''}"
    )
    if not found:
        return
    rows = _table("SEVERITY", "ID", "PACKAGE", "INSTALLED", "FIXED", "SUMMARY")
    for f in found:
        ident = f["advisory"]
        cves = [a for a in f["aliases"] if a.startswith("CVE-")]
        if cves and not ident.startswith("CVE-"):
            ident += f" ({cves[0]})"
        rows.add_row(
            _cell(f["severity"]),
            _cell(ident),
            _cell(f["package"]),
            _cell(f["version"]),
            _cell(f["fixed"] or "-"),
            _cell(f["summary"][:80]),
        )
    _console().print(rows)


@registry_app.command("vulnsummary")
def vulnsummary(
    org: Annotated[str, typer.Option("--org", "-o", help="The organization.")],
    as_json: AsJson = False,
    server: Server = None,
    token: Token = None,
) -> None:
    """Advisories x apps: what affects the current image of each app of the org."""
    doc = client(server, token)("GET", f"/orgs/{_quote(org)}/vulnsummary")
    if as_json:
        _print_json(doc)
        return
    apps = doc["apps"]
    if not doc["advisories"]:
        typer.echo(f"no known vulnerabilities in the current images of {org}'s apps")
        return
    rows = _table("ID", "SEVERITY", *apps)
    for entry in doc["advisories"]:
        rows.add_row(
            _cell(entry["advisory"]),
            _cell(entry["severity"]),
            *(_cell(", ".join(entry["apps"].get(a, [])) or "-") for a in apps),
        )
    _console().print(rows)


@registry_app.command("files")
def files(
    app: AppName,
    image: Image = None,
    prefix: Annotated[str | None, typer.Option(help="Only paths beginning with this.")] = None,
    long: Annotated[
        bool, typer.Option("--long", "-l", help="Type, mode, size and layer of each.")
    ] = False,
    as_json: AsJson = False,
    platform: Platform = None,
    server: Server = None,
    token: Token = None,
) -> None:
    """The image's file list (its final tree, whiteouts applied)."""
    api = client(server, token)
    after: str | None = None
    entries: list[dict[str, Any]] = []
    while True:
        query = {**_image_query(image, platform), "prefix": prefix, "after": after}
        doc = api("GET", f"/apps/{_quote(app)}/files", query=query)
        waiting = _scan_not_ready(doc)
        if waiting:
            fail(waiting)
        if as_json:
            entries += doc["files"]
        else:
            for e in doc["files"]:
                if long:
                    typer.echo(
                        f"{e['type']:<8} {e['mode']:04o} {e['size']:>12} {e['layer'][7:19]} "
                        f"/{e['path']}" + (f" -> {e['link']}" if e.get("link") else "")
                    )
                else:
                    typer.echo("/" + e["path"])
        after = doc["next_after"]
        if after is None:
            break
    if as_json:
        _print_json(entries)
    elif doc["truncated"]:
        typer.echo("warning: the list is truncated (the image holds more entries)", err=True)


def _zip_directory(directory: Path, target: Path) -> None:
    """A directory of OSV JSON files as the zip the server reads."""
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(directory.rglob("*.json")):
            if path.is_file() and not path.is_symlink():
                archive.write(path, path.relative_to(directory).as_posix())


def _download(url: str, target: Path) -> None:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=60) as resp, target.open("wb") as out:
            copied = 0
            while chunk := resp.read(1024 * 1024):
                copied += len(chunk)
                if copied > MAX_DOWNLOAD:
                    fail(f"{url} is larger than {human_size(MAX_DOWNLOAD)}")
                out.write(chunk)
    except OSError as e:
        fail(f"cannot download {url}: {getattr(e, 'reason', e)}")


@vulndb_app.command("import")
def vulndb_import(
    source: Annotated[
        str,
        typer.Argument(
            help="OSV advisories: a zip as OSV publishes them (…/Debian/all.zip), a directory "
            "of OSV JSON files, or an http(s) URL of a zip."
        ),
    ],
    as_json: AsJson = False,
    server: Server = None,
    token: Token = None,
) -> None:
    """Load OSV advisories into the server (admin); unchanged ones are skipped, and the images
    already scanned are matched again in the background."""
    api = client(server, token)
    with tempfile.TemporaryDirectory(prefix="skyreg-vulndb-") as tmp:
        scheme = urllib.parse.urlsplit(source).scheme
        if scheme in ("http", "https"):
            upload = Path(tmp) / "advisories.zip"
            _download(source, upload)
        else:
            path = Path(source)
            if path.is_dir():
                upload = Path(tmp) / "advisories.zip"
                _zip_directory(path, upload)
            elif path.is_file():
                upload = path
            else:
                fail(f"{source}: no such file or directory")
        doc = json.loads(
            api.raw(
                "POST",
                "/vulndb",
                {"source": source[:500]},
                upload=upload,
                content_type="application/zip",
                timeout=IMPORT_TIMEOUT,
            )
        )
    if as_json:
        _print_json(doc)
        return
    typer.echo(
        f"read {doc['read']} advisories in {doc['seconds']:.1f}s: {doc['changed']} new or "
        f"changed, {doc['unchanged']} unchanged, {doc['failed']} refused; "
        f"generation {doc['generation']}"
    )
    for error in doc["errors"]:
        typer.echo(f"  refused: {error}", err=True)


@vulndb_app.command("status")
def vulndb_status(as_json: AsJson = False, server: Server = None, token: Token = None) -> None:
    """Which advisories are loaded."""
    doc = client(server, token)("GET", "/vulndb")
    if as_json:
        _print_json(doc)
        return
    typer.echo(
        f"{doc['advisories']} advisories, generation {doc['generation']}, last import "
        f"{_when(doc['imported_at'])} from {doc['source'] or '-'}"
    )


def register(app: typer.Typer) -> None:
    app.add_typer(registry_app, name="registry")
    app.add_typer(vulndb_app, name="vulndb")


__all__ = ["register", "registry_app", "vulndb_app"]
