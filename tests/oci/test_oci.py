"""The pure vocabulary: digests, names and manifest validation (property tests)."""

from __future__ import annotations

import hashlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from skyreg.oci import mediatypes as mt
from skyreg.oci.digest import Digest, digest_of
from skyreg.oci.errors import ErrorCode, RegistryError
from skyreg.oci.manifest import MAX_MANIFEST_SIZE, parse_manifest
from skyreg.oci.names import NAME_RE, validate_name, validate_tag

component = st.from_regex(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*", fullmatch=True)


@given(st.binary())
def test_digest_round_trips_through_text(data: bytes) -> None:
    d = digest_of(data)
    assert Digest.parse(str(d)) == d
    assert d.hex == hashlib.sha256(data).hexdigest()


@given(st.text(max_size=80))
def test_digest_parse_accepts_only_well_formed(text: str) -> None:
    try:
        d = Digest.parse(text)
    except RegistryError as e:
        assert e.code is ErrorCode.DIGEST_INVALID
    else:
        assert str(d) == text


@given(st.lists(component, min_size=1, max_size=4))
def test_valid_names_are_accepted(parts: list[str]) -> None:
    name = "/".join(parts)
    if len(name) <= 255:
        assert validate_name(name) == name


@given(st.text(max_size=60))
def test_names_outside_grammar_are_name_invalid(text: str) -> None:
    if NAME_RE.match(text) and len(text) <= 255:
        assert validate_name(text) == text
    else:
        with pytest.raises(RegistryError) as info:
            validate_name(text)
        assert info.value.code is ErrorCode.NAME_INVALID


@pytest.mark.parametrize("tag", ["latest", "v1.2.3", "_x", "A" * 128])
def test_valid_tags(tag: str) -> None:
    assert validate_tag(tag) == tag


@pytest.mark.parametrize("tag", ["", ".x", "-x", "A" * 129, "a/b", "a:b"])
def test_invalid_tags(tag: str) -> None:
    with pytest.raises(RegistryError) as info:
        validate_tag(tag)
    assert info.value.code is ErrorCode.TAG_INVALID


def _desc(data: bytes, media_type: str = "application/octet-stream") -> dict[str, object]:
    return {"mediaType": media_type, "digest": str(digest_of(data)), "size": len(data)}


def test_image_manifest_references_and_subject() -> None:
    subject = _desc(b"s", mt.OCI_MANIFEST)
    raw = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": mt.OCI_MANIFEST,
            "config": _desc(b"c", "application/vnd.oci.image.config.v1+json"),
            "layers": [_desc(b"l1"), {**_desc(b"l2"), "urls": ["https://x"]}],
            "subject": subject,
        }
    ).encode()
    m = parse_manifest(raw, mt.OCI_MANIFEST, digest_of(raw))
    assert m.raw == raw
    assert [str(d.digest) for d in m.required_blobs()] == [
        str(digest_of(b"c")),
        str(digest_of(b"l1")),
    ]
    assert m.subject is not None and str(m.subject.digest) == subject["digest"]
    assert m.referrer_artifact_type() == "application/vnd.oci.image.config.v1+json"


def test_media_type_from_field_when_content_type_is_generic() -> None:
    raw = json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": []}).encode()
    assert parse_manifest(raw, "application/json", digest_of(raw)).is_index


@pytest.mark.parametrize("content_type", [mt.DOCKER_SCHEMA1_SIGNED, "text/plain"])
def test_unsupported_manifest_types_are_invalid(content_type: str) -> None:
    raw = b'{"schemaVersion": 1}'
    with pytest.raises(RegistryError) as info:
        parse_manifest(raw, content_type, digest_of(raw))
    assert info.value.code is ErrorCode.MANIFEST_INVALID


def test_oversized_manifest_is_size_invalid_413() -> None:
    raw = b" " * (MAX_MANIFEST_SIZE + 1)
    with pytest.raises(RegistryError) as info:
        parse_manifest(raw, mt.OCI_MANIFEST, digest_of(raw))
    assert info.value.status == 413
    assert json.loads(info.value.body())["errors"][0]["code"] == "SIZE_INVALID"


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_crash_validation(raw: bytes) -> None:
    try:
        parse_manifest(raw, mt.OCI_MANIFEST, digest_of(raw))
    except RegistryError as e:
        assert e.code in (ErrorCode.MANIFEST_INVALID, ErrorCode.MANIFEST_TOO_LARGE)


def test_accept_parsing() -> None:
    assert mt.parse_accept([]) is None
    assert mt.parse_accept(["*/*"]) is None
    assert mt.parse_accept([f"{mt.OCI_MANIFEST};q=0.9, {mt.OCI_INDEX}"]) == {
        mt.OCI_MANIFEST,
        mt.OCI_INDEX,
    }
