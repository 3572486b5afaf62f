"""The one decoder of JSON from clients: WebSocket frames, the publish API and every handler.

``json.loads`` recurses once per nesting level, so a frame of a few KB can raise
``RecursionError`` deep inside the parser. :func:`loads` measures the nesting of the raw text
first (linear passes done by C code: ``str.count``, ``bytes.translate``, ``split`` and
``replace``; see :func:`too_deep`) and refuses anything deeper than the limit before parsing. It
also refuses what strict JSON (RFC 8259) does not allow but Python's parser does: ``NaN``,
``Infinity`` and ``-Infinity``, and lone UTF-16 surrogate escapes (``"\\ud800"``), which could
not be encoded back as UTF-8.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable
from typing import Any, NoReturn

#: nesting levels a client's JSON may have by default (``server.max_json_depth``)
DEFAULT_MAX_JSON_DEPTH = 32
#: the reason of plain syntax errors (the others say what was refused)
NOT_JSON = "the text is not valid JSON"

#: bytes that are neither a bracket nor a quote: dropped first (by C code)
_NOT_SYNTAX = bytes(c for c in range(256) if c not in b'[]{}"')
#: objects nest like arrays: one kind of bracket is enough to measure the depth
_ONE_KIND = bytes.maketrans(b"{}", b"[]")
_DELTA = {ord("["): 1, ord("]"): -1}
#: a \uD800-\uDFFF escape: only then can the value hold a lone surrogate
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class JsonRejected(ValueError):
    """Text that the decoder refuses; ``reason`` is safe to show the client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def explain(self, what: str) -> str:
        """``"<what> is not valid JSON"``, plus the reason when it is more than a syntax error."""
        text = f"{what} is not valid JSON"
        return text if self.reason == NOT_JSON else f"{text}: {self.reason}"


def _reject_constant(name: str) -> NoReturn:
    raise JsonRejected(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
#: the decoder's C scanner: ``decode`` around it is two Python frames and two whitespace regex matches
_SCAN: Callable[[str, int], tuple[Any, int]] = _DECODER.scan_once  # type: ignore[attr-defined]


def _decode(text: str) -> Any:
    """``_DECODER.decode(text)``, the same value or error. A frame that is one object with no whitespace
    around it (what clients send: every request) is scanned directly; anything else (or a scan that does
    not end at the end of the text) goes through ``decode``, which raises the exact error."""
    if text[:1] == "{" and text[-1:] == "}":
        try:
            value, end = _SCAN(text, 0)
        except StopIteration:
            pass
        else:
            if end == len(text):
                return value
    return _DECODER.decode(text)


def _brackets(text: str) -> bytes:
    """The brackets of ``text`` outside JSON strings, as ``[`` and ``]`` only (all C-level passes)."""
    if "\\" in text:
        # Escapes pair from the left, as str.replace scans: first \\, then \" (no longer a quote).
        text = text.replace("\\\\", "").replace('\\"', "")
    syntax = text.encode("utf-8", "surrogatepass").translate(None, _NOT_SYNTAX)
    # with escapes gone, every other run between quotes is inside a string
    return b"".join(syntax.split(b'"')[::2]).translate(_ONE_KIND)


def text_depth(text: str) -> int:
    """The deepest nesting of ``[``/``{`` in ``text``, outside JSON strings."""
    return max(itertools.accumulate(map(_DELTA.__getitem__, _brackets(text))), default=0)


def too_deep(text: str, max_depth: int) -> bool:
    """Whether ``text`` nests deeper than ``max_depth`` (``text_depth(text) > max_depth``, faster).

    Each ``bytes.replace`` pass removes the innermost level of every well-formed bracket
    sequence, so a document within the limit is gone after ``max_depth`` passes at most (one
    pass per level it has). What is left after them is deeper; anything malformed (not JSON
    anyway) gets the exact count. A run of ``max_depth + 1`` opening brackets is too deep at once.
    """
    brackets = _brackets(text)
    run = b"[" * (max_depth + 1)
    for _ in range(max_depth):
        if not brackets:
            return False
        if run in brackets:  # the common attack, plain nesting, is found at once
            return True
        shorter = brackets.replace(b"[]", b"")
        if len(shorter) == len(brackets):
            return text_depth(text) > max_depth  # malformed: no pair left to remove
        brackets = shorter
    if not brackets:
        return False
    if brackets.count(b"[") == brackets.count(b"]"):
        return True
    return text_depth(text) > max_depth


def loads(data: str | bytes | bytearray, max_depth: int = DEFAULT_MAX_JSON_DEPTH) -> Any:
    """Parse client JSON; raises :class:`JsonRejected` for invalid, too deep or non-strict JSON."""
    if type(data) is str or not isinstance(data, bytes | bytearray):  # a frame's text: one check
        text = data
    else:
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise JsonRejected("the text is not UTF-8") from None
    # Fewer brackets than the limit cannot nest deeper than it: the common case costs two counts.
    if text.count("[") + text.count("{") > max_depth and too_deep(text, max_depth):
        raise JsonRejected(f"JSON nested deeper than {max_depth} levels")
    try:
        value = _decode(text)
    except JsonRejected:
        raise
    except (ValueError, RecursionError):  # RecursionError: cannot happen after the scan; kept as a guard
        raise JsonRejected(NOT_JSON) from None
    if "\\u" in text and _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(value, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise JsonRejected("a string holds a lone UTF-16 surrogate") from None
    return value


def value_depth(value: Any, limit: int) -> int:
    """Nesting depth of a decoded JSON value (a scalar is 0, ``[]`` is 1), without recursion.

    Stops counting once past ``limit`` (returns ``limit + 1``), so a deep value costs no more
    than the part of it within the limit.
    """
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        depth += 1
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                return deepest
        stack.extend((child, depth) for child in children if isinstance(child, dict | list))
    return deepest
