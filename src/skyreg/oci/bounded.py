"""Bounded parsing of what clients send: JSON documents, integers and text.

Every JSON document from a client (manifests, management API and GraphQL bodies) goes through
`load_json`, and every integer from a query string or header through `parse_int`, so that no
input shape can reach the parser's recursion limit, the interpreter's integer-digit limit, or a
database column's range. `storable` tells whether text can reach a database column at all.
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_JSON_DEPTH = 64
MAX_INT = 2**63 - 1  # the largest value a signed 64-bit database column holds

# A JSON string literal; an unterminated one runs to the end, so no text is scanned twice.
_STRING_RE = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_FOLD_BRACKETS = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")
_DIGITS_RE = re.compile(r"[0-9]+")
# PostgreSQL refuses NUL in text, and no driver encodes a lone surrogate as UTF-8.
_UNSTORABLE_RE = re.compile("[\x00\ud800-\udfff]")
# In valid UTF-8 JSON text, the only way to write either is a `\u` escape.
_UNSTORABLE_ESCAPE_RE = re.compile(rb"\\u(?:0000|[dD][89a-fA-F])")


class JSONInputError(ValueError):
    """The bytes are not a JSON document within the limits; the message says why."""


def _reject_constant(name: str) -> Any:
    raise JSONInputError(f"{name} is not valid JSON")


def nesting_depth_exceeds(data: bytes, max_depth: int) -> bool:
    """Whether arrays and objects in the JSON text `data` nest deeper than `max_depth`.

    No recursion and no per-character Python loop (a 4 MiB document takes milliseconds):
    strings are cut out, every other byte but brackets dropped, `{}` folded into `[]`; then each
    round removes every innermost `[]`, i.e. one level. A position is never inside more removed
    pairs than rounds run, so `rounds + openers left` bounds the depth the parser can reach, also
    for brackets that do not balance (which the parser then refuses).
    """
    brackets = _STRING_RE.sub(b"", data).translate(_FOLD_BRACKETS, _NOT_BRACKETS)
    if b"[" * (max_depth + 1) in brackets:
        return True  # the usual attack: a long run of openers
    for removed in range(max_depth + 1):
        if removed + brackets.count(b"[") <= max_depth:
            return False
        shorter = brackets.replace(b"[]", b"")
        if len(shorter) == len(brackets):
            return True  # unbalanced, and possibly too deep: refused either way
        brackets = shorter
    return True


def storable(text: str) -> bool:
    """Whether `text` can be stored in (or compared with) a text column of any database we
    support: no NUL character and no lone surrogate."""
    return _UNSTORABLE_RE.search(text) is None


def _first_unstorable(doc: Any) -> str | None:
    """A string (key or value) of the parsed document that is not `storable`, if any."""
    pending = [doc]
    while pending:  # no recursion: the depth is bounded, but the breadth is not
        item = pending.pop()
        if isinstance(item, str):
            if not storable(item):
                return item
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return None


def load_json(raw: bytes | str, *, max_bytes: int, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse a client's JSON document: UTF-8, at most `max_bytes` long and `max_depth` deep.

    NaN and Infinity (not JSON) are refused; integers keep Python's digit limit, floats may be
    inf; no string (key or value) may contain NUL (`\\u0000`) or a lone surrogate (`\\ud800`),
    which no database column stores. Raises `JSONInputError` for anything else than such a
    document.
    """
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    if len(data) > max_bytes:
        raise JSONInputError(f"the document is {len(data)} bytes; the limit is {max_bytes} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JSONInputError(f"the document is not UTF-8: {e}") from None
    if nesting_depth_exceeds(data, max_depth):
        raise JSONInputError(f"the document nests arrays and objects deeper than {max_depth}")
    try:
        doc = json.loads(text, parse_constant=_reject_constant)
    except JSONInputError:
        raise
    except (ValueError, RecursionError) as e:  # JSONDecodeError, or an int beyond the digit limit
        raise JSONInputError(f"the document is not valid JSON: {e}") from None
    if _UNSTORABLE_ESCAPE_RE.search(data) and _first_unstorable(doc) is not None:
        # Not echoed: the string may be a secret (a value of `skyreg secrets set`).
        raise JSONInputError("a string contains NUL or a lone surrogate")
    return doc


def parse_int(raw: str, *, minimum: int = 0, maximum: int = MAX_INT) -> int:
    """A whole number written in ASCII digits, from `minimum` to `maximum`.

    No sign, spaces, underscores or non-ASCII digits; leading zeros are fine whatever their
    number. Raises `ValueError` with a message naming the bounds.
    """
    if _DIGITS_RE.fullmatch(raw) is None:
        raise ValueError(f"must be a whole number from {minimum} to {maximum}")
    digits = raw.lstrip("0") or "0"
    if len(digits) > len(str(maximum)) or not minimum <= int(digits) <= maximum:
        raise ValueError(f"must be a whole number from {minimum} to {maximum}")
    return int(digits)
