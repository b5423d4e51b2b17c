"""SPDX and CycloneDX documents: valid against their schemas, complete, bounded, deterministic."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import cyclonedx.schema
import jsonschema
import pytest
from packageurl import PackageURL
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7
from spdx_tools.spdx.parser.jsonlikedict.json_like_dict_parser import JsonLikeDictParser
from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document

from skyreg.scan import sbom
from skyreg.scan.model import ImageIndex, OsRelease, Package
from skyreg.scan.sbom import SbomError, cyclonedx_json, spdx_json

NAME = "library/debian"
DIGEST = "sha256:" + "c" * 64
LAYER_A = "sha256:" + "a" * 64
LAYER_B = "sha256:" + "b" * 64
CREATED = datetime(2026, 1, 2, 3, 4, 5, 678, tzinfo=UTC)
DEBIAN = OsRelease(id="debian", version_id="12", pretty_name="Debian GNU/Linux 12 (bookworm)")


def deb(name: str, version: str, licenses: tuple[str, ...] = (), **kw: Any) -> Package:
    purl = PackageURL("deb", "debian", name, version, {"arch": "amd64", "distro": "debian-12"})
    fields: dict[str, Any] = {
        "name": name,
        "version": version,
        "type": "deb",
        "purl": purl.to_string(),
        "layer": LAYER_A,
        "path": "var/lib/dpkg/status",
        "arch": "amd64",
        "licenses": licenses,
    }
    return Package(**(fields | kw))


def pypi(name: str, version: str, licenses: tuple[str, ...] = ()) -> Package:
    return Package(
        name=name,
        version=version,
        type="pypi",
        purl=PackageURL("pypi", None, name, version).to_string(),
        layer=LAYER_B,
        path=f"usr/lib/python3/dist-packages/{name}-{version}.dist-info/METADATA",
        licenses=licenses,
    )


def npm(name: str, version: str) -> Package:
    return Package(
        name=name,
        version=version,
        type="npm",
        purl=PackageURL("npm", None, name, version).to_string(),
        layer=LAYER_B,
        path=f"app/node_modules/{name}/package.json",
    )


def golang(module: str, version: str) -> Package:
    namespace, name = module.rsplit("/", 1)
    return Package(
        name=module,
        version=version,
        type="golang",
        purl=PackageURL("golang", namespace, name, version).to_string(),
        layer=LAYER_B,
        path="usr/local/bin/app",
    )


PACKAGES = (
    deb("openssl", "3.0.11-1~deb12u2", ("Apache-2.0",), source="openssl"),
    deb("libc6", "2.36-9+deb12u4", ("LGPL-2.1-or-later", "GPL-2.0-or-later"), source="glibc"),
    deb("bash", "5.2.15-2+b2", ("GPL-3+",)),  # a Debian copyright short name, not SPDX
    pypi("requests", "2.31.0", ("Apache-2.0",)),
    pypi("weird", "1.0", ("Apache 2.0 or whatever (see file)",)),
    npm("lodash", "4.17.20"),
    golang("golang.org/x/net", "v0.17.0"),
)
INDEX = ImageIndex(os=DEBIAN, packages=PACKAGES, files=())


# SPDX 2.3's JSON schema has both; spdx-tools writes the underscore.
MANAGER = ("PACKAGE-MANAGER", "PACKAGE_MANAGER")


def parse_spdx(data: bytes) -> Any:
    doc = json.loads(data)
    # The whole document at once (sbom.py validates it in parts): the two must agree.
    messages = validate_full_spdx_document(JsonLikeDictParser().parse(doc), "SPDX-2.3")
    assert messages == []
    return doc


def cyclonedx_schema() -> jsonschema.Draft7Validator:
    """The CycloneDX 1.6 JSON schema shipped inside cyclonedx-python-lib, with its references."""
    res = Path(cyclonedx.schema.__file__).parent / "_res"
    registry: Registry[Any] = Registry()
    for file in ("spdx.SNAPSHOT.schema.json", "jsf-0.82.SNAPSHOT.schema.json"):
        contents = json.loads((res / file).read_text())
        resource = Resource.from_contents(contents, default_specification=DRAFT7)
        registry = registry.with_resource(f"http://cyclonedx.org/schema/{file}", resource)
    schema = json.loads((res / "bom-1.6.SNAPSHOT.schema.json").read_text())
    return jsonschema.Draft7Validator(schema, registry=registry)


def parse_cyclonedx(data: bytes) -> Any:
    doc = json.loads(data)
    errors = sorted(cyclonedx_schema().iter_errors(doc), key=str)
    assert errors == [], errors[0].message if errors else ""
    return doc


def test_artifact_types() -> None:
    assert sbom.SPDX_ARTIFACT_TYPE == "application/spdx+json"
    assert sbom.CYCLONEDX_ARTIFACT_TYPE == "application/vnd.cyclonedx+json"


def test_spdx_describes_the_image_and_every_package() -> None:
    doc = parse_spdx(spdx_json(INDEX, NAME, DIGEST, CREATED))
    assert doc["spdxVersion"] == "SPDX-2.3"
    assert doc["creationInfo"]["created"] == "2026-01-02T03:04:05Z"
    assert DIGEST.removeprefix("sha256:") in doc["documentNamespace"]
    by_id = {p["SPDXID"]: p for p in doc["packages"]}
    image = by_id["SPDXRef-Image"]
    assert image["name"] == NAME and image["versionInfo"] == DIGEST
    assert image["checksums"] == [{"algorithm": "SHA256", "checksumValue": "c" * 64}]
    assert image["primaryPackagePurpose"] == "CONTAINER"
    [image_purl] = [r["referenceLocator"] for r in image["externalRefs"]]
    assert PackageURL.from_string(image_purl).type == "oci"
    assert PackageURL.from_string(image_purl).version == DIGEST
    os = by_id["SPDXRef-OperatingSystem"]
    assert (os["name"], os["versionInfo"], os["primaryPackagePurpose"]) == (
        "debian",
        "12",
        "OPERATING_SYSTEM",  # the SPDX 2.3 JSON schema's spelling, as spdx-tools writes it
    )
    rels = {
        (r["spdxElementId"], r["relationshipType"], r["relatedSpdxElement"])
        for r in doc["relationships"]
    }
    assert ("SPDXRef-DOCUMENT", "DESCRIBES", "SPDXRef-Image") in rels
    members = [p for p in doc["packages"] if p["SPDXID"].startswith("SPDXRef-Package-")]
    assert len(members) == len(PACKAGES)
    purls = {
        r["referenceLocator"]
        for p in members
        for r in p["externalRefs"]
        if r["referenceCategory"] in MANAGER and r["referenceType"] == "purl"
    }
    assert purls == {p.purl for p in PACKAGES}
    for p in members:
        assert ("SPDXRef-Image", "CONTAINS", p["SPDXID"]) in rels
        assert p["sourceInfo"].startswith("layer sha256:")
    by_name = {p["name"]: p for p in members}
    assert by_name["libc6"]["licenseDeclared"] == "LGPL-2.1-or-later AND GPL-2.0-or-later"
    assert by_name["libc6"]["versionInfo"] == "2.36-9+deb12u4"
    assert "/var/lib/dpkg/status" in by_name["libc6"]["sourceInfo"]
    assert "glibc" in by_name["libc6"]["sourceInfo"]
    # Not SPDX identifiers: NOASSERTION, and the words kept in a comment.
    assert by_name["bash"]["licenseDeclared"] == "NOASSERTION"
    assert "GPL-3+" in by_name["bash"]["licenseComments"]
    assert by_name["weird"]["licenseDeclared"] == "NOASSERTION"


def test_cyclonedx_describes_the_image_and_every_package() -> None:
    doc = parse_cyclonedx(cyclonedx_json(INDEX, NAME, DIGEST, CREATED))
    assert doc["specVersion"] == "1.6"
    assert doc["metadata"]["timestamp"] == "2026-01-02T03:04:05Z"
    image = doc["metadata"]["component"]
    assert (image["type"], image["name"], image["version"]) == ("container", NAME, DIGEST)
    purl = PackageURL.from_string(image["purl"])
    assert (purl.type, purl.name, purl.version) == ("oci", "debian", DIGEST)
    assert purl.qualifiers == {"repository_url": NAME}
    [os] = [c for c in doc["components"] if c["type"] == "operating-system"]
    assert (os["name"], os["version"]) == ("debian", "12")
    libraries = [c for c in doc["components"] if c["type"] == "library"]
    assert {c["purl"] for c in libraries} == {p.purl for p in PACKAGES}
    refs = [c["bom-ref"] for c in doc["components"]]
    assert len(set(refs)) == len(refs)
    by_name = {c["name"]: c for c in libraries}
    props = {p["name"]: p["value"] for p in by_name["openssl"]["properties"]}
    assert props["skyreg:layer:digest"] == LAYER_A
    assert props["skyreg:path"] == "var/lib/dpkg/status"
    assert by_name["openssl"]["licenses"] == [{"expression": "Apache-2.0"}]
    assert by_name["bash"]["licenses"] == [{"license": {"name": "GPL-3+"}}]
    assert "licenses" not in by_name["lodash"]
    deps = {d["ref"]: d.get("dependsOn", []) for d in doc["dependencies"]}
    assert deps["image"][0] == "os"
    os_packages = {by_name[n]["bom-ref"] for n in ("openssl", "libc6", "bash")}
    assert set(deps["os"]) == os_packages
    assert set(deps["image"]) == {"os"} | {c["bom-ref"] for c in libraries} - os_packages
    assert set(deps) == {"image", *refs}


def test_without_os_or_packages() -> None:
    empty = ImageIndex(os=None, packages=(), files=())
    doc = parse_spdx(spdx_json(empty, NAME, DIGEST, CREATED))
    assert [p["SPDXID"] for p in doc["packages"]] == ["SPDXRef-Image"]
    cdx = parse_cyclonedx(cyclonedx_json(empty, NAME, DIGEST, CREATED))
    assert cdx["components"] == []
    no_os = ImageIndex(os=None, packages=PACKAGES, files=())
    cdx = parse_cyclonedx(cyclonedx_json(no_os, NAME, DIGEST, CREATED))
    assert len(cdx["components"]) == len(PACKAGES)
    parse_spdx(spdx_json(no_os, NAME, DIGEST, CREATED))


def test_deterministic_whatever_the_order() -> None:
    shuffled = [*PACKAGES, PACKAGES[0]]  # a duplicate record is one package
    random.Random(7).shuffle(shuffled)
    other = ImageIndex(os=DEBIAN, packages=tuple(shuffled), files=())
    for render in (spdx_json, cyclonedx_json):
        first = render(INDEX, NAME, DIGEST, CREATED)
        assert render(INDEX, NAME, DIGEST, CREATED) == first
        assert render(other, NAME, DIGEST, CREATED) == first
        # The same instant in another zone, with microseconds: the same document.
        later = CREATED.astimezone(timezone(timedelta(hours=5))) + timedelta(microseconds=1)
        assert render(INDEX, NAME, DIGEST, later) == first
        assert render(INDEX, NAME, "sha256:" + "d" * 64, CREATED) != first


def test_many_packages_across_validation_parts() -> None:
    packages = tuple(pypi(f"p{i}", f"1.{i}", ("MIT",)) for i in range(300))
    index = ImageIndex(os=DEBIAN, packages=packages, files=())
    spdx = json.loads(spdx_json(index, NAME, DIGEST, CREATED))
    assert len(spdx["packages"]) == 302
    cdx = json.loads(cyclonedx_json(index, NAME, DIGEST, CREATED))
    assert len(cdx["components"]) == 301


HOSTILE = "a\x00b\x1b[31mc\nd\x7f\x85e\ud800"


@pytest.mark.parametrize(
    "package",
    [
        Package(
            name=HOSTILE,
            version=HOSTILE,
            type="pypi",
            purl=f"pkg:pypi/{HOSTILE}@{HOSTILE}",
            layer=LAYER_B,
            path=HOSTILE,
            licenses=(HOSTILE,),
        ),
        pypi("x" * 100 * 1024, "1" * 100 * 1024, ("MIT " * 25_000,)),
        deb("ok", "1.0", path=HOSTILE * 10_000, layer=HOSTILE, source=HOSTILE, arch=HOSTILE),
        Package(
            name="nopurl", version="1", type="pypi", purl="not a purl", layer=LAYER_A, path="x"
        ),
        Package(name="", version="", type="pypi", purl="", layer="", path=""),
        Package(
            name="q", version="1", type="deb", purl="pkg:deb/" + "q" * 200_000, layer="", path=""
        ),
    ],
    ids=["control-characters", "100KiB", "hostile-fields", "bad-purl", "empty", "huge-purl"],
)
def test_hostile_strings_still_give_valid_bounded_documents(package: Package) -> None:
    os = OsRelease(id=HOSTILE, version_id=HOSTILE * 1000, pretty_name=HOSTILE)
    index = ImageIndex(os=os, packages=(package, PACKAGES[0]), files=())
    for data, parse in (
        (spdx_json(index, NAME, DIGEST, CREATED), parse_spdx),
        (cyclonedx_json(index, NAME, DIGEST, CREATED), parse_cyclonedx),
    ):
        assert len(data) < 200_000
        text = data.decode("utf-8")  # strict: no lone surrogates
        assert "\\u0000" not in text and "\x00" not in text and "\\u001b" not in text
        parse(data)


def test_bad_arguments_are_sbom_errors() -> None:
    for digest in ("sha256:abc", "md5:" + "0" * 32, "", "sha256:" + "C" * 64):
        with pytest.raises(SbomError):
            spdx_json(INDEX, NAME, digest, CREATED)
        with pytest.raises(SbomError):
            cyclonedx_json(INDEX, NAME, digest, CREATED)
    for name in ("", "a\nb", "x" * 100_000):
        with pytest.raises(SbomError):
            spdx_json(INDEX, name, DIGEST, CREATED)


def test_invalid_document_raises_sbom_error() -> None:
    doc = json.loads(cyclonedx_json(INDEX, NAME, DIGEST, CREATED))
    doc["components"][-1]["type"] = "not-a-type"
    with pytest.raises(SbomError, match="CycloneDX document invalid"):
        sbom._validate_cyclonedx(doc)
    many = ImageIndex(os=DEBIAN, packages=tuple(pypi(f"p{i}", "1") for i in range(200)), files=())
    document, parts = sbom._spdx_document(sbom._image(many, NAME, DIGEST, CREATED))
    assert len(parts) > 2
    parts[-1].packages[-1].version = None  # a part other than the first must be checked too
    parts[-1].packages[-1].download_location = "not a location"
    with pytest.raises(SbomError, match="SPDX document invalid"):
        sbom._validate_spdx(document, parts)
    document.packages.append(document.packages[-1])
    with pytest.raises(SbomError, match="duplicate"):
        sbom._validate_spdx(document, parts[:1])
    doc = json.loads(cyclonedx_json(INDEX, NAME, DIGEST, CREATED))
    doc["components"].append(doc["components"][0])
    with pytest.raises(SbomError, match="duplicate"):
        sbom._validate_cyclonedx(doc)


def test_naive_created_is_utc() -> None:
    naive = CREATED.replace(tzinfo=None)
    assert spdx_json(INDEX, NAME, DIGEST, naive) == spdx_json(INDEX, NAME, DIGEST, CREATED)
