"""Quote attacker-influenced text for log lines and terminal output (pure).

A request path or host comes from a worker: written raw, a space could forge a field
(`decision=allow principal=bob`), and ESC/BEL/BS bytes could drive an operator's terminal
(OSC 52 sets the clipboard). `field` leaves plain tokens as they are and quotes the rest
logfmt-style, with every control or invisible character escaped; JSON output needs none of
this (json.dumps escapes).
"""

from __future__ import annotations

import re
import unicodedata

_PLAIN = re.compile(r"[A-Za-z0-9._:/@+,%~?&!*'()\[\]-]+")  # no space, quote, equals or backslash
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def field(value: str) -> str:
    """value as one logfmt field value: as is when plain, else quoted and escaped."""
    if value and _PLAIN.fullmatch(value):
        return value
    return '"' + "".join(_escape(ch) for ch in value) + '"'


def text(value: str) -> str:
    """value for a tab-separated line on a terminal: control and invisible characters escaped."""
    return "".join(_escape(ch) if ch in "\\\t\n\r" or _invisible(ch) else ch for ch in value)


def _escape(ch: str) -> str:
    if ch in _ESCAPES:
        return _ESCAPES[ch]
    if _invisible(ch):
        return f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}"
    return ch


def _invisible(ch: str) -> bool:
    return unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn")
