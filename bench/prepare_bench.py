#!/usr/bin/env python3
"""Image preparation for machines: skyreg's `prepare_image` + `fresh_rootfs` side by side with
`skopeo copy` (registry -> OCI layout) + `umoci unpack` doing the same job.

A 10-layer, ~200 MB (uncompressed) image with partly compressible content is generated, pushed
into a fresh `skyreg serve --no-auth` on 127.0.0.1, and prepared:

- cold: empty layer cache / empty OCI layout (download + verify + unpack), plus a machine rootfs
  (`fresh_rootfs`: an overlay over the unpacked tree when run as root, else a copy) in a
  machine directory (what a first machine start needs);
- warm, layers cached: blobs kept, the unpacked tree removed (unpack again), plus a clone;
  anchor: `skopeo copy` into the layout that already holds the blobs + `umoci unpack`;
- warm, tree cached: nothing removed (prepare returns at once), plus a clone, and without;
- second machine: `fresh_rootfs` alone; anchor: `umoci unpack` alone from the local layout.

Each figure is the median of N runs (default 3), skyreg and the anchor alternating. The result
is checked outside the timings: both trees hold the same files with the same sizes and the same
bytes for sample files. Ratio = skyreg time / anchor time: lower is better.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import datetime
import gzip
import hashlib
import io
import json
import os
import platform
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import aiohttp
from registry_bench import stop_process  # bench/ is on sys.path when run as a script

from skyreg.client.push import push_image
from skyreg.machines.layercache import LayerCache, remove_tree
from skyreg.machines.prepare import RegistrySource, prepare_image
from skyreg.machines.rootfs import enter_private_mount_namespace, fresh_rootfs, release_rootfs
from skyreg.oci.platforms import host_architecture

MB = 1_000_000
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
REPO, TAG = "bench/app", "v1"
MTIME = 1_700_000_000
WORDS = (
    b"alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
    b"sigma tau upsilon phi chi psi omega lorem ipsum dolor sit amet consectetur adipiscing"
).split()


def log(message: str) -> None:
    print(f"[prepare-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- the image


def file_content(rng: random.Random, size: int) -> bytes:
    """About half random bytes, half text, in 64 KiB pieces: gzip does real work."""
    out = bytearray()
    while len(out) < size:
        if rng.random() < 0.5:
            out += rng.randbytes(65536)
        else:
            line = b" ".join(rng.choice(WORDS) for _ in range(12))
            out += (line + b" %d\n" % rng.randrange(10**9)) * (65536 // (len(line) + 12))
    return bytes(out[:size])


def make_layer(args: tuple[int, int, int]) -> tuple[bytes, bytes]:
    """Layer `index`: `files` big files totalling ~`size` bytes plus 40 small files.
    Returns (gzip bytes, the tar's sha256 digest, i.e. the diff_id, as bytes)."""
    index, size, files = args
    rng = random.Random(index)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:

        def add(name: str, data: bytes | None, mode: int = 0o644) -> None:
            info = tarfile.TarInfo(name)
            info.mtime, info.mode, info.uid, info.gid = MTIME, mode, 0, 0
            if data is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

        top = f"opt/layer{index:02d}"
        add("opt", None)
        add(top, None)
        add(f"{top}/data", None)
        add(f"{top}/etc", None)
        for i in range(files):
            add(f"{top}/data/blob{i:02d}.bin", file_content(rng, size // files))
        for i in range(40):
            add(f"{top}/etc/conf{i:02d}.txt", file_content(rng, rng.randrange(200, 8000)))
    tar_bytes = buf.getvalue()
    return gzip.compress(tar_bytes, compresslevel=6, mtime=0), sha256(tar_bytes).encode()


def write_blob(layout: Path, data: bytes) -> dict[str, object]:
    digest = sha256(data)
    path = layout / "blobs" / "sha256" / digest.removeprefix("sha256:")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"digest": digest, "size": len(data)}


def build_image(layout: Path, layers: int, total: int) -> tuple[int, int]:
    """Write the image as an OCI layout; returns (uncompressed bytes, compressed bytes)."""
    jobs = [(i, total // layers, 8) for i in range(layers)]
    with concurrent.futures.ProcessPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        built = list(pool.map(make_layer, jobs))
    descs, diff_ids, gz_total = [], [], 0
    for gz, diff_id in built:
        descs.append({"mediaType": OCI_LAYER, **write_blob(layout, gz)})
        diff_ids.append(diff_id.decode())
        gz_total += len(gz)
    config = {
        "architecture": host_architecture(),
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, **write_blob(layout, config_bytes)},
        "layers": descs,
    }
    manifest_bytes = json.dumps(manifest, sort_keys=True).encode()
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                **write_blob(layout, manifest_bytes),
                "annotations": {"org.opencontainers.image.ref.name": TAG},
            }
        ],
    }
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (layout / "index.json").write_text(json.dumps(index))
    return total // layers // 8 * 8 * layers, gz_total


# ---------------------------------------------------------------------------- the server


def start_skyreg(tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    port_file, log_path = tmp / "port", tmp / "skyreg.log"
    argv = [sys.executable, "-m", "skyreg", "serve", "--no-auth", "--host", "127.0.0.1"]
    argv += ["--port", "0", "--port-file", str(port_file), "--data-dir", str(tmp / "data")]
    log(f"starting: {shlex.join(argv)}")
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"skyreg exited with {proc.returncode}: {log_path.read_text()}")
        with contextlib.suppress(OSError, ValueError):
            return proc, int(port_file.read_text().strip())
        time.sleep(0.1)
    raise RuntimeError("skyreg did not write its port file within 60 s")


# ------------------------------------------------------------------------------ timings


async def _prepare(base: str, cache: LayerCache, digest: str) -> Path:
    async with aiohttp.ClientSession() as session:
        source = RegistrySource(base_url=base, token=None, session=session)
        return (await prepare_image(source, cache, REPO, digest)).rootfs


def skyreg_prepare(base: str, cache: LayerCache, digest: str, machine: Path | None) -> float:
    """Seconds for prepare_image (and a machine rootfs in `machine` unless None)."""
    start = time.perf_counter()
    rootfs = asyncio.run(_prepare(base, cache, digest))
    if machine is not None:
        fresh_rootfs(rootfs, machine)
    return time.perf_counter() - start


def run(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed ({proc.returncode}): {proc.stderr[-2000:]}")


def skopeo_copy(port: int, layout: Path) -> list[str]:
    return [
        "skopeo", "copy", "--quiet", "--src-tls-verify=false",
        f"docker://127.0.0.1:{port}/{REPO}:{TAG}", f"oci:{layout}:{TAG}",
    ]  # fmt: skip


def umoci_unpack(layout: Path, bundle: Path) -> list[str]:
    return ["umoci", "unpack", "--image", f"{layout}:{TAG}", str(bundle)]


def timed(*argvs: list[str]) -> float:
    start = time.perf_counter()
    for argv in argvs:
        run(argv)
    return time.perf_counter() - start


def clear(*paths: Path) -> None:
    for p in paths:
        if (p / "rootfs").exists():
            release_rootfs(p)  # a machine home: unmount its overlay first
        if p.exists() or p.is_symlink():
            remove_tree(p)


# --------------------------------------------------------------------------- correctness


def tree(root: Path) -> dict[str, int]:
    """Relative path -> size (-1 for directories, -2 for symlinks) of everything under root."""
    out: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            if os.path.islink(full):
                out[rel] = -2
            elif os.path.isdir(full):
                out[rel] = -1
            else:
                out[rel] = os.path.getsize(full)
    return out


def verify(skyreg_root: Path, umoci_root: Path) -> str:
    ours, theirs = tree(skyreg_root), tree(umoci_root)
    if ours != theirs:
        only_ours = sorted(set(ours) - set(theirs))[:5]
        only_theirs = sorted(set(theirs) - set(ours))[:5]
        sizes = sorted(k for k in set(ours) & set(theirs) if ours[k] != theirs[k])[:5]
        raise RuntimeError(f"trees differ: {only_ours=} {only_theirs=} {sizes=}")
    files = sorted(k for k, v in ours.items() if v >= 0)
    samples = random.Random(1).sample(files, min(12, len(files)))
    for rel in samples:
        if (skyreg_root / rel).read_bytes() != (umoci_root / rel).read_bytes():
            raise RuntimeError(f"{rel}: bytes differ between skyreg and umoci")
    total = sum(v for v in ours.values() if v > 0)
    return f"{len(ours)} entries, {len(files)} files, {total / MB:.1f} MB; {len(samples)} sampled"


# ------------------------------------------------------------------------------ reporting


def fmt(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine_line() -> str:
    mem = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kb = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1])
        mem = f", {kb / 1024 / 1024:.1f} GiB RAM"
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = " (" + line.split(":", 1)[1].strip() + ")"
                break
    return f"{os.cpu_count()} cores{cpu}{mem}, {platform.system()} {platform.release()}"


# ----------------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--size-mb", type=int, default=200, help="uncompressed image size")
    parser.add_argument("--tmp-dir", type=Path, default=None)
    args = parser.parse_args()
    for tool in ("skopeo", "umoci"):
        if shutil.which(tool) is None:
            print(f"`{tool}` is needed (apt-get install {tool})", file=sys.stderr)
            return 2
    if enter_private_mount_namespace():  # before any thread: overlay mounts die with the bench
        log("machine rootfs mounts are private to this process")
    tmp = Path(tempfile.mkdtemp(prefix="prepare-bench-", dir=args.tmp_dir))
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return bench(args, tmp)
    finally:
        signal.signal(signal.SIGTERM, previous)
        for proc in _PROCS:
            stop_process(proc)
        shutil.rmtree(tmp, ignore_errors=True)
        log(f"removed {tmp}")


_PROCS: list[subprocess.Popen[bytes]] = []


def bench(args: argparse.Namespace, tmp: Path) -> int:
    started = datetime.datetime.now(datetime.UTC)
    log(f"building a {args.layers}-layer, {args.size_mb} MB image in {tmp}")
    t0 = time.perf_counter()
    raw, gz = build_image(tmp / "src", args.layers, args.size_mb * MB)
    took = fmt(time.perf_counter() - t0)
    log(f"built: {raw / MB:.0f} MB uncompressed, {gz / MB:.0f} MB gzip in {took}")
    proc, port = start_skyreg(tmp)
    _PROCS.append(proc)
    base = f"http://127.0.0.1:{port}"
    result = push_image(tmp / "src", f"127.0.0.1:{port}/{REPO}:{TAG}", None)
    digest = result.digest
    log(f"pushed {result.reference}")

    r = range(args.runs)
    ours: dict[str, list[float]] = {k: [] for k in ("cold", "warm", "tree", "tree_alone", "second")}
    anchor: dict[str, list[float]] = {k: [] for k in ("cold", "warm", "second")}
    cache = LayerCache(tmp / "cache")
    layout, machine, bundle = tmp / "layout", tmp / "machine", tmp / "bundle"

    for i in r:  # cold: fresh cache / layout each run
        clear(cache.root, machine, layout, bundle)
        ours["cold"].append(skyreg_prepare(base, cache, digest, machine))
        anchor["cold"].append(timed(skopeo_copy(port, layout), umoci_unpack(layout, bundle)))
        log(f"cold run {i + 1}: skyreg {fmt(ours['cold'][-1])}, anchor {fmt(anchor['cold'][-1])}")
    log("verify: " + verify(machine / "rootfs", bundle / "rootfs"))

    for i in r:  # warm: blobs cached, tree removed / layout holds the blobs
        clear(cache.rootfs_path(digest), machine, bundle)
        ours["warm"].append(skyreg_prepare(base, cache, digest, machine))
        anchor["warm"].append(timed(skopeo_copy(port, layout), umoci_unpack(layout, bundle)))
        log(f"warm run {i + 1}: skyreg {fmt(ours['warm'][-1])}, anchor {fmt(anchor['warm'][-1])}")
    log("verify: " + verify(machine / "rootfs", bundle / "rootfs"))

    for i in r:  # warm, tree cached: nothing removed but the machine dir
        clear(machine)
        ours["tree"].append(skyreg_prepare(base, cache, digest, machine))
        ours["tree_alone"].append(skyreg_prepare(base, cache, digest, None))
        log(f"warm (tree cached) run {i + 1}: skyreg {fmt(ours['tree'][-1])} with rootfs, "
            f"{fmt(ours['tree_alone'][-1])} prepare alone")  # fmt: skip

    rootfs = cache.rootfs_path(digest)
    for i in r:  # second machine: a machine rootfs alone / umoci unpack from the local layout alone
        clear(machine, bundle)
        start = time.perf_counter()
        _, method = fresh_rootfs(rootfs, machine)
        ours["second"].append(time.perf_counter() - start)
        anchor["second"].append(timed(umoci_unpack(layout, bundle)))
        log(f"second run {i + 1}: skyreg {fmt(ours['second'][-1])} ({method}), anchor "
            f"{fmt(anchor['second'][-1])}")  # fmt: skip
    log("verify: " + verify(machine / "rootfs", bundle / "rootfs"))

    # cold breakdown (one extra run, not in the table): download+verify, unpack+sync, machine rootfs
    clear(cache.root, machine)
    phases = asyncio.run(_breakdown(base, cache, digest, machine))

    rows: list[tuple[str, float, float | None]] = [
        ("cold (empty cache) + machine rootfs", median(ours["cold"]), median(anchor["cold"])),
        ("warm, layers cached (unpack again) + machine rootfs", median(ours["warm"]),
         median(anchor["warm"])),
        ("warm, tree cached + machine rootfs", median(ours["tree"]), median(anchor["warm"])),
        ("warm, tree cached, prepare_image alone", median(ours["tree_alone"]), None),
        ("second machine: machine rootfs alone", median(ours["second"]), median(anchor["second"])),
    ]  # fmt: skip
    fs = subprocess.run(["stat", "-f", "-c", "%T", str(tmp)], capture_output=True, text=True)
    print(f"- date: {started:%Y-%m-%d %H:%M} UTC; machine: {machine_line()}")
    command = f"python bench/{Path(__file__).name} {shlex.join(sys.argv[1:])}".rstrip()
    print(f"- command: `{command}`")
    print(f"- image: {args.layers} gzip layers, {raw / MB:.0f} MB uncompressed, {gz / MB:.0f} MB "
          f"compressed; temp dir on {fs.stdout.strip()} (machine rootfs by: {method})")  # fmt: skip
    print(f"- median of {args.runs} runs; ratio = skyreg / anchor, **lower is better**")
    print()
    print("| figure | skyreg | skopeo+umoci | ratio |")
    print("|---|---:|---:|---:|")
    for name, a, b in rows:
        if b is None:
            print(f"| {name} | {fmt(a)} | — | — |")
        else:
            print(f"| {name} | {fmt(a)} | {fmt(b)} | {a / b:.{2 if a / b >= 0.01 else 4}f} |")
    print()
    print("Anchor per row: cold = `skopeo copy` into a fresh OCI layout + `umoci unpack` into a")
    print("fresh bundle; both warm rows = `skopeo copy` into the layout already holding the blobs")
    print(
        "(skipped) + `umoci unpack`; second machine = `umoci unpack` alone from the local layout."
    )
    print()
    print("Cold breakdown (one extra skyreg run): " + ", ".join(f"{k} {fmt(v)}" for k, v in phases))
    return 0


async def _breakdown(
    base: str, cache: LayerCache, digest: str, machine: Path
) -> list[tuple[str, float]]:
    from skyreg.oci.digest import Digest
    from skyreg.oci.manifest import parse_manifest

    async with aiohttp.ClientSession() as session:
        source = RegistrySource(base_url=base, token=None, session=session)
        t0 = time.perf_counter()
        raw, media_type = await source.manifest(REPO, digest)
        manifest = parse_manifest(raw, media_type, Digest.parse(digest))
        assert manifest.config is not None
        descs = [manifest.config, *manifest.layers]
        paths = await asyncio.gather(
            *(cache.fetch(str(d.digest), d.size, source.opener(REPO, str(d.digest))) for d in descs)
        )
        t1 = time.perf_counter()
        layers = [(p, d.media_type) for p, d in zip(paths[1:], manifest.layers, strict=True)]
        rootfs = await cache.rootfs_for(digest, layers)
        t2 = time.perf_counter()
    _, method = fresh_rootfs(rootfs, machine)
    t3 = time.perf_counter()
    return [("download+verify", t1 - t0), ("unpack+syncfs", t2 - t1), (method, t3 - t2)]


if __name__ == "__main__":
    sys.exit(main())
