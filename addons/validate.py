"""Checks on what users add: user ids, secret names and values (pure). Patterns match in full
(`fullmatch`: `$` would let a trailing newline through).

Each check raises ValueError with a sentence that says what is wrong, never echoing a
value.
"""

from __future__ import annotations

import re
import unicodedata

from .placeholders import NAME_PATTERN

GLOBAL_NAMES = ("RUNCHAT_ID", "INSTANCE_ID", "USER_ID")
VALUE_MIN = 8
VALUE_MAX = 16384
_NAME = re.compile(NAME_PATTERN)
_USER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}")
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def user_id(text: str, what: str = "user id") -> str:
    if not _USER.fullmatch(text):
        raise ValueError(f"{what} {text!r} is invalid: use 1-128 of letters, digits and . _ @ + -")
    return text


def run_id(text: str, what: str) -> str:
    if not _RUN_ID.fullmatch(text):
        raise ValueError(f"{what} {text!r} is invalid: use 1-128 of letters, digits and . _ : -")
    return text


def secret_name(text: str) -> str:
    if not _NAME.fullmatch(text):
        raise ValueError(
            f"secret name {text!r} is invalid: it must match [A-Za-z_][A-Za-z0-9_]* and be at most 64 characters"
        )
    if text in GLOBAL_NAMES:
        raise ValueError(f"secret name {text!r} is reserved for a global variable")
    return text


def token_name(text: str) -> str:
    if not _RUN_ID.fullmatch(text):
        raise ValueError(f"token name {text!r} is invalid: use 1-128 of letters, digits and . _ : -")
    return text


def secret_value(value: str) -> str:
    """A value must be printable text of bounded length (it is never echoed)."""
    if len(value) < VALUE_MIN:
        raise ValueError(
            f"the value is too short ({len(value)} characters; at least {VALUE_MIN}): "
            "every echo of it is scrubbed from responses, so it must not be a common string"
        )
    if len(value) > VALUE_MAX:
        raise ValueError(f"the value is too long ({len(value)} characters; at most {VALUE_MAX})")
    for i, ch in enumerate(value):
        if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"):
            raise ValueError(
                f"the value contains a control or invisible character (U+{ord(ch):04X}) at position {i + 1}; "
                "it could split a header or a line"
            )
    if value != value.strip():
        raise ValueError("the value starts or ends with white space; paste it without")
    return value
