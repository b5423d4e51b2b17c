"""Envelope encryption for app secrets: values sealed under a data key per org, data keys wrapped
by a master key that never enters the database.

- A *master key* (32 random bytes) comes from a 0600 key file or `SKYREG_SECRETS_KEY`; a server
  holds a few, newest first. The newest wraps; any of them unwraps, found by `key_id`.
- A *data key* (32 random bytes) per org is stored only wrapped (`WrappedKey`): XChaCha20-Poly1305
  with the org id as associated data, so a wrapped key copied to another org's row fails to open.
- A *value* is sealed under a subkey of its org's data key, with its context
  (`org/app/name/version`) as associated data, so a ciphertext copied to another app, name or
  version fails to open. `value_digest` is keyed by the data key, so a dump alone cannot test
  guesses of a low-entropy value against its digest.

Rotation without downtime: `prepend_new_key` on every server's key file (old keys still unwrap),
then `rewrap` each org's data key; once none is wrapped by an old key, drop it from the files.
A database dump alone therefore holds only ciphertext and key ids.

No error message or repr carries key material or a value: operators read these messages, and
they end up in logs.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import hashlib
import hmac
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import nacl.utils
from nacl.exceptions import CryptoError
from nacl.secret import Aead

from skyreg.privatefs import private_dir

KEY_BYTES = 32
NONCE_BYTES = Aead.NONCE_SIZE  # 24: XChaCha20, so random nonces never collide in practice
MAC_BYTES = Aead.MACBYTES  # 16
MAX_KEYS = 16
MAX_KEY_FILE_BYTES = 64 * 1024
MAX_VALUE_BYTES = 64 * 1024

# Labels keep each use of a key apart (domain separation); changing one breaks every stored blob.
_KEY_ID_LABEL = b"skyreg/secrets/master-key-id/v1\x00"
_WRAP_AAD_LABEL = b"skyreg/secrets/data-key/v1\x00"
_VALUE_KEY_LABEL = b"skyreg/secrets/value-key/v1"
_VALUE_AAD_LABEL = b"skyreg/secrets/value/v1\x00"
_DIGEST_KEY_LABEL = b"skyreg/secrets/value-digest/v1"

_WRAPPED_BLOB_BYTES = NONCE_BYTES + KEY_BYTES + MAC_BYTES
_KEY_FILE_HEADER = (
    "# skyreg master keys for app secrets: one base64 key per line, newest (current) first.\n"
    "# Keep this file 0600 and out of backups of the database. Created {when}.\n"
)


class SecretKeyError(Exception):
    """A master key, key file, wrapped key or sealed value that cannot be used.

    The message is for an operator: it says what is wrong and what to do, and never contains key
    material or a value.
    """


@dataclass(frozen=True)
class MasterKey:
    """A 32-byte master key. `key_id` is derived (first 16 hex of SHA-256 over a label and the
    key), safe to store and log; the repr never shows `key`."""

    key: bytes = field(repr=False)
    key_id: str = field(init=False)

    def __post_init__(self) -> None:
        if len(self.key) != KEY_BYTES:
            raise ValueError(f"a master key is {KEY_BYTES} bytes, not {len(self.key)}")
        key_id = hashlib.sha256(_KEY_ID_LABEL + self.key).hexdigest()[:16]
        object.__setattr__(self, "key_id", key_id)

    @classmethod
    def generate(cls) -> MasterKey:
        """A fresh random master key."""
        return cls(nacl.utils.random(KEY_BYTES))

    def to_base64(self) -> str:
        """The key as a key file line or `SKYREG_SECRETS_KEY` entry holds it."""
        return base64.b64encode(self.key).decode("ascii")


@dataclass(frozen=True)
class WrappedKey:
    """A data key as the database stores it: the id of the master key that wrapped it, and
    nonce || ciphertext (72 bytes). Neither reveals the data key without that master key."""

    key_id: str
    blob: bytes = field(repr=False)


class MasterKeys:
    """The master keys a server holds, newest first: `current` wraps, any of them unwraps.

    Never empty, at most `MAX_KEYS`, no key twice.
    """

    def __init__(self, keys: Sequence[MasterKey]) -> None:
        if not keys:
            raise SecretKeyError("no master key given: at least one is needed")
        if len(keys) > MAX_KEYS:
            raise SecretKeyError(
                f"{len(keys)} master keys given, at most {MAX_KEYS}: drop keys that no data key "
                "is wrapped with any more"
            )
        by_id: dict[str, MasterKey] = {}
        for k in keys:
            if k.key_id in by_id:
                raise SecretKeyError(f"master key {k.key_id} is given twice: list each key once")
            by_id[k.key_id] = k
        self._keys = tuple(keys)
        self._by_id = by_id

    @property
    def current(self) -> MasterKey:
        """The newest key: the one new data keys and rewraps use."""
        return self._keys[0]

    @property
    def keys(self) -> tuple[MasterKey, ...]:
        """All keys, newest first."""
        return self._keys

    def by_id(self, key_id: str) -> MasterKey | None:
        """The key with this id, or None when this server does not hold it."""
        return self._by_id.get(key_id)

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[MasterKey]:
        return iter(self._keys)

    def __repr__(self) -> str:
        return f"MasterKeys(key_ids={[k.key_id for k in self._keys]!r})"

    @classmethod
    def from_file(cls, path: Path) -> MasterKeys:
        """The keys in a key file: one base64 key per line, newest first; blank lines and lines
        starting with `#` are ignored.

        Refused with SecretKeyError: a path that is a symlink or not a regular file, a file that
        group or others may read or write (mode & 0o077), one over 64 KiB, a malformed line (its
        number is named, never its text), a key that is not 32 bytes, a key listed twice, more
        than 16 keys, or no key at all.
        """
        data = _read_key_file(path)
        return cls(_parse_key_lines(data, f"the master key file {path}"))

    @classmethod
    def from_env(cls, value: str) -> MasterKeys:
        """The keys in `SKYREG_SECRETS_KEY`: base64 keys separated by commas, newest first
        (spaces around entries and empty entries are ignored). Same refusals as `from_file`."""
        where = "SKYREG_SECRETS_KEY"
        keys: list[MasterKey] = []
        seen: dict[str, int] = {}
        for n, entry in enumerate(value.split(","), start=1):
            entry = entry.strip()
            if entry:
                key = _decode_key(entry, f"entry {n} of {where}")
                _add_key(keys, seen, key, n, f"entry {n} of {where}", "entry")
        if not keys:
            raise SecretKeyError(f"{where} is set but holds no key: unset it or give a base64 key")
        return cls(keys)

    @classmethod
    def load(
        cls, key_file: Path | None, env_value: str | None, default_file: Path | None
    ) -> MasterKeys:
        """The server's keys: from `env_value` (`SKYREG_SECRETS_KEY`) when it is not None, else
        from `key_file`, else from `default_file` (embedded mode: `<data-dir>/secrets.key`),
        which is created with one fresh key on first use.

        An empty `env_value` is refused rather than ignored: a variable set to nothing is more
        likely a deployment mistake than a wish for the file.
        """
        if env_value is not None:
            return cls.from_env(env_value)
        if key_file is not None:
            return cls.from_file(key_file)
        if default_file is None:
            raise SecretKeyError(
                "no master key for app secrets: set SKYREG_SECRETS_KEY or give a key file"
            )
        if not os.path.lexists(default_file):
            if not os.path.lexists(default_file.parent):
                private_dir(default_file.parent)
            with contextlib.suppress(FileExistsError):  # another process made it first: use it
                generate_key_file(default_file)
        return cls.from_file(default_file)


def generate_key_file(path: Path) -> MasterKey:
    """Create `path` (refused if anything exists there) holding a comment and one fresh key,
    mode 0600; returns the key.

    The file appears complete or not at all: it is written to a temporary file beside it
    (O_EXCL, 0600, fsynced) and hard-linked into place, which fails if `path` exists, so two
    servers starting at once end up using the same key. Raises FileExistsError when it exists.
    """
    key = MasterKey.generate()
    text = _KEY_FILE_HEADER.format(when=_now()) + key.to_base64() + "\n"
    tmp = _write_private_temp(path, text.encode("ascii"))
    try:
        try:
            os.link(tmp, path)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV):
                raise
            # A filesystem without hard links: create in place, still exclusively.
            _write_exclusive(path, text.encode("ascii"))
    finally:
        os.unlink(tmp)
    _fsync_dir(path.parent)
    return key


def prepend_new_key(path: Path) -> MasterKey:
    """Rotation step 1: write a fresh key as the first line of the key file, keeping every other
    line as it was; returns the new key.

    The file is replaced atomically (temporary file in the same directory, 0600, fsynced, renamed
    over it, directory fsynced), so a server reading it meanwhile sees the old file or the new.
    The existing file must pass `MasterKeys.from_file` and hold fewer than 16 keys. Run it on
    every server (or update `SKYREG_SECRETS_KEY` everywhere) before `rewrap`, so that no server is
    asked for a key it does not hold yet.
    """
    data = _read_key_file(path)
    existing = MasterKeys(_parse_key_lines(data, f"the master key file {path}"))
    if len(existing) >= MAX_KEYS:
        raise SecretKeyError(
            f"the master key file {path} already holds {MAX_KEYS} keys: drop a key that no data "
            "key is wrapped with any more before adding one"
        )
    key = MasterKey.generate()
    while existing.by_id(key.key_id) is not None:  # 2^-64: only for form's sake
        key = MasterKey.generate()
    tmp = _write_private_temp(path, key.to_base64().encode("ascii") + b"\n" + data)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return key


def new_data_key() -> bytes:
    """A fresh random 32-byte data key (one per org)."""
    return nacl.utils.random(KEY_BYTES)


def wrap_data_key(keys: MasterKeys, org_id: str, data_key: bytes) -> WrappedKey:
    """`data_key` encrypted under the current master key, bound to `org_id`: it opens only with
    that master key and only for that org."""
    _check_key(data_key, "a data key")
    _check_org(org_id)
    master = keys.current
    nonce = nacl.utils.random(NONCE_BYTES)
    sealed = Aead(master.key).encrypt(data_key, _wrap_aad(org_id), nonce)
    return WrappedKey(key_id=master.key_id, blob=bytes(sealed))


def unwrap_data_key(keys: MasterKeys, org_id: str, wrapped: WrappedKey) -> bytes:
    """The data key inside `wrapped`, for `org_id`.

    SecretKeyError when no held master key has `wrapped.key_id`, or when the blob fails
    authentication (altered, truncated, or wrapped for another org).
    """
    _check_org(org_id)
    master = keys.by_id(wrapped.key_id)
    if master is None:
        raise SecretKeyError(
            f"no master key opens org {org_id}'s data key (key id {wrapped.key_id}): add the key "
            "it was wrapped with to the key file or SKYREG_SECRETS_KEY"
        )
    failed = SecretKeyError(
        f"org {org_id}'s data key fails authentication under master key {wrapped.key_id}: it was "
        "altered, truncated or copied from another org; restore it from a backup of the database"
    )
    if len(wrapped.blob) != _WRAPPED_BLOB_BYTES:
        raise failed
    nonce, ciphertext = wrapped.blob[:NONCE_BYTES], wrapped.blob[NONCE_BYTES:]
    try:
        data_key = Aead(master.key).decrypt(ciphertext, _wrap_aad(org_id), nonce)
    except CryptoError:
        raise failed from None
    return data_key


def rewrap(keys: MasterKeys, org_id: str, wrapped: WrappedKey) -> WrappedKey | None:
    """Rotation step 2: `wrapped` re-wrapped under the current master key, or None when the
    current key already wraps it (nothing to write). The data key itself is unchanged, so every
    value sealed under it still opens. SecretKeyError as `unwrap_data_key`."""
    if wrapped.key_id == keys.current.key_id:
        return None
    return wrap_data_key(keys, org_id, unwrap_data_key(keys, org_id, wrapped))


def seal_value(data_key: bytes, context: str, value: bytes) -> bytes:
    """`value` encrypted under `data_key`, bound to `context` (e.g. f"{org}/{app}/{name}/{version}";
    the caller keeps its parts free of "/" so that contexts are unambiguous): nonce || ciphertext.

    ValueError for a value over MAX_VALUE_BYTES, an empty context or a data key not 32 bytes.
    """
    _check_key(data_key, "a data key")
    _check_context(context)
    _check_value(value)
    nonce = nacl.utils.random(NONCE_BYTES)
    return bytes(Aead(_value_key(data_key)).encrypt(value, _value_aad(context), nonce))


def open_value(data_key: bytes, context: str, blob: bytes) -> bytes:
    """The value `seal_value(data_key, context, ...)` sealed into `blob`.

    SecretKeyError when it fails authentication: altered, truncated, sealed under another data
    key, or copied from another context (app, name or version).
    """
    _check_key(data_key, "a data key")
    _check_context(context)
    failed = SecretKeyError(
        f"the secret value for {context} fails authentication: it was altered, or sealed for "
        "another app, name or version, or under another org's data key"
    )
    if not NONCE_BYTES + MAC_BYTES <= len(blob) <= NONCE_BYTES + MAX_VALUE_BYTES + MAC_BYTES:
        raise failed
    nonce, ciphertext = blob[:NONCE_BYTES], blob[NONCE_BYTES:]
    try:
        return Aead(_value_key(data_key)).decrypt(ciphertext, _value_aad(context), nonce)
    except CryptoError:
        raise failed from None


def value_digest(data_key: bytes, value: bytes) -> str:
    """16 hex chars identifying `value` for display ("changed?"): HMAC-SHA256 under a key derived
    from `data_key`, so equal values in one org show the same digest, while a database dump alone
    cannot test guesses against it."""
    _check_key(data_key, "a data key")
    _check_value(value)
    digest_key = hmac.new(data_key, _DIGEST_KEY_LABEL, hashlib.sha256).digest()
    return hmac.new(digest_key, value, hashlib.sha256).hexdigest()[:16]


# -- helpers -------------------------------------------------------------------------------------


def _wrap_aad(org_id: str) -> bytes:
    return _WRAP_AAD_LABEL + org_id.encode("utf-8")


def _value_aad(context: str) -> bytes:
    return _VALUE_AAD_LABEL + context.encode("utf-8")


def _value_key(data_key: bytes) -> bytes:
    # A subkey, so the data key itself is used for one thing only (deriving).
    return hmac.new(data_key, _VALUE_KEY_LABEL, hashlib.sha256).digest()


def _check_key(key: bytes, what: str) -> None:
    if len(key) != KEY_BYTES:
        raise ValueError(f"{what} is {KEY_BYTES} bytes, not {len(key)}")


def _check_org(org_id: str) -> None:
    if not org_id:
        raise ValueError("an org id is needed to bind a data key to its org")


def _check_context(context: str) -> None:
    if not context:
        raise ValueError("a context (org/app/name/version) is needed to bind a secret value")


def _check_value(value: bytes) -> None:
    if len(value) > MAX_VALUE_BYTES:
        raise ValueError(f"a secret value is at most {MAX_VALUE_BYTES} bytes, not {len(value)}")


def _read_key_file(path: Path) -> bytes:
    """The bytes of a key file that passed every check `MasterKeys.from_file` promises."""
    what = f"the master key file {path}"
    try:
        # O_NOFOLLOW: the checks below apply to the file itself, never to a link's target;
        # O_NONBLOCK: a FIFO put there must not hang the server (it is refused below).
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SecretKeyError(f"{what} does not exist") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise SecretKeyError(f"{what} is a symlink: point skyreg at the file itself") from None
        raise SecretKeyError(f"{what} cannot be opened: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SecretKeyError(f"{what} is not a regular file")
        if st.st_mode & 0o077:
            raise SecretKeyError(
                f"{what} is readable or writable by other users "
                f"(mode {stat.S_IMODE(st.st_mode):04o}): chmod 600 it"
            )
        if st.st_size > MAX_KEY_FILE_BYTES:
            raise SecretKeyError(f"{what} is over {MAX_KEY_FILE_BYTES // 1024} KiB: not a key file")
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_KEY_FILE_BYTES:  # it may grow after fstat
            chunk = os.read(fd, MAX_KEY_FILE_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > MAX_KEY_FILE_BYTES:
            raise SecretKeyError(f"{what} is over {MAX_KEY_FILE_BYTES // 1024} KiB: not a key file")
        return b"".join(chunks)
    except OSError as e:
        raise SecretKeyError(f"{what} cannot be read: {e.strerror}") from None
    finally:
        os.close(fd)


def _parse_key_lines(data: bytes, what: str) -> list[MasterKey]:
    keys: list[MasterKey] = []
    seen: dict[str, int] = {}
    for n, raw in enumerate(data.split(b"\n"), start=1):
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        try:
            text = line.decode("ascii")
        except UnicodeDecodeError:
            raise SecretKeyError(f"line {n} of {what} is not a base64 key") from None
        key = _decode_key(text, f"line {n} of {what}")
        _add_key(keys, seen, key, n, f"line {n} of {what}", "line")
    if not keys:
        raise SecretKeyError(f"{what} holds no key: put one base64 key per line")
    if len(keys) > MAX_KEYS:
        raise SecretKeyError(
            f"{what} holds {len(keys)} keys, at most {MAX_KEYS}: drop keys that no data key is "
            "wrapped with any more"
        )
    return keys


def _decode_key(text: str, where: str) -> MasterKey:
    # Messages name the line or entry, never its text: a near-miss is likely a real key.
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SecretKeyError(f"{where} is not a base64 key") from None
    if len(raw) != KEY_BYTES:
        raise SecretKeyError(
            f"{where} decodes to {len(raw)} bytes; a master key is {KEY_BYTES} "
            "(make one with `head -c 32 /dev/urandom | base64`)"
        )
    return MasterKey(raw)


def _add_key(
    keys: list[MasterKey], seen: dict[str, int], key: MasterKey, n: int, where: str, unit: str
) -> None:
    first = seen.get(key.key_id)
    if first is not None:
        raise SecretKeyError(
            f"{where} repeats the key on {unit} {first} (key id {key.key_id}): list each key once"
        )
    seen[key.key_id] = n
    keys.append(key)


def _write_private_temp(beside: Path, data: bytes) -> Path:
    """`data` in a new 0600 file next to `beside` (same filesystem, so it can be renamed or
    linked over it), fsynced."""
    tmp = beside.with_name(f".{beside.name}.{nacl.utils.random(8).hex()}.tmp")
    _write_exclusive(tmp, data)
    return tmp


def _write_exclusive(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
