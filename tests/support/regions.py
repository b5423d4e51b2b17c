"""Several regions on one machine: a `skyreg serve --region CODE` node per region, each with its
own data dir (its blob directory) under `top`, over one SQLite metadata database; iad's admin
token is every node's peer token. Used by tests/geo/test_regions.py and test_geo_gc.py."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from tests.support.servers import RunningRegistry
from tests.support.waiting import free_ports

# Every table that may hold a row about a blob, and the column naming it.
BLOB_TABLES = {
    "blobs": "digest",
    "repository_blobs": "digest",
    "blob_regions": "digest",
    "replication_jobs": "digest",
    "manifest_references": "child_digest",
    "gc_blob_reviews": "digest",
    "gc_blob_deletions": "digest",
}


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _metric_value(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name):
            return float(line.rsplit(" ", 1)[1])
    return None


@dataclass
class Regions:
    """The nodes of `ports`' regions (iad first: it creates the admin token), started by `start`.

    `rtt_ms` goes into regions.json; `peer_urls` too (rewritten by `write_regions`, which nodes
    re-read at once); `extra_args` are every node's further `serve` flags; `storage` a region's
    own blob store when not its data dir: (serve arguments, environment).

    `log` and `metric` count from `mark` (a node started since counts from its start), so that
    nodes shared by several tests answer each test as fresh ones would; without a mark, from
    the nodes' start.
    """

    top: Path
    ports: dict[str, int]
    rtt_ms: dict[tuple[str, str], int] = field(default_factory=dict)
    extra_args: list[str] = field(default_factory=list)
    peer_urls: dict[str, dict[str, str]] = field(default_factory=dict)
    nodes: dict[str, RunningRegistry] = field(default_factory=dict)
    storage: dict[str, tuple[list[str], dict[str, str]]] = field(default_factory=dict)
    _log_marks: dict[str, int] = field(default_factory=dict)
    _metric_marks: dict[str, str] = field(default_factory=dict)

    @classmethod
    def on_free_ports(cls, top: Path, codes: Iterable[str], **kw: Any) -> Regions:
        codes = list(codes)
        return cls(top=top, ports=dict(zip(codes, free_ports(len(codes)), strict=True)), **kw)

    @property
    def codes(self) -> list[str]:
        return list(self.ports)

    @property
    def admin(self) -> str:
        return (self.top / "iad" / "data" / "admin-token").read_text().strip()

    def write_regions(self) -> None:
        regions: dict[str, Any] = {
            code: {"url": f"http://127.0.0.1:{port}", "rtt_ms": {}}
            for code, port in self.ports.items()
        }
        for (a, b), rtt in self.rtt_ms.items():
            regions[a]["rtt_ms"][b] = rtt
        for code, peers in self.peer_urls.items():
            regions[code]["peer_urls"] = peers
        path = self.top / "regions.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"regions": regions}))
        os.replace(tmp, path)

    def node(self, code: str) -> RunningRegistry:
        args, env = self.storage.get(code, ([], {}))
        node = RunningRegistry(
            data_dir=self.top / code / "data",
            extra_args=[
                "--database-url", f"sqlite:///{self.top / 'meta.db'}",
                "--region", code,
                "--regions-file", str(self.top / "regions.json"),
                "--peer-token-file", str(self.top / "iad" / "data" / "admin-token"),
                *self.extra_args,
                *args,
            ],
            env=env,
        )  # fmt: skip
        node.port = self.ports[code]
        (self.top / code).mkdir(exist_ok=True)
        return node

    def start(self, code: str) -> RunningRegistry:
        node = self.nodes.get(code) or self.node(code)
        self.nodes[code] = node
        node.start()
        self._metric_marks.pop(code, None)  # a new process: its counters start at zero
        return node

    def start_all(self) -> None:
        for code in self.codes:
            self.start(code)

    def running(self, code: str) -> bool:
        node = self.nodes.get(code)
        return node is not None and node.proc is not None and node.proc.poll() is None

    def stop_all(self) -> None:
        for node in self.nodes.values():
            node.stop()

    def mark(self) -> None:
        """From now on, `log` and `metric` count only what running nodes do from here."""
        for code, node in self.nodes.items():
            self._log_marks[code] = len(node.log())
            if self.running(code):
                self._metric_marks[code] = self._metrics(code)

    def url(self, code: str) -> str:
        return f"http://127.0.0.1:{self.ports[code]}"

    def api(self, code: str, method: str, path: str, **kw: Any) -> Any:
        r = requests.request(
            method, f"{self.url(code)}/api/v1{path}", auth=("x", self.admin), timeout=60, **kw
        )
        assert r.status_code < 400, (method, path, r.status_code, r.text)
        return r.json()

    def put_blob(self, code: str, repo: str, data: bytes) -> str:
        digest = sha256(data)
        r = requests.post(
            f"{self.url(code)}/v2/{repo}/blobs/uploads/",
            params={"digest": digest},
            data=data,
            auth=("x", self.admin),
            headers={"Content-Type": "application/octet-stream"},
            timeout=120,
        )
        assert r.status_code == 201, r.text
        return digest

    def get_blob(self, code: str, repo: str, digest: str, **headers: str) -> requests.Response:
        return requests.get(
            f"{self.url(code)}/v2/{repo}/blobs/{digest}",
            auth=("x", self.admin),
            headers=headers,
            timeout=120,
        )

    def push_image(
        self, code: str, repo: str, tag: str, layers: list[bytes]
    ) -> tuple[str, list[str]]:
        """Push config + layers and a manifest tagged `tag` to `code`: (manifest digest, blobs)."""
        config = json.dumps({"architecture": "amd64", "os": "linux", "tag": tag}).encode()
        blobs = [config, *layers]
        digests = [self.put_blob(code, repo, b) for b in blobs]
        descriptors = [{"digest": d, "size": len(b)} for d, b in zip(digests, blobs, strict=True)]
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    **descriptors[0],
                },
                "layers": [
                    {"mediaType": "application/vnd.oci.image.layer.v1.tar", **d}
                    for d in descriptors[1:]
                ],
            }
        ).encode()
        r = requests.put(
            f"{self.url(code)}/v2/{repo}/manifests/{tag}",
            data=manifest,
            auth=("x", self.admin),
            headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
            timeout=60,
        )
        assert r.status_code == 201, r.text
        return sha256(manifest), digests

    def delete_manifest(self, code: str, repo: str, reference: str) -> None:
        r = requests.delete(
            f"{self.url(code)}/v2/{repo}/manifests/{reference}",
            auth=("x", self.admin),
            timeout=60,
        )
        assert r.status_code == 202, r.text

    def image(self, code: str, app: str, ref: str) -> dict[str, Any]:
        return dict(self.api(code, "GET", f"/apps/{app}/images/{ref}"))

    def log(self, code: str) -> str:
        """What `code`'s node logged (its access log too) since the mark."""
        return self.nodes[code].log()[self._log_marks.get(code, 0) :]

    def peer_fetches(self, code: str, digest: str) -> int:
        """Blob GETs `code`'s node answered for other regions' nodes (its access log)."""
        return sum(
            1
            for line in self.log(code).splitlines()
            if f"/blobs/{digest}" in line and "GET" in line
        )

    def _metrics(self, code: str) -> str:
        return requests.get(f"{self.url(code)}/metrics", auth=("x", self.admin), timeout=10).text

    def metric(self, code: str, name: str) -> float:
        """The first sample of `code`'s node whose line starts with `name`, counted from the
        mark (a counter: what it grew by since)."""
        text = self._metrics(code)
        value = _metric_value(text, name)
        if value is None:
            raise AssertionError(f"no {name} in {text}")
        base = _metric_value(self._metric_marks.get(code, ""), name)
        return value - (base or 0.0)

    def stored(self, code: str, digest: str) -> Path:
        """Where `code`'s store keeps `digest` (it may not exist)."""
        hexa = digest.split(":", 1)[1]
        return self.top / code / "data" / "blobs" / "sha256" / hexa[:2] / hexa

    def uploads(self, code: str) -> list[Path]:
        """What `code`'s store holds of uploads under way (files; none once all ended)."""
        root = self.top / code / "data" / "uploads"
        return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []

    def rows(self, digest: str) -> dict[str, int]:
        """Rows naming `digest`, per table (tables with none left out)."""
        found: dict[str, int] = {}
        with closing(sqlite3.connect(self.top / "meta.db", timeout=30)) as db:
            for table, column in BLOB_TABLES.items():
                (n,) = db.execute(
                    f"SELECT count(*) FROM {table} WHERE {column} = ?",
                    (digest,),
                ).fetchone()
                if n:
                    found[table] = int(n)
        return found

    def copies(self, digest: str) -> set[str]:
        with closing(sqlite3.connect(self.top / "meta.db", timeout=30)) as db:
            return {
                str(r[0])
                for r in db.execute("SELECT region FROM blob_regions WHERE digest = ?", (digest,))
            }

    def manifest_exists(self, digest: str) -> bool:
        with closing(sqlite3.connect(self.top / "meta.db", timeout=30)) as db:
            (n,) = db.execute(
                "SELECT count(*) FROM manifests WHERE digest = ?", (digest,)
            ).fetchone()
        return bool(n)

    def gone(self, digest: str) -> bool:
        """No region's store holds `digest` and no row names it."""
        return not any(self.stored(c, digest).exists() for c in self.codes) and not self.rows(
            digest
        )


@contextmanager
def running_regions(top: Path, codes: Iterable[str], **kw: Any) -> Iterator[Regions]:
    """The regions' nodes on free ports under `top` (`Regions` fields in `kw`), started with
    org acme and its app web, stopped afterwards (also on failure)."""
    r = Regions.on_free_ports(top, codes, **kw)
    r.write_regions()
    try:
        r.start_all()
        r.api("iad", "POST", "/orgs", json={"name": "acme"})
        r.api("iad", "POST", "/apps", json={"name": "web", "org": "acme"})
        yield r
    finally:
        r.stop_all()
