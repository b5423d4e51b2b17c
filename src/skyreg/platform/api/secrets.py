"""`/apps/{app}/secrets`: an app's secrets (names and digests only, never values);
`/secrets/rotate-key`: wrap every data key with the newest master key;
`/agent/machines/{id}/secrets`: a starting machine's values, for its agent's token only."""

from __future__ import annotations

import functools

from skyreg.auth.envelope import SecretKeyError
from skyreg.platform.api import models
from skyreg.platform.api.base import Call, Route
from skyreg.platform.api.releases import release_model
from skyreg.platform.http import ApiError
from skyreg.services.inputs import MachineSecretsRequest, SetSecrets, UnsetSecrets
from skyreg.services.secrets import SecretsChanged

# Values are up to 64 KiB each and 1 MiB per app in all; JSON escapes can make them longer.
SET_MAX_BODY = 2 << 20


def changed_model(change: SecretsChanged) -> models.SecretsChanged:
    return models.SecretsChanged(
        app=change.app.name,
        version=change.version,
        changed=change.names,
        staged=change.staged,
        release=None if change.release is None else release_model(change.release),
    )


async def list_secrets(call: Call) -> models.SecretList:
    """The app's secrets: names, digests, who set them and when."""
    found = await call.services.secrets.list_secrets(call.caller(), call.path("app"))
    deployed = found.deployed_version
    return models.SecretList(
        app=found.app.name,
        version=found.version,
        deployed_version=deployed,
        secrets=[
            models.SecretInfo(
                name=s.name,
                digest=s.digest,
                version=s.set_in,
                deployed=deployed is not None and s.set_in <= deployed,
                set_by=models.ReleaseUser(id=s.set_by_id, name=s.set_by_name),
                set_at=models.time(s.set_at),
            )
            for s in found.secrets
        ],
    )


async def set_secrets(call: Call) -> models.SecretsChanged:
    """Set secrets; unless staged, roll the app's machines onto them."""
    body = functools.cache(call.lazy_body(SetSecrets))
    change = await call.services.secrets.set_secrets(
        call.caller(),
        call.path("app"),
        lambda: body().secrets,
        stage=lambda: body().stage,
    )
    return changed_model(change)


async def unset_secrets(call: Call) -> models.SecretsChanged:
    """Unset secrets; unless staged, roll the app's machines without them."""
    body = functools.cache(call.lazy_body(UnsetSecrets))
    change = await call.services.secrets.unset_secrets(
        call.caller(),
        call.path("app"),
        lambda: body().names,
        stage=lambda: body().stage,
    )
    return changed_model(change)


async def rotate_key(call: Call) -> models.KeyRotation:
    """Read the master keys again; wrap every org's data key, and seal every webhook secret,
    with the newest."""
    secrets = call.services.secrets
    done = await secrets.rotate_key(call.caller())
    keys = await secrets.secrets.run(secrets.keyring.keys)
    try:
        resealed = await call.services.webhooks.reseal(keys)
    except SecretKeyError as e:
        raise ApiError(503, "unavailable", f"webhook secrets: {e}") from None
    return models.KeyRotation(
        key_id=done.key_id,
        rewrapped=done.rewrapped,
        total=done.total,
        webhooks_resealed=resealed,
    )


async def machine_secrets(call: Call) -> models.MachineSecretValues:
    """The environment of a machine the calling agent is starting."""
    body = call.body(MachineSecretsRequest)
    found = await call.services.secrets.machine_secrets(
        call.caller(), call.path("machine_id"), body.generation
    )
    return models.MachineSecretValues(env=found.secrets, release_env=found.plain)


ROUTES = [
    Route(
        "GET", "/apps/{app}/secrets", list_secrets, "listSecrets",
        "An app's secrets: names, a keyed digest of each value, who set it and when, and "
        "whether the newest release runs with it; never a value (admin, the app's org token, "
        "the app's deploy token)", models.SecretList, errors=(403, 404, 503),
        response_description="The app's secrets",
    ),
    Route(
        "POST", "/apps/{app}/secrets", set_secrets, "setSecrets",
        "Set secrets of an app (admin, the app's org token, the app's deploy token). Unless "
        "`stage` is true, a release of the running image rolls the machines onto them",
        models.SecretsChanged, request=SetSecrets, errors=(400, 403, 404, 503),
        max_body=SET_MAX_BODY,
        description="Values are encrypted at rest under the org's data key, which a master key "
        "outside the database wraps. Machines get them as environment variables when they "
        "start; no API answer carries a value.",
        response_description="The new version, and the release that rolls the machines",
    ),
    Route(
        "POST", "/apps/{app}/secrets/unset", unset_secrets, "unsetSecrets",
        "Unset secrets of an app (as for setSecrets; absent names are ignored)",
        models.SecretsChanged, request=UnsetSecrets, errors=(400, 403, 404, 503),
        response_description="The new version, and the release that rolls the machines",
    ),
    Route(
        "POST", "/secrets/rotate-key", rotate_key, "rotateSecretsKey",
        "Admin: read the master keys again and wrap every org's data key with the newest "
        "(values are not re-encrypted; nothing stops)", models.KeyRotation,
        errors=(403, 503), response_description="How many data keys were wrapped anew",
    ),
    Route(
        "POST", "/agent/machines/{machine_id}/secrets", machine_secrets, "agentMachineSecrets",
        "The environment of a machine an agent is starting: its release's plain variables, and "
        "its secrets for an agent token only (the machine desired started, state starting, at "
        "the generation it names)", models.MachineSecretValues,
        request=MachineSecretsRequest, errors=(400, 403, 404, 503),
        response_description="The machine's secret environment variables",
    ),
]  # fmt: skip
