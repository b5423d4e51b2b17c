"""What is inside an app's images and what is known to be wrong with them: `/apps/{app}/sbom`,
`/apps/{app}/vulns`, `/apps/{app}/files`, `/orgs/{org}/vulnsummary`; the operator's
vulnerability data: `/vulndb`."""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import msgspec

from skyreg.meta.scans import ScanRecord, VulnDbStatus
from skyreg.platform.api import models
from skyreg.platform.api.base import Call, Param, Route, bad_request
from skyreg.platform.http import ApiError
from skyreg.scan.trivy import trivy_report
from skyreg.services.access import required
from skyreg.services.errors import Forbidden

TRIVY_MEDIA_TYPE = "application/vnd.skyreg.trivy+json"  # Trivy's JSON report (SchemaVersion 2)
MAX_FILES_PAGE = 100_000
DEFAULT_FILES_PAGE = 10_000
MAX_IMPORT = 2 * 1024**3  # bytes of an uploaded OSV zip
_CHUNK = 1024 * 1024

IMAGE_PARAM = Param(
    "image",
    {"type": "string", "maxLength": 512},
    "TAG, DIGEST, REPO:TAG or REPO@DIGEST of the app's repositories (default: the image of the "
    "app's current release)",
)
_PLATFORM = re.compile(r"[a-z0-9]{1,32}/[a-z0-9_]{1,32}(/[a-z0-9]{1,32})?")
PLATFORM_PARAM = Param(
    "platform",
    {"type": "string", "pattern": "^[a-z0-9]{1,32}/[a-z0-9_]{1,32}(/[a-z0-9]{1,32})?$"},
    "For an index: the image of OS/ARCH[/VARIANT] (default linux/amd64, else its first)",
)
FORMAT_PARAM = Param("format", {"type": "string", "enum": ["spdx", "cyclonedx"]}, "Default spdx")
SEVERITY_PARAM = Param(
    "severity",
    {"type": "string", "enum": ["CRITICAL", "HIGH", "MEDIUM", "LOW", "UNKNOWN"]},
    "Only findings at least this severe",
)


def scan_state(record: ScanRecord) -> models.ScanState:
    return models.ScanState(
        digest=record.digest,
        state=record.state,
        error=record.error,
        queued_at=models.time(record.queued_at),
        indexed_at=models.maybe_time(record.indexed_at),
        os=record.os,
        packages=record.package_count,
        files=record.file_count,
        matched_at=models.maybe_time(record.matched_at),
        matched_generation=record.matched_generation,
    )


def vulndb(status: VulnDbStatus) -> models.VulnDb:
    return models.VulnDb(
        generation=status.generation,
        advisories=status.advisories,
        imported_at=models.maybe_time(status.imported_at),
        source=status.source,
    )


def _platform(call: Call) -> str | None:
    raw = call.query("platform")
    if raw is not None and not _PLATFORM.fullmatch(raw):
        raise bad_request("platform must be OS/ARCH[/VARIANT] (lowercase letters and digits)")
    return raw


def _image(call: Call) -> str | None:
    raw = call.query("image")
    if raw is not None and not 0 < len(raw) <= 512:
        raise bad_request("image must be 1 to 512 characters")
    return raw


async def get_sbom(call: Call) -> bytes:
    """The SBOM attached to the image, as stored."""
    fmt = call.query("format") or "spdx"
    _, document = await call.services.scans.sbom(
        call.token, call.path("app"), _image(call), fmt, _platform(call)
    )
    return document


async def get_vulns(call: Call) -> models.ImageVulns | bytes:
    """The image's findings (or, asked for with `Accept`, Trivy's report shape)."""
    trivy = TRIVY_MEDIA_TYPE in call.request.headers.get("Accept", "")
    found = await call.services.scans.vulns(
        call.token, call.path("app"), _image(call), call.query("severity"), _platform(call)
    )
    if trivy:
        index = None
        if found.scan.state == "done":
            index = await call.services.scans.index_summary(found.image.digest)
        report = await asyncio.to_thread(
            trivy_report,
            found.findings or (),
            index,
            found.image.name,
            found.image.digest,
            datetime.now(UTC),
        )
        return msgspec.json.encode(report)
    findings = found.findings
    counts: dict[str, int] | None = None
    if findings is not None:
        counts = {}
        for f in findings:
            counts[f.severity] = counts.get(f.severity, 0) + 1
    return models.ImageVulns(
        app=found.image.app.name,
        image=found.image.name,
        repository=found.image.repository,
        digest=found.image.digest,
        scan=scan_state(found.scan),
        database=vulndb(found.database),
        counts=counts,
        vulnerabilities=None if findings is None else list(findings),
    )


async def get_files(call: Call) -> models.ImageFiles:
    """A page of the image's file list, by path."""
    limit = call.query_int("limit", DEFAULT_FILES_PAGE, minimum=1, maximum=MAX_FILES_PAGE)
    found = await call.services.scans.files(
        call.token,
        call.path("app"),
        _image(call),
        _platform(call),
        prefix=call.query("prefix") or "",
        after=call.query("after") or "",
        limit=limit,
    )
    return models.ImageFiles(
        app=found.image.app.name,
        image=found.image.name,
        digest=found.image.digest,
        scan=scan_state(found.scan),
        files=found.files,
        truncated=found.scan.files_truncated,
        next_after=found.next_after,
    )


async def get_vulnsummary(call: Call) -> models.VulnSummary:
    """Advisories x apps of an org."""
    rows = await call.services.scans.summary(call.caller(), call.path("org"))
    apps = sorted({app for r in rows for app in r.apps})
    return models.VulnSummary(
        org=call.path("org"),
        apps=apps,
        advisories=[
            models.SummaryEntry(
                advisory=r.advisory, aliases=list(r.aliases), severity=r.severity, apps=r.apps
            )
            for r in rows
        ],
    )


async def get_vulndb(call: Call) -> models.VulnDb:
    """Which advisories are loaded."""
    call.caller()
    return vulndb(await call.services.scans.database())


async def post_vulndb(call: Call) -> models.VulnImport:
    """Load an OSV zip (admin): the body streams to a private temporary file first."""
    if required(call.token).kind != "admin":
        raise Forbidden("only an admin token may load vulnerability data")
    request = call.request
    if request.content_length is not None and request.content_length > MAX_IMPORT:
        raise ApiError(413, "too_large", f"an import holds at most {MAX_IMPORT} bytes")
    label = (call.query("source") or "upload")[:500]
    with tempfile.TemporaryDirectory(prefix="skyreg-vulndb-") as tmp:
        path = Path(tmp) / "advisories.zip"
        received = 0
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            async for chunk in request.content.iter_chunked(_CHUNK):
                received += len(chunk)
                if received > MAX_IMPORT:
                    raise ApiError(413, "too_large", f"an import holds at most {MAX_IMPORT} bytes")
                await asyncio.to_thread(out.write, chunk)  # disk writes off the loop
        if received == 0:
            raise bad_request("the body must be a zip of OSV advisories (OSV's all.zip)")
        result = await call.services.scans.import_advisories(call.token, path, label)
    return models.VulnImport(
        read=result.read,
        changed=result.changed,
        unchanged=result.unchanged,
        failed=result.failed,
        errors=result.errors,
        generation=result.generation,
        seconds=round(result.seconds, 3),
    )


ROUTES = [
    Route(
        "GET", "/apps/{app}/sbom", get_sbom, "getSbom",
        "The SBOM of an app's image: SPDX 2.3 or CycloneDX JSON, as attached to the image "
        "(an OCI referrer of its manifest)", None, errors=(400, 404), security="optional",
        query=(IMAGE_PARAM, FORMAT_PARAM, PLATFORM_PARAM),
        response_description="The document",
    ),
    Route(
        "GET", "/apps/{app}/vulns", get_vulns, "getVulns",
        "What is known to be wrong with an app's image: the OSV advisories naming an installed "
        "package's version, worst first", models.ImageVulns, errors=(400, 404),
        security="optional",
        query=(IMAGE_PARAM, SEVERITY_PARAM, PLATFORM_PARAM),
        description=f"With `Accept: {TRIVY_MEDIA_TYPE}` the answer is Trivy's JSON report "
        "(`SchemaVersion: 2`, `Results[].Vulnerabilities[]`) instead, so tools reading Trivy "
        "reports read it.",
        response_description="Findings with the scan's state",
    ),
    Route(
        "GET", "/apps/{app}/files", get_files, "getFiles",
        "The file list of an app's image (its final tree, whiteouts applied), by path",
        models.ImageFiles, errors=(400, 404), security="optional",
        query=(
            IMAGE_PARAM, PLATFORM_PARAM,
            Param("prefix", {"type": "string"}, "Only paths beginning with this"),
            Param("after", {"type": "string"}, "The next_after of the previous page"),
            Param("limit", {"type": "integer", "minimum": 1, "maximum": MAX_FILES_PAGE},
                  f"Entries per page (default {DEFAULT_FILES_PAGE})"),
        ),
        response_description="A page of entries",
    ),
    Route(
        "GET", "/orgs/{org}/vulnsummary", get_vulnsummary, "getVulnSummary",
        "Advisories x apps: every advisory affecting the current image of an app of the org",
        models.VulnSummary, errors=(404,), response_description="Advisories, worst first",
    ),
    Route(
        "GET", "/vulndb", get_vulndb, "getVulnDb",
        "The vulnerability data loaded (any token)", models.VulnDb,
        response_description="Generation, advisories, last import",
    ),
    Route(
        "POST", "/vulndb", post_vulndb, "importVulnDb",
        "Load OSV advisories (admin): the body is a zip as OSV publishes them (`all.zip`); "
        "advisories whose `modified` is unchanged are skipped; images are matched again",
        models.VulnImport, errors=(400, 403, 413), streams_body=True,
        query=(Param("source", {"type": "string"}, "Where the data came from, for people"),),
        response_description="What the import read and changed",
    ),
]  # fmt: skip
