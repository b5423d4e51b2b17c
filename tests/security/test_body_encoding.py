"""A body the client mis-encodes is the client's error (4xx), on every kind of endpoint.

SECURITY.md: "bad input of any shape is a 4xx, never a 500".
"""

from __future__ import annotations

from pathlib import Path

import requests

from tests.support.inprocess import InProcessRegistry
from tests.support.platform import Tenancy

NOT_GZIP = b"this body says gzip and is not"


def test_a_body_that_is_not_in_its_content_encoding_is_refused_clearly(tmp_path: Path) -> None:
    reg = InProcessRegistry(data_dir=tmp_path / "data")
    reg.start()
    try:
        t = Tenancy(reg.data_dir)
        t.org("acme")
        t.app("web", "acme")
        auth = ("x", t.admin_secret())
        gz = {"Content-Encoding": "gzip"}
        answers = {
            "manifest": requests.put(
                f"{reg.url}/v2/web/manifests/v1",
                data=NOT_GZIP,
                auth=auth,
                headers={**gz, "Content-Type": "application/vnd.oci.image.manifest.v1+json"},
            ),
            "upload": requests.post(
                f"{reg.url}/v2/web/blobs/uploads/?digest=sha256:{'0' * 64}",
                data=NOT_GZIP,
                auth=auth,
                headers={**gz, "Content-Type": "application/octet-stream"},
            ),
            "api": requests.post(
                f"{reg.url}/api/v1/orgs",
                data=NOT_GZIP,
                auth=auth,
                headers={**gz, "Content-Type": "application/json"},
            ),
        }
        for what, r in answers.items():
            assert 400 <= r.status_code < 500, (what, r.status_code, r.text)
        assert "Traceback" not in reg.log()
        # Nothing was stored by the refused manifest.
        assert requests.get(f"{reg.url}/v2/web/manifests/v1", auth=auth).status_code == 404
    finally:
        reg.stop()
