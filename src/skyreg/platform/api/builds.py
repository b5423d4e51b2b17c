"""`/apps/{app}/builds`, `/builds/{id}`: Dockerfile builds; `/builders...`: what builder hosts
call (register, claim a build, send its log, report its result)."""

from __future__ import annotations

from skyreg.meta.builds import Builder as BuilderRecord
from skyreg.platform.api import models
from skyreg.platform.api.base import Call, Param, Route
from skyreg.services.builds import BuildView
from skyreg.services.inputs import BuildLogLines, BuildResult, CreateBuild, RegisterBuilder

MAX_LIST = 100
MAX_LOG_PAGE = 1000


def builder_model(b: BuilderRecord, org: str | None) -> models.Builder:
    return models.Builder(
        id=b.id,
        name=b.name,
        region=b.region,
        org=org,
        public_key=b.public_key,
        registered_at=models.time(b.registered_at),
        last_seen=models.time(b.last_seen),
    )


def build_model(view: BuildView) -> models.Build:
    b = view.build
    return models.Build(
        id=b.id,
        app=view.app,
        org=view.org,
        status=b.status,
        created_by=b.created_by,
        created_at=models.time(b.created_at),
        started_at=models.maybe_time(b.started_at),
        finished_at=models.maybe_time(b.finished_at),
        builder=b.builder_id,
        region=b.region,
        context_digest=b.context_digest,
        context_size=b.context_size,
        dockerfile=b.dockerfile,
        target=b.target,
        platform=b.platform,
        build_args=b.build_args,
        secrets=b.secret_ids,
        no_cache=b.no_cache,
        image_label=b.image_label,
        image_digest=b.image_digest,
        image_ref=None if b.image_digest is None else f"{view.app}@{b.image_digest}",
        steps=[
            models.BuildStepTime(
                step=int(s["step"]),
                instruction=str(s["instruction"]),
                seconds=float(s["seconds"]),
                cached=bool(s["cached"]),
            )
            for s in b.steps
        ],
        error=b.error,
        log_lines=b.log_lines,
    )


async def get_builder(call: Call) -> models.Builder:
    """The builder a new build of the app goes to."""
    b = await call.services.builds.choose_builder(call.caller(), call.path("app"))
    return builder_model(b, None if b.org_id is None else call.caller().org_name)


async def create_build(call: Call) -> models.Build:
    """Queue a build."""
    view = await call.services.builds.create_build(
        call.caller(), call.path("app"), call.lazy_body(CreateBuild)
    )
    return build_model(view)


async def list_builds(call: Call) -> models.BuildList:
    """An app's builds, newest first."""
    limit = call.query_int("limit", 25, 1, MAX_LIST)
    views = await call.services.builds.list_builds(call.caller(), call.path("app"), limit)
    return models.BuildList(builds=[build_model(v) for v in views])


async def get_build(call: Call) -> models.Build:
    """One build."""
    return build_model(await call.services.builds.get_build(call.caller(), call.path("build_id")))


async def build_logs(call: Call) -> models.BuildLog:
    """Log lines after `after`, waiting up to `wait` seconds for one (or the build's end)."""
    after = call.query_int("after", 0)
    limit = call.query_int("limit", MAX_LOG_PAGE, 1, MAX_LOG_PAGE)
    wait = call.query_int("wait", 0, 0, 20)
    read = await call.services.builds.read_logs(
        call.caller(), call.path("build_id"), after, limit, float(wait)
    )
    b = read.build.build
    last = read.lines[-1][0] if read.lines else after
    return models.BuildLog(
        build=b.id,
        status=b.status,
        lines=[models.BuildLogLine(seq=seq, line=line) for seq, line in read.lines],
        next=last,
        ended=b.ended and last >= b.log_lines,
        error=b.error,
        image_digest=b.image_digest,
    )


async def cancel_build(call: Call) -> models.Build:
    """Cancel a build."""
    return build_model(await call.services.builds.cancel(call.caller(), call.path("build_id")))


async def register_builder(call: Call) -> models.Builder:
    """A builder host registers."""
    caller = call.caller()
    body = call.body(RegisterBuilder)
    b = await call.services.builds.register_builder(caller, body)
    return builder_model(b, None if b.org_id is None else caller.org_name)


async def claim_build(call: Call) -> models.ClaimedBuild:
    """A builder's poll: its next build, if any."""
    wait = call.query_int("wait", 0, 0, 20)
    claimed = await call.services.builds.claim(call.caller(), call.path("builder_id"), float(wait))
    if claimed is None:
        return models.ClaimedBuild(build=None)
    return models.ClaimedBuild(
        build=build_model(claimed.view),
        credential=claimed.credential,
        sealed_secrets=claimed.sealed_secrets,
    )


async def builder_logs(call: Call) -> models.BuildLogAccepted:
    """A builder sends log lines."""
    stop = await call.services.builds.builder_logs(
        call.caller(), call.path("build_id"), call.body(BuildLogLines)
    )
    return models.BuildLogAccepted(stop=stop)


async def builder_result(call: Call) -> models.Build:
    """A builder reports how a build ended."""
    view = await call.services.builds.builder_result(
        call.caller(), call.path("build_id"), call.body(BuildResult)
    )
    return build_model(view)


ROUTES = [
    Route(
        "GET", "/apps/{app}/builder", get_builder, "getAppBuilder",
        "The builder a new build of the app goes to, with the public key its build secrets "
        "are sealed to (a token that may push to the app)", models.Builder,
        errors=(403, 404, 409), response_description="The builder",
    ),
    Route(
        "POST", "/apps/{app}/builds", create_build, "createBuild",
        "Queue a build of a context blob pushed to the app (a token that may push to it)",
        models.Build, request=CreateBuild, status=201, errors=(400, 403, 404, 409),
        response_description="The build, queued",
    ),
    Route(
        "GET", "/apps/{app}/builds", list_builds, "listBuilds",
        "An app's builds, newest first", models.BuildList, errors=(400, 404),
        query=(Param("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIST,
                               "default": 25}),),
        response_description="Builds",
    ),
    Route(
        "GET", "/builds/{build_id}", get_build, "getBuild", "One build", models.Build,
        errors=(404,), response_description="The build",
    ),
    Route(
        "GET", "/builds/{build_id}/logs", build_logs, "getBuildLogs",
        "A build's log lines after `after`; `wait` (seconds, at most 20) waits for the next "
        "line or the build's end. Reading an unfinished build's log keeps it alive: a queued "
        "build nobody reads for 30 s is cancelled, a running one is stopped",
        models.BuildLog, errors=(400, 404),
        query=(
            Param("after", {"type": "integer", "minimum": 0, "default": 0}),
            Param("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LOG_PAGE,
                            "default": MAX_LOG_PAGE}),
            Param("wait", {"type": "integer", "minimum": 0, "maximum": 20, "default": 0}),
        ),
        response_description="Log lines",
    ),
    Route(
        "POST", "/builds/{build_id}/cancel", cancel_build, "cancelBuild",
        "Cancel a build (queued: at once; running: its builder stops it)", models.Build,
        errors=(403, 404), response_description="The build",
    ),
    Route(
        "POST", "/builders", register_builder, "registerBuilder",
        "For builder hosts (admin token: builds of every org; org token: its org's)",
        models.Builder, request=RegisterBuilder, status=201, errors=(400, 403),
        response_description="The builder",
    ),
    Route(
        "POST", "/builders/{builder_id}/claim", claim_build, "claimBuild",
        "A builder's poll: its next queued build (now running), a build token of the app and "
        "the build's sealed secrets; `wait` (seconds, at most 20) waits for one to be queued",
        models.ClaimedBuild, errors=(400, 403, 404),
        query=(Param("wait", {"type": "integer", "minimum": 0, "maximum": 20, "default": 0}),),
        response_description="A build, or null", audited=False,
    ),
    Route(
        "POST", "/builder/builds/{build_id}/logs", builder_logs, "sendBuildLogs",
        "A builder appends a build's log lines; `stop` tells it to stop the build",
        models.BuildLogAccepted, request=BuildLogLines, errors=(400, 404),
        response_description="Accepted", audited=False,
    ),
    Route(
        "POST", "/builder/builds/{build_id}/result", builder_result, "sendBuildResult",
        "A builder reports how a build ended; the build's token is revoked", models.Build,
        request=BuildResult, errors=(400, 404, 409), response_description="The build",
    ),
]  # fmt: skip
