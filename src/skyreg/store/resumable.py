"""A SHA-256 whose running state can be saved and restored.

hashlib cannot export its state, so an upload whose next chunk reaches another process (another
worker, another node, or this one after a restart) would have to re-read every byte so far.
OpenSSL's `SHA256_CTX` is a plain public struct (openssl/sha.h); driving OpenSSL's SHA-256 through
it gives the same speed as hashlib and a 112-byte state to store beside the upload.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
from typing import Any

_DIGEST_SIZE = 32


class _Sha256Ctx(ctypes.Structure):
    _fields_ = [
        ("h", ctypes.c_uint32 * 8),
        ("Nl", ctypes.c_uint32),
        ("Nh", ctypes.c_uint32),
        ("data", ctypes.c_uint32 * 16),
        ("num", ctypes.c_uint),
        ("md_len", ctypes.c_uint),
    ]


STATE_SIZE = ctypes.sizeof(_Sha256Ctx)


def _load_libcrypto() -> Any:
    name = ctypes.util.find_library("crypto")
    if name is None:
        return None
    try:
        lib = ctypes.CDLL(name)
        init, update, final = lib.SHA256_Init, lib.SHA256_Update, lib.SHA256_Final
    except (OSError, AttributeError):
        return None
    init.argtypes = [ctypes.c_void_p]
    update.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    final.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    # Prove it agrees with hashlib before trusting it with digests.
    ctx = _Sha256Ctx()
    init(ctypes.byref(ctx))
    probe = b"skyreg"
    update(ctypes.byref(ctx), probe, len(probe))
    out = (ctypes.c_ubyte * _DIGEST_SIZE)()
    final(out, ctypes.byref(ctx))
    if bytes(out) != hashlib.sha256(probe).digest():
        return None
    return lib


_LIB = _load_libcrypto()


def available() -> bool:
    """Whether resumable SHA-256 works here (OpenSSL's libcrypto was found and agrees)."""
    return _LIB is not None


class ResumableSha256:
    """SHA-256 with `state()` / `ResumableSha256(state)` to carry the running hash elsewhere."""

    __slots__ = ("_ctx",)

    def __init__(self, state: bytes | None = None) -> None:
        if _LIB is None:
            raise RuntimeError("OpenSSL libcrypto with SHA256_* is not available")
        if state is None:
            self._ctx = _Sha256Ctx()
            _LIB.SHA256_Init(ctypes.byref(self._ctx))
            return
        if len(state) != STATE_SIZE:
            raise ValueError("not a SHA-256 state")
        ctx = _Sha256Ctx.from_buffer_copy(state)
        if ctx.md_len != _DIGEST_SIZE or ctx.num >= 64:
            raise ValueError("not a SHA-256 state")
        self._ctx = ctx

    def update(self, data: bytes | bytearray) -> None:
        """Hash `data` (OpenSSL runs without holding the GIL)."""
        if not data:
            return
        if isinstance(data, bytearray):
            buf: Any = (ctypes.c_char * len(data)).from_buffer(data)
        else:
            buf = data
        assert _LIB is not None
        _LIB.SHA256_Update(ctypes.byref(self._ctx), buf, len(data))

    def state(self) -> bytes:
        """The running state, to restore with `ResumableSha256(state)`."""
        return bytes(self._ctx)

    def hexdigest(self) -> str:
        """The digest of everything hashed so far (the running hash can go on)."""
        ctx = _Sha256Ctx.from_buffer_copy(bytes(self._ctx))
        out = (ctypes.c_ubyte * _DIGEST_SIZE)()
        assert _LIB is not None
        _LIB.SHA256_Final(out, ctypes.byref(ctx))
        return bytes(out).hex()
