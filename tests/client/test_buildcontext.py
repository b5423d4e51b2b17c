"""`pack_context` and `unpack_context` on real directories: `.dockerignore` as Docker reads it
(directories, `**` globs, `!` exceptions, comments), the Dockerfile and `.dockerignore` always
sent, a Dockerfile from elsewhere embedded, symlinks stored and never followed, special files
skipped, deterministic and streamed output, the size and entry limits, and a round trip that
gives back exactly the files that were not ignored, with their bytes and modes."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from skyreg.client.buildcontext import (
    EMBEDDED_DOCKERFILE,
    ContextError,
    ContextLimits,
    PackedContext,
    pack_context,
    unpack_context,
)
from skyreg.units import human_size

BIG = 1 << 30


def write(root: Path, name: str, data: bytes = b"x", mode: int = 0o644) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)
    return path


def pack(root: Path, dockerfile: Path | None = None, **kw: object) -> tuple[bytes, PackedContext]:
    out = io.BytesIO()
    packed = pack_context(root, dockerfile, out, limit=kw.pop("limit", BIG), **kw)  # type: ignore[arg-type]
    return out.getvalue(), packed


def members(data: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return {m.name: m for m in tar.getmembers()}


def content(data: bytes, name: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        f = tar.extractfile(name)
        assert f is not None
        return f.read()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "app"
    write(root, "Dockerfile", b"FROM scratch\nCOPY . /\n")
    write(root, "app.py", b"print('hi')\n", 0o755)
    write(root, "build/out.bin", b"\0" * 100)
    write(root, "a.log", b"log")
    write(root, "keep.log", b"kept")
    write(root, "sub/deep/x.log", b"log")
    write(root, "sub/deep/x.txt", b"text", 0o600)
    write(root, "secret.env", b"TOKEN=1")
    write(
        root,
        ".dockerignore",
        b"# a comment: app.py stays\n#app.py\n\nbuild\n**/*.log\n!keep.log\n  secret.env  \n"
        b"Dockerfile\n.dockerignore\n",
    )
    return root


def test_dockerignore_semantics_and_always_sent_files(project: Path) -> None:
    data, packed = pack(project)
    names = set(members(data))
    assert names == {
        ".dockerignore",
        "Dockerfile",
        "app.py",
        "keep.log",
        "sub",
        "sub/deep",
        "sub/deep/x.txt",
    }
    assert packed == PackedContext(dockerfile="Dockerfile", files=5, size=packed.size)
    assert packed.size == sum(m.size for m in members(data).values() if m.isfile())


def test_entries_are_sorted_owned_by_root_with_disk_mode_and_mtime(project: Path) -> None:
    os.utime(project / "app.py", (1_500_000_000, 1_500_000_000))
    data, _ = pack(project)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        infos = tar.getmembers()
    assert [m.name for m in infos] == sorted(m.name for m in infos)
    for m in infos:
        assert (m.uid, m.gid, m.uname, m.gname) == (0, 0, "", "")
        st = os.lstat(project / m.name)
        assert m.mode == stat.S_IMODE(st.st_mode)
        assert m.mtime == int(st.st_mtime)
    assert members(data)["app.py"].mtime == 1_500_000_000
    assert members(data)["app.py"].mode == 0o755


def test_packing_twice_gives_the_same_bytes(project: Path) -> None:
    assert pack(project)[0] == pack(project)[0]


def test_output_is_streamed_to_a_write_only_sink(project: Path) -> None:
    class Sink:
        def __init__(self) -> None:
            self.chunks: list[bytes] = []

        def write(self, b: bytes) -> int:
            self.chunks.append(bytes(b))
            return len(b)

        def flush(self) -> None:
            pass

    sink = Sink()
    pack_context(project, None, sink, limit=BIG)  # type: ignore[arg-type]
    assert "app.py" in members(b"".join(sink.chunks))


def test_missing_dockerfile(tmp_path: Path) -> None:
    write(tmp_path, "app.py")
    with pytest.raises(ContextError, match=f"no Dockerfile in {tmp_path}"):
        pack(tmp_path)
    with pytest.raises(ContextError, match="not found"):
        pack(tmp_path, tmp_path / "nope")


def test_dockerfile_outside_root_is_embedded(tmp_path: Path) -> None:
    root = tmp_path / "ctx"
    write(root, "app.py")
    write(root, ".skyreg/Dockerfile", b"stale one of the tree")
    outside = write(tmp_path / "elsewhere", "Dockerfile.prod", b"FROM prod\n")
    data, packed = pack(root, outside)
    assert packed.dockerfile == EMBEDDED_DOCKERFILE
    assert content(data, EMBEDDED_DOCKERFILE) == b"FROM prod\n"
    names = [m for m in members(data)]
    assert names.count(EMBEDDED_DOCKERFILE) == 1 and ".skyreg" in names


def test_ignored_dockerfile_inside_root_is_still_sent(tmp_path: Path) -> None:
    root = tmp_path / "ctx"
    write(root, "docker/Dockerfile.prod", b"FROM x\n")
    write(root, "docker/other", b"ignored")
    write(root, ".dockerignore", b"docker\n")
    data, packed = pack(root, root / "docker" / "Dockerfile.prod")
    assert packed.dockerfile == "docker/Dockerfile.prod"
    assert set(members(data)) == {".dockerignore", "docker/Dockerfile.prod"}


def test_symlinks_are_stored_never_followed_and_special_files_skipped(tmp_path: Path) -> None:
    root = tmp_path / "ctx"
    write(root, "Dockerfile")
    outside = tmp_path / "outside"
    write(outside, "secret", b"do not send")
    (root / "to-passwd").symlink_to("/etc/passwd")
    (root / "to-dir").symlink_to(outside)
    os.mkfifo(root / "fifo")
    data, packed = pack(root)
    infos = members(data)
    assert set(infos) == {"Dockerfile", "to-passwd", "to-dir"}
    assert infos["to-passwd"].issym() and infos["to-passwd"].linkname == "/etc/passwd"
    assert infos["to-dir"].issym() and infos["to-dir"].linkname == str(outside)
    assert packed.size == 1


def test_size_limit(project: Path) -> None:
    _, packed = pack(project)
    assert pack(project, limit=packed.size)[1].size == packed.size
    with pytest.raises(ContextError) as err:
        pack(project, limit=packed.size - 1)
    assert str(err.value) == (
        f"build context is larger than {human_size(packed.size - 1)} (the limit);"
        " add paths to .dockerignore"
    )
    # A sparse file of 2 GiB + 1 byte passes a 2 GiB limit, found before any of it is read.
    with (project / "huge").open("wb") as f:
        f.truncate((2 << 30) + 1)
    with pytest.raises(ContextError, match=r"^build context is larger than 2\.0 GiB \(the limit\)"):
        pack(project, limit=2 << 30)


def test_entry_limit(tmp_path: Path) -> None:
    write(tmp_path, "Dockerfile")
    for i in range(9):
        write(tmp_path, f"f{i}")
    assert pack(tmp_path, max_entries=10)[1].files == 10
    write(tmp_path, "f9")
    with pytest.raises(ContextError, match="more than 10 entries"):
        pack(tmp_path, max_entries=10)


def test_progress_reports_growing_byte_counts(project: Path) -> None:
    seen: list[int] = []
    _, packed = pack(project, progress=seen.append)
    assert seen and seen == sorted(seen) and seen[-1] == packed.size


def test_round_trip_gives_exactly_the_kept_files(project: Path, tmp_path: Path) -> None:
    (project / "link").symlink_to("app.py")
    write(project, "empty", b"")
    data, _ = pack(project)
    tar_path = tmp_path / "ctx.tar.gz"
    tar_path.write_bytes(data)
    dest = tmp_path / "dest"
    unpack_context(tar_path, dest, limits=ContextLimits())

    def tree(root: Path, keep: set[str] | None = None) -> dict[str, tuple[str, object, int]]:
        found: dict[str, tuple[str, object, int]] = {}
        for dirpath, dirnames, filenames in os.walk(root):
            for n in dirnames + filenames:
                path = Path(dirpath) / n
                rel = path.relative_to(root).as_posix()
                if keep is not None and rel not in keep:
                    continue
                st = os.lstat(path)
                if stat.S_ISLNK(st.st_mode):
                    found[rel] = ("link", os.readlink(path), 0)
                elif stat.S_ISDIR(st.st_mode):
                    found[rel] = ("dir", None, 0)
                else:
                    found[rel] = ("file", path.read_bytes(), stat.S_IMODE(st.st_mode))
        return found

    got = tree(dest)
    assert set(got) == {
        ".dockerignore",
        "Dockerfile",
        "app.py",
        "keep.log",
        "sub",
        "sub/deep",
        "sub/deep/x.txt",
        "link",
        "empty",
    }
    assert got == tree(project, keep=set(got))


# Packs the context named by argv[1], then imports the real docker SDK; prints what it saw.
PACK_THEN_IMPORT_DOCKER = """
import io, json, sys
from pathlib import Path
from skyreg.client.buildcontext import pack_context

pack_context(Path(sys.argv[1]), None, io.BytesIO(), limit=1 << 30)
loaded = sorted(m for m in ("requests", "docker", "docker.api", "urllib3") if m in sys.modules)

import docker

print(json.dumps({
    "loaded_by_packing": loaded,
    "from_env": callable(docker.from_env),
    "submodules_reachable": callable(docker.utils.build.PatternMatcher)
    and isinstance(docker.constants.DEFAULT_DOCKER_API_VERSION, str),
}))
"""


def test_packing_loads_dockers_matcher_without_the_docker_sdk(project: Path) -> None:
    """`.dockerignore` matching costs `skyreg deploy` only docker's matcher module, not the
    SDK behind `docker/__init__.py` (requests, urllib3, ssl); the real package still imports
    whole afterwards, its submodules reachable as attributes."""
    proc = subprocess.run(
        [sys.executable, "-c", PACK_THEN_IMPORT_DOCKER, str(project)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(proc.stdout) == {
        "loaded_by_packing": [],
        "from_env": True,
        "submodules_reachable": True,
    }
