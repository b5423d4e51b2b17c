"""A GraphQL endpoint answering the release queries Fly.io's API answers (`POST /graphql`).

It serves, for example:
    query($appName: String!, $limit: Int!) { app(name: $appName) {
      releases: releasesUnprocessed(first: $limit) { nodes {
        id version description reason status imageRef stable user { id email name } createdAt
      } } } }

Every query is bounded before it runs: its document size and tokens, and (fragments expanded) its
depth, aliases, field selections, page sizes (`first`) and the release nodes it may return in
total (`QueryLimits`); its answer is refused when larger than `MAX_ANSWER_BYTES`. Parsing,
validation, execution and serialisation run in a small thread pool (`GraphQLRunner`), never on the
event loop; resolvers ask the same `ReleaseService` as `/api/v1` (its blocking `releases_of`, on
the pool's threads: the process's shared `Database`, a reader connection per thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from graphql import (
    DocumentNode,
    FieldNode,
    FragmentSpreadNode,
    GraphQLError,
    InlineFragmentNode,
    IntValueNode,
    OperationDefinitionNode,
    SelectionSetNode,
    ValidationContext,
    ValidationRule,
    VariableNode,
    build_schema,
    execute_sync,
    parse,
    specified_rules,
    validate,
)

from skyreg.auth.service import Authenticator
from skyreg.clock import utc_iso
from skyreg.meta.platform import Release, TokenRecord
from skyreg.oci.bounded import JSONInputError, load_json, storable
from skyreg.platform.http import MAX_BODY, ApiError, Identifier, RequestPayloadError, read_body
from skyreg.services.errors import NotFound
from skyreg.services.releases import ReleaseService

SCHEMA = build_schema(
    """
    type Query {
      app(name: String!): App
    }
    type App {
      id: ID!
      name: String!
      organization: Organization!
      releasesUnprocessed(first: Int): ReleaseConnection!
    }
    type Organization {
      slug: String!
    }
    type ReleaseConnection {
      nodes: [Release!]!
      totalCount: Int!
    }
    type Release {
      id: ID!
      version: Int!
      description: String!
      reason: String!
      status: String!
      imageRef: String!
      stable: Boolean!
      user: User!
      createdAt: String!
    }
    type User {
      id: ID!
      email: String!
      name: String!
    }
    """
)
log = logging.getLogger("skyreg.graphql")

MAX_QUERY_BYTES = 8 * 1024  # Fly's release query is ~300 bytes
MAX_TOKENS = 2000
MAX_DEPTH = 8  # field levels; the schema itself is 5 deep
MAX_ALIASES = 20
MAX_FIELDS = 300  # field selections, every fragment spread expanded where it is used
MAX_STEPS = 10 * MAX_FIELDS  # selections visited (spreads included): fragment blow-up stops here
MAX_FIRST = 100  # page size of one releasesUnprocessed; also its default
MAX_RELEASE_NODES = 1000  # releases one query may ask for, summed over every releasesUnprocessed
MAX_ANSWER_BYTES = 1024 * 1024
WORKERS = 2
PER_CALLER = 2  # queries of one org (an admin token: of that token) running or waiting; over: 429
MAX_WAITING = 64  # queries of everyone waiting for a worker; over: 503
WAIT_TIMEOUT = 30.0  # seconds a query may wait for a worker; then 503


class _OverLimit(Exception):
    def __init__(self, message: str, node: Any) -> None:
        super().__init__(message)
        self.node = node


def query_limits(variables: dict[str, Any]) -> type[ValidationRule]:
    """A validation rule bounding each operation's cost, fragments expanded, before execution.

    `variables` are the request's: `first: $limit` is checked with the value it will have.
    """

    class QueryLimits(ValidationRule):
        def __init__(self, context: ValidationContext) -> None:
            super().__init__(context)
            self.defaults: dict[str, Any] = {}
            self.steps = self.fields = self.aliases = self.release_nodes = 0

        def enter_operation_definition(self, node: OperationDefinitionNode, *_: Any) -> Any:
            self.defaults = {
                d.variable.name.value: d.default_value for d in node.variable_definitions or ()
            }
            self.steps = self.fields = self.aliases = self.release_nodes = 0
            try:
                self._measure(node.selection_set, 1, frozenset())
            except _OverLimit as e:
                self.report_error(GraphQLError(str(e), e.node))
            return self.SKIP

        def _measure(
            self, selections: SelectionSetNode, depth: int, spreads: frozenset[str]
        ) -> None:
            for sel in selections.selections:
                self.steps += 1
                if self.steps > MAX_STEPS:
                    raise _OverLimit(
                        f"query selects too many fields (over {MAX_STEPS} "
                        "selections with fragments expanded)",
                        sel,
                    )
                if isinstance(sel, FieldNode):
                    self._field(sel, depth)
                    if sel.selection_set is not None:
                        self._measure(sel.selection_set, depth + 1, spreads)
                elif isinstance(sel, InlineFragmentNode):
                    self._measure(sel.selection_set, depth, spreads)
                elif isinstance(sel, FragmentSpreadNode):
                    name = sel.name.value
                    fragment = self.context.get_fragment(name)
                    # Unknown fragments and cycles are reported by the standard rules.
                    if fragment is not None and name not in spreads:
                        self._measure(fragment.selection_set, depth, spreads | {name})

        def _field(self, node: FieldNode, depth: int) -> None:
            if depth > MAX_DEPTH:
                raise _OverLimit(f"query is nested too deeply (over {MAX_DEPTH} levels)", node)
            self.fields += 1
            if self.fields > MAX_FIELDS:
                raise _OverLimit(
                    f"query selects too many fields (over {MAX_FIELDS} with fragments expanded)",
                    node,
                )
            if node.alias is not None:
                self.aliases += 1
                if self.aliases > MAX_ALIASES:
                    raise _OverLimit(f"query uses too many aliases (over {MAX_ALIASES})", node)
            if node.name.value == "releasesUnprocessed":
                first = self._first(node)
                if not 0 <= first <= MAX_FIRST:
                    raise _OverLimit(f"first must be from 0 to {MAX_FIRST}", node)
                self.release_nodes += first
                if self.release_nodes > MAX_RELEASE_NODES:
                    raise _OverLimit(
                        f"query asks for too many releases (over {MAX_RELEASE_NODES} in total)",
                        node,
                    )

        def _first(self, node: FieldNode) -> int:
            for arg in node.arguments or ():
                if arg.name.value != "first":
                    continue
                value: Any = arg.value
                if isinstance(value, VariableNode):
                    name = value.name.value
                    value = variables[name] if name in variables else self.defaults.get(name)
                if isinstance(value, IntValueNode):
                    value = int(value.value)
                if isinstance(value, int) and not isinstance(value, bool):
                    return value
                return MAX_FIRST  # absent or not a number: coercion rejects it, else the default
            return MAX_FIRST

    return QueryLimits


def _release_node(release: Release) -> dict[str, Any]:
    return {
        "id": str(release.id),
        "version": release.version,
        "description": release.description,
        "reason": release.reason,
        "status": release.status,
        "imageRef": release.image_ref,
        "stable": release.stable,
        # Releases are made with tokens, not user accounts: the token stands in for the user.
        "user": {"id": release.user_id, "email": "", "name": release.user_name},
        "createdAt": utc_iso(release.created_at),
    }


def _public(error: GraphQLError) -> dict[str, Any]:
    """An execution error as the caller sees it: our own messages as they are, anything
    unexpected (a database error's text could show SQL) as a bare "internal error", logged."""
    original = error.original_error
    if original is None or isinstance(original, GraphQLError):
        return dict(error.formatted)
    log.error("graphql resolver failed: %r", original, exc_info=original)
    hidden = GraphQLError("internal error", error.nodes, path=error.path)
    return dict(hidden.formatted)


def _errors(status: int, *messages: str) -> tuple[int, bytes]:
    return status, json.dumps({"errors": [{"message": m} for m in messages]}).encode()


def _caller(token: TokenRecord) -> str:
    """Whose allowance a query uses: its org's (every token of an org shares one), or an admin
    token's own."""
    return f"org:{token.org_id}" if token.org_id is not None else f"token:{token.id}"


@dataclass
class GraphQLRunner:
    """Runs queries in a small pool of threads (each with its reader connection of the shared
    `Database`, through the `ReleaseService`): the database threads stay free for the other
    requests.

    Admission: each caller (`_caller`) has at most `per_caller` queries running or waiting
    (more answer 429), so no tenant can hold every worker and the queue; a query within its
    allowance waits for a worker first come, first served (a freed worker is handed to the
    oldest waiter, never taken by a newcomer), at most `wait_timeout` seconds and behind at most
    `max_waiting` others, else 503.
    """

    releases: ReleaseService
    workers: int = WORKERS
    per_caller: int = PER_CALLER
    max_waiting: int = MAX_WAITING
    wait_timeout: float = WAIT_TIMEOUT
    _pool: ThreadPoolExecutor = field(init=False)
    _callers: dict[str, int] = field(default_factory=dict)  # queries admitted per caller
    _running: int = 0  # workers handed out (queries executing or about to)
    _waiters: deque[asyncio.Future[None]] = field(default_factory=deque)

    def __post_init__(self) -> None:
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="graphql")

    async def run(
        self, token: TokenRecord, query: str, variables: dict[str, Any], operation: str | None
    ) -> tuple[int, bytes]:
        """(HTTP status, JSON body) of one query: 429 when its caller has too many in
        progress, 503 when no worker frees up in time."""
        caller = _caller(token)
        if self._callers.get(caller, 0) >= self.per_caller:
            whose = "organization" if token.org_id is not None else "token"
            return _errors(
                429,
                f"too many GraphQL queries in progress for this {whose} "
                f"(at most {self.per_caller}); retry when one has finished",
            )
        self._callers[caller] = self._callers.get(caller, 0) + 1
        try:
            admitted = await self._acquire()
        except BaseException:
            self._leave(caller)
            raise
        if not admitted:
            self._leave(caller)
            return _errors(503, "GraphQL is busy: no worker is free; retry shortly")
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(
                self._pool, self.answer, token, query, variables, operation
            )
        except BaseException:
            self._release()
            self._leave(caller)
            raise

        def finished(_: object) -> None:
            self._release()
            self._leave(caller)

        # The worker and the allowance are given back when the thread is done, even if this
        # request is cancelled first (the thread cannot be stopped).
        future.add_done_callback(finished)
        return await asyncio.shield(future)

    async def _acquire(self) -> bool:
        """A worker, waiting in turn for at most `wait_timeout` s; False when none is had."""
        if self._running < self.workers and not self._waiters:
            self._running += 1
            return True
        if len(self._waiters) >= self.max_waiting:
            return False
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self.wait_timeout):
                await waiter
            return True
        except TimeoutError:
            return waiter.done() and not waiter.cancelled()  # handed one as time ran out
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._release()  # handed a worker just as this request was cancelled
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    def _release(self) -> None:
        """Hand the worker to the oldest waiter still waiting, else free it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._running -= 1

    def _leave(self, caller: str) -> None:
        left = self._callers[caller] - 1
        if left:
            self._callers[caller] = left
        else:
            del self._callers[caller]

    def answer(
        self, token: TokenRecord, query: str, variables: dict[str, Any], operation: str | None
    ) -> tuple[int, bytes]:
        """Parse, bound, validate and execute a query (blocking: runs in a worker thread)."""
        size = len(query.encode())
        if size > MAX_QUERY_BYTES:
            return _errors(400, f"query document larger than {MAX_QUERY_BYTES} bytes ({size})")
        try:
            document: DocumentNode = parse(query, max_tokens=MAX_TOKENS)
        except GraphQLError as e:
            return 400, json.dumps({"errors": [e.formatted]}).encode()
        except RecursionError:
            return _errors(400, "query is nested too deeply")
        problems = validate(SCHEMA, document, [query_limits(variables)])
        if not problems:
            problems = validate(SCHEMA, document, specified_rules)
        if problems:
            return 400, json.dumps({"errors": [e.formatted for e in problems]}).encode()
        result = execute_sync(
            SCHEMA,
            document,
            root_value={"app": self._resolve_app(token)},
            variable_values=variables,
            operation_name=operation,
        )
        doc: dict[str, Any] = {}
        if result.errors:
            doc["errors"] = [_public(e) for e in result.errors]
        if result.data is not None or not result.errors:
            doc["data"] = result.data
        body = json.dumps(doc).encode()
        if len(body) > MAX_ANSWER_BYTES:
            return _errors(
                400,
                f"the answer would be {len(body)} bytes, over the {MAX_ANSWER_BYTES}-byte "
                "limit: ask for fewer releases or fields",
            )
        return 200, body

    def _resolve_app(self, token: TokenRecord) -> Any:
        service = self.releases

        def resolve_app(_info: Any, name: str) -> dict[str, Any] | None:
            # A literal may spell NUL or a lone surrogate, which no database column compares with.
            if not storable(name):
                raise GraphQLError(f"Could not find App {name!r}")
            try:  # another org's app answers exactly like a missing one
                app, _ = service.releases_of(token, name, 0)
            except NotFound:
                raise GraphQLError(f"Could not find App {name!r}") from None

            def releases(_info: Any, first: int | None = None) -> dict[str, Any]:
                limit = MAX_FIRST if first is None else first
                if not 0 <= limit <= MAX_FIRST:
                    raise GraphQLError(f"first must be from 0 to {MAX_FIRST}")
                _, found = service.releases_of(token, name, limit)
                return {"nodes": [_release_node(r) for r in found], "totalCount": len(found)}

            return {
                "id": app.name,
                "name": app.name,
                "organization": {"slug": app.org_name},
                "releasesUnprocessed": releases,
            }

        return resolve_app

    def close(self) -> None:
        """Wait for running queries. The threads' reader connections belong to the shared
        `Database`, which closes them when it closes."""
        self._pool.shutdown(wait=True)


GRAPHQL_KEY = web.AppKey("graphql", GraphQLRunner)
GRAPHQL_AUTH_KEY = web.AppKey("graphql_authenticator", Authenticator)


def add_graphql(app: web.Application, auth: Authenticator, releases: ReleaseService) -> None:
    """Serve `POST /graphql` on `app`: callers identified by `auth`, queries run by a
    `GraphQLRunner` over `releases`."""
    runner = GraphQLRunner(releases)
    app[GRAPHQL_KEY] = runner
    app[GRAPHQL_AUTH_KEY] = auth
    app.router.add_post("/graphql", graphql_endpoint)

    async def close(_app: web.Application) -> None:
        await asyncio.to_thread(runner.close)

    app.on_cleanup.insert(0, close)


async def _token_and_body(request: web.Request) -> tuple[TokenRecord | None, dict[str, Any]]:
    """The caller's token (token lookups: `Database.read`) and the JSON object it sent; a body
    too large or not JSON is refused after the token is checked."""
    body_error: ApiError | None = None
    raw = b""
    try:
        raw = await read_body(request, MAX_BODY)
    except ApiError as e:
        body_error = e
    except RequestPayloadError as e:
        body_error = ApiError(400, "bad_request", f"unreadable request body: {e}"[:300])
    auth = request.app[GRAPHQL_AUTH_KEY]
    token = await auth.platform.read(Identifier(request, auth).identify)
    if body_error is not None:
        raise body_error
    if not raw.strip():
        return token, {}
    try:
        doc = load_json(raw, max_bytes=MAX_BODY)
    except JSONInputError as e:
        raise ApiError(400, "bad_request", f"the request body is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ApiError(400, "bad_request", "the request body must be a JSON object")
    return token, doc


async def graphql_endpoint(request: web.Request) -> web.StreamResponse:
    """POST {"query": ..., "variables": {...}} with `Authorization: Bearer <token>`."""
    try:
        token, body = await _token_and_body(request)
    except ApiError as err:
        return err.response()
    query = body.get("query")
    variables = body.get("variables") or {}
    operation = body.get("operationName")
    if (
        not isinstance(query, str)
        or not isinstance(variables, dict)
        or not (operation is None or isinstance(operation, str))
    ):
        status, doc = _errors(
            400, "a JSON body with a `query` string (and `variables` object) is needed"
        )
        return web.Response(status=status, body=doc, content_type="application/json")
    if token is None:
        status, doc = _errors(401, "authentication required: Authorization: Bearer <token>")
        return web.Response(status=status, body=doc, content_type="application/json")
    status, doc = await request.app[GRAPHQL_KEY].run(token, query, variables, operation)
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return web.Response(status=status, body=doc, content_type="application/json", headers=headers)
