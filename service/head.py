"""A strict reader of one HTTP/1.1 request head, for the lean upgrade path (service/upgrade.py).

Tornado's HTTP/1 server parses every header line with several regular expressions and normalises each
name three times; on a connection storm that was a tenth of a handshake. This reader accepts only
the plainest well-formed head (``GET <target> HTTP/1.1``, CRLF line ends, token names, no body
headers) and answers ``None`` for anything else, which then goes to Tornado exactly as it arrived:
every head accepted here is one Tornado accepts with the same start line and headers, so malformed
or unusual requests get Tornado's answers, unchanged.
"""

from __future__ import annotations

import re

from tornado.httputil import HTTPHeaders, RequestStartLine

#: a request line the lean path may serve: the target is what Tornado allows (no controls, no spaces)
_REQUEST_LINE = re.compile(r"GET ([!-~\x80-\xff]+) HTTP/1\.1")
#: every header line at once: a token, a colon, a value of visible characters, spaces and tabs
_HEADER_BLOCK = re.compile(r"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t !-~\x80-\xff]*\r\n)*")
#: headers that give a request a body; Tornado reads (and checks) bodies, so such a head is passed on
_BODY_HEADERS = ("Content-Length", "Transfer-Encoding")
#: a name as sent -> Http-Header-Case, as tornado.httputil normalises it (bounded: see _normal)
_NAMES: dict[str, str] = {}
_NAMES_MAX = 256


def _normal(name: str) -> str:
    norm = _NAMES.get(name)
    if norm is None:
        norm = "-".join([w.capitalize() for w in name.split("-")])
        if len(_NAMES) < _NAMES_MAX:  # clients send a few spellings; a flood of odd ones is not cached
            _NAMES[name] = norm
    return norm


def parse_head(data: bytes) -> tuple[RequestStartLine, HTTPHeaders, dict[str, str]] | None:
    """The start line and headers of ``data`` (a head up to and including its empty line), the headers
    also as a plain dict by Http-Header-Case name (repeated ones joined by commas, as ``HTTPHeaders``
    gives them; a lookup without normalising the name), or None when it is not the plain shape this
    reader takes (Tornado then reads it)."""
    if not data.endswith(b"\r\n\r\n"):
        return None  # bare LF line ends, or (impossible here) no head end
    text = data.decode("latin1")
    eol = text.find("\r\n")
    line = _REQUEST_LINE.fullmatch(text, 0, eol)
    if line is None:
        return None
    block_start = eol + 2
    block_end = len(text) - 2  # the block keeps each line's CRLF, not the empty line's
    if _HEADER_BLOCK.fullmatch(text, block_start, block_end) is None:
        return None
    fields: dict[str, list[str]] = {}
    repeated = False
    for raw in text[block_start:block_end - 2].split("\r\n") if block_end > block_start else ():
        name, _, value = raw.partition(":")
        name = _normal(name)
        values = fields.get(name)
        if values is None:
            fields[name] = [value.strip(" \t")]
        else:
            values.append(value.strip(" \t"))
            repeated = True
    for name in _BODY_HEADERS:
        if name in fields:
            return None
    combined = {k: ",".join(v) for k, v in fields.items()} if repeated else {k: v[0] for k, v in fields.items()}
    return RequestStartLine("GET", line.group(1), "HTTP/1.1"), _headers(fields, combined), combined


def _fill(fields: dict[str, list[str]], combined: dict[str, str]) -> HTTPHeaders:
    """``HTTPHeaders`` from names already checked and normalised, without normalising each name again on
    every insertion (three times per header through the public methods): Tornado 6.6's two dicts."""
    headers = HTTPHeaders.__new__(HTTPHeaders)  # its __init__ (MutableMapping.update) would set the same two
    headers._as_list = fields  # type: ignore[attr-defined]
    headers._combined_cache = dict(combined)  # type: ignore[attr-defined]
    return headers


def _add(fields: dict[str, list[str]], combined: dict[str, str]) -> HTTPHeaders:
    """``HTTPHeaders`` through its public methods (any Tornado)."""
    headers = HTTPHeaders()
    for name, values in fields.items():
        for value in values:
            headers.add(name, value)
    return headers


#: how headers are built: straight into the dicts where this Tornado keeps them (checked by a test against
#: Tornado's own parser), else through the public methods
_headers = _fill if set(vars(HTTPHeaders())) == {"_as_list", "_combined_cache"} else _add
