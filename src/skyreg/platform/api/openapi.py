"""The OpenAPI 3.1 document of the management API, generated from the route declarations
(`base.Route`) and the request and response Structs they name."""

from __future__ import annotations

import re
from typing import Any

import msgspec

from skyreg.platform.api import models
from skyreg.platform.api.base import AUDITED_METHODS, PATH_PARAMETERS, PREFIX, Route

INFO = {
    "title": "skyreg management API",
    "version": "1",
    "description": "Organizations, apps, access tokens, images, releases and machines of a "
    "skyreg registry. Authenticate with an access token: `Authorization: Bearer <token>` or "
    "HTTP Basic with the token as password. Resources of other organizations answer 404, as if "
    'they did not exist. Errors are `{"error": {"code", "message"}}`. Repeated failed '
    "authentication from one client is answered 429 with Retry-After.",
}
SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "An access token"},
    "basic": {
        "type": "http",
        "scheme": "basic",
        "description": "Any username, the access token as password",
    },
}
ERRORS = {
    400: ("BadRequest", "Malformed request (or a parameter holding NUL or a lone surrogate)"),
    401: ("Unauthorized", "No, or an invalid, expired or revoked, token"),
    403: ("Forbidden", "The token may not do this"),
    404: ("NotFound", "No such resource (or one of another organization)"),
    409: (
        "Conflict",
        "The name is taken, the change would leave no admin, or the manifest is in an index",
    ),
    413: ("TooLarge", "The request body is larger than 64 KiB (setSecrets: 2 MiB)"),
    429: ("TooManyRequests", "Too many failed authentication attempts; see Retry-After"),
    503: ("Unavailable", "The server cannot do this now (e.g. app secrets without a master key)"),
}
_REF = "#/components/schemas/{name}"


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _statuses(route: Route) -> list[int]:
    # 400: every route refuses a path or query parameter holding NUL or a lone surrogate.
    statuses = {*route.errors, 400}
    if route.request is not None:
        statuses.add(413)
    if route.security != "none":
        statuses |= {401, 429}
    return sorted(statuses)


def document(routes: list[Route]) -> dict[str, Any]:
    """The OpenAPI document of `routes`, with every Struct they name as a component schema."""
    types: list[Any] = [models.Error]
    for route in routes:
        for model in (route.request, route.response):
            if model is not None and model not in types:
                types.append(model)
    refs, schemas = msgspec.json.schema_components(types, ref_template=_REF)
    ref_of = dict(zip(types, refs, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        parameters: list[dict[str, Any]] = [
            {
                "name": name,
                "in": "path",
                "required": True,
                "description": PATH_PARAMETERS[name],
                "schema": {"type": "string"},
            }
            for name in re.findall(r"\{(\w+)\}", route.path)
        ]
        for param in route.query:
            parameters.append(
                {"name": param.name, "in": "query", "required": False, "schema": param.schema}
                | ({"description": param.description} if param.description else {})
            )
        operation: dict[str, Any] = {"operationId": route.operation_id, "summary": route.summary}
        if route.description:
            operation["description"] = route.description
        if route.method in AUDITED_METHODS and not route.audited:
            operation["x-skyreg-audited"] = False  # machine telemetry: not in the audit log
        if route.security == "none":
            operation["security"] = []
        elif route.security == "optional":
            operation["security"] = [{"bearer": []}, {"basic": []}, {}]
        if parameters:
            operation["parameters"] = parameters
        if route.request is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": ref_of[route.request]}},
            }
        success = {"type": "object"} if route.response is None else ref_of[route.response]
        responses: dict[str, Any] = {
            str(route.status): {"description": route.response_description}  # no body
            if route.status == 204
            else _json(success, route.response_description)
        }
        for status in _statuses(route):
            responses[str(status)] = {"$ref": f"#/components/responses/{ERRORS[status][0]}"}
        operation["responses"] = responses
        paths.setdefault(PREFIX + route.path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": INFO,
        "security": [{"bearer": []}, {"basic": []}],
        "paths": paths,
        "components": {
            "securitySchemes": SECURITY_SCHEMES,
            "schemas": schemas,
            "responses": {
                name: _json({"$ref": _REF.format(name="Error")}, description)
                for name, description in ERRORS.values()
            },
        },
    }


def encoded(routes: list[Route]) -> bytes:
    """`document(routes)` as JSON."""
    return msgspec.json.encode(document(routes))
