"""One image-reference parser (`skyreg.oci.reference`) for push, deploy and `images show`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from hypothesis import assume, given
from hypothesis import strategies as st

from skyreg.client.push import PushError
from skyreg.client.push import parse_reference as parse_push_target
from skyreg.oci.reference import MAX_REFERENCE_LENGTH, ImageReference, parse_reference
from tests.support.inprocess import InProcessRegistry
from tests.support.oci import Image, push_image
from tests.support.platform import Tenancy, cli_env, run_skyreg
from tests.support.servers import ServedRegistry

SHA256 = "sha256:" + "0123456789abcdef" * 4
SHA512 = "sha512:" + "0123456789abcdef" * 8

VALID: list[tuple[str, tuple[str | None, str, str | None, str | None]]] = [
    ("app", (None, "app", None, None)),
    ("app:v1", (None, "app", "v1", None)),
    ("app/web:v1.2-rc_3", (None, "app/web", "v1.2-rc_3", None)),
    ("a__b/c--d/e.f_g", (None, "a__b/c--d/e.f_g", None, None)),
    ("app:_x", (None, "app", "_x", None)),
    ("app:V1", (None, "app", "V1", None)),
    (f"app@{SHA256}", (None, "app", None, SHA256)),
    (f"app:v1@{SHA512}", (None, "app", "v1", SHA512)),
    ("localhost/app", ("localhost", "app", None, None)),
    ("localhost:5000/app:v1", ("localhost:5000", "app", "v1", None)),
    ("localhost:5000", (None, "localhost", "5000", None)),  # no slash: a name and a tag
    (f"127.0.0.1:5000/app@{SHA256}", ("127.0.0.1:5000", "app", None, SHA256)),
    (
        "registry.example.com:5000/app/api:v1.2",
        ("registry.example.com:5000", "app/api", "v1.2", None),
    ),
    ("[::1]:5000/app:v1", ("[::1]:5000", "app", "v1", None)),
    ("[fe80::1]/a", ("[fe80::1]", "a", None, None)),
    ("Registry/app", ("Registry", "app", None, None)),  # uppercase: a host, as docker reads it
    ("host.io/a.b/c:t", ("host.io", "a.b/c", "t", None)),
    ("app:" + "t" * 128, (None, "app", "t" * 128, None)),
    ("a" * 255, (None, "a" * 255, None, None)),
    ("h.io/" + "a" * 250, ("h.io", "a" * 250, None, None)),
]


@pytest.mark.parametrize(("text", "parts"), VALID)
def test_valid_references_parse_into_their_parts_and_print_back(
    text: str, parts: tuple[str | None, str, str | None, str | None]
) -> None:
    ref = parse_reference(text)
    assert (ref.host, ref.repository, ref.tag, ref.digest) == parts
    assert str(ref) == text
    assert ref == ImageReference(*parts)


INVALID: list[tuple[str, str]] = [
    ("", "empty image reference"),
    ("a" * (MAX_REFERENCE_LENGTH + 1), "at most"),
    ("a" * 1_000_000, "at most"),
    ("a" * 256, "at most 255"),
    ("h.io/" + "a" * 251, "at most 255"),
    ("app:" + "t" * 129, "invalid tag"),
    ("app\x00:v1", "invalid repository name"),
    ("app:v1\x00", "invalid tag"),
    ("\x00", "invalid repository name"),
    ("app\n", "invalid repository name"),
    ("app\n:v1", "invalid repository name"),
    ("app:v1\n", "invalid tag"),
    (f"app:v1\n@{SHA256}", "invalid tag"),
    ("ápp:v1", "invalid repository name"),
    ("app:v\uff11", "invalid tag"),  # a fullwidth digit: \w in Python, not in the grammar
    ("app:vé", "invalid tag"),
    ("h\u0131.io/app", "invalid registry host"),
    ("../app", "invalid registry host"),
    ("app/../x", "invalid repository name"),
    ("app/..", "invalid repository name"),
    ("..", "invalid repository name"),
    ("app/./x", "invalid repository name"),
    ("App:v1", "invalid repository name"),
    ("host.io/App", "invalid repository name"),
    (":", "empty tag"),
    (":v1", "no repository name"),
    ("@", "empty digest"),
    ("app:", "empty tag"),
    ("app@", "empty digest"),
    ("/app", "invalid repository name"),
    ("app/", "invalid repository name"),
    ("a//b", "invalid repository name"),
    ("host.io/", "no repository name"),
    ("host:5000/", "no repository name"),
    ("host:99999/app", "invalid port"),
    ("host:/app", "invalid registry host"),
    ("ho_st.io/app", "invalid registry host"),
    ("-host.io/app", "invalid registry host"),
    ("[::1/app", "invalid registry host"),
    ("docker://host.io/app", "invalid registry host"),
    (" app", "invalid repository name"),
    ("app :v1", "invalid repository name"),
    ("app:v 1", "invalid tag"),
    ("app:-v1", "invalid tag"),
    ("app:.v1", "invalid tag"),
    ("app:v1:v2", "invalid repository name"),
    ("a-/b", "invalid repository name"),
    ("app@sha256:12", "invalid sha256 digest"),
    ("app@sha256:" + "A" * 64, "invalid sha256 digest"),
    ("app@md5:" + "0" * 32, "unsupported digest algorithm"),
    (f"app@{SHA256}@{SHA256}", "invalid digest"),
    (f"app@{SHA256}:v1", "invalid digest"),
]


@pytest.mark.parametrize(("text", "message"), INVALID)
def test_invalid_references_are_refused_with_a_clear_message(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        parse_reference(text)
    assert len(str(caught.value)) < 400  # hostile input is quoted cut short, never echoed whole


def test_constructing_an_invalid_reference_is_refused() -> None:
    with pytest.raises(ValueError, match="invalid repository name"):
        ImageReference(None, "App")
    with pytest.raises(ValueError, match="invalid tag"):
        ImageReference("host.io", "app", tag="-x")
    with pytest.raises(ValueError, match="invalid sha256 digest"):
        ImageReference("host.io", "app", digest="sha256:1")


def test_helpers_give_what_a_registry_is_asked_for() -> None:
    ref = parse_reference(f"host.io/app:v1@{SHA256}")
    assert ref.name == "host.io/app"
    assert ref.reference == SHA256
    assert ref.registry_host() == "host.io"
    assert ref.with_default_tag() == ref
    assert ref.for_pull() == ImageReference("host.io", "app", None, SHA256)
    bare = parse_reference("app")
    assert bare.reference == "latest"
    assert bare.with_default_tag() == ImageReference(None, "app", "latest")
    assert bare.for_pull() == ImageReference(None, "app", "latest")
    with pytest.raises(ValueError, match="names no registry host"):
        bare.registry_host()


_COMPONENT = st.from_regex(r"[a-z0-9]{1,8}(?:(?:\.|_|__|-{1,3})[a-z0-9]{1,8}){0,2}", fullmatch=True)
_LABEL = st.from_regex(r"[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,10}[a-zA-Z0-9])?", fullmatch=True)
_HOSTS = st.one_of(
    st.none(),
    st.just("localhost"),
    st.builds(".".join, st.lists(_LABEL, min_size=2, max_size=4)),
    st.builds(lambda h, p: f"{h}:{p}", _LABEL, st.integers(0, 65535)),
    st.from_regex(
        r"\[[a-fA-F0-9]{0,4}:[a-fA-F0-9:]{0,16}\](?::[0-9]{1,5})?", fullmatch=True
    ).filter(lambda h: ":" not in h.rpartition("]")[2] or int(h.rpartition(":")[2]) <= 65535),
)
_TAGS = st.one_of(st.none(), st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", fullmatch=True))
_DIGESTS = st.one_of(
    st.none(),
    st.from_regex(r"sha256:[0-9a-f]{64}", fullmatch=True),
    st.from_regex(r"sha512:[0-9a-f]{128}", fullmatch=True),
)


@given(
    host=_HOSTS,
    components=st.lists(_COMPONENT, min_size=1, max_size=5),
    tag=_TAGS,
    digest=_DIGESTS,
)
def test_generated_valid_references_round_trip(
    host: str | None, components: list[str], tag: str | None, digest: str | None
) -> None:
    repository = "/".join(components)
    # Without a host, a first component with a dot reads as a host: docker's rule, not a bug.
    assume(host is not None or len(components) == 1 or "." not in components[0])
    assume(len(repository) + (len(host) + 1 if host else 0) <= 255)
    text = (f"{host}/" if host else "") + repository
    text += (f":{tag}" if tag is not None else "") + (f"@{digest}" if digest else "")
    ref = parse_reference(text)
    assert (ref.host, ref.repository, ref.tag, ref.digest) == (host, repository, tag, digest)
    assert str(ref) == text
    assert parse_reference(str(ref)) == ref


# -- the callers ---------------------------------------------------------------------------------


def test_push_refuses_a_repository_or_tag_with_a_line_break() -> None:
    for bad in ("127.0.0.1:5000/app\n:v1", f"127.0.0.1:5000/app:v1\n@{SHA256}", "app/web:v1"):
        with pytest.raises(PushError, match="invalid image reference"):
            parse_push_target(bad)


def test_push_keeps_tag_and_digest_and_tags_latest_by_default() -> None:
    target = parse_push_target(f" docker://127.0.0.1:5000/app/web:v1@{SHA256} ")
    assert (target.host, target.repository, target.tag, target.digest) == (
        "127.0.0.1:5000",
        "app/web",
        "v1",
        SHA256,
    )
    assert parse_push_target("[::1]:5000/app").tag == "latest"


@dataclass
class Deployable:
    reg: ServedRegistry
    admin: str
    build: Image  # app1:build-1
    workdir: Path


@pytest.fixture(scope="module")
def deployable(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployable]:
    workdir = tmp_path_factory.mktemp("reference")
    reg = InProcessRegistry(data_dir=workdir / "data")
    reg.start()
    try:
        t = Tenancy(reg.data_dir)
        t.org("acme")
        t.app("app1", "acme")
        admin = t.admin_secret()
        session = requests.Session()
        session.auth = ("x", admin)
        build = push_image(reg.url, "app1", "build-1", session=session)
        yield Deployable(reg, admin, build, workdir)
    finally:
        reg.stop()


def _deploy(d: Deployable, image: str) -> requests.Response:
    return requests.post(
        f"{d.reg.url}/api/v1/apps/app1/releases",
        json={"image": image},
        auth=("x", d.admin),
        timeout=60,
    )


def test_deploy_of_tag_and_digest_pins_the_digest(deployable: Deployable) -> None:
    digest = deployable.build.digest
    r = _deploy(deployable, f"{deployable.reg.host}/app1:build-1@{digest}")
    assert r.status_code == 201, r.text
    assert r.json()["image_digest"] == digest
    assert r.json()["image_ref"] == f"{deployable.reg.host}/app1@{digest}"


def test_deploy_refuses_a_repository_with_a_line_break(deployable: Deployable) -> None:
    r = _deploy(deployable, "app1\n:build-1")
    assert r.status_code == 400, r.text
    assert "invalid repository name" in r.json()["error"]["message"]


def test_images_show_accepts_tag_and_digest(deployable: Deployable) -> None:
    env = cli_env(deployable.workdir, deployable.reg.url, deployable.admin)
    digest = deployable.build.digest
    for image in (f"app1:build-1@{digest}", f"{deployable.reg.host}/app1@{digest}", "app1:build-1"):
        shown = json.loads(run_skyreg(env, "images", "show", image, "--json"))
        assert (shown["repository"], shown["digest"]) == ("app1", digest), image
