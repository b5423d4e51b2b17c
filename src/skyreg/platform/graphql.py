"""A GraphQL endpoint answering the release queries Fly.io's API answers (`POST /graphql`).

It serves, for example:
    query($appName: String!, $limit: Int!) { app(name: $appName) {
      releases: releasesUnprocessed(first: $limit) { nodes {
        id version description reason status imageRef stable user { id email name } createdAt
      } } } }
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from graphql import GraphQLError, build_schema, graphql_sync

from skyreg.clock import utc_iso
from skyreg.meta.platform import Release
from skyreg.platform.releases import RELEASES_KEY

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
MAX_FIRST = 1000


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


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"errors": [{"message": message}]}, status=status)


async def graphql_endpoint(request: web.Request) -> web.StreamResponse:
    """POST {"query": ..., "variables": {...}} with `Authorization: Bearer <token>`."""
    from skyreg.platform.api import API_AUTH_KEY, ApiError, Call

    call = Call(request, request.app[API_AUTH_KEY])
    try:
        call.identify()
        body = await call.body()
    except ApiError as err:
        return err.response()
    query = body.get("query")
    variables = body.get("variables") or {}
    if not isinstance(query, str) or not isinstance(variables, dict):
        return _error(400, "a JSON body with a `query` string (and `variables` object) is needed")
    service = request.app[RELEASES_KEY]

    def resolve_app(_info: Any, name: str) -> dict[str, Any] | None:
        try:
            app = call.app_named(name)
        except ApiError:
            raise GraphQLError(f"Could not find App {name!r}") from None

        def releases(_info: Any, first: int | None = None) -> dict[str, Any]:
            limit = MAX_FIRST if first is None else first
            if not 0 <= limit <= MAX_FIRST:
                raise GraphQLError(f"first must be from 0 to {MAX_FIRST}")
            found = service.releases.list_releases(app.id, limit) if limit else []
            return {"nodes": [_release_node(r) for r in found], "totalCount": len(found)}

        return {
            "id": app.name,
            "name": app.name,
            "organization": {"slug": app.org_name},
            "releasesUnprocessed": releases,
        }

    if call.token is None:
        return _error(401, "authentication required: Authorization: Bearer <token>")
    result = graphql_sync(SCHEMA, query, root_value={"app": resolve_app}, variable_values=variables)
    doc: dict[str, Any] = {}
    if result.errors:
        doc["errors"] = [e.formatted for e in result.errors]
    if result.data is not None or not result.errors:
        doc["data"] = result.data
    return web.Response(body=json.dumps(doc).encode(), content_type="application/json")
