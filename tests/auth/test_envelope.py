"""Envelope encryption for app secrets: master keys from a private file or the environment wrap a
data key per org, which seals values bound to where they belong (auth/envelope.py)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from skyreg.auth.envelope import (
    MAX_KEYS,
    MAX_VALUE_BYTES,
    MasterKey,
    MasterKeys,
    SecretKeyError,
    WrappedKey,
    generate_key_file,
    new_data_key,
    open_value,
    prepend_new_key,
    rewrap,
    seal_value,
    unwrap_data_key,
    value_digest,
    wrap_data_key,
)

CTX = "org1/app1/DATABASE_URL/1"


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def write_key_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    return path


def one_key_file(tmp_path: Path) -> tuple[Path, MasterKey]:
    key = MasterKey.generate()
    return write_key_file(tmp_path / "secrets.key", f"# test\n{key.to_base64()}\n"), key


def flip(blob: bytes, at: int) -> bytes:
    return blob[:at] + bytes([blob[at] ^ 1]) + blob[at + 1 :]


def raises_secret_key_error(fn: Callable[[], object]) -> str:
    with pytest.raises(SecretKeyError) as e:
        fn()
    return str(e.value)


# -- round trips ----------------------------------------------------------------------------------


def test_a_data_key_wrapped_for_an_org_unwraps_for_that_org() -> None:
    keys = MasterKeys([MasterKey.generate()])
    dk = new_data_key()
    wrapped = wrap_data_key(keys, "org1", dk)
    assert wrapped.key_id == keys.current.key_id
    assert dk not in wrapped.blob
    assert unwrap_data_key(keys, "org1", wrapped) == dk


def test_a_sealed_value_opens_in_its_context_and_is_not_stored_in_clear() -> None:
    dk = new_data_key()
    value = b"postgres://user:hunter2@db/prod"
    blob = seal_value(dk, CTX, value)
    assert value not in blob
    assert open_value(dk, CTX, blob) == value
    assert seal_value(dk, CTX, value) != blob  # fresh nonce each time
    assert open_value(dk, CTX, seal_value(dk, CTX, b"")) == b""


def test_values_up_to_the_bound_round_trip_and_larger_ones_are_refused() -> None:
    dk = new_data_key()
    largest = os.urandom(MAX_VALUE_BYTES)
    assert open_value(dk, CTX, seal_value(dk, CTX, largest)) == largest
    with pytest.raises(ValueError, match="at most"):
        seal_value(dk, CTX, largest + b"x")
    with pytest.raises(ValueError, match="at most"):
        value_digest(dk, largest + b"x")


# -- what must fail to open -----------------------------------------------------------------------


def test_a_wrapped_data_key_moved_to_another_org_fails_to_open() -> None:
    keys = MasterKeys([MasterKey.generate()])
    wrapped = wrap_data_key(keys, "org1", new_data_key())
    msg = raises_secret_key_error(lambda: unwrap_data_key(keys, "org2", wrapped))
    assert "org2" in msg and "fails authentication" in msg


@pytest.mark.parametrize("at", [0, 23, 24, 50, 71])
def test_a_wrapped_data_key_with_a_flipped_byte_fails_to_open(at: int) -> None:
    keys = MasterKeys([MasterKey.generate()])
    wrapped = wrap_data_key(keys, "org1", new_data_key())
    bad = WrappedKey(key_id=wrapped.key_id, blob=flip(wrapped.blob, at))
    raises_secret_key_error(lambda: unwrap_data_key(keys, "org1", bad))


def test_a_truncated_wrapped_data_key_fails_to_open() -> None:
    keys = MasterKeys([MasterKey.generate()])
    wrapped = wrap_data_key(keys, "org1", new_data_key())
    for blob in (wrapped.blob[:-1], wrapped.blob[:10], b"", wrapped.blob + b"\0"):
        bad = WrappedKey(key_id=wrapped.key_id, blob=blob)
        raises_secret_key_error(lambda bad=bad: unwrap_data_key(keys, "org1", bad))


def test_a_data_key_wrapped_by_a_key_this_server_lacks_names_the_org_and_key_id() -> None:
    old = MasterKeys([MasterKey.generate()])
    wrapped = wrap_data_key(old, "acme", new_data_key())
    other = MasterKeys([MasterKey.generate()])
    msg = raises_secret_key_error(lambda: unwrap_data_key(other, "acme", wrapped))
    assert "no master key opens org acme's data key" in msg
    assert wrapped.key_id in msg and "add the key" in msg


@pytest.mark.parametrize(
    "other_context",
    [
        "org1/app2/DATABASE_URL/1",  # another app
        "org1/app1/OTHER_NAME/1",  # another name
        "org1/app1/DATABASE_URL/2",  # another version
        "org2/app1/DATABASE_URL/1",  # another org
    ],
)
def test_a_sealed_value_copied_to_another_context_fails_to_open(other_context: str) -> None:
    dk = new_data_key()
    blob = seal_value(dk, CTX, b"s3cret")
    msg = raises_secret_key_error(lambda: open_value(dk, other_context, blob))
    assert other_context in msg


def test_a_sealed_value_with_a_flipped_byte_or_cut_short_fails_to_open() -> None:
    dk = new_data_key()
    blob = seal_value(dk, CTX, b"s3cret")
    for at in range(len(blob)):
        raises_secret_key_error(lambda at=at: open_value(dk, CTX, flip(blob, at)))
    for bad in (blob[:-1], blob[:24], b""):
        raises_secret_key_error(lambda bad=bad: open_value(dk, CTX, bad))


def test_a_sealed_value_does_not_open_under_another_data_key() -> None:
    blob = seal_value(new_data_key(), CTX, b"s3cret")
    raises_secret_key_error(lambda: open_value(new_data_key(), CTX, blob))


# -- key files ------------------------------------------------------------------------------------


def test_a_key_file_keeps_its_order_and_ignores_comments_and_blank_lines(tmp_path: Path) -> None:
    a, b = MasterKey.generate(), MasterKey.generate()
    path = write_key_file(
        tmp_path / "k", f"# newest first\n\n  {a.to_base64()}  \n# retired soon\n{b.to_base64()}"
    )
    keys = MasterKeys.from_file(path)
    assert [k.key_id for k in keys] == [a.key_id, b.key_id]
    assert keys.current == a
    assert keys.by_id(b.key_id) == b
    assert keys.by_id("0" * 16) is None


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602])
def test_a_key_file_open_to_other_users_is_refused(tmp_path: Path, mode: int) -> None:
    path, _ = one_key_file(tmp_path)
    os.chmod(path, mode)
    msg = raises_secret_key_error(lambda: MasterKeys.from_file(path))
    assert f"(mode {mode:04o}): chmod 600 it" in msg and str(path) in msg


def test_a_key_file_behind_a_symlink_is_refused(tmp_path: Path) -> None:
    path, _ = one_key_file(tmp_path)
    link = tmp_path / "link.key"
    link.symlink_to(path)
    assert "symlink" in raises_secret_key_error(lambda: MasterKeys.from_file(link))


def test_a_key_path_that_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "dir"
    d.mkdir(mode=0o700)
    assert "not a regular file" in raises_secret_key_error(lambda: MasterKeys.from_file(d))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    assert "not a regular file" in raises_secret_key_error(lambda: MasterKeys.from_file(fifo))


def test_a_missing_key_file_is_refused_with_its_path(tmp_path: Path) -> None:
    msg = raises_secret_key_error(lambda: MasterKeys.from_file(tmp_path / "nope"))
    assert "does not exist" in msg and "nope" in msg


def test_a_malformed_line_is_refused_by_its_number_without_echoing_it(tmp_path: Path) -> None:
    good = MasterKey.generate().to_base64()
    for bad_line in ("not base64!", good[:-4] + "====", "\xe9t\xe9"):
        path = write_key_file(tmp_path / "k", f"# header\n{good}\n\n{bad_line}\n")
        msg = raises_secret_key_error(lambda path=path: MasterKeys.from_file(path))
        assert "line 4 " in msg, msg
        assert bad_line not in msg


@pytest.mark.parametrize("length", [1, 16, 31, 33, 64])
def test_a_key_of_the_wrong_length_is_refused(tmp_path: Path, length: int) -> None:
    near_miss = b64(os.urandom(length))
    path = write_key_file(tmp_path / "k", f"{near_miss}\n")
    msg = raises_secret_key_error(lambda: MasterKeys.from_file(path))
    assert f"line 1 of the master key file {path} decodes to {length} bytes" in msg
    assert near_miss not in msg


def test_a_key_listed_twice_is_refused(tmp_path: Path) -> None:
    a, b = MasterKey.generate(), MasterKey.generate()
    path = write_key_file(tmp_path / "k", f"{a.to_base64()}\n{b.to_base64()}\n{a.to_base64()}\n")
    msg = raises_secret_key_error(lambda: MasterKeys.from_file(path))
    assert "line 3" in msg and "line 1" in msg and a.key_id in msg


def test_a_key_file_with_too_many_keys_or_none_or_too_big_is_refused(tmp_path: Path) -> None:
    many = "".join(MasterKey.generate().to_base64() + "\n" for _ in range(MAX_KEYS + 1))
    path = write_key_file(tmp_path / "many", many)
    assert f"at most {MAX_KEYS}" in raises_secret_key_error(lambda: MasterKeys.from_file(path))
    just_enough = "".join(MasterKey.generate().to_base64() + "\n" for _ in range(MAX_KEYS))
    assert len(MasterKeys.from_file(write_key_file(tmp_path / "ok", just_enough))) == MAX_KEYS

    empty = write_key_file(tmp_path / "empty", "# nothing yet\n\n")
    assert "holds no key" in raises_secret_key_error(lambda: MasterKeys.from_file(empty))

    big_text = MasterKey.generate().to_base64() + "\n" + "#" * (64 * 1024) + "\n"
    big = write_key_file(tmp_path / "big", big_text)
    assert "64 KiB" in raises_secret_key_error(lambda: MasterKeys.from_file(big))


# -- the environment ------------------------------------------------------------------------------


def test_the_environment_holds_comma_separated_keys_newest_first() -> None:
    a, b = MasterKey.generate(), MasterKey.generate()
    keys = MasterKeys.from_env(f" {a.to_base64()} ,{b.to_base64()},")
    assert [k.key_id for k in keys] == [a.key_id, b.key_id]


def test_the_environment_refuses_bad_entries_by_number() -> None:
    a = MasterKey.generate().to_base64()
    assert "entry 2 " in raises_secret_key_error(lambda: MasterKeys.from_env(f"{a},nope"))
    short = b64(os.urandom(31))
    msg = raises_secret_key_error(lambda: MasterKeys.from_env(short))
    assert "entry 1 of SKYREG_SECRETS_KEY decodes to 31 bytes" in msg and short not in msg
    assert "entry 2 of SKYREG_SECRETS_KEY repeats the key on entry 1" in raises_secret_key_error(
        lambda: MasterKeys.from_env(f"{a},{a}")
    )
    assert "holds no key" in raises_secret_key_error(lambda: MasterKeys.from_env(" , "))


def test_load_prefers_the_environment_then_the_key_file_then_the_default_file(
    tmp_path: Path,
) -> None:
    path, file_key = one_key_file(tmp_path)
    env_key = MasterKey.generate()
    default = tmp_path / "data" / "secrets.key"

    assert MasterKeys.load(path, env_key.to_base64(), default).current == env_key
    assert MasterKeys.load(path, None, default).current == file_key
    assert not default.exists()

    made = MasterKeys.load(None, None, default)
    assert default.stat().st_mode & 0o777 == 0o600
    assert default.parent.stat().st_mode & 0o777 == 0o700
    assert MasterKeys.load(None, None, default).current == made.current  # reused, not remade

    msg = raises_secret_key_error(lambda: MasterKeys.load(None, None, None))
    assert "SKYREG_SECRETS_KEY" in msg
    assert "holds no key" in raises_secret_key_error(lambda: MasterKeys.load(path, "", default))


# -- creating and rotating ------------------------------------------------------------------------


def test_a_generated_key_file_is_private_loads_and_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "secrets.key"
    old = os.umask(0)
    try:
        key = generate_key_file(path)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_text().startswith("#")
    assert MasterKeys.from_file(path).keys == (key,)
    with pytest.raises(FileExistsError):
        generate_key_file(path)
    assert MasterKeys.from_file(path).keys == (key,)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secrets.key"]  # no temp file left


def test_prepending_a_key_makes_it_current_and_keeps_old_data_keys_openable(
    tmp_path: Path,
) -> None:
    path = tmp_path / "secrets.key"
    first = generate_key_file(path)
    before = MasterKeys.from_file(path)
    dk = new_data_key()
    wrapped = wrap_data_key(before, "org1", dk)

    new = prepend_new_key(path)
    after = MasterKeys.from_file(path)
    assert after.keys == (new, first)
    assert path.read_text().splitlines()[0] == new.to_base64()
    assert "# skyreg master keys" in path.read_text()  # the old lines are kept
    assert path.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secrets.key"]
    assert unwrap_data_key(after, "org1", wrapped) == dk
    assert wrap_data_key(after, "org1", dk).key_id == new.key_id


def test_prepending_refuses_a_bad_or_full_key_file_and_leaves_it_alone(tmp_path: Path) -> None:
    path, _ = one_key_file(tmp_path)
    os.chmod(path, 0o644)
    before = path.read_bytes()
    raises_secret_key_error(lambda: prepend_new_key(path))
    assert path.read_bytes() == before

    full = "".join(MasterKey.generate().to_base64() + "\n" for _ in range(MAX_KEYS))
    full_path = write_key_file(tmp_path / "full", full)
    assert "drop a key" in raises_secret_key_error(lambda: prepend_new_key(full_path))
    assert full_path.read_text() == full


def test_rewrap_moves_a_data_key_to_the_current_key_so_the_old_one_can_be_dropped() -> None:
    old, new = MasterKey.generate(), MasterKey.generate()
    dk = new_data_key()
    wrapped = wrap_data_key(MasterKeys([old]), "org1", dk)
    only_new = MasterKeys([new])
    raises_secret_key_error(lambda: unwrap_data_key(only_new, "org1", wrapped))

    rewrapped = rewrap(MasterKeys([new, old]), "org1", wrapped)
    assert rewrapped is not None and rewrapped.key_id == new.key_id
    assert unwrap_data_key(only_new, "org1", rewrapped) == dk  # the old key is no longer needed
    assert rewrap(MasterKeys([new, old]), "org1", rewrapped) is None  # already current
    raises_secret_key_error(lambda: rewrap(MasterKeys([new, old]), "org2", wrapped))


# -- digests --------------------------------------------------------------------------------------


def test_the_digest_is_stable_within_an_org_and_differs_across_data_keys() -> None:
    dk = new_data_key()
    d = value_digest(dk, b"hunter2")
    assert len(d) == 16 and int(d, 16) >= 0
    assert value_digest(dk, b"hunter2") == d
    assert value_digest(dk, b"hunter3") != d
    assert value_digest(new_data_key(), b"hunter2") != d
    assert d != hashlib.sha256(b"hunter2").hexdigest()[:16]  # keyed, not a plain hash


# -- nothing secret leaks -------------------------------------------------------------------------


def secret_forms(raw: bytes) -> list[str]:
    forms = [raw.hex(), b64(raw)]
    with contextlib.suppress(UnicodeDecodeError):
        forms.append(raw.decode())
    return [f for f in forms if f]


def test_reprs_hide_key_bytes() -> None:
    key = MasterKey.generate()
    keys = MasterKeys([key])
    wrapped = wrap_data_key(keys, "org1", new_data_key())
    for text in (repr(key), str(key), repr(keys), str(keys), repr(wrapped)):
        for form in [*secret_forms(key.key), repr(key.key)[2:-1]]:
            assert form not in text
    assert key.key_id in repr(key) and key.key_id in repr(keys)


def test_no_error_message_carries_a_key_or_a_value(tmp_path: Path) -> None:
    master = MasterKey.generate()
    keys = MasterKeys([master])
    dk = new_data_key()
    value = b"correct horse battery staple"
    wrapped = wrap_data_key(keys, "org1", dk)
    blob = seal_value(dk, CTX, value)
    near = b64(os.urandom(31))
    secrets = [master.key, dk, value, base64.b64decode(near)]

    attempts: list[Callable[[], object]] = [
        lambda: unwrap_data_key(keys, "org2", wrapped),
        lambda: unwrap_data_key(MasterKeys([MasterKey.generate()]), "org1", wrapped),
        lambda: unwrap_data_key(keys, "org1", WrappedKey(wrapped.key_id, flip(wrapped.blob, 40))),
        lambda: open_value(dk, "org1/app1/OTHER/1", blob),
        lambda: open_value(new_data_key(), CTX, blob),
        lambda: seal_value(dk, CTX, value * 10_000),
        lambda: MasterKeys.from_env(f"{master.to_base64()},{master.to_base64()}"),
        lambda: MasterKeys.from_env(f"{master.to_base64()},{near}"),
        lambda: MasterKeys.from_file(
            write_key_file(tmp_path / "a", f"{master.to_base64()}\n{near}\n")
        ),
        lambda: MasterKeys.from_file(
            write_key_file(tmp_path / "b", f"{master.to_base64()}\n", mode=0o644)
        ),
        lambda: MasterKeys.from_file(
            write_key_file(tmp_path / "c", f"{master.to_base64()}\n{master.to_base64()}\n")
        ),
        lambda: MasterKeys.from_file(write_key_file(tmp_path / "d", master.to_base64()[:-2])),
    ]
    for attempt in attempts:
        with pytest.raises((SecretKeyError, ValueError)) as e:
            attempt()
        text = str(e.value) + repr(e.value)
        for secret in secrets:
            for form in secret_forms(secret):
                assert form not in text, text
        assert e.value.__cause__ is None
