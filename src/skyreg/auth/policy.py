"""The access policy: which actions a token may take on a repository.

An app's repositories are `<app>` and `<app>/<anything>`. Anyone with access to an org may pull
every app of it (build once, deploy many); push and delete are per app.
"""

from __future__ import annotations

from skyreg.meta.platform import PlatformMeta, TokenRecord

PULL, PUSH, DELETE = "pull", "push", "delete"
ALL_ACTIONS = frozenset({PULL, PUSH, DELETE})
PULL_ONLY = frozenset({PULL})
NOTHING: frozenset[str] = frozenset()

# "build": minted for one build, so its builder pulls and pushes as the app's deploy token would;
# the management API refuses it (platform/http.py).
# "agent": a region agent's, made by an admin for one org (or every org): pulls the images of the
# machines it runs and receives their secrets; the management API refuses it outside /agent/.
# "proxy": `skyreg proxy`'s, made by an admin for one org (or every org): reads the routes to
# machines (GET /api/v1/agent/routes) and nothing else, not even a private image. The proxy faces
# the internet: what it holds must not open machines' secrets or images.
TOKEN_KINDS = ("admin", "org", "deploy", "readonly", "build", "agent", "proxy")


def app_of(repository: str) -> str:
    """The app a repository belongs to: its first path component."""
    return repository.split("/", 1)[0]


class AccessPolicy:
    """Decides actions from a token's kind, org and app, and the app's visibility."""

    def __init__(self, platform: PlatformMeta) -> None:
        self.platform = platform

    def allowed(self, token: TokenRecord | None, repository: str) -> frozenset[str]:
        """The actions `token` (None: anonymous) may take on `repository`."""
        app = self.platform.get_app(app_of(repository))
        if app is None:
            return NOTHING
        public = PULL_ONLY if app.public else NOTHING
        if token is None:
            return public
        if token.kind == "admin":
            return ALL_ACTIONS
        if token.kind == "agent":
            return PULL_ONLY if token.org_id in (None, app.org_id) else public
        if token.kind == "proxy":
            return public
        if token.org_id != app.org_id:
            return public
        if token.kind == "org":
            return ALL_ACTIONS
        if token.kind in ("deploy", "build"):
            return ALL_ACTIONS if token.app_id == app.id else PULL_ONLY
        return PULL_ONLY
