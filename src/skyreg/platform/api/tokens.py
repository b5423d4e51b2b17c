"""`/tokens`: list, create (the secret is in the 201 answer only), revoke."""

from __future__ import annotations

from skyreg.meta.platform import TokenRecord
from skyreg.platform.api import models
from skyreg.platform.api.base import Call, Param, Route
from skyreg.services.inputs import CreateToken

ORG_PARAM = Param(
    "org",
    {"type": "string"},
    "Only this organization (default: the caller's own; an admin token: all).",
)


def token_model(token: TokenRecord) -> models.Token:
    """A token as listings show it: never its secret (which is not stored anyway)."""
    return models.Token(
        id=token.id,
        name=token.name,
        kind=token.kind,
        org=token.org_name,
        app=token.app_name,
        created_at=models.time(token.created_at),
        expires_at=models.maybe_time(token.expires_at),
        revoked_at=models.maybe_time(token.revoked_at),
        active=token.active(),
    )


async def list_tokens(call: Call) -> models.TokenList:
    """Tokens of an org (admin and org tokens)."""
    tokens = await call.services.tokens.list_tokens(call.caller(), call.query("org"))
    return models.TokenList(tokens=[token_model(t) for t in tokens])


async def create_token(call: Call) -> models.NewToken:
    """A new org, deploy or readonly token, with its secret."""
    secret, record = await call.services.tokens.create_token(
        call.caller(), call.lazy_body(CreateToken)
    )
    shown = token_model(record)
    return models.NewToken(**{f: getattr(shown, f) for f in shown.__struct_fields__}, secret=secret)


async def revoke_token(call: Call) -> models.Token:
    """Revoke a token at once."""
    return token_model(
        await call.services.tokens.revoke_token(call.caller(), call.path("token_id"))
    )


ROUTES = [
    Route(
        "GET", "/tokens", list_tokens, "listTokens",
        "List tokens (admin, org tokens); never their secrets", models.TokenList,
        errors=(403, 404), query=(ORG_PARAM,), response_description="Tokens",
    ),
    Route(
        "POST", "/tokens", create_token, "createToken",
        "Create a token; its secret is in this response only", models.NewToken, status=201,
        request=CreateToken, errors=(400, 403, 404),
        description="`org`: everything in the organization. `deploy`: push and pull one app, "
        "pull the organization's other apps. `readonly`: pull the organization's apps. Admin "
        "tokens cannot be created here. Admin tokens may create any of these; org tokens only "
        "in their own organization.",
        response_description="Created; `secret` is shown only now",
    ),
    Route(
        "DELETE", "/tokens/{token_id}", revoke_token, "revokeToken",
        "Revoke a token at once (admin; an org token in its organization; any token itself)",
        models.Token, errors=(403, 404, 409), response_description="The revoked token",
    ),
]  # fmt: skip
